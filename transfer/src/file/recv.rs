//! The target side of a file pass: applies the source's listing under the root, answers with
//! what it needs, writes the files its data streams bring, and never touches anything outside
//! the root.
//!
//! Safety rules, all enforced here: every path from the wire goes through
//! [`super::path::components`]; directories are reached one component at a time with
//! `O_NOFOLLOW` ([`DirCache`]); entries are created with `mkdirat`, `symlinkat`, `mknodat`,
//! `O_CREAT | O_EXCL` temporaries and `renameat`, none of which follows a final symlink;
//! metadata is applied through descriptors or non-following calls; hard links are made only to
//! regular files this session listed as linked. Every count and byte string the peer controls
//! is capped.

use crate::lock;
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

use super::direct::{Target, Writer};
use super::dirs::DirCache;
use super::meta;
use super::path::{components, join, parent, split, Excludes};
use super::proto::{
    read_any, Any, Compare, FileMsg, Meta, Packer, PassKind, MAX_SUMS, SUM_LEN, S_IFBLK, S_IFCHR,
    S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK,
};
use super::reap::{self, Reaper};
use super::sys::{self, Node};
use super::{lossy, FileError};
use crate::conn::{ConnReader, ConnWriter};
use crate::session::{Incoming, Stream};
use crate::wire::{Message, MAX_CHUNK};

/// Files from this size on get chunk sums when the target has an older copy.
pub const DELTA_MIN: u64 = 1 << 20;
/// Smallest chunk of the sums.
const SUM_CHUNK: u64 = 1 << 20;
/// How long the data streams of a session may take to connect.
const DATA_WAIT: Duration = Duration::from_secs(60);
/// Most name bytes of one directory listing held at once (bounds the deletion set).
const MAX_LISTING_BYTES: usize = 256 << 20;
/// Most linked files one session may list (bounds the hard-link target set).
const MAX_LINKED: usize = 16 << 20;
/// `Processed` is sent after this many listing messages.
const PROCESSED_EVERY: u32 = 1024;
/// Prefix of temporary names; the session id follows, so a later session can tell its own
/// in-flight files from leftovers of an interrupted one.
pub const TEMP_PREFIX: &[u8] = b".sms~";
/// Prefix of a partly received large file kept after a broken connection (this prefix, then
/// the final name): the next session diffs against it, so a resume sends only what is
/// missing. It never carries the final name, so nothing trusts it as complete.
pub const PARTIAL_PREFIX: &[u8] = b".sms~part~";

/// The partial name of a file of `size` bytes called `name`: only large files get one (and
/// only where the prefixed name still fits).
fn partial_name(name: &[u8], size: u64) -> Option<Vec<u8>> {
    if size < DELTA_MIN {
        return None;
    }
    partial_of(name)
}

/// The name a partial of `name` has, whatever the size (a file that shrank below
/// [`DELTA_MIN`] may still have one from when it was larger).
fn partial_of(name: &[u8]) -> Option<Vec<u8>> {
    let mut p = PARTIAL_PREFIX.to_vec();
    p.extend_from_slice(name);
    (p.len() <= super::proto::MAX_NAME).then_some(p)
}

