//! The source's record of a standalone block migration (`migrate --state-dir`): the id the
//! receiver keeps its checkpoint under, what each source disk was when the migration began,
//! and the last pass the receiver acknowledged complete. A new id is made whenever a source
//! disk is no longer the one recorded, so no checkpoint of an older migration is ever resumed.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Bytes hashed for a disk that has neither a partition table nor a known filesystem.
const HEAD_BYTES: usize = 64 << 10;

/// Why a record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A source disk could not be read to identify it.
    #[error("{code}: cannot identify source disk {path}: {source}", code = transfer::Code::VolumeUnreadable)]
    Disk {
        /// The device.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The state directory failed.
    #[error("migration record {path}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What a source disk is: it changes when the disk is replaced or rewritten wholesale, not
/// when files on it change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskId {
    /// Source device as given.
    pub path: String,
    /// Target disk name it is sent as.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// GPT disk GUID, MBR signature and table, filesystem UUID, or a hash of its first bytes.
    pub id: String,
}

/// One standalone migration as the source knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The id sent as the task id: the receiver's checkpoints are kept under it.
    pub migration: String,
    /// `HOST:PORT` of the receiver.
    pub target: String,
    /// The source disks, in the order given.
    pub disks: Vec<DiskId>,
    /// The last pass the receiver acknowledged as complete (every chunk durable).
    pub completed: Option<u32>,
    /// Where it is kept (not stored).
    #[serde(skip)]
    file: PathBuf,
}

/// Identifies source disk `path`, sent as `name`.
pub fn identify(path: &Path, name: &str) -> Result<DiskId, RecordError> {
    let err = |source| RecordError::Disk {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(err)?;
    let size = std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).map_err(err)?;
    let mut head = vec![0u8; HEAD_BYTES.min(usize::try_from(size).unwrap_or(HEAD_BYTES))];
    f.read_exact_at(&mut head, 0).map_err(err)?;
    let id = match gpt_guid(&head) {
        Some(g) => format!("gpt:{g}"),
        None => match mbr(&head) {
            Some(m) => m,
            None => match probe::fsdetect::detect(&f, size) {
                Ok(Some(fs)) if !fs.uuid.is_empty() => format!("fs:{}:{}", fs.fs_type, fs.uuid),
                _ => format!("head:{}", blake3::hash(&head).to_hex()),
            },
        },
    };
    Ok(DiskId {
        path: path.display().to_string(),
        name: name.to_string(),
        size,
        id,
    })
}

/// The disk GUID of a GPT header at LBA 1 (512- or 4096-byte sectors).
fn gpt_guid(head: &[u8]) -> Option<String> {
    [512usize, 4096].iter().find_map(|&lba| {
        let h = head.get(lba..lba + 72)?;
        (&h[..8] == b"EFI PART").then(|| hex(&h[56..72]))
    })
}

