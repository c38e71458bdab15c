//! The target side of a file pass: applies the source's listing under the root, answers with
//! what it needs, writes the files its data streams bring, and never touches anything outside
//! the root.
//!
//! Safety rules, all enforced here: every path from the wire goes through
//! [`super::path::components`]; directories are reached one component at a time with
//! `O_NOFOLLOW` ([`super::dirs::DirCache`]); entries are created with `mkdirat`, `symlinkat`, `mknodat`,
//! `O_CREAT | O_EXCL` temporaries and `renameat`, none of which follows a final symlink;
//! metadata is applied through descriptors or non-following calls; hard links are made only to
//! regular files this session listed as linked. Every count and byte string the peer controls
//! is capped.
//!
//! Modules: `serve` the session's phases, `listing` the entries of the listing, `data` the
//! data streams' writers, `partial` what a resume diffs against.

mod data;
mod listing;
mod partial;
mod serve;

use crate::lock;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::FileStat;

use super::proto::{Any, FileMsg, PassKind, S_IFMT, S_IFREG};
use super::sys;
use super::FileError;
use crate::conn::ConnWriter;
use crate::session::Incoming;
use crate::wire::Message;
use listing::Ctl;
use serve::serve;

/// Files from this size on get chunk sums when the target has an older copy.
pub const DELTA_MIN: u64 = 1 << 20;

/// Prefix of temporary names; the session id follows, so a later session can tell its own
/// in-flight files from leftovers of an interrupted one.
pub const TEMP_PREFIX: &[u8] = b".sms~";

/// Prefix of a partly received large file kept after a broken connection (this prefix, then
/// the final name): the next session diffs against it, so a resume sends only what is
/// missing. It never carries the final name, so nothing trusts it as complete.
pub const PARTIAL_PREFIX: &[u8] = b".sms~part~";

/// Where the target writes.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// Everything is written below this directory, nothing elsewhere.
    pub root: PathBuf,
    /// The receiver's state directory (the last session's report is kept there).
    pub state_dir: PathBuf,
    /// How long the source may stay silent on any stream (zero: [`crate::session::PEER_TIMEOUT`]).
    pub peer_timeout: Duration,
    /// `receive --prepare`: the target disks to lay out from the plan's layout and mount at
    /// `root` before the files land, and to configure after a complete copy pass.
    pub prepare: Option<Arc<crate::prepare::Target>>,
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

/// Serves one file-mode session (called from `Listener::serve`'s closure when
/// `inc.mode == Mode::File`): applies the source's pass under `opts.root`.
pub fn receive(inc: Incoming, opts: &ReceiveOptions) -> Result<ReceiveReport, FileError> {
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
    // The plan comes first: with --prepare its layout decides what is mounted at the root,
    // and the root is opened only after that.
    let plan = serve::read_plan(&mut r);
    let staged = match (&plan, &opts.prepare) {
        (Ok(p), Some(t)) if p.pass == PassKind::Copy => match &p.layout {
            Some(l) => t.ensure(l).map_err(FileError::from),
            None => Err(FileError::Prepare(crate::prepare::PrepareError {
                code: crate::code::Code::PartitionFailed,
                message: "the source sent no disk layout to prepare the target disks from (migrate logs why it could not read it)".into(),
            })),
        },
        _ => Ok(()),
    };
    let root = sys::open(&opts.root, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
        .map_err(|e| FileError::target(opts.root.as_os_str().as_bytes(), e));
    let root = match root {
        Ok(r) => Arc::new(r),
        Err(e) => return Err(e),
    };
    let mut ctl = Ctl::new(Arc::clone(&root), session, w, timeout);
    if let Some(t) = &opts.prepare {
        let t = Arc::clone(t);
        ctl.on_complete = Some(Box::new(move || t.configure().map_err(FileError::from)));
    }
    let plan = staged.and(plan);
    // The source waits on this stream through the whole data phase and the final syncfs,
    // when there is nothing to tell it: keep-alives keep its peer timeout for dead targets.
    let ticker = KeepAlive::start(Arc::clone(&ctl.w), timeout);
    let mut res = plan.and_then(|p| serve(&mut ctl, &mut r, p, data, streams));
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
