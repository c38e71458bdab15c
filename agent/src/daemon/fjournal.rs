//! The daemon holds a file task's change journal from before the task's first pass in this
//! process, so that its sync passes visit only what changed (docs/engines.md, "Change
//! journal"). A restarted daemon starts a new journal, whose first take walks everything.

use std::sync::{Arc, Mutex, PoisonError};

use transfer::file::journal::{Journal, Scope};

use super::engine::FileJob;

/// The journal of the current file task, if one could be started.
#[derive(Default)]
pub(super) struct Holder {
    slot: Mutex<Option<(String, Arc<Journal>)>>,
}

impl Holder {
    /// Before pass `job` of task `task_id` starts: starts the task's journal if it has none
    /// (another task's goes), takes what changed, and lets a sync visit only that. The pass
    /// confirms the take when it completes (`FileJob::journal`).
    pub(super) fn prepare(&self, task_id: &str, job: &mut FileJob) {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if slot
            .as_ref()
            .is_some_and(|(id, j)| id != task_id || j.roots() != job.send.sources)
        {
            *slot = None;
        }
        if slot.is_none() {
            match Journal::start(&job.send.sources) {
                Ok(j) => *slot = Some((task_id.to_string(), Arc::new(j))),
                Err(e) => {
                    tracing::warn!(task_id, error = %e, "no change journal: every file sync walks everything");
                    return;
                }
            }
        }
        let Some((_, j)) = slot.as_ref() else {
            return;
        };
        let scope = j.take();
        if job.send.sync {
            match scope {
                Scope::Full(reason) => {
                    tracing::info!(task_id, %reason, "the file sync walks everything");
                }
                Scope::Changes(c) => {
                    tracing::info!(
                        task_id,
                        changed = c.len(),
                        "the file sync visits what the change journal names"
                    );
                    job.send.changes = Some(Arc::new(c));
                }
            }
        }
        job.journal = Some(Arc::clone(j));
    }
}
