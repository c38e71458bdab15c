//! Disks, partitions, LVM and Btrfs put together into the registration model, with the
//! `device_use` rules of the SMS API (docs/sms-api.md §4).

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::blockdev::{self, Disk};
use crate::btrfs;
use crate::fsdetect::{self as superblock, FsInfo};
use crate::io::Slice;
use crate::lvm;
use crate::model::{BtrfsFileSystem, LogicalVolumes, PhysicalVolume, ServerDisk, VolumeGroups};
use crate::mounts::{self, MountEntry};
use crate::ptable::{self as parttable, PartKind};
use crate::warn::Warnings;

/// `device_use` values (docs/sms-api.md §4).
pub mod device_use {
    /// Holds the boot partition.
    pub const BOOT: &str = "BOOT";
    /// Holds the root filesystem.
    pub const OS: &str = "OS";
    /// Anything else.
    pub const NORMAL: &str = "NORMAL";
    /// An LVM physical volume.
    pub const VOLUME_GROUP: &str = "VOLUME_GROUP";
    /// A Btrfs member.
    pub const BTRFS: &str = "BTRFS";
}

/// `file_system` of an LVM physical volume, as blkid names it.
const LVM_MEMBER: &str = "LVM2_member";

/// Mount points that make a partition the boot partition.
const BOOT_MOUNTS: &[&str] = &["/boot", "/boot/efi"];

/// The storage part of the registration body.
#[derive(Debug, Default)]
pub struct Storage {
    /// Whole disks with partitions.
    pub disks: Vec<ServerDisk>,
    /// LVM volume groups on those disks.
    pub volume_groups: Vec<VolumeGroups>,
    /// Btrfs filesystems on those disks.
    pub btrfs_list: Vec<BtrfsFileSystem>,
}

/// Mount table entries with their sources resolved, looked up by device.
struct MountTable {
    entries: Vec<(MountEntry, Option<PathBuf>)>,
}

impl MountTable {
    fn new(entries: Vec<MountEntry>) -> Self {
        let entries = entries
            .into_iter()
            .map(|e| {
                // `/dev/disk/by-uuid/…` and `/dev/root` style sources resolve to the node.
                let canon = e
                    .source
                    .starts_with("/dev/")
                    .then(|| fs::canonicalize(&e.source).ok())
                    .flatten();
                (e, canon)
            })
            .collect();
        Self { entries }
    }

    /// Every mount of the block device `dev` (node `path`), the whole-filesystem one first.
    fn of(&self, dev: (u32, u32), path: &Path) -> Vec<MountEntry> {
        let mut found: Vec<MountEntry> = self
            .entries
            .iter()
            // (0, 0) stands for "the kernel has no node for it"; it must not match anything.
            .filter(|(e, canon)| (dev != (0, 0) && e.dev == dev) || canon.as_deref() == Some(path))
            .map(|(e, _)| e.clone())
            .collect();
        found.sort_by_key(|e| e.root != "/");
        found
    }
}

/// What the scan learnt about one partition or whole-disk filesystem.
struct Volume {
    pv: PhysicalVolume,
    dev: (u32, u32),
    fs: Option<FsInfo>,
    mounts: Vec<MountEntry>,
}

