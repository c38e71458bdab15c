#!/usr/bin/env bash
# Block-level migration benchmark: `sms-agent migrate --mode block` → `sms-agent receive` against
# the tools an operator would use instead, all in one run, on the same loop-device sources, each
# run starting with a cold page cache and ending when the target is flushed (`sync -f`):
#   1. a disk of random data:             ours vs a local dd (O_DIRECT both ends: the physical
#                                         limit; goal ours ÷ dd <= 2) vs plain TCP (socat) vs
#                                         dd | ssh dd
#   2. a disk with one ext4, 10 % used:   ours vs dd | ssh dd vs partclone.ext4 | ssh partclone
#   3. sync after 1 % of the data changed: ours --sync vs rsync --inplace --no-whole-file over ssh
# plus CPU seconds (user+sys, both sides, also per GiB) and peak RSS of every run. Every copy is verified (cmp,
# or e2fsck -fn and a checksum of all files) before its figure counts.
#
# Usage: sudo bench/block.sh [--quick]
#   full:    4 GiB random disk, 8 GiB ext4 disk (48 GiB free space needed; about 5 min per
#            round on a 2-core VM, so 15 min with the default 3 rounds)
#   --quick: 0.25 GiB and 1 GiB, for CI smoke runs (about 1 min, plus the build)
# On a slow disk, scenario 1 measures the disk as much as the tools; BENCH_TMPDIR=/dev/shm puts
# the images in memory (needs the space in RAM).
# Environment (all optional):
#   S1_GIB, S2_GIB       disk sizes of scenario 1 and 2/3 (override the mode's sizes)
#   RUNS                 runs of each copy in scenarios 1 and 2 (default 3; the median counts;
#                        scenario 3 runs once, as a sync changes its target)
#   FILL_PCT, CHANGE_PCT ext4 fill (default 10) and the share of its data changed (default 1)
#   BENCH_TMPDIR         where the images go (default $TMPDIR or /tmp)
#   RESULTS_DIR          where the JSON goes (default bench/results)
#   NO_BUILD=1           skip `cargo build --release -p sms-agent`
#   SMS_AGENT_BIN        use this sms-agent binary (implies NO_BUILD)
#   RECEIVE_ARGS, MIGRATE_ARGS   extra arguments for our commands (word-split)
# Output: a table on stdout and bench/results/block-DATE.json. Exit status 1 when a run failed or
# the build failed; when sms-agent has no receive/migrate yet, only the baselines are measured
# (said so loudly) and the exit status is 0.
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
if ((QUICK)); then
  S1_GIB=${S1_GIB:-0.25} S2_GIB=${S2_GIB:-1}
else
  S1_GIB=${S1_GIB:-4} S2_GIB=${S2_GIB:-8}
fi
RUNS=${RUNS:-3}
FILL_PCT=${FILL_PCT:-10}
CHANGE_PCT=${CHANGE_PCT:-1}
# GiB (decimals allowed) → bytes, whole MiB.
gib_bytes() { awk -v g="$1" 'BEGIN {m = int(g * 1024 + 0.5); if (m < 16) m = 16; printf "%.0f\n", m * 1048576}'; }
S1_BYTES=$(gib_bytes "$S1_GIB")
S2_BYTES=$(gib_bytes "$S2_GIB")
FILL_BYTES=$((S2_BYTES * FILL_PCT / 100))
human() { awk -v b="$1" 'BEGIN {if (b >= 1073741824) printf "%.4gGiB\n", b / 1073741824; else printf "%.4gMiB\n", b / 1048576}'; }
# Scenario labels, as the table shows them; the index is what the code uses.
SCN=("" "1:random-$(human "$S1_BYTES")" "2:ext4-$(human "$S2_BYTES")-${FILL_PCT}%used" "3:sync-${CHANGE_PCT}%changed")
OURS_TOOL=sms-agent

need_root
ensure_tools /usr/sbin/sshd=openssh-server ssh=openssh-client ssh-keygen=openssh-client \
  socat=socat partclone.ext4=partclone rsync=rsync mkfs.ext4=e2fsprogs e2fsck=e2fsprogs \
  losetup=mount /usr/bin/time=time openssl=openssl python3=python3 cmp=diffutils ss=iproute2

