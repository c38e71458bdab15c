#!/usr/bin/env bash
# Long-link benchmark: the link of a migration to a cloud region (tens to hundreds of ms of
# round trip) emulated on one machine by the userspace relay of the tests crate (`link-relay`:
# half the round trip each way, one rate cap per direction shared by all connections; no netem
# needed). For each round trip it measures, through the same relay:
#   - the relay's own ceiling: one plain TCP stream of random data (socat), the baseline;
#   - `sms-agent netcheck`: delay and bandwidth against the configured link;
#   - `sms-agent migrate --mode block` of a loop disk of random data;
#   - `sms-agent migrate --mode file` of a tree of four large random files;
# and prints each rate as a share of the link rate and of the plain stream.
#
# Usage: sudo bench/longlink.sh [RTT_MS...]        (default: 50 150)
# Environment (all optional):
#   MBIT          link rate each way, Mbit/s (default 1000)
#   SIZE_MIB      data per transfer, MiB (default 1024)
#   NC_SECONDS    netcheck duration (default 12)
#   STREAMS       data streams of migrate and netcheck (default 4)
#   BENCH_TMPDIR  where the images go (default /dev/shm, so the disk is not what is measured)
#   RESULTS_DIR   where the JSON goes (default bench/results)
#   NO_BUILD=1    use the release binaries already built
# The relay terminates TCP, so the end hosts' TCP windows do not see the delay: this measures
# what the application does across it (round trips of the protocol, pipelining, streams).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
# shellcheck source=bench/lib.sh
. bench/lib.sh
need_root
ensure_tools socat=socat ss=iproute2 losetup=util-linux jq=jq
RTTS=("$@")
((${#RTTS[@]})) || RTTS=(50 150)
MBIT=${MBIT:-1000}
SIZE_MIB=${SIZE_MIB:-1024}
NC_SECONDS=${NC_SECONDS:-12}
STREAMS=${STREAMS:-4}
RESULTS_DIR=${RESULTS_DIR:-bench/results}
WORK=$(mktemp -d "${BENCH_TMPDIR:-/dev/shm}/longlink.XXXXXX")
LOOP=""
cleanup() {
  bg_kill_all
  [[ -n $LOOP ]] && losetup -d "$LOOP" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

if [[ ${NO_BUILD:-0} != 1 ]]; then
  log "building release binaries"
  cargo build --release -q -p sms-agent -p sms-tests --bin sms-agent --bin link-relay
fi
BIN=$REPO/target/release
AGENT=$BIN/sms-agent
RELAY=$BIN/link-relay
"$AGENT" certs --out "$WORK/c" --target-name 127.0.0.1 >/dev/null
TLS_T=(--ca "$WORK/c/ca.pem" --cert "$WORK/c/target.pem" --key "$WORK/c/target-key.pem")
TLS_S=(--ca "$WORK/c/ca.pem" --cert "$WORK/c/source.pem" --key "$WORK/c/source-key.pem")

log "making ${SIZE_MIB} MiB of random data"
head -c $((SIZE_MIB << 20)) /dev/urandom >"$WORK/src.img"
LOOP=$(losetup -f --show "$WORK/src.img")
mkdir -p "$WORK/tree"
for i in 1 2 3 4; do
  head -c $((SIZE_MIB << 18)) /dev/urandom >"$WORK/tree/f$i"
done
BYTES=$((SIZE_MIB << 20))

# relay RTT UPSTREAM_PORT: starts a relay, prints its port.
relay() {
  local port
  port=$(free_port)
  "$RELAY" "127.0.0.1:$port" "127.0.0.1:$2" "$1" "$MBIT" >"$WORK/relay.log" 2>&1 &
  bg_register $!
  wait_port "$port" $! >&2
  echo "$port"
}

# receiver ARGS...: starts `sms-agent receive`, prints its port.
receiver() {
  local port
  port=$(free_port)
  "$AGENT" receive --listen "127.0.0.1:$port" "${TLS_T[@]}" --state-dir "$WORK/state-$port" "$@" \
    >/dev/null 2>"$WORK/recv-$port.log" &
  bg_register $!
  wait_port "$port" $! >&2
  echo "$port"
}

rows=()
row() { rows+=("$(printf '%s\t' "$@")"); }

for rtt in "${RTTS[@]}"; do
  log "RTT $rtt ms, $MBIT Mbit/s"
  # Baseline: one plain TCP stream (socat) through the relay, into /dev/null on the far side.
  sink=$(free_port)
  socat -u "TCP-LISTEN:$sink,reuseaddr" OPEN:/dev/null &
  bg_register $!
  wait_port "$sink" $! >&2
  rp=$(relay "$rtt" "$sink")
  t0=$(now)
  socat -u "OPEN:$WORK/src.img" "TCP:127.0.0.1:$rp"
  t1=$(now)
  row "$rtt" socat "$BYTES" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')" "" ""

  # netcheck, block and file through one relay to one receiver per mode.
  truncate -s "$BYTES" "$WORK/dst.img"
  bp=$(receiver --disk "/dev/vda=$WORK/dst.img")
  rp=$(relay "$rtt" "$bp")
  "$AGENT" netcheck --json --target "127.0.0.1:$rp" "${TLS_S[@]}" --seconds "$NC_SECONDS" \
    --streams "$STREAMS" >"$WORK/nc.json"
  delay=$(jq -r .check.delay_ms "$WORK/nc.json")
  bw=$(jq -r .check.bandwidth_mbps "$WORK/nc.json")
  row "$rtt" netcheck "" "" "$delay" "$bw"
  t0=$(now)
  "$AGENT" migrate --mode block --target "127.0.0.1:$rp" "${TLS_S[@]}" --disk "$LOOP=/dev/vda" \
    --streams "$STREAMS" --state-dir "$WORK/mig-$rtt" --task-id "ll-$rtt" >/dev/null 2>"$WORK/mig.log" \
    || die "block migrate failed: $(tail -3 "$WORK/mig.log")"
  t1=$(now)
  cmp "$WORK/src.img" "$WORK/dst.img" || die "block copy differs"
  row "$rtt" block "$BYTES" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')" "" ""
  rm -f "$WORK/dst.img"

  mkdir -p "$WORK/root-$rtt"
  fp=$(receiver --root "$WORK/root-$rtt")
  rp=$(relay "$rtt" "$fp")
  t0=$(now)
  "$AGENT" migrate --mode file --target "127.0.0.1:$rp" "${TLS_S[@]}" --source-root "$WORK/tree" \
    --streams "$STREAMS" --task-id "ll-$rtt" >/dev/null 2>"$WORK/mig.log" \
    || die "file migrate failed: $(tail -3 "$WORK/mig.log")"
  t1=$(now)
  for i in 1 2 3 4; do cmp "$WORK/tree/f$i" "$WORK/root-$rtt/f$i" || die "file copy differs"; done
  rm -rf "$WORK/root-$rtt"
  row "$rtt" file "$BYTES" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')" "" ""
  bg_kill_all
done

mkdir -p "$RESULTS_DIR"
out="$RESULTS_DIR/longlink-$(date +%Y%m%d-%H%M%S).json"
printf '%s\n' "${rows[@]}" | python3 - "$MBIT" "$out" "$SIZE_MIB" "$STREAMS" <<'EOP'
import json, sys
mbit, out, size, streams = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
rows = [l.rstrip("\t").split("\t") for l in sys.stdin.read().splitlines() if l.strip()]
res, plain = [], {}
for r in rows:
    r += [""] * (6 - len(r))
    rtt, tool, b, secs, delay, bw = r[:6]
    e = {"rtt_ms": float(rtt), "tool": tool}
    if tool == "netcheck":
        e.update(delay_ms=float(delay), bandwidth_mbps=float(bw),
                 delay_ratio=float(delay) / float(rtt), bandwidth_ratio=float(bw) / mbit)
    else:
        rate = int(b) * 8 / float(secs) / 1e6
        e.update(bytes=int(b), seconds=float(secs), mbit_s=rate, of_link=rate / mbit)
        if tool == "socat":
            plain[rtt] = rate
        else:
            e["of_plain_stream"] = rate / plain[rtt]
    res.append(e)
print(f"link {mbit:.0f} Mbit/s each way, {size} MiB per transfer, {streams} streams")
print(f"{'rtt ms':>7} {'what':<9} {'result':>34} {'of link':>8} {'of socat':>9}")
for e in res:
    if e["tool"] == "netcheck":
        s = f"delay {e['delay_ms']:.1f} ms, {e['bandwidth_mbps']:.0f} Mbit/s"
        print(f"{e['rtt_ms']:>7.0f} {'netcheck':<9} {s:>34} {e['bandwidth_ratio']:>8.3f}   delay {e['delay_ratio']:.3f} of RTT")
    else:
        s = f"{e['mbit_s']:.0f} Mbit/s in {e['seconds']:.1f} s"
        print(f"{e['rtt_ms']:>7.0f} {e['tool']:<9} {s:>34} {e['of_link']:>8.3f} {e.get('of_plain_stream', 1.0):>9.3f}")
json.dump({"link_mbit": mbit, "size_mib": int(size), "streams": int(streams), "results": res},
          open(out, "w"), indent=1)
print(f"written {out}")
EOP
