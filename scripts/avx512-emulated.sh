#!/usr/bin/env bash
# The native engine's C++ tests once more, with the AVX-512, AVX512_BF16 and AMX kernels
# emulated: on a machine without them (most development and CI machines so far) those kernels
# never run otherwise, yet they are what most x86 servers select. SIMDe (header-only, from its
# PyPI sdist, pinned by sha256, cached) supplies the AVX-512 intrinsics as AVX2 code,
# shards/cpu/amx_emulation.h the tile instructions, and the build reports the emulated ISAs as
# present, so every test also runs them (avx512_emulation.h and amx_emulation.h say what this
# checks and what it cannot). Called by `npm test`.
#
# Needs an x86-64 CPU with AVX2; elsewhere there are no AVX-512 kernels to test and it says
# so. Environment: EM_BUILD_JOBS (default: number of CPUs), EXPERTMESH_CACHE_DIR.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${EXPERTMESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/expertmesh}
jobs=${EM_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}
log() { echo "[avx512-emulated] $*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
t0=$(date +%s)

if [ "$(uname -m)" != x86_64 ] || ! grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
  log "not run: this is not an x86-64 Linux machine with AVX2 (no AVX-512 kernels to emulate here)"
  exit 0
fi

# SIMDe 0.8.2 headers, from the simde-py sdist on PyPI.
simde_url=https://files.pythonhosted.org/packages/6d/53/5d46f64168c67597f657f3edb7ae94b7cda0fefe2db2a15568f03f70a673/simde_py-0.8.2.post1.tar.gz
simde_sha256=d7eebe0728d44a5e1fef186ed7810407465e835a2ead45ce0c22eefadd66dbf6
simde="$cache/simde-0.8.2"
if [ ! -f "$simde/.complete" ]; then
  log "fetching SIMDe 0.8.2 headers (0.7 MB, once) into $simde"
  tmp="$simde.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  curl -fsSL --retry 3 -o "$tmp/simde.tar.gz" "$simde_url" || die "download failed: $simde_url"
  echo "$simde_sha256  $tmp/simde.tar.gz" | sha256sum -c --quiet - || die "sha256 mismatch for $simde_url"
  tar -xzf "$tmp/simde.tar.gz" -C "$tmp" simde_py-0.8.2.post1/simde_py/simde/simde
  mkdir -p "$tmp/include"
  mv "$tmp/simde_py-0.8.2.post1/simde_py/simde/simde" "$tmp/include/simde"
  [ -f "$tmp/include/simde/x86/avx512.h" ] || die "the sdist has no simde/x86/avx512.h (layout changed?)"
  rm -rf "$simde"
  mkdir -p "$simde"
  mv "$tmp/include" "$simde/include"
  touch "$simde/.complete"
  rm -rf "$tmp"
  trap - EXIT
fi

# One build directory per checkout (CMake ties a build directory to its source path). The
# engine, its C++ tests and the addon, as shards/build.sh builds them, plus the emulation.
build="$cache/avx512-emulated/$(printf '%s' "$root" | cksum | cut -d' ' -f1)"
mkdir -p "$(dirname "$build")" # its log sits beside it, written before the build makes it
log "building the engine, its tests and the addon with emulated AVX-512 in $build"
addon=$(EM_BUILD_DIR="$build" EM_CUDA=OFF EM_BUILD_JOBS="$jobs" \
  EM_CMAKE_ARGS="-DEM_EMULATE_AVX512=ON -DSIMDE_INCLUDE_DIR=$simde/include" \
  bash "$root/shards/build.sh" test 2>"$build.log") || {
  tail -40 "$build.log" >&2
  die "build or C++ tests failed with emulated AVX-512 (above; whole log $build.log)"
}
grep -E "tests passed|Test +#" "$build.log" >&2 || true
# The tests cover every ISA up to the best one the build reports: make sure that was amx.
"$build/test_matmul" | grep -q "CPU kernels up to amx" || die "the build did not offer the emulated ISAs"

# The whole engine on the default ISA such a machine picks (avx512), against the goldens.
vitest="$root/node_modules/vitest/vitest.mjs"
[ -f "$vitest" ] || die "vitest not installed (run npm test, or npm ci, first)"
isa=$(node -e 'console.log(require(process.argv[1]).configure({}).isa)' "$addon") || die "cannot load $addon"
[ "$isa" = avx512 ] || die "the emulated addon picks '$isa' by default, expected avx512"
log "fidelity tests (tiny models vs the goldens) through the emulated addon (isa $isa)"
(cd "$root" && EM_NATIVE_ADDON="$addon" node "$vitest" run --config vitest.unit.config.ts test/engine/fidelity.test.ts \
  --reporter dot) >&2 || die "fidelity tests failed with emulated AVX-512"
log "passed ($(($(date +%s) - t0)) s)"
