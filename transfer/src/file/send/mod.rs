//! The source side of a file pass: walks the roots onto the control stream, reads what the
//! target asks for on parallel data streams, and finishes with links, directory times and a
//! checkpoint. Also the consistency check, the same listing in check mode.
//!
//! Threads (all scoped to one call): the walker writes the listing; the control reader turns
//! `Need`s into jobs and counts what was skipped; one worker per data stream sends jobs. No
//! message waits for an answer except the final checkpoint, so the listing, the target's
//! comparisons and the data all flow at once.
//!
//! Modules: `lister` the walker's listing, `control` the control reader, `worker` the data
//! streams, `finish` the final phase; this file holds the options, the shared state and the
//! pass that starts them.

mod control;
mod finish;
mod lister;
mod worker;

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use nix::fcntl::OFlag;

use super::journal::Changes;
use super::path::{join, Excludes, DEFAULT_EXCLUDES};
use super::proto::{Compare, FileMsg, Meta, PassKind, SUM_LEN};
use super::squeeze::Squeeze;
use super::walk::Root;
use super::{sys, target_rel, FileError};
use crate::conn::ConnWriter;
use crate::lock;
use crate::session::{Connector, Stream, MAX_STREAMS};
use crate::task::{Control, Progress};
use crate::wire::Mode;
use control::{ControlReader, Event, Failing};
use finish::Finish;
use lister::Lister;
use worker::Worker;

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
    /// Standalone `--source-root DIR` with the filesystems mounted below it: each source `S`
    /// goes to `S` less this prefix (`DIR` itself to the target root). Overrides
    /// `map_to_root`.
    pub base: Option<PathBuf>,
    /// The source's disk layout, sent in the `Plan` for a target that prepares blank disks.
    pub layout: Option<super::layout::Layout>,
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
    /// Journal pass (with `sync`): visit only these changes in the roots they cover (a root
    /// they do not cover is walked whole). `None`: walk everything.
    pub changes: Option<Arc<Changes>>,
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

#[derive(Default)]
struct Stats {
    files: AtomicU64,
    skipped: AtomicU64,
    wire: AtomicU64,
    plain: AtomicU64,
    reused: AtomicU64,
    vanished: AtomicU64,
}

/// What the threads of one pass share.
struct Shared {
    /// Listed regular files the target has not yet asked for or skipped, by id.
    pending: Mutex<BTreeMap<u64, Job>>,
    /// Set when a thread failed: the others stop taking work.
    abort: AtomicBool,
    stats: Stats,
    /// The first id of each root (check pass).
    starts: Mutex<Vec<u64>>,
    /// One tally per root (check pass).
    checks: Mutex<Vec<DirCheck>>,
    /// The target's (written, deleted, updated).
    summary: Mutex<(u64, u64, u64)>,
    /// Files that changed while read.
    changed: Mutex<Vec<PathBuf>>,
    /// The workers' failures.
    errors: Mutex<Vec<FileError>>,
    squeeze: Squeeze,
}

impl Shared {
    fn new(roots: usize, streams: u16) -> Self {
        Shared {
            pending: Mutex::new(BTreeMap::new()),
            abort: AtomicBool::new(false),
            stats: Stats::default(),
            starts: Mutex::new(Vec::new()),
            checks: Mutex::new(vec![DirCheck::default(); roots]),
            summary: Mutex::new((0, 0, 0)),
            changed: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
            squeeze: Squeeze::new(streams),
        }
    }

    /// Applies `f` to the consistency entry of the root that entry `id` belongs to.
    fn tally(&self, id: u64, f: impl FnOnce(&mut DirCheck)) {
        let g = group_of(&lock(&self.starts), id);
        if let Some(c) = lock(&self.checks).get_mut(g) {
            f(c);
        }
    }

    /// The pass's report from what the threads counted and the walker listed.
    fn report(self, listed: Listed, progress: &Progress) -> (SendReport, Vec<DirCheck>) {
        let (written, deleted, updated) = *lock(&self.summary);
        for n in &listed.notes {
            progress.note(n.clone());
        }
        let changed = self
            .changed
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let report = SendReport {
            entries: listed.entries,
            files: self.stats.files.load(Ordering::Relaxed),
            skipped: self.stats.skipped.load(Ordering::Relaxed),
            bytes_sent: self.stats.wire.load(Ordering::Relaxed),
            bytes_plain: self.stats.plain.load(Ordering::Relaxed),
            bytes_reused: self.stats.reused.load(Ordering::Relaxed),
            links: listed.links.len() as u64,
            changed_during_read: changed,
            vanished: self.stats.vanished.load(Ordering::Relaxed),
            deleted,
            target_written: written,
            target_updated: updated,
            notes: listed.notes,
        };
        let checks = self
            .checks
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (report, checks)
    }
}

/// Shuts a pass's sockets: a thread blocked in a write to a peer that stopped reading (a cut
/// connection, a target gone silent) wakes only when its socket is shut.
struct Cuts {
    data: Vec<std::net::TcpStream>,
    ctl: Option<std::net::TcpStream>,
}

