//! The source side of a file pass: walks the roots onto the control stream, reads what the
//! target asks for on parallel data streams, and finishes with links, directory times and a
//! checkpoint. Also the consistency check, the same listing in check mode.
//!
//! Threads (all scoped to one call): the walker writes the listing; the control reader turns
//! `Need`s into jobs and counts what was skipped; one worker per data stream sends jobs. No
//! message waits for an answer except the final checkpoint, so the listing, the target's
//! comparisons and the data all flow at once.

use crate::lock;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::unistd::Whence;

use super::direct::Reader;
use super::dirs::DirCache;
use super::meta;
use super::path::{join, parent, Excludes, DEFAULT_EXCLUDES};
use super::proto::{
    read_any, Any, Compare, FileMsg, Meta, Packer, PassKind, SUM_LEN, S_IFDIR, S_IFREG,
};
use super::squeeze::Squeeze;
use super::walk::{open_source, Item, Root, WalkOptions, Walker};
use super::{lossy, source_path, sys, target_rel, FileError};
use crate::conn::ConnWriter;
use crate::session::{Connector, Stream, MAX_STREAMS};
use crate::task::{Control, Progress};
use crate::wire::{Message, Mode};

/// Data streams of a file pass unless told otherwise: each is a reader on the source and a
/// writer on the target, and with small files more of them keep more disk requests in flight
/// (8 measured a tenth faster than 4 with a cold cache, 16 no faster than 8).
pub const STREAMS: u16 = 8;
/// Files up to this size (with no older copy to diff against) travel whole in one frame.
pub const SMALL: u64 = 1 << 20;
/// Chunk of a large file without sums.
const CHUNK: u64 = 1 << 20;
/// How many peer timeouts a write on the control stream may wait for the target to take
/// data. Its liveness is the control reader's business (the target sends keep-alives, and a
/// silent one has every stream cut after one timeout); a live target may still take no
/// listing for long: while it queues the session behind another, or hashes a large file.
const CTL_WRITE_TIMEOUTS: u32 = 8;
/// Stack of the walker thread: one frame per directory level of a deep tree.
const WALK_STACK: usize = 64 << 20;
/// The listing is flushed at least this often, so the target starts comparing early.
const FLUSH_EVERY: Duration = Duration::from_millis(20);

/// What to migrate and how.
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Mount points / roots to migrate, each walked without crossing mounts; root `S` goes to
    /// `S` below the target root.
    pub sources: Vec<PathBuf>,
    /// Standalone `--source-root DIR`: `sources` is one directory, mapped to the target root.
    pub map_to_root: bool,
    /// Absolute paths to exclude (source paths, or paths of the migrated system); the
    /// defaults of [`DEFAULT_EXCLUDES`] and each root's `lost+found` are always added.
    pub excludes: Vec<PathBuf>,
    /// Data streams (1..=64).
    pub streams: u16,
    /// Incremental pass: also delete on the target what the source no longer has.
    pub sync: bool,
    /// Compare by content hash instead of size+mtime.
    pub hash_mode: bool,
    /// Task id for the session handshake.
    pub task_id: String,
    /// How long the target may stay silent or take no data on any stream (zero:
    /// [`crate::session::PEER_TIMEOUT`]).
    pub peer_timeout: Duration,
}

/// What a pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Entries listed (files, directories, links, nodes).
    pub entries: u64,
    /// Regular files whose data was sent.
    pub files: u64,
    /// Regular files the target already had.
    pub skipped: u64,
    /// Bytes of file data put on the wire (after compression).
    pub bytes_sent: u64,
    /// Plain bytes of file data sent.
    pub bytes_plain: u64,
    /// Bytes the target copied from its older copies instead (delta sync).
    pub bytes_reused: u64,
    /// Hard links made.
    pub links: u64,
    /// Files that changed while read: the target keeps their old mtime, so the next pass
    /// sends them again.
    pub changed_during_read: Vec<PathBuf>,
    /// Files that vanished or were replaced between listing and reading.
    pub vanished: u64,
    /// Entries the target deleted.
    pub deleted: u64,
    /// Regular files the target wrote.
    pub target_written: u64,
    /// Entries whose metadata alone the target updated in place.
    pub target_updated: u64,
    /// Things the operator should hear about (also in `Progress::note`).
    pub notes: Vec<String>,
}

/// A consistency check.
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// The migrated roots (as in [`SendOptions::sources`]).
    pub sources: Vec<PathBuf>,
    /// As in [`SendOptions::map_to_root`].
    pub map_to_root: bool,
    /// Directories to check (task setting `CONSISTENCY_DIR`), each inside one of `sources`;
    /// empty: each source root.
    pub dirs: Vec<PathBuf>,
    /// As in [`SendOptions::excludes`].
    pub excludes: Vec<PathBuf>,
    /// Hash mode (content) instead of quick mode (size+mtime).
    pub hash_mode: bool,
    /// Task id for the session handshake.
    pub task_id: String,
    /// As in [`SendOptions::peer_timeout`].
    pub peer_timeout: Duration,
}

