# Pinned versions of the test environment's binaries. Sourced by provision.sh and read by
# test/env/paths.ts; change a version here and the next provision builds it anew.
NATS_SERVER_VERSION=v2.14.9
KUBERNETES_VERSION=v1.35.4
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.21.4
# OpenTelemetry Collector core release (its otlp receiver and otlphttp exporter) that
# provision.sh builds as the tracing tests' collector; OTELCOL_API_VERSION is the same
# release's stable modules (component, confmap, ...: v1.x beside v0.x).
OTELCOL_VERSION=v0.165.0
OTELCOL_API_VERSION=v1.71.0
# The Go toolchain provision.sh fetches from the module proxy when no usable go is installed
# (and the one an older go >= 1.21 switches to: kwok needs Go 1.26).
GO_TOOLCHAIN_VERSION=go1.26.8
# KEDA release whose ScaledObject CRD crd.sh fetches to check examples/autoscaling.
KEDA_VERSION=v2.21.0
# Prometheus Operator release whose PodMonitor CRD crd.sh fetches (spec.monitoring.podMonitor).
PROMETHEUS_OPERATOR_VERSION=v0.87.1