impl Cuts {
    /// Cuts the data streams: wakes the workers.
    fn data(&self) {
        for c in &self.data {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Cuts the control stream: wakes a walker blocked writing to a target gone silent.
    fn ctl(&self) {
        if let Some(c) = &self.ctl {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Cuts every stream.
    fn all(&self) {
        self.ctl();
        self.data();
    }
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

fn roots_of(
    sources: &[PathBuf],
    map_to_root: bool,
    base: Option<&Path>,
) -> Result<Vec<Root>, FileError> {
    if sources.is_empty() {
        return Err(FileError::Options("no source roots".into()));
    }
    if let Some(base) = base {
        let mut roots = Vec::new();
        for s in sources {
            let rest = s.strip_prefix(base).map_err(|_| {
                FileError::Options(format!("{} is not under {}", s.display(), base.display()))
            })?;
            roots.push(Root {
                src: s.clone(),
                rel: target_rel(rest, false),
                ancestors: true,
            });
        }
        roots.sort_by(|a, b| a.rel.len().cmp(&b.rel.len()).then(a.rel.cmp(&b.rel)));
        roots.dedup_by(|a, b| a.rel == b.rel);
        return Ok(roots);
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
    let roots = roots_of(&opts.sources, opts.map_to_root, opts.base.as_deref())?;
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
        changes: opts.changes.as_deref().filter(|_| opts.sync),
        streams: opts.streams,
        timeout: crate::session::peer_timeout(opts.peer_timeout),
        layout: opts.layout.as_ref(),
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
    let sources = roots_of(&opts.sources, opts.map_to_root, None)?;
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
        changes: None,
        streams: 1,
        timeout: crate::session::peer_timeout(opts.peer_timeout),
        layout: None,
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
    /// Journal pass: what changed.
    changes: Option<&'a Changes>,
    streams: u16,
    /// Peer timeout of every stream.
    timeout: Duration,
    /// Sent in the `Plan` (copy passes).
    layout: Option<&'a super::layout::Layout>,
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

/// The root group an id belongs to (check pass): `starts[i]` is the first id of root `i`.
fn group_of(starts: &[u64], id: u64) -> usize {
    starts.partition_point(|&s| s <= id).saturating_sub(1)
}

impl Pass<'_> {
    /// Opens the session, then runs the control reader, the data workers and the walker at
    /// once and ends with [`Finish`].
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
        let root_fds = self.open_roots()?;
        let (ctl, session) = self
            .connector
            .open(self.task_id, Mode::File, 0, self.streams, 0)?;
        ctl.set_read_timeout(Some(self.timeout));
        ctl.set_write_timeout(Some(self.timeout * CTL_WRITE_TIMEOUTS));
        let data = if self.kind == PassKind::Copy {
            self.open_data(session)?
        } else {
            Vec::new()
        };
        let cuts = Cuts {
            data: data.iter().filter_map(Stream::cutter).collect(),
            ctl: ctl.cutter(),
        };
        let (mut cr, mut cw) = ctl.into_halves();
        FileMsg::Plan {
            pass: self.kind,
            compare: self.compare,
            delete: self.delete,
            excludes: self.excludes.patterns().to_vec(),
            layout: self.layout.cloned().map(Box::new),
        }
        .write_to(&mut cw)?;
        let cw = Arc::new(Mutex::new(cw));
        // The walker may be quiet for long (a huge directory, a slow disk) and the main
        // thread waits through the data phase and the target's syncfs: keep-alives keep the
        // target's peer timeout for a source that is really gone.
        let ticker = super::recv::KeepAlive::start(Arc::clone(&cw), self.timeout);
        let shared = Shared::new(self.roots.len(), self.streams);
        let (qtx, qrx) = mpsc::channel::<Job>();
        let qrx = Mutex::new(qrx);
        let (etx, erx) = mpsc::channel::<Event>();
        let reader = ControlReader {
            kind: self.kind,
            shared: &shared,
            progress,
            queue: Some(qtx),
            events: Failing {
                etx: etx.clone(),
                cuts: &cuts,
            },
        };
        let result = std::thread::scope(|s| -> Result<Listed, FileError> {
            let reader = s.spawn(move || reader.run(&mut cr));
            let workers = data
                .into_iter()
                .map(|stream| {
                    let worker = Worker {
                        roots: self.roots,
                        timeout: self.timeout,
                        shared: &shared,
                        progress,
                        control,
                    };
                    let (qrx, root_fds) = (&qrx, &root_fds);
                    s.spawn(move || worker.run(stream, qrx, root_fds))
                })
                .collect();
            let walker = std::thread::Builder::new()
                .stack_size(WALK_STACK)
                .spawn_scoped(s, || {
                    Lister::new(self.kind, progress, &shared, &cw)
                        .run(self, control, &|| cuts.ctl())
                })
                .map_err(|e| FileError::Protocol(format!("cannot start the walker: {e}")))?;
            Finish {
                kind: self.kind,
                shared: &shared,
                cuts: &cuts,
                cw: &cw,
                erx: &erx,
                progress,
                ticker,
            }
            .run(walker, workers, reader)
        });
        let listed = result?;
        Ok(shared.report(listed, progress))
    }

    /// Opens every root, so that the workers reach files below it by descriptor.
    fn open_roots(&self) -> Result<Vec<Arc<OwnedFd>>, FileError> {
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
        Ok(root_fds)
    }

    /// Opens the data streams of `session`, all at once: each is a TCP connect and a TLS
    /// handshake, a round trip or two.
    fn open_data(&self, session: u64) -> Result<Vec<Stream>, FileError> {
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
        let mut data = Vec::new();
        for s in opened {
            let s = s?;
            s.set_timeouts(self.timeout);
            data.push(s);
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_cover_defaults_roots_and_configured_paths() {
        let roots = roots_of(&["/boot".into(), "/".into()], false, None).unwrap();
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
        let roots = roots_of(&["/srv/img".into()], true, None).unwrap();
        let e = build_excludes(&roots, &["/srv/img/skip".into()]);
        assert!(e.matches(b"skip/a") && e.matches(b"proc") && !e.matches(b"srv"));
        assert!(roots_of(&["/a".into(), "/b".into()], true, None).is_err());
        assert!(roots_of(&[], false, None).is_err());
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