/// The MBR's disk signature and partition table, when the boot signature is there.
fn mbr(head: &[u8]) -> Option<String> {
    let s = head.get(..512)?;
    (s[510] == 0x55 && s[511] == 0xaa && s[446..510].iter().any(|&b| b != 0)).then(|| {
        format!(
            "mbr:{}:{}",
            hex(&s[440..444]),
            &blake3::hash(&s[446..510]).to_hex()[..16]
        )
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A new migration id nobody else has.
fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", transfer::random_u64())
}

impl Record {
    /// The record of sending `disks` in `dir`: the saved one when every disk is still what it
    /// was, else a new migration (the reason is logged). `name` fixes the migration id
    /// (`--task-id`); by default one is made. The target is not part of the key: a receiver
    /// restarted on another port keeps its checkpoints, and a different target holds none of
    /// this migration, which its receiver finds out by itself.
    pub fn open(
        dir: &Path,
        target: &str,
        name: Option<&str>,
        disks: Vec<DiskId>,
    ) -> Result<Self, RecordError> {
        let mut key = format!("{}\n", name.unwrap_or(""));
        for d in &disks {
            key.push_str(&format!("{}={}\n", d.path, d.name));
        }
        let file = dir.join(format!(
            "block-{}.json",
            &blake3::hash(key.as_bytes()).to_hex()[..16]
        ));
        let fresh = |disks| Record {
            migration: name.map_or_else(|| new_id("standalone"), str::to_string),
            target: target.to_string(),
            disks,
            completed: None,
            file: file.clone(),
        };
        let old = match std::fs::read(&file) {
            Ok(b) => match serde_json::from_slice::<Record>(&b) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "unreadable migration record; starting a new migration");
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(RecordError::Io {
                    path: file,
                    source: e,
                })
            }
        };
        let Some(old) = old else {
            return Ok(fresh(disks));
        };
        if old.disks != disks {
            let changed: Vec<&str> = disks
                .iter()
                .filter(|d| !old.disks.contains(d))
                .map(|d| d.path.as_str())
                .collect();
            tracing::warn!(
                migration = %old.migration,
                changed = ?changed,
                "a source disk is not the one this migration started from (replaced, resized or rewritten); starting a new migration"
            );
            return Ok(fresh(disks));
        }
        if old.target != target {
            tracing::info!(migration = %old.migration, was = %old.target, now = %target, "the target address changed");
        }
        Ok(Record {
            file,
            target: target.to_string(),
            ..old
        })
    }

    /// Writes the record durably (temporary file, fsync, rename, fsync of the directory).
    pub fn save(&self) -> Result<(), RecordError> {
        let io = |source| RecordError::Io {
            path: self.file.clone(),
            source,
        };
        let dir = self.file.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let body = serde_json::to_vec_pretty(self).map_err(|e| io(std::io::Error::other(e)))?;
        transfer::durable::write_atomic(&self.file, &body, transfer::durable::PRIVATE).map_err(io)
    }

    /// Where the record is kept.
    pub fn file(&self) -> &Path {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(dir: &Path, name: &str, head: &[u8]) -> PathBuf {
        let p = dir.join(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(head, 0).unwrap();
        p
    }

    #[test]
    fn disk_identity_follows_the_table_not_the_data() {
        let d = tempfile::tempdir().unwrap();
        // GPT: the GUID names the disk, whatever the data.
        let mut g = vec![0u8; 1024];
        g[512..520].copy_from_slice(b"EFI PART");
        g[568..584].copy_from_slice(&[7; 16]);
        let p = disk(d.path(), "gpt", &g);
        let a = identify(&p, "disk0").unwrap();
        assert_eq!(a.id, format!("gpt:{}", "07".repeat(16)));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all_at(b"data", 100_000)
            .unwrap();
        assert_eq!(identify(&p, "disk0").unwrap(), a);
        // No table: the first bytes; rewriting them makes another disk.
        let p = disk(d.path(), "raw", &[1; 4096]);
        let a = identify(&p, "disk0").unwrap();
        assert!(a.id.starts_with("head:"), "{a:?}");
        std::fs::write(&p, [2u8; 4096]).unwrap();
        assert_ne!(identify(&p, "disk0").unwrap().id, a.id);
        // MBR.
        let mut m = vec![0u8; 512];
        m[440..444].copy_from_slice(&[1, 2, 3, 4]);
        m[446 + 4] = 0x83;
        m[510] = 0x55;
        m[511] = 0xaa;
        let p = disk(d.path(), "mbr", &m);
        assert!(identify(&p, "d").unwrap().id.starts_with("mbr:01020304:"));
        assert!(identify(&d.path().join("missing"), "d").is_err());
    }

    #[test]
    fn a_record_survives_only_while_its_disks_are_the_same() {
        let d = tempfile::tempdir().unwrap();
        let p = disk(d.path(), "raw", &[1; 4096]);
        let ids = vec![identify(&p, "disk0").unwrap()];
        let mut r = Record::open(d.path(), "h:1", None, ids.clone()).unwrap();
        assert!(r.migration.starts_with("standalone-"));
        assert_eq!(r.completed, None);
        r.completed = Some(1);
        r.save().unwrap();
        let again = Record::open(d.path(), "h:1", None, ids.clone()).unwrap();
        assert_eq!(again, r);
        // Another name or mapping is another migration; another target address is not.
        let moved = Record::open(d.path(), "h:2", None, ids.clone()).unwrap();
        assert_eq!(moved.migration, r.migration);
        let mut renamed = ids.clone();
        renamed[0].name = "disk9".into();
        let other = Record::open(d.path(), "h:1", None, renamed).unwrap();
        assert_ne!(other.migration, r.migration);
        // The disk rewritten: a new migration, nothing completed.
        std::fs::write(&p, [3u8; 4096]).unwrap();
        let ids = vec![identify(&p, "disk0").unwrap()];
        let mut new = Record::open(d.path(), "h:1", None, ids.clone()).unwrap();
        assert_ne!(new.migration, r.migration);
        assert_eq!(new.completed, None);
        // A damaged record is not trusted either.
        new.completed = Some(5);
        new.save().unwrap();
        std::fs::write(new.file(), b"{").unwrap();
        let reopened = Record::open(d.path(), "h:1", None, ids).unwrap();
        assert_eq!(reopened.completed, None);
        assert_ne!(reopened.migration, new.migration);
    }
}
