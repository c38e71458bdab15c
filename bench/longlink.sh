#!/usr/bin/env bash
# Long-link benchmark: the link of a migration to a cloud region (tens to hundreds of ms of
# round trip) emulated on one machine by the userspace relay of the tests crate (`link-relay`:
# half the round trip each way, one rate cap per direction shared by all connections; no netem
# needed). For each round trip it measures, through the same relay:
#   - the relay's own ceiling: one plain TCP stream of random data (socat), the baseline;
#   - `sms-agent netcheck`: delay and bandwidth against the configured link;
#   - `sms-agent migrate --mode block` of a loop disk of random data;
#   - `sms-agent migrate --mode file` of a tree of four large random files;
# and prints each rate as a share of the link rate and of the plain stream. Each migration also
# runs once with SMALL_MIB (one disk, one file) first: its time is the fixed cost of a session
# over that round trip (TLS handshakes, plan, final checkpoint), and the "steady" rate is
# (bytes − small bytes) ÷ (time − small time), what the streams reach once running.
#
# Usage: sudo bench/longlink.sh [RTT_MS...]        (default: 50 150)
# Environment (all optional):
#   MBIT          link rate each way, Mbit/s (default 1000)
#   SIZE_MIB      data per transfer, MiB (default 1024)
#   SMALL_MIB     data of the fixed-cost transfer, MiB (default 16)
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
SMALL_MIB=${SMALL_MIB:-16}
NC_SECONDS=${NC_SECONDS:-12}
STREAMS=${STREAMS:-4}
RESULTS_DIR=${RESULTS_DIR:-bench/results}
WORK=$(mktemp -d "${BENCH_TMPDIR:-/dev/shm}/longlink.XXXXXX")
LOOP=""
SLOOP=""
cleanup() {
  bg_kill_all
  [[ -n $LOOP ]] && losetup -d "$LOOP" 2>/dev/null
  [[ -n $SLOOP ]] && losetup -d "$SLOOP" 2>/dev/null
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
head -c $((SMALL_MIB << 20)) /dev/urandom >"$WORK/small.img"
SLOOP=$(losetup -f --show "$WORK/small.img")
mkdir -p "$WORK/tree" "$WORK/stree"
for i in 1 2 3 4; do
  head -c $((SIZE_MIB << 18)) /dev/urandom >"$WORK/tree/f$i"
done
cp "$WORK/small.img" "$WORK/stree/f1"
BYTES=$((SIZE_MIB << 20))
SBYTES=$((SMALL_MIB << 20))
secs() { awk -v a="$1" -v b="$2" 'BEGIN{print b-a}'; }

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
  row "$rtt" socat "$BYTES" "$(secs "$t0" "$t1")" "" ""

  # netcheck, block and file through one relay to one receiver per mode.
  truncate -s "$BYTES" "$WORK/dst.img"
  truncate -s "$SBYTES" "$WORK/sdst.img"
  bp=$(receiver --disk "/dev/vda=$WORK/dst.img" --disk "/dev/vdb=$WORK/sdst.img")
  rp=$(relay "$rtt" "$bp")
  "$AGENT" netcheck --json --target "127.0.0.1:$rp" "${TLS_S[@]}" --seconds "$NC_SECONDS" \
    --streams "$STREAMS" >"$WORK/nc.json"
  delay=$(jq -r .check.delay_ms "$WORK/nc.json")
  bw=$(jq -r .check.bandwidth_mbps "$WORK/nc.json")
  row "$rtt" netcheck "" "" "$delay" "$bw"
  for what in small big; do
    if [[ $what == small ]]; then src=$SLOOP disk=/dev/vdb; else src=$LOOP disk=/dev/vda; fi
    t0=$(now)
    "$AGENT" migrate --mode block --target "127.0.0.1:$rp" "${TLS_S[@]}" --disk "$src=$disk" \
      --streams "$STREAMS" --state-dir "$WORK/mig-$rtt" --task-id "ll-$what-$rtt" >/dev/null 2>"$WORK/mig.log" \
      || die "block migrate failed: $(tail -3 "$WORK/mig.log")"
    t1=$(now)
    if [[ $what == small ]]; then
      cmp "$WORK/small.img" "$WORK/sdst.img" || die "block copy differs"
      small_t=$(secs "$t0" "$t1")
    else
      cmp "$WORK/src.img" "$WORK/dst.img" || die "block copy differs"
      row "$rtt" block "$BYTES" "$(secs "$t0" "$t1")" "" "" "$SBYTES" "$small_t"
    fi
  done
  rm -f "$WORK/dst.img" "$WORK/sdst.img"

  for what in small big; do
    mkdir -p "$WORK/root-$what"
    fp=$(receiver --root "$WORK/root-$what")
    rp=$(relay "$rtt" "$fp")
    if [[ $what == small ]]; then tree=$WORK/stree; else tree=$WORK/tree; fi
    t0=$(now)
    "$AGENT" migrate --mode file --target "127.0.0.1:$rp" "${TLS_S[@]}" --source-root "$tree" \
      --streams "$STREAMS" --task-id "ll-$what-$rtt" >/dev/null 2>"$WORK/mig.log" \
      || die "file migrate failed: $(tail -3 "$WORK/mig.log")"
    t1=$(now)
    for f in "$tree"/*; do cmp "$f" "$WORK/root-$what/${f##*/}" || die "file copy differs"; done
    rm -rf "$WORK/root-$what"
    if [[ $what == small ]]; then
      small_t=$(secs "$t0" "$t1")
    else
      row "$rtt" file "$BYTES" "$(secs "$t0" "$t1")" "" "" "$SBYTES" "$small_t"
    fi
  done
  bg_kill_all
