#!/usr/bin/env bash
# Fetches KEDA's ScaledObject CustomResourceDefinition at a pinned KEDA version from the Go
# module proxy (the only network the test environment uses), so that the tests can install
# it into the real kube-apiserver and validate examples/autoscaling/keda.yaml against it.
#
# The CRD is the file config/crd/bases/keda.sh_scaledobjects.yaml of the Go module
# github.com/kedacore/keda/v2 at the pinned version: `go mod download` fetches the module's
# zip from GOPROXY (checked against GOSUMDB, as every module provision.sh builds), and this
# copies that one file into the cache, keyed by version like provision.sh's binaries:
#   $EXPERTMESH_CACHE_DIR/crd/keda-<version>/keda.sh_scaledobjects.yaml
#                                                  (default ~/.cache/expertmesh)
# A second run finds it and fetches nothing.
#
# Usage: test/env/keda-crd.sh
# Prints the CRD file's absolute path on the last line of stdout; progress goes to stderr.
set -euo pipefail

# KEDA release whose CRD the examples are checked against: versions.sh (a version the Go
# module proxy serves: `go list -m -versions github.com/kedacore/keda/v2`).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.sh
source "$here/versions.sh"
KEDA_MODULE=github.com/kedacore/keda/v2
CRD_IN_MODULE=config/crd/bases/keda.sh_scaledobjects.yaml

cache=${EXPERTMESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/expertmesh}
dir="$cache/crd/keda-$KEDA_VERSION"
out="$dir/keda.sh_scaledobjects.yaml"

log() { printf '[keda-crd] %s\n' "$*" >&2; }
die() { printf '[keda-crd] ERROR: %s\n' "$*" >&2; exit 1; }

if [ -s "$out" ]; then
  log "KEDA $KEDA_VERSION ScaledObject CRD: cached"
  echo "$out"
  exit 0
fi

export GOWORK=off GOFLAGS=-mod=mod
# Only a download: no build, so the local go (>= 1.21) is enough whatever KEDA's go.mod asks.
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}
# The machines keep Go in /usr/local/go/bin, which a minimal PATH may lack; without any,
# `provision.sh go` fetches a toolchain into $cache/go/<version>.
if ! command -v go >/dev/null 2>&1; then
  for d in /usr/local/go/bin "$HOME/go/bin" "$cache"/go/go*/bin; do
    [ -x "$d/go" ] && { PATH="$d:$PATH"; break; }
  done
fi
export PATH
command -v go >/dev/null 2>&1 ||
  die "no go command (PATH, /usr/local/go/bin, $cache/go): run test/env/provision.sh go, or install Go >= 1.21"

log "KEDA $KEDA_VERSION: downloading $KEDA_MODULE from $(go env GOPROXY)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && go mod init expertmesh.test/keda >/dev/null 2>&1) || die "go mod init failed in $work"
json=$(cd "$work" && go mod download -json "$KEDA_MODULE@$KEDA_VERSION") ||
  die "go mod download $KEDA_MODULE@$KEDA_VERSION failed: ${json:-no output}"
moddir=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
[ -n "$moddir" ] && [ -d "$moddir" ] || die "go mod download gave no module folder: $json"
src="$moddir/$CRD_IN_MODULE"
[ -f "$src" ] || die "$KEDA_MODULE@$KEDA_VERSION has no $CRD_IN_MODULE"
grep -q '^  name: scaledobjects.keda.sh$' "$src" || die "$src is not the ScaledObject CRD"

mkdir -p "$dir"
tmp=$(mktemp "$dir/.crd.XXXXXX")
cp "$src" "$tmp"
chmod 644 "$tmp"
mv -f "$tmp" "$out"
log "KEDA $KEDA_VERSION ScaledObject CRD cached at $out"
echo "$out"
