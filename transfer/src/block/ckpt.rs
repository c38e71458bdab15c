//! The receiver's checkpoint of a block pass: which chunks are durable on the target. It is
//! written only after the target files were fdatasync'ed, atomically (temp file, fsync,
//! rename, fsync of the directory), and sealed with a BLAKE3 trailer so a torn or tampered
//! file is refused (the pass then restarts for that task rather than trusting it).

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::map::Bitmap;

/// Largest checkpoint file read back (bitmaps of 256 disks of 32 TiB at 1 MiB chunks fit).
const MAX_FILE: u64 = 1 << 30;

/// What a checkpoint is about; a session resumes it only when all of it matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Task id.
    pub task_id: String,
    /// Pass number.
    pub pass: u32,
    /// Sync pass.
    pub sync: bool,
    /// Chunk size.
    pub chunk_size: u32,
    /// (name, size) of each disk, in plan order.
    pub disks: Vec<(String, u64)>,
    /// Identity of each target (path, device and inode): a checkpoint is worthless for a
    /// target that was replaced since.
    #[serde(default)]
    pub targets: Vec<String>,
    /// Whether the sender finished the pass.
    #[serde(default)]
    pub complete: bool,
    /// The last pass of this migration that completed on these targets, carried from pass
    /// to pass: a full pass asked for later runs as a verifying sync instead.
    #[serde(default)]
    pub held: Option<u32>,
    /// Per disk, the first chunk this pass has never written: the receiver records a higher
    /// mark before it writes past the old one, so after a kill the chunks below it that are not
    /// done are the only ones that may hold data of the interrupted session.
    #[serde(default)]
    pub lease: Vec<u64>,
    /// BLAKE3 of a few done chunks as they were on the targets at this checkpoint: a resume
    /// first reads them back, so a target replaced or rewritten since is not trusted.
    #[serde(default)]
    pub samples: Vec<Sample>,
}

/// One sampled chunk of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Index into the plan.
    pub disk: u16,
    /// Chunk index.
    pub chunk: u64,
    /// BLAKE3 of the chunk's bytes, hex.
    pub hash: String,
}

impl Meta {
    /// Whether `self` (a saved checkpoint) is of the same migration and targets as `other`:
    /// task, chunk size, disks and target identities; pass and progress aside.
    pub fn same_migration(&self, other: &Meta) -> bool {
        self.task_id == other.task_id
            && self.chunk_size == other.chunk_size
            && self.disks == other.disks
            && self.targets == other.targets
    }
}

/// Why a checkpoint could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CkptError {
    /// I/O on the state directory.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a checkpoint we wrote.
    #[error("checkpoint {0} is damaged; ignoring it")]
    Damaged(PathBuf),
}

/// The checkpoint file of `task_id` in `dir` (the id is hex-encoded: it comes from the peer).
pub fn path(dir: &Path, task_id: &str) -> PathBuf {
    let hex: String = task_id.bytes().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("block-{hex}.ckpt"))
}

/// Writes `meta` and `maps` to `file` atomically and durably.
pub fn save(file: &Path, meta: &Meta, maps: &[Bitmap]) -> Result<(), CkptError> {
    let io = |source| CkptError::Io {
        path: file.to_path_buf(),
        source,
    };
    let mut body = serde_json::to_vec(meta).map_err(|e| io(std::io::Error::other(e)))?;
    body.push(b'\n');
    for m in maps {
        body.extend_from_slice(m.as_bytes());
    }
    let seal = blake3::hash(&body);
    body.extend_from_slice(seal.as_bytes());
    let dir = file.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io)?;
    crate::durable::write_atomic(file, &body, crate::durable::PRIVATE).map_err(io)
}

/// Reads a checkpoint; `Ok(None)` when there is none.
pub fn load(file: &Path) -> Result<Option<(Meta, Vec<Bitmap>)>, CkptError> {
    let io = |source| CkptError::Io {
        path: file.to_path_buf(),
        source,
    };
    let f = match File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut body = Vec::new();
    f.take(MAX_FILE).read_to_end(&mut body).map_err(io)?;
    let damaged = || CkptError::Damaged(file.to_path_buf());
    if body.len() < 32 {
        return Err(damaged());
    }
    let (content, seal) = body.split_at(body.len() - 32);
    if blake3::hash(content).as_bytes() != seal {
        return Err(damaged());
    }
    let nl = content
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(damaged)?;
    let meta: Meta = serde_json::from_slice(&content[..nl]).map_err(|_| damaged())?;
    let mut rest = &content[nl + 1..];
    let mut maps = Vec::with_capacity(meta.disks.len());
    for (_, size) in &meta.disks {
        let bits = super::map::chunk_count(*size, u64::from(meta.chunk_size.max(1)));
        let n = usize::try_from(bits.div_ceil(8)).map_err(|_| damaged())?;
        if rest.len() < n {
            return Err(damaged());
        }
        let (b, r) = rest.split_at(n);
        rest = r;
        maps.push(Bitmap::from_bytes(b.to_vec(), bits).ok_or_else(damaged)?);
    }
    if !rest.is_empty() {
        return Err(damaged());
    }
    Ok(Some((meta, maps)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let f = path(dir.path(), "t-1/../x");
        assert!(f
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("block-"));
        assert_eq!(f.parent().unwrap(), dir.path());
        assert!(load(&f).unwrap().is_none());
        let meta = Meta {
            task_id: "t-1/../x".into(),
            pass: 2,
            sync: true,
            chunk_size: 1 << 20,
            disks: vec![("a".into(), 10 << 20), ("b".into(), 3)],
            targets: vec!["/x:1:2".into()],
            complete: false,
            held: Some(1),
            lease: vec![4, 0],
            samples: vec![Sample {
                disk: 0,
                chunk: 3,
                hash: "ab".into(),
            }],
        };
        let mut m1 = Bitmap::new(10);
        m1.set(3);
        let maps = vec![m1, Bitmap::new(1)];
        save(&f, &meta, &maps).unwrap();
        assert_eq!(load(&f).unwrap(), Some((meta.clone(), maps.clone())));
        // Any flipped byte is detected.
        let mut raw = fs::read(&f).unwrap();
        raw[5] ^= 1;
        fs::write(&f, &raw).unwrap();
        assert!(matches!(load(&f), Err(CkptError::Damaged(_))));
        fs::write(&f, b"short").unwrap();
        assert!(matches!(load(&f), Err(CkptError::Damaged(_))));
    }
}
