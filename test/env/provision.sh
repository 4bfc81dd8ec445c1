#!/usr/bin/env bash
# Builds the test environment's binaries with the go command from the Go module proxy:
# nats-server, etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
# kwok and helm, at the versions pinned in versions.sh.
#
# Binaries are cached outside the repository, keyed by version:
#   $EXPERTMESH_CACHE_DIR/bin/<tool>-<version>/<binary>   (default ~/.cache/expertmesh)
# A second run finds them and builds nothing. Each tool gets its own wrapper module so
# that version selection for one cannot raise the libraries of another.
#
# Usage: test/env/provision.sh [tool ...]   (tools: nats etcd kube kwok helm; default all)
# Prints the bin directory of every tool on the last lines as NAME=DIR.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.sh
source "$here/versions.sh"

cache=${EXPERTMESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/expertmesh}
bin_root="$cache/bin"
work_root="$cache/build"
mkdir -p "$bin_root" "$work_root"

export GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0
# The machines keep Go in /usr/local/go/bin, which a minimal PATH may lack.
for d in /usr/local/go/bin "$HOME/go/bin"; do
  [ -x "$d/go" ] && case ":$PATH:" in *":$d:"*) ;; *) PATH="$d:$PATH" ;; esac
done
export PATH

start_all=$(date +%s)
log() { printf '[provision %4ss] %s\n' "$(( $(date +%s) - start_all ))" "$*" >&2; }
die() { printf '[provision] ERROR: %s\n' "$*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "the go command is not on PATH (nor in /usr/local/go/bin); install Go >= 1.21 and run again"
# kwok needs Go 1.26; an older go (>= 1.21) fetches that toolchain from the Go module proxy.
go_minor=$(go env GOVERSION | sed -n 's/^go1\.\([0-9]*\).*/\1/p')
[ -n "$go_minor" ] && [ "$go_minor" -ge 21 ] || die "$(go version) is too old: need Go >= 1.21 (which can fetch Go 1.26 by itself)"
if [ "$go_minor" -lt 26 ]; then
  export GOTOOLCHAIN=${GOTOOLCHAIN:-go1.26.8}
  log "$(go env GOVERSION) found; using GOTOOLCHAIN=$GOTOOLCHAIN from the Go module proxy"
else
  export GOTOOLCHAIN=${GOTOOLCHAIN:-local}
fi

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
  log "helm $HELM_VERSION: building"
  local w="$work_root/helm-$HELM_VERSION"
  new_module "$w" expertmesh.test/helm
  require "$w" "helm.sh/helm/v3@$HELM_VERSION"
  mkdir -p "$dir"
  (cd "$w" && go_build_progress helm -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" -o "$dir/helm" helm.sh/helm/v3/cmd/helm)
  touch "$(done_marker "helm-$HELM_VERSION")"
  echo "HELM_BIN=$dir"
}

tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(nats etcd kwok helm kube)
for t in "${tools[@]}"; do
  case "$t" in
    nats) build_nats ;;
    etcd) build_etcd ;;
    kube) build_kube ;;
    kwok) build_kwok ;;
    helm) build_helm ;;
    *) die "unknown tool '$t' (known: nats etcd kube kwok helm)" ;;
  esac
done
log "all requested tools ready in $bin_root"
