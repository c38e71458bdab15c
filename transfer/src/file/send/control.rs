//! The source's control reader: turns the target's answers to the listing into data jobs,
//! skip counts and consistency tallies, and tells the pass how the target ended.

use std::io::BufReader;
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use super::{Cuts, Job, Shared};
use crate::conn::ConnReader;
use crate::file::proto::{read_any, Any, FileMsg, PassKind, SUM_LEN};
use crate::file::FileError;
use crate::lock;
use crate::task::Progress;
use crate::wire::Message;

/// What the control reader tells the main thread.
pub(super) enum Event {
    /// The target compared the whole listing.
    ListDone,
    /// The target acknowledged the final checkpoint.
    Ack,
    /// The pass failed (the target's error, a broken or silent stream, a protocol violation).
    Failed(FileError),
}

/// The control reader's channel to the main thread; a failure also cuts the streams.
pub(super) struct Failing<'a> {
    /// To the main thread.
    pub(super) etx: mpsc::Sender<Event>,
    /// The pass's sockets.
    pub(super) cuts: &'a Cuts,
}

impl Failing<'_> {
    fn send(&self, e: Event) -> Result<(), mpsc::SendError<Event>> {
        let failed = matches!(e, Event::Failed(_));
        let r = self.etx.send(e);
        if failed {
            self.cuts.all();
        }
        r
    }
}

/// Whether the reader goes on after a message.
enum Flow {
    Next,
    Stop,
}

/// Reads the control stream until the final `Ack` or a failure.
pub(super) struct ControlReader<'a> {
    /// Copy or check pass.
    pub(super) kind: PassKind,
    /// State shared with the walker and the workers.
    pub(super) shared: &'a Shared,
    /// The pass's progress.
    pub(super) progress: &'a Progress,
    /// The data workers' queue; dropped once the target listed everything, which ends them.
    pub(super) queue: Option<mpsc::Sender<Job>>,
    /// To the main thread.
    pub(super) events: Failing<'a>,
}

impl ControlReader<'_> {
    /// Runs until the pass ends; whatever ends it but the final `Ack` cuts the streams so that
    /// no thread stays blocked on a target that is gone.
    pub(super) fn run(mut self, cr: &mut BufReader<ConnReader>) {
        loop {
            let m = match read_any(cr) {
                Ok(m) => m,
                Err(e) => {
                    let _ = self.events.send(Event::Failed(e.into()));
                    return;
                }
            };
            if let Flow::Stop = self.handle(m) {
                return;
            }
        }
    }

    fn handle(&mut self, m: Any) -> Flow {
        match m {
            Any::File(FileMsg::Need {
                id,
                chunk_size,
                sums,
            }) => return self.need(id, chunk_size, sums),
            Any::File(FileMsg::Processed { upto }) => self.processed(upto),
            Any::File(FileMsg::ListDone) => {
                self.queue = None;
                let _ = self.events.send(Event::ListDone);
                if self.kind == PassKind::Check {
                    return Flow::Stop;
                }
            }
            Any::File(FileMsg::Verdict { id, missing }) => {
                self.shared.tally(id, |c| {
                    if missing {
                        c.num_target_miss_files += 1;
                    } else {
                        c.num_different_files += 1;
                    }
                });
            }
            Any::File(FileMsg::Extra { id, count }) => {
                self.shared.tally(id, |c| c.num_target_more_files += count);
            }
            Any::File(FileMsg::Summary {
                written,
                deleted,
                updated,
            }) => {
                *lock(&self.shared.summary) = (written, deleted, updated);
            }
            Any::Common(Message::Ack { .. }) => {
                let _ = self.events.send(Event::Ack);
                return Flow::Stop;
            }
            Any::Common(Message::Error { code, message }) => {
                return self.fail(FileError::Remote { code, message });
            }
            other => {
                return self.fail(FileError::Protocol(format!(
                    "unexpected {} from the target",
                    match &other {
                        Any::File(m) => m.name(),
                        Any::Common(m) => crate::session::name_of(m),
                    }
                )));
            }
        }
        Flow::Next
    }

    /// The target wants file `id`, with its chunk sums when it holds an older copy.
    fn need(&mut self, id: u64, chunk_size: u32, sums: Vec<[u8; SUM_LEN]>) -> Flow {
        let job = lock(&self.shared.pending).remove(&id);
        let Some(mut job) = job else {
            return self.fail(FileError::Protocol(format!(
                "the target needs entry {id}, which is no pending file"
            )));
        };
        if chunk_size > 0 && !sums.is_empty() {
            job.sums = Some((u64::from(chunk_size), sums));
        }
        if let Some(q) = &self.queue {
            let _ = q.send(job);
        }
        Flow::Next
    }

    /// The target compared every entry up to `upto`: the files it did not ask for are skipped.
    fn processed(&self, upto: u64) {
        let skipped = {
            let mut p = lock(&self.shared.pending);
            let rest = p.split_off(&upto.saturating_add(1));
            std::mem::replace(&mut *p, rest)
        };
        for j in skipped.values() {
            Progress::add(&self.progress.done, j.meta.size);
        }
        self.shared
            .stats
            .skipped
            .fetch_add(skipped.len() as u64, Ordering::Relaxed);
    }

    fn fail(&self, e: FileError) -> Flow {
        let _ = self.events.send(Event::Failed(e));
        Flow::Stop
    }
}
