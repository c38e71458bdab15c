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

/// Where this session keeps a partial file while it serves as the base of entry `id` (the
/// session's own temporary prefix, so its deletion pass leaves it alone).
fn base_name(session: u64, id: u64) -> Vec<u8> {
    let mut p = TEMP_PREFIX.to_vec();
    p.extend_from_slice(format!("{session:016x}.base.{id}").as_bytes());
    p
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

/// The chunk sums of an older copy, or `None` when it is too small or too large for them.
fn sums_of(f: &File, size: u64) -> std::io::Result<Option<(u32, Vec<[u8; SUM_LEN]>)>> {
    if size < DELTA_MIN {
        return Ok(None);
    }
    let mut cs = SUM_CHUNK;
    while size.div_ceil(cs) > MAX_SUMS as u64 {
        cs *= 2;
    }
    if cs > MAX_CHUNK as u64 {
        return Ok(None);
    }
    let mut buf = vec![0u8; usize::try_from(cs).unwrap_or(MAX_CHUNK)];
    let mut sums = Vec::new();
    let mut off = 0u64;
    while off < size {
        let n = usize::try_from((size - off).min(cs)).unwrap_or(0);
        f.read_exact_at(&mut buf[..n], off)?;
        let mut s = [0u8; SUM_LEN];
        s.copy_from_slice(&blake3::hash(&buf[..n]).as_bytes()[..SUM_LEN]);
        sums.push(s);
        off += n as u64;
    }
    Ok(Some((u32::try_from(cs).unwrap_or(0), sums)))
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
        let mut sums = None;
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
                    if let Some(pn) = partial_name(name, m.size) {
                        unlink_quietly(pfd, &pn);
                    }
                    return Ok(());
                }
                if m.size >= DELTA_MIN {
                    if let Ok(f) = &open_regular(pfd, name) {
                        sums = sums_of(f, u64::try_from(st.st_size).unwrap_or(0))
                            .map_err(|e| FileError::target(path, e))?;
                    }
                }
            } else {
                self.replace(pfd, path, name, &st)
                    .map_err(|e| FileError::target(path, e))?;
            }
        }
        if let Some(pn) = partial_name(name, m.size) {
            if let Ok(Some(pst)) = stat_at(pfd, &pn) {
                let base = base_name(self.session, id);
                let renamed = kind_of(&pst) == S_IFREG
                    && nix::fcntl::renameat(
                        Some(pfd.as_raw_fd()),
                        std::ffi::OsStr::from_bytes(&pn),
                        Some(pfd.as_raw_fd()),
                        std::ffi::OsStr::from_bytes(&base),
                    )
                    .is_ok();
                if renamed {
                    if let Ok(f) = open_regular(pfd, &base) {
                        sums = sums_of(&f, u64::try_from(pst.st_size).unwrap_or(0))
                            .map_err(|e| FileError::target(path, e))?;
                    }
                }
            }
        }
        let (chunk_size, sums) = sums.unwrap_or((0, Vec::new()));
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

/// Counters a data stream shares with the session.
#[derive(Default)]
struct DataStats {
    files: AtomicU64,
    bytes: AtomicU64,
    reused: AtomicU64,
    changed: AtomicU64,
}

/// The file a data stream is writing.
struct Current {
    pfd: Arc<OwnedFd>,
    path: Vec<u8>,
    name: Vec<u8>,
    temp: Vec<u8>,
    /// A kept partial copy serving as the base of `Copy` (else the final name's old copy).
    base: Vec<u8>,
    file: File,
    /// How `file` is written (past the page cache or not).
    how: Target,
    meta: Meta,
    old: Option<File>,
    /// End of the data written so far: the temp's size (it starts empty).
    end: std::cell::Cell<u64>,
}

