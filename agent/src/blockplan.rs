//! Which bytes of a source disk a block pass must read: the partition table and every region
//! no partition covers in full, and inside each partition what its filesystem says is in use
//! (ext2/3/4 and XFS by GETFSMAP when mounted or their on-disk maps otherwise, LVM PVs by
//! their LV extents); anything we cannot read the allocation of is read in full.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use probe::io::Slice;

/// Bytes of a swap area kept: its header page, for any page size up to 64 KiB.
const SWAP_HEADER: u64 = 64 << 10;

/// The used ranges of `dev` and notes on how each region was mapped.
pub fn used_ranges(dev: &Path) -> std::io::Result<(Vec<Range<u64>>, Vec<String>)> {
    let mut f = File::open(dev)?;
    let size = f.seek(SeekFrom::End(0))?;
    let mut notes = Vec::new();
    let mut used = Vec::new();
    let table = match probe::ptable::read(&f, size, 512) {
        Ok(t) => t,
        Err(e) => {
            notes.push(format!("partition table unreadable ({e}); whole disk read"));
            return Ok((std::iter::once(0..size).collect(), notes));
        }
    };
    let parts: Vec<(u32, u64, u64)> = match &table {
        Some(t) => t
            .partitions
            .iter()
            .filter(|p| !matches!(p.kind, probe::ptable::PartKind::Mbr { extended: true, .. }))
            .filter(|p| p.size > 0 && p.start < size)
            .map(|p| (p.number, p.start, p.size.min(size - p.start)))
            .collect(),
        None => vec![(0, 0, size)],
    };
    // Gaps between partitions (tables, EBRs, backup GPT, boot loader code) are read in full.
    let mut at = 0;
    let mut sorted = parts.clone();
    sorted.sort_by_key(|p| p.1);
    for &(_, start, len) in &sorted {
        if start > at {
            used.push(at..start);
        }
        at = at.max(start + len);
    }
    if at < size {
        used.push(at..size);
    }
    let mounts = mount_points();
    for (number, start, len) in parts {
        let node = if number == 0 {
            Some(dev.to_path_buf())
        } else {
            partition_node(dev, number)
        };
        let mount = node
            .as_deref()
            .and_then(|n| std::fs::metadata(n).ok())
            .filter(|m| m.file_type().is_block_device())
            .and_then(|m| mounts.iter().find(|(d, _)| *d == m.rdev()))
            .map(|(_, p)| p.clone());
        let (ranges, how) = partition_used(&f, start, len, node.as_deref(), mount.as_deref());
        notes.push(format!(
            "partition {number} at {start} ({len} bytes): {how}"
        ));
        used.extend(ranges.into_iter().map(|r| r.start + start..r.end + start));
    }
    Ok((used, notes))
}

fn partition_used(
    f: &File,
    start: u64,
    len: u64,
    node: Option<&Path>,
    mount: Option<&Path>,
) -> (Vec<Range<u64>>, String) {
    let fs = probe::fsdetect::detect(&Slice::new(f, start, len), len)
        .ok()
        .flatten()
        .map(|i| i.fs_type)
        .unwrap_or("unknown");
    let full = |why: String| (std::iter::once(0..len).collect(), why);
    let mapped = match (fs, mount) {
        ("ext2" | "ext3" | "ext4" | "xfs", Some(mp)) => probe::alloc::fsmap_used(mp, len)
            .map(|r| (r, format!("{fs} mounted at {}, GETFSMAP", mp.display()))),
        ("ext2" | "ext3" | "ext4", None) => {
            probe::alloc::ext4_used(f, start, len).map(|r| (r, format!("{fs}, block bitmaps")))
        }
        ("xfs", None) => {
            probe::alloc::xfs_used(f, start, len).map(|r| (r, "xfs, free-space btrees".into()))
        }
        // A migrated host boots afresh: only the header (signature, UUID, label) of a swap
        // area matters. fsdetect names only SWAPSPACE2 headers swap, so a hibernation
        // image (S1SUSPEND) is still read in full.
        ("swap", _) => {
            return (
                std::iter::once(0..len.min(SWAP_HEADER)).collect(),
                "swap: header only".into(),
            )
        }
        ("LVM2_member", _) => match node.and_then(|n| lvm_used(n, len)) {
            Some(r) => return (r, "LVM PV, metadata and LV extents".into()),
            None => return full("LVM PV, extents unknown: read in full".into()),
        },
        _ => return full(format!("{fs}: read in full")),
    };
    match mapped {
        Ok((r, how)) => (r, how),
        Err(e) => full(format!("{fs}: allocation unknown ({e}): read in full")),
    }
}

/// (device number, mount point) of every mount.
fn mount_points() -> Vec<(u64, PathBuf)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    probe::mounts::parse_mountinfo(&text)
        .0
        .into_iter()
        .map(|m| {
            let (ma, mi) = m.dev;
            (
                nix::sys::stat::makedev(u64::from(ma), u64::from(mi)),
                PathBuf::from(m.mount_point),
            )
        })
        .collect()
}

/// `/dev/sda` + 1 → `/dev/sda1`; `/dev/loop0` + 1 → `/dev/loop0p1`.
fn partition_node(dev: &Path, n: u32) -> Option<PathBuf> {
    let canon = std::fs::canonicalize(dev).ok()?;
    let name = canon.file_name()?.to_str()?;
    let p = canon.with_file_name(probe::blockdev::partition_name(name, n));
    p.exists().then_some(p)
}

/// The PV's metadata area and its allocated extents, from `pvs --segments`.
fn lvm_used(pv: &Path, len: u64) -> Option<Vec<Range<u64>>> {
    let out = std::process::Command::new("lvm")
        .args([
            "pvs",
            "--readonly",
            "--segments",
            "--units",
            "b",
            "--nosuffix",
            "--noheadings",
            "--separator",
            ";",
            "-o",
            "pe_start,vg_extent_size,pvseg_start,pvseg_size,lv_name",
        ])
        .arg(pv)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut used = Vec::new();
    let mut seen = false;
    for line in text.lines() {
        let f: Vec<&str> = line.trim().split(';').collect();
        let [pe_start, ext, seg_start, seg_size, lv] = f[..] else {
            continue;
        };
        let (pe_start, ext): (u64, u64) = (pe_start.parse().ok()?, ext.parse().ok()?);
        let (s, n): (u64, u64) = (seg_start.parse().ok()?, seg_size.parse().ok()?);
        if !seen {
            used.push(0..pe_start.min(len));
            seen = true;
        }
        if !lv.trim().is_empty() {
            let a = pe_start.saturating_add(s.saturating_mul(ext));
            used.push(a.min(len)..a.saturating_add(n.saturating_mul(ext)).min(len));
        }
    }
    seen.then_some(used)
}
