//! The change journal: a fanotify group with a filesystem mark on each migrated filesystem
//! (`FAN_MARK_FILESYSTEM`, names reported as directory handle + name, `FAN_REPORT_DFID_NAME`,
//! Linux 5.9) records which names changed, so that a sync visits only those instead of
//! listing every entry on both sides.
//!
//! Who holds it: the process that runs the passes, for as long as it runs them (`migrate
//! --mode file --watch`, the daemon's task). Nothing is persisted: a mark lives exactly as long
//! as its group's descriptor, so a journal cannot cover a restart or a reboot, and a pass run
//! by a process that holds no journal (or whose journal started after the last completed pass)
//! walks everything.
//!
//! A pass asks [`Journal::take`] for what changed since the last take, before it starts
//! walking; what changes afterwards is recorded for the next one. [`Journal::take`] answers
//! [`Scope::Full`] with the reason whenever the record may be incomplete: the first pass, the
//! kernel's queue overflowed (`FAN_Q_OVERFLOW`), the last pass that took changes did not
//! complete ([`Journal::completed`] was not called), an event could not be placed, too many
//! changes, a changed file with several hard links (the event names one of them), or a file
//! mapped writable by some process (writes through a shared mapping raise no event until the
//! mapping goes).
#![allow(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::{AtFlags, OFlag};
use nix::libc;

use super::proto::{S_IFDIR, S_IFMT, S_IFREG};
use super::sys;

/// Most changed names (and directories) the journal holds; past it a pass walks everything
/// (the walk is then not much slower than visiting each name).
const MAX_NAMES: usize = 2_000_000;
/// Bytes read from the group at once.
const READ_BUF: usize = 64 << 10;
/// How often the reader thread looks at the group when nothing wakes it.
const POLL_MS: u16 = 200;

/// Why the journal cannot be used at all.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The kernel cannot report directory handles and names (before Linux 5.9), or the
    /// filesystem cannot be marked (no file handles, no fsid).
    #[error("no change journal on this kernel or filesystem ({what}): {source}")]
    Unsupported {
        /// What was refused.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// Anything else.
    #[error("cannot start the change journal ({what}): {source}")]
    Io {
        /// What failed.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

/// What changed in one directory since the last take.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirChange {
    /// The directory's own metadata changed (or its names did: its times move).
    pub itself: bool,
    /// An event named the directory but no name in it: list it whole (and everything below).
    pub all: bool,
    /// Changed names; `true` where a directory was created or moved in under the name, which
    /// is then walked whole.
    pub names: BTreeMap<Vec<u8>, bool>,
}

/// What changed below one source root: directories by path relative to the root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootChanges {
    /// Directory (relative to the root, empty for the root itself) → what changed in it.
    pub dirs: BTreeMap<Vec<u8>, DirChange>,
}

impl RootChanges {
    /// Number of changed names (and directories changed themselves).
    pub fn len(&self) -> usize {
        self.dirs
            .values()
            .map(|d| d.names.len() + usize::from(d.itself || d.all))
            .sum()
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    fn mark(&mut self, dir: &[u8], name: Option<&[u8]>, fresh: bool) {
        let d = self.dirs.entry(dir.to_vec()).or_default();
        d.itself = true;
        match name {
            Some(n) => {
                let f = d.names.entry(n.to_vec()).or_insert(false);
                *f |= fresh;
            }
            None => d.all = true,
        }
    }
}

/// What a pass must visit: every root of the journal by its source path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Source root → what changed below it.
    pub roots: Vec<(PathBuf, RootChanges)>,
}

impl Changes {
    /// What changed below source root `src`; `None` when the journal does not cover it.
    pub fn root(&self, src: &Path) -> Option<&RootChanges> {
        self.roots.iter().find(|(p, _)| p == src).map(|(_, c)| c)
    }

    /// Changed names in all roots.
    pub fn len(&self) -> usize {
        self.roots.iter().map(|(_, c)| c.len()).sum()
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.roots.iter().all(|(_, c)| c.is_empty())
    }
}

/// What the next pass may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Walk everything, for this reason.
    Full(String),
    /// Visit only these changes (plus whatever is below a new directory).
    Changes(Changes),
}

