#!/usr/bin/env bash
# Builds the test environment's binaries with the go command from the Go module proxy:
# nats-server, etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
# kwok, helm and an OpenTelemetry Collector (otelcol: OTLP in, OTLP/HTTP and debug out, for
# the tracing tests), at the versions pinned in versions.sh.
#
# Binaries are cached outside the repository, keyed by version:
#   $EXPERTMESH_CACHE_DIR/bin/<tool>-<version>/<binary>   (default ~/.cache/expertmesh)
# A second run finds them and builds nothing (and needs no Go then). Each tool gets its own
# wrapper module so that version selection for one cannot raise the libraries of another.
#
# Go: a go >= 1.21 on PATH (or in /usr/local/go/bin, ~/go/bin) is used, fetching Go 1.26
# through GOTOOLCHAIN when it is older than that. Without one (or with one older than 1.21)
# the script fetches the Go toolchain itself: the module proxy ($GOPROXY, default
# https://proxy.golang.org) serves it as the module golang.org/toolchain
# (v0.0.1-go1.26.8.linux-amd64 and so on), a .zip with a whole Go tree. It is checked
# against the checksum database ($GOSUMDB, default sum.golang.org, asked through the proxy
# first) and unpacked into $EXPERTMESH_CACHE_DIR/go/go1.26.8. EXPERTMESH_GO_TOOLCHAIN=fetch
# uses that toolchain even when another go is installed.
#
# Usage: test/env/provision.sh [tool ...]   (tools: nats etcd kube kwok helm otelcol go;
# default all but go, which only makes sure a go command is there)
# Prints the bin directory of every tool on the last lines as NAME=DIR.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.sh
source "$here/versions.sh"

cache=${EXPERTMESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/expertmesh}
bin_root="$cache/bin"
work_root="$cache/build"
mkdir -p "$bin_root" "$work_root"

go_toolchain=$GO_TOOLCHAIN_VERSION
go_root="$cache/go/$go_toolchain"

export GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0

start_all=$(date +%s)
log() { printf '[provision %4ss] %s\n' "$(( $(date +%s) - start_all ))" "$*" >&2; }
die() { printf '[provision] ERROR: %s\n' "$*" >&2; exit 1; }

# The URLs in $GOPROXY (a list split by , or |), up to "direct" or "off".
proxy_urls() {
  local p
  IFS=',|' read -r -a list <<< "${GOPROXY:-https://proxy.golang.org,direct}"
  for p in "${list[@]}"; do
    case "$p" in
      http://* | https://* | file://*) echo "${p%/}" ;;
      direct | off) return ;;
    esac
  done
}

# download URL FILE LABEL: curl with progress: curl's bar on a terminal, else a log line
# at every 10%.
download() {
  local url=$1 file=$2 label=$3
  if [ -t 2 ]; then
    curl -fL --retry 2 --progress-bar -o "$file" "$url"
    return
  fi
  local total
  total=$(curl -fsSLI "$url" 2>/dev/null | tr -d '\r' | awk 'tolower($1) == "content-length:" { n = $2 } END { print n + 0 }')
  : > "$file"
  curl -fsSL --retry 2 -o "$file" "$url" &
  local pid=$! step=-1 t0 have
  t0=$(date +%s)
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    have=$(wc -c < "$file" | tr -d ' ')
    if [ "$total" -gt 0 ] && [ $(( have * 10 / total )) -gt "$step" ]; then
      step=$(( have * 10 / total ))
      log "$label: $(( have * 100 / total ))% ($(( have >> 20 )) of $(( total >> 20 )) MiB, $(( $(date +%s) - t0 ))s)"
    elif [ "$total" -eq 0 ] && [ $(( ($(date +%s) - t0) % 10 )) -eq 0 ]; then
      log "$label: $(( have >> 20 )) MiB so far"
    fi
  done
  wait "$pid" || return 1
  have=$(wc -c < "$file" | tr -d ' ')
  [ "$step" -ge 10 ] || log "$label: 100% ($(( have >> 20 )) MiB, $(( $(date +%s) - t0 ))s)"
}

