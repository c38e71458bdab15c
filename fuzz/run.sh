#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 10): the on-disk parsers (partition tables,
# superblocks, ext4 bitmaps and XFS free-space trees), the mount table parser, and the block and
# file-mode wire decoders, which all take untrusted bytes.
# Needs a nightly toolchain (cargo-fuzz uses sanitizer instrumentation); cargo-fuzz is installed
# when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked -q
# A small real ext4 image takes the allocation parser past the superblock checks at once.
seed=fuzz/corpus/ext4alloc/seed-ext4
if command -v mkfs.ext4 >/dev/null && [ ! -e "$seed" ]; then
  mkdir -p "$(dirname "$seed")"
  truncate -s 256K "$seed"
  mkfs.ext4 -q -F -b 1024 -N 16 "$seed" >/dev/null 2>&1 || rm -f "$seed"
fi
for t in ptable fsdetect mountinfo wire fileproto ext4alloc xfsalloc; do
  echo "fuzz $t for ${SECS}s"
  extra=()
  [ "$t" = ext4alloc ] && extra=(-max_len=262144)
  cargo +nightly fuzz run --fuzz-dir fuzz "$t" -- -max_total_time="$SECS" ${extra[@]+"${extra[@]}"} 2>&1 | grep -E '^Done|SUMMARY|panicked' || true
  # cargo fuzz exits non-zero on a crash; re-run without the filter to fail loudly with the input.
  if ls fuzz/artifacts/"$t"/crash-* >/dev/null 2>&1; then
    echo "fuzz target $t crashed; inputs in fuzz/artifacts/$t" >&2
    exit 1
  fi
done