WORK=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/sms-block-bench.XXXXXX")
SSHD_PID=
cleanup() {
  set +e
  bg_kill_all
  [[ -n $SSHD_PID ]] && kill_tree "$SSHD_PID"
  wait 2>/dev/null
  # Mounts below WORK (deepest first), then loop devices backed by files in WORK.
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
mkdir -p "$WORK/run" "$WORK/ok" "$WORK/mnt/src" "$WORK/mnt/verify"

# --- space: scenario 1's files are removed before scenario 2, whose source is sparse but whose
# dd target is written in full; at most 2 × the larger disk exist at once. Ask for 3 × that.
NEED=$((2 * (S1_BYTES > S2_BYTES ? S1_BYTES : S2_BYTES)))
AVAIL=$(df -B1 --output=avail "$WORK" | tail -n 1)
if ((AVAIL < 3 * NEED)); then
  die "$(dirname "$WORK") has $(human "$AVAIL") free; the run needs 3 × $(human "$NEED") = $(human $((3 * NEED))) (use --quick, smaller S1_GIB/S2_GIB or BENCH_TMPDIR elsewhere)"
fi

# --- our binary (built and checked by lib.sh) and the private sshd.
prepare_ours --target --listen "has no 'migrate'/'receive' commands yet" 3

# ------------------------------------------------------------------------------------------
# Helpers for the runs


# tree_digest DIR: one SHA-256 over the names and contents of all regular files in DIR.
tree_digest() {
  (cd "$1" && find . -xdev -type f ! -path './lost+found/*' -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum) \
    | sha256sum | cut -c1-64
}

# rundir NAME: a new directory for one run's logs (shown when the run fails).
rundir() { mktemp -d "$WORK/run/$1.XXXX" | tee "$WORK/rundir"; }

# A reason for the row when a run fails: `fail TEXT` records it and fails the run.
fail() {
  echo "$*" >"$WORK/why"
  return 1
}
# log_tail FILE: the last error line of a log (else its last lines), colours stripped, on one
# line, for a failure note.
log_tail() {
  local text
  text=$(sed 's/\x1b\[[0-9;]*m//g' "$1" 2>/dev/null) || return 0
  { grep -i 'error' <<<"$text" | tail -n 1 | grep . || tail -n 3 <<<"$text"; } | tr '\n\t' '  ' | cut -c1-300
}

# verify_ext4 IMAGE DIGEST: e2fsck -fn clean and the files equal to the source's.
verify_ext4() {
  local img=$1 want=$2 loop got
  e2fsck -fn "$img" >"$img.fsck" 2>&1 || fail "e2fsck -fn $img: $(log_tail "$img.fsck")"
  loop=$(losetup -f --show -r "$img")
  mount -o ro,noload "$loop" "$WORK/mnt/verify"
  got=$(tree_digest "$WORK/mnt/verify")
  umount "$WORK/mnt/verify"
  losetup -d "$loop"
  [[ $got == "$want" ]] || fail "files on the target differ from the source (sha256 of all files)"
}

# verify SCENARIO SRC_IMAGE DST: cmp for the raw disk, fsck + file checksums for ext4.
verify() {
  case $1 in
    1) cmp -s "$2" "$3" || fail "target differs from the source (cmp)" ;;
    *) verify_ext4 "$3" "$SRC_DIGEST" ;;
  esac
}

