#!/bin/sh
# File-level benchmark of issue 5: 100,000 files of 1–64 KiB plus four 256 MiB files, sms-agent's
# file engine (mutual TLS over loopback, 4 streams) against `tar c | tar x` and `rsync -a` on the
# same machine, then a sync after 1 % of the files changed and 1 % were deleted.
# Usage: bench/file.sh [FILES]   (root; needs rsync and tar; drops the page cache between runs)
# Note: tar and rsync run locally (no ssh); over ssh (aes128-gcm) both would be slower still.
set -eu
cd "$(dirname "$0")/.."
command -v rsync >/dev/null || apt-get install -y rsync
SMS_BENCH_FILES="${1:-100000}" exec cargo test --release -p sms-tests --test file \
    bench_against_tar_and_rsync -- --ignored --nocapture
