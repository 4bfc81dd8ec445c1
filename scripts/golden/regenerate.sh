#!/usr/bin/env bash
# Regenerates the golden fixtures in test/fixtures/golden/ (not run by CI; see docs/fidelity.md):
#   tiny-v2.json      make-tiny-model --arch v2 --seed 0
#   tiny-v3.json      make-tiny-model --arch v3 --seed 0
#   tiny-v3-fp8.json  make-tiny-model --arch v3 --seed 0 --fp8   (goldens of the dequantized weights)
#   tiny-v3-mtp.json  make-tiny-model --arch v3 --seed 0 --mtp   (the MTP layer: make_mtp_goldens.py)
# Builds the tiny checkpoints with this repository's own `expertmesh make-tiny-model`, then runs
# make_goldens.py on each in the pinned Python environment of setup.sh (created on first use).
# Extra arguments go to make_goldens.py (e.g. --no-check).
set -euo pipefail

say() { echo "[golden] $*" >&2; }
die() { echo "[golden] ERROR: $*" >&2; exit 1; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
out_dir="$root/test/fixtures/golden"
max_bytes=$((1024 * 1024))

py="$(bash scripts/golden/setup.sh)" || die "setup.sh failed"
node_bin="$(bash scripts/node24.sh)" || die "scripts/node24.sh failed"
export PATH="$node_bin:$PATH"

work="$(mktemp -d "${TMPDIR:-/tmp}/em-golden.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out_dir"

# name | make-tiny-model arguments | make_goldens.py arguments
models=(
  "tiny-v2|--arch v2 --seed 0|"
  "tiny-v3|--arch v3 --seed 0|"
  "tiny-v3-fp8|--arch v3 --seed 0 --fp8|--fp8-dequant"
)
for entry in "${models[@]}"; do
  IFS='|' read -r name tiny_args golden_args <<<"$entry"
  ckpt="$work/$name"
  say "$name: node src/cli/main.ts make-tiny-model $tiny_args --out $ckpt"
  # shellcheck disable=SC2086
  node src/cli/main.ts make-tiny-model $tiny_args --out "$ckpt" >&2 || die "make-tiny-model failed for $name"
  say "$name: make_goldens.py"
  # shellcheck disable=SC2086
  "$py" scripts/golden/make_goldens.py "$ckpt" "$out_dir/$name.json" $golden_args "$@" \
    || die "make_goldens.py failed for $name"
  size=$(wc -c <"$out_dir/$name.json")
  [ "$size" -lt "$max_bytes" ] || die "$out_dir/$name.json is $size bytes; fixtures must stay under 1 MiB"
done
# The MTP layer: transformers ignores it, so its goldens come from the numpy reference alone.
say "tiny-v3-mtp: node src/cli/main.ts make-tiny-model --arch v3 --seed 0 --mtp"
node src/cli/main.ts make-tiny-model --arch v3 --seed 0 --mtp --out "$work/tiny-v3-mtp" >&2 \
  || die "make-tiny-model failed for tiny-v3-mtp"
"$py" scripts/golden/make_mtp_goldens.py "$work/tiny-v3-mtp" "$out_dir/tiny-v3-mtp.json" \
  || die "make_mtp_goldens.py failed"
# The repository's lint (biome check .) also formats JSON: write the fixtures in its style.
if [ -x node_modules/.bin/biome ]; then
  node_modules/.bin/biome format --write "$out_dir" >&2 || die "biome format failed on $out_dir"
else
  say "WARNING: node_modules/.bin/biome missing (run npm ci); format $out_dir before committing or lint fails"
fi
say "done: $(cd "$out_dir" && ls -l -- *.json | awk '{print $NF " " $5 " bytes"}' | paste -sd ';' -)"
