#!/bin/sh
# Installs sms-agent on a host without a package we build for: the static binary, the systemd
# unit, man page and a config written from flags or prompts. Checks the host first and changes
# nothing when a check fails. The secret key is read from a file or a silent prompt, never from
# the command line (where `ps` would show it).
#
#   install.sh --endpoint URL --ak AK --sk-file FILE [--project-id ID] [--name NAME] [--no-prompt]
#   install.sh --uninstall
#
# Options: --prefix DIR installs under DIR (a scratch root; systemd is then not touched),
# --binary PATH takes the binary from PATH (default: ./sms-agent beside this script),
# --skip-network-checks skips the reachability and clock checks (offline installs).
set -eu

PREFIX=/
BINARY=$(dirname "$0")/sms-agent
ENDPOINT=""
AK=""
SK_FILE=""
PROJECT_ID=""
NAME=""
PROMPT=1
UNINSTALL=0
NETCHECK=1
MIN_FREE_KB=51200
MAX_SKEW=900

die() { echo "install.sh: $*" >&2; exit 1; }
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --endpoint) ENDPOINT=${2:?--endpoint needs a URL}; shift 2 ;;
    --ak) AK=${2:?--ak needs a value}; shift 2 ;;
    --sk-file) SK_FILE=${2:?--sk-file needs a file}; shift 2 ;;
    --sk|--sk=*) die "the secret key is never taken on the command line; use --sk-file FILE or the prompt" ;;
    --project-id) PROJECT_ID=${2:?--project-id needs a value}; shift 2 ;;
    --name) NAME=${2:?--name needs a value}; shift 2 ;;
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --binary) BINARY=${2:?--binary needs a path}; shift 2 ;;
    --no-prompt) PROMPT=0; shift ;;
    --skip-network-checks) NETCHECK=0; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

P=${PREFIX%/}
UNIT_DIR=$P/etc/systemd/system
LIVE=0
if [ "$P" = "" ] && [ -d /run/systemd/system ]; then LIVE=1; fi

if [ "$UNINSTALL" = 1 ]; then
  if [ "$LIVE" = 1 ]; then systemctl disable --now sms-agent.service 2>/dev/null || true; fi
  rm -f "$P/usr/local/bin/sms-agent" "$UNIT_DIR/sms-agent.service" \
        "$P/usr/local/share/man/man1/sms-agent.1.gz"
  rm -rf "$P/etc/sms-agent" "$P/var/lib/sms-agent" "$P/var/log/sms-agent"
  if [ "$LIVE" = 1 ]; then systemctl daemon-reload || true; fi
  echo "sms-agent removed"
  exit 0
fi

# --- checks: all before anything is written --------------------------------------------------
[ "$P" != "" ] || [ "$(id -u)" = 0 ] || die "run as root (or give --prefix for a scratch root)"
[ -x "$BINARY" ] || die "no agent binary at $BINARY (give --binary PATH)"
if [ "$P" = "" ] && [ ! -d /run/systemd/system ]; then
  echo "install.sh: note: systemd is not running; the unit is installed but you must start the agent yourself: sms-agent run --config /etc/sms-agent/agent.toml" >&2
fi
if [ "$PROMPT" = 1 ] && [ -t 0 ]; then
  [ -n "$ENDPOINT" ] || { printf 'SMS endpoint (https://sms.REGION.myhuaweicloud.com): '; read -r ENDPOINT; }
  [ -n "$AK" ] || { printf 'Access key (AK): '; read -r AK; }
  if [ -z "$SK_FILE" ]; then
    # Echo goes off before the prompt shows, so nothing typed after it can be echoed.
    stty -echo 2>/dev/null || true
    printf 'Secret key (SK, not echoed): '
    read -r SK_VALUE
    stty echo 2>/dev/null || true
    echo
  fi
fi
[ -n "$ENDPOINT" ] || die "missing --endpoint URL"
case "$ENDPOINT" in http://*|https://*) ;; *) die "--endpoint must be an http(s) URL, got '$ENDPOINT'" ;; esac
[ -n "$AK" ] || die "missing --ak ACCESS_KEY"
if [ -n "$SK_FILE" ]; then
  [ -r "$SK_FILE" ] || die "cannot read the secret key file $SK_FILE"
  SK_VALUE=$(cat "$SK_FILE")
