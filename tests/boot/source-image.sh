#!/usr/bin/env bash
# Builds a small bootable Debian disk image for the boot tests, cached between runs.
#
#   tests/boot/source-image.sh VARIANT    prints the path of the cached image
#
# VARIANT: plain   MBR, one ext4 root
#          sepboot GPT: BIOS boot partition, /boot ext4, swap, / ext4
#          xfs     MBR, one XFS root
#
# The root tree (debootstrap minbase + kernel + GRUB, modules not needed under qemu pruned)
# is built once as a tarball in $SMS_TEST_CACHE (default /var/cache/sms-agent-tests); each
# image is built once from it. Delete the directory to rebuild. The system prints
# "SMS-BOOT-OK root=<device of />" on the serial console once the login prompts are up,
# then powers off.
set -euo pipefail
variant=${1:?usage: source-image.sh plain|sepboot|xfs}
cache=${SMS_TEST_CACHE:-/var/cache/sms-agent-tests}
mirror=${SMS_TEST_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

tarball=$cache/bookworm-boot-v1.tar
img=$cache/$variant-v2.img

say() { echo "source-image: $*" >&2; }

build_tree() {
  local dir
  dir=$(mktemp -d "$cache/tree.XXXXXX")
  say "debootstrap bookworm into $dir"
  local t0=$SECONDS
  debootstrap --variant=minbase --include=systemd-sysv,dbus bookworm "$dir" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
  cp /etc/resolv.conf "$dir/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"
  chmod 755 "$dir/usr/sbin/policy-rc.d"
  mount -t proc proc "$dir/proc"
  trap 'umount "$dir/proc" 2>/dev/null || true' RETURN
  echo "deb $mirror bookworm main" >"$dir/etc/apt/sources.list"
  say "installing kernel and GRUB"
  chroot "$dir" env DEBIAN_FRONTEND=noninteractive apt-get -q update >>"$cache/debootstrap.log" 2>&1
  chroot "$dir" env DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends \
    linux-image-amd64 grub-pc initramfs-tools xfsprogs lvm2 >>"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
  umount "$dir/proc"
  chroot "$dir" apt-get clean
  rm -f "$dir/usr/sbin/policy-rc.d" "$dir/etc/resolv.conf"
  # Under qemu the system needs virtio, ATA and the filesystems: the rest of the modules only
  # make every migration of the image slower.
  local kver
  kver=$(ls "$dir/lib/modules")
  for d in drivers/gpu drivers/net/wireless drivers/net/ethernet drivers/media drivers/infiniband \
    drivers/staging drivers/iio drivers/hid drivers/usb drivers/bluetooth drivers/isdn \
    drivers/input/touchscreen drivers/scsi/qla2xxx drivers/scsi/lpfc drivers/net/can sound net/wireless \
    net/mac80211 net/bluetooth; do
    rm -rf "$dir/lib/modules/$kver/kernel/$d"
  done
  rm -rf "$dir/lib/firmware" "$dir/usr/share/doc" "$dir/usr/share/man" "$dir/usr/share/locale"
  chroot "$dir" depmod "$kver"
  echo "sms-boot-test" >"$dir/etc/hostname"
  # The root password is empty: the console is the test's, nothing else reaches the VM.
  chroot "$dir" passwd -d root >/dev/null
  sed -i 's/^GRUB_CMDLINE_LINUX_DEFAULT=.*/GRUB_CMDLINE_LINUX_DEFAULT=""/; s/^GRUB_CMDLINE_LINUX=.*/GRUB_CMDLINE_LINUX="console=ttyS0,115200n8"/; s/^GRUB_TIMEOUT=.*/GRUB_TIMEOUT=0/' "$dir/etc/default/grub"
  printf 'GRUB_TERMINAL=serial\nGRUB_SERIAL_COMMAND="serial --speed=115200"\n' >>"$dir/etc/default/grub"
  tar -C "$dir" --numeric-owner --xattrs -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  rm -rf "$dir"
  say "tree built in $((SECONDS - t0)) s"
}

# Runs in the image's root mounted at $mnt with its disk $loop: /dev with only the nodes
# needed, so nothing of the host's /dev is touched and /dev/disk/by-uuid names what GRUB
# should put on the kernel command line.
chroot_boot() {
  local mnt=$1 loop=$2
  mount -t proc proc "$mnt/proc"
  mount --bind /sys "$mnt/sys"
  mount -t tmpfs -o mode=0755 dev "$mnt/dev"
  for n in null zero full random urandom tty; do cp -a "/dev/$n" "$mnt/dev/"; done
  mkdir -p "$mnt/dev/disk/by-uuid" "$mnt/dev/mapper"
  local p
  for p in "$loop" "$loop"p*; do
    [ -b "$p" ] || continue
    cp -a "$p" "$mnt/dev/"
    local u
    u=$(blkid -s UUID -o value "$p" || true)
    [ -n "$u" ] && ln -sf "../../$(basename "$p")" "$mnt/dev/disk/by-uuid/$u"
  done
  chroot "$mnt" grub-install --target=i386-pc "$loop" >&2
  chroot "$mnt" update-initramfs -u -k all >&2
  chroot "$mnt" update-grub >&2
  umount "$mnt/dev" "$mnt/sys" "$mnt/proc"
}

build_image() {
  # Globals, not locals: the EXIT trap that cleans up runs after this function returned.
  loop="" mnt="" root_dev="" boot_dev="" swap_dev=""
  truncate -s 0 "$img.tmp"
  truncate -s 2G "$img.tmp"
  case $variant in
    plain|xfs) printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$img.tmp" ;;
    sepboot) printf 'label: gpt\nstart=2048, size=1MiB, type=21686148-6449-6E6F-744E-656564454649\nsize=300MiB\nsize=64MiB, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F\ntype=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n' | sfdisk -q "$img.tmp" ;;
    *) echo "unknown variant $variant" >&2; exit 2 ;;
  esac
  loop=$(losetup -f --show "$img.tmp")
  mnt=$(mktemp -d)
  cleanup() { umount -R "$mnt" 2>/dev/null || true; losetup -d "$loop" 2>/dev/null || true; rmdir "$mnt" 2>/dev/null || true; }
  trap cleanup EXIT
  partx -a "$loop" 2>/dev/null || true
  case $variant in
    plain) root_dev=${loop}p1; mkfs.ext4 -q -L smsroot "$root_dev" ;;
    xfs) root_dev=${loop}p1; mkfs.xfs -q -L smsroot "$root_dev" ;;
    sepboot) boot_dev=${loop}p2; swap_dev=${loop}p3; root_dev=${loop}p4
      mkfs.ext4 -q -L smsboot "$boot_dev"; mkswap -L smsswap "$swap_dev" >/dev/null; mkfs.ext4 -q -L smsroot "$root_dev" ;;
  esac
  mount "$root_dev" "$mnt"
  tar -C "$mnt" --numeric-owner --xattrs -xf "$tarball"
  # The marker waits for getty.target, not multi-user.target itself: under TCG on a busy
  # host, dbus and logind (also wanted by multi-user.target) took minutes to start.
  cat >"$mnt/etc/systemd/system/sms-boot-marker.service" <<'UNIT'
