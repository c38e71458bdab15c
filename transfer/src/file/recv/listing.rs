//! The listing side of a target session: applies each listed entry under the root, asks for
//! the files it needs, deletes what the source no longer has, and makes links and times last.

use std::collections::HashSet;
use std::io::{BufWriter, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

use super::partial::{partial_name, partial_of, plan_base, unlink_quietly, Bases};
use super::{
    io_of, kind_of, open_regular, stat_at, CtlWriter, Failed, ReceiveReport, DELTA_MIN,
    PARTIAL_PREFIX, TEMP_PREFIX,
};
use crate::conn::ConnWriter;
use crate::file::dirs::DirCache;
use crate::file::meta;
use crate::file::path::{components, join, parent, split, Excludes};
use crate::file::proto::{
    Compare, FileMsg, Meta, PassKind, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG,
    S_IFSOCK,
};
use crate::file::reap::{self, Reaper};
use crate::file::sys::{self, Node};
use crate::file::{lossy, FileError};
use crate::lock;

/// Most name bytes of one directory listing held at once (bounds the deletion set).
const MAX_LISTING_BYTES: usize = 256 << 20;

/// Most linked files one session may list (bounds the hard-link target set).
const MAX_LINKED: usize = 16 << 20;

/// `Processed` is sent after this many listing messages.
const PROCESSED_EVERY: u32 = 1024;

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

fn key(path: &[u8]) -> [u8; 16] {
    let mut k = [0u8; 16];
    k.copy_from_slice(&blake3::hash(path).as_bytes()[..16]);
    k
}

/// The control side of a session.
pub(super) struct Ctl {
    /// The target root.
    pub(super) root: Arc<OwnedFd>,
    /// Session id, in temporary names.
    pub(super) session: u64,
    /// Copy or check, from the plan.
    pub(super) pass: PassKind,
    /// How entries are compared, from the plan.
    pub(super) compare: Compare,
    /// Whether what the source no longer has is deleted, from the plan.
    pub(super) delete: bool,
    /// The source's excludes, from the plan: never deleted.
    pub(super) excludes: Excludes,
    cache: DirCache,
    listing: Option<Vec<u8>>,
    names: HashSet<Vec<u8>>,
    names_bytes: usize,
    linked: HashSet<[u8; 16]>,
    /// What the session did.
    pub(super) report: ReceiveReport,
    /// The control stream's writer.
    pub(super) w: CtlWriter,
    /// The first failure of a data stream (which also cuts the control stream).
    pub(super) failed: Failed,
    /// The last entry id handled.
    pub(super) last_id: u64,
    since: u32,
    /// Deletes what listings left out, off this thread.
    pub(super) reaper: Reaper,
    /// What each `Need` offered to diff against, for the data streams.
    pub(super) bases: Arc<Bases>,
    /// The peer timeout of every stream of the session.
    pub(super) timeout: Duration,
    /// Run once, before the final checkpoint is acknowledged (`--prepare`: configuring the
    /// migrated system).
    pub(super) on_complete: Option<Box<dyn FnOnce() -> Result<(), FileError> + Send>>,
}

impl Ctl {
    /// A session under `root` writing to `w`; the plan sets the rest.
    pub(super) fn new(
        root: Arc<OwnedFd>,
        session: u64,
        w: BufWriter<ConnWriter>,
        timeout: Duration,
    ) -> Self {
        Ctl {
            cache: DirCache::new(Arc::clone(&root)),
            root,
            session,
            pass: PassKind::Copy,
            compare: Compare::Quick,
            delete: false,
            excludes: Excludes::default(),
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
            on_complete: None,
        }
    }

    pub(super) fn send(&mut self, m: &FileMsg) -> Result<(), FileError> {
        m.write_to(&mut *lock(&self.w))?;
        Ok(())
    }

    pub(super) fn flush(&mut self) -> Result<(), FileError> {
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
    pub(super) fn tick(&mut self) -> Result<(), FileError> {
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

    pub(super) fn entry(
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
            if crate::file::is_no_space(&e) {
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
                                .and_then(|f| crate::file::walk::hash_reader(&f).ok())
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
                                    .and_then(|f| crate::file::walk::hash_reader(&f).ok())
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

    pub(super) fn link_name(&mut self, path: &[u8], target: &[u8]) -> Result<(), FileError> {
        split(target).map_err(|e| FileError::path(target, e))?;
        let (_, name) = split(path).map_err(|e| FileError::path(path, e))?;
        let name = name.to_vec();
        self.claim(parent(path), &name)
    }

    pub(super) fn dir_end(&mut self, id: u64, path: &[u8]) -> Result<(), FileError> {
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

    /// Journal pass: a changed name the source no longer has is deleted, with everything
    /// below it (unless excluded, like any deletion).
    pub(super) fn gone(&mut self, id: u64, path: &[u8]) -> Result<(), FileError> {
        self.last_id = id;
        let (_, name) = split(path).map_err(|e| FileError::path(path, e))?;
        if self.pass != PassKind::Copy || !self.delete {
            return Err(FileError::Protocol(format!(
                "deletion of {} in a pass that does not delete",
                lossy(path)
            )));
        }
        if self.excludes.matches(path) {
            return Ok(());
        }
        let dir = parent(path);
        let dfd = match self.cache.open(dir) {
            Ok(fd) => fd,
            // Nothing below a missing directory to delete.
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => return Ok(()),
            Err(e) => return Err(FileError::target(dir, e)),
        };
        if let Some(pn) = partial_of(name) {
            unlink_quietly(dfd.as_fd(), &pn);
        }
        if stat_at(dfd.as_fd(), name)
            .map_err(|e| FileError::target(path, e))?
            .is_some()
        {
            self.cache.forget(path);
            self.reaper
                .delete(Arc::clone(&dfd), name.to_vec(), path.to_vec());
        }
        Ok(())
    }

    /// Final phase: makes `path` another name of `target`.
    pub(super) fn make_link(&mut self, path: &[u8], target: &[u8]) -> Result<(), FileError> {
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
    pub(super) fn times(
        &mut self,
        path: &[u8],
        atime: crate::file::proto::Time,
        mtime: crate::file::proto::Time,
    ) {
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
