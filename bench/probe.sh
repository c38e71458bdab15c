#!/usr/bin/env bash
# Benchmark: `sms-agent probe` against the tools doing the same inventory work
# (lsblk -J -b -O, blkid -p per device, vgs/lvs JSON, btrfs subvolume list per mounted Btrfs).
# Reports the median wall time and peak RSS of N runs of each, and the ratio ours ÷ baseline,
# first on the machine as it is, then with 8 loop disks attached (partitioned, ext4/xfs/btrfs/PV).
# Run as root: sudo bench/probe.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-15}
export LVM_SUPPRESS_FD_WARNINGS=1
command -v /usr/bin/time >/dev/null || apt-get install -y -qq time >/dev/null
cargo build --release -q -p sms-agent
BIN=$PWD/target/release/sms-agent

WORK=$(mktemp -d)
LOOPS=()
cleanup() {
  set +e
  grep -o "$WORK/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount "$m"; done
  for vg in $(vgs --noheadings -o vg_name 2>/dev/null | grep benchvg); do vgremove -f "$vg" >/dev/null 2>&1; done
  for l in "${LOOPS[@]}"; do wipefs -a -q "$l"; partx -d "$l" 2>/dev/null; losetup -d "$l"; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# The baseline: what an operator (or the vendor's shell agent) runs to learn the same facts.
cat > "$WORK/baseline.sh" <<'EOS'
#!/usr/bin/env bash
lsblk -J -b -O >/dev/null
for d in $(lsblk -nrpo NAME); do blkid -p "$d" >/dev/null 2>&1 || true; done
vgs --reportformat json --units b >/dev/null 2>&1 || true
lvs --reportformat json --units b >/dev/null 2>&1 || true
for m in $(awk '$3 == "btrfs" {print $2}' /proc/mounts); do btrfs subvolume list -a -u -q -p "$m" >/dev/null; done
EOS
chmod +x "$WORK/baseline.sh"

# measure CMD... → prints "median_seconds median_peak_rss_kib" over RUNS runs (GNU time's %M:
# the largest resident set of the process and its children).
measure() {
  local out; out=$(mktemp)
  for _ in $(seq "$RUNS"); do
    local t0 t1 rss
    t0=$(date +%s%N)
    /usr/bin/time -f "%M" -o "$out.rss" "$@" >/dev/null 2>&1 || true
    t1=$(date +%s%N)
    rss=$(grep -E '^[0-9]+$' "$out.rss" | tail -1)
    echo "$(( (t1 - t0) / 1000 ))e-6 $rss" >> "$out"
  done
  rm -f "$out.rss"
  python3 - "$out" <<'EOP'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if len(l.split()) == 2]
print(f"{statistics.median(float(r[0]) for r in rows):.4f} {int(statistics.median(int(r[1]) for r in rows))}")
EOP
  rm -f "$out"
}

report() {
  local label=$1; shift
  read -r ours_t ours_m < <(measure "$BIN" probe "$@")
  read -r base_t base_m < <(measure "$WORK/baseline.sh")
  python3 - "$label" "$ours_t" "$ours_m" "$base_t" "$base_m" <<'EOP'
import sys
label, ot, om, bt, bm = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
print(f"{label}: sms-agent probe {ot*1000:.1f} ms, {om} KiB peak | baseline {bt*1000:.1f} ms, {bm} KiB peak (largest process) | time ratio {ot/max(bt,1e-3):.2f}, memory ratio {om/bm:.2f}")
EOP
}

report "as is"

ARGS=()
for i in $(seq 1 8); do
  img="$WORK/d$i.img"; truncate -s 1G "$img"
  l=$(losetup -f --show "$img"); LOOPS+=("$l"); ARGS+=(--device "$l")
  sgdisk -o -n1:0:+100M -n2:0:+320M -n3:0:+200M -n4:0:+100M -t4:8E00 "$l" >/dev/null 2>&1
  partx -a "$l"; sleep 0.2
  mkfs.ext4 -q "${l}p1"; mkfs.xfs -q -f "${l}p2"; mkfs.btrfs -q -f "${l}p3" >/dev/null
  pvcreate -q -ff -y "${l}p4" >/dev/null; vgcreate -q "benchvg$i" "${l}p4" >/dev/null
  mkdir -p "$WORK/m$i/e" "$WORK/m$i/x" "$WORK/m$i/b"
  mount "${l}p1" "$WORK/m$i/e"; mount "${l}p2" "$WORK/m$i/x"; mount "${l}p3" "$WORK/m$i/b"
  btrfs -q subvolume create "$WORK/m$i/b/sub"
done
report "8 loop disks" "${ARGS[@]}"