done

mkdir -p "$RESULTS_DIR"
out="$RESULTS_DIR/longlink-$(date +%Y%m%d-%H%M%S).json"
printf '%s\n' "${rows[@]}" >"$WORK/rows.tsv"
python3 - "$MBIT" "$out" "$SIZE_MIB" "$STREAMS" "$WORK/rows.tsv" <<'EOP'
import json, sys
mbit, out, size, streams = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
rows = [l.rstrip("\t").split("\t") for l in open(sys.argv[5]).read().splitlines() if l.strip()]
res, plain = [], {}
for r in rows:
    r += [""] * (8 - len(r))
    rtt, tool, b, secs, delay, bw, sb, st = r[:8]
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
            steady = (int(b) - int(sb)) * 8 / (float(secs) - float(st)) / 1e6
            e.update(fixed_cost_s=float(st), steady_mbit_s=steady, steady_of_link=steady / mbit)
    res.append(e)
print(f"link {mbit:.0f} Mbit/s each way, {size} MiB per transfer, {streams} streams")
print(f"{'rtt ms':>7} {'what':<9} {'result':>34} {'of link':>8} {'of socat':>9}  steady (fixed cost)")
for e in res:
    if e["tool"] == "netcheck":
        s = f"delay {e['delay_ms']:.1f} ms, {e['bandwidth_mbps']:.0f} Mbit/s"
        print(f"{e['rtt_ms']:>7.0f} {'netcheck':<9} {s:>34} {e['bandwidth_ratio']:>8.3f}   delay {e['delay_ratio']:.3f} of RTT")
    else:
        s = f"{e['mbit_s']:.0f} Mbit/s in {e['seconds']:.1f} s"
        extra = ""
        if "steady_of_link" in e:
            extra = f"  {e['steady_of_link']:.3f} of link ({e['fixed_cost_s']:.2f} s)"
        print(f"{e['rtt_ms']:>7.0f} {e['tool']:<9} {s:>34} {e['of_link']:>8.3f} {e.get('of_plain_stream', 1.0):>9.3f}{extra}")
json.dump({"link_mbit": mbit, "size_mib": int(size), "streams": int(streams), "results": res},
          open(out, "w"), indent=1)
print(f"written {out}")
EOP
