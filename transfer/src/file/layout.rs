//! The source's disk layout a file pass carries in its `Plan`, so a target given blank disks
//! (`receive --prepare`) can partition and format them as the source is before the files land.
//!
//! It travels as bounded JSON inside the `Plan` (at most [`MAX_LAYOUT`] bytes): it is small,
//! read once per session, and checked field by field by [`Layout::validate`] before any tool
//! sees a value of it.

use serde::{Deserialize, Serialize};

/// Largest encoded layout accepted (a few hundred partitions fit in far less).
pub const MAX_LAYOUT: usize = 256 << 10;
/// Most disks in a layout.
pub const MAX_DISKS: usize = 64;
/// Most partitions of one disk (GPT's usual entry array).
pub const MAX_PARTS: usize = 128;

/// The disks holding the migrated filesystems.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Layout {
    /// One per source disk.
    pub disks: Vec<Disk>,
}

/// A source disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The name the target maps to a device (`receive --disk NAME=DEV`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Partition table style.
    pub table: Table,
    /// Partitions in number order (empty with [`Table::None`]: the filesystem fills the disk,
    /// and `whole` describes it).
    pub parts: Vec<Part>,
    /// The filesystem of a disk without a partition table.
    #[serde(default)]
    pub whole: Option<Fs>,
}

/// Partition table style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    /// MBR (DOS).
    Mbr,
    /// GPT.
    Gpt,
    /// No table: one filesystem on the whole disk.
    None,
}

/// A partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// Number (MBR 1–4 primary; GPT entry index + 1).
    pub number: u32,
    /// Start in bytes on the source.
    pub start: u64,
    /// Size in bytes on the source.
    pub size: u64,
    /// MBR type byte (`83`, `82`, `8e`, `ef`) as two hex digits, or GPT type GUID.
    pub type_id: String,
    /// MBR active flag.
    #[serde(default)]
    pub bootable: bool,
    /// GPT partition name.
    #[serde(default)]
    pub label: String,
    /// Its filesystem (or swap), when it holds one.
    pub fs: Option<Fs>,
}

/// A filesystem (or swap area).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fs {
    /// `ext2`, `ext3`, `ext4`, `xfs`, `btrfs`, `vfat`, `swap`.
    pub fs_type: String,
    /// UUID as blkid shows it (vfat: `ABCD-1234`).
    pub uuid: String,
    /// Label (may be empty).
    pub label: String,
    /// Bytes in use on the source (0 when not mounted or unknown).
    pub used: u64,
    /// Where it is mounted in the migrated system (`/`, `/boot`); empty when it is not
    /// migrated (swap, or not mounted).
    pub mount: String,
    /// Inode size of ext2/3/4 (0: the tool's default).
    #[serde(default)]
    pub inode_size: u64,
}

/// Why a layout cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid disk layout: {0}")]
pub struct LayoutError(pub String);