fi
[ -n "${SK_VALUE:-}" ] || die "missing the secret key: give --sk-file FILE (or run without --no-prompt on a terminal)"
mkdir -p "$P/" 2>/dev/null || die "cannot create $PREFIX"
FREE=$(df -Pk "$P/" | awk 'NR==2 {print $4}')
[ "${FREE:-0}" -ge "$MIN_FREE_KB" ] || die "only ${FREE} KiB free under ${PREFIX}; ${MIN_FREE_KB} KiB needed"
if [ "$NETCHECK" = 1 ]; then
  command -v curl >/dev/null || die "curl is needed for the endpoint checks (or --skip-network-checks)"
  HDRS=$(curl -sS -I --max-time 10 "$ENDPOINT/" 2>&1) || die "cannot reach $ENDPOINT: $HDRS"
  DATE=$(printf '%s\n' "$HDRS" | sed -n 's/^[Dd]ate: //p' | tr -d '\r')
  if [ -n "$DATE" ]; then
    SERVER=$(date -d "$DATE" +%s 2>/dev/null || echo "")
    if [ -n "$SERVER" ]; then
      SKEW=$(( $(date +%s) - SERVER ))
      [ "${SKEW#-}" -le "$MAX_SKEW" ] || die "this host's clock is ${SKEW} s off the endpoint's; AK/SK signatures fail beyond ${MAX_SKEW} s (SMS.0205). Fix the time first (chrony/ntpd)"
    fi
  fi
fi

# Changed-block tracking (BPF on the block tracepoints, CAP_BPF and CAP_PERFMON): optional, so
# only notes. Without it every sync pass compares hashes of all used blocks.
if [ "$P" = "" ]; then
  KREL=$(uname -r)
  KMAJ=${KREL%%.*}; KMIN=${KREL#*.}; KMIN=${KMIN%%.*}
  if [ "$KMAJ" -lt 5 ] || { [ "$KMAJ" -eq 5 ] && [ "$KMIN" -lt 8 ]; }; then
    echo "install.sh: note: kernel $KREL has no BPF ring buffer or CAP_BPF (5.8+): no changed-block tracking; block syncs compare hashes of every used block" >&2
  fi
  if grep -q '\[confidentiality\]' /sys/kernel/security/lockdown 2>/dev/null; then
    echo "install.sh: note: kernel lockdown (confidentiality) forbids BPF tracing: no changed-block tracking; block syncs compare hashes of every used block" >&2
  fi
  if [ ! -d /sys/kernel/tracing/events/block ] && [ ! -d /sys/kernel/debug/tracing/events/block ] && ! grep -qw tracefs /proc/filesystems; then
    echo "install.sh: note: no block tracepoints (tracefs): no changed-block tracking; block syncs compare hashes of every used block" >&2
  fi
  if command -v capsh >/dev/null && ! capsh --supports=cap_bpf 2>/dev/null; then
    echo "install.sh: note: this system does not know CAP_BPF: no changed-block tracking" >&2
  fi
fi

# --- install ----------------------------------------------------------------------------------
umask 077
install -d -m 0755 "$P/usr/local/bin" "$UNIT_DIR" "$P/usr/local/share/man/man1"
install -m 0755 "$BINARY" "$P/usr/local/bin/sms-agent"
UNIT_SRC=$(dirname "$0")/sms-agent.service
if [ -r "$UNIT_SRC" ]; then
  sed 's#/usr/bin/sms-agent#/usr/local/bin/sms-agent#' "$UNIT_SRC" > "$UNIT_DIR/sms-agent.service"
  chmod 0644 "$UNIT_DIR/sms-agent.service"
fi
[ ! -r "$(dirname "$0")/sms-agent.1.gz" ] || install -m 0644 "$(dirname "$0")/sms-agent.1.gz" "$P/usr/local/share/man/man1/"
install -d -m 0700 "$P/etc/sms-agent"
printf '%s\n' "$SK_VALUE" > "$P/etc/sms-agent/sk"
chmod 0600 "$P/etc/sms-agent/sk"
{
  echo "[api]"
  echo "endpoint = \"$ENDPOINT\""
  [ -z "$PROJECT_ID" ] || echo "project_id = \"$PROJECT_ID\""
  echo "[auth]"
  echo "method = \"aksk\""
  echo "access_key = \"$AK\""
  echo "secret_key_file = \"/etc/sms-agent/sk\""
  if [ -n "$NAME" ]; then echo "[agent]"; echo "name = \"$NAME\""; fi
} > "$P/etc/sms-agent/agent.toml"
chmod 0600 "$P/etc/sms-agent/agent.toml"

if [ "$LIVE" = 1 ]; then
  systemctl daemon-reload
  systemctl enable --now sms-agent.service
  echo "sms-agent installed and started: systemctl status sms-agent; sms-agent status"
else
  echo "sms-agent installed under $PREFIX"
fi