/// One directory's result, as `POST …/consistency-result` takes it (at most 30 per request).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirCheck {
    /// The directory checked.
    pub dir_check: String,
    /// Files (non-directories) under it on the source.
    pub num_total_files: u64,
    /// Present on both sides but different.
    pub num_different_files: u64,
    /// On the source, missing on the target.
    pub num_target_miss_files: u64,
    /// On the target, not on the source.
    pub num_target_more_files: u64,
}

/// A regular file the target may ask for.
struct Job {
    id: u64,
    root: usize,
    src_rel: Vec<u8>,
    meta: Meta,
    key: (i64, i64, i64, i64, i64),
    ino: (u64, u64),
    sums: Option<(u64, Vec<[u8; SUM_LEN]>)>,
}

/// The control reader's channel to the main thread; a failure also cuts the streams.
struct Failing<'a> {
    etx: mpsc::Sender<Event>,
    cut: &'a dyn Fn(),
}

impl Failing<'_> {
    fn send(&self, e: Event) -> Result<(), mpsc::SendError<Event>> {
        let failed = matches!(e, Event::Failed(_));
        let r = self.etx.send(e);
        if failed {
            (self.cut)();
        }
        r
    }
}

/// What the control reader tells the main thread.
enum Event {
    ListDone,
    Ack,
    Failed(FileError),
}

#[derive(Default)]
struct Stats {
    files: AtomicU64,
    skipped: AtomicU64,
    wire: AtomicU64,
    plain: AtomicU64,
    reused: AtomicU64,
    vanished: AtomicU64,
}

/// The excludes of a pass, as target-relative patterns: the defaults, each root's
/// `lost+found`, and each configured path both as a path of the migrated system and, when it
/// lies under a source root, mapped through that root.
fn build_excludes(roots: &[Root], user: &[PathBuf]) -> Excludes {
    let mut pats: Vec<Vec<u8>> = DEFAULT_EXCLUDES
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    for r in roots {
        pats.push(join(&r.rel, b"lost+found"));
    }
    for e in user {
        pats.push(e.as_os_str().as_bytes().to_vec());
        for r in roots {
            if let Ok(rest) = e.strip_prefix(&r.src) {
                if !rest.as_os_str().is_empty() {
                    pats.push(join(&r.rel, rest.as_os_str().as_bytes()));
                }
            }
        }
    }
    Excludes::new(pats)
}

fn roots_of(sources: &[PathBuf], map_to_root: bool) -> Result<Vec<Root>, FileError> {
    if sources.is_empty() {
        return Err(FileError::Options("no source roots".into()));
    }
    if map_to_root && sources.len() != 1 {
        return Err(FileError::Options(
            "a source root mapped to the target root must be the only source".into(),
        ));
    }
    let mut roots: Vec<Root> = sources
        .iter()
        .map(|s| Root {
            src: s.clone(),
            rel: target_rel(s, map_to_root),
            ancestors: true,
        })
        .collect();
    // Parents before children (`/` before `/boot`), so the target has each root's parent.
    roots.sort_by(|a, b| a.rel.len().cmp(&b.rel.len()).then(a.rel.cmp(&b.rel)));
    roots.dedup_by(|a, b| a.rel == b.rel);
    Ok(roots)
}

/// Runs one pass: a full copy, a sync or a resume alike. `opts.sync` also deletes on the
/// target what the source no longer has.
pub fn send(
    connector: &Connector,
    opts: &SendOptions,
    progress: &Progress,
    control: &Control,
) -> Result<SendReport, FileError> {
    let roots = roots_of(&opts.sources, opts.map_to_root)?;
    let excludes = build_excludes(&roots, &opts.excludes);
    let pass = Pass {
        connector,
        task_id: &opts.task_id,
        roots: &roots,
        excludes: &excludes,
        kind: PassKind::Copy,
        compare: if opts.hash_mode {
            Compare::Hash
        } else {
            Compare::Quick
        },
        delete: opts.sync,
        streams: opts.streams,
        timeout: crate::session::peer_timeout(opts.peer_timeout),
    };
    let (report, _) = pass.run(progress, control)?;
    if control.cancelled() {
        return Err(FileError::Cancelled);
    }
    Ok(report)
}

