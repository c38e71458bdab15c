# shellcheck shell=bash
# Shared helpers for the bench/ scripts. Source it (`. "$(dirname "$0")/lib.sh"`); it defines
# functions and a few variables only and runs nothing by itself.
#
#   log/warn/die            messages on stderr
#   need_root               abort unless uid 0
#   ensure_tools CMD=PKG..  install missing tools with apt-get (one `apt-get update` at most)
#   now                     monotonic-enough wall clock in seconds with ns (date +%s.%N)
#   drop_caches             flush dirty data and drop the page cache, so the next run is cold
#   free_port               a random TCP port nobody listens on
#   wait_port PORT [PID]    wait until something listens on 127.0.0.1:PORT (and PID still lives)
#   bg_register/kill_tree/bg_kill_all/stop_timed/wait_exit   background processes
#   try FUNC ARGS..         run FUNC in a subshell under `set -e`; its status lands in TRY_RC
#   timed FILE CMD..        GNU time: "user sys maxrss_kib" of CMD in FILE
#   time_cpu/time_rss FILE  read such a file (seconds of user+sys, KiB)
#   start_sshd DIR          private sshd on 127.0.0.1 (sets SSH, SSH_E, SSHD_PID, SSH_PORT)
#   sshd_children_cpu       CPU seconds of everything sshd ran and reaped so far
#   remote_cmd CMD..        CMD quoted for the remote shell
#   result_add/meta_set/results_report   collect rows, print the table, write JSON
#
# Variables the caller sets before use: WORK (private temp dir; bg pids and results live there).

# Format GNU time writes with `timed`: user CPU s, system CPU s, peak RSS KiB.
TIME_FMT='%U %S %M'

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
warn() { printf '%s WARNING: %s\n' "$(date +%T)" "$*" >&2; }
die() {
  printf '%s ERROR: %s\n' "$(date +%T)" "$*" >&2
  exit 1
}

need_root() {
  [[ $(id -u) -eq 0 ]] || die "run as root (sudo $0): needs loop devices, mount, drop_caches and sshd"
}

