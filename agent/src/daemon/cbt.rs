//! The daemon's changed-block tracker: one for the block task at hand, started before its
//! first pass reads anything, so that each later sync pass (a continuous-sync task's too) reads
//! only what changed. It lives as long as the daemon: after a restart the first pass compares
//! everything again.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use transfer::block::SourceDisk;

use crate::cbt::{Changes, Tracker};
use crate::changes::ChangeFeed;

struct Tracked {
    task_id: String,
    disks: Vec<PathBuf>,
    tracker: Tracker,
    /// What the running pass took, until it ends.
    taken: Option<Vec<Changes>>,
}

/// The tracker of the current block task, if BPF allows one.
#[derive(Default)]
pub(super) struct Cbt(Mutex<Option<Tracked>>);

impl Cbt {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Tracked>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Before pass `pass` of `task_id` over `disks`: (re)starts tracking when the task or its
    /// disks changed, and returns what a sync pass may restrict itself to.
    pub(super) fn before_pass(
        &self,
        task_id: &str,
        disks: &[SourceDisk],
        sync: bool,
    ) -> Vec<Option<Vec<Range<u64>>>> {
        let paths: Vec<PathBuf> = disks.iter().map(|d| d.path.clone()).collect();
        let mut slot = self.lock();
        if slot
            .as_ref()
            .is_none_or(|t| t.task_id != task_id || t.disks != paths)
        {
            *slot = None;
            match Tracker::start(&paths) {
                Ok(tracker) => {
                    *slot = Some(Tracked {
                        task_id: task_id.to_string(),
                        disks: paths.clone(),
                        tracker,
                        taken: None,
                    });
                }
                Err(e) => {
                    tracing::warn!(
                        task_id,
                        "{e}; every sync pass compares the hashes of all used chunks"
                    );
                }
            }
        }
        let Some(t) = slot.as_mut() else {
            return Vec::new();
        };
        // Every disk's own page cache flushed first: buffered writes to the device reach the
        // tracker only as they are written back.
        for p in &paths {
            if let Ok(f) = std::fs::File::open(p) {
                let _ = f.sync_all();
            }
        }
        let changes = t.tracker.take();
        // A copy reads everything anyway.
        let shown = if sync { changes.as_slice() } else { &[] };
        for (p, c) in paths.iter().zip(shown) {
            match c {
                Changes::Known(d) => {
                    tracing::info!(task_id, disk = %p.display(), changed_bytes = d.bytes(), "changed-block tracking: this pass reads only the changed blocks")
                }
                Changes::Unknown(why) => {
                    tracing::info!(task_id, disk = %p.display(), "changed-block tracking: {why}; this pass compares every used chunk")
                }
            }
        }
        let changed = if sync {
            changes.iter().map(Changes::ranges).collect()
        } else {
            Vec::new()
        };
        t.taken = Some(changes);
        changed
    }

    /// The pass completed; `chunks_resumed` of its chunks were sent by an earlier session.
    pub(super) fn pass_done(&self, chunks_resumed: u64) {
        if let Some(t) = self.lock().as_mut() {
            t.taken = None;
            if chunks_resumed > 0 {
                t.tracker.forget(&format!(
                    "the last pass resumed {chunks_resumed} chunks sent before the tracker started"
                ));
            }
            t.tracker.committed();
        }
    }

    /// The pass failed or stopped: what it took is still to be sent.
    pub(super) fn pass_failed(&self) {
        if let Some(t) = self.lock().as_mut() {
            if let Some(c) = t.taken.take() {
                t.tracker.give_back(c);
            }
        }
    }

    /// Age of the oldest change not yet on the target; `None` without a tracker or when
    /// the target is current.
    pub(super) fn lag(&self) -> Option<Duration> {
        self.lock().as_ref().and_then(|t| t.tracker.lag())
    }
}
