#!/usr/bin/env bash
# Torture: random `kill -9` of the sender, the receiver and the daemon at random moments of
# block and file passes and `--sync` rounds, each followed by a resume (tests/tests/torture.rs,
# run with many kills in release mode). At the end every target must be identical to its source
# (block: every byte; file: `rsync -aHAXS --checksum --dry-run` lists nothing), and the bytes on
# the wire over all interrupted runs and resumes may exceed those of the same rounds run without
# kills by at most 10 % of the data. It prints, per mode and in all: kills, resumes, rounds,
# data bytes, bytes on the wire with and without kills, the re-sent bytes and the verdict.
#
# Usage: sudo bench/torture.sh [KILLS]     (default 50: 2/5 block, 2/5 file, 1/5 daemon)
# Environment: SMS_TORTURE_SEED=N replays the kill times of an earlier run (printed first).
# Needs root (loop devices, a network namespace of its own) and iproute2, rsync.
# The suite (`cargo test`) runs the same test with a few kills.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
. bench/lib.sh
need_root
KILLS="${1:-50}"
case "$KILLS" in '' | *[!0-9]*) die "KILLS must be a number, not '$KILLS'" ;; esac
ensure_tools ip=iproute2 rsync=rsync

log "building (release)"
cargo build --release --workspace --locked >&2
cargo test --release --locked -p sms-tests --test torture --no-run >&2

log "torture with $KILLS kills"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
set +e
SMS_TORTURE_KILLS="$KILLS" cargo test --release --locked -p sms-tests --test torture -- \
  --nocapture --test-threads=1 2>&1 | tee "$out" >&2
rc=${PIPESTATUS[0]}
set -e
echo
grep -E '^torture (seed|block|file|daemon|all)' "$out" || true
if [ "$rc" -eq 0 ]; then
  echo "verdict: PASS ($KILLS kills)"
else
  echo "verdict: FAIL (see the log above)"
fi
exit "$rc"