/// Scans the disks (every real disk plus the `named` loop/nbd devices) and what lives on them.
pub fn scan(root: &Path, named: &[PathBuf], warnings: &mut Warnings) -> Storage {
    let mountinfo = root.join("proc/self/mountinfo");
    let entries = match fs::read_to_string(&mountinfo) {
        Ok(text) => {
            let (entries, bad) = mounts::parse_mountinfo(&text);
            for b in bad {
                warnings.push(mountinfo.display().to_string(), b);
            }
            entries
        }
        Err(e) => {
            warnings.push(
                mountinfo.display().to_string(),
                format!("cannot read the mount table: {e}; mount points not reported"),
            );
            Vec::new()
        }
    };
    let mounts = MountTable::new(entries);
    let disks = blockdev::list(root, named, warnings);

    let mut out = Storage::default();
    // Per disk, the volumes found on it, to work out disk-level `device_use` at the end.
    let mut volumes: Vec<Vec<Volume>> = Vec::new();
    for disk in &disks {
        let (sd, vols) = scan_disk(disk, &mounts, warnings);
        out.disks.push(sd);
        volumes.push(vols);
    }

    let members: Vec<btrfs::Member> = volumes
        .iter()
        .flatten()
        .filter_map(|v| {
            let sb = v.fs.as_ref()?.btrfs.clone()?;
            Some(btrfs::Member {
                device: v.pv.name.clone(),
                sb,
                mounts: v.mounts.clone(),
            })
        })
        .collect();
    out.btrfs_list = btrfs::filesystems(root, &members, warnings);

    let pv_devs: Vec<(u32, u32)> = volumes
        .iter()
        .flatten()
        .filter(|v| v.pv.file_system == LVM_MEMBER)
        .map(|v| v.dev)
        .collect();
    if !pv_devs.is_empty() {
        match lvm::volume_groups() {
            Ok(vgs) => {
                out.volume_groups = vgs
                    .iter()
                    .filter(|vg| {
                        vg.pvs
                            .iter()
                            .any(|p| p.dev.is_some_and(|d| pv_devs.contains(&d)))
                    })
                    .map(|vg| volume_group(root, vg, &mounts, warnings))
                    .collect();
            }
            Err(e) => warnings.push("lvm", format!("volume groups not reported: {e}")),
        }
    }

    assign_disk_use(&mut out, &volumes);
    out
}

fn scan_disk(
    disk: &Disk,
    mounts: &MountTable,
    warnings: &mut Warnings,
) -> (ServerDisk, Vec<Volume>) {
    let path = disk.path.display().to_string();
    let mut sd = ServerDisk {
        name: path.clone(),
        device_use: device_use::NORMAL.to_string(),
        size: disk.size,
        ..Default::default()
    };
    let file = match File::open(&disk.path) {
        Ok(f) => Some(f),
        Err(e) => {
            warnings.push(
                path.clone(),
                format!("cannot open it to read its partition table: {e}"),
            );
            None
        }
    };
    let table =
        file.as_ref().and_then(
            |f| match parttable::read(f, disk.size, disk.logical_sector) {
                Ok(t) => t,
                Err(e) => {
                    warnings.push(path.clone(), format!("partition table unreadable: {e}"));
                    None
                }
            },
        );

    let mut vols = Vec::new();
    match table {
        Some(t) => {
            sd.partition_style = t.style.as_str().to_string();
            for note in &t.notes {
                warnings.push(path.clone(), note);
            }
            for p in &t.partitions {
                if matches!(p.kind, PartKind::Mbr { extended: true, .. }) {
                    continue;
                }
                let sys = disk.parts.iter().find(|s| s.number == p.number);
                if sys.is_some_and(|s| s.start != p.start || s.size != p.size) {
                    warnings.push(
                        path.clone(),
                        format!(
                            "partition {} differs between the disk and the kernel's view; reporting the disk's (re-read the table with partprobe)",
                            p.number
                        ),
                    );
                }
                let name = sys
                    .map(|s| s.name.clone())
                    .unwrap_or_else(|| blockdev::partition_name(&disk.name, p.number));
                let node = blockdev::dev_path(&name);
                let dev = sys.map(|s| s.dev).unwrap_or((0, 0));
                vols.push(scan_volume(
                    &node,
                    dev,
                    u64::from(p.number),
                    p.size,
                    file.as_ref().map(|f| (f, p.start)),
                    mounts,
                    warnings,
                ));
            }
        }
        None => {
            // No table: a bare filesystem/PV on the whole disk, an empty disk, or an unreadable
            // disk, for which the kernel's own partition list is the fallback.
            if !disk.parts.is_empty() {
                for s in &disk.parts {
                    vols.push(scan_volume(
                        &blockdev::dev_path(&s.name),
                        s.dev,
                        u64::from(s.number),
                        s.size,
                        None,
                        mounts,
                        warnings,
                    ));
                }
            } else {
                // The service's enum has no "none"; its own example reports whole-disk PVs as MBR.
                sd.partition_style = "MBR".to_string();
                let v = if file.is_some() {
                    scan_volume(&disk.path, disk.dev, 0, disk.size, None, mounts, warnings)
                } else {
                    mounted_only(&disk.path, disk.dev, disk.size, mounts, warnings)
                };
                match v.pv.file_system.as_str() {
                    // The service models a whole-disk PV as a disk with no partitions.
                    LVM_MEMBER => {
                        sd.device_use = device_use::VOLUME_GROUP.to_string();
                        vols.push(v);
                        sd.used_size = 0;
                        return (sd, vols);
                    }
                    "" => return (sd, vols),
                    _ => {
                        sd.inode_size = v.pv.inode_size;
                        vols.push(v);
                    }
                }
            }
        }
    }
    sd.physical_volumes = vols.iter().map(|v| v.pv.clone()).collect();
    sd.used_size = sd.physical_volumes.iter().map(|p| p.size).sum();
    (sd, vols)
}