# ensure_tools CMD=PACKAGE...: install the packages of the commands not found (CMD may be an
# absolute path). apt-get update runs once, and only when something is missing.
ensure_tools() {
  local spec cmd pkg missing=()
  for spec in "$@"; do
    cmd=${spec%%=*}
    pkg=${spec#*=}
    if [[ $cmd == /* ]]; then [[ -x $cmd ]] && continue; else command -v "$cmd" >/dev/null && continue; fi
    [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

now() { date +%s.%N; }

drop_caches() {
  sync
  echo 3 >/proc/sys/vm/drop_caches
}

# A random unprivileged port with no listener on it (a race with other programs is possible
# but unlikely; the caller fails clearly if the bind fails).
free_port() {
  local p
  for _ in $(seq 100); do
    p=$((20000 + RANDOM % 40000))
    if [[ -z $(ss -Htln "sport = :$p") ]]; then
      echo "$p"
      return 0
    fi
  done
  die "no free TCP port found"
}

# wait_port PORT [PID [TIMEOUT_S]]: until a listener on PORT exists; fails when PID died first.
wait_port() {
  local port=$1 pid=${2:-} timeout=${3:-30} i
  for ((i = 0; i < timeout * 20; i++)); do
    [[ -n $(ss -Htln "sport = :$port") ]] && return 0
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
      warn "process $pid exited before listening on port $port"
      return 1
    fi
    sleep 0.05
  done
  warn "nothing listens on port $port after ${timeout}s"
  return 1
}

# Background processes are recorded in a file so that functions running in subshells (`try`)
# can register them and the EXIT trap of the main shell still finds them.
bg_register() { echo "$1" >>"$WORK/bg.pids"; }

# kill_tree PID: PID and its descendants (GNU time does not pass SIGTERM on to its child).
kill_tree() {
  local pid=$1 child
  for child in $(pgrep -P "$pid" 2>/dev/null); do kill_tree "$child"; done
  kill "$pid" 2>/dev/null || true
}

bg_kill_all() {
  local pid
  [[ -f $WORK/bg.pids ]] || return 0
  while read -r pid; do kill_tree "$pid"; done <"$WORK/bg.pids"
  : >"$WORK/bg.pids"
}

# stop_timed PID: stop what the background `/usr/bin/time` PID runs and wait until time has
# written its figures (killing time itself would lose them).
stop_timed() {
  local child
  for child in $(pgrep -P "$1"); do kill_tree "$child"; done
  wait "$1" 2>/dev/null || true
}

# wait_exit PID TIMEOUT_S: wait for a background child of this shell; kill it after TIMEOUT_S.
# Returns the child's status (or 124 when it had to be killed).
wait_exit() {
  local pid=$1 timeout=$2 i
  for ((i = 0; i < timeout * 20; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill_tree "$pid"
    wait "$pid" 2>/dev/null || true
    return 124
  fi
  wait "$pid"
}

# try FUNC ARGS...: runs FUNC in a subshell with `set -e` in effect (it would be ignored if the
# call stood in an `if` or `||`), so any failing command ends just that run. Status in TRY_RC.
TRY_RC=0
try() {
  set +e
  (
    set -e
    "$@"
  )
  # shellcheck disable=SC2034 # read by the caller
  TRY_RC=$?
  set -e
}

# timed FILE CMD...: runs CMD under GNU time, which writes "user sys maxrss_kib" to FILE.
timed() {
  local out=$1
  shift
  /usr/bin/time -f "$TIME_FMT" -o "$out" "$@"
}

# time_cpu FILE... → user+sys seconds summed over the files; time_rss FILE... → largest peak RSS
# in KiB. GNU time puts "Command exited with non-zero status N" before the figures; the last
# line is the one. Missing files count as nothing (prints "" when none could be read).
time_cpu() {
  local f
  for f in "$@"; do [[ -s $f ]] && tail -n 1 "$f"; done | awk 'NF == 3 {s += $1 + $2; n++} END {if (n) printf "%.2f\n", s}'
}
time_rss() {
  local f
  for f in "$@"; do [[ -s $f ]] && tail -n 1 "$f"; done | awk 'NF == 3 {if ($3 > m) m = $3; n++} END {if (n) print m}'
}

# start_sshd DIR: a private sshd on 127.0.0.1 with its own host key, root's authorized key and
# config in DIR; the caller's EXIT trap must kill it (kill_tree "$SSHD_PID"). Sets:
#   SSHD_PID   the listener (it reaps every session, so its children's CPU counts the far side)
#   SSH_PORT, SSH_KEY
#   SSH        array: ssh command with all options and root@127.0.0.1, append the remote command
#   SSH_E      the same as one string without the host, for `rsync -e`
start_sshd() {
  local dir=$1
  mkdir -p "$dir"
  ssh-keygen -q -t ed25519 -N '' -f "$dir/host_key" </dev/null
  ssh-keygen -q -t ed25519 -N '' -f "$dir/id" </dev/null
  cp "$dir/id.pub" "$dir/authorized_keys"
  SSH_KEY=$dir/id
  SSH_PORT=$(free_port)
  cat >"$dir/sshd_config" <<EOF
ListenAddress 127.0.0.1
HostKey $dir/host_key
AuthorizedKeysFile $dir/authorized_keys
PidFile none
UsePAM no
PermitRootLogin yes
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
X11Forwarding no
PrintMotd no
UseDNS no
MaxStartups 100
EOF
  mkdir -p /run/sshd # privilege separation directory; the sshd service would make it
  /usr/sbin/sshd -D -e -f "$dir/sshd_config" -o "Port=$SSH_PORT" 2>"$dir/sshd.log" &
  SSHD_PID=$! # not in bg.pids: it outlives the runs; the caller's cleanup kills it
  wait_port "$SSH_PORT" "$SSHD_PID" || die "sshd did not start: $(tail -n 5 "$dir/sshd.log")"
  local opts=(-c aes128-gcm@openssh.com -o Compression=no -o StrictHostKeyChecking=no
    -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes -p "$SSH_PORT" -i "$SSH_KEY")
  SSH=(ssh "${opts[@]}" root@127.0.0.1)
  # shellcheck disable=SC2034 # used by the caller
  SSH_E="ssh ${opts[*]}"
  "${SSH[@]}" true || die "cannot log in to the private sshd: $(tail -n 5 "$dir/sshd.log")"
}

# CPU seconds (user+sys) of all the processes the sshd listener has reaped: session processes
# reap the remote commands and the listener reaps the sessions, so the difference of two calls
# around a run is the whole far side of that run (sshd crypto included). Waits for the sessions
# to end first.
sshd_children_cpu() {
  local i
  for ((i = 0; i < 200; i++)); do
    [[ -z $(pgrep -P "$SSHD_PID") ]] && break
    sleep 0.05
  done
  # Fields after the "(comm)": 14 and 15 are cutime and cstime (stat fields 16 and 17).
  awk -v hz="$(getconf CLK_TCK)" '{sub(/^.*\) /, ""); printf "%.2f\n", ($14 + $15) / hz}' "/proc/$SSHD_PID/stat"
}

# remote_cmd CMD...: CMD as one string the remote shell splits back into the same words.
remote_cmd() {
  local out
  printf -v out '%q ' "$@"
  echo "${out% }"
}

# Results: one tab-separated row per run in $WORK/results.tsv.
# result_add SCENARIO TOOL STATUS SECONDS BYTES CPU_SEND CPU_RECV RSS_SEND_KIB RSS_RECV_KIB NOTE
#   STATUS is ok, FAILED or SKIPPED; empty figures are unknown. BYTES is what MB/s is taken of.
#   Several runs of one tool in one scenario are summarised as one line (median, min-max).
result_add() {
  local IFS=$'\t'
  echo "$*" >>"$WORK/results.tsv"
}

# meta_set KEY VALUE: a fact for the JSON "meta" object (sizes, bytes used, ...).
meta_set() { printf '%s\t%s\n' "$1" "$2" >>"$WORK/meta.tsv"; }

# results_report JSON_PATH BASELINES RATIOS
#   BASELINES: "SCENARIO=TOOL;..." — the tool each scenario's "vs base" column divides by
#   RATIOS:    "SCENARIO=OURS/OTHER[/GOAL];..." — the ratios listed (and judged) under the table
# Prints the table on stdout and writes it all as JSON (summary per tool, every run, ratios, meta).
results_report() {
  python3 - "$WORK/results.tsv" "$WORK/meta.tsv" "$1" "$2" "$3" <<'EOP'
import json, os, statistics, sys
rows_path, meta_path, json_path, baselines, ratios = sys.argv[1:6]
cols = ["scenario", "tool", "status", "seconds", "bytes", "cpu_send_s", "cpu_recv_s",
        "rss_send_kib", "rss_recv_kib", "note"]
def num(v):
    try:
        return float(v) if any(c in v for c in ".eE") else int(v)
    except ValueError:
        return None
runs = []
if os.path.exists(rows_path):
    for line in open(rows_path):
        f = line.rstrip("\n").split("\t")
        r = dict(zip(cols, f + [""] * (len(cols) - len(f))))
        for k in cols[3:9]:
            r[k] = num(r[k])
        runs.append(r)
meta = {}
if os.path.exists(meta_path):
    for line in open(meta_path):
        k, _, v = line.rstrip("\n").partition("\t")
        meta[k] = {"true": True, "false": False}.get(v, v if num(v) is None else num(v))
med = lambda xs: None if not xs else round(statistics.median(xs), 3)
known = lambda rs, k: [r[k] for r in rs if r[k] is not None]
# One summary per (scenario, tool), in the order of first appearance.
groups = {}
for r in runs:
    groups.setdefault((r["scenario"], r["tool"]), []).append(r)
rows = []
for (scn, tool), rs in groups.items():
    ok = [r for r in rs if r["status"] == "ok" and r["seconds"]]
    bad = [r for r in rs if r["status"] == "FAILED"]
    s = {"scenario": scn, "tool": tool, "runs": len(rs), "runs_ok": len(ok),
         "status": "FAILED" if bad else "ok" if ok else "SKIPPED",
         "note": (bad or rs)[0]["note"]}
    secs = known(ok, "seconds")
    s["seconds"] = med(secs)
    s["seconds_min"], s["seconds_max"] = (min(secs), max(secs)) if secs else (None, None)
    s["bytes"] = ok[0]["bytes"] if ok else None
    for k in ("cpu_send_s", "cpu_recv_s"):
        s[k] = med(known(ok, k))
    for k in ("rss_send_kib", "rss_recv_kib"):
        s[k] = max(known(ok, k), default=None)
    good = s["status"] == "ok" and s["seconds"]
    s["mb_per_s"] = round(s["bytes"] / 1e6 / s["seconds"], 1) if good else None
    cpu = [c for c in (s["cpu_send_s"], s["cpu_recv_s"]) if c is not None]
    s["cpu_s"] = round(sum(cpu), 2) if cpu else None
    s["mb_per_cpu_s"] = round(s["bytes"] / 1e6 / s["cpu_s"], 1) if good and s["cpu_s"] else None
    gib = s["bytes"] / 2**30 if good else None
    for k in ("cpu_send_s", "cpu_recv_s"):
        s[k + "_per_gib"] = round(s[k] / gib, 2) if gib and s[k] is not None else None
    rows.append(s)
def find(scn, tool):
    for r in rows:
        if r["scenario"] == scn and r["tool"] == tool and r["mb_per_s"]:
            return r
base = dict(x.split("=", 1) for x in baselines.split(";") if x)
for r in rows:
    b = find(r["scenario"], base.get(r["scenario"], ""))
    r["baseline"] = base.get(r["scenario"])
    r["vs_baseline"] = round(r["seconds"] / b["seconds"], 3) if b and r["mb_per_s"] else None
fmt = lambda v, p="{:.2f}": "-" if v is None else p.format(v)
mib = lambda k: None if k is None else k / 1024
hdr = ["scenario", "tool", "runs", "seconds", "min-max", "MB/s", "vs base", "CPU s (send+recv)",
       "MB/CPU-s", "CPU s/GiB send/recv", "RSS MiB send/recv", "status"]
table = [hdr]
for r in rows:
    good = r["mb_per_s"] is not None
    table.append([
        r["scenario"], r["tool"], str(r["runs"]), fmt(r["seconds"] if good else None),
        fmt(r["seconds_min"]) + "-" + fmt(r["seconds_max"]) if good and r["runs_ok"] > 1 else "",
        fmt(r["mb_per_s"], "{:.1f}"), fmt(r["vs_baseline"]),
        "-" if r["cpu_s"] is None else "{:.2f} ({}+{})".format(
            r["cpu_s"], fmt(r["cpu_send_s"]), fmt(r["cpu_recv_s"])),
        fmt(r["mb_per_cpu_s"], "{:.0f}"),
        fmt(r["cpu_send_s_per_gib"]) + "/" + fmt(r["cpu_recv_s_per_gib"]),
        fmt(mib(r["rss_send_kib"]), "{:.1f}") + "/" + fmt(mib(r["rss_recv_kib"]), "{:.1f}"),
        r["status"] + (f" ({r['runs_ok']}/{r['runs']} ok)" if r["status"] == "FAILED" else "")
        + (": " + r["note"] if r["note"] else "")])
w = [max(len(t[i]) for t in table) for i in range(len(hdr) - 1)]
print()
for i, t in enumerate(table):
    print("  ".join(c.ljust(w[j]) if j < len(w) else c for j, c in enumerate(t)).rstrip())
    if i == 0:
        print("  ".join("-" * x for x in w) + "  ------")
print("\nseconds: median wall time of the runs, cold page cache, until the target is flushed.")
print("MB/s: disk size / seconds. CPU s: user+sys, median, sending + receiving side.")
print("MB/CPU-s: disk size / CPU s, i.e. MB/s per fully busy core.")
print("CPU s/GiB: CPU seconds (user+sys, median) per GiB of disk on each side.")
out_ratios = []
print("\nRatios, wall time ours / other (lower is better):")
for spec in [x for x in ratios.split(";") if x]:
    scn, _, pair = spec.partition("=")
    ours, other, *goal = pair.split("/")
    a, b = find(scn, ours), find(scn, other)
    ratio = round(a["seconds"] / b["seconds"], 3) if a and b else None
    g = float(goal[0]) if goal else None
    met = None if ratio is None or g is None else ratio <= g
    out_ratios.append({"scenario": scn, "ours": ours, "other": other, "ratio": ratio, "goal": g, "met": met})
    verdict = ""
    if g is not None:
        verdict = f"  (goal <= {g:g}" + ("" if met is None else ": met" if met else ": NOT met") + ")"
    print(f"  {scn}: {ours} / {other} = {fmt(ratio, '{:.3f}')}{verdict}")
with open(json_path, "w") as f:
    json.dump({"meta": meta, "results": rows, "ratios": out_ratios, "runs": runs}, f, indent=2)
    f.write("\n")
print(f"\nJSON: {json_path}")
EOP
}

# has_flag HELP_TEXT --flag
has_flag() { grep -q -- "$2" <<<"$1"; }

# prepare_ours MIGRATE_FLAG RECEIVE_FLAG WHY_MISSING SYNC_SCENARIO: builds our release binary
# (unless SMS_AGENT_BIN or NO_BUILD=1), checks that `migrate --help` shows MIGRATE_FLAG and
# `receive --help` RECEIVE_FLAG (another engineer may still be writing them; then the
# baselines are measured alone), makes certificates, and starts the private sshd. Sets BIN,
# OURS (1/0), OURS_WHY, CERTS, MIGR_HELP, RECV_HELP, RECEIVE_EXTRA and MIGRATE_EXTRA.
# shellcheck disable=SC2034 # the globals it sets are read by the scripts that source this
prepare_ours() {
  local mflag=$1 rflag=$2 lacks=$3 sync_scn=$4 target_dir
  local -a build envs
  BUILD_FAILED=0
  OURS_WHY=
  if [[ -n ${SMS_AGENT_BIN:-} ]]; then
    BIN=$SMS_AGENT_BIN
  else
    target_dir=${CARGO_TARGET_DIR:-target}
    [[ $target_dir == /* ]] || target_dir=$REPO/$target_dir
    BIN=$target_dir/release/sms-agent
    if [[ ${NO_BUILD:-0} != 1 ]]; then
      log "cargo build --release -p sms-agent"
      build=(cargo build --release -q -p sms-agent)
      if [[ -n ${SUDO_USER:-} && $SUDO_USER != root ]]; then
        # Build as the user who ran sudo (their toolchain, no root-owned files in target/).
        envs=()
        [[ -n ${CARGO_TARGET_DIR:-} ]] && envs+=("CARGO_TARGET_DIR=$CARGO_TARGET_DIR")
        # shellcheck disable=SC2016 # expanded by the inner (login) shell
        sudo -u "$SUDO_USER" -H env "${envs[@]}" bash -lc 'cd "$1" && shift && "$@"' _ "$REPO" "${build[@]}" \
          || BUILD_FAILED=1
      else
        command -v cargo >/dev/null || PATH=$HOME/.cargo/bin:$PATH
        "${build[@]}" || BUILD_FAILED=1
      fi
      ((BUILD_FAILED == 0)) || OURS_WHY="cargo build --release -p sms-agent failed"
    fi
  fi
  RECV_HELP='' MIGR_HELP=''
  if [[ -z $OURS_WHY ]]; then
    if [[ ! -x $BIN ]]; then
      OURS_WHY="$BIN does not exist"
    elif ! MIGR_HELP=$("$BIN" migrate --help 2>&1) || ! RECV_HELP=$("$BIN" receive --help 2>&1) \
      || ! has_flag "$MIGR_HELP" "$mflag" || ! has_flag "$RECV_HELP" "$rflag"; then
      OURS_WHY="$BIN $lacks"
    elif ! "$BIN" certs --out "$WORK/certs" --target-name 127.0.0.1 >/dev/null; then
      OURS_WHY="'sms-agent certs --out DIR --target-name 127.0.0.1' failed"
    fi
  fi
  if [[ -z $OURS_WHY ]]; then
    OURS=1
    CERTS=$WORK/certs
    has_flag "$RECV_HELP" --once || warn "receive --help shows no --once; the receiver is stopped after each run"
    has_flag "$RECV_HELP" --state-dir || warn "receive --help shows no --state-dir; its default state dir is used"
    has_flag "$MIGR_HELP" --sync || warn "migrate --help shows no --sync; scenario $sync_scn measures rsync only"
    log "ours: $BIN ($("$BIN" --version 2>/dev/null || echo '?'))"
  else
    OURS=0
    warn "=================================================================================="
    warn "NOT MEASURING OURS: $OURS_WHY."
    warn "Only the baselines run; the sms-agent rows say SKIPPED."
    warn "=================================================================================="
  fi
  read -ra RECEIVE_EXTRA <<<"${RECEIVE_ARGS:-}"
  read -ra MIGRATE_EXTRA <<<"${MIGRATE_ARGS:-}"

  start_sshd "$WORK/ssh"
  log "private sshd on 127.0.0.1:$SSH_PORT (pid $SSHD_PID)"
}

# rand_file PATH BYTES: incompressible data, fast (AES-CTR keystream with a random key).
rand_file() {
  { openssl enc -aes-128-ctr -K "$(openssl rand -hex 16)" -iv "$(openssl rand -hex 16)" </dev/zero 2>/dev/null || true; } \
    | head -c "$2" >"$1"
  [[ $(stat -c %s "$1") -eq $2 ]] || die "could not write $2 bytes of random data to $1"
}

# sync_blocked PREV WHAT: prints why ours cannot run a sync onto the target of scenario PREV
# (WHAT names that run in the message), or returns 1 when it can. Uses the caller's OURS,
# OURS_WHY, MIGR_HELP, OURS_TOOL and ran_ok.
sync_blocked() {
  if ((OURS == 0)); then
    echo "$OURS_WHY"
  elif ! has_flag "$MIGR_HELP" --sync; then
    echo "migrate has no --sync"
  elif ! ran_ok "$1" "$OURS_TOOL"; then
    echo "no target: $2 failed"
  else
    return 1
  fi
}
