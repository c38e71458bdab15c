#!/usr/bin/env bash
# Boot tests that need minutes each under TCG and so stay out of CI: every case migrates a
# bootable Debian disk (tests/boot/source-image.sh, cached in /var/cache/sms-agent-tests)
# and boots the copy in qemu until the marker unit reports the login prompts are up.
#
#   sudo bench/boot.sh [FILTER]
#
# Cases (tests/tests/boot.rs, #[ignore]d there; CI runs file_migration_onto_blank_disks_boots_in_qemu):
#   block_migration_onto_a_blank_disk_boots_in_qemu                      block level, MBR, ext4 root
#   file_migration_with_separate_boot_and_swap_onto_a_smaller_disk_boots  GPT, BIOS boot partition,
#                                                                         /boot, swap, / onto 1600 MiB
#   file_migration_of_an_xfs_root_boots                                   MBR, XFS root
# Prints each case's time and writes bench/results/boot-DATE.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench/boot.sh: run as root (loop devices, mounts)" >&2; exit 1; }
filter=${1:-}
out=bench/results/boot-$(date -u +%Y%m%d-%H%M%S).txt
cargo build --workspace --locked >&2
cases="block_migration_onto_a_blank_disk_boots_in_qemu file_migration_with_separate_boot_and_swap_onto_a_smaller_disk_boots file_migration_of_an_xfs_root_boots file_migration_onto_blank_disks_boots_in_qemu"
fail=0
for c in $cases; do
  [ -n "$filter" ] && [[ $c != *"$filter"* ]] && continue
  t0=$SECONDS
  if cargo test -p sms-tests --locked --test boot -- --include-ignored --exact "$c" >"/tmp/boot-$c.log" 2>&1; then
    v=pass
  else
    v=FAIL; fail=1
  fi
  printf '%-72s %s %4d s\n' "$c" "$v" $((SECONDS - t0)) | tee -a "$out"
  [ $v = pass ] || tail -30 "/tmp/boot-$c.log" >&2
done
echo "results: $out" >&2
exit $fail
