#!/usr/bin/env bash
# Fetches a CustomResourceDefinition of another project at a pinned version from the Go
# module proxy (the only network the test environment uses), so that the tests can install
# it into the real kube-apiserver:
#   keda        KEDA's ScaledObject (config/crd/bases/keda.sh_scaledobjects.yaml of
#               github.com/kedacore/keda/v2): examples/autoscaling/keda.yaml is checked
#               against it;
#   podmonitor  the Prometheus Operator's PodMonitor (example/prometheus-operator-crd/
#               monitoring.coreos.com_podmonitors.yaml of
#               github.com/prometheus-operator/prometheus-operator): the operator's
#               PodMonitors (spec.monitoring.podMonitor) are applied against it;
#   servicemonitor  its ServiceMonitor (the file beside it): the chart's
#               (metrics.serviceMonitor) is checked against it;
#   prometheusrule  its PrometheusRule (beside them too): the chart's alerts
#               (metrics.prometheusRule) are checked against it.
#
# `go mod download` fetches the module's zip from GOPROXY (checked against GOSUMDB, as every
# module provision.sh builds), and this copies that one file into the cache, keyed by
# version like provision.sh's binaries:
#   $EXPERTMESH_CACHE_DIR/crd/<name>-<version>/<file>   (default ~/.cache/expertmesh)
# A second run finds it and fetches nothing.
#
# Usage: test/env/crd.sh keda|podmonitor|servicemonitor|prometheusrule
# Prints the CRD file's absolute path on the last line of stdout; progress goes to stderr.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.sh
source "$here/versions.sh"
case "${1:-}" in
  keda)
    NAME=keda VERSION=$KEDA_VERSION MODULE=github.com/kedacore/keda/v2
    CRD_IN_MODULE=config/crd/bases/keda.sh_scaledobjects.yaml CRD_NAME=scaledobjects.keda.sh
    ;;
  podmonitor)
    NAME=prometheus-operator VERSION=$PROMETHEUS_OPERATOR_VERSION
    MODULE=github.com/prometheus-operator/prometheus-operator
    CRD_IN_MODULE=example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml
    CRD_NAME=podmonitors.monitoring.coreos.com
    ;;
  servicemonitor)
    NAME=prometheus-operator VERSION=$PROMETHEUS_OPERATOR_VERSION
    MODULE=github.com/prometheus-operator/prometheus-operator
    CRD_IN_MODULE=example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml
    CRD_NAME=servicemonitors.monitoring.coreos.com
    ;;
  prometheusrule)
    NAME=prometheus-operator VERSION=$PROMETHEUS_OPERATOR_VERSION
    MODULE=github.com/prometheus-operator/prometheus-operator
    CRD_IN_MODULE=example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml
    CRD_NAME=prometheusrules.monitoring.coreos.com
    ;;
  *)
    echo "usage: test/env/crd.sh keda|podmonitor|servicemonitor|prometheusrule" >&2
    exit 2
    ;;
esac

cache=${EXPERTMESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/expertmesh}
dir="$cache/crd/$NAME-$VERSION"
out="$dir/$(basename "$CRD_IN_MODULE")"

log() { printf '[crd %s] %s\n' "$NAME" "$*" >&2; }
die() { printf '[crd %s] ERROR: %s\n' "$NAME" "$*" >&2; exit 1; }

if [ -s "$out" ]; then
  log "$CRD_NAME at $VERSION: cached"
  echo "$out"
  exit 0
fi

export GOWORK=off GOFLAGS=-mod=mod
# Only a download: no build, so the local go (>= 1.21) is enough whatever the module's go.mod asks.
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

log "$VERSION: downloading $MODULE from $(go env GOPROXY)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && go mod init "expertmesh.test/$NAME" >/dev/null 2>&1) || die "go mod init failed in $work"
json=$(cd "$work" && go mod download -json "$MODULE@$VERSION") ||
  die "go mod download $MODULE@$VERSION failed: ${json:-no output}"
moddir=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')
[ -n "$moddir" ] && [ -d "$moddir" ] || die "go mod download gave no module folder: $json"
src="$moddir/$CRD_IN_MODULE"
[ -f "$src" ] || die "$MODULE@$VERSION has no $CRD_IN_MODULE"
grep -q "^  name: $CRD_NAME\$" "$src" || die "$src is not the $CRD_NAME CRD"

mkdir -p "$dir"
tmp=$(mktemp "$dir/.crd.XXXXXX")
cp "$src" "$tmp"
chmod 644 "$tmp"
mv -f "$tmp" "$out"
log "$CRD_NAME at $VERSION cached at $out"
echo "$out"