# h1_hash DIR: Go's dirhash Hash1 of the files under DIR, named relative to DIR (for a
# module zip unpacked into DIR: the h1: hash go.sum and the checksum database hold).
h1_hash() {
  local sha=(sha256sum) sum
  command -v sha256sum >/dev/null 2>&1 || sha=(shasum -a 256)
  sum=$(cd "$1" && find . -type f | sed 's#^\./##' | LC_ALL=C sort | tr '\n' '\0' \
    | xargs -0 "${sha[@]}" | "${sha[@]}" | cut -d' ' -f1)
  printf 'h1:%s\n' "$(printf '%s' "$sum" | perl -ne 'print pack("H*", $_)' | base64)"
}

# sumdb_h1 MODULE VERSION PROXY...: the h1: hash the checksum database holds, asked
# through each proxy (…/sumdb/NAME/lookup/…) and then the database itself.
sumdb_h1() {
  local mod=$1 ver=$2; shift 2
  local name=${GOSUMDB:-sum.golang.org}
  name=${name%% *}; name=${name%%+*}
  local urls=() p url body h
  for p in "$@"; do urls+=("$p/sumdb/$name/lookup/$mod@$ver"); done
  urls+=("https://$name/lookup/$mod@$ver")
  for url in "${urls[@]}"; do
    body=$(curl -fsSL --max-time 30 "$url" 2>/dev/null) || continue
    h=$(printf '%s\n' "$body" | awk -v m="$mod" -v v="$ver" '$1 == m && $2 == v { print $3; exit }')
    [ -n "$h" ] && { echo "$h"; return 0; }
  done
  return 1
}

