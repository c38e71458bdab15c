//! What SMS hears of the task: copy states, progress reports (the final one of a pass kept
//! until it is delivered) and consistency-check results.

use reqwest::Method;
use serde_json::json;
use transfer::Code;

use super::engine::Summary;
use super::Daemon;
use crate::api::models::{ChangeState, CopyState, MigrationCycle};

impl Daemon {
    /// Sends a copy state; pairs the service refuses are never sent.
    pub(super) async fn change_state(
        &mut self,
        copystate: CopyState,
        migrationcycle: MigrationCycle,
    ) {
        let cs = ChangeState {
            copystate,
            migrationcycle,
        };
        if !cs.is_valid() {
            tracing::error!(
                ?copystate,
                ?migrationcycle,
                error_code = %Code::CopyStateMismatch,
                "refusing to send a copy state pair SMS rejects"
            );
            return;
        }
        let path = format!("/v3/sources/{}/changestate", self.source_id());
        if let Err(e) = self
            .api
            .send::<_, serde_json::Value>(Method::PUT, &path, &cs)
            .await
        {
            tracing::warn!(error = %e, ?copystate, ?migrationcycle, "copy state not updated");
        }
    }

    /// Sends a progress report of the running pass; a failure is logged, the next report
    /// follows anyway.
    pub(super) async fn send_progress(&self, task_id: &str, body: &serde_json::Value) {
        let path = format!("/v3/tasks/{task_id}/progress");
        if let Err(e) = self
            .api
            .send::<_, serde_json::Value>(Method::PUT, &path, body)
            .await
        {
            tracing::warn!(error_code = %Code::ProgressReportFailed, error = %e, "progress report failed");
        }
    }

    /// Sends the final progress report of a completed pass that the service has not taken
    /// yet (the daemon was killed in between, or the call failed).
    pub(super) async fn send_final_report(&mut self) {
        let Some((id, body)) = self
            .state
            .task
            .as_ref()
            .and_then(|t| t.final_report.clone().map(|b| (t.id.clone(), b)))
        else {
            return;
        };
        let path = format!("/v3/tasks/{id}/progress");
        match self
            .api
            .send::<_, serde_json::Value>(Method::PUT, &path, &body)
            .await
        {
            Ok(_) => {
                if let Some(t) = self.state.task.as_mut() {
                    t.final_report = None;
                }
                let _ = self.save();
            }
            Err(e) => {
                tracing::warn!(error_code = %Code::ProgressReportFailed, error = %e, "final progress report failed; it is sent again later");
            }
        }
    }

    /// Uploads a pass's consistency-check results (at most 30, as the service takes them).
    pub(super) async fn upload_checks(&mut self, task_id: &str, sum: &Summary) {
        if let Some(n) = &sum.check_note {
            tracing::warn!(task_id, "{n}");
        }
        if sum.checks.is_empty() {
            return;
        }
        let entries: Vec<_> = sum
            .checks
            .iter()
            .take(crate::fileplan::MAX_CHECK_DIRS)
            .collect();
        let body = json!({ "consistency_result": entries });
        let path = format!("/v3/tasks/{task_id}/consistency-result");
        match self
            .api
            .send::<_, serde_json::Value>(Method::POST, &path, &body)
            .await
        {
            Ok(_) => tracing::info!(task_id, dirs = entries.len(), "consistency result uploaded"),
            Err(e) => tracing::warn!(task_id, error = %e, "consistency result not uploaded"),
        }
    }
}
