//! The end of a source pass: waits for the walker, the target's comparison of the listing and
//! the workers, then ends a check with `Bye`, or sends a copy's links, directory times and
//! checkpoint and waits for the target's acknowledgement.

use std::io::{BufWriter, Write};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Mutex};
use std::thread::ScopedJoinHandle;
use std::time::Duration;

use super::control::Event;
use super::{flush, Cuts, Listed, Shared};
use crate::conn::ConnWriter;
use crate::file::proto::{FileMsg, PassKind};
use crate::file::recv::KeepAlive;
use crate::file::FileError;
use crate::lock;
use crate::task::Progress;
use crate::wire::Message;

/// The final phase of a pass, run on the main thread once the others are started.
pub(super) struct Finish<'a> {
    /// Copy or check pass.
    pub(super) kind: PassKind,
    /// State shared with the other threads.
    pub(super) shared: &'a Shared,
    /// The pass's sockets.
    pub(super) cuts: &'a Cuts,
    /// The control stream's writer.
    pub(super) cw: &'a Mutex<BufWriter<ConnWriter>>,
    /// From the control reader.
    pub(super) erx: &'a mpsc::Receiver<Event>,
    /// The pass's progress.
    pub(super) progress: &'a Progress,
    /// Keeps the control stream alive until the pass says goodbye.
    pub(super) ticker: KeepAlive,
}

impl Finish<'_> {
    /// Waits for the other threads and ends the pass; returns the listing.
    pub(super) fn run(
        self,
        walker: ScopedJoinHandle<'_, Result<Listed, FileError>>,
        workers: Vec<ScopedJoinHandle<'_, ()>>,
        reader: ScopedJoinHandle<'_, ()>,
    ) -> Result<Listed, FileError> {
        let listed = walker
            .join()
            .map_err(|_| FileError::Protocol("walker panicked".into()));
        let listed = match listed.and_then(|r| r) {
            Ok(l) => l,
            Err(e) => {
                self.shared.abort.store(true, Ordering::Relaxed);
                self.cuts.data();
                return Err(why(e, self.erx));
            }
        };
        if let Err(e) = self.await_list_done() {
            self.shared.abort.store(true, Ordering::Relaxed);
            self.cuts.data();
            self.cuts.ctl();
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
        if let Some(e) = lock(&self.shared.errors).drain(..).next() {
            let e = why(e, self.erx);
            self.cuts.ctl();
            let _ = reader.join();
            return Err(e);
        }
        if self.kind == PassKind::Check {
            drop(self.ticker);
            let mut w = lock(self.cw);
            Message::Bye.write_to(&mut *w)?;
            flush(&mut w)?;
            drop(w);
            let _ = reader.join();
            return Ok(listed);
        }
        self.send_final(&listed)?;
        let r = self.await_ack();
        if r.is_ok() {
            Progress::add(
                &self.progress.durable,
                Progress::get(&self.progress.done)
                    .saturating_sub(Progress::get(&self.progress.durable)),
            );
            drop(self.ticker);
            let mut w = lock(self.cw);
            let _ = Message::Bye.write_to(&mut *w);
            let _ = w.flush();
            let _ = w.get_mut().close();
        } else {
            self.cuts.ctl();
        }
        let _ = reader.join();
        r.map(|()| listed)
    }

    /// Waits for the target to finish comparing the listing.
    fn await_list_done(&self) -> Result<(), FileError> {
        match self.erx.recv() {
            Ok(Event::ListDone) => Ok(()),
            Ok(Event::Failed(e)) => Err(e),
            Ok(Event::Ack) => Err(FileError::Protocol("early Ack".into())),
            Err(_) => Err(FileError::Protocol("control reader ended".into())),
        }
    }

    /// Sends `Finish`, the hard links, the directory times (deepest first) and the checkpoint.
    fn send_final(&self, listed: &Listed) -> Result<(), FileError> {
        let mut w = lock(self.cw);
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
            seq: self.shared.stats.files.load(Ordering::Relaxed),
        }
        .write_to(&mut *w)?;
        // Unlocked on return while the target syncs: the ticker keeps the stream alive.
        flush(&mut w)
    }

    /// Waits for the target's acknowledgement of the checkpoint (after its `syncfs`).
    fn await_ack(&self) -> Result<(), FileError> {
        match self.erx.recv() {
            Ok(Event::Ack) => Ok(()),
            Ok(Event::Failed(e)) => Err(e),
            _ => Err(FileError::Protocol("no checkpoint acknowledgement".into())),
        }
    }
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
    // Other events may come first (the listing's end); a loaded host may take a while to
    // deliver the target's error after our write failed.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match erx.recv_timeout(left) {
            Ok(Event::Failed(f)) => return f,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    e
}
