#!/usr/bin/env bash
# File-level migration benchmark (issue 5): `sms-agent migrate --mode file` → `sms-agent receive`
# (mutual TLS over loopback) against the tools an operator would use instead, over ssh
# (aes128-gcm@openssh.com, a private sshd on 127.0.0.1), all in one run on one dataset:
# FILES files of 1-64 KiB (half random, half log-like text) in 500 directories, plus four
# 256 MiB random files.
#   1. full copy into an empty directory:  ours vs `tar c | ssh 'tar x'` vs `rsync -a` over ssh
#   2. sync after 1 % of the small files were rewritten and 1 % deleted:
#      ours (`migrate --sync`, a fresh receiver) vs `rsync -a --delete` over ssh, each into its
#      own destination of scenario 1
#   3. the same after new changes, ours driven by the change journal: a `migrate --sync
#      --watch` started before a first, unmeasured pass onto our destination holds the
#      journal; after the changes a SIGUSR1 runs the measured sync, which visits only what the
#      journal names. vs `rsync -a --delete` over ssh, on the same changes.
# The source is an ext4 filesystem of its own (a sparse image on a loop device, mounted):
# the journal marks whole filesystems, and one of its own keeps the machine's other activity
# out of it. Its lost+found is left out of every comparison.
# Every run starts with a cold page cache and ends when the target is flushed (`sync -f`); CPU
# seconds (user+sys, both sides; the far side of ssh is everything the private sshd reaped,
# sshd's crypto included) and peak RSS are recorded. Every destination is verified before its
# figure counts: `rsync -a --delete --dry-run --itemize-changes` must list nothing (names,
# types, sizes, mtimes, modes, owners; nanoseconds for ours and rsync, seconds for tar, whose
# default format keeps no more) and `diff -rq` must find no content difference.
# Goals: full copy ours / rsync <= 0.5, sync ours / rsync <= 0.5, journal sync ours / rsync <= 0.2.
#
# Usage: sudo bench/file.sh [FILES]   (default 100000)
#   With 100,000 files the dataset is about 4.3 GB, and up to four copies of it exist at once
#   (source, three destinations): 5 × the dataset must be free where WORK goes.
# Environment (all optional):
#   BIG_MIB              size of each of the four large files (default 256)
#   RUNS                 runs of each copy in scenario 1 and rounds of scenario 2 (default 1;
#                        the median counts; the order rotates each round; each round of
#                        scenario 2 changes and deletes files anew, and both tools sync that)
#   CHANGE_PCT, DELETE_PCT   share of the small files rewritten / deleted (default 1 and 1)
#   BENCH_TMPDIR         where the trees go (default $TMPDIR or /tmp)
#   RESULTS_DIR          where the JSON goes (default bench/results)
#   NO_BUILD=1           skip `cargo build --release -p sms-agent`
#   SMS_AGENT_BIN        use this sms-agent binary (implies NO_BUILD)
#   RECEIVE_ARGS, MIGRATE_ARGS   extra arguments for our commands (word-split)
# Output: a table on stdout and bench/results/file-DATE.json. Exit status 1 when a run failed or
# the build failed; when sms-agent has no receive/migrate yet, only the baselines are measured
# (said so loudly) and the exit status is 0.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
# shellcheck source=bench/lib.sh
. bench/lib.sh

FILES=100000
for arg in "$@"; do
  case $arg in
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *[!0-9]* | '') die "unknown argument: $arg (usage: $0 [FILES])" ;;
    *) FILES=$arg ;;
  esac
