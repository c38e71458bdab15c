//! UPLOAD_LOG and RSET_LOG_ACL (ref. §5.5.2 table 5-250, line 17325): the daemon's side, on
//! top of `crate::logs::upload`. They run on a task of their own, so that an upload retrying
//! through an OBS outage never holds up the pass, its reports or a STOP; the result is queued
//! like any other when the task ends. A failure answers `fail` with SMS.0503 "Log upload
//! failed. Cause: %s" (§6.1 line 24923) and OBS's own reason.

use std::collections::VecDeque;

use serde_json::{json, Value};
use tokio::task::JoinHandle;
use transfer::{Code, TaskFailure};

use super::{Daemon, DaemonError};
use crate::api::models::{CommandParam, CommandResult};
use crate::logs::upload::{self, UploadError};

/// A log command's name, parameters and task.
type Running = (String, CommandParam, JoinHandle<Result<Value, TaskFailure>>);

/// The log command under way and those that arrived meanwhile.
#[derive(Default)]
pub(super) struct LogCommands {
    running: Option<Running>,
    queued: VecDeque<(String, CommandParam)>,
}

fn failed(name: &str, e: &UploadError) -> TaskFailure {
    TaskFailure::new(Code::LogUploadFailed, format!("{name}: {e}"))
}

impl Daemon {
    /// Starts UPLOAD_LOG or RSET_LOG_ACL, or queues it behind the one under way (a command
    /// SMS hands out again while it runs is not started twice).
    pub(super) async fn start_log_command(&mut self, name: String, p: CommandParam) {
        if let Some((n, q, _)) = &self.log_commands.running {
            if *n == name && *q == p {
                return;
            }
            if !self
                .log_commands
                .queued
                .iter()
                .any(|(n, q)| *n == name && *q == p)
            {
                self.log_commands.queued.push_back((name, p));
            }
            return;
        }
        let settings = self.log_upload.clone();
        let obs_domain = self.service_config.obs_domain.clone();
        let handle = if name == "UPLOAD_LOG" {
            let body = self.probe().await;
            let probe_json = serde_json::to_string_pretty(&body).unwrap_or_default();
            let source = self.source_id();
            let p = p.clone();
            tokio::spawn(async move {
                upload::upload(&settings, obs_domain.as_deref(), &p.task_id, &p.bucket, &source, &probe_json)
                    .await
                    .map(|r| json!({"bucket": r.bucket, "object": r.object, "size": r.size, "sha256": r.sha256}))
                    .map_err(|e| failed("UPLOAD_LOG", &e))
            })
        } else {
            let p = p.clone();
            tokio::spawn(async move {
                upload::reset_acl(&settings, obs_domain.as_deref(), &p.task_id, &p.bucket)
                    .await
                    .map(|r| json!({"bucket": r.bucket, "object": r.object, "acl": "private"}))
                    .map_err(|e| failed("RSET_LOG_ACL", &e))
            })
        };
        self.log_commands.running = Some((name, p, handle));
    }

    /// Queues the result of a finished log command (durably, then sends it) and starts the
    /// next one waiting.
    pub(super) async fn finish_log_command(&mut self) -> Result<(), DaemonError> {
        if !self
            .log_commands
            .running
            .as_ref()
            .is_some_and(|(_, _, h)| h.is_finished())
        {
            return Ok(());
        }
        let Some((name, _, handle)) = self.log_commands.running.take() else {
            return Ok(());
        };
        let outcome = handle.await.unwrap_or_else(|e| {
            Err(TaskFailure::new(
                Code::LogUploadFailed,
                format!("{name}: the upload task ended abnormally: {e}"),
            ))
        });
        let result = match outcome {
            Ok(detail) => CommandResult {
                command_name: name,
                result: "success".into(),
                result_detail: detail,
            },
            Err(f) => {
                tracing::error!(command = %name, code = f.code.as_str(), error = %f.message, "log command failed");
                CommandResult {
                    command_name: name,
                    result: "fail".into(),
                    result_detail: json!({"error_code": f.code.as_str(), "error_msg": f.message}),
                }
            }
        };
        self.state.pending_results.push(result);
        self.save()?;
        if let Some((n, p)) = self.log_commands.queued.pop_front() {
            self.start_log_command(n, p).await;
        }
        self.flush_results().await
    }
}