/// A whole disk that cannot be opened but is mounted directly: what the mount table and
/// `statvfs` tell is still worth reporting.
fn mounted_only(
    node: &Path,
    dev: (u32, u32),
    size: u64,
    mounts: &MountTable,
    warnings: &mut Warnings,
) -> Volume {
    let ms = mounts.of(dev, node);
    let mut pv = PhysicalVolume {
        name: node.display().to_string(),
        size,
        used_size: size,
        device_use: device_use::NORMAL.to_string(),
        ..Default::default()
    };
    if let Some(m) = ms.first() {
        pv.file_system = m.fs_type.clone();
        pv.mount_point = m.mount_point.clone();
        pv.device_use = use_for_mount(&m.mount_point).to_string();
        apply_usage(&mut pv, &m.mount_point, warnings);
    }
    Volume {
        pv,
        dev,
        fs: None,
        mounts: ms,
    }
}

/// Describes one partition (or whole-disk filesystem): type, UUID, mount, usage.
fn scan_volume(
    node: &Path,
    dev: (u32, u32),
    index: u64,
    size: u64,
    via_disk: Option<(&File, u64)>,
    mounts: &MountTable,
    warnings: &mut Warnings,
) -> Volume {
    let name = node.display().to_string();
    let fs = detect_fs(node, size, via_disk, warnings);
    let mut pv = PhysicalVolume {
        name,
        index,
        size,
        used_size: size,
        device_use: device_use::NORMAL.to_string(),
        ..Default::default()
    };
    let ms = mounts.of(dev, node);
    if let Some(info) = &fs {
        pv.file_system = info.fs_type.to_string();
        pv.uuid = info.uuid.clone();
        pv.inode_size = info.inode_size;
        pv.inode_nums = info.inode_count;
        pv.size_per_cluster = info.block_size;
    }
    match pv.file_system.as_str() {
        LVM_MEMBER => pv.device_use = device_use::VOLUME_GROUP.to_string(),
        // Btrfs mount points are subvolume mounts, reported in `btrfs_list` as the
        // reference's example does; the partition itself counts as fully used.
        "btrfs" => pv.device_use = device_use::BTRFS.to_string(),
        "swap" | "crypto_LUKS" => {}
        _ => {
            if let Some(m) = ms.first() {
                pv.mount_point = m.mount_point.clone();
                pv.device_use = use_for_mount(&m.mount_point).to_string();
                apply_usage(&mut pv, &m.mount_point, warnings);
            } else if let Some(info) = &fs {
                if let Some(free) = info.free_blocks {
                    pv.used_size = info
                        .block_count
                        .saturating_sub(free)
                        .saturating_mul(info.block_size)
                        .min(size);
                }
            }
        }
    }
    Volume {
        pv,
        dev,
        fs,
        mounts: ms,
    }
}

