//! Where the partitions of a source disk go on a target disk: the source's sizes when they
//! fit (the last partition grown to the end of a larger disk, as the reference's
//! `adjust_size` allows), else each filesystem shrunk towards what it uses plus a margin.

use crate::code::Code;
use crate::file::layout::{Disk, Part, Table};

use super::PrepareError;

const MIB: u64 = 1 << 20;

/// A partition as it will be made on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    /// Partition number.
    pub number: u32,
    /// Start in bytes.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
}

fn up_mib(n: u64) -> u64 {
    n.div_ceil(MIB).saturating_mul(MIB)
}

/// The smallest size the tool makes of each filesystem type (mkfs.xfs refuses less than
/// 300 MiB; mkfs.btrfs less than about 114 MiB).
fn fs_min(t: &str) -> u64 {
    match t {
        "xfs" => 300 * MIB,
        "btrfs" => 128 * MIB,
        "vfat" => 33 * MIB,
        _ => 8 * MIB,
    }
}

/// What a partition needs at least: its used bytes plus 10 % and 256 MiB (at most its source
/// size), or its whole source size when nothing tells what it uses.
fn needed(p: &Part) -> u64 {
    match &p.fs {
        Some(f) if f.fs_type != "swap" && !f.mount.is_empty() && f.used > 0 => {
            let want = up_mib(f.used + f.used / 10 + 256 * MIB).max(fs_min(&f.fs_type));
            want.min(up_mib(p.size)).max(fs_min(&f.fs_type))
        }
        _ => up_mib(p.size),
    }
}

/// Plans `d`'s partitions on a target disk of `target` bytes.
pub fn plan_disk(d: &Disk, target: u64) -> Result<Vec<Planned>, PrepareError> {
    if d.table == Table::None {
        let need = d.whole.as_ref().map_or(0, |f| f.used);
        if target < need {
            return Err(PrepareError::new(
                Code::DiskTooSmallForPartitions,
                format!(
                    "disk {}: the target has {target} bytes, the filesystem uses {need}",
                    d.name
                ),
            ));
        }
        return Ok(Vec::new());
    }
    // GPT keeps its backup at the end; MBR needs nothing there, but 1 MiB costs little.
    let end = (target / MIB).saturating_sub(1) * MIB;
    let first = up_mib(d.parts.first().map_or(MIB, |p| p.start).max(MIB));
    let place = |sizes: &[u64]| -> Vec<Planned> {
        let mut at = first;
        d.parts
            .iter()
            .zip(sizes)
            .map(|(p, s)| {
                let out = Planned {
                    number: p.number,
                    start: at,
                    size: *s,
                };
                at += s;
                out
            })
            .collect()
    };
    let source: Vec<u64> = d.parts.iter().map(|p| up_mib(p.size)).collect();
    let total = |sizes: &[u64]| first + sizes.iter().sum::<u64>();
    let mut sizes = if total(&source) <= end {
        source
    } else {
        let min: Vec<u64> = d.parts.iter().map(needed).collect();
        if total(&min) > end {
            return Err(PrepareError::new(
                Code::DiskTooSmallForPartitions,
                format!(
                    "disk {}: the target has {target} bytes; its partitions need at least {} even shrunk to their used space plus a margin",
                    d.name,
                    total(&min) + MIB
                ),
            ));
        }
        min
    };
    // The last partition takes the rest, when it holds a filesystem that can use it.
    let sum_but_last: u64 = sizes.iter().rev().skip(1).sum();
    if let Some(last) = d.parts.last() {
        if last.fs.as_ref().is_some_and(|f| f.fs_type != "swap") {
            if let Some(s) = sizes.last_mut() {
                *s = end - first - sum_but_last;
            }
        }
    }
    Ok(place(&sizes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::layout::Fs;

    fn part(n: u32, start: u64, size: u64, fs: Option<(&str, u64, &str)>) -> Part {
        Part {
            number: n,
            start,
            size,
            type_id: "83".into(),
            bootable: false,
            label: String::new(),
            fs: fs.map(|(t, used, m)| Fs {
                fs_type: t.into(),
                uuid: String::new(),
                label: String::new(),
                used,
                mount: m.into(),
                inode_size: 0,
            }),
        }
    }

    fn disk() -> Disk {
        Disk {
            name: "d".into(),
            size: 2048 * MIB,
            table: Table::Mbr,
            parts: vec![
                part(1, MIB, 300 * MIB, Some(("ext4", 50 * MIB, "/boot"))),
                part(2, 301 * MIB, 64 * MIB, Some(("swap", 0, ""))),
                part(3, 365 * MIB, 1683 * MIB, Some(("ext4", 700 * MIB, "/"))),
            ],
            whole: None,
        }
    }

    #[test]
    fn same_or_larger_disk_keeps_sizes_and_grows_the_last() {
        let p = plan_disk(&disk(), 2048 * MIB).unwrap();
        assert_eq!(
            p[0],
            Planned {
                number: 1,
                start: MIB,
                size: 300 * MIB
            }
        );
        assert_eq!(p[1].start, 301 * MIB);
        assert_eq!(p[2].start + p[2].size, 2047 * MIB);
        let big = plan_disk(&disk(), 4096 * MIB).unwrap();
        assert_eq!(big[2].start + big[2].size, 4095 * MIB);
        assert_eq!(big[0].size, 300 * MIB);
    }

    #[test]
    fn smaller_disk_shrinks_to_used_plus_margin_or_refuses() {
        let p = plan_disk(&disk(), 1400 * MIB).unwrap();
        // /boot: 50 MiB used + 10 % + 256 MiB = 311 MiB > its 300: kept at 300.
        assert_eq!(p[0].size, 300 * MIB);
        assert_eq!(p[1].size, 64 * MIB);
        assert!(p[2].size >= 700 * MIB + 70 * MIB + 256 * MIB);
        assert_eq!(p[2].start + p[2].size, 1399 * MIB);
        let e = plan_disk(&disk(), 1200 * MIB).unwrap_err();
        assert_eq!(e.code, Code::DiskTooSmallForPartitions);
        assert!(e.message.contains("disk d"), "{}", e.message);
    }
}
