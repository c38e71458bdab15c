#!/usr/bin/env bash
# Changed-block tracking benchmark, all in one run on loop-device disks:
#   1. block sync after CHANGE_PCT % of the data of an ext4 disk (FILL_PCT % used) changed, with
#      the tracker (`migrate --continuous`): source bytes read ÷ bytes changed, and its time
#      against `rsync --inplace --no-whole-file` of the disk image brought up to date locally
#      (no ssh: the baseline is, if anything, flattered);
#   2. the cutover of that disk after another CHANGE_PCT %: the freeze window `migrate` reports;
#   3. the tracker's cost to a write-heavy workload on the source: fio 4 KiB random O_DIRECT
#      writes to a raw loop disk, alone and with the tracker attached (migrate --continuous
#      idle between passes), RUNS rounds each, medians.
# Every target is verified (e2fsck -fn and a checksum of all files) before its figures count.
#
# Usage: sudo bench/cbt.sh [--quick]
#   full:    8 GiB ext4 disk for 1, 4 GiB for 2 (own run of 1+2 at that size), 1 GiB raw for 3
#   --quick: 1 GiB and 1 GiB, fio 5 s (CI smoke, about a minute plus the build)
# Environment: FILL_PCT (10), CHANGE_PCT (1), RUNS (3), FIO_SECS (15), BENCH_TMPDIR,
#   RESULTS_DIR (bench/results), NO_BUILD=1, SMS_AGENT_BIN.
# Output: a table on stdout and bench/results/cbt-DATE.json.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
# shellcheck source=bench/lib.sh
. bench/lib.sh

QUICK=0
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown argument: $arg (usage: $0 [--quick])" ;;
  esac
done
FILL_PCT=${FILL_PCT:-10}
CHANGE_PCT=${CHANGE_PCT:-1}
RUNS=${RUNS:-3}
if ((QUICK)); then
  SYNC_GIB=1 CUT_GIB=1 FIO_SECS=${FIO_SECS:-5}
else
  SYNC_GIB=8 CUT_GIB=4 FIO_SECS=${FIO_SECS:-15}
fi

need_root
ensure_tools mkfs.ext4=e2fsprogs e2fsck=e2fsprogs losetup=mount rsync=rsync fio=fio \
  python3=python3 openssl=openssl jq=jq bpftool=bpftool

WORK=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/sms-cbt-bench.XXXXXX")
RX_PID='' MIG_PID=''
cleanup() {
  set +e
  [[ -n $MIG_PID ]] && kill "$MIG_PID" 2>/dev/null
  [[ -n $RX_PID ]] && kill "$RX_PID" 2>/dev/null
  wait 2>/dev/null
  awk -v w="$WORK/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
  losetup -n -l -O NAME,BACK-FILE | awk -v w="$WORK/" 'index($2, w) == 1 {print $1}' | while read -r l; do
    losetup -d "$l"
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n ${SMS_AGENT_BIN:-} ]]; then
  BIN=$SMS_AGENT_BIN
else
  BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/sms-agent
  if [[ ${NO_BUILD:-0} != 1 ]]; then
    log "cargo build --release -p sms-agent"
    cargo build --release -q -p sms-agent || die "build failed"
  fi
fi
"$BIN" migrate --help | grep -q -- --continuous || die "$BIN has no migrate --continuous"
"$BIN" certs --out "$WORK/certs" --target-name 127.0.0.1 >/dev/null
C=$WORK/certs
declare -A R

# tree_digest DIR: one SHA-256 over the names and contents of all regular files.
tree_digest() {
  (cd "$1" && find . -xdev -type f ! -path './lost+found/*' -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum) \
    | sha256sum | cut -c1-64
}

# fill DIR BYTES: random files of 64 KiB to 8 MiB until BYTES are written.
fill() {
  python3 - "$1" "$2" <<'EOP'
import os, random, sys
root, total = sys.argv[1], int(sys.argv[2])
rng, done, i = random.Random(3), 0, 0
while done < total:
    n = min(total - done, rng.choice([64 << 10, 1 << 20, 8 << 20]))
    d = os.path.join(root, "d%03d" % (i % 100))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%06d" % i), "wb") as f:
        f.write(os.urandom(n))
    done, i = done + n, i + 1
EOP
}

