#!/usr/bin/env bash
# Creates (once) a Python virtual environment with NVIDIA's Triton client (tritonclient, HTTP
# and gRPC), the official client of KServe's Open Inference Protocol v2, and prints its python
# interpreter's path on stdout; progress goes to stderr. test/gateway/triton-client.test.ts
# runs test/clients/triton_client.py with it against a gateway. Usage:
#   PY="$(bash scripts/triton-client.sh)" && "$PY" test/clients/triton_client.py ...
#
# Location: ${EXPERTMESH_CACHE_DIR:-$HOME/.cache/expertmesh}/triton-client-venv (outside the
# repo). About 30 MB to download, 190 MB installed, 30 s. Idempotent: a venv whose stamp
# matches the pins and whose imports work is reused at once. Needs python3 >= 3.10 with venv
# (override with EM_PYTHON=/path/to/python3).
set -euo pipefail

pins=(tritonclient[http,grpc]==2.73.0 numpy==2.4.6 geventhttpclient==2.6.1 grpcio==1.85.3 protobuf==6.33.6)

say() { echo "[triton-client] $*" >&2; }
die() {
  echo "[triton-client] ERROR: $*" >&2
  exit 1
}

cache=${EXPERTMESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/expertmesh}
venv="$cache/triton-client-venv"
py="$venv/bin/python"
stamp="$venv/.expertmesh-pins"
python=${EM_PYTHON:-python3}

works() { "$py" -c 'import tritonclient.http, tritonclient.grpc, numpy' >/dev/null 2>&1; }

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${pins[*]}" ] && works; then
  echo "$py"
  exit 0
fi

command -v "$python" >/dev/null 2>&1 || die "$python not found (install python3, or set EM_PYTHON)"
say "creating $venv with ${pins[*]} (about 30 MB from PyPI, once)"
t0=$(date +%s)
rm -rf "$venv"
"$python" -m venv "$venv" || die "$python -m venv failed (Debian: apt-get install python3-venv)"
"$py" -m pip install --disable-pip-version-check --no-cache-dir --progress-bar on "${pins[@]}" >&2 ||
  die "pip install failed (see above); PyPI must be reachable"
works || die "the installed client does not import"
printf '%s' "${pins[*]}" >"$stamp"
say "ready in $(($(date +%s) - t0)) s"
echo "$py"
