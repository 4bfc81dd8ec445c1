# Pinned versions of the test environment's binaries. Sourced by provision.sh and read by
# test/env/versions.ts; change a version here and the next provision builds it anew.
NATS_SERVER_VERSION=v2.14.9
KUBERNETES_VERSION=v1.35.4
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.21.4
