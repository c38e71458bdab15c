//! What a resume diffs against: partial names of large files, the chunk sums a `Need` offers
//! over a partial and an older copy, and the bases kept until the file's data arrives.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use nix::fcntl::OFlag;
use nix::unistd::UnlinkatFlags;

use super::{kind_of, DELTA_MIN, PARTIAL_PREFIX};
use crate::file::proto::{MAX_SUMS, SUM_LEN, S_IFREG};
use crate::file::sys;
use crate::lock;
use crate::wire::MAX_CHUNK;

/// Smallest chunk of the sums.
const SUM_CHUNK: u64 = 1 << 20;

/// The partial name of a file of `size` bytes called `name`: only large files get one (and
/// only where the prefixed name still fits).
pub(super) fn partial_name(name: &[u8], size: u64) -> Option<Vec<u8>> {
    if size < DELTA_MIN {
        return None;
    }
    partial_of(name)
}

/// The name a partial of `name` has, whatever the size (a file that shrank below
/// [`DELTA_MIN`] may still have one from when it was larger).
pub(super) fn partial_of(name: &[u8]) -> Option<Vec<u8>> {
    let mut p = PARTIAL_PREFIX.to_vec();
    p.extend_from_slice(name);
    (p.len() <= crate::file::proto::MAX_NAME).then_some(p)
}

/// Removes the non-directory `name` in `dir` if it is there (best effort).
pub(super) fn unlink_quietly(dir: BorrowedFd<'_>, name: &[u8]) {
    let _ = nix::unistd::unlinkat(
        Some(dir.as_raw_fd()),
        std::ffi::OsStr::from_bytes(name),
        UnlinkatFlags::NoRemoveDir,
    );
}

/// Most bytes of chunk sums a session keeps for files whose data has not arrived yet; past
/// it, a `Need` offers none (the file is sent whole).
const MAX_PENDING_SUMS: usize = 256 << 20;

/// What a `Need` offered the source to diff against, kept until the file's data arrives:
/// a `Copy` is applied only when the bytes it reuses still hash to the sum the source
/// matched, so nothing unverified from a partial or an older copy reaches a final file.
#[derive(Debug, Clone)]
pub(super) struct Base {
    /// Chunk size of the sums.
    pub(super) chunk: u64,
    /// Truncated BLAKE3 per chunk, as sent.
    pub(super) sums: Vec<[u8; SUM_LEN]>,
    /// Chunks below this are read from the partial, the others from the final name's older
    /// copy.
    pub(super) split: usize,
    /// Device and inode of the partial whose chunks were summed: the data stream writes that
    /// very file in place, so no kill at any moment loses what it holds (moving it aside
    /// under a session's temporary name did: the next session deleted it as a leftover).
    pub(super) part: Option<(u64, u64)>,
}

/// The bases of a session's pending files, by entry id.
#[derive(Default)]
pub(super) struct Bases(Mutex<(std::collections::HashMap<u64, Base>, usize)>);

impl Bases {
    /// Keeps `b` for entry `id`; false (nothing kept) past [`MAX_PENDING_SUMS`].
    pub(super) fn put(&self, id: u64, b: Base) -> bool {
        let mut g = lock(&self.0);
        if let Some(old) = g.0.remove(&id) {
            g.1 -= old.sums.len() * SUM_LEN;
        }
        let bytes = b.sums.len() * SUM_LEN;
        if g.1 + bytes > MAX_PENDING_SUMS {
            return false;
        }
        g.1 += bytes;
        g.0.insert(id, b);
        true
    }

    pub(super) fn take(&self, id: u64) -> Option<Base> {
        let mut g = lock(&self.0);
        let b = g.0.remove(&id)?;
        g.1 -= b.sums.len() * SUM_LEN;
        Some(b)
    }
}

/// Reads `buf.len()` bytes at `off`, zeros past the end of the file (as a file extended to
/// its final size reads there).
pub(super) fn read_padded(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[got..].fill(0);
    Ok(())
}

pub(super) fn sum_of(data: &[u8]) -> [u8; SUM_LEN] {
    let mut s = [0u8; SUM_LEN];
    s.copy_from_slice(&blake3::hash(data).as_bytes()[..SUM_LEN]);
    s
}