/// The consistency check: lists `opts.dirs` against the target over a session and counts
/// per directory what differs, changing nothing.
pub fn consistency(
    connector: &Connector,
    opts: &CheckOptions,
    progress: &Progress,
    control: &Control,
) -> Result<Vec<DirCheck>, FileError> {
    let sources = roots_of(&opts.sources, opts.map_to_root)?;
    let excludes = build_excludes(&sources, &opts.excludes);
    let dirs = if opts.dirs.is_empty() {
        sources.iter().map(|r| r.src.clone()).collect()
    } else {
        opts.dirs.clone()
    };
    let mut roots = Vec::new();
    for d in &dirs {
        let root = sources
            .iter()
            .filter(|r| d.starts_with(&r.src))
            .max_by_key(|r| r.src.as_os_str().len())
            .ok_or_else(|| {
                FileError::Options(format!("{} is under no migrated root", d.display()))
            })?;
        let rest = d.strip_prefix(&root.src).unwrap_or(Path::new(""));
        let rel = if rest.as_os_str().is_empty() {
            root.rel.clone()
        } else {
            join(&root.rel, rest.as_os_str().as_bytes())
        };
        roots.push(Root {
            src: d.clone(),
            rel,
            ancestors: false,
        });
    }
    let pass = Pass {
        connector,
        task_id: &opts.task_id,
        roots: &roots,
        excludes: &excludes,
        kind: PassKind::Check,
        compare: if opts.hash_mode {
            Compare::Hash
        } else {
            Compare::Quick
        },
        delete: false,
        streams: 1,
        timeout: crate::session::peer_timeout(opts.peer_timeout),
    };
    let (_, checks) = pass.run(progress, control)?;
    Ok(checks
        .into_iter()
        .zip(&dirs)
        .map(|(mut c, d)| {
            c.dir_check = d.display().to_string();
            c
        })
        .collect())
}

struct Pass<'a> {
    connector: &'a Connector,
    task_id: &'a str,
    roots: &'a [Root],
    excludes: &'a Excludes,
    kind: PassKind,
    compare: Compare,
    delete: bool,
    streams: u16,
    /// Peer timeout of every stream.
    timeout: Duration,
}

/// What the walker hands back.
struct Listed {
    dirs: Vec<(Vec<u8>, super::proto::Time, super::proto::Time)>,
    links: Vec<(Vec<u8>, Vec<u8>)>,
    notes: Vec<String>,
    entries: u64,
}

fn flush(w: &mut BufWriter<ConnWriter>) -> Result<(), FileError> {
    w.flush()
        .map_err(|e| FileError::Wire(crate::wire::WireError::Io(e.to_string())))
}

/// The error to report for local failure `e`: when it is the transport's (a write into a
/// stream the other side cut or gave up on), the control reader's reason (the target's own
/// error, or how long it was silent) if it comes within a moment.
fn why(e: FileError, erx: &mpsc::Receiver<Event>) -> FileError {
    let transport = matches!(
        e,
        FileError::Wire(_) | FileError::Session(crate::session::SessionError::Wire(_))
    );
    if !transport {
        return e;
    }
    match erx.recv_timeout(Duration::from_secs(2)) {
        Ok(Event::Failed(f)) => f,
        _ => e,
    }
}

/// The root group an id belongs to (check pass): `starts[i]` is the first id of root `i`.
fn group_of(starts: &[u64], id: u64) -> usize {
    starts.partition_point(|&s| s <= id).saturating_sub(1)
}

/// Applies `f` to the consistency entry of the root that entry `id` belongs to.
fn tally(
    starts: &Mutex<Vec<u64>>,
    checks: &Mutex<Vec<DirCheck>>,
    id: u64,
    f: impl FnOnce(&mut DirCheck),
) {
    let g = group_of(&lock(starts), id);
    if let Some(c) = lock(checks).get_mut(g) {
        f(c);
    }
}