[Unit]
Description=Boot test marker: the login prompts of multi-user.target are up
After=getty.target systemd-user-sessions.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "SMS-BOOT-OK root=$(findmnt -no SOURCE /) boot=$(findmnt -no SOURCE /boot || echo -)" >/dev/ttyS0'
ExecStartPost=/bin/systemctl --no-block poweroff

[Install]
WantedBy=multi-user.target
UNIT
  chroot "$mnt" systemctl enable sms-boot-marker.service >/dev/null 2>&1
  {
    echo "UUID=$(blkid -s UUID -o value "$root_dev") / $(blkid -s TYPE -o value "$root_dev") defaults 0 1"
    if [ -n "${boot_dev:-}" ]; then
      mkdir -p "$mnt/boot.new"; mount "$boot_dev" "$mnt/boot.new"
      cp -a "$mnt/boot/." "$mnt/boot.new/"; umount "$mnt/boot.new"; rmdir "$mnt/boot.new"
      rm -rf "${mnt:?}/boot/"*
      mount "$boot_dev" "$mnt/boot"
      echo "UUID=$(blkid -s UUID -o value "$boot_dev") /boot ext4 defaults 0 2"
    fi
    [ -n "${swap_dev:-}" ] && echo "UUID=$(blkid -s UUID -o value "$swap_dev") none swap sw 0 0"
  } >"$mnt/etc/fstab"
  chroot_boot "$mnt" "$loop"
  sync
  cleanup
  trap - EXIT
  mv "$img.tmp" "$img"
}

[ -s "$tarball" ] || build_tree
[ -s "$img" ] || { say "building $variant image"; build_image; }
echo "$img"