# bench IDX TOOL FUNC ARGS...: one run in a subshell; a failure becomes a FAILED row (with the
# reason), whatever it left running or mounted is cleaned up, and the benchmark goes on.
bench() {
  local idx=$1 tool=$2
  shift 2
  local mark=$WORK/ok/$idx-${tool//|/_} # exists when the tool's last run here succeeded
  log "${SCN[idx]}: $tool"
  rm -f "$WORK/why" "$WORK/rundir" "$mark"
  try "$@"
  if ((TRY_RC == 0)); then
    touch "$mark"
    return 0
  fi
  local why="exit status $TRY_RC"
  [[ -s $WORK/why ]] && why=$(cat "$WORK/why")
  warn "${SCN[idx]}: $tool FAILED: $why"
  local f
  for f in "$(cat "$WORK/rundir" 2>/dev/null)"/*.{log,err}; do
    [[ -s $f ]] && { warn "--- ${f##*/}:"; tail -n 20 "$f" >&2; }
  done
  result_add "${SCN[idx]}" "$tool" FAILED "" "" "" "" "" "" "$why"
  bg_kill_all
  mountpoint -q "$WORK/mnt/verify" && umount "$WORK/mnt/verify"
  losetup -n -l -O NAME,BACK-FILE,RO | awk -v w="$WORK/" 'index($2, w) == 1 && $3 == 1 && $2 !~ /src\.img$/ {print $1}' \
    | while read -r l; do losetup -d "$l"; done
}
ran_ok() { [[ -e $WORK/ok/$1-${2//|/_} ]]; }
skip() { result_add "${SCN[$1]}" "$2" SKIPPED "" "" "" "" "" "" "$3"; }

# Each run_* measures one copy: IDX SRC_DEV SRC_IMAGE DST BYTES. The target DST is created
# fresh (sparse, full size, where the tool needs it to exist); the clock runs from the first
# byte read to the target flushed; then the copy is verified and the row added.

run_socat() {
  local idx=$1 src=$2 img=$3 dst=$4 bytes=$5 d port rpid t0 t1
  d=$(rundir socat)
  rm -f "$dst"
  port=$(free_port)
  /usr/bin/time -f "$TIME_FMT" -o "$d/recv.time" \
    socat -u "TCP-LISTEN:$port,reuseaddr,bind=127.0.0.1" "OPEN:$dst,creat,trunc" 2>"$d/recv.log" &
  rpid=$!
  bg_register "$rpid"
  wait_port "$port" "$rpid" || fail "socat listener: $(log_tail "$d/recv.log")"
  drop_caches
  t0=$(now)
  timed "$d/send.time" socat -u "OPEN:$src" "TCP:127.0.0.1:$port" 2>"$d/send.log" \
    || fail "socat sender: $(log_tail "$d/send.log")"
  wait_exit "$rpid" 300 || fail "socat listener: $(log_tail "$d/recv.log")"
  sync -f "$dst"
  t1=$(now)
  verify "$idx" "$img" "$dst"
  result_add "${SCN[idx]}" socat ok "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" "$bytes" \
    "$(time_cpu "$d/send.time")" "$(time_cpu "$d/recv.time")" "$(time_rss "$d/send.time")" "$(time_rss "$d/recv.time")" ""
}

# dd | ssh dd: the far side's CPU is everything the private sshd reaped during the run (sshd's
# own crypto included); its RSS is the remote dd's (sshd's is not known).
run_ddssh() {
  local idx=$1 src=$2 img=$3 dst=$4 bytes=$5 d c0 c1 t0 t1
  d=$(rundir ddssh)
  rm -f "$dst"
  drop_caches
  c0=$(sshd_children_cpu)
  t0=$(now)
  timed "$d/dd.time" dd if="$src" bs=4M status=none \
    | timed "$d/ssh.time" "${SSH[@]}" "$(remote_cmd /usr/bin/time -f "$TIME_FMT" -o "$d/recv.time" dd of="$dst" bs=4M status=none)" \
      2>"$d/ssh.log" || fail "dd | ssh dd: $(log_tail "$d/ssh.log")"
  sync -f "$dst"
  t1=$(now)
  c1=$(sshd_children_cpu)
  verify "$idx" "$img" "$dst"
  result_add "${SCN[idx]}" "dd|ssh" ok "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" "$bytes" \
    "$(time_cpu "$d/dd.time" "$d/ssh.time")" "$(awk -v a="$c0" -v b="$c1" 'BEGIN {printf "%.2f\n", b - a}')" \
    "$(time_rss "$d/dd.time" "$d/ssh.time")" "$(time_rss "$d/recv.time")" "recv RSS: remote dd only"
}

# partclone.ext4 -c (used blocks only, in its image format) | ssh partclone.ext4 -r.
run_partclone() {
  local idx=$1 src=$2 img=$3 dst=$4 bytes=$5 d c0 c1 t0 t1
  d=$(rundir partclone)
  rm -f "$dst"
  truncate -s "$bytes" "$dst"
  drop_caches
  c0=$(sshd_children_cpu)
  t0=$(now)
  timed "$d/clone.time" partclone.ext4 -q -c -s "$src" -o - -L "$d/clone.log" 2>"$d/clone.err" \
    | timed "$d/ssh.time" "${SSH[@]}" "$(remote_cmd /usr/bin/time -f "$TIME_FMT" -o "$d/recv.time" \
      partclone.ext4 -q -r -s - -O "$dst" -L "$d/restore.log")" >/dev/null 2>"$d/ssh.log" \
    || fail "partclone: $(log_tail "$d/clone.log") / $(log_tail "$d/restore.log") $(log_tail "$d/ssh.log")"
  sync -f "$dst"
  t1=$(now)
  c1=$(sshd_children_cpu)
  verify "$idx" "$img" "$dst"
  result_add "${SCN[idx]}" "partclone|ssh" ok "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" "$bytes" \
    "$(time_cpu "$d/clone.time" "$d/ssh.time")" "$(awk -v a="$c0" -v b="$c1" 'BEGIN {printf "%.2f\n", b - a}')" \
    "$(time_rss "$d/clone.time" "$d/ssh.time")" "$(time_rss "$d/recv.time")" "recv RSS: remote partclone only"
}

# rsync of the image file behind the loop device onto an existing copy of its old state.
# --ignore-times: always the delta algorithm, never the size+mtime shortcut.
run_rsync() {
  local idx=$1 img=$3 dst=$4 bytes=$5 d c0 c1 t0 t1
  d=$(rundir rsync)
  drop_caches
  c0=$(sshd_children_cpu)
  t0=$(now)
  timed "$d/send.time" rsync --inplace --no-whole-file --ignore-times -e "$SSH_E" \
    --rsync-path="$(remote_cmd /usr/bin/time -f "$TIME_FMT" -o "$d/recv.time" rsync)" \
    --stats "$img" "root@127.0.0.1:$dst" >"$d/rsync.log" 2>&1 || fail "rsync: $(log_tail "$d/rsync.log")"
  sync -f "$dst"
  t1=$(now)
  c1=$(sshd_children_cpu)
  verify "$idx" "$img" "$dst"
  local sent
  sent=$(awk -F': ' '/^Total bytes sent/ {gsub(/,/, "", $2); print $2}' "$d/rsync.log")
  result_add "${SCN[idx]}" rsync ok "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" "$bytes" \
    "$(time_cpu "$d/send.time")" "$(awk -v a="$c0" -v b="$c1" 'BEGIN {printf "%.2f\n", b - a}')" \
    "$(time_rss "$d/send.time")" "$(time_rss "$d/recv.time")" "sent ${sent:-?} bytes; recv RSS: remote rsync only"
}

# The physical limit on this machine: a local dd of the same source device onto the same kind of
# target (a fresh sparse image file on the same filesystem), both sides O_DIRECT, 4 MiB blocks.
# Ours is held against it (ours ÷ dd); its CPU is counted on the sending side.
run_ddlocal() {
  local idx=$1 src=$2 img=$3 dst=$4 bytes=$5 d t0 t1
  d=$(rundir ddlocal)
  rm -f "$dst"
  truncate -s "$bytes" "$dst"
  drop_caches
  t0=$(now)
  timed "$d/dd.time" dd if="$src" of="$dst" bs=4M iflag=direct oflag=direct conv=notrunc status=none \
    2>"$d/dd.log" || fail "dd: $(log_tail "$d/dd.log")"
  sync -f "$dst"
  t1=$(now)
  verify "$idx" "$img" "$dst"
  result_add "${SCN[idx]}" "$DDLOCAL" ok "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" "$bytes" \
    "$(time_cpu "$d/dd.time")" 0 "$(time_rss "$d/dd.time")" 0 "one process, both ends"
}
DDLOCAL="dd-local-direct"

# Ours: receive (in the background) and migrate --mode block, each under GNU time.
# run_ours IDX SRC_DEV SRC_IMAGE DST BYTES STATE_DIR [MIGRATE_FLAGS...]; DST must exist.
# A full copy runs the receiver with --once (it ends after the session). A sync (--sync) may
# take more than one session (migrate first checks the full copy is complete, then syncs), so
# there the receiver serves until migrate is done and is then stopped.
run_ours() {
  local idx=$1 src=$2 img=$3 dst=$4 bytes=$5 state=$6 d port rpid t0 t1 rrc=0 once=0
  shift 6
  d=$(rundir ours)
  mkdir -p "$state"
  port=$(free_port)
  local recv=("$BIN" receive --listen "127.0.0.1:$port" --ca "$CERTS/ca.pem" --cert "$CERTS/target.pem"
    --key "$CERTS/target-key.pem" --disk "disk0=$dst")
  [[ " $* " != *" --sync "* ]] && has_flag "$RECV_HELP" --once && once=1
  # The source keeps its own record of a migration (a rerun onto a complete copy verifies it
  # instead of copying): kept with the receiver's, so a fresh state dir means a full copy.
  local mstate=()
  has_flag "$MIGR_HELP" --state-dir && mstate=(--state-dir "$state/source")
  ((once)) && recv+=(--once)
  has_flag "$RECV_HELP" --state-dir && recv+=(--state-dir "$state")
  /usr/bin/time -f "$TIME_FMT" -o "$d/recv.time" "${recv[@]}" "${RECEIVE_EXTRA[@]}" >"$d/receive.log" 2>&1 &
  rpid=$!
  bg_register "$rpid"
  wait_port "$port" "$rpid" || fail "receive did not listen: $(log_tail "$d/receive.log")"
  drop_caches
  t0=$(now)
  timed "$d/send.time" "$BIN" migrate --mode block --target "127.0.0.1:$port" --ca "$CERTS/ca.pem" \
    --cert "$CERTS/source.pem" --key "$CERTS/source-key.pem" --disk "$src=disk0" "${mstate[@]}" "$@" "${MIGRATE_EXTRA[@]}" \
    >"$d/migrate.log" 2>&1 || fail "migrate: $(log_tail "$d/migrate.log")"
  sync -f "$dst"
  t1=$(now)
  if ((once)); then
    wait_exit "$rpid" 60 || rrc=$?
    ((rrc == 0)) || fail "receive --once exited with status $rrc: $(log_tail "$d/receive.log")"
  else
    stop_timed "$rpid"
  fi
  verify "$idx" "$img" "$dst"
  result_add "${SCN[idx]}" "$OURS_TOOL${*:+ $*}" ok "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" "$bytes" \
    "$(time_cpu "$d/send.time")" "$(time_cpu "$d/recv.time")" "$(time_rss "$d/send.time")" "$(time_rss "$d/recv.time")" ""
}

# ------------------------------------------------------------------------------------------
# rounds CALLBACK TOOL...: RUNS rounds of CALLBACK TOOL for every tool, the order rotated by
# one each round (so no tool always runs first, right after the data was written).
rounds() {
  local cb=$1 r k
  shift
  local tools=("$@") n=$#
  for ((r = 0; r < RUNS; r++)); do
    for ((k = 0; k < n; k++)); do "$cb" "${tools[(k + r) % n]}"; done
  done
}

# Scenario 1: a disk full of random data (nothing to skip, nothing to compress).
S1_DIR=
S1_LOOP=
s1_run() {
  local src=$S1_DIR/src.img dst=$S1_DIR/dst.img
  case $1 in
    socat) bench 1 socat run_socat 1 "$S1_LOOP" "$src" "$dst" "$S1_BYTES" ;;
    "$DDLOCAL") bench 1 "$DDLOCAL" run_ddlocal 1 "$S1_LOOP" "$src" "$dst" "$S1_BYTES" ;;
    "dd|ssh") bench 1 "dd|ssh" run_ddssh 1 "$S1_LOOP" "$src" "$dst" "$S1_BYTES" ;;
    "$OURS_TOOL")
      # Every run a full copy from zero: empty sparse target, no receiver state.
      rm -rf "$dst" "$S1_DIR/state"
      truncate -s "$S1_BYTES" "$dst"
      bench 1 "$OURS_TOOL" run_ours 1 "$S1_LOOP" "$src" "$dst" "$S1_BYTES" "$S1_DIR/state"
      ;;
  esac
  rm -f "$dst"
}
scenario1() {
  S1_DIR=$WORK/s1
  mkdir -p "$S1_DIR"
  log "${SCN[1]}: writing $(human "$S1_BYTES") of random data"
  rand_file "$S1_DIR/src.img" "$S1_BYTES"
  S1_LOOP=$(losetup -f --show -r "$S1_DIR/src.img")
  if ((OURS)); then
    rounds s1_run "$DDLOCAL" socat "dd|ssh" "$OURS_TOOL"
  else
    rounds s1_run "$DDLOCAL" socat "dd|ssh"
    skip 1 "$OURS_TOOL" "$OURS_WHY"
  fi
  losetup -d "$S1_LOOP"
  rm -rf "$S1_DIR"
}