impl Pass<'_> {
    fn run(
        &self,
        progress: &Progress,
        control: &Control,
    ) -> Result<(SendReport, Vec<DirCheck>), FileError> {
        if self.streams == 0 || self.streams > MAX_STREAMS {
            return Err(FileError::Options(format!(
                "streams must be 1..={MAX_STREAMS}, not {}",
                self.streams
            )));
        }
        let mut root_fds = Vec::new();
        for r in self.roots {
            let fd = sys::open(&r.src, OFlag::O_RDONLY | OFlag::O_DIRECTORY).map_err(|e| {
                FileError::Source {
                    path: r.src.display().to_string(),
                    source: e,
                }
            })?;
            root_fds.push(Arc::new(fd));
        }
        let (ctl, session) = self
            .connector
            .open(self.task_id, Mode::File, 0, self.streams, 0)?;
        ctl.set_read_timeout(Some(self.timeout));
        ctl.set_write_timeout(Some(self.timeout * CTL_WRITE_TIMEOUTS));
        let mut data = Vec::new();
        if self.kind == PassKind::Copy {
            // All at once: each is a TCP connect and a TLS handshake, a round trip or two.
            let opened: Vec<Result<Stream, FileError>> = std::thread::scope(|s| {
                let handles: Vec<_> = (1..=self.streams)
                    .map(|i| {
                        s.spawn(move || {
                            self.connector
                                .open(self.task_id, Mode::File, i, self.streams, session)
                                .map(|(s, _)| s)
                                .map_err(FileError::from)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(FileError::Protocol("stream opener panicked".into()))
                        })
                    })
                    .collect()
            });
            for s in opened {
                let s = s?;
                s.set_timeouts(self.timeout);
                data.push(s);
            }
        }
        // A worker blocked in a write to a peer that stopped reading (a cut connection, a
        // target gone silent) wakes only when its socket is shut: the failure paths do that.
        let cutters: Vec<std::net::TcpStream> = data.iter().filter_map(Stream::cutter).collect();
        let cut_data = || {
            for c in &cutters {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        };
        // Cuts the control stream: wakes a walker blocked writing to a target gone silent.
        let ctl_cutter = ctl.cutter();
        let cut_ctl = || {
            if let Some(c) = &ctl_cutter {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        };
        let (mut cr, mut cw) = ctl.into_halves();
        FileMsg::Plan {
            pass: self.kind,
            compare: self.compare,
            delete: self.delete,
            excludes: self.excludes.patterns().to_vec(),
        }
        .write_to(&mut cw)?;
        let cw = Arc::new(Mutex::new(cw));
        // The walker may be quiet for long (a huge directory, a slow disk) and the main
        // thread waits through the data phase and the target's syncfs: keep-alives keep the
        // target's peer timeout for a source that is really gone.
        let ticker = super::recv::KeepAlive::start(Arc::clone(&cw), self.timeout);

        let pending: Mutex<BTreeMap<u64, Job>> = Mutex::new(BTreeMap::new());
        let (qtx, qrx) = mpsc::channel::<Job>();
        let qrx = Mutex::new(qrx);
        let (etx, erx) = mpsc::channel::<Event>();
        let abort = AtomicBool::new(false);
        let stats = Stats::default();
        let starts: Mutex<Vec<u64>> = Mutex::new(Vec::new());
        let checks: Mutex<Vec<DirCheck>> = Mutex::new(vec![DirCheck::default(); self.roots.len()]);
        let summary: Mutex<(u64, u64, u64)> = Mutex::new((0, 0, 0));
        let changed: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
        let errors: Mutex<Vec<FileError>> = Mutex::new(Vec::new());
        let squeeze = Squeeze::new(self.streams);

        let result = std::thread::scope(|s| -> Result<Listed, FileError> {
            // Control reader.
            let reader = {
                let (pending, etx, stats, starts, checks, summary) =
                    (&pending, etx.clone(), &stats, &starts, &checks, &summary);
                let kind = self.kind;
                let (cut_ctl, cut_data) = (&cut_ctl, &cut_data);
                s.spawn(move || {
                    let mut qtx = Some(qtx);
                    // Whatever ends this reader but the final Ack ends the pass: cut the
                    // streams so that no thread stays blocked on a target that is gone.
                    let etx = Failing {
                        etx,
                        cut: &|| {
                            cut_ctl();
                            cut_data();
                        },
                    };
                    loop {
                        let m = match read_any(&mut cr) {
                            Ok(m) => m,
                            Err(e) => {
                                let _ = etx.send(Event::Failed(e.into()));
                                return;
                            }
                        };
                        match m {
                            Any::File(FileMsg::Need {
                                id,
                                chunk_size,
                                sums,
                            }) => {
                                let job = lock(pending).remove(&id);
                                let Some(mut job) = job else {
                                    let _ = etx.send(Event::Failed(FileError::Protocol(format!(
                                        "the target needs entry {id}, which is no pending file"
                                    ))));
                                    return;
                                };
                                if chunk_size > 0 && !sums.is_empty() {
                                    job.sums = Some((u64::from(chunk_size), sums));
                                }
                                if let Some(q) = &qtx {
                                    let _ = q.send(job);
                                }
                            }
                            Any::File(FileMsg::Processed { upto }) => {
                                let skipped = {
                                    let mut p = lock(pending);
                                    let rest = p.split_off(&upto.saturating_add(1));
                                    std::mem::replace(&mut *p, rest)
                                };
                                for j in skipped.values() {
                                    Progress::add(&progress.done, j.meta.size);
                                }
                                stats
                                    .skipped
                                    .fetch_add(skipped.len() as u64, Ordering::Relaxed);
                            }
                            Any::File(FileMsg::ListDone) => {
                                qtx = None;
                                let _ = etx.send(Event::ListDone);
                                if kind == PassKind::Check {
                                    return;
                                }
                            }
                            Any::File(FileMsg::Verdict { id, missing }) => {
                                tally(starts, checks, id, |c| {
                                    if missing {
                                        c.num_target_miss_files += 1;
                                    } else {
                                        c.num_different_files += 1;
                                    }
                                });
                            }
                            Any::File(FileMsg::Extra { id, count }) => {
                                tally(starts, checks, id, |c| c.num_target_more_files += count);
                            }
                            Any::File(FileMsg::Summary {
                                written,
                                deleted,
                                updated,
                            }) => {
                                *lock(summary) = (written, deleted, updated);
                            }
                            Any::Common(Message::Ack { .. }) => {
                                let _ = etx.send(Event::Ack);
                                return;
                            }
                            Any::Common(Message::Error { code, message }) => {
                                let _ =
                                    etx.send(Event::Failed(FileError::Remote { code, message }));
                                return;
                            }
                            other => {
                                let _ = etx.send(Event::Failed(FileError::Protocol(format!(
                                    "unexpected {} from the target",
                                    match &other {
                                        Any::File(m) => m.name(),
                                        Any::Common(m) => crate::session::name_of(m),
                                    }
                                ))));
                                return;
                            }
                        }
                    }
                })
            };

            // Data workers.
            let mut workers = Vec::new();
            let squeeze = &squeeze;
            for stream in data.drain(..) {
                let (qrx, abort, stats, changed, errors, root_fds) =
                    (&qrx, &abort, &stats, &changed, &errors, &root_fds);
                workers.push(s.spawn(move || {
                    let w = Worker {
                        roots: self.roots,
                        timeout: self.timeout,
                        stats,
                        progress,
                        control,
                        squeeze,
                    };
                    w.run(stream, qrx, abort, changed, errors, root_fds);
                }));
            }

            // Walker.
            let walker = {
                let (pending, abort, starts, checks, cw) =
                    (&pending, &abort, &starts, &checks, &cw);
                let cut_ctl = &cut_ctl;
                let kind = self.kind;
                std::thread::Builder::new()
                    .stack_size(WALK_STACK)
                    .spawn_scoped(s, move || -> Result<Listed, FileError> {
                        let cancelled = || control.cancelled() || abort.load(Ordering::Relaxed);
                        let mut out = Listed {
                            dirs: Vec::new(),
                            links: Vec::new(),
                            notes: Vec::new(),
                            entries: 0,
                        };
                        let next_id = std::cell::Cell::new(0u64);
                        let group = std::cell::Cell::new(0usize);
                        let mut walked = 0u64;
                        let mut last_flush = Instant::now();
                        let mut since = 0u32;
                        let res = {
                            let dirs = &mut out.dirs;
                            let links = &mut out.links;
                            let sink = |item: Item<'_>| -> Result<(), FileError> {
                                let msg = match item {
                                    Item::Entry {
                                        root,
                                        src_rel,
                                        rel,
                                        meta,
                                        target,
                                        linked,
                                        hash,
                                        key,
                                        ino,
                                    } => {
                                        let id = next_id.get();
                                        next_id.set(id + 1);
                                        let k = meta.kind();
                                        if k == S_IFDIR {
                                            dirs.push((rel.to_vec(), meta.atime, meta.mtime));
                                        } else if kind == PassKind::Check {
                                            if let Some(c) = lock(checks).get_mut(group.get()) {
                                                c.num_total_files += 1;
                                            }
                                        }
                                        if k == S_IFREG {
                                            walked += meta.size;
                                            let t = Progress::get(&progress.total);
                                            if walked > t {
                                                Progress::add(&progress.total, walked - t);
                                            }
                                            if kind == PassKind::Copy {
                                                lock(pending).insert(
                                                    id,
                                                    Job {
                                                        id,
                                                        root,
                                                        src_rel: src_rel.to_vec(),
                                                        meta: meta.clone(),
                                                        key,
                                                        ino,
                                                        sums: None,
                                                    },
                                                );
                                            }
                                        }
                                        FileMsg::Entry {
                                            id,
                                            path: rel.to_vec(),
                                            meta,
                                            target,
                                            linked,
                                            hash,
                                        }
                                    }
                                    Item::Link { rel, target } => {
                                        links.push((rel.to_vec(), target.to_vec()));
                                        FileMsg::Link {
                                            path: rel.to_vec(),
                                            target: target.to_vec(),
                                        }
                                    }
                                    Item::DirEnd { rel } => {
                                        let id = next_id.get();
                                        next_id.set(id + 1);
                                        FileMsg::DirEnd {
                                            id,
                                            path: rel.to_vec(),
                                        }
                                    }
                                };
                                let mut out_w = lock(cw);
                                msg.write_to(&mut *out_w)?;
                                since += 1;
                                if since >= 512 || last_flush.elapsed() >= FLUSH_EVERY {
                                    flush(&mut out_w)?;
                                    since = 0;
                                    last_flush = Instant::now();
                                }
                                Ok(())
                            };
                            let mut walker = Walker::new(
                                WalkOptions {
                                    excludes: self.excludes,
                                    hash: self.compare == Compare::Hash,
                                    links_as_entries: kind == PassKind::Check,
                                    cancelled: &cancelled,
                                },
                                sink,
                            );
                            let mut res = Ok(());
                            for (i, r) in self.roots.iter().enumerate() {
                                if cancelled() {
                                    break;
                                }
                                lock(starts).push(next_id.get());
                                group.set(i);
                                res = walker.walk(i, r);
                                if res.is_err() {
                                    break;
                                }
                            }
                            out.notes = std::mem::take(&mut walker.notes);
                            out.entries = walker.entries;
                            res
                        };
                        if let Err(e) = res {
                            // Cut the session so the control reader and the workers end too.
                            cut_ctl();
                            return Err(e);
                        }
                        {
                            let mut w = lock(cw);
                            FileMsg::ListEnd.write_to(&mut *w)?;
                            flush(&mut w)?;
                        }
                        let t = Progress::get(&progress.total);
                        if walked < t && !cancelled() {
                            progress.total.store(walked, Ordering::Relaxed);
                        }
                        Ok(out)
                    })
                    .map_err(|e| FileError::Protocol(format!("cannot start the walker: {e}")))?
            };
            let listed = walker
                .join()
                .map_err(|_| FileError::Protocol("walker panicked".into()));
            let listed = match listed.and_then(|r| r) {
                Ok(l) => l,
                Err(e) => {
                    abort.store(true, Ordering::Relaxed);
                    cut_data();
                    return Err(why(e, &erx));
                }
            };
            // Wait for the target to finish the listing.
            let mut failed = None;
            match erx.recv() {
                Ok(Event::ListDone) => {}
                Ok(Event::Failed(e)) => failed = Some(e),
                Ok(Event::Ack) => failed = Some(FileError::Protocol("early Ack".into())),
                Err(_) => failed = Some(FileError::Protocol("control reader ended".into())),
            }
            if let Some(e) = failed {
                abort.store(true, Ordering::Relaxed);
                cut_data();
                cut_ctl();
                drop(listed);
                for w in workers {
                    let _ = w.join();
                }
                let _ = reader.join();
                return Err(e);
            }
            for w in workers {
                let _ = w.join();
            }
            if let Some(e) = lock(&errors).drain(..).next() {
                let e = why(e, &erx);
                cut_ctl();
                let _ = reader.join();
                return Err(e);
            }
            if self.kind == PassKind::Check {
                drop(ticker);
                let mut w = lock(&cw);
                Message::Bye.write_to(&mut *w)?;
                flush(&mut w)?;
                drop(w);
                let _ = reader.join();
                return Ok(listed);
            }
            // Final phase.
            let mut w = lock(&cw);
            FileMsg::Finish.write_to(&mut *w)?;
            for (path, target) in &listed.links {
                FileMsg::Link {
                    path: path.clone(),
                    target: target.clone(),
                }
                .write_to(&mut *w)?;
            }
            for (path, atime, mtime) in listed.dirs.iter().rev() {
                FileMsg::Times {
                    path: path.clone(),
                    atime: *atime,
                    mtime: *mtime,
                }
                .write_to(&mut *w)?;
            }
            Message::Checkpoint {
                seq: stats.files.load(Ordering::Relaxed),
            }
            .write_to(&mut *w)?;
            flush(&mut w)?;
            // Unlocked while the target syncs: the ticker keeps the stream alive meanwhile.
            drop(w);
            let r = match erx.recv() {
                Ok(Event::Ack) => Ok(()),
                Ok(Event::Failed(e)) => Err(e),
                _ => Err(FileError::Protocol("no checkpoint acknowledgement".into())),
            };
            if r.is_ok() {
                Progress::add(
                    &progress.durable,
                    Progress::get(&progress.done).saturating_sub(Progress::get(&progress.durable)),
                );
                drop(ticker);
                let mut w = lock(&cw);
                let _ = Message::Bye.write_to(&mut *w);
                let _ = w.flush();
                let _ = w.get_mut().close();
            } else {
                cut_ctl();
            }
            let _ = reader.join();
            r.map(|()| listed)
        });
        let listed = result?;
        let (written, deleted, updated) = *lock(&summary);
        for n in &listed.notes {
            progress.note(n.clone());
        }
        let changed = changed
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let report = SendReport {
            entries: listed.entries,
            files: stats.files.load(Ordering::Relaxed),
            skipped: stats.skipped.load(Ordering::Relaxed),
            bytes_sent: stats.wire.load(Ordering::Relaxed),
            bytes_plain: stats.plain.load(Ordering::Relaxed),
            bytes_reused: stats.reused.load(Ordering::Relaxed),
            links: listed.links.len() as u64,
            changed_during_read: changed,
            vanished: stats.vanished.load(Ordering::Relaxed),
            deleted,
            target_written: written,
            target_updated: updated,
            notes: listed.notes,
        };
        Ok((
            report,
            checks
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ))
    }
}

