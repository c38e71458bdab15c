//! What the daemon is doing with its task right now: nothing, running a pass, waiting to
//! start a failed pass again, or holding a failure for the operator.

use std::time::{Duration, Instant};

use transfer::TaskFailure;

use super::engine::Runner;

/// Times a pass that fails for a retryable reason (see [`TaskFailure::is_retryable`]) is
/// started again from its checkpoint, after 5, 10, 20, … s, before the task fails.
pub(super) const PASS_RETRIES: u32 = 6;
/// Wait before the first retry of a pass.
pub(super) const PASS_RETRY_FIRST: Duration = Duration::from_secs(5);
/// Longest wait between retries of a pass.
pub(super) const PASS_RETRY_MAX: Duration = Duration::from_secs(120);

/// The daemon's activity. The persisted [`super::state::TaskState`] says where the task
/// stands; this says what this process is doing about it, and is lost on restart on purpose
/// (a restarted daemon resumes an unfinished pass at once).
pub(super) enum Activity {
    /// No pass runs or is due.
    Idle,
    /// A pass runs on its own thread.
    Running {
        /// The pass.
        runner: Runner,
        /// Retries of this pass that went before (0: its first run).
        attempt: u32,
    },
    /// The pass failed for a retryable reason and starts again at `at`.
    RetryAt {
        /// When it starts again.
        at: Instant,
        /// Retries counted so far, this one included.
        attempt: u32,
    },
    /// A pass of a continuous-sync task completed; the next sync pass starts at `at`
    /// (STOP, DELETE and cutover end the wait).
    SyncAt {
        /// When the next sync pass starts.
        at: Instant,
    },
    /// The pass failed for good; the operator must act.
    Failed {
        /// Why.
        failure: TaskFailure,
    },
}

impl Activity {
    /// The running pass, if any.
    pub(super) fn runner(&self) -> Option<&Runner> {
        match self {
            Activity::Running { runner, .. } => Some(runner),
            _ => None,
        }
    }

    /// What follows the failure of a pass that had `attempt` retries before it: another
    /// retry after the backoff, or the end of the task.
    pub(super) fn after_failure(failure: TaskFailure, attempt: u32, now: Instant) -> Self {
        if failure.is_retryable() && attempt < PASS_RETRIES {
            Activity::RetryAt {
                at: now + retry_wait(attempt),
                attempt: attempt + 1,
            }
        } else {
            Activity::Failed { failure }
        }
    }
}

/// The wait before retry `attempt + 1`: 5 s doubling, at most [`PASS_RETRY_MAX`].
pub(super) fn retry_wait(attempt: u32) -> Duration {
    PASS_RETRY_FIRST
        .saturating_mul(1 << attempt.min(16))
        .min(PASS_RETRY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use transfer::Code;

    #[test]
    fn retry_waits_double_up_to_the_cap() {
        let secs: Vec<u64> = (0..8).map(|a| retry_wait(a).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 120, 120, 120]);
        assert_eq!(retry_wait(u32::MAX), PASS_RETRY_MAX);
    }

    #[test]
    fn only_retryable_failures_are_retried_and_only_so_often() {
        let now = Instant::now();
        let lost = TaskFailure::new(Code::TransmissionFailed, "lost");
        match Activity::after_failure(lost.clone(), 0, now) {
            Activity::RetryAt { at, attempt } => {
                assert_eq!(attempt, 1);
                assert_eq!(at, now + PASS_RETRY_FIRST);
            }
            _ => panic!("a lost connection is retried"),
        }
        assert!(matches!(
            Activity::after_failure(lost, PASS_RETRIES, now),
            Activity::Failed { .. }
        ));
        let full = TaskFailure::new(Code::DiskSizeMismatch, "full");
        assert!(matches!(
            Activity::after_failure(full, 0, now),
            Activity::Failed { failure } if failure.code == Code::DiskSizeMismatch
        ));
    }
}
