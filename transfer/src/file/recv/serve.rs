//! The serving loop of a target session: reads the plan, runs the listing, waits for the data
//! streams, applies the final phase and acknowledges the checkpoint.

use std::io::BufReader;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::data::{accept_data, DataHandles, DataSession, DataStats};
use super::listing::Ctl;
use super::{io_of, unexpected, Halt};
use crate::conn::ConnReader;
use crate::file::layout::Layout;
use crate::file::path::{components, Excludes};
use crate::file::proto::{read_any, Any, Compare, FileMsg, PassKind};
use crate::file::FileError;
use crate::lock;
use crate::session::Stream;
use crate::wire::Message;

/// The accepter of a copy session's data streams.
type Accepter = Option<std::thread::JoinHandle<Result<DataHandles, FileError>>>;

/// The session's state machine: Plan → listing → (copy: data, final phase) → checkpoint.
pub(super) fn serve(
    ctl: &mut Ctl,
    r: &mut BufReader<ConnReader>,
    plan: Plan,
    data: std::sync::mpsc::Receiver<Stream>,
    streams: u16,
) -> Result<(), FileError> {
    ctl.pass = plan.pass;
    ctl.compare = plan.compare;
    ctl.delete = plan.delete;
    ctl.excludes = Excludes::new(plan.excludes);
    ctl.report.check = plan.pass == PassKind::Check;
    let stats = Arc::new(DataStats {
        bases: Arc::clone(&ctl.bases),
        ..DataStats::default()
    });
    let halt = Arc::new(Halt::default());
    let accepter = (ctl.pass == PassKind::Copy).then(|| {
        let shared = DataSession {
            root: Arc::clone(&ctl.root),
            stats: Arc::clone(&stats),
            ctl: Arc::clone(&ctl.w),
            failed: Arc::clone(&ctl.failed),
            halt: Arc::clone(&halt),
        };
        let (session, timeout) = (ctl.session, ctl.timeout);
        std::thread::Builder::new()
            .name("sms-file-accept".into())
            .spawn(move || accept_data(data, streams, session, shared, timeout))
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
    let res = PassServer {
        ctl,
        r,
        started: Instant::now(),
    }
    .run(&mut accepter, &stats);
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

/// A session's plan, as the source sent it.
pub(super) struct Plan {
    pub pass: PassKind,
    pub compare: Compare,
    pub delete: bool,
    pub excludes: Vec<Vec<u8>>,
    pub layout: Option<Box<Layout>>,
}

/// Reads the plan, the first message of the control stream.
pub(super) fn read_plan(r: &mut BufReader<ConnReader>) -> Result<Plan, FileError> {
    match read_any(r)? {
        Any::File(FileMsg::Plan {
            pass,
            compare,
            delete,
            excludes,
            layout,
        }) => Ok(Plan {
            pass,
            compare,
            delete,
            excludes,
            layout,
        }),
        other => Err(unexpected("waiting for the plan", &other)),
    }
}

/// The listing, data and final phases of a pass whose plan was read.
struct PassServer<'a> {
    ctl: &'a mut Ctl,
    r: &'a mut BufReader<ConnReader>,
    started: Instant,
}

impl PassServer<'_> {
    fn run(mut self, accepter: &mut Accepter, stats: &DataStats) -> Result<(), FileError> {
        self.listing()?;
        if accepter.is_none() {
            return self.end_check();
        }
        self.await_finish()?;
        // The accepter stays with the caller until here, which joins it on failure.
        let handles = accepter
            .take()
            .ok_or_else(|| FileError::Protocol("no data accepter".into()))?
            .join()
            .map_err(|_| FileError::Protocol("data accepter panicked".into()))??;
        let first_err = self.join_writers(handles);
        self.phase("data");
        // Directory times come next, and a deletion would change them.
        let reaped = self.ctl.reaper.drain();
        self.phase("deletions");
        let rep = &mut self.ctl.report;
        rep.deleted += reaped.deleted;
        rep.warnings += reaped.failed;
        rep.files_written = stats.files.load(Ordering::Relaxed);
        rep.bytes_written = stats.bytes.load(Ordering::Relaxed);
        rep.bytes_reused = stats.reused.load(Ordering::Relaxed);
        rep.changed_during_read = stats.changed.load(Ordering::Relaxed);
        if let Some(e) = first_err {
            return Err(e);
        }
        self.final_phase()
    }

    /// Phase times at debug level: where a slow pass spends its time.
    fn phase(&self, name: &str) {
        tracing::debug!(
            phase = name,
            secs = self.started.elapsed().as_secs_f64(),
            "file pass phase done"
        );
    }

    /// Applies the listing until `ListEnd`, then says all of it is handled.
    fn listing(&mut self) -> Result<(), FileError> {
        let ctl = &mut *self.ctl;
        loop {
            if self.r.buffer().is_empty() {
                ctl.flush()?;
            }
            match read_any(self.r)? {
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
                Any::File(FileMsg::Gone { id, path }) => {
                    ctl.gone(id, &path)?;
                    ctl.tick()?;
                }
                Any::File(FileMsg::ListEnd) => {
                    let upto = ctl.last_id;
                    ctl.send(&FileMsg::Processed { upto })?;
                    ctl.send(&FileMsg::ListDone)?;
                    ctl.flush()?;
                    self.phase("listing");
                    return Ok(());
                }
                Any::Common(Message::Error { code, message }) => {
                    return Err(FileError::Remote { code, message })
                }
                other => return Err(unexpected("listing", &other)),
            }
        }
    }

    /// A check ends after its listing.
    fn end_check(self) -> Result<(), FileError> {
        match read_any(self.r)? {
            Any::Common(Message::Bye) => {
                self.ctl.report.complete = true;
                Ok(())
            }
            other => Err(unexpected("ending a check", &other)),
        }
    }

    /// The data streams run until the source says all is sent.
    fn await_finish(&mut self) -> Result<(), FileError> {
        match read_any(self.r)? {
            Any::File(FileMsg::Finish) => Ok(()),
            Any::Common(Message::Error { code, message }) => {
                Err(FileError::Remote { code, message })
            }
            other => Err(unexpected("waiting for the data", &other)),
        }
    }

    /// Waits for every data stream's writer; returns the first failure.
    fn join_writers(&mut self, handles: DataHandles) -> Option<FileError> {
        let mut first_err = None;
        for h in handles {
            match h.join() {
                Ok(Ok(w)) => self.ctl.report.warnings += w,
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(FileError::Protocol("data writer panicked".into()));
                }
            }
        }
        first_err
    }

    /// Hard links and directory times, then the checkpoint, acknowledged after `syncfs`.
    fn final_phase(mut self) -> Result<(), FileError> {
        loop {
            match read_any(self.r)? {
                Any::File(FileMsg::Link { path, target }) => self.ctl.make_link(&path, &target)?,
                Any::File(FileMsg::Times { path, atime, mtime }) => {
                    components(&path).map_err(|e| FileError::path(&path, e))?;
                    self.ctl.times(&path, atime, mtime);
                }
                Any::Common(Message::Checkpoint { seq }) => self.checkpoint(seq)?,
                Any::Common(Message::Bye) => return Ok(()),
                Any::Common(Message::Error { code, message }) => {
                    return Err(FileError::Remote { code, message })
                }
                other => return Err(unexpected("in the final phase", &other)),
            }
        }
    }

    /// Makes everything durable, then sends the summary and acknowledges checkpoint `seq`.
    fn checkpoint(&mut self, seq: u64) -> Result<(), FileError> {
        self.phase("links and times");
        nix::unistd::syncfs(self.ctl.root.as_raw_fd())
            .map_err(|e| FileError::target(b"/", io_of(e)))?;
        self.phase("syncfs");
        // Prepared disks: the migrated system is configured to boot before the pass counts
        // as complete, so a failure reaches the source with its code.
        if let Some(configure) = self.ctl.on_complete.take() {
            configure()?;
            self.phase("configure");
        }
        let rep = &self.ctl.report;
        let summary = FileMsg::Summary {
            written: rep.files_written,
            deleted: rep.deleted,
            updated: rep.updated,
        };
        self.ctl.send(&summary)?;
        Message::Ack { upto: seq }.write_to(&mut *lock(&self.ctl.w))?;
        self.ctl.flush()?;
        self.ctl.report.complete = true;
        Ok(())
    }
}
