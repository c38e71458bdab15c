//! The disk layout of the filesystems a file pass migrates, read on the source and sent in
//! the pass's `Plan`, so that a target with blank disks (`receive --prepare`) can make the
//! same partitions and filesystems (same UUIDs and labels) before the files land.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use probe::io::Slice;
use probe::ptable::{PartKind, Style};
use transfer::file::layout::{Disk, Fs, Layout, Part, Table, FS_TYPES};

/// Why the layout of the migrated filesystems cannot be described.
#[derive(Debug, thiserror::Error)]
pub enum LayoutReadError {
    /// The base directory is not a mounted filesystem.
    #[error("{0} is not the mount point of a filesystem")]
    NotMountPoint(PathBuf),
    /// A migrated filesystem is on something other than a partition or a whole disk.
    #[error("{mount} is on {dev}, which is not a partition or a whole disk (LVM and dm-crypt volumes cannot be laid out by --prepare)")]
    Unsupported {
        /// The mount point.
        mount: String,
        /// Its device.
        dev: String,
    },
    /// A partition kind `--prepare` cannot make.
    #[error("disk {disk}: {what} cannot be laid out by --prepare")]
    Kind {
        /// The disk.
        disk: String,
        /// What.
        what: String,
    },
    /// Reading the disk or sysfs failed.
    #[error("cannot read {what}: {why}")]
    Read {
        /// What.
        what: String,
        /// Why.
        why: String,
    },
}

fn read(what: impl Into<String>, why: impl ToString) -> LayoutReadError {
    LayoutReadError::Read {
        what: what.into(),
        why: why.to_string(),
    }
}

/// The disk and partition number (0: the whole disk) of block device `maj:min`, by sysfs.
fn locate(dev: (u32, u32)) -> Result<(String, u32), String> {
    let link = PathBuf::from(format!("/sys/dev/block/{}:{}", dev.0, dev.1));
    let real = std::fs::canonicalize(&link).map_err(|e| format!("{}: {e}", link.display()))?;
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Ok(n) = std::fs::read_to_string(real.join("partition")) {
        let disk = real
            .parent()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let num = n
            .trim()
            .parse()
            .map_err(|_| format!("{name}: partition {n:?}"))?;
        return Ok((disk, num));
    }
    if name.starts_with("dm-") || name.starts_with("md") {
        return Err(name);
    }
    Ok((name, 0))
}

fn sys_u64(path: &str) -> Result<u64, LayoutReadError> {
    let t = std::fs::read_to_string(path).map_err(|e| read(path, e))?;
    t.trim().parse().map_err(|_| read(path, format!("{t:?}")))
}

