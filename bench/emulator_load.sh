#!/usr/bin/env bash
# Throughput of the SMS emulator under AGENTS (default 500) simulated agents, each with its own
# client and keep-alive connection, registering and then polling for commands for SECONDS
# (default 20). Baseline in the same run: the same load against one agent (the per-request cost
# with no contention), so the ratio shows how the emulator scales.
set -euo pipefail
cd "$(dirname "$0")/.."
AGENTS=${1:-500}
SECONDS_=${2:-20}
cargo build --release -q -p sms-tests
WORK=$(mktemp -d)
cleanup() { set +e; kill "$EMU" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
ulimit -n 65536 || true
target/release/sms-emulator --listen 127.0.0.1:0 --ak AK --sk SK > "$WORK/emu.out" &
EMU=$!
for _ in $(seq 50); do grep -q listening "$WORK/emu.out" 2>/dev/null && break; sleep 0.1; done
URL=$(sed -n 's/listening on //p' "$WORK/emu.out")
target/release/emu-load "$URL" 1 "$SECONDS_" 2>/dev/null
target/release/emu-load "$URL" "$AGENTS" "$SECONDS_" 2>/dev/null
echo "emulator peak RSS: $(awk '/VmHWM/ {print $2}' /proc/$EMU/status) KiB"