fn use_for_mount(mount_point: &str) -> &'static str {
    if mount_point == "/" {
        device_use::OS
    } else if BOOT_MOUNTS.contains(&mount_point) {
        device_use::BOOT
    } else {
        device_use::NORMAL
    }
}

fn apply_usage(pv: &mut PhysicalVolume, mount_point: &str, warnings: &mut Warnings) {
    match mounts::usage(mounts::as_path(mount_point)) {
        Ok(u) => {
            pv.used_size = u.used_bytes();
            pv.inode_nums = u.files;
            pv.size_per_cluster = u.block_size;
        }
        Err(e) => warnings.push(
            pv.name.clone(),
            format!("cannot read usage of {mount_point}: {e}; used size taken as the full size"),
        ),
    }
}

/// Reads the superblock through the partition's own node when it exists (the page cache a
/// mounted filesystem writes through), else through the disk at the partition's offset.
fn detect_fs(
    node: &Path,
    size: u64,
    via_disk: Option<(&File, u64)>,
    warnings: &mut Warnings,
) -> Option<FsInfo> {
    let own = fs::metadata(node)
        .ok()
        .filter(|m| m.file_type().is_block_device())
        .and_then(|_| File::open(node).ok());
    let result = match (&own, via_disk) {
        (Some(f), _) => superblock::detect(f, size),
        (None, Some((disk, start))) => superblock::detect(&Slice::new(disk, start, size), size),
        (None, None) => {
            warnings.push(
                node.display().to_string(),
                "cannot open it; filesystem not detected",
            );
            return None;
        }
    };
    match result {
        Ok(info) => info,
        Err(e) => {
            warnings.push(node.display().to_string(), e);
            None
        }
    }
}

fn volume_group(
    root: &Path,
    vg: &lvm::Vg,
    mounts: &MountTable,
    warnings: &mut Warnings,
) -> VolumeGroups {
    VolumeGroups {
        components: vg
            .pvs
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(";"),
        free_size: vg.free,
        name: vg.name.clone(),
        size: vg.size,
        logical_volumes: vg
            .lvs
            .iter()
            .map(|lv| logical_volume(root, &vg.name, lv, mounts, warnings))
            .collect(),
    }
}

fn logical_volume(
    root: &Path,
    vg: &str,
    lv: &lvm::Lv,
    mounts: &MountTable,
    warnings: &mut Warnings,
) -> LogicalVolumes {
    let name = lvm::mapper_path(vg, lv.name.as_str());
    let mut out = LogicalVolumes {
        name: name.clone(),
        size: lv.size,
        used_size: lv.size,
        device_use: device_use::NORMAL.to_string(),
        ..Default::default()
    };
    // An inactive LV has no device; only LVM's own numbers are known.
    let Some(dev) = lv.dev else {
        return out;
    };
    let node = dm_node(root, dev).unwrap_or_else(|| PathBuf::from(&name));
    let fs = detect_fs(&node, lv.size, None, warnings);
    if let Some(info) = &fs {
        out.file_system = info.fs_type.to_string();
        out.inode_size = info.inode_size;
        out.inode_nums = info.inode_count;
        out.block_size = info.block_size;
        out.block_count = info.block_count;
    }
    if let Some(m) = mounts.of(dev, &node).first() {
        out.mount_point = m.mount_point.clone();
        out.device_use = use_for_mount(&m.mount_point).to_string();
        match mounts::usage(mounts::as_path(&m.mount_point)) {
            Ok(u) => {
                out.used_size = u.used_bytes();
                out.inode_nums = u.files;
                out.block_size = u.block_size;
                out.block_count = u.blocks;
            }
            Err(e) => warnings.push(name, format!("cannot read usage of {}: {e}", m.mount_point)),
        }
    }
    out.free_size = out.size.saturating_sub(out.used_size);
    out
}