/// Describes the disk holding `base` and the filesystems mounted below it on that disk or on
/// the disks `rename` names (bind mounts and pseudo filesystems left out); `rename` maps a
/// source disk (`/dev/sda`) to the name the target knows it by. Returns the layout and the mount points it covers (on this
/// host), parents first.
pub fn read_layout(
    base: &Path,
    rename: &[(String, String)],
) -> Result<(Layout, Vec<PathBuf>), LayoutReadError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| read("/proc/self/mountinfo", e))?;
    let (entries, _) = probe::mounts::parse_mountinfo(&text);
    // Mount point below base → (disk, partition); the last mount of a path is the visible one.
    let mut mounts: BTreeMap<PathBuf, ((String, u32), String)> = BTreeMap::new();
    for e in &entries {
        let mp = PathBuf::from(&e.mount_point);
        if !mp.starts_with(base) || e.root != "/" || e.dev.0 == 0 {
            mounts.remove(&mp);
            continue;
        }
        match locate(e.dev) {
            Ok(loc) => {
                mounts.insert(mp, (loc, e.fs_type.clone()));
            }
            Err(dev) => {
                return Err(LayoutReadError::Unsupported {
                    mount: e.mount_point.clone(),
                    dev,
                })
            }
        }
    }
    let Some(((base_disk, _), _)) = mounts.get(base).cloned() else {
        return Err(LayoutReadError::NotMountPoint(base.to_path_buf()));
    };
    // Only the disk of the root and the disks `rename` names go along: a USB stick or an
    // image mounted somewhere below the root is not part of the system.
    mounts.retain(|_, ((d, _), _)| {
        *d == base_disk || rename.iter().any(|(s, _)| *s == format!("/dev/{d}"))
    });
    // In the migrated system: `/` for base, `/boot` for base/boot.
    let inside = |mp: &Path| -> String {
        let rest = mp.strip_prefix(base).unwrap_or(Path::new(""));
        format!("/{}", rest.display())
    };
    let mut disk_names: Vec<String> = Vec::new();
    for ((d, _), _) in mounts.values() {
        if !disk_names.contains(d) {
            disk_names.push(d.clone());
        }
    }
    let mut disks = Vec::new();
    for name in &disk_names {
        let dev = format!("/dev/{name}");
        let size = sys_u64(&format!("/sys/block/{name}/size"))?.saturating_mul(512);
        let ss = sys_u64(&format!("/sys/block/{name}/queue/logical_block_size")).unwrap_or(512);
        let file = std::fs::File::open(&dev).map_err(|e| read(&dev, e))?;
        let fs_of = |start: u64, len: u64, number: u32| -> Result<Option<Fs>, LayoutReadError> {
            let info = probe::fsdetect::detect(&Slice::new(&file, start, len), len)
                .map_err(|e| read(&dev, e))?;
            let Some(info) = info else { return Ok(None) };
            let mp = mounts
                .iter()
                .find(|(_, ((d, n), _))| d == name && *n == number)
                .map(|(p, _)| p.clone());
            if !FS_TYPES.contains(&info.fs_type) {
                if let Some(mp) = mp {
                    return Err(LayoutReadError::Kind {
                        disk: dev.clone(),
                        what: format!(
                            "the {} filesystem mounted at {}",
                            info.fs_type,
                            mp.display()
                        ),
                    });
                }
                tracing::warn!(disk = %dev, partition = number, fs = info.fs_type, "--prepare makes this partition without its contents");
                return Ok(None);
            }
            let used = mp
                .as_deref()
                .and_then(|p| probe::mounts::usage(p).ok())
                .map_or(0, |u| u.used_bytes());
            Ok(Some(Fs {
                fs_type: info.fs_type.to_string(),
                uuid: info.uuid.clone(),
                label: info.label.clone(),
                used,
                mount: if info.fs_type == "swap" {
                    String::new()
                } else {
                    mp.as_deref().map(inside).unwrap_or_default()
                },
                inode_size: if info.fs_type.starts_with("ext") {
                    info.inode_size
                } else {
                    0
                },
            }))
        };
        let table = probe::ptable::read(&file, size, ss).map_err(|e| read(&dev, e))?;
        let shown = rename
            .iter()
            .find(|(s, _)| *s == dev)
            .map_or_else(|| dev.clone(), |(_, t)| t.clone());
        let disk = match table {
            None => Disk {
                name: shown,
                size,
                table: Table::None,
                parts: Vec::new(),
                whole: fs_of(0, size, 0)?,
            },
            Some(t) => {
                let mut parts = Vec::new();
                for p in &t.partitions {
                    let (type_id, bootable, label) = match &p.kind {
                        PartKind::Mbr { extended: true, .. }
                        | PartKind::Mbr { logical: true, .. } => {
                            return Err(LayoutReadError::Kind {
                                disk: dev.clone(),
                                what: "an extended partition".into(),
                            })
                        }
                        PartKind::Mbr {
                            type_byte,
                            bootable,
                            ..
                        } => (format!("{type_byte:02x}"), *bootable, String::new()),
                        PartKind::Gpt {
                            type_guid, name, ..
                        } => (type_guid.clone(), false, name.clone()),
                    };
                    parts.push(Part {
                        number: p.number,
                        start: p.start,
                        size: p.size,
                        type_id,
                        bootable,
                        label,
                        fs: fs_of(p.start, p.size, p.number)?,
                    });
                }
                let table = if t.style == Style::Gpt {
                    Table::Gpt
                } else {
                    Table::Mbr
                };
                Disk {
                    name: shown,
                    size,
                    table,
                    parts,
                    whole: None,
                }
            }
        };
        disks.push(disk);
    }
    let layout = Layout { disks };
    layout.validate().map_err(|e| read("the layout", e))?;
    let mut sources: Vec<PathBuf> = mounts.into_keys().collect();
    sources.sort_by_key(|p| p.components().count());
    Ok((layout, sources))
}