/// Filesystem types `--prepare` can create.
pub const FS_TYPES: &[&str] = &["ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "swap"];

fn safe_text(what: &str, s: &str, max: usize) -> Result<(), LayoutError> {
    if s.len() > max || s.chars().any(|c| c.is_control()) {
        return Err(LayoutError(format!(
            "{what} {s:?} is too long or has control characters"
        )));
    }
    Ok(())
}

fn check_uuid(fs: &Fs) -> Result<(), LayoutError> {
    let ok = if fs.fs_type == "vfat" {
        fs.uuid.len() == 9
            && fs.uuid.as_bytes()[4] == b'-'
            && fs
                .uuid
                .chars()
                .filter(|c| *c != '-')
                .all(|c| c.is_ascii_hexdigit())
    } else {
        fs.uuid.len() == 36
            && fs.uuid.char_indices().all(|(i, c)| {
                if [8, 13, 18, 23].contains(&i) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            })
    };
    if ok || fs.uuid.is_empty() {
        Ok(())
    } else {
        Err(LayoutError(format!(
            "filesystem UUID {:?} is malformed",
            fs.uuid
        )))
    }
}

impl Fs {
    fn validate(&self) -> Result<(), LayoutError> {
        if !FS_TYPES.contains(&self.fs_type.as_str()) {
            return Err(LayoutError(format!(
                "filesystem type {:?} cannot be created (known: {})",
                self.fs_type,
                FS_TYPES.join(", ")
            )));
        }
        check_uuid(self)?;
        safe_text("label", &self.label, 255)?;
        if self.label.starts_with('-') {
            return Err(LayoutError(format!(
                "label {:?} starts with '-'",
                self.label
            )));
        }
        if !self.mount.is_empty() {
            super::path::components(self.mount.trim_start_matches('/').as_bytes())
                .map_err(|e| LayoutError(format!("mount point {:?}: {e}", self.mount)))?;
            if !self.mount.starts_with('/') {
                return Err(LayoutError(format!(
                    "mount point {:?} is not absolute",
                    self.mount
                )));
            }
        }
        Ok(())
    }
}

impl Layout {
    /// Checks every field a tool or a path will see.
    pub fn validate(&self) -> Result<(), LayoutError> {
        if self.disks.is_empty() || self.disks.len() > MAX_DISKS {
            return Err(LayoutError(format!(
                "{} disks (1 to {MAX_DISKS})",
                self.disks.len()
            )));
        }
        let mut mounts = std::collections::HashSet::new();
        for d in &self.disks {
            safe_text("disk name", &d.name, 255)?;
            if d.parts.len() > MAX_PARTS {
                return Err(LayoutError(format!(
                    "disk {}: {} partitions",
                    d.name,
                    d.parts.len()
                )));
            }
            if d.table == Table::None && !d.parts.is_empty() {
                return Err(LayoutError(format!(
                    "disk {}: partitions without a table",
                    d.name
                )));
            }
            let mut last_end = 0u64;
            for p in &d.parts {
                let end = p.start.checked_add(p.size).filter(|e| *e <= d.size);
                let Some(end) = end.filter(|_| p.start >= last_end && p.size > 0) else {
                    return Err(LayoutError(format!(
                        "disk {}: partition {} overlaps another or lies outside the disk",
                        d.name, p.number
                    )));
                };
                last_end = end;
                safe_text("partition type", &p.type_id, 36)?;
                if !p.type_id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
                    || p.type_id.is_empty()
                {
                    return Err(LayoutError(format!(
                        "partition type {:?} is malformed",
                        p.type_id
                    )));
                }
                safe_text("partition name", &p.label, 72)?;
                if p.number == 0 || p.number > 128 {
                    return Err(LayoutError(format!("partition number {}", p.number)));
                }
            }
            for fs in d
                .parts
                .iter()
                .filter_map(|p| p.fs.as_ref())
                .chain(d.whole.iter())
            {
                fs.validate()?;
                if !fs.mount.is_empty() && !mounts.insert(fs.mount.clone()) {
                    return Err(LayoutError(format!("mount point {} twice", fs.mount)));
                }
            }
        }
        if !mounts.contains("/") {
            return Err(LayoutError("no filesystem is mounted at /".into()));
        }
        Ok(())
    }

    /// Whether `other` describes the same disks, partitions and filesystems (the used bytes,
    /// which change between passes, aside).
    pub fn same_shape(&self, other: &Layout) -> bool {
        let shape = |l: &Layout| {
            let mut l = l.clone();
            for d in &mut l.disks {
                for f in d
                    .parts
                    .iter_mut()
                    .filter_map(|p| p.fs.as_mut())
                    .chain(d.whole.as_mut())
                {
                    f.used = 0;
                }
            }
            l
        };
        shape(self) == shape(other)
    }

    /// Every filesystem of the layout with the disk and partition (0: whole disk) it is on.
    pub fn filesystems(&self) -> impl Iterator<Item = (&Disk, u32, &Fs)> {
        self.disks.iter().flat_map(|d| {
            d.parts
                .iter()
                .filter_map(move |p| p.fs.as_ref().map(|f| (d, p.number, f)))
                .chain(d.whole.iter().map(move |f| (d, 0, f)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Layout {
        let fs = |t: &str, u: &str, m: &str| Fs {
            fs_type: t.into(),
            uuid: u.into(),
            label: String::new(),
            used: 1 << 20,
            mount: m.into(),
            inode_size: 0,
        };
        Layout {
            disks: vec![Disk {
                name: "disk0".into(),
                size: 1 << 30,
                table: Table::Gpt,
                parts: vec![
                    Part {
                        number: 1,
                        start: 1 << 20,
                        size: 1 << 20,
                        type_id: "21686148-6449-6e6f-744e-656564454649".into(),
                        bootable: false,
                        label: String::new(),
                        fs: None,
                    },
                    Part {
                        number: 2,
                        start: 2 << 20,
                        size: 100 << 20,
                        type_id: "0fc63daf-8483-4772-8e79-3d69d8477de4".into(),
                        bootable: false,
                        label: String::new(),
                        fs: Some(fs("ext4", "0b7c2b1e-93f5-4c5c-9d3e-5f0b1c2d3e4f", "/boot")),
                    },
                    Part {
                        number: 3,
                        start: 102 << 20,
                        size: 500 << 20,
                        type_id: "0fc63daf-8483-4772-8e79-3d69d8477de4".into(),
                        bootable: false,
                        label: String::new(),
                        fs: Some(fs("xfs", "1b7c2b1e-93f5-4c5c-9d3e-5f0b1c2d3e4f", "/")),
                    },
                ],
                whole: None,
            }],
        }
    }

    #[test]
    fn a_sound_layout_passes_and_bad_fields_are_named() {
        let l = sample();
        l.validate().unwrap();
        assert_eq!(l.filesystems().count(), 2);
        let mut later = l.clone();
        later.disks[0].parts[2].fs.as_mut().unwrap().used += 4096;
        assert!(later.same_shape(&l) && later != l);
        later.disks[0].parts[2].fs.as_mut().unwrap().label = "x".into();
        assert!(!later.same_shape(&l));
        let mut bad = l.clone();
        bad.disks[0].parts[2].fs.as_mut().unwrap().fs_type = "zfs".into();
        assert!(bad.validate().unwrap_err().0.contains("\"zfs\""));
        let mut bad = l.clone();
        bad.disks[0].parts[2].start = 50 << 20;
        assert!(bad.validate().unwrap_err().0.contains("overlaps"));
        let mut bad = l.clone();
        bad.disks[0].parts[1].fs.as_mut().unwrap().mount = "/../etc".into();
        assert!(bad.validate().is_err());
        let mut bad = l.clone();
        bad.disks[0].parts[1].fs.as_mut().unwrap().uuid = "-O metadata_csum".into();
        assert!(bad.validate().unwrap_err().0.contains("UUID"));
        let mut bad = l;
        bad.disks[0].parts[2].fs.as_mut().unwrap().mount = "/srv".into();
        assert!(bad
            .validate()
            .unwrap_err()
            .0
            .contains("no filesystem is mounted at /"));
    }
}