done
((FILES >= 100)) || die "FILES must be at least 100"
BIG_MIB=${BIG_MIB:-256}
RUNS=${RUNS:-1}
CHANGE_PCT=${CHANGE_PCT:-1}
DELETE_PCT=${DELETE_PCT:-1}
BIG_BYTES=$((BIG_MIB * 1048576))
human() { awk -v b="$1" 'BEGIN {if (b >= 1073741824) printf "%.4gGiB\n", b / 1073741824; else printf "%.4gMiB\n", b / 1048576}'; }
# Scenario labels, as the table shows them; the index is what the code uses.
SCN=("" "1:copy-${FILES}files+4x${BIG_MIB}MiB" "2:sync-${CHANGE_PCT}%changed-${DELETE_PCT}%deleted"
  "3:journal-sync-${CHANGE_PCT}%changed-${DELETE_PCT}%deleted")
OURS_TOOL=sms-agent
WATCH_TOOL="sms-agent --watch (journal)"
TAR_TOOL="tar|ssh"
RSYNC_TOOL="rsync -a"
RSYNC_SYNC_TOOL="rsync -a --delete"

need_root
ensure_tools /usr/sbin/sshd=openssh-server ssh=openssh-client ssh-keygen=openssh-client \
  rsync=rsync tar=tar /usr/bin/time=time openssl=openssl python3=python3 diff=diffutils \
  ss=iproute2 pgrep=procps mkfs.ext4=e2fsprogs losetup=mount

