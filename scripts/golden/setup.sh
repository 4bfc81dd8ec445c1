#!/usr/bin/env bash
# Creates (once) the Python virtual environment that computes the golden outputs, and prints
# its python interpreter's path on stdout; progress goes to stderr. Usage:
#   PY="$(bash scripts/golden/setup.sh)" && "$PY" scripts/golden/make_goldens.py ...
#
# Location: ${EXPERTMESH_CACHE_DIR:-$HOME/.cache/expertmesh}/golden-venv (outside the repo).
# Pinned: torch, transformers, safetensors, numpy (below). Idempotent: a venv whose stamp
# matches the pins and whose imports work is reused in well under a second.
#
# torch comes from PyPI, whose Linux wheel is the CUDA build: with its nvidia-* dependencies
# it is about 3 GB to download and 5.6 GB on disk, and takes 3-5 minutes on a fast link. The
# goldens only use the CPU. Where PyTorch's CPU wheel index is reachable, point
# EM_TORCH_INDEX_URL at it (e.g. .../whl/cpu) to get the ~200 MB CPU build instead.
# (Installing the CUDA wheel with --no-deps does not work: `import torch` then fails on the
# missing libcublasLt.)
#
# Needs python3 >= 3.11 (override with EM_PYTHON=/path/to/python3).
set -euo pipefail

TORCH_VERSION=2.15.0
TRANSFORMERS_VERSION=5.24.0
SAFETENSORS_VERSION=0.8.0
NUMPY_VERSION=2.4.6

say() { echo "[golden-setup] $*" >&2; }
die() { echo "[golden-setup] ERROR: $*" >&2; exit 1; }

cache=${EXPERTMESH_CACHE_DIR:-$HOME/.cache/expertmesh}
venv="$cache/golden-venv"
py="$venv/bin/python"
stamp="$venv/.expertmesh-golden-pins"
pins="torch==$TORCH_VERSION transformers==$TRANSFORMERS_VERSION safetensors==$SAFETENSORS_VERSION numpy==$NUMPY_VERSION index=${EM_TORCH_INDEX_URL:-pypi}"

check_imports() {
  "$py" - "$TORCH_VERSION" "$TRANSFORMERS_VERSION" "$SAFETENSORS_VERSION" "$NUMPY_VERSION" <<'EOF' >/dev/null 2>&1
import sys
import numpy, safetensors, torch, transformers
want = sys.argv[1:]
have = [torch.__version__.split("+")[0], transformers.__version__, safetensors.__version__, numpy.__version__]
sys.exit(0 if have == want else 1)
EOF
}

if [ -x "$py" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pins" ] && check_imports; then
  echo "$py"; exit 0
fi

base=${EM_PYTHON:-python3}
command -v "$base" >/dev/null 2>&1 || die "$base not found (set EM_PYTHON to a python >= 3.11)"
"$base" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || die "$base is $("$base" --version 2>&1); need python >= 3.11 (set EM_PYTHON)"
"$base" -c 'import venv, ensurepip' 2>/dev/null \
  || die "$base lacks venv/ensurepip (Debian: apt-get install python3-venv)"

if [ ! -x "$py" ]; then
  say "creating virtual environment $venv"
  mkdir -p "$cache"
  "$base" -m venv "$venv" || die "could not create $venv"
fi
rm -f "$stamp"

pip=("$py" -m pip --disable-pip-version-check)
start=$(date +%s)
if [ -n "${EM_TORCH_INDEX_URL:-}" ]; then
  say "installing torch==$TORCH_VERSION from $EM_TORCH_INDEX_URL"
  "${pip[@]}" install --progress-bar off --index-url "$EM_TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple \
    "torch==$TORCH_VERSION" >&2 || die "torch install from $EM_TORCH_INDEX_URL failed (unset EM_TORCH_INDEX_URL to use PyPI)"
else
  say "installing torch==$TORCH_VERSION from PyPI (CUDA build + nvidia-* wheels, ~3 GB download; a few minutes)"
fi
say "installing torch==$TORCH_VERSION transformers==$TRANSFORMERS_VERSION safetensors==$SAFETENSORS_VERSION numpy==$NUMPY_VERSION"
"${pip[@]}" install --progress-bar off \
  "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION" \
  "safetensors==$SAFETENSORS_VERSION" "numpy==$NUMPY_VERSION" >&2 \
  || die "pip install failed (is PyPI reachable? see the pip output above)"

check_imports || die "installed, but the imports or versions are wrong: $("$py" -c 'import torch, transformers; print(torch.__version__, transformers.__version__)' 2>&1 | tail -1)"
echo "$pins" >"$stamp"
say "ready in $(( $(date +%s) - start ))s: $py"
echo "$py"
