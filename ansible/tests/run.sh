#!/usr/bin/env bash
# The full test of the sms_agent.fleet collection, against real hosts: two minimal Debian
# containers booted by systemd-nspawn (systemd as PID 1, sshd, each in a network namespace of its
# own, joined to the host by a veth on a bridge), driven over ssh by ansible-core from PyPI,
# against sms-emulator serving HTTPS on the host. h1 gets the .deb (auto) copied from the
# controller and AK/SK auth; h2 the tarball, downloaded over HTTP with its checksum checked, and
# IAM token auth (user and password).
#
#   ansible/tests/run.sh          (as root; about 7 minutes once the caches exist)
#
# It checks: an honest --check --diff on fresh hosts (changes reported, none made); the rollout;
# a second run and a --check with no change at all; both sources registered exactly once, with the
# ids the role reported as facts; modes of the config, key and directory; the secret key and
# password never in any output; an upgrade to a new pinned version and back; a --check --diff of a
# changed setting that shows the diff and changes nothing; a setting the agent refuses leaving the
# old file in place; the inventory report (JSON and table); state=absent removing everything, and
# again with no change.
#
# Caches (kept between runs): the Debian rootfs in $FLEET_CACHE (default /var/tmp/sms-agent-fleet;
# debootstrap, about 80 s, once), the virtualenv in $FLEET_VENV (default /opt/sms-agent-ansible),
# the packages in dist/ (packaging/build.sh when missing; FLEET_REBUILD=1 forces it).
# FLEET_KEEP=1 leaves the scratch directory (logs, inventory, report) behind.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
ANS=$REPO/ansible
CACHE=${FLEET_CACHE:-/var/tmp/sms-agent-fleet}
VENV=${FLEET_VENV:-/opt/sms-agent-ansible}
NET=${FLEET_NET:-10.231.77}
PORT=${FLEET_PORT:-18443}
P=smsfleet
ROOTFS=$CACHE/rootfs-bookworm
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -1)
HOSTS=(h1 h2)

fail() { echo "fleet test: FAIL: $*" >&2; exit 1; }
step() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%T)"; }
[ "$(id -u)" = 0 ] || fail "run as root (network namespaces, containers)"
for c in debootstrap systemd-nspawn ssh ssh-keygen ip curl jq python3; do
  command -v "$c" >/dev/null || fail "$c is needed"
done

