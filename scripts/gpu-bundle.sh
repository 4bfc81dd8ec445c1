#!/usr/bin/env bash
# Prepares .gpu-bundle/ (git-ignored): what the GPU check machine lacks to build the Node
# addon with CUDA and run a model forward through it. That machine has CUDA, CMake, a C++
# compiler and Python, but no Node and no network; only the git working tree and the
# ignored paths a run carries travel (64 MiB in all). So the bundle holds:
#
#   node.xz              Node 24's binary, xz-compressed (about 30 MB; was 120 MB)
#   node.version         its version (the bundle is rebuilt when scripts/node24.sh's changes)
#   include/node/        node_api.h and the headers it includes (Node-API only, no V8)
#   node-addon-api/      napi.h, napi-inl.h, napi-inl.deprecated.h (the package's headers)
#   node_modules/        the pure-JS npm packages the forward imports (@huggingface/jinja, @huggingface/tokenizers)
#   cutlass-include.tar.xz  CUTLASS's and CuTe's headers (scripts/cutlass.sh; about 2 MB packed):
#                        the CUDA backend's sm_90a grouped GEMM (cuda/cutlass_grouped.cu)
#   MANIFEST             what is here, sizes, checksums
#
# Node 24 runs the .ts sources directly (type stripping); scripts/gpu-forward.ts imports
# src/engine, src/model, src/util, Node's builtins and the packages under node_modules/.
#
# Then, on the GPU machine: scripts/gpu-check.sh finds .gpu-bundle/, unpacks node, builds
# the addon with CUDA and runs scripts/gpu-forward.ts (see shards/README.md, "GPU check").
# Through the `run` tool: run(command="bash scripts/gpu-check.sh", carry=[".gpu-bundle"]).
#
# Usage: scripts/gpu-bundle.sh    (about a minute the first time: xz on 2 cores; then
#                                  reuses node.xz while the Node version is the same)
# Environment: EM_GPU_BUNDLE_DIR (default .gpu-bundle), EM_XZ_LEVEL (default 6).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bundle=${EM_GPU_BUNDLE_DIR:-$root/.gpu-bundle}
level=${EM_XZ_LEVEL:-6}
log() { echo "[gpu-bundle] $*" >&2; }
die() {
  echo "[gpu-bundle] ERROR: $*" >&2
  exit 1
}
command -v xz >/dev/null 2>&1 || die "xz not found (apt-get install xz-utils)"

node="$(bash "$root/scripts/node24.sh")/node"
exec_path=$("$node" -p 'process.execPath')
version=$("$node" --version)
mkdir -p "$bundle"

# --- node binary ----------------------------------------------------------------
if [ -f "$bundle/node.xz" ] && [ "$(cat "$bundle/node.version" 2>/dev/null)" = "$version" ] &&
  xz -t "$bundle/node.xz" 2>/dev/null; then
  log "node.xz is Node $version already"
else
  log "compressing Node $version ($(du -m "$exec_path" | cut -f1) MiB) with xz -$level (about a minute)"
  t0=$(date +%s)
  xz -T"$(nproc 2>/dev/null || echo 2)" -"$level" -c "$exec_path" >"$bundle/node.xz.tmp"
  mv "$bundle/node.xz.tmp" "$bundle/node.xz"
  echo "$version" >"$bundle/node.version"
  log "node.xz: $(du -m "$bundle/node.xz" | cut -f1) MiB in $(($(date +%s) - t0)) s"
fi

# --- Node-API headers -------------------------------------------------------------
# Where shards/build.sh looks: beside a plain install's bin/, or in npm's platform package
# (node_modules/node/node_modules/node-<os>-<arch>/include/node).
include=""
for d in "$(dirname "$exec_path")/../include/node" "$(dirname "$(readlink -f "$exec_path")")/../include/node" \
  "$(dirname "$exec_path")"/../node_modules/node-*/include/node "$(dirname "$exec_path")"/../../node-*/include/node \
  /usr/include/node /usr/local/include/node; do
  if [ -f "$d/node_api.h" ]; then
    include=$(cd "$d" && pwd)
    break
  fi