/// Removes the non-directory `name` in `dir` if it is there (best effort).
fn unlink_quietly(dir: BorrowedFd<'_>, name: &[u8]) {
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
struct Base {
    /// Chunk size of the sums.
    chunk: u64,
    /// Truncated BLAKE3 per chunk, as sent.
    sums: Vec<[u8; SUM_LEN]>,
    /// Chunks below this are read from the partial, the others from the final name's older
    /// copy.
    split: usize,
    /// Device and inode of the partial whose chunks were summed: the data stream writes that
    /// very file in place, so no kill at any moment loses what it holds (moving it aside
    /// under a session's temporary name did: the next session deleted it as a leftover).
    part: Option<(u64, u64)>,
}

/// The bases of a session's pending files, by entry id.
#[derive(Default)]
struct Bases(Mutex<(std::collections::HashMap<u64, Base>, usize)>);

impl Bases {
    /// Keeps `b` for entry `id`; false (nothing kept) past [`MAX_PENDING_SUMS`].
    fn put(&self, id: u64, b: Base) -> bool {
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

    fn take(&self, id: u64) -> Option<Base> {
        let mut g = lock(&self.0);
        let b = g.0.remove(&id)?;
        g.1 -= b.sums.len() * SUM_LEN;
        Some(b)
    }
}

/// Reads `buf.len()` bytes at `off`, zeros past the end of the file (as a file extended to
/// its final size reads there).
fn read_padded(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
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

fn sum_of(data: &[u8]) -> [u8; SUM_LEN] {
    let mut s = [0u8; SUM_LEN];
    s.copy_from_slice(&blake3::hash(data).as_bytes()[..SUM_LEN]);
    s
}

/// Zeroes `from..to` of `f` (a hole where the filesystem can punch one).
fn zero_range(w: &mut Writer, f: &File, t: &Target, from: u64, to: u64) -> std::io::Result<()> {
    use nix::fcntl::FallocateFlags as F;
    if from >= to {
        return Ok(());
    }
    let (Ok(off), Ok(len)) = (i64::try_from(from), i64::try_from(to - from)) else {
        return Err(std::io::Error::other("range too large"));
    };
    match nix::fcntl::fallocate(
        f.as_raw_fd(),
        F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    ) {
        Ok(()) => return Ok(()),
        Err(Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL) => {}
        Err(e) => return Err(e.into()),
    }
    let zeros = vec![0u8; usize::try_from((to - from).min(1 << 20)).unwrap_or(1 << 20)];
    let mut at = from;
    while at < to {
        let n = usize::try_from((to - at).min(zeros.len() as u64)).unwrap_or(zeros.len());
        w.write_at(f, t, at, &zeros[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// Opens the partial `name` for writing in place if it is still the inode `ino` whose chunks
/// were summed, and no other name shares it (a hard link could lead outside the root); its
/// size with it.
fn open_in_place(dir: BorrowedFd<'_>, name: &[u8], ino: (u64, u64)) -> Option<(File, u64)> {
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

/// Block size of hole detection when writing: all-zero blocks are left unwritten.
const ZERO_BLOCK: usize = 4096;

/// Where the target writes.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// Everything is written below this directory, nothing elsewhere.
    pub root: PathBuf,
    /// The receiver's state directory (the last session's report is kept there).
    pub state_dir: PathBuf,
    /// How long the source may stay silent on any stream (zero: [`crate::session::PEER_TIMEOUT`]).
    pub peer_timeout: Duration,
}

/// What a session did on the target.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReceiveReport {
    /// Whether it was a consistency check (nothing changed).
    pub check: bool,
    /// Whether the final checkpoint was reached.
    pub complete: bool,
    /// Regular files written.
    pub files_written: u64,
    /// Plain bytes written (holes and copied chunks excluded).
    pub bytes_written: u64,
    /// Bytes copied from older copies (delta sync).
    pub bytes_reused: u64,
    /// Directories, symlinks, nodes and hard links created.
    pub created: u64,
    /// Entries whose metadata was updated in place.
    pub updated: u64,
    /// Entries deleted (recursively counted).
    pub deleted: u64,
    /// Files the source reported as changed while read.
    pub changed_during_read: u64,
    /// Entries or attributes that could not be applied (logged).
    pub warnings: u64,
}

fn io_of(e: Errno) -> std::io::Error {
    e.into()
}

pub(super) fn stat_at(dir: BorrowedFd<'_>, name: &[u8]) -> std::io::Result<Option<FileStat>> {
    match nix::sys::stat::fstatat(
        Some(dir.as_raw_fd()),
        std::ffi::OsStr::from_bytes(name),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(s) => Ok(Some(s)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub(super) fn kind_of(st: &FileStat) -> u32 {
    st.st_mode & S_IFMT
}

/// Opens an existing regular file read-only without following a symlink or blocking on a
/// FIFO, and checks it is the regular file expected.
fn open_regular(dir: BorrowedFd<'_>, name: &[u8]) -> std::io::Result<File> {
    let fd = sys::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK,
        0,
    )?;
    let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
    if kind_of(&st) != S_IFREG {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(File::from(fd))
}

/// How the metadata of a file whose contents are up to date differs from the source's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetaDiff {
    /// Nothing to do.
    Same,
    /// Only the access time.
    Atime,
    /// Owner, mode or xattrs (and maybe the access time).
    More,
}

/// Non-directory entries at and below `name` (the extras of a check).
fn count_files(dir: BorrowedFd<'_>, name: &[u8], st: &FileStat) -> u64 {
    if kind_of(st) != S_IFDIR {
        return u64::from(!name.starts_with(TEMP_PREFIX));
    }
    let Ok(fd) = sys::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
        0,
    ) else {
        return 0;
    };
    sys::list_dir(fd.as_fd())
        .unwrap_or_default()
        .iter()
        .map(|c| match stat_at(fd.as_fd(), c) {
            Ok(Some(cst)) => count_files(fd.as_fd(), c, &cst),
            _ => 0,
        })
        .sum()
}

/// The base of a delta for a file of `size` bytes: chunk sums over the partial `part` for
/// the chunks it reaches, over the final name's older copy `old` for the rest; `None` when
/// neither has a whole chunk's worth or the file is too large for sums.
fn plan_base(
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

/// Writes `data` at `offset` of the fresh file `f`, leaving holes where it is zero; returns
/// the end of the last byte written (0 when all of it was zero).
fn write_sparse(
    w: &mut Writer,
    f: &File,
    t: &Target,
    offset: u64,
    data: &[u8],
) -> std::io::Result<u64> {
    let mut written_end = 0;
    let mut i = 0;
    while i < data.len() {
        let end = (i + ZERO_BLOCK).min(data.len());
        if data[i..end].iter().all(|&b| b == 0) {
            i = end;
            continue;
        }
        // Extend over following non-zero blocks: one write per run.
        let mut j = end;
        while j < data.len() {
            let e = (j + ZERO_BLOCK).min(data.len());
            if data[j..e].iter().all(|&b| b == 0) {
                break;
            }
            j = e;
        }
        w.write_at(f, t, offset + i as u64, &data[i..j])?;
        written_end = offset + j as u64;
        i = j;
    }
    Ok(written_end)
}

fn key(path: &[u8]) -> [u8; 16] {
    let mut k = [0u8; 16];
    k.copy_from_slice(&blake3::hash(path).as_bytes()[..16]);
    k
}

/// The control stream's writer, shared so a failing data stream can cut the session.
type CtlWriter = Arc<Mutex<BufWriter<ConnWriter>>>;
/// Where a data stream leaves its error.
type Failed = Arc<Mutex<Option<FileError>>>;

/// Sends a [`FileMsg::KeepAlive`] on a shared writer every [`crate::session::keepalive_every`]
/// until dropped.
pub(super) struct KeepAlive {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KeepAlive {
    pub(super) fn start(w: Arc<Mutex<BufWriter<ConnWriter>>>, timeout: Duration) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let every = crate::session::keepalive_every(timeout);
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut last = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50).min(every));
                if last.elapsed() < every {
                    continue;
                }
                last = Instant::now();
                let mut g = lock(&w);
                // A failed write is the other threads' news: they read or write the same
                // stream and report it.
                if FileMsg::KeepAlive.write_to(&mut *g).is_err() || g.flush().is_err() {
                    return;
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Ends a failed session's data streams before `receive` returns: their writers must not
/// go on applying buffered frames to files that the next session (a resume) then uses.
#[derive(Default)]
struct Halt {
    stop: std::sync::atomic::AtomicBool,
    socks: Mutex<Vec<std::net::TcpStream>>,
}

impl Halt {
    fn halted(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Stops the writers at their next frame and wakes any blocked in a read.
    fn halt(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in lock(&self.socks).iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The control side of a session.
struct Ctl {
    root: Arc<OwnedFd>,
    session: u64,
    pass: PassKind,
    compare: Compare,
    delete: bool,
    excludes: Excludes,
    cache: DirCache,
    listing: Option<Vec<u8>>,
    names: HashSet<Vec<u8>>,
    names_bytes: usize,
    linked: HashSet<[u8; 16]>,
    report: ReceiveReport,
    w: CtlWriter,
    /// The first failure of a data stream (which also cuts the control stream).
    failed: Failed,
    last_id: u64,
    since: u32,
    /// Deletes what listings left out, off this thread.
    reaper: Reaper,
    /// What each `Need` offered to diff against, for the data streams.
    bases: Arc<Bases>,
    /// The peer timeout of every stream of the session.
    timeout: Duration,
}

impl Ctl {
    fn send(&mut self, m: &FileMsg) -> Result<(), FileError> {
        m.write_to(&mut *lock(&self.w))?;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), FileError> {
        lock(&self.w)
            .flush()
            .map_err(|e| FileError::Wire(crate::wire::WireError::Io(e.to_string())))
    }

    fn temp_prefix(&self) -> Vec<u8> {
        let mut p = TEMP_PREFIX.to_vec();
        p.extend_from_slice(format!("{:016x}.", self.session).as_bytes());
        p
    }

    /// Records `name` as listed in directory `dir`.
    fn claim(&mut self, dir: &[u8], name: &[u8]) -> Result<(), FileError> {
        if self.listing.as_deref() != Some(dir) {
            self.listing = Some(dir.to_vec());
            self.names.clear();
            self.names_bytes = 0;
        }
        self.names_bytes += name.len() + 32;
        if self.names_bytes > MAX_LISTING_BYTES {
            return Err(FileError::Protocol(format!(
                "directory listing of {} exceeds {MAX_LISTING_BYTES} bytes",
                lossy(dir)
            )));
        }
        self.names.insert(name.to_vec());
        Ok(())
    }

    /// After each listing message: every [`PROCESSED_EVERY`], tells the source how far the
    /// listing is handled (after any `Need` of those entries, on the same stream).
    fn tick(&mut self) -> Result<(), FileError> {
        self.since += 1;
        if self.since >= PROCESSED_EVERY {
            self.since = 0;
            let upto = self.last_id;
            self.send(&FileMsg::Processed { upto })?;
        }
        Ok(())
    }

    fn warn(&mut self, what: &str, path: &[u8], e: &dyn std::fmt::Display) {
        tracing::warn!(path = %lossy(path), error = %e, "{what}");
        self.report.warnings += 1;
    }

    fn entry(
        &mut self,
        id: u64,
        path: &[u8],
        m: &Meta,
        target: &[u8],
        linked: bool,
        hash: Option<[u8; 32]>,
    ) -> Result<(), FileError> {
        self.last_id = id;
        let comps = components(path).map_err(|e| FileError::path(path, e))?;
        if comps.is_empty() {
            if m.kind() != S_IFDIR {
                return Err(FileError::Protocol(
                    "the root entry must be a directory".into(),
                ));
            }
            if self.pass == PassKind::Copy {
                let root = Arc::clone(&self.root);
                let failed = meta::apply_fd(root.as_fd(), m, false)
                    .map_err(|e| FileError::target(b"/", e))?;
                self.report.warnings += failed as u64;
            }
            return Ok(());
        }
        let (dir, name) = (
            parent(path),
            &path[path.len() - comps[comps.len() - 1].len()..],
        );
        self.claim(dir, name)?;
        if m.kind() == S_IFREG && linked {
            if self.linked.len() >= MAX_LINKED {
                return Err(FileError::Protocol("too many linked files".into()));
            }
            self.linked.insert(key(path));
        }
        let pfd = match self.cache.open(dir) {
            Ok(fd) => fd,
            Err(e) if self.pass == PassKind::Check => {
                let _ = e;
                if m.kind() != S_IFDIR {
                    self.send(&FileMsg::Verdict { id, missing: true })?;
                }
                return Ok(());
            }
            Err(e) => return Err(FileError::target(dir, e)),
        };
        let existing = stat_at(pfd.as_fd(), name).map_err(|e| FileError::target(path, e))?;
        if self.pass == PassKind::Check {
            return self.check(id, pfd.as_fd(), name, m, target, hash, existing.as_ref());
        }
        let r = match m.kind() {
            S_IFDIR => self.dir(pfd.as_fd(), path, name, m, existing.as_ref()),
            S_IFREG => return self.regular(id, pfd.as_fd(), path, name, m, hash, existing),
            S_IFLNK => self.symlink(pfd.as_fd(), path, name, m, target, existing.as_ref()),
            S_IFCHR | S_IFBLK | S_IFIFO | S_IFSOCK => {
                self.node(pfd.as_fd(), path, name, m, existing.as_ref())
            }
            _ => Err(std::io::Error::other("unknown file type")),
        };
        if let Err(e) = r {
            // A full filesystem fails every entry after it: the pass stops and says so.
            if super::is_no_space(&e) {
                return Err(FileError::write_failed(path, pfd.as_fd(), None, e));
            }
            self.warn("entry not applied", path, &e);
        }
        Ok(())
    }

    fn replace(
        &mut self,
        dir: BorrowedFd<'_>,
        path: &[u8],
        name: &[u8],
        st: &FileStat,
    ) -> std::io::Result<()> {
        self.report.deleted += reap::remove(dir, name, st)?;
        self.cache.forget(path);
        Ok(())
    }

    fn dir(
        &mut self,
        pfd: BorrowedFd<'_>,
        path: &[u8],
        name: &[u8],
        m: &Meta,
        existing: Option<&FileStat>,
    ) -> std::io::Result<()> {
        match existing {
            Some(st) if kind_of(st) == S_IFDIR => self.report.updated += 1,
            other => {
                if let Some(st) = other {
                    self.replace(pfd, path, name, st)?;
                }
                nix::sys::stat::mkdirat(
                    Some(pfd.as_raw_fd()),
                    std::ffi::OsStr::from_bytes(name),
                    Mode::from_bits_truncate(0o700),
                )?;
                self.report.created += 1;
            }
        }
        let fd = sys::openat(
            pfd,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
            0,
        )?;
        self.report.warnings += meta::apply_fd(fd.as_fd(), m, false)? as u64;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn regular(
        &mut self,
        id: u64,
        pfd: BorrowedFd<'_>,
        path: &[u8],
        name: &[u8],
        m: &Meta,
        hash: Option<[u8; 32]>,
        existing: Option<FileStat>,
    ) -> Result<(), FileError> {
        let mut old = None;
        if let Some(st) = existing {
            if kind_of(&st) == S_IFREG {
                let same = u64::try_from(st.st_size).ok() == Some(m.size)
                    && st.st_mtime == m.mtime.sec
                    && st.st_mtime_nsec == i64::from(m.mtime.nsec);
                // Opened only when needed: most files of a sync are up to date by stat alone.
                let up_to_date = same
                    && match (self.compare, hash) {
                        (Compare::Hash, Some(h)) => {
                            open_regular(pfd, name)
                                .ok()
                                .and_then(|f| super::walk::hash_reader(&f).ok())
                                == Some(h)
                        }
                        _ => true,
                    };
                if up_to_date {
                    match self.meta_diff(pfd, name, &st, m) {
                        MetaDiff::Same => {}
                        // Reading a source file moves its atime (relatime: after a change, or
                        // once a day), so this is the usual difference of a sync: one call
                        // instead of an open and five.
                        MetaDiff::Atime => match meta::set_times_at(pfd, name, m.atime, m.mtime) {
                            Ok(()) => self.report.updated += 1,
                            Err(e) => self.warn("times not applied", path, &e),
                        },
                        MetaDiff::More => match open_regular(pfd, name) {
                            Ok(f) => match meta::apply_fd(f.as_fd(), m, true) {
                                Ok(failed) => {
                                    self.report.warnings += failed as u64;
                                    self.report.updated += 1;
                                }
                                Err(e) => self.warn("metadata not applied", path, &e),
                            },
                            Err(e) => self.warn("metadata not applied", path, &e),
                        },
                    }
                    // A partial left by an interrupted pass is of no use any more.
                    if let Some(pn) = partial_of(name) {
                        unlink_quietly(pfd, &pn);
                    }
                    return Ok(());
                }
                if m.size >= DELTA_MIN {
                    old = open_regular(pfd, name)
                        .ok()
                        .map(|f| (f, u64::try_from(st.st_size).unwrap_or(0)));
                }
            } else {
                self.replace(pfd, path, name, &st)
                    .map_err(|e| FileError::target(path, e))?;
            }
        }
        let base = if m.size >= DELTA_MIN {
            // The partial is the only copy of what an interrupted pass received: it is
            // summed where it is and never moved, so a kill at any moment leaves it for the
            // next session. Its chunks are trusted no more than any older copy's: the source
            // compares each with its own bytes, and the data stream checks each reused chunk
            // against the sum again before it lands.
            let part = partial_name(name, m.size)
                .and_then(|pn| open_regular(pfd, &pn).ok())
                .and_then(|f| {
                    let st = nix::sys::stat::fstat(f.as_raw_fd()).ok()?;
                    (st.st_nlink == 1).then(|| {
                        let len = u64::try_from(st.st_size).unwrap_or(0);
                        (f, len, (st.st_dev, st.st_ino))
                    })
                });
            plan_base(
                part.as_ref().map(|(f, len, ino)| (f, *len, *ino)),
                old.as_ref().map(|(f, len)| (f, *len)),
                m.size,
            )
            .map_err(|e| FileError::target(path, e))?
        } else {
            None
        };
        let (chunk_size, sums) = match base {
            Some(b) => {
                let offered = (u32::try_from(b.chunk).unwrap_or(0), b.sums.clone());
                if self.bases.put(id, b) {
                    offered
                } else {
                    (0, Vec::new())
                }
            }
            None => (0, Vec::new()),
        };
        self.send(&FileMsg::Need {
            id,
            chunk_size,
            sums,
        })
    }

    /// How owner, mode, atime and xattrs of an up-to-date file differ from `m`.
    fn meta_diff(&self, pfd: BorrowedFd<'_>, name: &[u8], st: &FileStat, m: &Meta) -> MetaDiff {
        if st.st_mode != m.mode || st.st_uid != m.uid || st.st_gid != m.gid {
            return MetaDiff::More;
        }
        let Ok(c) = std::ffi::CString::new(name) else {
            return MetaDiff::More;
        };
        match meta::read_xattrs(Node::At(pfd, &c)) {
            Ok((have, 0)) if have == m.xattrs => {}
            _ => return MetaDiff::More,
        }
        if st.st_atime != m.atime.sec || st.st_atime_nsec != i64::from(m.atime.nsec) {
            MetaDiff::Atime
        } else {
            MetaDiff::Same
        }
    }

    fn symlink(
        &mut self,
        pfd: BorrowedFd<'_>,
        path: &[u8],
        name: &[u8],
        m: &Meta,
        target: &[u8],
        existing: Option<&FileStat>,
    ) -> std::io::Result<()> {
        let same = existing.is_some_and(|st| kind_of(st) == S_IFLNK)
            && nix::fcntl::readlinkat(Some(pfd.as_raw_fd()), std::ffi::OsStr::from_bytes(name))
                .is_ok_and(|t| t.as_bytes() == target);
        if same {
            self.report.updated += 1;
        } else {
            if let Some(st) = existing {
                self.replace(pfd, path, name, st)?;
            }
            nix::unistd::symlinkat(
                std::ffi::OsStr::from_bytes(target),
                Some(pfd.as_raw_fd()),
                std::ffi::OsStr::from_bytes(name),
            )?;
            self.report.created += 1;
        }
        self.report.warnings += meta::apply_symlink(pfd, name, m)? as u64;
        Ok(())
    }

    fn node(
        &mut self,
        pfd: BorrowedFd<'_>,
        path: &[u8],
        name: &[u8],
        m: &Meta,
        existing: Option<&FileStat>,
    ) -> std::io::Result<()> {
        let kind = m.kind();
        let is_dev = kind == S_IFCHR || kind == S_IFBLK;
        let same =
            existing.is_some_and(|st| kind_of(st) == kind && (!is_dev || st.st_rdev == m.rdev));
        if same {
            self.report.updated += 1;
        } else {
            if let Some(st) = existing {
                self.replace(pfd, path, name, st)?;
            }
            nix::sys::stat::mknodat(
                Some(pfd.as_raw_fd()),
                std::ffi::OsStr::from_bytes(name),
                SFlag::from_bits_truncate(kind),
                Mode::from_bits_truncate(0o600),
                if is_dev { m.rdev } else { 0 },
            )?;
            self.report.created += 1;
        }
        let fd = sys::openat(pfd, name, OFlag::O_PATH | OFlag::O_NOFOLLOW, 0)?;
        let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
        if kind_of(&st) != kind {
            return Err(std::io::Error::other("node replaced while applying"));
        }
        self.report.warnings += meta::apply_node(fd.as_fd(), m)? as u64;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        &mut self,
        id: u64,
        pfd: BorrowedFd<'_>,
        name: &[u8],
        m: &Meta,
        target: &[u8],
        hash: Option<[u8; 32]>,
        existing: Option<&FileStat>,
    ) -> Result<(), FileError> {
        let kind = m.kind();
        if kind == S_IFDIR {
            return Ok(());
        }
        let Some(st) = existing else {
            return self.send(&FileMsg::Verdict { id, missing: true });
        };
        let same = kind_of(st) == kind
            && match kind {
                S_IFREG => {
                    u64::try_from(st.st_size).ok() == Some(m.size)
                        && match (self.compare, hash) {
                            (Compare::Hash, Some(h)) => {
                                open_regular(pfd, name)
                                    .ok()
                                    .and_then(|f| super::walk::hash_reader(&f).ok())
                                    == Some(h)
                            }
                            _ => {
                                st.st_mtime == m.mtime.sec
                                    && st.st_mtime_nsec == i64::from(m.mtime.nsec)
                            }
                        }
                }
                S_IFLNK => {
                    nix::fcntl::readlinkat(Some(pfd.as_raw_fd()), std::ffi::OsStr::from_bytes(name))
                        .is_ok_and(|t| t.as_bytes() == target)
                }
                S_IFCHR | S_IFBLK => st.st_rdev == m.rdev,
                _ => true,
            };
        if same {
            Ok(())
        } else {
            self.send(&FileMsg::Verdict { id, missing: false })
        }
    }

    fn link_name(&mut self, path: &[u8], target: &[u8]) -> Result<(), FileError> {
        split(target).map_err(|e| FileError::path(target, e))?;
        let (_, name) = split(path).map_err(|e| FileError::path(path, e))?;
        let name = name.to_vec();
        self.claim(parent(path), &name)
    }

    fn dir_end(&mut self, id: u64, path: &[u8]) -> Result<(), FileError> {
        self.last_id = id;
        components(path).map_err(|e| FileError::path(path, e))?;
        let names = if self.listing.as_deref() == Some(path) {
            self.listing = None;
            self.names_bytes = 0;
            std::mem::take(&mut self.names)
        } else {
            HashSet::new()
        };
        let check = self.pass == PassKind::Check;
        // Without deletion, only leftovers of interrupted sessions are removed.
        let stale_only = !check && !self.delete;
        let dfd = match self.cache.open(path) {
            Ok(fd) => fd,
            Err(e) if check || e.raw_os_error() == Some(nix::libc::ENOENT) => return Ok(()),
            Err(e) => return Err(FileError::target(path, e)),
        };
        let mine = self.temp_prefix();
        let present = sys::list_dir(dfd.as_fd()).map_err(|e| FileError::target(path, e))?;
        let mut extra = 0u64;
        for n in present {
            if names.contains(&n) || n.starts_with(&mine) {
                continue;
            }
            // The partial of a listed file is this session's to write or to diff against.
            if n.strip_prefix(PARTIAL_PREFIX)
                .is_some_and(|f| names.contains(f))
            {
                continue;
            }
            if stale_only && !n.starts_with(TEMP_PREFIX) {
                continue;
            }
            let rel = join(path, &n);
            if self.excludes.matches(&rel) {
                continue;
            }
            if check {
                if let Ok(Some(st)) = stat_at(dfd.as_fd(), &n) {
                    extra += count_files(dfd.as_fd(), &n, &st);
                }
            } else {
                self.cache.forget(&rel);
                self.reaper.delete(Arc::clone(&dfd), n, rel);
            }
        }
        if check && extra > 0 {
            self.send(&FileMsg::Extra { id, count: extra })?;
        }
        Ok(())
    }

    /// Final phase: makes `path` another name of `target`.
    fn make_link(&mut self, path: &[u8], target: &[u8]) -> Result<(), FileError> {
        let (_, tname) = split(target).map_err(|e| FileError::path(target, e))?;
        let (_, name) = split(path).map_err(|e| FileError::path(path, e))?;
        if !self.linked.contains(&key(target)) {
            return Err(FileError::Protocol(format!(
                "hard link {} to {}, which this session did not list as linked",
                lossy(path),
                lossy(target)
            )));
        }
        let tfd = self
            .cache
            .open(parent(target))
            .map_err(|e| FileError::target(target, e))?;
        let Some(tst) = stat_at(tfd.as_fd(), tname).map_err(|e| FileError::target(target, e))?
        else {
            self.warn("link target missing", target, &"not found");
            return Ok(());
        };
        if kind_of(&tst) != S_IFREG {
            return Err(FileError::Protocol(format!(
                "hard link target {} is not a regular file",
                lossy(target)
            )));
        }
        let pfd = self
            .cache
            .open(parent(path))
            .map_err(|e| FileError::target(path, e))?;
        if let Some(st) = stat_at(pfd.as_fd(), name).map_err(|e| FileError::target(path, e))? {
            if (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino) {
                return Ok(());
            }
            self.replace(pfd.as_fd(), path, name, &st)
                .map_err(|e| FileError::target(path, e))?;
        }
        nix::unistd::linkat(
            Some(tfd.as_raw_fd()),
            std::ffi::OsStr::from_bytes(tname),
            Some(pfd.as_raw_fd()),
            std::ffi::OsStr::from_bytes(name),
            AtFlags::empty(),
        )
        .map_err(|e| FileError::target(path, io_of(e)))?;
        self.report.created += 1;
        Ok(())
    }

    /// Final phase: a directory's times.
    fn times(&mut self, path: &[u8], atime: super::proto::Time, mtime: super::proto::Time) {
        let r = if path.is_empty() {
            meta::set_times(self.root.as_fd(), atime, mtime)
        } else {
            match split(path) {
                Err(e) => Err(std::io::Error::other(e)),
                Ok((_, name)) => self.cache.open(parent(path)).and_then(|pfd| {
                    let fd = sys::openat(
                        pfd.as_fd(),
                        name,
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                        0,
                    )?;
                    meta::set_times(fd.as_fd(), atime, mtime)
                }),
            }
        };
        if let Err(e) = r {
            self.warn("directory times not set", path, &e);
        }
    }
}

/// Counters a data stream shares with the session, and the bases its `Need`s offered.
#[derive(Default)]
struct DataStats {
    files: AtomicU64,
    bytes: AtomicU64,
    reused: AtomicU64,
    changed: AtomicU64,
    bases: Arc<Bases>,
}

/// The file a data stream is writing.
struct Current {
    pfd: Arc<OwnedFd>,
    path: Vec<u8>,
    name: Vec<u8>,
    temp: Vec<u8>,
    file: File,
    /// How `file` is written (past the page cache or not).
    how: Target,
    meta: Meta,
    /// What the `Need` offered to diff against; without it no `Copy` is taken.
    base: Option<Base>,
    /// The partial, read for the chunks of `base` it holds.
    part: Option<File>,
    /// The final name's older copy, read for the other chunks.
    old: Option<File>,
    /// Whether `file` is the partial itself, written in place: its own chunks stay where they
    /// are, and everything else of it is overwritten or zeroed before it takes its name.
    in_place: bool,
    /// In place: below this, `file` holds only bytes this session wrote or verified.
    covered: std::cell::Cell<u64>,
    /// In place: the partial's size when opened (older bytes can only lie below it).
    stale_end: u64,
    /// End of the data written so far: the temp's size (it starts empty unless in place).
    end: std::cell::Cell<u64>,
}

impl Current {
    fn wrote(&self, end: u64) {
        self.end.set(self.end.get().max(end));
    }

    /// A failed write of this file: a full filesystem says how much is still missing.
    fn write_err(&self, e: std::io::Error) -> FileError {
        let needed = (self.end.get() < self.meta.size).then(|| self.meta.size - self.end.get());
        FileError::write_failed(&self.path, self.pfd.as_fd(), needed, e)
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), FileError> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|e| e > self.meta.size)
        {
            return Err(FileError::Protocol(format!(
                "data beyond the end of {}",
                lossy(&self.path)
            )));
        }
        Ok(())
    }

    /// In place, before `offset..to` is written: zeroes what the source skipped since the
    /// last piece (holes, zero chunks) and the range itself (zero blocks are not written),
    /// so no older byte of the partial survives unverified.
    fn clear(&self, w: &mut Writer, offset: u64, to: u64) -> Result<(), FileError> {
        if !self.in_place {
            return Ok(());
        }
        let from = self.covered.get().min(offset);
        zero_range(w, &self.file, &self.how, from, to.min(self.stale_end))
            .map_err(|e| FileError::target(&self.path, e))?;
        self.covered.set(self.covered.get().max(to));
        Ok(())
    }

    fn write(
        &self,
        w: &mut Writer,
        offset: u64,
        data: &[u8],
        stats: &DataStats,
    ) -> Result<(), FileError> {
        self.check_range(offset, data.len())?;
        self.clear(w, offset, offset + data.len() as u64)?;
        let end =
            write_sparse(w, &self.file, &self.how, offset, data).map_err(|e| self.write_err(e))?;
        self.wrote(end);
        stats.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn copy(
        &mut self,
        w: &mut Writer,
        offset: u64,
        len: u32,
        stats: &DataStats,
    ) -> Result<(), FileError> {
        let len = len as usize;
        if len > MAX_CHUNK {
            return Err(FileError::Protocol("copy longer than a chunk".into()));
        }
        self.check_range(offset, len)?;
        let bad = |what: &str| FileError::Protocol(format!("{what} for {}", lossy(&self.path)));
        let base = self.base.as_ref().ok_or_else(|| bad("Copy without sums"))?;
        if base.chunk == 0 || !offset.is_multiple_of(base.chunk) {
            return Err(bad("Copy off a chunk boundary"));
        }
        let i = usize::try_from(offset / base.chunk).unwrap_or(usize::MAX);
        let want = *base.sums.get(i).ok_or_else(|| bad("Copy past the sums"))?;
        let from_part = i < base.split;
        let slot = if from_part {
            &mut self.part
        } else {
            &mut self.old
        };
        if slot.is_none() {
            let name = if from_part {
                partial_of(&self.name).unwrap_or_default()
            } else {
                self.name.clone()
            };
            let f = open_regular(self.pfd.as_fd(), &name)
                .map_err(|e| FileError::target(&self.path, e))?;
            *slot = Some(f);
        }
        let mut buf = vec![0u8; len];
        if let Some(f) = slot.as_ref() {
            read_padded(f, &mut buf, offset).map_err(|e| FileError::target(&self.path, e))?;
        }
        // The source matched its bytes to the sum this target sent; these bytes must still
        // be the ones summed, or the final file would hold something nobody compared.
        if sum_of(&buf) != want {
            return Err(FileError::target(
                &self.path,
                std::io::Error::other("the older copy changed since its chunk sums were sent"),
            ));
        }
        if from_part && self.in_place {
            // Already where it belongs.
            self.covered
                .set(self.covered.get().max(offset + len as u64));
        } else {
            self.clear(w, offset, offset + len as u64)?;
            let end = write_sparse(w, &self.file, &self.how, offset, &buf)
                .map_err(|e| self.write_err(e))?;
            self.wrote(end);
        }
        stats.reused.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    fn finish(self, w: &mut Writer) -> Result<u64, FileError> {
        let r = (|| -> Result<u64, FileError> {
            if self.in_place {
                // Past the last piece the source sent, the partial's older bytes go too.
                self.clear(w, self.covered.get(), self.meta.size)?;
                self.file
                    .set_len(self.meta.size)
                    .map_err(|e| self.write_err(e))?;
            } else if self.end.get() != self.meta.size {
                // Only a trailing hole needs the size set; a syscall per file saved otherwise.
                self.file
                    .set_len(self.meta.size)
                    .map_err(|e| self.write_err(e))?;
            }
            let failed = meta::apply_fd(self.file.as_fd(), &self.meta, true)
                .map_err(|e| FileError::target(&self.path, e))?;
            nix::fcntl::renameat(
                Some(self.pfd.as_raw_fd()),
                std::ffi::OsStr::from_bytes(&self.temp),
                Some(self.pfd.as_raw_fd()),
                std::ffi::OsStr::from_bytes(&self.name),
            )
            .map_err(|e| FileError::target(&self.path, io_of(e)))?;
            Ok(failed as u64)
        })();
        if r.is_err() {
            self.keep_partial();
        }
        r
    }

    fn unlink(&self, name: &[u8]) {
        unlink_quietly(self.pfd.as_fd(), name);
    }

    fn discard(&self) {
        self.unlink(&self.temp);
    }

    /// After a broken stream or a failed finish: a large file keeps what it holds under its
    /// partial name (where it is written from the start), for the next session to diff
    /// against; anything else is dropped.
    fn keep_partial(&self) {
        if partial_name(&self.name, self.meta.size).as_ref() != Some(&self.temp) {
            self.discard();
        }
    }
}

/// Serves one data stream until `StreamEnd`.
fn data_stream(
    mut r: BufReader<ConnReader>,
    root: Arc<OwnedFd>,
    prefix: Vec<u8>,
    stats: Arc<DataStats>,
    halt: &Halt,
) -> Result<u64, FileError> {
    let mut cache = DirCache::new(root);
    let mut packer = Packer::default();
    let mut writer = Writer::default();
    let mut cur: Option<Current> = None;
    let mut seq = 0u64;
    let mut warnings = 0u64;
    let res = (|| loop {
        let m = read_any(&mut r)?;
        if halt.halted() {
            return Err(FileError::Protocol("the session ended".into()));
        }
        match m {
            Any::File(FileMsg::File {
                id,
                path,
                meta,
                complete,
                hash,
                compressed,
                len,
                data,
            }) => {
                if cur.is_some() {
                    return Err(FileError::Protocol("File before the previous End".into()));
                }
                if meta.kind() != S_IFREG {
                    return Err(FileError::Protocol("File of a non-regular entry".into()));
                }
                let (_, name) = split(&path).map_err(|e| FileError::path(&path, e))?;
                let name = name.to_vec();
                let pfd = cache
                    .open(parent(&path))
                    .map_err(|e| FileError::target(&path, e))?;
                seq += 1;
                // A large file is written under its partial name from the start, so that
                // what arrived survives even a kill -9 of this process and the next session
                // diffs against it; the partial the Need summed is written in place.
                let base = stats.bases.take(id);
                let pn = partial_name(&name, meta.size);
                let in_place = match (&pn, base.as_ref().and_then(|b| b.part)) {
                    (Some(pn), Some(ino)) => open_in_place(pfd.as_fd(), pn, ino),
                    _ => None,
                };
                let (temp, file, stale_end) = match (pn, in_place) {
                    (Some(pn), Some((f, len))) => (pn, f, Some(len)),
                    (pn, _) => {
                        let temp = match pn {
                            Some(pn) => {
                                unlink_quietly(pfd.as_fd(), &pn);
                                pn
                            }
                            None => {
                                let mut t = prefix.clone();
                                t.extend_from_slice(seq.to_string().as_bytes());
                                t
                            }
                        };
                        let fd = sys::openat(
                            pfd.as_fd(),
                            &temp,
                            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
                            0o600,
                        )
                        .map_err(|e| {
                            FileError::write_failed(&path, pfd.as_fd(), Some(meta.size), e)
                        })?;
                        (temp, File::from(fd), None)
                    }
                };
                let c = Current {
                    pfd,
                    path,
                    name,
                    temp,
                    base,
                    how: Target::new(&file),
                    file,
                    meta,
                    part: None,
                    old: None,
                    in_place: stale_end.is_some(),
                    covered: std::cell::Cell::new(0),
                    stale_end: stale_end.unwrap_or(0),
                    end: std::cell::Cell::new(0),
                };
                let c = cur.insert(c);
                if len > 0 || !data.is_empty() {
                    let plain = packer.unpack(len, &hash, compressed, data).ok_or_else(|| {
                        FileError::Protocol(format!("corrupt data for {}", lossy(&c.path)))
                    })?;
                    c.write(&mut writer, 0, &plain, &stats)?;
                }
                if complete {
                    if let Some(c) = cur.take() {
                        warnings += c.finish(&mut writer)?;
                        stats.files.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Any::File(FileMsg::Data {
                offset,
                len,
                hash,
                compressed,
                data,
            }) => {
                let c = cur
                    .as_ref()
                    .ok_or_else(|| FileError::Protocol("Data outside a file".into()))?;
                let plain = packer.unpack(len, &hash, compressed, data).ok_or_else(|| {
                    FileError::Protocol(format!("corrupt data for {}", lossy(&c.path)))
                })?;
                c.write(&mut writer, offset, &plain, &stats)?;
            }
            Any::File(FileMsg::Copy { offset, len }) => {
                cur.as_mut()
                    .ok_or_else(|| FileError::Protocol("Copy outside a file".into()))?
                    .copy(&mut writer, offset, len, &stats)?;
            }
            Any::File(FileMsg::End { changed }) => {
                let c = cur
                    .take()
                    .ok_or_else(|| FileError::Protocol("End outside a file".into()))?;
                warnings += c.finish(&mut writer)?;
                stats.files.fetch_add(1, Ordering::Relaxed);
                if changed {
                    stats.changed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Any::File(FileMsg::Abandon) => {
                // A cancelled pass abandons its files too: what a large one holds stays for
                // the next session (a vanished file's partial goes with the next listing).
                if let Some(c) = cur.take() {
                    c.keep_partial();
                }
            }
            Any::File(FileMsg::StreamEnd) | Any::Common(Message::Bye) => return Ok(()),
            Any::Common(Message::Error { code, message }) => {
                return Err(FileError::Remote { code, message })
            }
            other => {
                return Err(FileError::Protocol(format!(
                    "unexpected {} on a data stream",
                    match &other {
                        Any::File(m) => m.name(),
                        Any::Common(m) => crate::session::name_of(m),
                    }
                )))
            }
        }
    })();
    if let Some(c) = cur.take() {
        c.keep_partial();
    }
    res.map(|()| warnings)
}

type DataHandles = Vec<std::thread::JoinHandle<Result<u64, FileError>>>;

/// Accepts the session's data streams as they connect and starts a writer for each.
fn accept_data(
    data: std::sync::mpsc::Receiver<Stream>,
    streams: u16,
    root: Arc<OwnedFd>,
    session: u64,
    stats: Arc<DataStats>,
    (ctl, failed, halt): (CtlWriter, Failed, Arc<Halt>),
    timeout: Duration,
) -> Result<DataHandles, FileError> {
    let mut handles = Vec::new();
    for i in 0..streams {
        let never = || {
            FileError::Protocol(format!(
                "data stream {} of {streams} never connected",
                i + 1
            ))
        };
        let deadline = Instant::now() + DATA_WAIT;
        let s = loop {
            // In slices, so that a halted session does not wait out DATA_WAIT.
            match data.recv_timeout(Duration::from_millis(200)) {
                Ok(s) => break s,
                Err(_) if halt.halted() => return Ok(handles),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => return Err(never()),
            }
        };
        s.set_timeouts(timeout);
        if let Some(c) = s.cutter() {
            lock(&halt.socks).push(c);
        }
        if halt.halted() {
            halt.halt();
        }
        let (r, w) = s.into_halves();
        let mut prefix = TEMP_PREFIX.to_vec();
        prefix.extend_from_slice(format!("{session:016x}.{i}.").as_bytes());
        let (root, stats) = (Arc::clone(&root), Arc::clone(&stats));
        let shared = (Arc::clone(&ctl), Arc::clone(&failed), Arc::clone(&halt));
        let spawned = std::thread::Builder::new()
            .name("sms-file-data".into())
            .spawn(move || {
                let (ctl, failed, halt) = shared;
                let _keep = w;
                let r = data_stream(r, root, prefix, stats, &halt);
                // A stream the session itself halted carries no news: the session's own error
                // is the one to report.
                match r {
                    Err(e) if !halt.halted() => {
                        // Stop the session now rather than at the end of the listing, and tell
                        // the source why first: its operator needs the path and the cause (a
                        // full disk, say), not a reset connection.
                        tracing::warn!(error = %e, code = e.code(), "file data stream failed");
                        let mut slot = lock(&failed);
                        if slot.is_none() {
                            let mut w = lock(&ctl);
                            if !matches!(e, FileError::Remote { .. }) {
                                let _ = Message::Error {
                                    code: e.code().to_string(),
                                    message: e.to_string().chars().take(1000).collect(),
                                }
                                .write_to(&mut *w);
                                let _ = w.flush();
                            }
                            w.get_ref().abort();
                            drop(w);
                            let text = e.to_string();
                            *slot = Some(e);
                            return Err(FileError::Protocol(text));
                        }
                        Err(FileError::Protocol(e.to_string()))
                    }
                    r => r,
                }
            });
        match spawned {
            Ok(h) => handles.push(h),
            Err(source) => {
                // The session cannot go on without this stream: stop it now (the control
                // side reports `failed`), and end the streams already started first.
                let e = FileError::Spawn {
                    what: "a data stream",
                    source,
                };
                tracing::warn!(error = %e, "file session stopped");
                lock(&failed).get_or_insert(e);
                halt.halt();
                lock(&ctl).get_ref().abort();
                for h in handles {
                    let _ = h.join();
                }
                return Err(FileError::Protocol(format!(
                    "data stream {} of {streams} could not start",
                    i + 1
                )));
            }
        }
    }
    Ok(handles)
}

/// Serves one file-mode session (called from `Listener::serve`'s closure when
/// `inc.mode == Mode::File`): applies the source's pass under `opts.root`.
pub fn receive(inc: Incoming, opts: &ReceiveOptions) -> Result<ReceiveReport, FileError> {
    let root = sys::open(&opts.root, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
        .map_err(|e| FileError::target(opts.root.as_os_str().as_bytes(), e))?;
    let root = Arc::new(root);
    let Incoming {
        control,
        data,
        streams,
        session,
        task_id,
        ..
    } = inc;
    let timeout = crate::session::peer_timeout(opts.peer_timeout);
    control.set_timeouts(timeout);
    let (mut r, w) = control.into_halves();
    let mut ctl = Ctl {
        root: Arc::clone(&root),
        session,
        pass: PassKind::Copy,
        compare: Compare::Quick,
        delete: false,
        excludes: Excludes::default(),
        cache: DirCache::new(Arc::clone(&root)),
        listing: None,
        names: HashSet::new(),
        names_bytes: 0,
        linked: HashSet::new(),
        report: ReceiveReport::default(),
        w: Arc::new(Mutex::new(w)),
        failed: Arc::default(),
        last_id: 0,
        since: 0,
        reaper: Reaper::default(),
        bases: Arc::default(),
        timeout,
    };
    // The source waits on this stream through the whole data phase and the final syncfs,
    // when there is nothing to tell it: keep-alives keep its peer timeout for dead targets.
    let ticker = KeepAlive::start(Arc::clone(&ctl.w), timeout);
    let mut res = serve(&mut ctl, &mut r, data, streams);
    drop(ticker);
    if res.is_err() {
        if let Some(e) = lock(&ctl.failed).take() {
            res = Err(e);
        }
    }
    match &res {
        Err(FileError::Remote { .. }) | Ok(()) => {}
        Err(e) => {
            tracing::warn!(error = %e, "file session failed");
            let mut msg = e.to_string();
            msg.truncate(1000);
            let _ = Message::Error {
                code: e.code().to_string(),
                message: msg,
            }
            .write_to(&mut *lock(&ctl.w));
            let _ = lock(&ctl.w).flush();
        }
    }
    let _ = lock(&ctl.w).get_mut().close();
    save_report(
        &opts.state_dir,
        &LastSession {
            task_id: &task_id,
            session: format!("{session:016x}"),
            root: opts.root.display().to_string(),
            complete: ctl.report.complete && res.is_ok(),
            report: &ctl.report,
        },
    );
    res.map(|()| ctl.report)
}

/// The record of the last session kept in the state directory, for an operator to read.
/// Nothing decides anything by it: what a later session skips or reuses it checks on the
/// target itself (size and mtime or hash of the final name, chunk sums of a partial).
#[derive(serde::Serialize)]
struct LastSession<'a> {
    task_id: &'a str,
    /// Hex, as in the session's temporary names.
    session: String,
    root: String,
    complete: bool,
    report: &'a ReceiveReport,
}

fn save_report(dir: &std::path::Path, last: &LastSession<'_>) {
    if dir.as_os_str().is_empty() || !dir.is_dir() {
        return;
    }
    let Ok(json) = serde_json::to_vec_pretty(last) else {
        return;
    };
    // 0o666 less the umask, as the report was always created: it is for an operator to read.
    let r = crate::durable::write_atomic(&dir.join("file-last-session.json"), &json, 0o666);
    if let Err(e) = r {
        tracing::warn!(error = %e, dir = %dir.display(), "cannot save the file session report");
    }
}

fn unexpected(state: &str, m: &Any) -> FileError {
    FileError::Protocol(format!(
        "unexpected {} while {state}",
        match m {
            Any::File(f) => f.name(),
            Any::Common(c) => crate::session::name_of(c),
        }
    ))
}

/// The session's state machine: Plan → listing → (copy: data, final phase) → checkpoint.
fn serve(
    ctl: &mut Ctl,
    r: &mut BufReader<ConnReader>,
    data: std::sync::mpsc::Receiver<Stream>,
    streams: u16,
) -> Result<(), FileError> {
    // Plan.
    match read_any(r)? {
        Any::File(FileMsg::Plan {
            pass,
            compare,
            delete,
            excludes,
        }) => {
            ctl.pass = pass;
            ctl.compare = compare;
            ctl.delete = delete;
            ctl.excludes = Excludes::new(excludes);
            ctl.report.check = pass == PassKind::Check;
        }
        other => return Err(unexpected("waiting for the plan", &other)),
    }
    let stats = Arc::new(DataStats {
        bases: Arc::clone(&ctl.bases),
        ..DataStats::default()
    });
    let halt = Arc::new(Halt::default());
    let accepter = (ctl.pass == PassKind::Copy).then(|| {
        let (root, stats, session) = (Arc::clone(&ctl.root), Arc::clone(&stats), ctl.session);
        let shared = (
            Arc::clone(&ctl.w),
            Arc::clone(&ctl.failed),
            Arc::clone(&halt),
        );
        let timeout = ctl.timeout;
        std::thread::Builder::new()
            .name("sms-file-accept".into())
            .spawn(move || accept_data(data, streams, root, session, stats, shared, timeout))
    });
    let mut accepter = match accepter.transpose() {
        Ok(a) => a,
        Err(source) => {
            return Err(FileError::Spawn {
                what: "the data streams' accepter",
                source,
            })
        }
    };
    let res = serve_pass(ctl, r, &mut accepter, &stats);
    if res.is_err() {
        // Nothing of this session may touch the tree once it has ended.
        halt.halt();
        if let Some(Ok(Ok(handles))) = accepter.take().map(std::thread::JoinHandle::join) {
            for h in handles {
                let _ = h.join();
            }
        }
    }
    res
}

/// The listing, data and final phases of a pass whose plan was read.
fn serve_pass(
    ctl: &mut Ctl,
    r: &mut BufReader<ConnReader>,
    accepter: &mut Option<std::thread::JoinHandle<Result<DataHandles, FileError>>>,
    stats: &DataStats,
) -> Result<(), FileError> {
    // Phase times at debug level: where a slow pass spends its time.
    let started = Instant::now();
    let phase = |name: &str| {
        tracing::debug!(
            phase = name,
            secs = started.elapsed().as_secs_f64(),
            "file pass phase done"
        )
    };
    // Listing.
    loop {
        if r.buffer().is_empty() {
            ctl.flush()?;
        }
        match read_any(r)? {
            Any::File(FileMsg::Entry {
                id,
                path,
                meta,
                target,
                linked,
                hash,
            }) => {
                ctl.entry(id, &path, &meta, &target, linked, hash)?;
                ctl.tick()?;
            }
            Any::File(FileMsg::Link { path, target }) => {
                ctl.link_name(&path, &target)?;
                ctl.tick()?;
            }
            Any::File(FileMsg::DirEnd { id, path }) => {
                ctl.dir_end(id, &path)?;
                ctl.tick()?;
            }
            Any::File(FileMsg::ListEnd) => {
                let upto = ctl.last_id;
                ctl.send(&FileMsg::Processed { upto })?;
                ctl.send(&FileMsg::ListDone)?;
                ctl.flush()?;
                phase("listing");
                break;
            }
            Any::Common(Message::Error { code, message }) => {
                return Err(FileError::Remote { code, message })
            }
            other => return Err(unexpected("listing", &other)),
        }
    }
    if accepter.is_none() {
        // A check ends here.
        return match read_any(r)? {
            Any::Common(Message::Bye) => {
                ctl.report.complete = true;
                Ok(())
            }
            other => Err(unexpected("ending a check", &other)),
        };
    }
    // Data: the data streams run until the source says all is sent.
    match read_any(r)? {
        Any::File(FileMsg::Finish) => {}
        Any::Common(Message::Error { code, message }) => {
            return Err(FileError::Remote { code, message })
        }
        other => return Err(unexpected("waiting for the data", &other)),
    }
    let handles = accepter
        .take()
        .ok_or_else(|| FileError::Protocol("no data accepter".into()))?
        .join()
        .map_err(|_| FileError::Protocol("data accepter panicked".into()))??;
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(w)) => ctl.report.warnings += w,
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(FileError::Protocol("data writer panicked".into()));
            }
        }
    }
    phase("data");
    // Directory times come next, and a deletion would change them.
    let reaped = ctl.reaper.drain();
    phase("deletions");
    ctl.report.deleted += reaped.deleted;
    ctl.report.warnings += reaped.failed;
    ctl.report.files_written = stats.files.load(Ordering::Relaxed);
    ctl.report.bytes_written = stats.bytes.load(Ordering::Relaxed);
    ctl.report.bytes_reused = stats.reused.load(Ordering::Relaxed);
    ctl.report.changed_during_read = stats.changed.load(Ordering::Relaxed);
    if let Some(e) = first_err {
        return Err(e);
    }
    // Final phase.
    loop {
        match read_any(r)? {
            Any::File(FileMsg::Link { path, target }) => ctl.make_link(&path, &target)?,
            Any::File(FileMsg::Times { path, atime, mtime }) => {
                components(&path).map_err(|e| FileError::path(&path, e))?;
                ctl.times(&path, atime, mtime);
            }
            Any::Common(Message::Checkpoint { seq }) => {
                phase("links and times");
                nix::unistd::syncfs(ctl.root.as_raw_fd())
                    .map_err(|e| FileError::target(b"/", io_of(e)))?;
                phase("syncfs");
                let rep = &ctl.report;
                let summary = FileMsg::Summary {
                    written: rep.files_written,
                    deleted: rep.deleted,
                    updated: rep.updated,
                };
                ctl.send(&summary)?;
                Message::Ack { upto: seq }.write_to(&mut *lock(&ctl.w))?;
                ctl.flush()?;
                ctl.report.complete = true;
            }
            Any::Common(Message::Bye) => return Ok(()),
            Any::Common(Message::Error { code, message }) => {
                return Err(FileError::Remote { code, message })
            }
            other => return Err(unexpected("in the final phase", &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_stay_holes() {
        let t = tempfile::tempdir().unwrap();
        let f = File::create(t.path().join("f")).unwrap();
        let mut data = vec![0u8; 64 << 10];
        data[10] = 1;
        data[40_000] = 2;
        let how = Target::new(&f);
        let end = write_sparse(&mut Writer::default(), &f, &how, 1 << 20, &data);
        assert_eq!(end.unwrap(), (1 << 20) + 40_960);
        f.set_len(2 << 20).unwrap();
        let back = std::fs::read(t.path().join("f")).unwrap();
        assert_eq!(&back[1 << 20..(1 << 20) + data.len()], &data[..]);
        use std::os::unix::fs::MetadataExt;
        // Two 4 KiB blocks written, the rest holes.
        assert!(
            f.metadata().unwrap().blocks() <= 16,
            "{}",
            f.metadata().unwrap().blocks()
        );
    }

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