# Fetches Go $go_toolchain from the module proxy into $go_root (once).
fetch_go() {
  if [ -f "$go_root/.complete" ] && "$go_root/bin/go" version >/dev/null 2>&1; then
    log "Go $go_toolchain: cached in $go_root"
    return
  fi
  command -v curl >/dev/null 2>&1 || die "fetching Go needs curl (apt-get install curl), or install Go >= 1.21"
  command -v unzip >/dev/null 2>&1 || die "fetching Go needs unzip (apt-get install unzip), or install Go >= 1.21"
  local os arch
  case "$(uname -s)" in
    Linux) os=linux ;; Darwin) os=darwin ;; FreeBSD) os=freebsd ;;
    *) die "no Go toolchain download for $(uname -s): install Go >= 1.21" ;;
  esac
  case "$(uname -m)" in
    x86_64 | amd64) arch=amd64 ;; aarch64 | arm64) arch=arm64 ;; i?86) arch=386 ;;
    armv6l | armv7l) arch=armv6l ;; ppc64le) arch=ppc64le ;; s390x) arch=s390x ;;
    riscv64) arch=riscv64 ;; loongarch64) arch=loong64 ;;
    *) die "no Go toolchain download for $(uname -m): install Go >= 1.21" ;;
  esac
  local mod=golang.org/toolchain ver="v0.0.1-$go_toolchain.$os-$arch"
  local proxies=() p
  while IFS= read -r p; do proxies+=("$p"); done < <(proxy_urls)
  [ ${#proxies[@]} -gt 0 ] || die "GOPROXY=${GOPROXY:-} names no module proxy to fetch Go from: set GOPROXY=https://proxy.golang.org or install Go >= 1.21"
  local tmp="$work_root/go-fetch.$$" fetched=
  rm -rf "$tmp"; mkdir -p "$tmp"
  for p in "${proxies[@]}"; do
    log "Go $go_toolchain: downloading $mod@$ver from $p (about 70 MiB)"
    if download "$p/$mod/@v/$ver.zip" "$tmp/go.zip" "Go $go_toolchain download"; then fetched=$p; break; fi
    log "Go $go_toolchain: $p/$mod/@v/$ver.zip failed"
  done
  [ -n "$fetched" ] || { rm -rf "$tmp"; die "could not download $mod@$ver from ${proxies[*]}: check the network or GOPROXY, or install Go >= 1.21"; }
  log "Go $go_toolchain: unpacking"
  unzip -q "$tmp/go.zip" -d "$tmp/x" || { rm -rf "$tmp"; die "$tmp/go.zip is not a zip file"; }
  rm -f "$tmp/go.zip"
  if [ "${GOSUMDB:-}" = off ]; then
    log "Go $go_toolchain: GOSUMDB=off, so not checked against the checksum database"
  else
    local want got
    want=$(sumdb_h1 "$mod" "$ver" "${proxies[@]}") || { rm -rf "$tmp"; die "could not get the checksum of $mod@$ver from the checksum database ${GOSUMDB:-sum.golang.org} (through ${proxies[*]} or directly): check the network, set GOSUMDB=off to skip the check, or install Go >= 1.21"; }
    got=$(h1_hash "$tmp/x")
    [ "$got" = "$want" ] || { rm -rf "$tmp"; die "checksum mismatch for $mod@$ver: the download hashes to $got, the checksum database says $want"; }
    log "Go $go_toolchain: checksum $got matches the checksum database"
  fi
  local tree="$tmp/x/$mod@$ver"
  [ -f "$tree/bin/go" ] || { rm -rf "$tmp"; die "the download has no $mod@$ver/bin/go"; }
  # Module zips do not keep the executable bits (the go command sets them the same way).
  find "$tree/bin" "$tree/pkg/tool" -type f -exec chmod +x {} + 2>/dev/null || true
  local version
  version=$(GOTOOLCHAIN=local "$tree/bin/go" version 2>&1) || { rm -rf "$tmp"; die "the fetched go does not run: $version"; }
  case "$version" in
    "go version $go_toolchain "*) ;;
    *) rm -rf "$tmp"; die "the fetched go reports '$version', expected $go_toolchain" ;;
  esac
  rm -rf "$go_root"; mkdir -p "$(dirname "$go_root")"
  mv "$tree" "$go_root"
  touch "$go_root/.complete"
  rm -rf "$tmp"
  log "Go $go_toolchain: ready in $go_root ($version)"
}

# Makes sure a usable go command is on PATH (once): an installed go >= 1.21, else the
# toolchain fetched into the cache.
go_ready=
ensure_go() {
  [ -z "$go_ready" ] || return 0
  go_ready=1
  if [ "${EXPERTMESH_GO_TOOLCHAIN:-}" != fetch ]; then
    # PATH first; the machines also keep Go in /usr/local/go/bin, which a minimal PATH may lack.
    local cand v minor
    for cand in "$(command -v go 2>/dev/null || true)" /usr/local/go/bin/go "$HOME/go/bin/go"; do
      { [ -n "$cand" ] && [ -x "$cand" ]; } || continue
      v=$(GOTOOLCHAIN=local "$cand" env GOVERSION 2>/dev/null || true)
      minor=$(printf '%s' "$v" | sed -n 's/^go1\.\([0-9]*\).*/\1/p')
      if [ -z "$minor" ] || [ "$minor" -lt 21 ]; then
        log "$cand is ${v:-a go of unknown version}, older than Go 1.21: not used"
        continue
      fi
      export PATH="$(dirname "$cand"):$PATH"
      if [ "$minor" -lt 26 ]; then
        # kwok needs Go 1.26; this go fetches that toolchain from the Go module proxy.
        export GOTOOLCHAIN=${GOTOOLCHAIN:-$go_toolchain}
        log "$v found; using GOTOOLCHAIN=$GOTOOLCHAIN from the Go module proxy"
      else
        export GOTOOLCHAIN=${GOTOOLCHAIN:-local}
      fi
      return 0
    done
    log "no go >= 1.21 on PATH, in /usr/local/go/bin or ~/go/bin: fetching Go $go_toolchain"
  else
    log "EXPERTMESH_GO_TOOLCHAIN=fetch: using Go $go_toolchain from the module proxy"
  fi
  fetch_go
  export PATH="$go_root/bin:$PATH" GOTOOLCHAIN=local
}