done
[ -n "$include" ] || die "node_api.h not found next to $exec_path"
rm -rf "$bundle/include"
mkdir -p "$bundle/include/node"
# node_api.h -> js_native_api.h, node_api_types.h -> js_native_api_types.h: nothing else.
for h in node_api.h node_api_types.h js_native_api.h js_native_api_types.h node_version.h; do
  cp "$include/$h" "$bundle/include/node/"
done

# --- node-addon-api ------------------------------------------------------------------
napi="$root/node_modules/node-addon-api"
[ -f "$napi/napi.h" ] || die "node_modules/node-addon-api/napi.h missing: run npm ci first"
rm -rf "$bundle/node-addon-api"
mkdir -p "$bundle/node-addon-api"
cp "$napi"/napi.h "$napi"/napi-inl.h "$napi"/napi-inl.deprecated.h "$napi"/package.json "$napi"/LICENSE.md \
  "$bundle/node-addon-api/"

# --- npm packages the forward imports ------------------------------------------------
# The forward's import graph (scripts/gpu-forward.ts -> src/model/tokenizer.ts) reaches these
# pure-JS packages; gpu-check.sh links .gpu-bundle/node_modules as the tree's node_modules
# where the tree has none. Checked by running the forward from a clone without node_modules.
rm -rf "$bundle/node_modules"
for pkg in @huggingface/jinja @huggingface/tokenizers; do
  [ -f "$root/node_modules/$pkg/package.json" ] || die "node_modules/$pkg missing: run npm ci first"
  mkdir -p "$bundle/node_modules/$pkg"
  cp -R "$root/node_modules/$pkg/." "$bundle/node_modules/$pkg/"
done

# --- CUTLASS headers ------------------------------------------------------------------
cutlass_include=$(bash "$root/scripts/cutlass.sh")
cutlass_version=$(basename "$(dirname "$cutlass_include")")
if [ -f "$bundle/cutlass-include.tar.xz" ] && [ "$(cat "$bundle/cutlass.version" 2>/dev/null)" = "$cutlass_version" ]; then
  log "cutlass-include.tar.xz is $cutlass_version already"
else
  log "packing $cutlass_version's headers"
  tar -C "$cutlass_include" -cf - . | xz -T"$(nproc 2>/dev/null || echo 2)" -"$level" -c >"$bundle/cutlass-include.tar.xz.tmp"
  mv "$bundle/cutlass-include.tar.xz.tmp" "$bundle/cutlass-include.tar.xz"
  echo "$cutlass_version" >"$bundle/cutlass.version"
  log "cutlass-include.tar.xz: $(du -k "$bundle/cutlass-include.tar.xz" | cut -f1) KiB"
fi

# --- manifest ----------------------------------------------------------------------
{
  echo "expertmesh GPU bundle (scripts/gpu-bundle.sh), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "node $version ($(uname -m)), node-addon-api $("$node" -p "require('$napi/package.json').version")"
  (cd "$bundle" && find . -type f ! -name MANIFEST ! -name '*.tmp' | LC_ALL=C sort | xargs sha256sum)
} >"$bundle/MANIFEST"

total=$(du -sk "$bundle" | cut -f1)
tree_kb=$(cd "$root" && git ls-files -z --cached --others --exclude-standard 2>/dev/null | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1 || echo 0)
log "bundle: $bundle, $((total / 1024)) MiB; with the working tree about $(((total + tree_kb) / 1024)) MiB of the 64 MiB a run carries"
[ $((total + tree_kb)) -lt $((63 * 1024)) ] || die "bundle plus working tree exceed 63 MiB; try EM_XZ_LEVEL=9"
echo "$bundle"
