#!/usr/bin/env bash
# Checks what packaging/build.sh produced: package contents and file modes, the static binary
# running `probe` in an empty chroot (no libraries at all), and `systemd-analyze verify` on the
# unit. Run as root after packaging/build.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
DIST=dist
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
DEB=$DIST/sms-agent_${VERSION}_amd64.deb
fail() { echo "check.sh: $*" >&2; exit 1; }

listing=$(dpkg-deb -c "$DEB")
for f in ./usr/bin/sms-agent ./usr/lib/systemd/system/sms-agent.service ./etc/sms-agent/agent.toml \
         ./usr/lib/systemd/system/sms-agent-receive.service ./usr/share/doc/sms-agent/receive.env.example \
         ./usr/share/man/man1/sms-agent.1.gz ./usr/share/bash-completion/completions/sms-agent \
         ./usr/share/zsh/vendor-completions/_sms-agent; do
  grep -q " $f\$" <<<"$listing" || fail "$f missing from $DEB"
done
grep -E ' \./etc/sms-agent/agent\.toml$' <<<"$listing" | grep -q '^-rw-------' || fail "agent.toml is not 0600 in $DEB"
grep -E ' \./usr/bin/sms-agent$' <<<"$listing" | grep -q '^-rwxr-xr-x' || fail "sms-agent is not 0755 in $DEB"
info=$(dpkg-deb -I "$DEB")
grep -q postinst <<<"$info" || fail "no postinst in $DEB"
echo "deb: contents and modes ok"

if RPM=$(ls "$DIST"/sms-agent-"$VERSION"-*.rpm 2>/dev/null); then
  files=$(rpm -qlvp "$RPM"); scripts=$(rpm -qp --scripts "$RPM")
  grep -q ' /usr/bin/sms-agent$' <<<"$files" || fail "rpm lacks /usr/bin/sms-agent"
  grep ' /etc/sms-agent/agent.toml$' <<<"$files" | grep -q '^-rw-------' || fail "agent.toml is not 0600 in the rpm"
  grep -q 'systemctl enable' <<<"$scripts" || fail "the rpm does not enable the unit"
  echo "rpm: contents and modes ok"
fi

# The static binary in a root with nothing else in it: no libc, no loader, no /etc.
ROOT=$(mktemp -d)
cleanup() { umount "$ROOT/proc" "$ROOT/sys" 2>/dev/null || true; rm -rf "$ROOT"; }
trap cleanup EXIT
dpkg-deb -x "$DEB" "$ROOT/pkg"
mkdir -p "$ROOT/proc" "$ROOT/sys" "$ROOT/dev"
cp "$ROOT/pkg/usr/bin/sms-agent" "$ROOT/sms-agent"
rm -rf "$ROOT/pkg"
mount -t proc proc "$ROOT/proc"
mount -t sysfs sys "$ROOT/sys"
[ "$(find "$ROOT" -path "$ROOT/proc" -prune -o -path "$ROOT/sys" -prune -o -type f -print | wc -l)" = 1 ] || fail "chroot not empty"
out=$(chroot "$ROOT" /sms-agent probe 2>/dev/null)
python3 -c 'import json,sys; b=json.loads(sys.argv[1]); assert b["os_type"]=="LINUX" and b["kernel_version"], b' "$out" \
  || fail "probe in the empty chroot did not print a registration body"
echo "static binary: probe runs in an empty chroot ($(stat -c %s "$ROOT/sms-agent") bytes)"

# systemd-analyze wants the ExecStart binary where the unit says.
UNITROOT=$(mktemp -d)
install -D -m 0755 "$ROOT/sms-agent" /usr/bin/sms-agent.verify-tmp
for u in sms-agent.service sms-agent-receive.service; do
  sed 's#/usr/bin/sms-agent #/usr/bin/sms-agent.verify-tmp #' "systemd/$u" > "$UNITROOT/$u"
done
systemd-analyze verify --man=no "$UNITROOT/sms-agent.service" "$UNITROOT/sms-agent-receive.service"
rm -rf "$UNITROOT" /usr/bin/sms-agent.verify-tmp
echo "systemd-analyze verify: ok"
