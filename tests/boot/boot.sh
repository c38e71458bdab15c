#!/usr/bin/env bash
# Boots a disk image in qemu (TCG, serial console) and waits for the marker the boot-test
# image prints once multi-user.target is reached.
#
#   tests/boot/boot.sh IMAGE [TIMEOUT_SECS] [LOG]
#
# Exit 0 and the marker line on stdout when it appears; 1 when the VM ended or the time ran
# out without it (the console log says how far it got). The image is not written
# (-snapshot).
set -uo pipefail
img=${1:?usage: boot.sh IMAGE [TIMEOUT] [LOG]}
timeout=${2:-300}
log=${3:-$(mktemp /tmp/sms-boot-XXXXXX.log)}
: >"$log"
qemu-system-x86_64 -machine pc,accel=tcg -m 768 -smp 1 -nographic -no-reboot -snapshot \
  -drive "file=$img,format=raw,if=virtio" -nic none -serial "file:$log" -monitor none \
  -display none </dev/null >/dev/null 2>&1 &
pid=$!
start=$SECONDS
while kill -0 "$pid" 2>/dev/null; do
  if grep -a -m1 'SMS-BOOT-OK' "$log" >/dev/null 2>&1; then
    grep -a -m1 'SMS-BOOT-OK' "$log" | tr -d '\r'
    echo "boot.sh: multi-user reached after $((SECONDS - start)) s" >&2
    sleep 2
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    exit 0
  fi
  if [ $((SECONDS - start)) -ge "$timeout" ]; then
    echo "boot.sh: no marker after $timeout s; console log: $log" >&2
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    exit 1
  fi
  sleep 1
done
if grep -a -m1 'SMS-BOOT-OK' "$log" | tr -d '\r'; then exit 0; fi
echo "boot.sh: the VM ended without the marker; console log: $log" >&2
tail -20 "$log" | tr -d '\r' >&2
exit 1
