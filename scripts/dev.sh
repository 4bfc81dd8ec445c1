#!/usr/bin/env bash
# The one entry point behind the npm scripts. It brings Node.js 24 (scripts/node24.sh),
# installs dependencies when package-lock.json changed, and then runs one job:
#
#   build   build the native engine (shards/) and compile TypeScript to dist/
#   lint    biome (format + lint) and a strict type-check of src, test and bench
#   test    the C++ tests (also with AVX-512 emulated: scripts/avx512-emulated.sh), the test
#           environment (test/env/provision.sh), the Triton client's venv
#           (scripts/triton-client.sh), then vitest run
#   test:unit  only the pure-logic tests, no services
#   bench   the benchmark set (bench/)
#   start   the main job on the embedded default (see README)
#   nats    print the nats-server `start` uses, building one first when there is none
#
# Everything it installs lives in node_modules or in ~/.cache/expertmesh, so a fresh clone
# needs only bash, npm (any version, to fetch Node 24 once), curl and unzip (for a Go
# toolchain from the Go module proxy when Go is missing), cmake and a C++17 compiler; and for
# `test`, python3 with venv and pip.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

node_bin=$(bash scripts/node24.sh)
export PATH="$node_bin:$root/node_modules/.bin:$PATH"

ensure_deps() {
  local stamp=node_modules/.expertmesh-lock
  local want; want="$(node --version) $(sha256sum package-lock.json | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[dev] installing dependencies with npm ci (Node $(node --version))" >&2
    npm ci --no-audit --no-fund --foreground-scripts >&2
    echo "$want" > "$stamp"
  fi
}

# The native engine (shards/): rebuilt when its sources or the Node version changed.
ensure_native() {
  local stamp=shards/build/.expertmesh-sources
  local want
  want="$(node --version) $(find shards -path shards/build -prune -o -type f -print | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)"
  if [ ! -f shards/build/expertmesh.node ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[dev] building the native engine (shards/build.sh)" >&2
    bash shards/build.sh >&2
    echo "$want" > "$stamp"
  fi
}

# The nats-server for local mode: the one `expertmesh up` finds ($EXPERTMESH_NATS_SERVER,
# a build in ~/.cache/expertmesh/bin, PATH: src/local/nats-binary.ts), so no Go is needed
# when there is one; else test/env/provision.sh builds one (fetching a Go toolchain from the
# Go module proxy when Go is missing or too old). Prints its path.
ensure_nats() {
  local found
  if found=$(node src/local/nats-binary.ts 2>/dev/null); then
    echo "[dev] nats-server: $found" >&2
  elif [ -n "${EXPERTMESH_NATS_SERVER:-}" ]; then
    node src/local/nats-binary.ts >&2 || exit 1 # says what is wrong with it
  else
    echo "[dev] no nats-server yet (none in \$EXPERTMESH_NATS_SERVER, the cache or PATH): building one with test/env/provision.sh nats" >&2
    bash test/env/provision.sh nats >&2
    found=$(node src/local/nats-binary.ts) || exit 1
  fi
  echo "$found"
}

job=${1:-}
[ -n "$job" ] && shift
case "$job" in
  build)
    ensure_deps
    ensure_native
    tsc -p tsconfig.json
    ;;
  lint)
    ensure_deps
    biome check .
    tsc -p tsconfig.check.json
    ;;
  test)
    ensure_deps
    ensure_native
    echo "[dev] native engine tests (ctest)" >&2
    bash shards/build.sh test >&2
    bash scripts/avx512-emulated.sh
    bash test/env/provision.sh >&2
    bash scripts/triton-client.sh >/dev/null
    exec vitest run "$@"
    ;;
  test:unit)
    ensure_deps
    ensure_native
    exec vitest run --config vitest.unit.config.ts "$@"
    ;;
  bench)
    ensure_deps
    ensure_native
    exec node bench/run.ts "$@"
    ;;
  native)
    ensure_native
    ;;
  start)
    # The embedded default: serve the tiny model's manifest on this machine (nats-server,
    # 4 shards, the gateway); `expertmesh up` creates the tiny model on first run.
    ensure_deps
    ensure_native
    case " $* " in
      *" --single-process "*) ;;  # the gateway alone: no nats-server to find or build
      *) ensure_nats > /dev/null ;;
    esac
    exec node src/cli/main.ts up -f examples/tiny.yaml "$@"
    ;;
  nats)
    ensure_nats
    ;;
  node)
    ensure_deps
    exec node "$@"
    ;;
  *)
    echo "usage: scripts/dev.sh build|lint|test|test:unit|bench|start|nats|node [args]" >&2
    exit 2
    ;;
esac