# change DIR PCT SEED: overwrite PCT % of the files' 4 KiB blocks in place; prints bytes.
change() {
  python3 - "$1" "$2" "$3" <<'EOP'
import bisect, os, random, sys
root, pct, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
files, ends, total = [], [], 0
for dirpath, dirs, names in os.walk(root):
    dirs.sort()
    for n in sorted(names):
        p = os.path.join(dirpath, n)
        if os.path.isfile(p) and os.path.getsize(p) >= 4096:
            total += os.path.getsize(p) // 4096
            files.append(p)
            ends.append(total)
picked = rng.sample(range(total), max(1, int(total * pct / 100)))
fds = {}
for b in picked:
    i = bisect.bisect_right(ends, b)
    start = ends[i - 1] if i else 0
    fd = fds.setdefault(i, os.open(files[i], os.O_WRONLY))
    os.pwrite(fd, os.urandom(4096), (b - start) * 4096)
for fd in fds.values():
    os.fsync(fd)
    os.close(fd)
print(len(picked) * 4096)
EOP
}

# receiver DISK_IMG: a receiver on a free port (no --once); sets RX_PID and RX_ADDR.
receiver() {
  local log=$WORK/rx.log
  "$BIN" receive --listen 127.0.0.1:0 --ca "$C/ca.pem" --cert "$C/target.pem" \
    --key "$C/target-key.pem" --state-dir "$WORK/rx-state" --disk "disk0=$1" 2>"$log" &
  RX_PID=$!
  for _ in $(seq 100); do
    RX_ADDR=$(sed -n 's/^sms-agent receive: listening on //p' "$log")
    [[ -n $RX_ADDR ]] && return 0
    sleep 0.1
  done
  die "the receiver did not start: $(cat "$log")"
}

# start_migrate DEV EXTRA...: migrate --continuous in the background, stdout to $WORK/mig.out.
start_migrate() {
  local dev=$1
  shift
  : >"$WORK/mig.out"
  RUST_LOG=info "$BIN" migrate --mode block --target "$RX_ADDR" --ca "$C/ca.pem" \
    --cert "$C/source.pem" --key "$C/source-key.pem" --state-dir "$WORK/src-state" \
    --disk "$dev=disk0" --continuous "$@" >"$WORK/mig.out" 2>"$WORK/mig.err" &
  MIG_PID=$!
}

# wait_line PATTERN N: until the migrate output holds N lines matching PATTERN.
wait_line() {
  for _ in $(seq 6000); do
    (($(grep -c -- "$1" "$WORK/mig.out" "$WORK/mig.err" | awk -F: '{s += $2} END {print s}') >= $2)) && return 0
    kill -0 "$MIG_PID" 2>/dev/null || die "migrate ended: $(tail -n 5 "$WORK/mig.err")"
    sleep 0.1
  done
  die "timed out waiting for '$1'"
}

# field LINE WORD: the number just before WORD in LINE.
field() { grep -o "[0-9.]* $2" <<<"$1" | head -n 1 | cut -d' ' -f1; }

