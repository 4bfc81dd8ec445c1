#!/usr/bin/env bash
# Builds the native engine into shards/build/: libemcore, the Node addon expertmesh.node,
# and the C++ tests. Usage: shards/build.sh [test]   ("test" also runs ctest)
#
# Environment:
#   EM_BUILD_TYPE       Release (default) | Debug | RelWithDebInfo
#   EM_BUILD_DIR        build directory (default shards/build)
#   EM_BUILD_JOBS       parallel compile jobs (default: number of CPUs)
#   EM_BUILD_ADDON      ON (default) | OFF (engine and tests only, no Node headers needed)
#   EM_BUILD_TESTS      ON (default) | OFF
#   EM_CUDA             AUTO (default: the CUDA backend when CMake finds nvcc >= 12) | ON | OFF
#   EM_CUTLASS_DIR      CUTLASS's include directory (scripts/cutlass.sh): the CUDA backend's sm_90a
#                       grouped GEMM (EM_CUDA_MOE_GEMM=cutlass); unset: built without it
#   NODE_INCLUDE_DIR    directory with node_api.h (default: found next to the node binary)
#   NODE_ADDON_API_DIR  directory with napi.h (default: node_modules/node-addon-api)
#   EM_NODE             node binary (default: Node 24 from scripts/node24.sh, else `node`)
#   EM_CMAKE_ARGS       more CMake arguments, split on spaces (scripts/avx512-emulated.sh)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
build_dir=${EM_BUILD_DIR:-$here/build}
build_type=${EM_BUILD_TYPE:-Release}
jobs=${EM_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}
want_addon=${EM_BUILD_ADDON:-ON}
want_tests=${EM_BUILD_TESTS:-ON}

log() { echo "[shards] $*" >&2; }
die() {
  echo "[shards] ERROR: $*" >&2
  exit 1
}

# --- tools -------------------------------------------------------------------
command -v cmake >/dev/null 2>&1 ||
  die "cmake not found. Install CMake >= 3.16 (apt-get install cmake, or pip install cmake) and re-run."
cmake_version=$(cmake --version | head -n1 | awk '{print $3}')
case "$cmake_version" in
  [0-2].* | 3.[0-9].* | 3.1[0-5].*) die "cmake $cmake_version is too old; need >= 3.16." ;;
esac

cxx=${CXX:-}
if [ -z "$cxx" ]; then
  for c in c++ g++ clang++; do
    if command -v "$c" >/dev/null 2>&1; then
      cxx=$(command -v "$c")
      break
    fi
  done
fi
[ -n "$cxx" ] && command -v "$cxx" >/dev/null 2>&1 ||
  die "no C++ compiler found. Install one with C++17 support (apt-get install g++, or clang) or set CXX."
echo 'int main() { if constexpr (true) return 0; }' | "$cxx" -std=c++17 -x c++ - -o /dev/null 2>/dev/null ||
  die "$cxx cannot compile C++17. Install g++ >= 8 or clang >= 7, or point CXX at one."

if command -v ninja >/dev/null 2>&1; then
  generator=Ninja
elif command -v make >/dev/null 2>&1; then
  generator="Unix Makefiles"
else
  die "neither ninja nor make found. Install one (apt-get install ninja-build)."
fi

# --- Node headers -------------------------------------------------------------
node=${EM_NODE:-}
if [ -z "$node" ] && [ -f "$repo/scripts/node24.sh" ]; then
  node_bin_dir=$(bash "$repo/scripts/node24.sh" 2>/dev/null || true)
  [ -n "$node_bin_dir" ] && [ -x "$node_bin_dir/node" ] && node="$node_bin_dir/node"
fi
[ -z "$node" ] && node=$(command -v node 2>/dev/null || true)

find_node_include() {
  [ -n "$node" ] || return 1
  local exec_path dirs d
  exec_path=$("$node" -p 'process.execPath' 2>/dev/null || echo "$node")
  # Plain installs keep include/node beside bin/; npm's `node` package keeps it in the
  # platform package (node_modules/node/node_modules/node-<os>-<arch>/include/node).
  dirs=("$(dirname "$exec_path")/../include/node" "$(dirname "$(readlink -f "$exec_path")")/../include/node")
  for d in "$(dirname "$exec_path")"/../node_modules/node-*/include/node "$(dirname "$exec_path")"/../../node-*/include/node; do
    dirs+=("$d")
  done
  dirs+=(/usr/include/node /usr/local/include/node)
  for d in "${dirs[@]}"; do
    if [ -f "$d/node_api.h" ]; then
      (cd "$d" && pwd)
      return 0
    fi
  done
  return 1
}

addon_flag=OFF
node_include=${NODE_INCLUDE_DIR:-}
addon_api=${NODE_ADDON_API_DIR:-}
if [ "$want_addon" != OFF ]; then
  [ -n "$node_include" ] || node_include=$(find_node_include || true)
  if [ -z "$addon_api" ]; then
    addon_api="$repo/node_modules/node-addon-api"
    if [ ! -f "$addon_api/napi.h" ] && [ -n "$node" ]; then
      resolved=$(cd "$repo" && "$node" -p "require('node-addon-api').include_dir" 2>/dev/null || true)
      [ -n "$resolved" ] && addon_api=$(cd "$repo" && cd "$resolved" 2>/dev/null && pwd || echo "$addon_api")
    fi
  fi
  [ -n "$node_include" ] && [ -f "$node_include/node_api.h" ] ||
    die "Node headers (node_api.h) not found next to '${node:-node}'. Set NODE_INCLUDE_DIR to Node's include/node, or EM_BUILD_ADDON=OFF to skip the addon."
  [ -f "$addon_api/napi.h" ] ||
    die "node-addon-api (napi.h) not found in '$addon_api'. Run 'npm install' (package.json lists node-addon-api), set NODE_ADDON_API_DIR, or EM_BUILD_ADDON=OFF."
  addon_flag=ON
fi

# --- configure + build --------------------------------------------------------
log "configuring ($build_type, $generator, compiler $cxx) in $build_dir"
[ "$addon_flag" = ON ] && log "addon: node_api.h from $node_include, napi.h from $addon_api"
cmake -S "$here" -B "$build_dir" -G "$generator" \
  -DCMAKE_BUILD_TYPE="$build_type" \
  -DCMAKE_CXX_COMPILER="$cxx" \
  -DEM_BUILD_TESTS="$want_tests" \
  -DEM_BUILD_ADDON="$addon_flag" \
  -DEM_CUDA="${EM_CUDA:-AUTO}" \
  -DEM_CUTLASS_DIR="${EM_CUTLASS_DIR:-}" \
  -DNODE_INCLUDE_DIR="$node_include" \
  -DNODE_ADDON_API_DIR="$addon_api" \
  -DNODE_EXECUTABLE="${node:-}" ${EM_CMAKE_ARGS:-} >&2 || die "cmake configure failed (see above)"

log "building with $jobs job(s)"
cmake --build "$build_dir" --parallel "$jobs" >&2 || die "build failed (see above)"

if [ "${1:-}" = test ]; then
  [ "$want_tests" = OFF ] && die "tests were not built (EM_BUILD_TESTS=OFF)"
  log "running tests"
  (cd "$build_dir" && ctest --output-on-failure) >&2 || die "tests failed"
fi

if [ "$addon_flag" = ON ]; then
  log "built $build_dir/expertmesh.node"
  echo "$build_dir/expertmesh.node"
else
  log "built $build_dir (addon skipped: EM_BUILD_ADDON=OFF)"
fi