/// A kernel file handle, the journal's name for a directory until a take resolves it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Handle {
    fsid: [u8; 8],
    kind: i32,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct Pending {
    /// Changed names by directory handle.
    dirs: HashMap<Handle, (bool, BTreeMap<Vec<u8>, bool>)>,
    names: usize,
    /// Directories renamed (moves of a directory change the paths a take resolves).
    dir_moves: u64,
    /// Why the record is incomplete since the last take.
    lost: Option<String>,
}

struct JRoot {
    src: PathBuf,
    /// `src` without symlinks: what the kernel's paths start with.
    real: PathBuf,
    fd: OwnedFd,
    fsid: [u8; 8],
    dev: u64,
}

struct Inner {
    group: OwnedFd,
    roots: Vec<JRoot>,
    state: Mutex<State>,
}

struct State {
    pending: Pending,
    /// The changes of the last take have not been confirmed by [`Journal::completed`].
    unconfirmed: bool,
}

/// A running change journal over some source roots (see the module documentation).
pub struct Journal {
    inner: Arc<Inner>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let roots: Vec<&Path> = self.inner.roots.iter().map(|r| r.src.as_path()).collect();
        f.debug_struct("Journal").field("roots", &roots).finish()
    }
}

fn io_err(what: impl Into<String>, source: std::io::Error) -> JournalError {
    JournalError::Io {
        what: what.into(),
        source,
    }
}

/// The fsid the kernel reports with each event (`statfs`'s `f_fsid`).
fn fsid_of(fd: BorrowedFd<'_>) -> std::io::Result<[u8; 8]> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs fills the buffer it is given, which is large enough.
    let rc = unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fstatfs succeeded, so the buffer is initialised.
    let st = unsafe { st.assume_init() };
    // SAFETY: fsid_t is two C ints (its fields are private in libc), 8 plain bytes.
    Ok(unsafe { std::mem::transmute::<libc::fsid_t, [u8; 8]>(st.f_fsid) })
}

