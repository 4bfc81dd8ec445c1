#!/usr/bin/env bash
# Makes sure a CUDA toolkit (nvcc, runtime headers and libraries, cuBLAS) is available
# without root, and prints its root directory (the folder holding bin/nvcc).
#
# NVIDIA publishes the toolkit's pieces as PyPI wheels; this pip-installs a pinned set into
# a cache folder outside the repository, once per version, and reuses it afterwards. The
# wheels lay out a toolkit root (nvidia/cu13/{bin,include,lib,nvvm}); we add what nvcc and
# CMake expect of a classic install (lib64 -> lib, unversioned .so links).
#
# Usage: scripts/cuda-toolkit.sh            # prints the CUDA root (installs on first use)
#        scripts/cuda-toolkit.sh --check    # prints it only if already cached, else exits 1
# Then:  cmake -S shards -B build -DEM_CUDA=ON -DCMAKE_CUDA_COMPILER="$root/bin/nvcc"
#
# Environment:
#   EM_CUDA_VERSION        toolkit release to install (default 13.0; the pins are below)
#   EXPERTMESH_CACHE_DIR   cache root (default ~/.cache/expertmesh)
#   EM_PYTHON              python with pip (default python3)
#
# Download: 0.53 GB of wheels (cuBLAS alone is 0.42 GB), 0.84 GB installed. Nothing here
# needs a GPU: the result compiles and links; running needs a driver and a device.
set -euo pipefail
version=${EM_CUDA_VERSION:-13.0}
cache=${EXPERTMESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/expertmesh}
python=${EM_PYTHON:-python3}

log() { echo "[cuda-toolkit] $*" >&2; }
die() {
  echo "[cuda-toolkit] ERROR: $*" >&2
  exit 1
}

# Pinned wheel sets, one per release. CUDA 13.0 is the oldest 13.x: building against it keeps
# the sources inside the API that every CUDA 13 machine (the GPU check machine) has.
case "$version" in
  13.0)
    packages=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14)
    ;;
  *) die "no pinned wheel set for EM_CUDA_VERSION=$version (known: 13.0); add one to $0" ;;
esac

key=$(printf '%s\n' "${packages[@]}" | sha256sum | cut -c1-12)
prefix="$cache/cuda-$version-$key"
root="$prefix/nvidia/cu13"

if [ -f "$prefix/.complete" ] && [ -x "$root/bin/nvcc" ]; then
  echo "$root"
  exit 0
fi
[ "${1:-}" = --check ] && exit 1

"$python" -m pip --version >/dev/null 2>&1 || die "$python has no pip (apt-get install python3-pip, or set EM_PYTHON)"
log "installing CUDA $version from PyPI wheels into $prefix (0.53 GB download, once):"
printf '[cuda-toolkit]   %s\n' "${packages[@]}" >&2
tmp="$prefix.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
t0=$(date +%s)
# --no-deps: the wheels' own dependency pins pull other CUDA versions; the set above is whole.
"$python" -m pip install --disable-pip-version-check --no-deps --no-compile --no-cache-dir --target "$tmp" \
  --progress-bar on "${packages[@]}" >&2 || die "pip install failed (see above); PyPI must be reachable"
troot="$tmp/nvidia/cu13"
[ -x "$troot/bin/nvcc" ] || die "the wheels did not provide nvidia/cu13/bin/nvcc (layout changed?)"

# nvcc.profile links from lib64/; CMake's FindCUDAToolkit and -lcudart want unversioned names.
ln -sfn lib "$troot/lib64"
for so in "$troot"/lib/lib*.so.[0-9]*; do
  [ -e "$so" ] || continue
  base=$(basename "$so")
  ln -sfn "$base" "$troot/lib/${base%%.so.*}.so"
done
"$troot/bin/nvcc" --version >/dev/null 2>&1 || die "the installed nvcc does not run"

rm -rf "$prefix"
mv "$tmp" "$prefix"
trap - EXIT
touch "$prefix/.complete"
log "CUDA $("$root/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') ready in $(($(date +%s) - t0)) s" \
  "($(du -sh "$prefix" | cut -f1) installed)"
echo "$root"