# Runs `go build -v` and turns its package list into a progress line every 25 packages.
go_build_progress() {
  local label=$1; shift
  local logfile; logfile=$(mktemp)
  local t0; t0=$(date +%s)
  set +e
  go build -v "$@" 2>&1 | tee "$logfile" | awk -v label="$label" -v t0="$t0" '
    /^#/ || /error/ || /\.go:[0-9]+/ { next }
    { n++; if (n % 25 == 0) { printf "[provision] %s: compiled %d packages (%ds)\n", label, n, systime() - t0 > "/dev/stderr"; fflush("/dev/stderr") } }
    END { printf "[provision] %s: compiled %d packages in total\n", label, n > "/dev/stderr" }'
  local rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -ne 0 ]; then
    grep -E '\.go:[0-9]+|^#|error|cannot|missing' "$logfile" | head -40 >&2 || tail -40 "$logfile" >&2
    rm -f "$logfile"
    die "go build of $label failed (exit $rc); output above"
  fi
  rm -f "$logfile"
}

# new_module DIR MODULE_PATH: a fresh wrapper module in DIR.
new_module() {
  rm -rf "$1"; mkdir -p "$1"
  (cd "$1" && go mod init "$2" >/dev/null 2>&1) || die "go mod init failed in $1"
  printf 'package tools\n' > "$1/tools.go"
}

# require DIR MODULE@VERSION: adds a requirement to the wrapper module.
require() {
  (cd "$1" && go mod edit -require="$2") || die "go mod edit -require=$2 failed"
}

done_marker() { echo "$bin_root/$1/.complete"; }

build_nats() {
  local dir="$bin_root/nats-server-$NATS_SERVER_VERSION"
  [ -f "$(done_marker "nats-server-$NATS_SERVER_VERSION")" ] && { log "nats-server $NATS_SERVER_VERSION: cached"; echo "NATS_BIN=$dir"; return; }
  ensure_go
  log "nats-server $NATS_SERVER_VERSION: building"
  local w="$work_root/nats-$NATS_SERVER_VERSION"
  new_module "$w" expertmesh.test/nats
  require "$w" "github.com/nats-io/nats-server/v2@$NATS_SERVER_VERSION"
  (cd "$w" && go mod download github.com/nats-io/nats-server/v2 >/dev/null) || die "downloading nats-server failed"
  mkdir -p "$dir"
  (cd "$w" && go_build_progress nats-server -trimpath -o "$dir/nats-server" github.com/nats-io/nats-server/v2)
  touch "$(done_marker "nats-server-$NATS_SERVER_VERSION")"
  echo "NATS_BIN=$dir"
}

build_etcd() {
  local dir="$bin_root/etcd-$ETCD_VERSION"
  [ -f "$(done_marker "etcd-$ETCD_VERSION")" ] && { log "etcd $ETCD_VERSION: cached"; echo "ETCD_BIN=$dir"; return; }
  ensure_go
  log "etcd $ETCD_VERSION: building"
  local w="$work_root/etcd-$ETCD_VERSION"
  new_module "$w" expertmesh.test/etcd
  require "$w" "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  # etcd's own main package lives in the root module go.etcd.io/etcd/v3; the server module
  # exposes etcdmain, so a two-line main calls it exactly as etcd's main.go does.
  cat > "$w/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  rm -f "$w/tools.go"
  mkdir -p "$dir"
  (cd "$w" && go_build_progress etcd -trimpath -ldflags "-s -w" -o "$dir/etcd" .)
  touch "$(done_marker "etcd-$ETCD_VERSION")"
  echo "ETCD_BIN=$dir"
}