# sync_and_cutover GIB LABEL: scenario 1 (with rsync) or 2 on a disk of GIB GiB.
sync_and_cutover() {
  local gib=$1 label=$2 bytes img dev mnt tgt used changed line secs read rs t0 t1 digest
  bytes=$((gib << 30))
  img=$WORK/$label-src.img tgt=$WORK/$label-tgt.img mnt=$WORK/$label-mnt
  truncate -s "$bytes" "$img"
  truncate -s "$bytes" "$tgt"
  dev=$(losetup -f --show "$img")
  mkfs.ext4 -q -b 4096 -O ^metadata_csum,^uninit_bg -E lazy_itable_init=0,lazy_journal_init=0 "$dev"
  mkdir -p "$mnt"
  mount "$dev" "$mnt"
  used=$((bytes * FILL_PCT / 100))
  log "$label: filling $((used >> 20)) MiB of a $gib GiB ext4"
  fill "$mnt" "$used"
  sync
  receiver "$tgt"
  # A pass once 95 % of what the bench changes is on the disk (it fsyncs at the end); no
  # timed passes.
  local threshold=$(((used * CHANGE_PCT * 95 / 10000) >> 20))
  ((threshold > 0)) || threshold=1
  start_migrate "$dev" --freeze --sync-interval 86400 --sync-threshold "$threshold"
  wait_line "^continuous sync:" 1
  log "$label: copy and first sync done; changing $CHANGE_PCT %"
  if [[ $label == sync ]]; then
    # The rsync baseline's target: the source image as it is now.
    cp --sparse=always "$img" "$WORK/rsync.img"
  fi
  drop_caches
  changed=$(change "$mnt" "$CHANGE_PCT" 11)
  t0=$(now)
  wait_line "^sync complete" 2
  t1=$(now)
  line=$(grep "^sync complete" "$WORK/mig.out" | tail -n 1)
  secs=$(field "$line" "s,")
  read=$(field "$line" "read,")
  R[${label}_changed]=$changed
  R[${label}_read]=$read
  R[${label}_secs]=$secs
  log "$label: changed $changed bytes; the tracked sync read $read in $secs s (noticed and done in $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}') s)"
  if [[ $label == sync ]]; then
    sync
    drop_caches
    t0=$(now)
    rsync --inplace --no-whole-file "$img" "$WORK/rsync.img"
    t1=$(now)
    rs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')
    R[rsync_secs]=$rs
    rm -f "$WORK/rsync.img"
    log "$label: rsync --inplace --no-whole-file took $rs s"
  fi
  # The cutover, after another CHANGE_PCT %.
  changed=$(change "$mnt" "$CHANGE_PCT" 12)
  digest=$(tree_digest "$mnt")
  kill -TERM "$MIG_PID"
  wait "$MIG_PID" || die "the cutover failed: $(tail -n 5 "$WORK/mig.err")"
  MIG_PID=''
  line=$(grep "^thawed after" "$WORK/mig.out" | tail -n 1)
  R[${label}_freeze_secs]=$(field "$line" "s")
  R[${label}_cut_changed]=$changed
  # Over both changes: every tracked pass after the first sync (a pass may start before the
  # last blocks of a change are flushed; the rest goes with the next), the cutover included.
  R[${label}_all_read]=$(grep "^sync complete" "$WORK/mig.out" | tail -n +2 \
    | grep -o "[0-9]* read," | awk '{s += $1} END {print s + 0}')
  R[${label}_all_changed]=$((R[${label}_changed] + changed))
  log "$label: cutover after $changed bytes changed: $line"
  kill "$RX_PID" 2>/dev/null
  wait "$RX_PID" 2>/dev/null || true
  RX_PID=''
  umount "$mnt"
  losetup -d "$dev"
  # Verify: clean filesystem, same files.
  e2fsck -fn "$tgt" >/dev/null 2>&1 || die "$label: e2fsck -fn of the target failed"
  dev=$(losetup -f --show -r "$tgt")
  mount -o ro,noload "$dev" "$mnt"
  [[ $(tree_digest "$mnt") == "$digest" ]] || die "$label: the target's files differ from the source's"
  umount "$mnt"
  losetup -d "$dev"
  rm -f "$img" "$tgt"
  rm -rf "$WORK/rx-state" "$WORK/src-state"
}

# fio_run DEV: "MiB/s writes" of FIO_SECS of 4 KiB random O_DIRECT writes.
fio_run() {
  fio --name=w --filename="$1" --rw=randwrite --bs=4k --direct=1 --ioengine=psync \
    --time_based --runtime="$FIO_SECS" --output-format=json 2>/dev/null \
    | jq -r '"\(.jobs[0].write.bw_bytes / 1048576) \(.jobs[0].write.total_ios)"'
}

# cpu_ns PID: user+system CPU time of a process, ns.
cpu_ns() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.0f\n", ($14 + $15) * 1e9 / hz}' "/proc/$1/stat"; }

# bpf_ns: total run time (ns) and runs of the tracker's two programs (kernel.bpf_stats_enabled).
bpf_ns() {
  bpftool -j prog show 2>/dev/null \
    | jq -r '[.[] | select(.name == "bio_queue" or .name == "rq_complete")] | "\(map(.run_time_ns // 0) | add // 0) \(map(.run_cnt // 0) | add // 0)"'
}

median() { sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

# Scenario 3. Throughput on this shared 2-core VM is too noisy for a 3 % figure, so the cost is
# also measured as CPU: the BPF programs' own run time per write (bpf_stats) plus the poller's
# CPU per write, against the time fio spends per write.
tracker_cost() {
  local img=$WORK/fio.img tgt=$WORK/fio-tgt.img dev i r w c0 c1 b0 b1 stats_was
  truncate -s 1G "$img" "$tgt"
  dev=$(losetup -f --show "$img")
  receiver "$tgt"
  stats_was=$(cat /proc/sys/kernel/bpf_stats_enabled 2>/dev/null || echo 0)
  echo 1 >/proc/sys/kernel/bpf_stats_enabled
  local -a with without bpfw pollw fiow
  for ((i = 0; i < RUNS; i++)); do
    read -r r w <<<"$(fio_run "$dev")"
    without+=("$r")
    start_migrate "$dev" --sync-interval 86400 --sync-threshold 1000000
    wait_line "^continuous sync:" 1
    c0=$(cpu_ns "$MIG_PID")
    read -r b0 _ <<<"$(bpf_ns)"
    read -r r w <<<"$(fio_run "$dev")"
    read -r b1 _ <<<"$(bpf_ns)"
    c1=$(cpu_ns "$MIG_PID")
    with+=("$r")
    bpfw+=("$(awk -v a="$b0" -v b="$b1" -v n="$w" 'BEGIN {printf "%.0f", (b - a) / n}')")
    pollw+=("$(awk -v a="$c0" -v b="$c1" -v n="$w" 'BEGIN {printf "%.0f", (b - a) / n}')")
    fiow+=("$(awk -v s="$FIO_SECS" -v n="$w" 'BEGIN {printf "%.0f", s * 1e9 / n}')")
    kill -TERM "$MIG_PID"
    wait "$MIG_PID" || true
    MIG_PID=''
  done
  echo "$stats_was" >/proc/sys/kernel/bpf_stats_enabled
  R[fio_with]=$(printf '%s\n' "${with[@]}" | median)
  R[fio_without]=$(printf '%s\n' "${without[@]}" | median)
  R[bpf_ns_per_write]=$(printf '%s\n' "${bpfw[@]}" | median)
  R[poller_ns_per_write]=$(printf '%s\n' "${pollw[@]}" | median)
  R[fio_ns_per_write]=$(printf '%s\n' "${fiow[@]}" | median)
  log "fio 4 KiB randwrite O_DIRECT MiB/s without: ${without[*]}; with the tracker: ${with[*]}"
  log "per write: BPF ${bpfw[*]} ns, poller ${pollw[*]} ns; fio ${fiow[*]} ns per write"
  kill "$RX_PID" 2>/dev/null
  wait "$RX_PID" 2>/dev/null || true
  RX_PID=''
  losetup -d "$dev"
  rm -f "$img" "$tgt"
}

sync_and_cutover "$SYNC_GIB" sync
sync_and_cutover "$CUT_GIB" cut
tracker_cost

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.4f", a / b; else print "-"}'; }
printf '\n%-58s %s\n' "measure" "value"
printf '%-58s %s\n' "sync: bytes changed (${CHANGE_PCT} % of ${FILL_PCT} % of ${SYNC_GIB} GiB)" "${R[sync_changed]}"
printf '%-58s %s\n' "sync: source bytes read" "${R[sync_read]}"
printf '%-58s %s\n' "sync: read / changed (goal <= 1.2)" "$(ratio "${R[sync_read]}" "${R[sync_changed]}")"
printf '%-58s %s\n' "sync: both changes and the cutover: read / changed" "$(ratio "${R[sync_all_read]}" "${R[sync_all_changed]}")"
printf '%-58s %s\n' "sync: seconds (ours / rsync)" "${R[sync_secs]} / ${R[rsync_secs]}"
printf '%-58s %s\n' "sync: ours / rsync --inplace --no-whole-file (goal <= 0.01)" "$(ratio "${R[sync_secs]}" "${R[rsync_secs]}")"
printf '%-58s %s\n' "cutover of ${CUT_GIB} GiB, ${R[cut_cut_changed]} bytes changed: freeze window s (goal <= 2)" "${R[cut_freeze_secs]}"
printf '%-58s %s\n' "cutover of ${SYNC_GIB} GiB: freeze window s" "${R[sync_freeze_secs]}"
printf '%-58s %s\n' "fio MiB/s without / with the tracker" "${R[fio_without]} / ${R[fio_with]}"
printf '%-58s %s\n' "fio with / without (goal >= 0.97; noisy on a shared VM)" "$(ratio "${R[fio_with]}" "${R[fio_without]}")"
printf '%-58s %s\n' "per write: BPF ns + poller ns / fio ns" "${R[bpf_ns_per_write]} + ${R[poller_ns_per_write]} / ${R[fio_ns_per_write]}"
printf '%-58s %s\n' "tracker CPU per write / time per write (goal <= 0.03)" "$(ratio "$((R[bpf_ns_per_write] + R[poller_ns_per_write]))" "${R[fio_ns_per_write]}")"

OUT=${RESULTS_DIR:-$REPO/bench/results}
mkdir -p "$OUT"
F=$OUT/cbt-$(date +%Y%m%d-%H%M%S).json
{
  printf '{"date": "%s", "mode": "%s", "fill_pct": %s, "change_pct": %s, "runs": %s' \
    "$(date -Iseconds)" "$( ((QUICK)) && echo quick || echo full)" "$FILL_PCT" "$CHANGE_PCT" "$RUNS"
  printf ', "sync_gib": %s, "cut_gib": %s' "$SYNC_GIB" "$CUT_GIB"
  for k in "${!R[@]}"; do printf ', "%s": %s' "$k" "${R[$k]}"; done
  printf '}\n'
} | jq . >"$F"
log "results: $F"