WORK=$(mktemp -d /tmp/smsfleet.XXXXXX)
PIDS=()
LEADERS=()
cleanup() {
  set +e
  # Ansible's persistent ssh connections would keep sessions open in the containers.
  for sock in "$WORK"/cp/*; do [ -S "$sock" ] && ssh -o ControlPath="$sock" -O exit x >/dev/null 2>&1; done
  # SIGTERM: the container halts; a second SIGTERM makes systemd-nspawn end it at once (its halt
  # can fail under a cgroup v1 host); SIGKILL of the container's init as the last resort.
  local round pid alive=0
  for round in TERM TERM; do
    for pid in "${PIDS[@]}"; do kill -"$round" "$pid" 2>/dev/null; done
    for _ in $(seq 1 20); do
      alive=0
      for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
      [ $alive = 0 ] && break
      sleep 1
    done
    [ $alive = 0 ] && break
  done
  if [ "$alive" = 1 ]; then
    for pid in "${LEADERS[@]}" "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  fi
  for h in "${HOSTS[@]}"; do ip netns del "$P-$h" 2>/dev/null; ip link del "$P-$h" 2>/dev/null; done
  ip link del "$P-br0" 2>/dev/null
  if [ "${FLEET_KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# --- what the test drives ------------------------------------------------------------------
step "packages, emulator, ansible"
DEB=$REPO/dist/sms-agent_${VERSION}_amd64.deb
TGZ=$REPO/dist/sms-agent-${VERSION}-x86_64-linux-musl.tar.gz
if [ "${FLEET_REBUILD:-0}" = 1 ] || [ ! -e "$DEB" ] || [ ! -e "$TGZ" ]; then
  "$REPO/packaging/build.sh"
fi
BIN=$REPO/target/x86_64-unknown-linux-musl/release/sms-agent
EMU=$REPO/target/debug/sms-emulator
[ -x "$EMU" ] || (cd "$REPO" && cargo build -p sms-tests --bin sms-emulator)
if [ ! -x "$VENV/bin/ansible-playbook" ] || [ ! -x "$VENV/bin/ansible-lint" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r "$ANS/requirements.txt"
fi
export PATH=$VENV/bin:$PATH PYTHONWARNINGS=ignore ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0

if [ ! -d "$ROOTFS" ]; then
  step "debootstrap (once, cached in $ROOTFS)"
  mkdir -p "$CACHE"
  rm -rf "$ROOTFS.tmp"
  debootstrap --variant=minbase --include=systemd-sysv,dbus,openssh-server,python3 bookworm \
    "$ROOTFS.tmp" http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 \
    || fail "debootstrap failed, see $CACHE/debootstrap.log"
  # Each boot makes its own machine id and takes its hostname from --hostname.
  : >"$ROOTFS.tmp/etc/machine-id"
  rm -f "$ROOTFS.tmp/etc/hostname"
  mv "$ROOTFS.tmp" "$ROOTFS"
fi

# --- the hosts -----------------------------------------------------------------------------
step "network and containers"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/id" -C fleet-test
install -m 0600 "$WORK/id.pub" "$WORK/authorized_keys"
ip link add "$P-br0" type bridge
ip addr add "$NET.1/24" dev "$P-br0"
ip link set "$P-br0" up
i=10
for h in "${HOSTS[@]}"; do
  i=$((i + 1))
  ip netns add "$P-$h"
  ip link add "$P-$h" type veth peer name eth0 netns "$P-$h"
  ip link set "$P-$h" master "$P-br0" up
  ip -n "$P-$h" addr add "$NET.$i/24" dev eth0
  ip -n "$P-$h" link set eth0 up
  ip -n "$P-$h" link set lo up
  ip -n "$P-$h" route add default via "$NET.1"
  # --volatile=overlay: the cached rootfs stays untouched; each container writes to its own tmpfs.
  systemd-nspawn --register=no --keep-unit -b -D "$ROOTFS" --volatile=overlay \
    --machine="$P-$h" --hostname="fleet-$h" --network-namespace-path="/run/netns/$P-$h" \
    --bind-ro="$WORK/authorized_keys:/root/.ssh/authorized_keys" \
    >"$WORK/console-$h.log" 2>&1 </dev/null &
  PIDS+=($!)
done
SSH=(ssh -i "$WORK/id" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=3 -o BatchMode=yes)
on() { local h=$1; shift; "${SSH[@]}" "root@$NET.$((10 + ${h#h}))" "$@"; }
for h in "${HOSTS[@]}"; do
  ok=0
  for _ in $(seq 1 60); do
    if state=$(on "$h" systemctl is-system-running --wait 2>/dev/null) || [ "${state:-}" = degraded ]; then ok=1; break; fi
    sleep 1
  done
  [ $ok = 1 ] || fail "container $h did not come up: $(tail -5 "$WORK/console-$h.log")"
  # The container's init, to end it should systemd-nspawn fail to.
  LEADERS+=($(ps -o pid= --ppid "${PIDS[$(( ${h#h} - 1 ))]}"))
  echo "$h: systemd $(on "$h" cat /proc/1/comm) as PID 1, state ${state:-?}"
done

# --- SMS ------------------------------------------------------------------------------------
step "sms-emulator over HTTPS on $NET.1:$PORT"
"$BIN" certs --out "$WORK/pki" --target-name "$NET.1" >/dev/null
AK=FLEETAK$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
SK=$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')
PW=pw-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
"$EMU" --listen "$NET.1:$PORT" --ak "$AK" --sk "$SK" --iam-user fleet-op --iam-password "$PW" --state "$WORK/emu.json" \
  --tls-cert "$WORK/pki/target.pem" --tls-key "$WORK/pki/target-key.pem" >"$WORK/emu.log" 2>&1 &
PIDS+=($!)
EMU_URL=https://$NET.1:$PORT
emu() { curl -sS --fail --cacert "$WORK/pki/ca.pem" "$EMU_URL$1"; }
for _ in $(seq 1 50); do emu /_emulator/state >/dev/null 2>&1 && break; sleep 0.2; done
emu /_emulator/state >/dev/null || fail "the emulator did not start: $(cat "$WORK/emu.log")"
# The package server h2 downloads from.
python3 -m http.server --bind "$NET.1" --directory "$REPO/dist" $((PORT + 1)) >"$WORK/http.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 50); do curl -sf "http://$NET.1:$((PORT + 1))/" >/dev/null && break; sleep 0.2; done

# --- the operator's side: inventory, variables, vault ----------------------------------------
step "inventory and vault"
mkdir -p "$WORK/project/group_vars/sms_agents" "$WORK/project/host_vars/h2"
cd "$WORK/project"
cat >inventory.ini <<EOF
[sms_agents]
h1 ansible_host=$NET.11
h2 ansible_host=$NET.12 sms_agent_install_method=tarball

[sms_agents:vars]
ansible_user=root
ansible_become=false
ansible_python_interpreter=/usr/bin/python3
ansible_ssh_private_key_file=$WORK/id
ansible_ssh_common_args=-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR
EOF
cat >group_vars/sms_agents/vars.yml <<EOF
sms_agent_version: "$VERSION"
sms_agent_package_dir: "$REPO/dist"
sms_agent_endpoint: "$EMU_URL"
sms_agent_ca_pem: "{{ lookup('ansible.builtin.file', '$WORK/pki/ca.pem') }}"
sms_agent_access_key: "$AK"
sms_agent_name: "fleet-{{ inventory_hostname }}"
sms_agent_poll_interval: "2s"
sms_agent_transfer_streams: 6
sms_agent_transfer_exclude: ["/srv/cache"]
EOF
cat >host_vars/h2/vars.yml <<EOF
sms_agent_package_dir: ""
sms_agent_package_url: "http://$NET.1:$((PORT + 1))/"
sms_agent_package_checksums:
  "$(basename "$TGZ")": "sha256:$(sha256sum "$TGZ" | cut -d' ' -f1)"
sms_agent_auth_method: token
sms_agent_iam_endpoint: "$EMU_URL"
sms_agent_iam_username: fleet-op
sms_agent_iam_domain_name: fleet-domain
sms_agent_iam_project_name: cn-north-4
EOF
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/vault-pass"
printf 'sms_agent_secret_key: "%s"\n' "$SK" >group_vars/sms_agents/vault.yml
printf 'sms_agent_iam_password: "%s"\n' "$PW" >host_vars/h2/vault.yml
for v in group_vars/sms_agents/vault.yml host_vars/h2/vault.yml; do
  ansible-vault encrypt --vault-password-file "$WORK/vault-pass" "$v" >/dev/null
  grep -q '^\$ANSIBLE_VAULT' "$v" || fail "$v is not encrypted"
done
cat >ansible.cfg <<EOF
[defaults]
collections_path = $ANS
inventory = inventory.ini
vault_password_file = $WORK/vault-pass
fact_caching = jsonfile
fact_caching_connection = $WORK/facts
host_key_checking = False

[ssh_connection]
pipelining = True
control_path_dir = $WORK/cp
EOF

N=0
# play NAME ARGS...: runs a playbook, keeps its output in $WORK/NAME.log, prints the recap.
play() {
  local name=$1; shift
  N=$((N + 1))
  local t0; t0=$(date +%s.%N)
  if ! ansible-playbook "$@" >"$WORK/$name.log" 2>&1; then
    tail -40 "$WORK/$name.log" >&2
    fail "ansible-playbook $name failed (log: $WORK/$name.log)"
  fi
  awk -v n="$name" -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%s: %.1f s\n", n, b - a }' 
  sed -n '/^PLAY RECAP/,$p' "$WORK/$name.log" | grep -E '^h[0-9]' | sed 's/  */ /g'
}
# play_fails NAME ARGS...: like play, for a run that must fail.
play_fails() {
  local name=$1; shift
  N=$((N + 1))
  if ansible-playbook "$@" >"$WORK/$name.log" 2>&1; then fail "ansible-playbook $name succeeded; it must fail"; fi
  echo "$name: failed, as it must"
}
no_secret_in_logs() {
  local log
  for log in "$WORK"/*.log; do ! grep -qF -e "$SK" -e "$PW" "$log" || fail "a secret is in $(basename "$log")"; done
}
# changed NAME HOST: the changed= count of HOST in the recap of run NAME.
changed() { sed -n '/^PLAY RECAP/,$p' "$WORK/$1.log" | grep -E "^$2 " | sed -E 's/.*changed=([0-9]+).*/\1/'; }
expect_changed() { # NAME: every host changed something
  for h in "${HOSTS[@]}"; do [ "$(changed "$1" "$h")" -gt 0 ] || fail "$1: $h reports no change"; done
}
# fact HOST: the sms_agent_source_id the role set, from the jsonfile fact cache (files named
# HOST, or s1_HOST with a {"__payload__": "…"} wrapper as ansible-core 2.19 writes them).
fact() {
  local f
  for f in "$WORK/facts/$1" "$WORK/facts/s1_$1"; do
    # 2.19 also keeps each value's origin: {"value": …, "tags": […]}.
    [ -e "$f" ] && jq -r '(if has("__payload__") then .__payload__ | fromjson else . end)
      | .sms_agent_source_id // empty | if type == "object" then .value else . end' "$f" && return
  done
}
expect_unchanged() { # NAME: no host changed anything
  for h in "${HOSTS[@]}"; do
    [ "$(changed "$1" "$h")" = 0 ] || { grep -E '^changed:' "$WORK/$1.log" >&2; fail "$1: $h changed=$(changed "$1" "$h"), want 0"; }
  done
}

# --- rollout ----------------------------------------------------------------------------------
step "--check --diff on fresh hosts: reports the changes, makes none"
play check-fresh sms_agent.fleet.deploy --check --diff
expect_changed check-fresh
for h in "${HOSTS[@]}"; do
  on "$h" 'test ! -e /etc/sms-agent && test ! -e /usr/bin/sms-agent && test ! -e /usr/local/bin/sms-agent' \
    || fail "--check changed $h"
done
[ "$(emu /_emulator/state | jq '.sources | length')" = 0 ] || fail "--check registered a source"

step "rollout"
play rollout sms_agent.fleet.deploy --diff
expect_changed rollout
step "second run (at -vvv, so that every module's arguments are printed): no change"
play rerun sms_agent.fleet.deploy --diff -vvv
expect_unchanged rerun
step "--check --diff on converged hosts: no change"
play check-converged sms_agent.fleet.deploy --check --diff
expect_unchanged check-converged

step "registered exactly once, with the ids the role reported"
state=$(emu /_emulator/state)
[ "$(jq '.sources | length' <<<"$state")" = 2 ] || fail "the emulator has $(jq '.sources | length' <<<"$state") sources, want 2"
posts=$(emu /_emulator/journal | jq '[.[] | select(.method == "POST" and .path == "/v3/sources")] | length')
[ "$posts" = 2 ] || fail "$posts registrations (POST /v3/sources), want 2"
for h in "${HOSTS[@]}"; do
  fact=$(fact "$h")
  [ -n "$fact" ] || fail "no sms_agent_source_id fact for $h"
  st=$(on "$h" sms-agent status --json 2>/dev/null || on "$h" /usr/local/bin/sms-agent status --json)
  [ "$(jq -r .source_id <<<"$st")" = "$fact" ] || fail "$h: status says $(jq -r .source_id <<<"$st"), the fact $fact"
  [ "$(jq -r --arg id "$fact" '.sources[$id].body.name // empty' <<<"$state")" = "fleet-$h" ] \
    || fail "$h: the emulator's source $fact is not named fleet-$h: $(jq -c --arg id "$fact" '.sources[$id]' <<<"$state" | head -c 300)"
  echo "$h: source $fact, registered once, $(jq -r .activity <<<"$st")"
done

step "files, modes, the secrets"
sha() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
for h in "${HOSTS[@]}"; do
  secret=/etc/sms-agent/sk want=$(sha "$SK")
  [ "$h" = h2 ] && secret=/etc/sms-agent/password want=$(sha "$PW")
  modes=$(on "$h" "stat -c '%a %U %n' /etc/sms-agent /etc/sms-agent/agent.toml /etc/sms-agent/sk $secret /etc/sms-agent/api-ca.pem | sort -u -k3")
  expect=$(printf '700 root /etc/sms-agent\n600 root /etc/sms-agent/agent.toml\n600 root /etc/sms-agent/sk\n600 root %s\n644 root /etc/sms-agent/api-ca.pem' "$secret" | sort -u -k3)
  [ "$modes" = "$expect" ] || fail "$h: modes are $modes"
  [ "$(on "$h" sha256sum "$secret" | cut -d' ' -f1)" = "$want" ] || fail "$h: $secret does not hold the vault's secret"
  on "$h" cat /etc/sms-agent/agent.toml >"$WORK/agent-$h.toml"
  ! grep -qF -e "$SK" -e "$PW" "$WORK/agent-$h.toml" || fail "$h: a secret is in agent.toml"
  grep -qx 'streams = 6' "$WORK/agent-$h.toml" && grep -qx 'exclude = \["/srv/cache"\]' "$WORK/agent-$h.toml" \
    && grep -qx "name = \"fleet-$h\"" "$WORK/agent-$h.toml" || fail "$h: agent.toml lacks the settings: $(cat "$WORK/agent-$h.toml")"
  on "$h" systemctl is-enabled sms-agent.service >/dev/null || fail "$h: sms-agent is not enabled"
done
grep -qx 'method = "token"' "$WORK/agent-h2.toml" && grep -qx 'password_file = "/etc/sms-agent/password"' "$WORK/agent-h2.toml" \
  || fail "h2: agent.toml is not set up for token auth"
[ "$(on h2 stat -c %s /etc/sms-agent/sk)" = 0 ] || fail "h2: /etc/sms-agent/sk is not empty under token auth"
[ "$(emu /_emulator/journal | jq '[.[] | select(.method == "POST" and .path == "/v3/auth/tokens")] | length')" -ge 1 ] \
  || fail "h2 registered without an IAM token"
on h1 'dpkg-query -W -f="\${Status} \${Version}" sms-agent' | grep -q "install ok installed $VERSION" || fail "h1: the .deb is not installed"
on h2 'test -x /usr/local/bin/sms-agent && test -e /etc/systemd/system/sms-agent.service && ! dpkg-query -W sms-agent >/dev/null 2>&1' \
  || fail "h2: not a tarball install"
[ "$(grep -c "GET /$(basename "$TGZ")" "$WORK/http.log")" = 1 ] || fail "h2 did not download the tarball exactly once: $(cat "$WORK/http.log")"
no_secret_in_logs
echo "modes 700/600/600, the key and the password only in their files, in no output of $N runs"

step "a new pinned version: upgrade, then back down, the same source throughout"
# The same package under a higher version number: only dpkg's version differs, which is what
# the role compares for a .deb.
NEXT=$VERSION.1
dpkg-deb -R "$DEB" "$WORK/repack"
sed -i "s/^Version: .*/Version: $NEXT/" "$WORK/repack/DEBIAN/control"
mkdir -p "$WORK/dist-next"
dpkg-deb --root-owner-group -Zxz -b "$WORK/repack" "$WORK/dist-next/sms-agent_${NEXT}_amd64.deb" >/dev/null
id_before=$(fact h1)
for run in upgrade upgrade-again downgrade; do
  v=$NEXT dir=$WORK/dist-next
  [ $run = downgrade ] && v=$VERSION dir=$REPO/dist
  play $run sms_agent.fleet.deploy --limit h1 -e sms_agent_version="$v" -e sms_agent_package_dir="$dir"
  if [ $run = upgrade-again ]; then [ "$(changed $run h1)" = 0 ] || fail "$run: h1 changed"
  else [ "$(changed $run h1)" -gt 0 ] || fail "$run: h1 reports no change"; fi
  [ "$(on h1 'dpkg-query -W -f="\${Version}" sms-agent')" = "$v" ] || fail "$run: h1 does not have $v installed"
  on h1 systemctl is-active sms-agent.service >/dev/null || fail "$run: the agent is not running"
  [ "$(fact h1)" = "$id_before" ] || fail "$run: h1's source id changed from $id_before to $(fact h1)"
done
[ "$(emu /_emulator/state | jq '.sources | length')" = 2 ] || fail "the upgrades registered new sources"
echo "h1: $VERSION -> $NEXT -> $VERSION, source $id_before kept"

step "--check --diff of a changed setting: shows it, changes nothing"
play check-change sms_agent.fleet.deploy --check --diff -e sms_agent_poll_interval=3s
expect_changed check-change
grep -q '^-poll_interval = "2s"' "$WORK/check-change.log" && grep -q '^+poll_interval = "3s"' "$WORK/check-change.log" \
  || fail "the diff of agent.toml is not shown"
for h in "${HOSTS[@]}"; do on "$h" grep -qx "'poll_interval = \"2s\"'" /etc/sms-agent/agent.toml || fail "--check changed $h's agent.toml"; done

step "a setting the agent does not know: refused by the agent before agent.toml is replaced"
sum_before=$(on h1 sha256sum /etc/sms-agent/agent.toml)
play_fails bad-setting sms_agent.fleet.deploy -e '{"sms_agent_extra_config": {"agent": {"no_such_key": "1"}}}'
grep -q 'no_such_key' "$WORK/bad-setting.log" || fail "the failure does not name the bad key: $(grep -m3 fatal "$WORK/bad-setting.log")"
[ "$(on h1 sha256sum /etc/sms-agent/agent.toml)" = "$sum_before" ] || fail "a refused agent.toml replaced the old one"
on h1 systemctl is-active sms-agent.service >/dev/null || fail "the agent stopped after a refused setting"
grep -m1 -o 'unknown field `no_such_key`[^"\]*' "$WORK/bad-setting.log" | head -1 || true

step "inventory report"
play report sms_agent.fleet.inventory_report -e sms_agent_report_dir="$WORK/report"
for h in "${HOSTS[@]}"; do
  [ "$(jq -r --arg h "$h" '.hosts[$h].probe.name' "$WORK/report/inventory.json")" = "fleet-$h" ] || fail "report: no probe of $h"
  [ "$(jq -r --arg h "$h" '.hosts[$h].status.source_id' "$WORK/report/inventory.json")" = "$(fact "$h")" ] \
    || fail "report: wrong source id for $h"
done
cat "$WORK/report/inventory.txt"
grep -q '^2 hosts, 2 probed, 0 not' "$WORK/report/inventory.txt" || fail "report: the table's count is wrong"

# --- removal ----------------------------------------------------------------------------------
step "state=absent"
play remove sms_agent.fleet.deploy -e sms_agent_state=absent --diff
expect_changed remove
play remove-again sms_agent.fleet.deploy -e sms_agent_state=absent
expect_unchanged remove-again
play remove-check sms_agent.fleet.deploy -e sms_agent_state=absent --check
expect_unchanged remove-check
for h in "${HOSTS[@]}"; do
  left=$(on "$h" 'ls -d /etc/sms-agent /var/lib/sms-agent /var/log/sms-agent /usr/bin/sms-agent /usr/local/bin/sms-agent \
    /etc/systemd/system/sms-agent.service /usr/lib/systemd/system/sms-agent.service /usr/local/share/man/man1/sms-agent.1.gz 2>/dev/null; \
    dpkg-query -W sms-agent 2>/dev/null; systemctl list-units --all --no-legend "sms-agent*"' || true)
  [ -z "$left" ] || fail "$h: left after removal: $left"
done
for h in "${HOSTS[@]}"; do [ -z "$(fact "$h")" ] || fail "$h: the fact cache still has source id $(fact "$h")"; done
echo "nothing of sms-agent left on either host; the source id facts are cleared"
play report-after sms_agent.fleet.inventory_report -e sms_agent_report_dir="$WORK/report-after"
grep -q '^2 hosts, 0 probed, 2 not' "$WORK/report-after/inventory.txt" || fail "report after removal: $(cat "$WORK/report-after/inventory.txt")"

no_secret_in_logs
step "ok: $N playbook runs, the secret key and the password in none of their outputs"