impl Journal {
    /// Starts recording changes on the filesystems of `roots` (each root a directory the
    /// passes walk). Needs CAP_SYS_ADMIN and Linux 5.9.
    pub fn start(roots: &[PathBuf]) -> Result<Journal, JournalError> {
        let flags = libc::FAN_CLASS_NOTIF
            | libc::FAN_CLOEXEC
            | libc::FAN_NONBLOCK
            | libc::FAN_REPORT_DFID_NAME;
        // SAFETY: a plain syscall; the result is checked.
        let fd = unsafe { libc::fanotify_init(flags, (libc::O_RDONLY | libc::O_LARGEFILE) as u32) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EINVAL) | Some(libc::ENOSYS) => JournalError::Unsupported {
                    what: "fanotify with FAN_REPORT_DFID_NAME (Linux 5.9)".into(),
                    source: e,
                },
                _ => io_err("fanotify_init", e),
            });
        }
        // SAFETY: fanotify_init just returned this descriptor; nothing else owns it.
        let group = unsafe { OwnedFd::from_raw_fd(fd) };
        let mask = libc::FAN_CREATE
            | libc::FAN_DELETE
            | libc::FAN_MOVED_FROM
            | libc::FAN_MOVED_TO
            | libc::FAN_ATTRIB
            | libc::FAN_MODIFY
            | libc::FAN_CLOSE_WRITE
            | libc::FAN_ONDIR;
        let mut jroots = Vec::new();
        let mut marked: Vec<[u8; 8]> = Vec::new();
        for src in roots {
            let real = std::fs::canonicalize(src)
                .map_err(|e| io_err(format!("resolving {}", src.display()), e))?;
            whole_filesystem(&real)?;
            let dfd = sys::open(&real, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
                .map_err(|e| io_err(format!("opening {}", src.display()), e))?;
            let st = nix::sys::stat::fstat(dfd.as_raw_fd())
                .map_err(|e| io_err(format!("stat {}", src.display()), e.into()))?;
            let fsid =
                fsid_of(dfd.as_fd()).map_err(|e| io_err(format!("statfs {}", src.display()), e))?;
            if !marked.contains(&fsid) {
                let c = std::ffi::CString::new(src.as_os_str().as_bytes()).map_err(|_| {
                    io_err(
                        format!("{}", src.display()),
                        std::io::Error::from(std::io::ErrorKind::InvalidInput),
                    )
                })?;
                // SAFETY: a plain syscall on descriptors we own and a NUL-terminated path.
                let rc = unsafe {
                    libc::fanotify_mark(
                        group.as_raw_fd(),
                        libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                        mask,
                        libc::AT_FDCWD,
                        c.as_ptr(),
                    )
                };
                if rc != 0 {
                    let e = std::io::Error::last_os_error();
                    let what = format!("a filesystem mark on {}", src.display());
                    return Err(match e.raw_os_error() {
                        Some(libc::EINVAL)
                        | Some(libc::EOPNOTSUPP)
                        | Some(libc::ENODEV)
                        | Some(libc::EXDEV) => JournalError::Unsupported { what, source: e },
                        _ => io_err(what, e),
                    });
                }
                marked.push(fsid);
            }
            jroots.push(JRoot {
                src: src.clone(),
                real,
                fd: dfd,
                fsid,
                dev: st.st_dev,
            });
        }
        let inner = Arc::new(Inner {
            group,
            roots: jroots,
            state: Mutex::new(State {
                pending: Pending {
                    lost: Some("no pass has completed since the journal started".into()),
                    ..Pending::default()
                },
                unconfirmed: false,
            }),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (inner, stop) = (Arc::clone(&inner), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("fjournal".into())
                .spawn(move || inner.run(&stop))
                .map_err(|e| io_err("starting the journal reader", e))?
        };
        tracing::info!(roots = roots.len(), "file change journal started");
        Ok(Journal {
            inner,
            stop,
            reader: Some(reader),
        })
    }

    /// What changed since the last take (all events queued so far are read first), or why
    /// the next pass must walk everything. Either way the record starts anew: the pass that
    /// follows covers what it returned, and [`Journal::completed`] must confirm it, or the
    /// next take says [`Scope::Full`].
    pub fn take(&self) -> Scope {
        let mut st = crate::lock(&self.inner.state);
        self.inner.drain(&mut st.pending);
        let pending = std::mem::take(&mut st.pending);
        let was_unconfirmed = std::mem::replace(&mut st.unconfirmed, true);
        drop(st);
        if was_unconfirmed {
            return Scope::Full(
                "the last pass that used the journal did not complete, so its changes may not be on the target".into(),
            );
        }
        if let Some(why) = pending.lost {
            return Scope::Full(why);
        }
        let resolved = self.inner.resolve(pending.dirs);
        // A directory moved while the handles were resolved: a path may already be its new
        // one, which the target gets only with the next pass's move.
        let mut st = crate::lock(&self.inner.state);
        self.inner.drain(&mut st.pending);
        if st.pending.dir_moves > 0 {
            return Scope::Full(
                "a directory moved while the journal's changes were being placed".into(),
            );
        }
        drop(st);
        match resolved {
            Ok(c) => Scope::Changes(c),
            Err(why) => Scope::Full(why),
        }
    }

    /// The pass that followed the last take completed: its changes are on the target.
    pub fn completed(&self) {
        crate::lock(&self.inner.state).unconfirmed = false;
    }

    /// The source roots the journal covers.
    pub fn roots(&self) -> Vec<PathBuf> {
        self.inner.roots.iter().map(|r| r.src.clone()).collect()
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

impl Inner {
    /// The reader thread: reads events as they come, so that the kernel's queue (16384
    /// events) overflows only under a flood faster than this loop.
    fn run(&self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            let mut pfd = [nix::poll::PollFd::new(
                self.group.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(POLL_MS)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "the change journal cannot wait for events");
                    let mut st = crate::lock(&self.state);
                    st.pending
                        .lost
                        .get_or_insert_with(|| format!("the journal's reader failed ({e})"));
                    std::thread::sleep(Duration::from_millis(u64::from(POLL_MS)));
                    continue;
                }
            }
            let mut st = crate::lock(&self.state);
            self.drain(&mut st.pending);
        }
    }

    /// Reads every queued event into `p` (the caller holds the state lock, so a take sees
    /// every event queued before it).
    fn drain(&self, p: &mut Pending) {
        let mut buf = vec![0u8; READ_BUF];
        loop {
            match nix::unistd::read(self.group.as_raw_fd(), &mut buf) {
                Ok(0) => return,
                Ok(n) => parse(&buf[..n], p),
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    p.lost
                        .get_or_insert_with(|| format!("reading the journal failed ({e})"));
                    return;
                }
            }
        }
    }

    /// Turns directory handles into paths below the roots; checks the changed names for
    /// what a journal cannot cover (several hard links, writable shared mappings).
    fn resolve(
        &self,
        dirs: HashMap<Handle, (bool, BTreeMap<Vec<u8>, bool>)>,
    ) -> Result<Changes, String> {
        let mut out: Vec<(PathBuf, RootChanges)> = self
            .roots
            .iter()
            .map(|r| (r.src.clone(), RootChanges::default()))
            .collect();
        for (h, (all, names)) in dirs {
            let Some(path) = self.handle_path(&h)? else {
                // The directory is gone: its removal is an event in its parent.
                continue;
            };
            // Every directory of a marked filesystem is below its root, which is one of ours.
            let Some((i, rel)) = self.place(&path) else {
                return Err(format!(
                    "a changed directory ({}) lies outside the migrated roots",
                    path.display()
                ));
            };
            let rc = &mut out[i].1;
            rc.dirs.entry(rel.clone()).or_default().itself = true;
            if all {
                rc.mark(&rel, None, false);
            }
            for (name, fresh) in names {
                rc.mark(&rel, Some(&name), fresh);
            }
        }
        self.mapped(&mut out)?;
        for (i, (_, rc)) in out.iter().enumerate() {
            links(&self.roots[i], rc)?;
        }
        Ok(Changes { roots: out })
    }

    /// The current path of the directory with handle `h`; `None` when it no longer exists.
    fn handle_path(&self, h: &Handle) -> Result<Option<PathBuf>, String> {
        let Some(root) = self.roots.iter().find(|r| r.fsid == h.fsid) else {
            return Err("an event came from a filesystem the journal does not watch".into());
        };
        // struct file_handle: handle_bytes u32, handle_type i32, f_handle[handle_bytes].
        let mut fh = Vec::with_capacity(8 + h.bytes.len());
        // At most MAX_HANDLE_SZ (128) bytes: the kernel wrote the length as a u32.
        let len =
            u32::try_from(h.bytes.len()).map_err(|_| "a file handle is too long".to_string())?;
        fh.extend_from_slice(&len.to_ne_bytes());
        fh.extend_from_slice(&h.kind.to_ne_bytes());
        fh.extend_from_slice(&h.bytes);
        // Keep the buffer aligned for the kernel's struct.
        let mut words = vec![0u32; fh.len().div_ceil(4)];
        // SAFETY: `words` holds at least fh.len() bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(fh.as_ptr(), words.as_mut_ptr().cast::<u8>(), fh.len())
        };
        // SAFETY: the buffer is a complete struct file_handle; the result is checked.
        let fd = unsafe {
            libc::open_by_handle_at(
                root.fd.as_raw_fd(),
                words.as_mut_ptr().cast::<libc::file_handle>(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ESTALE) | Some(libc::ENOENT) => Ok(None),
                _ => Err(format!(
                    "a changed directory cannot be opened by its handle ({e})"
                )),
            };
        }
        // SAFETY: open_by_handle_at just returned this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = std::fs::read_link(sys::fd_path(fd.as_fd()))
            .map_err(|e| format!("a changed directory has no path ({e})"))?;
        // The path must name that very directory (a stale or unreachable path must not).
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| e.to_string())?;
        match nix::sys::stat::lstat(&path) {
            Ok(p) if (p.st_dev, p.st_ino) == (st.st_dev, st.st_ino) => Ok(Some(path)),
            // Deleted (its path then reads "… (deleted)") or moved meanwhile: the move is an
            // event the next take resolves; a deletion needs nothing below it.
            _ if st.st_nlink == 0 => Ok(None),
            _ => Err(format!(
                "a changed directory cannot be placed ({} does not name it)",
                path.display()
            )),
        }
    }

    /// The root `path` is in (the deepest) and the path relative to it.
    fn place(&self, path: &Path) -> Option<(usize, Vec<u8>)> {
        self.roots
            .iter()
            .enumerate()
            .filter(|(_, r)| path.starts_with(&r.real))
            .max_by_key(|(_, r)| r.real.as_os_str().len())
            .map(|(i, r)| {
                let rest = path.strip_prefix(&r.real).unwrap_or(Path::new(""));
                (i, rest.as_os_str().as_bytes().to_vec())
            })
    }

    /// Files on a journaled filesystem that a process maps shared and writable: writes
    /// through the mapping raise no event, so each is visited as changed.
    fn mapped(&self, out: &mut [(PathBuf, RootChanges)]) -> Result<(), String> {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return Err("/proc cannot be read, so writable mappings cannot be found".into());
        };
        for p in procs.flatten() {
            let name = p.file_name();
            if !name.as_bytes().iter().all(u8::is_ascii_digit) {
                continue;
            }
            // A process that ended meanwhile has nothing mapped any more.
            let Ok(maps) = std::fs::read(p.path().join("maps")) else {
                continue;
            };
            for line in maps.split(|&b| b == b'\n') {
                let Some(m) = parse_map(line) else { continue };
                let Some(root) = self.roots.iter().find(|r| {
                    (nix::sys::stat::major(r.dev), nix::sys::stat::minor(r.dev)) == m.dev
                }) else {
                    continue;
                };
                // A deleted file has no name in the tree: nothing of it is migrated.
                if m.path.ends_with(b" (deleted)") {
                    continue;
                }
                let path = Path::new(std::ffi::OsStr::from_bytes(m.path));
                let ok = nix::sys::stat::lstat(path)
                    .is_ok_and(|st| st.st_ino == m.ino && st.st_dev == root.dev);
                if !ok {
                    return Err(format!(
                        "process {} maps a file of {} writable that cannot be placed",
                        name.to_string_lossy(),
                        root.src.display()
                    ));
                }
                let Some((i, rel)) = self.place(path) else {
                    return Err(format!(
                        "process {} maps {} writable, outside the migrated roots",
                        name.to_string_lossy(),
                        path.display()
                    ));
                };
                let (dir, file) = match rel.iter().rposition(|&b| b == b'/') {
                    Some(k) => (rel[..k].to_vec(), rel[k + 1..].to_vec()),
                    None => (Vec::new(), rel.clone()),
                };
                if !file.is_empty() {
                    out[i].1.mark(&dir, Some(&file), false);
                }
            }
        }
        Ok(())
    }
}