/// Sends jobs on one data stream.
struct Worker<'a> {
    roots: &'a [Root],
    timeout: Duration,
    stats: &'a Stats,
    progress: &'a Progress,
    control: &'a Control,
    squeeze: &'a Squeeze,
}

/// How sending one file went.
enum Sent {
    Done { changed: bool },
    Vanished,
}

impl Worker<'_> {
    fn run(
        &self,
        stream: Stream,
        qrx: &Mutex<mpsc::Receiver<Job>>,
        abort: &AtomicBool,
        changed: &Mutex<Vec<PathBuf>>,
        errors: &Mutex<Vec<FileError>>,
        root_fds: &[Arc<OwnedFd>],
    ) {
        let (_r, mut w) = stream.into_halves();
        let mut caches: Vec<DirCache> = root_fds
            .iter()
            .map(|f| DirCache::new(Arc::clone(f)))
            .collect();
        let mut packer = Packer::default();
        let mut reader = Reader::default();
        let every = crate::session::keepalive_every(self.timeout);
        let mut last_sent = Instant::now();
        loop {
            // In short slices, so that the queue's lock passes between the idle workers and
            // each can keep its stream alive while the walker finds nothing to send.
            let job = lock(qrx).recv_timeout(Duration::from_millis(200));
            let job = match job {
                Ok(j) => j,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if last_sent.elapsed() >= every {
                        last_sent = Instant::now();
                        let sent = FileMsg::KeepAlive.write_to(&mut w).map_err(FileError::from);
                        if let Err(e) = sent.and_then(|()| flush(&mut w)) {
                            abort.store(true, Ordering::Relaxed);
                            lock(errors).push(e);
                            w.get_ref().abort();
                            return;
                        }
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            last_sent = Instant::now();
            if self.control.cancelled() || abort.load(Ordering::Relaxed) {
                continue;
            }
            match self.file(&mut w, &mut caches, &mut packer, &mut reader, &job) {
                Ok(Sent::Done { changed: false }) => {}
                Ok(Sent::Done { changed: true }) => {
                    let p = source_path(&self.roots[job.root].src, &job.src_rel);
                    self.progress.note(format!(
                        "changed while read, sent again in the next pass: {}",
                        p.display()
                    ));
                    lock(changed).push(p);
                }
                Ok(Sent::Vanished) => {
                    self.stats.vanished.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    abort.store(true, Ordering::Relaxed);
                    lock(errors).push(e);
                    w.get_ref().abort();
                    return;
                }
            }
        }
        let _ = FileMsg::StreamEnd.write_to(&mut w);
        let _ = w.flush();
        let _ = w.get_mut().close();
    }

    fn send(
        &self,
        w: &mut BufWriter<ConnWriter>,
        m: &FileMsg,
        wire: usize,
    ) -> Result<(), FileError> {
        let t = Instant::now();
        self.control.pace(wire as u64);
        m.write_to(w)?;
        self.squeeze.waited(t.elapsed());
        self.stats.wire.fetch_add(wire as u64, Ordering::Relaxed);
        Progress::add(&self.progress.wire_sent, wire as u64);
        Ok(())
    }

    fn file(
        &self,
        w: &mut BufWriter<ConnWriter>,
        caches: &mut [DirCache],
        packer: &mut Packer,
        reader: &mut Reader,
        job: &Job,
    ) -> Result<Sent, FileError> {
        let src = || lossy(&job.src_rel);
        let name_start = job
            .src_rel
            .iter()
            .rposition(|&b| b == b'/')
            .map_or(0, |i| i + 1);
        let name = &job.src_rel[name_start..];
        let dir = match caches[job.root].open(parent(&job.src_rel)) {
            Ok(d) => d,
            Err(_) => return Ok(Sent::Vanished),
        };
        let fd = match open_source(&dir, name) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => return Ok(Sent::Vanished),
            Err(e) => {
                self.progress.note(format!("cannot read {}: {e}", src()));
                return Ok(Sent::Vanished);
            }
        };
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| FileError::Source {
            path: src(),
            source: e.into(),
        })?;
        if st.st_mode & super::proto::S_IFMT != S_IFREG || (st.st_dev, st.st_ino) != job.ino {
            return Ok(Sent::Vanished);
        }
        let before = meta::change_key(&st);
        let mut changed = before != job.key;
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let mut meta = job.meta.clone();
        meta.size = size;
        // The target needs the path it knows: the target-relative one.
        let path = self.target_path(job);
        let file = File::from(fd);
        reader.open(&file);
        let read_err = |e: std::io::Error| FileError::Source {
            path: src(),
            source: e,
        };
        if size <= SMALL && job.sums.is_none() {
            // One read of the size fstat gave: a file that grew meanwhile shows in the
            // change key checked after the read.
            let want = usize::try_from(size).unwrap_or(0);
            let buf = reader.read_at(&file, 0, want).map_err(read_err)?;
            if buf.len() < want {
                changed = true;
            }
            let hash = *blake3::hash(buf).as_bytes();
            let len =
                u32::try_from(buf.len()).map_err(|_| FileError::Protocol("file data".into()))?;
            let (compressed, data) = match packer.pack(buf, self.squeeze.wanted()) {
                Some(c) => (true, c),
                None => (false, buf.to_vec()),
            };
            let wire = data.len();
            self.send(
                w,
                &FileMsg::File {
                    id: job.id,
                    path,
                    meta,
                    complete: true,
                    hash,
                    compressed,
                    len,
                    data,
                },
                wire,
            )?;
            Progress::add(&self.progress.plain_sent, size);
            self.stats.plain.fetch_add(size, Ordering::Relaxed);
        } else {
            self.send(
                w,
                &FileMsg::File {
                    id: job.id,
                    path,
                    meta,
                    complete: false,
                    hash: *blake3::hash(&[]).as_bytes(),
                    compressed: false,
                    len: 0,
                    data: Vec::new(),
                },
                0,
            )?;
            let (cs, sums) = match &job.sums {
                Some((cs, s)) => (*cs, s.as_slice()),
                None => (CHUNK, &[][..]),
            };
            let mut pos = 0u64;
            while pos < size {
                if self.control.cancelled() {
                    FileMsg::Abandon.write_to(w)?;
                    return Ok(Sent::Vanished);
                }
                let data_at = match nix::unistd::lseek(
                    file.as_raw_fd(),
                    i64::try_from(pos).unwrap_or(i64::MAX),
                    Whence::SeekData,
                ) {
                    Ok(o) => u64::try_from(o).unwrap_or(u64::MAX),
                    Err(nix::errno::Errno::ENXIO) => break,
                    Err(_) => pos,
                };
                if data_at >= size {
                    break;
                }
                let c = data_at / cs * cs;
                let n = usize::try_from((size - c).min(cs)).unwrap_or(0);
                let chunk = reader.read_at(&file, c, n).map_err(read_err)?;
                let got = chunk.len();
                if got < n {
                    changed = true;
                }
                let i = usize::try_from(c / cs).unwrap_or(usize::MAX);
                let sum_ok = sums
                    .get(i)
                    .is_some_and(|s| s[..] == blake3::hash(chunk).as_bytes()[..SUM_LEN]);
                let len = u32::try_from(got).map_err(|_| FileError::Protocol("chunk".into()))?;
                if sum_ok {
                    self.send(w, &FileMsg::Copy { offset: c, len }, 12)?;
                    self.stats.reused.fetch_add(got as u64, Ordering::Relaxed);
                } else if !chunk.iter().all(|&b| b == 0) {
                    let hash = *blake3::hash(chunk).as_bytes();
                    let (compressed, data) = match packer.pack(chunk, self.squeeze.wanted()) {
                        Some(c) => (true, c),
                        None => (false, chunk.to_vec()),
                    };
                    let wire = data.len();
                    self.send(
                        w,
                        &FileMsg::Data {
                            offset: c,
                            len,
                            hash,
                            compressed,
                            data,
                        },
                        wire,
                    )?;
                    Progress::add(&self.progress.plain_sent, got as u64);
                    self.stats.plain.fetch_add(got as u64, Ordering::Relaxed);
                }
                if got < n {
                    break;
                }
                pos = c + cs;
            }
            let after = nix::sys::stat::fstat(file.as_raw_fd()).map_err(|e| FileError::Source {
                path: src(),
                source: e.into(),
            })?;
            changed |= meta::change_key(&after) != before;
            self.send(w, &FileMsg::End { changed }, 0)?;
        }
        if !changed {
            let after = nix::sys::stat::fstat(file.as_raw_fd()).map_err(|e| FileError::Source {
                path: src(),
                source: e.into(),
            })?;
            changed = meta::change_key(&after) != before;
        }
        self.stats.files.fetch_add(1, Ordering::Relaxed);
        Progress::add(&self.progress.done, size);
        Ok(Sent::Done { changed })
    }

    fn target_path(&self, job: &Job) -> Vec<u8> {
        let root = &self.roots[job.root];
        if job.src_rel.is_empty() {
            root.rel.clone()
        } else {
            join(&root.rel, &job.src_rel)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_cover_defaults_roots_and_configured_paths() {
        let roots = roots_of(&["/boot".into(), "/".into()], false).unwrap();
        assert_eq!(roots[0].rel, b"");
        assert_eq!(roots[1].rel, b"boot");
        let e = build_excludes(&roots, &["/var/cache".into(), "/boot/old".into()]);
        for p in [
            &b"proc"[..],
            b"lost+found",
            b"boot/lost+found",
            b"var/cache/x",
            b"boot/old",
        ] {
            assert!(e.matches(p), "{}", String::from_utf8_lossy(p));
        }
        assert!(!e.matches(b"boot/grub"));
        // Standalone: configured paths under the source root map through it.
        let roots = roots_of(&["/srv/img".into()], true).unwrap();
        let e = build_excludes(&roots, &["/srv/img/skip".into()]);
        assert!(e.matches(b"skip/a") && e.matches(b"proc") && !e.matches(b"srv"));
        assert!(roots_of(&["/a".into(), "/b".into()], true).is_err());
        assert!(roots_of(&[], false).is_err());
    }

    #[test]
    fn ids_map_to_their_root() {
        let starts = [0, 10, 25];
        assert_eq!(group_of(&starts, 0), 0);
        assert_eq!(group_of(&starts, 9), 0);
        assert_eq!(group_of(&starts, 10), 1);
        assert_eq!(group_of(&starts, 99), 2);
    }
}