# fill_fs DIR BYTES: half incompressible files (1-32 MiB), a quarter real files copied from
# /usr/share (many small ones, some already gzip'ed), a quarter log-like text (compressible).
fill_fs() {
  python3 - "$1" "$2" <<'EOP'
import os, random, shutil, sys
root, budget = sys.argv[1], int(sys.argv[2])
rng = random.Random(42)
def write(path, n, gen):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        while n > 0:
            b = gen(min(n, 1 << 20))
            f.write(b)
            n -= len(b)
done, i = 0, 0
while done < budget // 2:
    n = min(rng.choice((1, 2, 4, 8, 16, 32)) << 20, budget // 2 - done)
    write(f"{root}/random/r{i:04}.bin", n, os.urandom)
    done, i = done + n, i + 1
share = budget // 4
for dirpath, dirs, files in os.walk("/usr/share"):
    dirs.sort()
    for name in sorted(files):
        src = os.path.join(dirpath, name)
        if share <= 0 or os.path.islink(src) or not os.path.isfile(src):
            continue
        size = os.path.getsize(src)
        if size > share:
            continue
        dst = os.path.join(root, "share", os.path.relpath(src, "/usr/share"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            shutil.copyfile(src, dst)
        except OSError:
            continue
        share -= size
        done += size
lines = "".join(
    f"2024-05-{1 + j % 28:02} {j % 24:02}:{j % 60:02}:{j * 7 % 60:02} INFO worker-{j % 16} "
    f"GET /api/v1/items/{rng.randrange(10**6)} status={rng.choice((200, 200, 200, 304, 404, 500))} "
    f"bytes={rng.randrange(100000)} ms={rng.randrange(900)}\n" for j in range(16000)).encode()
i = 0
while done < budget:
    n = min(8 << 20, budget - done)
    k = rng.randrange(len(lines))
    block = lines[k:] + lines[:k]
    write(f"{root}/logs/app{i:03}.log", n, lambda m: (block * (m // len(block) + 1))[:m])
    done, i = done + n, i + 1
EOP
  sync -f "$1"
}

# change_fs DIR PCT: overwrite PCT % of the files' 4 KiB blocks in place (random blocks of
# random files, weighted by size) with random data; prints the bytes changed.
change_fs() {
  python3 - "$1" "$2" <<'EOP'
import bisect, os, random, sys
root, pct = sys.argv[1], float(sys.argv[2])
rng = random.Random(7)
files, ends, total = [], [], 0
for dirpath, dirs, names in os.walk(root):
    dirs.sort()
    for n in sorted(names):
        p = os.path.join(dirpath, n)
        if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) >= 4096:
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

# Scenario 2: one ext4 (whole disk, no partition table), FILL_PCT used. The targets of the
# last runs of dd|ssh and of ours stay for scenario 3.
S2_DIR=
LOOP2=
s2_run() {
  local src=$S2_DIR/src.img
  case $1 in
    "dd|ssh") bench 2 "dd|ssh" run_ddssh 2 "$LOOP2" "$src" "$S2_DIR/dd.img" "$S2_BYTES" ;;
    "partclone|ssh")
      bench 2 "partclone|ssh" run_partclone 2 "$LOOP2" "$src" "$S2_DIR/pc.img" "$S2_BYTES"
      rm -f "$S2_DIR/pc.img" # not needed later
      ;;
    "$OURS_TOOL")
      # A full copy from zero each run: new sparse target, the state dir emptied (the sync
      # of scenario 3 then continues from the state the last run left).
      rm -rf "$S2_DIR/ours.img" "$S2_DIR/state"
      truncate -s "$S2_BYTES" "$S2_DIR/ours.img"
      bench 2 "$OURS_TOOL" run_ours 2 "$LOOP2" "$src" "$S2_DIR/ours.img" "$S2_BYTES" "$S2_DIR/state"
      ;;
  esac
}
scenario2() {
  S2_DIR=$WORK/s2
  mkdir -p "$S2_DIR"
  truncate -s "$S2_BYTES" "$S2_DIR/src.img"
  LOOP2=$(losetup -f --show "$S2_DIR/src.img")
  # Initialise inode tables and journal now, so no ext4lazyinit writes during the runs.
  mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$LOOP2"
  mount "$LOOP2" "$WORK/mnt/src"
  log "${SCN[2]}: filling the filesystem with $(human "$FILL_BYTES")"
  fill_fs "$WORK/mnt/src" "$FILL_BYTES"
  SRC_DIGEST=$(tree_digest "$WORK/mnt/src")
  meta_set s2_fs_used_bytes "$(df -B1 --output=used "$WORK/mnt/src" | tail -n 1)"
  meta_set s2_files "$(find "$WORK/mnt/src" -type f | wc -l)"
  umount "$WORK/mnt/src"
  if ((OURS)); then
    rounds s2_run "dd|ssh" "partclone|ssh" "$OURS_TOOL"
  else
    rounds s2_run "dd|ssh" "partclone|ssh"
    skip 2 "$OURS_TOOL" "$OURS_WHY"
  fi
}

# Scenario 3: change CHANGE_PCT % of scenario 2's file data in place, then bring the targets of
# scenario 2 up to date: ours (--sync, same receiver state dir) vs rsync of the image file onto
# the dd copy.
scenario3() {
  local dir=$S2_DIR changed
  mount "$LOOP2" "$WORK/mnt/src"
  changed=$(change_fs "$WORK/mnt/src" "$CHANGE_PCT")
  log "${SCN[3]}: changed $(human "$changed") in place"
  meta_set s3_changed_bytes "$changed"
  SRC_DIGEST=$(tree_digest "$WORK/mnt/src")
  umount "$WORK/mnt/src"
  blockdev --flushbufs "$LOOP2"
  sync
  local why
  if why=$(sync_blocked 2 "the full copy of scenario 2"); then
    skip 3 "$OURS_TOOL --sync" "$why"
  else
    bench 3 "$OURS_TOOL --sync" run_ours 3 "$LOOP2" "$dir/src.img" "$dir/ours.img" "$S2_BYTES" "$dir/state" --sync
  fi
  if ran_ok 2 "dd|ssh"; then
    bench 3 rsync run_rsync 3 "$LOOP2" "$dir/src.img" "$dir/dd.img" "$S2_BYTES"
  else
    skip 3 rsync "no target: dd|ssh of scenario 2 failed"
  fi
  losetup -d "$LOOP2"
  rm -rf "$dir"
}

# ------------------------------------------------------------------------------------------
meta_set date "$(date -Iseconds)"
meta_set mode "$( ((QUICK)) && echo quick || echo full)"
meta_set s1_bytes "$S1_BYTES"
meta_set s2_bytes "$S2_BYTES"
meta_set s2_fill_bytes "$FILL_BYTES"
meta_set change_pct "$CHANGE_PCT"
meta_set runs "$RUNS"
meta_set kernel "$(uname -r)"
meta_set cpu "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
meta_set cpus "$(nproc)"
meta_set mem_bytes "$(awk '/^MemTotal/ {printf "%.0f\n", $2 * 1024}' /proc/meminfo)"
meta_set commit "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo -dirty)"
meta_set ssh_cipher aes128-gcm@openssh.com
meta_set ours_available "$( ((OURS)) && echo true || echo false)"
meta_set ours_note "${OURS_WHY:-$BIN}"

scenario1
scenario2
scenario3

RESULTS_DIR=${RESULTS_DIR:-$REPO/bench/results}
mkdir -p "$RESULTS_DIR"
results_report "$RESULTS_DIR/block-$(date +%Y%m%d-%H%M%S).json" \
  "${SCN[1]}=$DDLOCAL;${SCN[2]}=dd|ssh;${SCN[3]}=rsync" \
  "${SCN[1]}=$OURS_TOOL/$DDLOCAL/2.0;${SCN[1]}=$OURS_TOOL/socat/1.15;${SCN[1]}=$OURS_TOOL/dd|ssh;${SCN[2]}=$OURS_TOOL/dd|ssh;${SCN[2]}=$OURS_TOOL/partclone|ssh;${SCN[3]}=$OURS_TOOL --sync/rsync"
((OURS)) || warn "sms-agent was NOT measured: $OURS_WHY (baselines only)"
if ((BUILD_FAILED)) || grep -q $'\tFAILED\t' "$WORK/results.tsv"; then
  exit 1
fi