/// Refuses a root that is not the whole of its filesystem (the root of a mount that shows the
/// filesystem's own root): a file in it may have another name elsewhere on the filesystem,
/// and a change through that name would be an event the journal could not place in the tree.
fn whole_filesystem(real: &Path) -> Result<(), JournalError> {
    let info = std::fs::read("/proc/self/mountinfo")
        .map_err(|e| io_err("reading /proc/self/mountinfo", e))?;
    let want = real.as_os_str().as_bytes();
    // The last mount on a path is the one seen there.
    let fs_root = info
        .split(|&b| b == b'\n')
        .filter_map(|l| {
            let f: Vec<&[u8]> = l.split(|&b| b == b' ').collect();
            (f.len() > 4 && unescape(f[4]) == want).then(|| unescape(f[3]))
        })
        .next_back();
    match fs_root {
        Some(r) if r == b"/" => Ok(()),
        Some(_) => Err(JournalError::Unsupported {
            what: format!("{} is a bind mount of part of a filesystem", real.display()),
            source: std::io::Error::from(std::io::ErrorKind::Unsupported),
        }),
        None => Err(JournalError::Unsupported {
            what: format!(
                "{} is not a mount point: a file there may have another name elsewhere on its filesystem",
                real.display()
            ),
            source: std::io::Error::from(std::io::ErrorKind::Unsupported),
        }),
    }
}