impl Current {
    fn wrote(&self, end: u64) {
        self.end.set(self.end.get().max(end));
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

    fn write(
        &self,
        w: &mut Writer,
        offset: u64,
        data: &[u8],
        stats: &DataStats,
    ) -> Result<(), FileError> {
        self.check_range(offset, data.len())?;
        let end = write_sparse(w, &self.file, &self.how, offset, data)
            .map_err(|e| FileError::target(&self.path, e))?;
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
        if self.old.is_none() {
            let old = open_regular(self.pfd.as_fd(), &self.base)
                .or_else(|_| open_regular(self.pfd.as_fd(), &self.name))
                .map_err(|e| FileError::target(&self.path, e))?;
            self.old = Some(old);
        }
        let mut buf = vec![0u8; len];
        if let Some(old) = &self.old {
            old.read_exact_at(&mut buf, offset)
                .map_err(|e| FileError::target(&self.path, e))?;
        }
        let end = write_sparse(w, &self.file, &self.how, offset, &buf)
            .map_err(|e| FileError::target(&self.path, e))?;
        self.wrote(end);
        stats.reused.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    fn finish(self) -> Result<u64, FileError> {
        let err = |e: std::io::Error| FileError::target(&self.path, e);
        let r = (|| {
            // Only a trailing hole needs the size set; a syscall per file saved otherwise.
            if self.end.get() != self.meta.size {
                self.file.set_len(self.meta.size)?;
            }
            let failed = meta::apply_fd(self.file.as_fd(), &self.meta, true)?;
            nix::fcntl::renameat(
                Some(self.pfd.as_raw_fd()),
                std::ffi::OsStr::from_bytes(&self.temp),
                Some(self.pfd.as_raw_fd()),
                std::ffi::OsStr::from_bytes(&self.name),
            )?;
            Ok(failed as u64)
        })();
        match r {
            Ok(f) => {
                // Only a large file can have had a base (a partial moved aside by its Need).
                if self.meta.size >= DELTA_MIN {
                    self.unlink(&self.base);
                }
                Ok(f)
            }
            Err(e) => {
                self.discard();
                Err(err(e))
            }
        }
    }

    fn unlink(&self, name: &[u8]) {
        unlink_quietly(self.pfd.as_fd(), name);
    }

    fn discard(&self) {
        self.unlink(&self.temp);
        self.unlink(&self.base);
    }

    /// After a broken stream: a large file keeps what it received under its partial name
    /// (where it was written from the start), for the next session to diff against; anything
    /// else is dropped.
    fn keep_partial(&self) {
        if partial_name(&self.name, self.meta.size).as_ref() == Some(&self.temp) {
            self.unlink(&self.base);
        } else {
            self.discard();
        }
    }
}

/// Serves one data stream until `StreamEnd`.
fn data_stream(
    mut r: BufReader<ConnReader>,
    root: Arc<OwnedFd>,
    session: u64,
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
                // diffs against it (the Need of this entry moved any older partial aside).
                let temp = match partial_name(&name, meta.size) {
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
                .map_err(|e| FileError::target(&path, e))?;
                let file = File::from(fd);
                let c = Current {
                    pfd,
                    path,
                    name,
                    temp,
                    base: base_name(session, id),
                    how: Target::new(&file),
                    file,
                    meta,
                    old: None,
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
                        warnings += c.finish()?;
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
                warnings += c.finish()?;
                stats.files.fetch_add(1, Ordering::Relaxed);
                if changed {
                    stats.changed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Any::File(FileMsg::Abandon) => {
                if let Some(c) = cur.take() {
                    c.discard();
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
                let r = data_stream(r, root, session, prefix, stats, &halt);
                // A stream the session itself halted carries no news: the session's own error
                // is the one to report.
                match &r {
                    Err(e) if !halt.halted() => {
                        // Stop the session now rather than at the end of the listing.
                        tracing::warn!(error = %e, "file data stream failed");
                        lock(&failed).get_or_insert(FileError::Protocol(e.to_string()));
                        lock(&ctl).get_ref().abort();
                    }
                    _ => {}
                }
                r
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
        ..
    } = inc;
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
    };
    let mut res = serve(&mut ctl, &mut r, data, streams);
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
    save_report(&opts.state_dir, &ctl.report);
    res.map(|()| ctl.report)
}

fn save_report(dir: &std::path::Path, report: &ReceiveReport) {
    if dir.as_os_str().is_empty() || !dir.is_dir() {
        return;
    }
    let Ok(json) = serde_json::to_vec_pretty(report) else {
        return;
    };
    let tmp = dir.join(".file-last-session.json.tmp");
    let r = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&json).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, dir.join("file-last-session.json")));
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot save the file session report");
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
    let stats = Arc::new(DataStats::default());
    let halt = Arc::new(Halt::default());
    let accepter = (ctl.pass == PassKind::Copy).then(|| {
        let (root, stats, session) = (Arc::clone(&ctl.root), Arc::clone(&stats), ctl.session);
        let shared = (
            Arc::clone(&ctl.w),
            Arc::clone(&ctl.failed),
            Arc::clone(&halt),
        );
        std::thread::Builder::new()
            .name("sms-file-accept".into())
            .spawn(move || accept_data(data, streams, root, session, stats, shared))
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
        let (cs, sums) = sums_of(&f, (3 << 20) + 5).unwrap().unwrap();
        assert_eq!(cs, 1 << 20);
        assert_eq!(sums.len(), 4);
        assert_eq!(sums[0], sums[1]);
        assert_ne!(sums[2], sums[3]);
        assert!(sums_of(&f, 100).unwrap().is_none());
    }
}
