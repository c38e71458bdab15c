//! What SMS hears of the task: copy states, progress reports (the final one of a pass kept
//! until it is delivered) and consistency-check results.

use reqwest::Method;
use serde_json::json;
use transfer::{Code, TaskFailure};

use super::engine::Summary;
use super::Daemon;
use crate::api::models::{ChangeState, CopyState, MigrationCycle};

/// The task state the service defines for a failed migration: `MIGRATE_FAIL` (ref. §5.4.3,
/// the task `state` enum, line 10240; example at line 5098). The reference names no separate
/// state for a failed sync pass other than the service's own rollback states
/// (`SYNC_F_ROLLBACKING`, …), so a failed sync is reported as `MIGRATE_FAIL` too.
pub(super) const FAILED_TASK_STATE: &str = "MIGRATE_FAIL";

/// Longest `error_json` the task takes (ref. §5.4.6 table 5-159, line 11838: "最大长度: 1024").
pub(super) const ERROR_JSON_MAX: usize = 1024;

/// `error_json` in the reference's shape (ref. lines 2490–2517:
/// `{"error_code":"SMS.1114","error_param":"[]"}`): the code, and `error_param`, a JSON array
/// *inside a string*, holding the values of the code's `%s` placeholders. The agent puts its
/// message there as the one parameter, so the operator sees the cause; the reference does not
/// say which parameter goes where for a code with two placeholders (ambiguous), nor whether a
/// code without any takes parameters (its examples send `"[]"` for such codes, SMS.1114 and
/// SMS.3805). The message is cut (on a character boundary, with `…`) so the whole string is at
/// most [`ERROR_JSON_MAX`] characters.
pub(super) fn error_json(failure: &TaskFailure) -> String {
    let build = |msg: &str| {
        let param = serde_json::to_string(&[msg]).unwrap_or_else(|_| "[]".into());
        json!({"error_code": failure.code.as_str(), "error_param": param}).to_string()
    };
    let mut msg: String = failure.message.clone();
    let mut out = build(&msg);
    while out.chars().count() > ERROR_JSON_MAX && !msg.is_empty() {
        // Escapes grow the text; cut by the excess (at least one character) and try again.
        let excess = out.chars().count() - ERROR_JSON_MAX;
        let keep = msg.chars().count().saturating_sub(excess.max(1) + 1);
        msg = msg.chars().take(keep).collect();
        let cut = format!("{msg}…");
        out = build(&cut);
        if out.chars().count() <= ERROR_JSON_MAX {
            return out;
        }
    }
    out
}

impl Daemon {
    /// Reports a failed task to the service where the operator looks: `PUT /v3/tasks/{id}`
    /// (ref. §5.4.6, line 11779) with `state` [`FAILED_TASK_STATE`] and `error_json`
    /// ([`error_json`]). A failure to report is logged; the copy state ERROR follows anyway.
    pub(super) async fn report_task_failure(&self, task_id: &str, failure: &TaskFailure) {
        let body = json!({"state": FAILED_TASK_STATE, "error_json": error_json(failure)});
        let path = format!("/v3/tasks/{task_id}");
        if let Err(e) = self
            .api
            .send::<_, serde_json::Value>(Method::PUT, &path, &body)
            .await
        {
            tracing::warn!(task_id, error_code = %failure.code, error = %e, "the task's failure could not be reported to SMS");
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_reference_shape() {
        let f = TaskFailure::new(Code::VolumeUnreadable, "cannot read /dev/vdz: \"gone\"");
        let s = error_json(&f);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["error_code"], "SMS.1905");
        // error_param is a string holding a JSON array, as in the reference's examples.
        let p: Vec<String> = serde_json::from_str(v["error_param"].as_str().unwrap()).unwrap();
        assert_eq!(p, ["cannot read /dev/vdz: \"gone\""]);
    }

    #[test]
    fn error_json_is_cut_to_1024_characters() {
        for msg in ["x".repeat(5000), "\"é\n".repeat(2000), String::new()] {
            let s = error_json(&TaskFailure::new(Code::TransmissionFailed, msg.clone()));
            assert!(s.chars().count() <= ERROR_JSON_MAX, "{}", s.len());
            let v: serde_json::Value = serde_json::from_str(&s).unwrap();
            assert_eq!(v["error_code"], "SMS.1908");
            let p: Vec<String> = serde_json::from_str(v["error_param"].as_str().unwrap()).unwrap();
            assert!(msg.starts_with(p[0].trim_end_matches('…')));
        }
    }
}
