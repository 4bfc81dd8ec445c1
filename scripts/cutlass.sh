#!/usr/bin/env bash
# Makes sure NVIDIA CUTLASS's C++ headers (CUTLASS and CuTe, header-only) are available and
# prints their include directory. They come from the PyPI wheel nvidia-cutlass (its
# cutlass_library/source/include), fetched once per version into the cache; only the headers
# are kept (27 MB). The CUDA backend's Hopper grouped GEMM (shards/cuda/cutlass_grouped.cu)
# builds with them when the architectures include sm_90a.
#
# Usage: scripts/cutlass.sh            # prints the include directory (fetches on first use)
#        scripts/cutlass.sh --check    # prints it only if already cached, else exits 1
#
# Environment: EM_CUTLASS_VERSION (default 4.2.0.0), EXPERTMESH_CACHE_DIR, EM_PYTHON.
set -euo pipefail
version=${EM_CUTLASS_VERSION:-4.2.0.0}
cache=${EXPERTMESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/expertmesh}
python=${EM_PYTHON:-python3}
prefix="$cache/cutlass-$version"
include="$prefix/include"

die() {
  echo "[cutlass] ERROR: $*" >&2
  exit 1
}
if [ -f "$prefix/.complete" ] && [ -f "$include/cutlass/cutlass.h" ]; then
  echo "$include"
  exit 0
fi
[ "${1:-}" = --check ] && exit 1
"$python" -m pip --version >/dev/null 2>&1 || die "$python has no pip (apt-get install python3-pip, or set EM_PYTHON)"
echo "[cutlass] fetching nvidia-cutlass==$version from PyPI (6.4 MB, once) into $prefix" >&2
tmp="$prefix.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip download --disable-pip-version-check --no-deps --no-cache-dir --progress-bar on \
  -d "$tmp/wheel" "nvidia-cutlass==$version" >&2 || die "pip download failed (see above); PyPI must be reachable"
"$python" - "$tmp/wheel" "$tmp/include" <<'PY' || die "could not unpack the headers (wheel layout changed?)"
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
lead = "cutlass_library/source/include/"
n = 0
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(lead) and not name.endswith("/"):
            dst = os.path.join(sys.argv[2], name[len(lead):])
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with z.open(name) as src, open(dst, "wb") as out:
                out.write(src.read())
            n += 1
if n == 0:
    sys.exit("no headers under " + lead)
print(f"[cutlass] {n} headers", file=sys.stderr)
PY
[ -f "$tmp/include/cutlass/cutlass.h" ] && [ -f "$tmp/include/cute/tensor.hpp" ] || die "cutlass.h or cute/tensor.hpp missing"
rm -rf "$prefix"
mkdir -p "$prefix"
mv "$tmp/include" "$include"
touch "$prefix/.complete"
echo "$include"
