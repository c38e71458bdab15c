//! Which block devices are whole disks worth reporting, and their partitions, from sysfs.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::warn::Warnings;

/// Units of the sysfs `size` and `start` attributes: always 512-byte sectors, whatever the
/// device's logical block size (Documentation/ABI/stable/sysfs-block).
const SYSFS_SECTOR: u64 = 512;

/// SCSI peripheral device type of CD/DVD drives (SPC-4, table "Peripheral device type": 05h).
const SCSI_TYPE_ROM: &str = "5";

/// A whole disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Kernel name (`vda`, `nvme0n1`, `cciss!c0d0`).
    pub name: String,
    /// Device node (`/dev/vda`, `/dev/cciss/c0d0`).
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Logical sector size in bytes.
    pub logical_sector: u64,
    /// Device number.
    pub dev: (u32, u32),
    /// Partitions the kernel knows of.
    pub parts: Vec<SysPart>,
}

/// A partition as the kernel sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysPart {
    /// Kernel name (`vda1`, `nvme0n1p1`).
    pub name: String,
    /// Partition number.
    pub number: u32,
    /// Start in bytes from the beginning of the disk.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Device number.
    pub dev: (u32, u32),
}

/// What to do with a block device found in `/sys/block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// A disk to report.
    Disk,
    /// Reported only when named explicitly (loop, nbd: snap loops and scratch devices).
    OnlyNamed,
    /// Never a disk (ram, zram, device-mapper, md, optical, floppy, eMMC boot areas).
    Never,
}

fn classify(name: &str) -> Class {
    const NEVER: &[&str] = &["ram", "zram", "dm-", "md", "sr", "fd", "scd", "pmem", "zd"];
    const ONLY_NAMED: &[&str] = &["loop", "nbd"];
    if ONLY_NAMED.iter().any(|p| name.starts_with(p)) {
        return Class::OnlyNamed;
    }
    if NEVER.iter().any(|p| name.starts_with(p)) {
        return Class::Never;
    }
    // eMMC hardware boot areas and the replay-protected block are not user disks.
    if name.starts_with("mmcblk") && (name.contains("boot") || name.ends_with("rpmb")) {
        return Class::Never;
    }
    Class::Disk
}

/// `/dev` path of a kernel block device name (`cciss!c0d0` → `/dev/cciss/c0d0`).
pub fn dev_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/dev/{}", name.replace('!', "/")))
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn read_u64(p: &Path) -> Option<u64> {
    read_trim(p)?.parse().ok()
}

fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Lists the disks to report: every real whole disk in `root/sys/block`, plus the loop/nbd
/// devices named in `named` (paths to device nodes).
pub fn list(root: &Path, named: &[PathBuf], warnings: &mut Warnings) -> Vec<Disk> {
    let sys_block = root.join("sys/block");
    let mut wanted: Vec<String> = Vec::new();
    for p in named {
        if let Some(name) = resolve_named(root, p, warnings) {
            if !wanted.contains(&name) {
                wanted.push(name);
            }
        }
    }
    let entries = match fs::read_dir(&sys_block) {
        Ok(e) => e,
        Err(e) => {
            warnings.push(
                sys_block.display().to_string(),
                format!("cannot list block devices: {e}"),
            );
            return Vec::new();
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort_by_key(|n| natural_key(n));
    let mut disks = Vec::new();
    for name in names {
        let explicit = wanted.contains(&name);
        let keep = match classify(&name) {
            Class::Disk => true,
            Class::OnlyNamed => explicit,
            Class::Never => {
                if explicit {
                    warnings.push(dev_path(&name).display().to_string(), "is not a disk (ram, zram, device-mapper, md or optical device); not reported");
                }
                false
            }
        };
        if !keep {
            continue;
        }
        let dir = sys_block.join(&name);
        // Hidden devices are NVMe multipath legs; the namespace head is reported instead.
        if read_trim(&dir.join("hidden")).as_deref() == Some("1") {
            continue;
        }
        if read_trim(&dir.join("device/type")).as_deref() == Some(SCSI_TYPE_ROM) {
            continue;
        }
        match read_disk(&dir, &name) {
            Ok(d) => {
                // An empty loop device or a card reader with no medium has size 0.
                if d.size == 0 && !explicit {
                    continue;
                }
                disks.push(d);
            }
            Err(reason) => warnings.push(dev_path(&name).display().to_string(), reason),
        }
    }
    for w in &wanted {
        if !disks.iter().any(|d| &d.name == w) {
            warnings.push(
                dev_path(w).display().to_string(),
                "named with --device but not found in /sys/block",
            );
        }
    }
    disks
}

/// Orders `sdz` before `sdaa` and `loop2` before `loop10`, as people read them.
fn natural_key(s: &str) -> (usize, String) {
    (s.len(), s.to_string())
}

fn read_disk(dir: &Path, name: &str) -> Result<Disk, String> {
    let sectors = read_u64(&dir.join("size")).ok_or("cannot read its size from sysfs")?;
    let dev = read_trim(&dir.join("dev"))
        .and_then(|s| parse_dev(&s))
        .ok_or("cannot read its device number from sysfs")?;
    let logical_sector = read_u64(&dir.join("queue/logical_block_size")).unwrap_or(SYSFS_SECTOR);
    let mut parts = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            let pdir = e.path();
            let Some(number) = read_u64(&pdir.join("partition")) else {
                continue;
            };
            let pname = e.file_name().to_string_lossy().into_owned();
            let (Some(start), Some(size), Some(pdev), Ok(number)) = (
                read_u64(&pdir.join("start")),
                read_u64(&pdir.join("size")),
                read_trim(&pdir.join("dev")).and_then(|s| parse_dev(&s)),
                u32::try_from(number),
            ) else {
                continue;
            };
            parts.push(SysPart {
                name: pname,
                number,
                start: start.saturating_mul(SYSFS_SECTOR),
                size: size.saturating_mul(SYSFS_SECTOR),
                dev: pdev,
            });
        }
    }
    parts.sort_by_key(|p| p.number);
    Ok(Disk {
        name: name.to_string(),
        path: dev_path(name),
        size: sectors.saturating_mul(SYSFS_SECTOR),
        logical_sector,
        dev,
        parts,
    })
}

/// Splits a `st_rdev` into (major, minor).
pub fn split_rdev(rdev: u64) -> Option<(u32, u32)> {
    Some((
        u32::try_from(nix::sys::stat::major(rdev)).ok()?,
        u32::try_from(nix::sys::stat::minor(rdev)).ok()?,
    ))
}