/// A mountinfo field with its octal escapes (`\040` for a space) undone.
fn unescape(f: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        if f[i] == b'\\'
            && i + 4 <= f.len()
            && f[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((f[i + 1] - b'0') * 64 + (f[i + 2] - b'0') * 8 + (f[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(f[i]);
            i += 1;
        }
    }
    out
}

/// One line of `/proc/PID/maps` that maps a file shared and writable.
struct MapLine<'a> {
    dev: (u64, u64),
    ino: u64,
    path: &'a [u8],
}

fn parse_map(line: &[u8]) -> Option<MapLine<'_>> {
    // "start-end perms offset maj:min inode   path"
    let mut f = line.splitn(6, |&b| b == b' ');
    let _range = f.next()?;
    let perms = f.next()?;
    if perms.len() < 4 || perms[1] != b'w' || perms[3] != b's' {
        return None;
    }
    let _off = f.next()?;
    let dev = std::str::from_utf8(f.next()?).ok()?;
    let ino: u64 = std::str::from_utf8(f.next()?).ok()?.parse().ok()?;
    let path = f.next()?.trim_ascii_start();
    if ino == 0 || !path.starts_with(b"/") {
        return None;
    }
    let (maj, min) = dev.split_once(':')?;
    let dev = (
        u64::from_str_radix(maj, 16).ok()?,
        u64::from_str_radix(min, 16).ok()?,
    );
    Some(MapLine { dev, ino, path })
}

