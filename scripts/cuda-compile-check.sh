#!/usr/bin/env bash
# Compile check of the CUDA backend for sm_90a and sm_80, on a machine without a GPU: the
# toolkit comes from PyPI wheels (scripts/cuda-toolkit.sh, cached), the build directory is
# kept in the cache too, so a warm run recompiles only what changed. Runs nothing on a GPU;
# a compile or link error fails it. Used by .ci/run.
#
# Environment: EM_BUILD_JOBS (default: number of CPUs), EM_CUDA_ARCHS (default "90a;80").
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${EXPERTMESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/expertmesh}
# One build directory per checkout (CMake ties a build directory to its source path).
build=${EM_CUDA_BUILD_DIR:-$cache/cuda-compile-check/$(printf '%s' "$root" | cksum | cut -d' ' -f1)}
jobs=${EM_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}
archs=${EM_CUDA_ARCHS:-90a;80}
t0=$(date +%s)

cuda_root=$(bash "$root/scripts/cuda-toolkit.sh")
cutlass_dir=$(bash "$root/scripts/cutlass.sh")  # the sm_90a CUTLASS grouped GEMM's headers
echo "[cuda-check] toolkit $cuda_root ($(($(date +%s) - t0)) s); building for $archs with $jobs job(s) in $build" >&2
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
cmake -S "$root/shards" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DEM_BUILD_ADDON=OFF -DEM_CUDA=ON \
  -DCMAKE_CUDA_COMPILER="$cuda_root/bin/nvcc" -DEM_CUDA_ARCHS="$archs" -DCMAKE_CUDA_ARCHITECTURES="$archs" \
  -DEM_CUTLASS_DIR="$cutlass_dir" >/dev/null
# The engine with the CUDA backend, and the two CUDA executables (the CPU tests are built
# and run by npm test already).
cmake --build "$build" --parallel "$jobs" --target emcore test_cuda_parity em_bench_cuda_moe em_bench_cuda_mla
# Without a device the parity suite must say so with its distinct exit code.
set +e
"$build/test_cuda_parity" >/dev/null 2>&1
rc=$?
set -e
[ "$rc" = 77 ] || [ "$rc" = 0 ] || {
  echo "[cuda-check] ERROR: test_cuda_parity exited $rc (expected 77 without a device, 0 with one)" >&2
  exit 1
}
echo "[cuda-check] CUDA backend compiles for $archs ($(($(date +%s) - t0)) s; parity exit $rc: $([ "$rc" = 77 ] && echo 'no device here' || echo passed))" >&2