/// Turns a `--device` path into its kernel name, warning when it is not a whole block device.
fn resolve_named(root: &Path, p: &Path, warnings: &mut Warnings) -> Option<String> {
    let shown = p.display().to_string();
    let meta = match fs::metadata(p) {
        Ok(m) => m,
        Err(e) => {
            warnings.push(shown, format!("cannot read it: {e}"));
            return None;
        }
    };
    if !meta.file_type().is_block_device() {
        warnings.push(shown, "is not a block device; not reported");
        return None;
    }
    use std::os::unix::fs::MetadataExt;
    let rdev = meta.rdev();
    let Some((major, minor)) = split_rdev(rdev) else {
        warnings.push(shown, "has a device number out of range");
        return None;
    };
    let link = root.join(format!("sys/dev/block/{major}:{minor}"));
    let target = match fs::read_link(&link) {
        Ok(t) => t,
        Err(e) => {
            warnings.push(shown, format!("no sysfs entry {}: {e}", link.display()));
            return None;
        }
    };
    if link.join("partition").exists() {
        warnings.push(shown, "is a partition; name the whole disk with --device");
        return None;
    }
    target.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// The node name of partition `number` of disk `disk` (`vda`+1 → `vda1`, `nvme0n1`+1 →
/// `nvme0n1p1`, `loop0`+1 → `loop0p1`): a `p` separates them when the disk name ends in a digit.
pub fn partition_name(disk: &str, number: u32) -> String {
    if disk.ends_with(|c: char| c.is_ascii_digit()) {
        format!("{disk}p{number}")
    } else {
        format!("{disk}{number}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    #[test]
    fn classifies_devices() {
        for d in [
            "vda",
            "sda",
            "xvda",
            "nvme0n1",
            "mmcblk0",
            "hda",
            "cciss!c0d0",
        ] {
            assert_eq!(classify(d), Class::Disk, "{d}");
        }
        for d in [
            "ram0",
            "zram0",
            "dm-0",
            "md127",
            "sr0",
            "fd0",
            "mmcblk0boot0",
            "mmcblk0rpmb",
        ] {
            assert_eq!(classify(d), Class::Never, "{d}");
        }
        for d in ["loop0", "loop12", "nbd0"] {
            assert_eq!(classify(d), Class::OnlyNamed, "{d}");
        }
    }

    #[test]
    fn partition_names() {
        assert_eq!(partition_name("vda", 1), "vda1");
        assert_eq!(partition_name("nvme0n1", 2), "nvme0n1p2");
        assert_eq!(partition_name("mmcblk0", 1), "mmcblk0p1");
        assert_eq!(partition_name("loop3", 5), "loop3p5");
        assert_eq!(dev_path("cciss!c0d0"), PathBuf::from("/dev/cciss/c0d0"));
    }

    #[test]
    fn lists_disks_from_fake_sysfs() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        write(r, "sys/block/vda/size", "83886080\n");
        write(r, "sys/block/vda/dev", "252:0\n");
        write(r, "sys/block/vda/queue/logical_block_size", "512\n");
        write(r, "sys/block/vda/vda1/partition", "1\n");
        write(r, "sys/block/vda/vda1/start", "2048\n");
        write(r, "sys/block/vda/vda1/size", "2048\n");
        write(r, "sys/block/vda/vda1/dev", "252:1\n");
        write(r, "sys/block/vda/vda10/partition", "10\n");
        write(r, "sys/block/vda/vda10/start", "4096\n");
        write(r, "sys/block/vda/vda10/size", "8\n");
        write(r, "sys/block/vda/vda10/dev", "252:10\n");
        write(r, "sys/block/sr0/size", "2048\n");
        write(r, "sys/block/sr0/dev", "11:0\n");
        write(r, "sys/block/loop0/size", "2048\n");
        write(r, "sys/block/loop0/dev", "7:0\n");
        write(r, "sys/block/sdb/size", "2048\n");
        write(r, "sys/block/sdb/dev", "8:16\n");
        write(r, "sys/block/sdb/device/type", "5\n");
        write(r, "sys/block/nvme0c0n1/size", "2048\n");
        write(r, "sys/block/nvme0c0n1/dev", "259:9\n");
        write(r, "sys/block/nvme0c0n1/hidden", "1\n");
        write(r, "sys/block/sdc/size", "not a number\n");
        let mut w = Warnings::default();
        let disks = list(r, &[], &mut w);
        assert_eq!(disks.len(), 1, "{disks:?}");
        let d = &disks[0];
        assert_eq!(d.path, PathBuf::from("/dev/vda"));
        assert_eq!(d.size, 83_886_080 * 512);
        assert_eq!(d.dev, (252, 0));
        assert_eq!(d.parts.len(), 2);
        assert_eq!(d.parts[0].start, 2048 * 512);
        assert_eq!(d.parts[1].number, 10);
        assert_eq!(w.as_slice().len(), 1, "{:?}", w.as_slice());
        assert_eq!(w.as_slice()[0].subject, "/dev/sdc");
    }

    #[test]
    fn named_devices_are_checked() {
        let t = tempfile::tempdir().unwrap();
        let mut w = Warnings::default();
        let disks = list(
            t.path(),
            &[
                PathBuf::from("/nonexistent"),
                PathBuf::from("/etc/hostname"),
            ],
            &mut w,
        );
        assert!(disks.is_empty());
        let subjects: Vec<_> = w.as_slice().iter().map(|w| w.subject.as_str()).collect();
        assert!(subjects.contains(&"/nonexistent"), "{subjects:?}");
        assert!(w
            .as_slice()
            .iter()
            .any(|w| w.reason.contains("not a block device")));
    }
}