WORK=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/sms-file-bench.XXXXXX")
SSHD_PID=
SRC_LOOP=
cleanup() {
  set +e
  umount "$WORK/view/src" "$WORK/view/dst" 2>/dev/null
  bg_kill_all
  [[ -n $SSHD_PID ]] && kill_tree "$SSHD_PID"
  wait 2>/dev/null
  if [[ -n $SRC_LOOP ]]; then
    umount "$SRC" 2>/dev/null
    losetup -d "$SRC_LOOP"
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$WORK/run" "$WORK/ok"
SRC=$WORK/src

# --- space: the small files average 32.5 KiB; the source and three destinations exist at once
# (plus directories and the receiver's partial files). Ask for 5 × the dataset, and the inodes.
DATA_EST=$((FILES * 33280 + 4 * BIG_BYTES))
AVAIL=$(df -B1 --output=avail "$WORK" | tail -n 1)
if ((AVAIL < 5 * DATA_EST)); then
  die "$(dirname "$WORK") has $(human "$AVAIL") free; the run needs 5 × $(human "$DATA_EST") = $(human $((5 * DATA_EST))) (fewer FILES, smaller BIG_MIB or BENCH_TMPDIR elsewhere)"
fi
IFREE=$(df --output=iavail "$WORK" | tail -n 1)
if [[ $IFREE =~ ^[0-9]+$ ]] && ((IFREE < 5 * (FILES + 1000))); then
  die "$(dirname "$WORK") has $IFREE free inodes; the run needs $((5 * (FILES + 1000)))"
fi

# --- the source filesystem: ext4 on a sparse image, room for the dataset and a quarter more.
truncate -s $((DATA_EST * 5 / 4 + (1 << 30))) "$WORK/src.img"
mkfs.ext4 -q -F -m 0 -N $((FILES * 2 + 100000)) "$WORK/src.img"
SRC_LOOP=$(losetup -f --show "$WORK/src.img")
mkdir -p "$SRC"
mount "$SRC_LOOP" "$SRC"

# --- our binary (built and checked by lib.sh) and the private sshd.
prepare_ours --source-root --root "has no file mode in 'migrate'/'receive' yet" 2

# ------------------------------------------------------------------------------------------
# Helpers for the runs


# gen_tree DIR FILES: FILES files of 1-64 KiB in 500 directories (d00/s00 .. d19/s24), every
# other one random, the others slices of a log-like text (compressible, as real small files
# often are), in one process; prints the bytes written.
gen_tree() {
  python3 - "$1" "$2" <<'EOP'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(42)
corpus = "".join(
    f"2024-05-{1 + j % 28:02} {j % 24:02}:{j % 60:02}:{j * 7 % 60:02} INFO worker-{j % 16} "
    f"GET /api/v1/items/{rng.randrange(10**6)} status={rng.choice((200, 200, 200, 304, 404, 500))} "
    f"bytes={rng.randrange(100000)} ms={rng.randrange(900)}\n" for j in range(60000)).encode()
total = 0
for i in range(n):
    k = i % 500
    d = f"{root}/d{k // 25:02}/s{k % 25:02}"
    if i < 500:
        os.makedirs(d, exist_ok=True)
    size = rng.randint(1024, 65536)
    if i % 2:
        data = os.urandom(size)
    else:
        o = rng.randrange(len(corpus) - size)
        data = corpus[o:o + size]
    with open(f"{d}/f{i:06}", "wb") as f:
        f.write(data)
    total += size
print(total)
EOP
}

# change_tree DIR CHANGE_PCT DELETE_PCT [ROUND]: rewrite CHANGE_PCT % of the small files with new
# contents of a new size (so a new mtime too) and delete another DELETE_PCT %; prints
# "CHANGED CHANGED_BYTES DELETED".
change_tree() {
  python3 - "$1" "$2" "$3" "${4:-0}" <<'EOP'
import os, random, sys
root, cpct, dpct = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
rng = random.Random(7 + int(sys.argv[4]))
small = []
for dirpath, dirs, names in os.walk(root):
    dirs.sort()
    if os.path.relpath(dirpath, root).startswith("big"):
        continue
    small += [os.path.join(dirpath, x) for x in sorted(names)]
nc, nd = max(1, int(len(small) * cpct / 100)), max(1, int(len(small) * dpct / 100))
picked = rng.sample(small, nc + nd)
changed = 0
for p in picked[:nc]:
    size = rng.randint(1024, 65536)
    with open(p, "wb") as f:
        f.write(os.urandom(size))
    changed += size
for p in picked[nc:]:
    os.unlink(p)
print(nc, changed, nd)
EOP
  sync -f "$1"
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

# verify DST RUNDIR [MODIFY_WINDOW]: DST equals SRC. rsync's dry run lists every difference of
# names, types, sizes, mtimes, modes and owners (and anything extra on the target, such as a
# receiver's partial file); MODIFY_WINDOW -1 compares mtimes to the nanosecond, 0 to the second.
# diff -rq compares all contents, reading both trees through read-only noatime bind mounts: a
# plain read would move the atime of every file of both (relatime), and the next sync round
# would then find every file's atime changed, not the 1 % of files the scenario changes.
verify() {
  local dst=$1 d=$2 window=${3:--1} rc=0
  rsync -a --delete --dry-run --itemize-changes --modify-window="$window" --exclude=/lost+found "$SRC/" "$dst/" \
    >"$d/verify-meta.log" 2>&1 || fail "verify: rsync --dry-run failed: $(log_tail "$d/verify-meta.log")"
  [[ ! -s $d/verify-meta.log ]] \
    || fail "target differs from the source ($(wc -l <"$d/verify-meta.log") entries, rsync -ani): $(head -n 3 "$d/verify-meta.log" | tr '\n' ' ')"
  noatime_view "$SRC" "$WORK/view/src" || fail "verify: cannot bind-mount $SRC read-only, noatime"
  noatime_view "$dst" "$WORK/view/dst" || {
    umount "$WORK/view/src"
    fail "verify: cannot bind-mount $dst read-only, noatime"
  }
  diff -rq --no-dereference -x lost+found "$WORK/view/src" "$WORK/view/dst" >"$d/verify-data.log" 2>&1 || rc=$?
  umount "$WORK/view/src" "$WORK/view/dst"
  ((rc == 0)) || fail "target contents differ from the source (diff -rq): $(head -n 3 "$d/verify-data.log" | tr '\n' ' ')"
}

# noatime_view DIR VIEW: DIR mounted read-only at VIEW, where reads leave atimes alone.
noatime_view() {
  mkdir -p "$2"
  mount --bind "$1" "$2" || return 1
  mount -o remount,bind,ro,noatime "$2" || {
    umount "$2"
    return 1
  }
}

# bench IDX TOOL FUNC ARGS...: one run in a subshell; a failure becomes a FAILED row (with the
# reason), whatever it left running is killed, and the benchmark goes on.
bench() {
  local idx=$1 tool=$2
  shift 2
  local mark=$WORK/ok/$idx-${tool//[| ]/_} # exists when the tool's last run here succeeded
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
}
ran_ok() { [[ -e $WORK/ok/$1-${2//[| ]/_} ]]; }
skip() { result_add "${SCN[$1]}" "$2" SKIPPED "" "" "" "" "" "" "$3"; }

# fresh_dir DIR: DIR new and empty (the removal of an older copy happens before the clock).
fresh_dir() {
  rm -rf "$1"
  mkdir -p "$1"
}

secs() { awk -v a="$1" -v b="$2" 'BEGIN {print b - a}'; }
cpu_diff() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f\n", b - a}'; }

# stamp: each line of stdin prefixed with the wall clock, so a run's passes can be timed.
stamp() {
  local line
  while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done
}

# Each run_* measures one copy (IDX DST): the clock runs from the first byte read (cold page
# cache) to the target flushed; then the copy is verified and the row added.

# tar c | ssh tar x, into an empty DST. tar's default (GNU) format keeps whole seconds only.
run_tar() {
  local idx=$1 dst=$2 d c0 c1 t0 t1
  d=$(rundir tar)
  fresh_dir "$dst"
  drop_caches
  c0=$(sshd_children_cpu)
  t0=$(now)
  timed "$d/tar.time" tar -C "$SRC" -cf - . 2>"$d/tar.log" \
    | timed "$d/ssh.time" "${SSH[@]}" "$(remote_cmd /usr/bin/time -f "$TIME_FMT" -o "$d/recv.time" tar -C "$dst" -xf -)" \
      2>"$d/ssh.log" || fail "tar | ssh tar: $(log_tail "$d/tar.log") $(log_tail "$d/ssh.log")"
  sync -f "$dst"
  t1=$(now)
  c1=$(sshd_children_cpu)
  verify "$dst" "$d" 0
  result_add "${SCN[idx]}" "$TAR_TOOL" ok "$(secs "$t0" "$t1")" "$DATA_BYTES" \
    "$(time_cpu "$d/tar.time" "$d/ssh.time")" "$(cpu_diff "$c0" "$c1")" \
    "$(time_rss "$d/tar.time" "$d/ssh.time")" "$(time_rss "$d/recv.time")" "recv RSS: remote tar only"
}

# rsync -a over ssh (FLAGS... e.g. --delete) into DST, which the caller prepared.
run_rsync() {
  local idx=$1 dst=$2 tool=$3 d c0 c1 t0 t1
  shift 3
  d=$(rundir rsync)
  drop_caches
  c0=$(sshd_children_cpu)
  t0=$(now)
  timed "$d/send.time" rsync -a "$@" -e "$SSH_E" \
    --rsync-path="$(remote_cmd /usr/bin/time -f "$TIME_FMT" -o "$d/recv.time" rsync)" \
    --stats "$SRC/" "root@127.0.0.1:$dst/" >"$d/rsync.log" 2>&1 || fail "rsync: $(log_tail "$d/rsync.log")"
  sync -f "$dst"
  t1=$(now)
  c1=$(sshd_children_cpu)
  verify "$dst" "$d"
  local sent files
  sent=$(awk -F': ' '/^Total bytes sent/ {gsub(/,/, "", $2); print $2}' "$d/rsync.log")
  files=$(awk -F': ' '/^Number of regular files transferred/ {gsub(/,/, "", $2); print $2}' "$d/rsync.log")
  result_add "${SCN[idx]}" "$tool" ok "$(secs "$t0" "$t1")" "$DATA_BYTES" \
    "$(time_cpu "$d/send.time")" "$(cpu_diff "$c0" "$c1")" \
    "$(time_rss "$d/send.time")" "$(time_rss "$d/recv.time")" \
    "${files:-?} files, sent ${sent:-?} bytes; recv RSS: remote rsync only"
}
run_rsync_copy() {
  fresh_dir "$2"
  run_rsync "$1" "$2" "$RSYNC_TOOL"
}

# Ours: receive (in the background) and migrate --mode file, each under GNU time.
# run_ours IDX DST STATE_DIR [MIGRATE_FLAGS...]; DST must exist. The receiver runs with --once
# (it ends after the session): a copy and a sync (--sync: changed files sent, vanished ones
# deleted) are one session each. The time of the pass (from the line migrate prints) goes into
# the note.
run_ours() {
  local idx=$1 dst=$2 state=$3 d port rpid t0 t1 rrc=0 once=0
  shift 3
  d=$(rundir ours)
  mkdir -p "$state"
  port=$(free_port)
  local recv=("$BIN" receive --listen "127.0.0.1:$port" --ca "$CERTS/ca.pem" --cert "$CERTS/target.pem"
    --key "$CERTS/target-key.pem" --root "$dst")
  has_flag "$RECV_HELP" --once && once=1
  ((once)) && recv+=(--once)
  has_flag "$RECV_HELP" --state-dir && recv+=(--state-dir "$state")
  /usr/bin/time -f "$TIME_FMT" -o "$d/recv.time" "${recv[@]}" "${RECEIVE_EXTRA[@]}" >"$d/receive.log" 2>&1 &
  rpid=$!
  bg_register "$rpid"
  wait_port "$port" "$rpid" || fail "receive did not listen: $(log_tail "$d/receive.log")"
  drop_caches
  t0=$(now)
  timed "$d/send.time" "$BIN" migrate --mode file --target "127.0.0.1:$port" --ca "$CERTS/ca.pem" \
    --cert "$CERTS/source.pem" --key "$CERTS/source-key.pem" --source-root "$SRC" "$@" "${MIGRATE_EXTRA[@]}" \
    2>&1 | stamp >"$d/migrate.log" || fail "migrate: $(log_tail "$d/migrate.log")"
  sync -f "$dst"
  t1=$(now)
  if ((once)); then
    wait_exit "$rpid" 60 || rrc=$?
    ((rrc == 0)) || fail "receive --once exited with status $rrc: $(log_tail "$d/receive.log")"
  else
    stop_timed "$rpid"
  fi
  verify "$dst" "$d"
  # "T copy complete: E entries, F files, S skipped, B bytes sent, D deleted, ..." per pass.
  local note
  note=$(awk -v t0="$t0" '$2 ~ /^(copy|sync)$/ && $3 == "complete:" {
      printf "%s%s %.1f s: %s files, %s skipped, %s B sent, %s deleted", sep, $2, $1 - t0, $6, $8, $10, $13
      t0 = $1; sep = "; " }' "$d/migrate.log")
  result_add "${SCN[idx]}" "$OURS_TOOL${*:+ $*}" ok "$(secs "$t0" "$t1")" "$DATA_BYTES" \
    "$(time_cpu "$d/send.time")" "$(time_cpu "$d/recv.time")" "$(time_rss "$d/send.time")" "$(time_rss "$d/recv.time")" \
    "$note"
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

# Scenario 1: full copies, each into a new empty directory (ours also with an empty receiver
# state). The last copies of ours and of rsync stay for scenario 2; tar's goes.
s1_run() {
  case $1 in
    "$TAR_TOOL")
      bench 1 "$TAR_TOOL" run_tar 1 "$WORK/dst-tar"
      rm -rf "$WORK/dst-tar"
      ;;
    "$RSYNC_TOOL") bench 1 "$RSYNC_TOOL" run_rsync_copy 1 "$WORK/dst-rsync" ;;
    "$OURS_TOOL")
      fresh_dir "$WORK/dst-ours"
      rm -rf "$WORK/state"
      bench 1 "$OURS_TOOL" run_ours 1 "$WORK/dst-ours" "$WORK/state"
      ;;
  esac
}
scenario1() {
  log "${SCN[1]}: writing $FILES files of 1-64 KiB and 4 × $(human "$BIG_BYTES")"
  local t0 small i
  t0=$(now)
  mkdir -p "$SRC/big"
  small=$(gen_tree "$SRC" "$FILES")
  for i in 0 1 2 3; do rand_file "$SRC/big/big$i.img" "$BIG_BYTES"; done
  sync -f "$SRC"
  DATA_BYTES=$((small + 4 * BIG_BYTES))
  log "${SCN[1]}: dataset of $(human "$DATA_BYTES") written in $(secs "$t0" "$(now)") s"
  meta_set files "$((FILES + 4))"
  meta_set dirs "$(find "$SRC" -type d | wc -l)"
  meta_set data_bytes "$DATA_BYTES"
  meta_set small_bytes "$small"
  meta_set big_bytes_each "$BIG_BYTES"
  meta_set src_used_bytes "$(du -sB1 "$SRC" | cut -f1)"
  if ((OURS)); then
    rounds s1_run "$TAR_TOOL" "$RSYNC_TOOL" "$OURS_TOOL"
  else
    rounds s1_run "$TAR_TOOL" "$RSYNC_TOOL"
    skip 1 "$OURS_TOOL" "$OURS_WHY"
  fi
}

# Scenario 2: change and delete small files of the source, then bring the destinations of
# scenario 1 up to date: ours (migrate --sync, a fresh receiver, the same state dir) and rsync -a
# --delete. RUNS rounds, each with changes of its own that both tools sync (the order rotated).
s2_run() {
  case $1 in
    "$OURS_TOOL")
      local why
      if why=$(sync_blocked 1 "the last full copy of scenario 1"); then
        skip 2 "$OURS_TOOL --sync" "$why"
      else
        bench 2 "$OURS_TOOL --sync" run_ours 2 "$WORK/dst-ours" "$WORK/state" --sync
      fi
      ;;
    "$RSYNC_SYNC_TOOL")
      if ran_ok 1 "$RSYNC_TOOL"; then
        bench 2 "$RSYNC_SYNC_TOOL" run_rsync 2 "$WORK/dst-rsync" "$RSYNC_SYNC_TOOL" --delete
      else
        skip 2 "$RSYNC_SYNC_TOOL" "no target: the last rsync -a of scenario 1 failed"
      fi
      ;;
  esac
}
scenario2() {
  local out changed changed_bytes deleted r k tools=("$OURS_TOOL" "$RSYNC_SYNC_TOOL")
  for ((r = 0; r < RUNS; r++)); do
    out=$(change_tree "$SRC" "$CHANGE_PCT" "$DELETE_PCT" "$r")
    read -r changed changed_bytes deleted <<<"$out"
    log "${SCN[2]}: round $((r + 1)): rewrote $changed files ($(human "$changed_bytes")), deleted $deleted"
    meta_set s2_changed_files "$changed"
    meta_set s2_changed_bytes "$changed_bytes"
    meta_set s2_deleted_files "$deleted"
    for k in 0 1; do s2_run "${tools[(k + r) % 2]}"; done
  done
}

# Scenario 3: ours holds the change journal (`migrate --sync --watch`, with a receiver serving
# every session); its first pass over the unchanged destination is not measured. Then the
# tree changes anew and both tools sync it: ours at SIGUSR1, rsync -a --delete as in
# scenario 2. The watch process and its receiver live through all rounds.
WATCH_PID='' WATCH_RX='' WATCH_DIR=''
# proc_cpu PID: user+sys seconds the process has used so far; proc_rss PID: its peak RSS, KiB.
proc_cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f\n", ($14 + $15) / hz}' "/proc/$1/stat" 2>/dev/null || echo 0; }
proc_rss() { awk '/^VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null; }
watch_start() {
  local port i
  WATCH_DIR=$(mktemp -d "$WORK/run/watch.XXXX")
  port=$(free_port)
  "$BIN" receive --listen "127.0.0.1:$port" --ca "$CERTS/ca.pem" --cert "$CERTS/target.pem" \
    --key "$CERTS/target-key.pem" --root "$WORK/dst-ours" --state-dir "$WORK/state" \
    "${RECEIVE_EXTRA[@]}" >"$WATCH_DIR/receive.log" 2>&1 &
  WATCH_RX=$!
  bg_register "$WATCH_RX"
  wait_port "$port" "$WATCH_RX" || return 1
  "$BIN" migrate --mode file --target "127.0.0.1:$port" --ca "$CERTS/ca.pem" \
    --cert "$CERTS/source.pem" --key "$CERTS/source-key.pem" --source-root "$SRC" --sync --watch \
    "${MIGRATE_EXTRA[@]}" > >(stamp >"$WATCH_DIR/migrate.log") 2>&1 &
  WATCH_PID=$!
  bg_register "$WATCH_PID"
  for ((i = 0; i < 36000; i++)); do
    grep -q 'watching' "$WATCH_DIR/migrate.log" 2>/dev/null && return 0
    kill -0 "$WATCH_PID" 2>/dev/null || break
    sleep 0.1
  done
  warn "migrate --watch did not finish its first pass: $(log_tail "$WATCH_DIR/migrate.log")"
  return 1
}
# completed_syncs: the "sync complete" lines migrate --watch has printed so far.
completed_syncs() { grep -c 'sync complete:' "$WATCH_DIR/migrate.log" || true; }
run_watch() {
  local idx=$1 dst=$2 d=$WATCH_DIR t0 t1 n c0 c1 r0 r1 i how done_line
  echo "$d" >"$WORK/rundir"
  n=$(completed_syncs)
  drop_caches
  c0=$(proc_cpu "$WATCH_PID")
  r0=$(proc_cpu "$WATCH_RX")
  t0=$(now)
  kill -USR1 "$WATCH_PID"
  for ((i = 0; ; i++)); do
    (($(completed_syncs) > n)) && break
    kill -0 "$WATCH_PID" 2>/dev/null || fail "migrate --watch ended: $(log_tail "$d/migrate.log")"
    ((i < 360000)) || fail "no sync pass after an hour"
    sleep 0.01
  done
  sync -f "$dst"
  t1=$(now)
  c1=$(proc_cpu "$WATCH_PID")
  r1=$(proc_cpu "$WATCH_RX")
  verify "$dst" "$d"
  how=$(grep -E 'sync: (the journal names|walking everything)' "$d/migrate.log" | tail -n 1 | cut -d' ' -f2-)
  done_line=$(grep 'sync complete:' "$d/migrate.log" | tail -n 1 | cut -d' ' -f2-)
  result_add "${SCN[idx]}" "$WATCH_TOOL" ok "$(secs "$t0" "$t1")" "$DATA_BYTES" \
    "$(cpu_diff "$c0" "$c1")" "$(cpu_diff "$r0" "$r1")" "$(proc_rss "$WATCH_PID")" "$(proc_rss "$WATCH_RX")" \
    "$how; $done_line"
}
s3_run() {
  case $1 in
    "$WATCH_TOOL") bench 3 "$WATCH_TOOL" run_watch 3 "$WORK/dst-ours" ;;
    "$RSYNC_SYNC_TOOL")
      if ran_ok 1 "$RSYNC_TOOL"; then
        bench 3 "$RSYNC_SYNC_TOOL" run_rsync 3 "$WORK/dst-rsync" "$RSYNC_SYNC_TOOL" --delete
      else
        skip 3 "$RSYNC_SYNC_TOOL" "no target: the last rsync -a of scenario 1 failed"
      fi
      ;;
  esac
}
scenario3() {
  local out changed changed_bytes deleted r k why tools=("$WATCH_TOOL" "$RSYNC_SYNC_TOOL")
  if why=$(sync_blocked 1 "the last full copy of scenario 1"); then
    skip 3 "$WATCH_TOOL" "$why"
    tools=("$RSYNC_SYNC_TOOL")
  elif ! has_flag "$MIGR_HELP" --watch; then
    skip 3 "$WATCH_TOOL" "migrate has no --watch"
    tools=("$RSYNC_SYNC_TOOL")
  else
    log "${SCN[3]}: migrate --sync --watch: journal started, first pass (not measured)"
    if ! watch_start; then
      result_add "${SCN[3]}" "$WATCH_TOOL" FAILED "" "" "" "" "" "" "migrate --watch did not start"
      tools=("$RSYNC_SYNC_TOOL")
    fi
  fi
  for ((r = 0; r < RUNS; r++)); do
    out=$(change_tree "$SRC" "$CHANGE_PCT" "$DELETE_PCT" "$((r + 100))")
    read -r changed changed_bytes deleted <<<"$out"
    log "${SCN[3]}: round $((r + 1)): rewrote $changed files ($(human "$changed_bytes")), deleted $deleted"
    meta_set s3_changed_files "$changed"
    meta_set s3_deleted_files "$deleted"
    for ((k = 0; k < ${#tools[@]}; k++)); do s3_run "${tools[(k + r) % ${#tools[@]}]}"; done
  done
  if [[ -n $WATCH_PID ]]; then
    kill -TERM "$WATCH_PID" 2>/dev/null || true
    wait "$WATCH_PID" 2>/dev/null || true
    kill_tree "$WATCH_RX"
  fi
}

# ------------------------------------------------------------------------------------------
meta_set date "$(date -Iseconds)"
meta_set change_pct "$CHANGE_PCT"
meta_set delete_pct "$DELETE_PCT"
meta_set runs "$RUNS"
meta_set kernel "$(uname -r)"
meta_set cpu "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
meta_set cpus "$(nproc)"
meta_set mem_bytes "$(awk '/^MemTotal/ {printf "%.0f\n", $2 * 1024}' /proc/meminfo)"
meta_set fs "$(df --output=fstype "$WORK" | tail -n 1)"
meta_set commit "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo -dirty)"
meta_set ssh_cipher aes128-gcm@openssh.com
meta_set ours_available "$( ((OURS)) && echo true || echo false)"
meta_set ours_note "${OURS_WHY:-$BIN}"

DATA_BYTES=0
scenario1
scenario2
scenario3

RESULTS_DIR=${RESULTS_DIR:-$REPO/bench/results}
mkdir -p "$RESULTS_DIR"
results_report "$RESULTS_DIR/file-$(date +%Y%m%d-%H%M%S).json" \
  "${SCN[1]}=$RSYNC_TOOL;${SCN[2]}=$RSYNC_SYNC_TOOL;${SCN[3]}=$RSYNC_SYNC_TOOL" \
  "${SCN[1]}=$OURS_TOOL/$TAR_TOOL;${SCN[1]}=$OURS_TOOL/$RSYNC_TOOL/0.5;${SCN[2]}=$OURS_TOOL --sync/$RSYNC_SYNC_TOOL/0.5;${SCN[3]}=$WATCH_TOOL/$RSYNC_SYNC_TOOL/0.2"
echo "(MB/s here: the source's $(human "$DATA_BYTES") of file data / seconds, in both scenarios.)"
((OURS)) || warn "sms-agent was NOT measured: $OURS_WHY (baselines only)"
if ((BUILD_FAILED)) || grep -q $'\tFAILED\t' "$WORK/results.tsv"; then
  exit 1
fi