build_kube() {
  local v=$KUBERNETES_VERSION
  local dir="$bin_root/kubernetes-$v"
  [ -f "$(done_marker "kubernetes-$v")" ] && { log "kubernetes $v: cached"; echo "KUBE_BIN=$dir"; return; }
  ensure_go
  log "kubernetes $v: building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl (the longest step: 10-30 minutes on 2 cores)"
  local w="$work_root/kubernetes-$v"
  new_module "$w" expertmesh.test/kubernetes
  require "$w" "k8s.io/kubernetes@$v"
  local modfile
  modfile=$(cd "$w" && go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  [ -f "$modfile" ] || die "could not download k8s.io/kubernetes@$v from the Go module proxy"
  local staging_v="v0.${v#v1.}"
  local n=0
  while read -r name; do
    (cd "$w" && go mod edit -replace="$name=$name@$staging_v") || die "go mod edit -replace $name failed"
    n=$((n + 1))
  done < <(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$modfile")
  [ "$n" -gt 0 ] || die "found no staging modules in k8s.io/kubernetes@$v's go.mod"
  log "kubernetes $v: $n staging modules replaced by their $staging_v releases; resolving dependencies"
  local major minor
  major=$(echo "$v" | sed 's/^v\([0-9]*\)\..*/\1/')
  minor=$(echo "$v" | sed 's/^v[0-9]*\.\([0-9]*\)\..*/\1/')
  local ld="-s -w"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ld="$ld -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  mkdir -p "$dir"
  (cd "$w" && go mod download all >/dev/null 2>&1 || true)
  (cd "$w" && go_build_progress kubernetes -trimpath -ldflags "$ld" -o "$dir/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl)
  for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    [ -x "$dir/$b" ] || die "kubernetes build did not produce $b"
  done
  touch "$(done_marker "kubernetes-$v")"
  echo "KUBE_BIN=$dir"
}

build_kwok() {
  local dir="$bin_root/kwok-$KWOK_VERSION"
  [ -f "$(done_marker "kwok-$KWOK_VERSION")" ] && { log "kwok $KWOK_VERSION: cached"; echo "KWOK_BIN=$dir"; return; }
  ensure_go
  log "kwok $KWOK_VERSION: building"
  local w="$work_root/kwok-$KWOK_VERSION"
  new_module "$w" expertmesh.test/kwok
  require "$w" "sigs.k8s.io/kwok@$KWOK_VERSION"
  mkdir -p "$dir"
  (cd "$w" && go_build_progress kwok -trimpath -ldflags "-s -w" -o "$dir/kwok" sigs.k8s.io/kwok/cmd/kwok)
  # kwok's standard Stage objects (node initialize/heartbeat, pod ready/complete/delete).
  local src
  src=$(cd "$w" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
  [ -d "$src/kustomize/stage" ] || die "kwok module has no kustomize/stage folder at $src"
  rm -rf "$dir/stage"; cp -r "$src/kustomize/stage" "$dir/stage"; chmod -R u+w "$dir/stage"
  touch "$(done_marker "kwok-$KWOK_VERSION")"
  echo "KWOK_BIN=$dir"
}

build_helm() {
  local dir="$bin_root/helm-$HELM_VERSION"
  [ -f "$(done_marker "helm-$HELM_VERSION")" ] && { log "helm $HELM_VERSION: cached"; echo "HELM_BIN=$dir"; return; }
  ensure_go
  log "helm $HELM_VERSION: building"
  local w="$work_root/helm-$HELM_VERSION"
  new_module "$w" expertmesh.test/helm
  require "$w" "helm.sh/helm/v3@$HELM_VERSION"
  mkdir -p "$dir"
  (cd "$w" && go_build_progress helm -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" -o "$dir/helm" helm.sh/helm/v3/cmd/helm)
  touch "$(done_marker "helm-$HELM_VERSION")"
  echo "HELM_BIN=$dir"
}

build_otelcol() {
  local v=$OTELCOL_VERSION api=$OTELCOL_API_VERSION
  local dir="$bin_root/otelcol-$v"
  [ -f "$(done_marker "otelcol-$v")" ] && { log "otelcol $v: cached"; echo "OTELCOL_BIN=$dir"; return; }
  ensure_go
  log "otelcol $v: building (the collector core's otlp receiver, otlphttp and debug exporters)"
  local w="$work_root/otelcol-$v"
  new_module "$w" expertmesh.test/otelcol
  for m in otelcol service receiver/otlpreceiver exporter/otlphttpexporter exporter/debugexporter; do
    require "$w" "go.opentelemetry.io/collector/$m@$v"
  done
  for m in component confmap confmap/provider/envprovider confmap/provider/fileprovider exporter receiver; do
    require "$w" "go.opentelemetry.io/collector/$m@$api"
  done
  # What the collector builder (ocb) generates for these components, in one file.
  cat > "$w/main.go" <<'GO'
package main

import (
	"log"

	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/confmap"
	"go.opentelemetry.io/collector/confmap/provider/envprovider"
	"go.opentelemetry.io/collector/confmap/provider/fileprovider"
	"go.opentelemetry.io/collector/exporter"
	"go.opentelemetry.io/collector/exporter/debugexporter"
	"go.opentelemetry.io/collector/exporter/otlphttpexporter"
	"go.opentelemetry.io/collector/otelcol"
	"go.opentelemetry.io/collector/receiver"
	"go.opentelemetry.io/collector/receiver/otlpreceiver"
	"go.opentelemetry.io/collector/service/telemetry/otelconftelemetry"
)

func components() (otelcol.Factories, error) {
	receivers, err := otelcol.MakeFactoryMap[receiver.Factory](otlpreceiver.NewFactory())
	if err != nil {
		return otelcol.Factories{}, err
	}
	exporters, err := otelcol.MakeFactoryMap[exporter.Factory](otlphttpexporter.NewFactory(), debugexporter.NewFactory())
	if err != nil {
		return otelcol.Factories{}, err
	}
	return otelcol.Factories{Receivers: receivers, Exporters: exporters, Telemetry: otelconftelemetry.NewFactory()}, nil
}

func main() {
	set := otelcol.CollectorSettings{
		BuildInfo: component.BuildInfo{Command: "otelcol", Description: "OpenTelemetry Collector for expertmesh's tests", Version: "__VERSION__"},
		Factories: components,
		ConfigProviderSettings: otelcol.ConfigProviderSettings{
			ResolverSettings: confmap.ResolverSettings{
				ProviderFactories: []confmap.ProviderFactory{envprovider.NewFactory(), fileprovider.NewFactory()},
			},
		},
	}
	if err := otelcol.NewCommand(set).Execute(); err != nil {
		log.Fatal(err)
	}
}
GO
  sed -i "s/__VERSION__/${v#v}/" "$w/main.go"
  rm -f "$w/tools.go"
  (cd "$w" && go mod tidy >/dev/null 2>&1) || die "resolving the collector's modules failed (go mod tidy in $w)"
  mkdir -p "$dir"
  (cd "$w" && go_build_progress otelcol -trimpath -ldflags "-s -w" -o "$dir/otelcol" .)
  touch "$(done_marker "otelcol-$v")"
  echo "OTELCOL_BIN=$dir"
}

tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(nats etcd kwok helm otelcol kube)
for t in "${tools[@]}"; do
  case "$t" in
    go) ensure_go; echo "GO_BIN=$(dirname "$(command -v go)")" ;;
    nats) build_nats ;;
    etcd) build_etcd ;;
    kube) build_kube ;;
    kwok) build_kwok ;;
    helm) build_helm ;;
    otelcol) build_otelcol ;;
    *) die "unknown tool '$t' (known: nats etcd kube kwok helm otelcol go)" ;;
  esac
done
log "all requested tools ready in $bin_root"