/// Opens the partial `name` for writing in place if it is still the inode `ino` whose chunks
/// were summed, and no other name shares it (a hard link could lead outside the root); its
/// size with it.
pub(super) fn open_in_place(
    dir: BorrowedFd<'_>,
    name: &[u8],
    ino: (u64, u64),
) -> Option<(File, u64)> {
    let fd = sys::openat(
        dir,
        name,
        OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK,
        0,
    )
    .ok()?;
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).ok()?;
    let ok = kind_of(&st) == S_IFREG && st.st_nlink == 1 && (st.st_dev, st.st_ino) == ino;
    ok.then(|| (File::from(fd), u64::try_from(st.st_size).unwrap_or(0)))
}

/// The base of a delta for a file of `size` bytes: chunk sums over the partial `part` for
/// the chunks it reaches, over the final name's older copy `old` for the rest; `None` when
/// neither has a whole chunk's worth or the file is too large for sums.
pub(super) fn plan_base(
    part: Option<(&File, u64, (u64, u64))>,
    old: Option<(&File, u64)>,
    size: u64,
) -> std::io::Result<Option<Base>> {
    let part_len = part.map_or(0, |p| p.1.min(size));
    let old_len = old.map_or(0, |o| o.1);
    let top = part_len.max(old_len);
    if top < DELTA_MIN {
        return Ok(None);
    }
    let mut cs = SUM_CHUNK;
    while top.div_ceil(cs) > MAX_SUMS as u64 {
        cs *= 2;
    }
    if cs > MAX_CHUNK as u64 {
        return Ok(None);
    }
    let split = part_len.div_ceil(cs);
    let count = split.max(old_len.div_ceil(cs));
    let mut buf = vec![0u8; usize::try_from(cs).unwrap_or(MAX_CHUNK)];
    let mut sums = Vec::new();
    for i in 0..count {
        let off = i * cs;
        // A partial's chunk is summed as long as the file's: written sparse, it may end
        // short of a chunk whose tail is zeros, which it then reads as.
        let (f, len) = match (part, old) {
            (Some(p), _) if i < split => (p.0, (size - off).min(cs)),
            (_, Some(o)) => (o.0, (old_len - off).min(cs)),
            _ => break,
        };
        let n = usize::try_from(len).unwrap_or(0);
        read_padded(f, &mut buf[..n], off)?;
        sums.push(sum_of(&buf[..n]));
    }
    Ok(Some(Base {
        chunk: cs,
        sums,
        split: usize::try_from(split).unwrap_or(usize::MAX),
        part: part.filter(|_| split > 0).map(|p| p.2),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_cover_the_file_in_chunks() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        std::fs::write(&p, vec![7u8; (3 << 20) + 5]).unwrap();
        let f = File::open(&p).unwrap();
        let b = plan_base(None, Some((&f, (3 << 20) + 5)), 4 << 20)
            .unwrap()
            .unwrap();
        assert_eq!((b.chunk, b.split, b.part), (1 << 20, 0, None));
        assert_eq!(b.sums.len(), 4);
        assert_eq!(b.sums[0], b.sums[1]);
        assert_ne!(b.sums[2], b.sums[3]);
        assert!(plan_base(None, Some((&f, 100)), 4 << 20).unwrap().is_none());
    }

    #[test]
    fn a_partial_is_summed_as_far_as_it_reaches_and_the_older_copy_beyond() {
        let t = tempfile::tempdir().unwrap();
        let (pp, op) = (t.path().join("part"), t.path().join("old"));
        // The partial ends 4 KiB short of its second chunk, whose tail is zeros.
        let mut part = vec![1u8; (2 << 20) - 4096];
        part[(1 << 20)..].fill(2);
        std::fs::write(&pp, &part).unwrap();
        std::fs::write(&op, vec![3u8; 4 << 20]).unwrap();
        let (pf, of) = (File::open(&pp).unwrap(), File::open(&op).unwrap());
        let b = plan_base(
            Some((&pf, part.len() as u64, (1, 2))),
            Some((&of, 4 << 20)),
            4 << 20,
        )
        .unwrap()
        .unwrap();
        assert_eq!((b.split, b.part, b.sums.len()), (2, Some((1, 2)), 4));
        let mut second = vec![2u8; 1 << 20];
        second[(1 << 20) - 4096..].fill(0);
        assert_eq!(b.sums[1], sum_of(&second));
        assert_eq!(b.sums[2], sum_of(&[3u8; 1 << 20]));
    }
}