/// A changed regular file with more than one name, or one inside a new directory, makes the
/// pass walk everything: an event names only the name it came through, and a journal pass
/// cannot find the others to link them.
fn links(root: &JRoot, rc: &RootChanges) -> Result<(), String> {
    for (dir, d) in &rc.dirs {
        let Ok(dfd) = open_below(root, dir) else {
            continue;
        };
        for (name, fresh) in &d.names {
            let Ok(st) = nix::sys::stat::fstatat(
                Some(dfd.as_raw_fd()),
                std::ffi::OsStr::from_bytes(name),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            ) else {
                continue;
            };
            let kind = st.st_mode & S_IFMT;
            if kind == S_IFREG && st.st_nlink > 1 {
                return Err(format!(
                    "a changed file has {} hard links ({})",
                    st.st_nlink,
                    root.src
                        .join(std::ffi::OsStr::from_bytes(dir))
                        .join(std::ffi::OsStr::from_bytes(name))
                        .display()
                ));
            }
            if kind == S_IFDIR && *fresh {
                if let Ok(sub) = sys::openat(
                    dfd.as_fd(),
                    name,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                    0,
                ) {
                    linked_below(sub.as_fd(), st.st_dev, 0)?;
                }
            }
        }
    }
    Ok(())
}

/// Fails when a regular file below `dir` (on device `dev`) has several names.
fn linked_below(dir: BorrowedFd<'_>, dev: u64, depth: u32) -> Result<(), String> {
    if depth > 4096 {
        return Err("a new directory is nested too deep to check for hard links".into());
    }
    let names = sys::list_dir(dir).unwrap_or_default();
    for n in names {
        let Ok(st) = nix::sys::stat::fstatat(
            Some(dir.as_raw_fd()),
            std::ffi::OsStr::from_bytes(&n),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) else {
            continue;
        };
        let kind = st.st_mode & S_IFMT;
        if kind == S_IFREG && st.st_nlink > 1 {
            return Err(format!(
                "a new directory holds a file with {} hard links",
                st.st_nlink
            ));
        }
        if kind == S_IFDIR && st.st_dev == dev {
            if let Ok(sub) = sys::openat(
                dir,
                &n,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                0,
            ) {
                linked_below(sub.as_fd(), dev, depth + 1)?;
            }
        }
    }
    Ok(())
}

/// Opens directory `rel` below a root, one component at a time without following symlinks
/// or leaving the root's filesystem.
fn open_below(root: &JRoot, rel: &[u8]) -> std::io::Result<OwnedFd> {
    open_rel(root.fd.as_fd(), root.dev, rel)
}

/// Opens directory `rel` below `base` (on device `dev`) without following symlinks or
/// crossing into another filesystem.
pub fn open_rel(base: BorrowedFd<'_>, dev: u64, rel: &[u8]) -> std::io::Result<OwnedFd> {
    let mut fd = sys::openat(base, b".", OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?;
    for c in rel.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
        let next = sys::openat(
            fd.as_fd(),
            c,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
            0,
        )?;
        let st = nix::sys::stat::fstat(next.as_raw_fd())?;
        if st.st_dev != dev {
            return Err(std::io::Error::other("another filesystem is mounted there"));
        }
        fd = next;
    }
    Ok(fd)
}