/// `/dev/dm-N` of an active device-mapper device, from sysfs.
fn dm_node(root: &Path, dev: (u32, u32)) -> Option<PathBuf> {
    let link = fs::read_link(root.join(format!("sys/dev/block/{}:{}", dev.0, dev.1))).ok()?;
    let name = link.file_name()?.to_string_lossy().into_owned();
    Some(blockdev::dev_path(&name))
}

/// Disk-level `device_use` and `os_disk`: the disk holding `/boot` (or `/` when there is no
/// separate `/boot`) is BOOT, the one holding `/` is OS, whether directly, through an LV of a VG
/// with a PV on it, or through a Btrfs subvolume on it.
fn assign_disk_use(out: &mut Storage, volumes: &[Vec<Volume>]) {
    let mut holds: HashMap<usize, (bool, bool)> = HashMap::new();
    let mut mark = |i: usize, mp: &str| {
        let e = holds.entry(i).or_default();
        if mp == "/" {
            e.0 = true;
        }
        if BOOT_MOUNTS.contains(&mp) {
            e.1 = true;
        }
    };
    let mut separate_boot = false;
    for (i, vols) in volumes.iter().enumerate() {
        for v in vols {
            for m in &v.mounts {
                separate_boot |= BOOT_MOUNTS.contains(&m.mount_point.as_str());
                mark(i, &m.mount_point);
            }
        }
    }
    for vg in &out.volume_groups {
        for lv in &vg.logical_volumes {
            if lv.mount_point.is_empty() {
                continue;
            }
            separate_boot |= BOOT_MOUNTS.contains(&lv.mount_point.as_str());
            for (i, vols) in volumes.iter().enumerate() {
                let on_disk = vols.iter().any(|v| {
                    v.pv.file_system == LVM_MEMBER
                        && vg.components.split(';').any(|c| c == v.pv.name)
                });
                if on_disk {
                    mark(i, &lv.mount_point);
                }
            }
        }
    }
    for (i, sd) in out.disks.iter_mut().enumerate() {
        let (root_here, boot_here) = holds.get(&i).copied().unwrap_or_default();
        let whole_btrfs = matches!(sd.physical_volumes.as_slice(),
            [pv] if pv.name == sd.name && pv.file_system == "btrfs");
        if let Some(u) = disk_use(root_here, boot_here, separate_boot, whole_btrfs) {
            sd.device_use = u.to_string();
        }
        sd.os_disk = root_here || boot_here;
    }
}

/// The disk-level `device_use` a disk gets from what it holds, or `None` to keep what the scan
/// found (NORMAL, or VOLUME_GROUP for a whole-disk PV).
fn disk_use(
    root_here: bool,
    boot_here: bool,
    separate_boot: bool,
    whole_btrfs: bool,
) -> Option<&'static str> {
    // With no separate /boot, the kernel and boot loader files live in `/`.
    if boot_here || (root_here && !separate_boot) {
        Some(device_use::BOOT)
    } else if root_here {
        Some(device_use::OS)
    } else if whole_btrfs {
        Some(device_use::BTRFS)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_uses() {
        assert_eq!(use_for_mount("/"), device_use::OS);
        assert_eq!(use_for_mount("/boot"), device_use::BOOT);
        assert_eq!(use_for_mount("/boot/efi"), device_use::BOOT);
        assert_eq!(use_for_mount("/home"), device_use::NORMAL);
    }

    #[test]
    fn disk_uses() {
        // `/` and `/boot` on one disk, or `/` alone with no separate `/boot`: BOOT.
        assert_eq!(disk_use(true, true, true, false), Some(device_use::BOOT));
        assert_eq!(disk_use(true, false, false, false), Some(device_use::BOOT));
        // `/` here, `/boot` on another disk: OS here, BOOT there.
        assert_eq!(disk_use(true, false, true, false), Some(device_use::OS));
        assert_eq!(disk_use(false, true, true, false), Some(device_use::BOOT));
        assert_eq!(disk_use(false, false, true, true), Some(device_use::BTRFS));
        assert_eq!(disk_use(false, false, true, false), None);
    }
}
