#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 10): the on-disk parsers (partition tables,
# superblocks), the mount table parser and the wire decoder, which all take untrusted bytes.
# Needs a nightly toolchain (cargo-fuzz uses sanitizer instrumentation); cargo-fuzz is installed
# when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked -q
for t in ptable fsdetect mountinfo wire; do
  echo "fuzz $t for ${SECS}s"
  cargo +nightly fuzz run --fuzz-dir fuzz "$t" -- -max_total_time="$SECS" 2>&1 | grep -E '^Done|SUMMARY|panicked' || true
  # cargo fuzz exits non-zero on a crash; re-run without the filter to fail loudly with the input.
  if ls fuzz/artifacts/"$t"/crash-* >/dev/null 2>&1; then
    echo "fuzz target $t crashed; inputs in fuzz/artifacts/$t" >&2
    exit 1
  fi
done
