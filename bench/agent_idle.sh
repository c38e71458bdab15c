#!/usr/bin/env bash
# Idle cost of the daemon: runs `sms-agent run` (release) against the emulator with the default
# 10 s poll for DURATION seconds (default 600), then reports its RSS, CPU time, requests per poll
# and how many TCP connections it used (one reused keep-alive connection is the goal).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-600}
cargo build --release -q -p sms-agent -p sms-tests
WORK=$(mktemp -d)
cleanup() { set +e; kill "$AGENT" "$EMU" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
target/release/sms-emulator --listen 127.0.0.1:0 --ak AK --sk SK > "$WORK/emu.out" &
EMU=$!
for _ in $(seq 50); do grep -q listening "$WORK/emu.out" 2>/dev/null && break; sleep 0.1; done
ADDR=$(sed -n 's/listening on http:\/\///p' "$WORK/emu.out")
cat > "$WORK/agent.toml" <<EOT
[api]
endpoint = "http://$ADDR"
[auth]
access_key = "AK"
secret_key = "SK"
[agent]
state_dir = "$WORK/state"
EOT
chmod 600 "$WORK/agent.toml"
target/release/sms-agent run --config "$WORK/agent.toml" 2> "$WORK/agent.log" &
AGENT=$!
sleep 5
conns=()
START_TICKS=$(awk '{print $14+$15}' /proc/$AGENT/stat)
for _ in $(seq 1 "$((DURATION / 10))"); do
  sleep 10
  conns+=("$(ss -tnp 2>/dev/null | grep -c "pid=$AGENT," || true)")
done
END_TICKS=$(awk '{print $14+$15}' /proc/$AGENT/stat)
RSS=$(awk '/VmRSS/ {print $2}' /proc/$AGENT/status)
HWM=$(awk '/VmHWM/ {print $2}' /proc/$AGENT/status)
HZ=$(getconf CLK_TCK)
curl -s "http://$ADDR/_emulator/journal" > "$WORK/journal.json"
python3 - "$DURATION" "$START_TICKS" "$END_TICKS" "$HZ" "$RSS" "$HWM" "${conns[*]}" "$WORK/journal.json" <<'EOP'
import json, sys
dur, t0, t1, hz, rss, hwm = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
conns = [int(c) for c in sys.argv[7].split()]
j = json.load(open(sys.argv[8]))
polls = [e for e in j if e["path"].endswith("/command")]
others = [e for e in j if not e["path"].endswith("/command")]
cpu = (t1 - t0) / hz
print(f"idle {dur} s at a 10 s poll: RSS {rss} KiB (peak {hwm} KiB), CPU {cpu:.2f} s = {100*cpu/dur:.3f} % of one core")
print(f"requests: {len(polls)} polls, {len(others)} other calls (registration, copy state); 1 request per poll")
print(f"TCP connections held by the agent, sampled every 10 s: min {min(conns)}, max {max(conns)}")
EOP