/// Records the events in `buf` (whole events, as read from the group).
fn parse(buf: &[u8], p: &mut Pending) {
    let mut off = 0;
    while off + 24 <= buf.len() {
        let ev = &buf[off..];
        let len = u32::from_ne_bytes([ev[0], ev[1], ev[2], ev[3]]) as usize;
        let meta_len = u16::from_ne_bytes([ev[6], ev[7]]) as usize;
        if len < 24 || off + len > buf.len() || meta_len < 24 || meta_len > len {
            p.lost
                .get_or_insert_with(|| "a malformed event was read".into());
            return;
        }
        let mut m = [0u8; 8];
        m.copy_from_slice(&ev[8..16]);
        let mask = u64::from_ne_bytes(m);
        let fd = i32::from_ne_bytes([ev[16], ev[17], ev[18], ev[19]]);
        if fd >= 0 {
            // SAFETY: the kernel handed us this descriptor; nothing else owns it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        record(mask, &ev[meta_len..len], p);
        off += len;
    }
}

/// Records one event with its info records.
fn record(mask: u64, mut info: &[u8], p: &mut Pending) {
    if mask & libc::FAN_Q_OVERFLOW != 0 {
        tracing::warn!("the change journal's event queue overflowed");
        p.lost
            .get_or_insert_with(|| "the kernel's event queue overflowed (FAN_Q_OVERFLOW)".into());
        return;
    }
    let fresh = mask & libc::FAN_ONDIR != 0 && mask & (libc::FAN_CREATE | libc::FAN_MOVED_TO) != 0;
    if mask & libc::FAN_ONDIR != 0 && mask & (libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO) != 0 {
        p.dir_moves += 1;
    }
    let mut placed = false;
    while info.len() >= 4 {
        let kind = info[0];
        let len = u16::from_ne_bytes([info[2], info[3]]) as usize;
        if len < 4 || len > info.len() {
            break;
        }
        let rec = &info[4..len];
        info = &info[len..];
        if kind != libc::FAN_EVENT_INFO_TYPE_DFID_NAME && kind != libc::FAN_EVENT_INFO_TYPE_DFID {
            continue;
        }
        // fsid (8), handle_bytes u32, handle_type i32, handle, then the name (DFID_NAME).
        if rec.len() < 16 {
            break;
        }
        let mut fsid = [0u8; 8];
        fsid.copy_from_slice(&rec[..8]);
        let hb = u32::from_ne_bytes([rec[8], rec[9], rec[10], rec[11]]) as usize;
        let ht = i32::from_ne_bytes([rec[12], rec[13], rec[14], rec[15]]);
        if rec.len() < 16 + hb {
            break;
        }
        let h = Handle {
            fsid,
            kind: ht,
            bytes: rec[16..16 + hb].to_vec(),
        };
        let name = if kind == libc::FAN_EVENT_INFO_TYPE_DFID_NAME {
            let rest = &rec[16 + hb..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            Some(&rest[..end])
        } else {
            None
        };
        if p.names >= MAX_NAMES {
            p.lost.get_or_insert_with(|| {
                format!("more than {MAX_NAMES} names changed since the last pass")
            });
            return;
        }
        // Directories count against the bound too (a flood of chmods names no new names).
        let entry = p.dirs.entry(h).or_insert_with(|| {
            p.names += 1;
            Default::default()
        });
        match name {
            // The directory itself (its metadata): its entry is listed.
            Some(b".") | Some(b"") => {}
            Some(n) => {
                let f = entry.1.entry(n.to_vec()).or_insert_with(|| {
                    p.names += 1;
                    false
                });
                *f |= fresh;
            }
            None => entry.0 = true,
        }
        placed = true;
    }
    if !placed {
        p.lost
            .get_or_insert_with(|| format!("an event ({mask:#x}) named no directory"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_of_shared_writable_files_only() {
        let l = b"7f00-7f10 rw-s 00000000 fd:01 1234    /srv/db/data.mdb";
        let m = parse_map(l).unwrap();
        assert_eq!(m.dev, (0xfd, 1));
        assert_eq!(m.ino, 1234);
        assert_eq!(m.path, b"/srv/db/data.mdb");
        assert!(parse_map(b"7f00-7f10 r--s 00000000 fd:01 1234 /x").is_none());
        assert!(parse_map(b"7f00-7f10 rw-p 00000000 fd:01 1234 /x").is_none());
        assert!(parse_map(b"7f00-7f10 rw-s 00000000 00:00 0 ").is_none());
        assert!(parse_map(b"garbage").is_none());
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(br"/mnt/a\040b"), b"/mnt/a b");
        assert_eq!(unescape(br"/x\"), b"/x\\");
        assert_eq!(unescape(b"/"), b"/");
        assert!(whole_filesystem(Path::new("/proc")).is_ok());
        assert!(whole_filesystem(Path::new("/proc/self")).is_err());
    }

    #[test]
    fn overflow_and_placeless_events_lose_the_record() {
        let mut p = Pending::default();
        record(libc::FAN_Q_OVERFLOW, &[], &mut p);
        assert!(p.lost.as_deref().unwrap().contains("overflow"));
        let mut p = Pending::default();
        record(libc::FAN_MODIFY, &[], &mut p);
        assert!(p.lost.as_deref().unwrap().contains("named no directory"));
        let mut p = Pending::default();
        parse(&[1, 0, 0], &mut p);
        assert!(p.lost.is_none());
    }
}
