#!/usr/bin/env bash
# Builds the static release binary (x86_64-unknown-linux-musl: no glibc, no OpenSSL), its man
# page and shell completions, and packs them with the systemd unit and an example config into a
# .deb, an .rpm (when rpmbuild is present) and a tarball with install.sh, all under dist/.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=x86_64-unknown-linux-musl
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
DIST=$PWD/dist
rustup target list --installed 2>/dev/null | grep -q "$TARGET" || rustup target add "$TARGET"
command -v musl-gcc >/dev/null || { apt-get update -qq && apt-get install -y -qq musl-tools >/dev/null; }
cargo build --release --locked --target "$TARGET" -p sms-agent
BIN=target/$TARGET/release/sms-agent

rm -rf "$DIST"; mkdir -p "$DIST"
ROOT=$DIST/root
install -D -m 0755 "$BIN" "$ROOT/usr/bin/sms-agent"
install -D -m 0644 systemd/sms-agent.service "$ROOT/usr/lib/systemd/system/sms-agent.service"
install -D -m 0644 systemd/sms-agent-receive.service "$ROOT/usr/lib/systemd/system/sms-agent-receive.service"
install -D -m 0644 packaging/receive.env.example "$ROOT/usr/share/doc/sms-agent/receive.env.example"
install -D -m 0600 packaging/agent.toml.example "$ROOT/etc/sms-agent/agent.toml"
install -D -m 0644 README.md "$ROOT/usr/share/doc/sms-agent/README.md"
mkdir -p "$ROOT/usr/share/man/man1" "$ROOT/usr/share/bash-completion/completions" "$ROOT/usr/share/zsh/vendor-completions"
"$BIN" manpage | gzip -9n > "$ROOT/usr/share/man/man1/sms-agent.1.gz"
"$BIN" completions bash > "$ROOT/usr/share/bash-completion/completions/sms-agent"
"$BIN" completions zsh > "$ROOT/usr/share/zsh/vendor-completions/_sms-agent"
chmod 0644 "$ROOT/usr/share/man/man1/sms-agent.1.gz" "$ROOT/usr/share/bash-completion/completions/sms-agent" "$ROOT/usr/share/zsh/vendor-completions/_sms-agent"
chmod 0700 "$ROOT/etc/sms-agent"

# --- .deb -------------------------------------------------------------------------------
DEB=$DIST/deb; cp -a "$ROOT" "$DEB"; mkdir -p "$DEB/DEBIAN"
cat > "$DEB/DEBIAN/control" <<EOC
Package: sms-agent
Version: $VERSION
Architecture: amd64
Maintainer: sms-agent developers <sms-agent@localhost>
Section: admin
Priority: optional
Installed-Size: $(du -sk "$ROOT" | cut -f1)
Description: source-side server migration agent for Huawei Cloud SMS
 Inventories the host, registers it with the Server Migration Service and carries out
 its commands. Static binary: no library dependencies.
EOC
echo /etc/sms-agent/agent.toml > "$DEB/DEBIAN/conffiles"
cat > "$DEB/DEBIAN/postinst" <<'EOS'
#!/bin/sh
set -e
# The unit always loads /etc/sms-agent/sk as a credential; an empty one means "key in agent.toml".
[ -e /etc/sms-agent/sk ] || install -m 0600 /dev/null /etc/sms-agent/sk
chmod 0600 /etc/sms-agent/agent.toml
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
  systemctl enable sms-agent.service || true
fi
exit 0
EOS
cat > "$DEB/DEBIAN/prerm" <<'EOS'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
  systemctl disable --now sms-agent.service || true
fi
exit 0
EOS
cat > "$DEB/DEBIAN/postrm" <<'EOS'
#!/bin/sh
set -e
[ -d /run/systemd/system ] && systemctl daemon-reload || true
if [ "$1" = purge ]; then rm -rf /etc/sms-agent /var/lib/sms-agent /var/log/sms-agent; fi
exit 0
EOS
chmod 0755 "$DEB/DEBIAN/postinst" "$DEB/DEBIAN/prerm" "$DEB/DEBIAN/postrm"
dpkg-deb --root-owner-group -Zxz --build "$DEB" "$DIST/sms-agent_${VERSION}_amd64.deb" >/dev/null
rm -rf "$DEB"

# --- .rpm -------------------------------------------------------------------------------
if command -v rpmbuild >/dev/null; then
  TOP=$DIST/rpmbuild; mkdir -p "$TOP/SPECS"
  cat > "$TOP/SPECS/sms-agent.spec" <<EOS
Name: sms-agent
Version: $VERSION
Release: 1
Summary: Source-side server migration agent for Huawei Cloud SMS
License: Apache-2.0
BuildArch: x86_64
%description
Inventories the host, registers it with the Server Migration Service and carries out its
commands. Static binary: no library dependencies.
%install
cp -a $ROOT/. %{buildroot}/
%files
%attr(0755,root,root) /usr/bin/sms-agent
%attr(0644,root,root) /usr/lib/systemd/system/sms-agent.service
%attr(0644,root,root) /usr/lib/systemd/system/sms-agent-receive.service
%doc /usr/share/doc/sms-agent/receive.env.example
%dir %attr(0700,root,root) /etc/sms-agent
%config(noreplace) %attr(0600,root,root) /etc/sms-agent/agent.toml
%doc /usr/share/doc/sms-agent/README.md
/usr/share/man/man1/sms-agent.1.gz
/usr/share/bash-completion/completions/sms-agent
/usr/share/zsh/vendor-completions/_sms-agent
%post
[ -e /etc/sms-agent/sk ] || install -m 0600 /dev/null /etc/sms-agent/sk
if [ -d /run/systemd/system ]; then systemctl daemon-reload || :; systemctl enable sms-agent.service || :; fi
%preun
if [ \$1 -eq 0 ] && [ -d /run/systemd/system ]; then systemctl disable --now sms-agent.service || :; fi
%postun
[ -d /run/systemd/system ] && systemctl daemon-reload || :
EOS
  rpmbuild --quiet --define "_topdir $TOP" --define "_build_id_links none" -bb "$TOP/SPECS/sms-agent.spec" >/dev/null 2>&1
  cp "$TOP"/RPMS/x86_64/*.rpm "$DIST/"
  rm -rf "$TOP"
fi

# --- tarball ----------------------------------------------------------------------------
T=$DIST/sms-agent-$VERSION-x86_64-linux-musl
mkdir -p "$T"
cp "$BIN" "$T/sms-agent"
cp systemd/sms-agent.service systemd/sms-agent-receive.service packaging/agent.toml.example \
  packaging/receive.env.example packaging/install.sh README.md "$T/"
cp "$ROOT/usr/share/man/man1/sms-agent.1.gz" "$T/"
tar -C "$DIST" -czf "$T.tar.gz" "$(basename "$T")"
rm -rf "$T" "$ROOT"

echo "binary: $(stat -c %s "$BIN") bytes ($(file -b "$BIN" | cut -d, -f1-2))"
ls -l "$DIST"
