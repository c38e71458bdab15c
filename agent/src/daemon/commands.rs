//! What SMS asks: poll for a command, act on it, and queue its result durably before sending
//! it, so a result is delivered once even across a restart.

use reqwest::Method;
use serde_json::{json, Value};
use transfer::{Code, TaskFailure};

use super::activity::Activity;
use super::state::Phase;
use super::{Daemon, DaemonError};
use crate::api::models::{Command, CommandResult, CopyState, MigrationCycle};
use crate::api::ApiError;

/// What a command answers: a detail on success, a failure otherwise.
type Outcome = Result<Value, TaskFailure>;

impl Daemon {
    /// Asks SMS for the next command.
    pub(super) async fn poll(&self) -> Result<Command, ApiError> {
        self.api
            .get(&format!("/v3/sources/{}/command", self.source_id()), &[])
            .await
    }

    /// Sends the pending command results, oldest first; stops at the first failure.
    pub(super) async fn flush_results(&mut self) -> Result<(), DaemonError> {
        while let Some(r) = self.state.pending_results.first().cloned() {
            let path = format!("/v3/sources/{}/command_result", self.source_id());
            match self
                .api
                .send::<_, serde_json::Value>(Method::POST, &path, &r)
                .await
            {
                Ok(_) => {
                    self.state.pending_results.remove(0);
                    self.save()?;
                }
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, command = %r.command_name, "command result not delivered; will retry");
                    return Ok(());
                }
                Err(e) => {
                    // The service refuses it for good; keeping it would block every later one.
                    tracing::error!(error = %e, command = %r.command_name, "command result refused; dropped");
                    self.state.pending_results.remove(0);
                    self.save()?;
                }
            }
        }
        Ok(())
    }

    /// Acts on one command and queues its result durably before sending it.
    pub(super) async fn dispatch(&mut self, cmd: Command) -> Result<(), DaemonError> {
        let name = cmd.command_name.trim().to_string();
        if name.is_empty() {
            return Ok(());
        }
        let param = cmd.command_param.clone().unwrap_or_default();
        let task_id = param.task_id.clone();
        tracing::info!(command = %name, task_id = %task_id, "command received");
        let outcome = match name.as_str() {
            "START" | "SYNC" => self.start(&name, &task_id).await,
            "STOP" => self.stop().await,
            "DELETE" => self.delete().await,
            "SKIP" => self.skip(),
            // The operator's `network_check` action (§5.4.7 line 12922); daemon/netcheck.rs.
            "NETWORK_CHECK" => self.network_check(&task_id).await,
            // Log bundles to the command's OBS bucket, answered when done (daemon/logs_cmd.rs).
            "UPLOAD_LOG" | "RSET_LOG_ACL" => {
                self.start_log_command(name, param).await;
                return Ok(());
            }
            _ => {
                tracing::warn!(command = %name, "unknown command ignored");
                // §6.1 has no "unknown command" code; SMS.6021 "The command from the Agent is
                // inconsistent with that from SMS" (line 25164) is the closest documented one.
                Err(TaskFailure::new(
                    Code::CommandMismatch,
                    format!("unknown command {name:?} ignored by this agent"),
                ))
            }
        };
        let result = match outcome {
            Ok(detail) => CommandResult {
                command_name: name,
                result: "success".into(),
                result_detail: detail,
            },
            Err(f) => CommandResult {
                command_name: name,
                result: "fail".into(),
                result_detail: json!({"error_code": f.code.as_str(), "error_msg": f.message}),
            },
        };
        self.state.pending_results.push(result);
        self.save()?;
        self.flush_results().await
    }

    /// STOP: the pass stops at its next checkpoint; START resumes it.
    async fn stop(&mut self) -> Outcome {
        self.halt().await;
        let Some(t) = self.state.task.as_ref() else {
            return Ok(json!({"state": "no task"}));
        };
        let cycle = if t.phase == Phase::Syncing {
            MigrationCycle::Syncing
        } else {
            MigrationCycle::Replicating
        };
        self.set_phase(Phase::Stopped);
        let _ = self.save();
        self.change_state(CopyState::Stopped, cycle).await;
        Ok(json!({"state": "stopped"}))
    }

    /// DELETE: the pass stops and the task is forgotten.
    async fn delete(&mut self) -> Outcome {
        self.halt().await;
        self.state.task = None;
        self.status.task_id = None;
        self.status.phase = None;
        let _ = self.save();
        self.change_state(CopyState::Waiting, MigrationCycle::Checking)
            .await;
        Ok(json!({"state": "deleted"}))
    }

    /// SKIP: no consistency check for this task; one under way stops, the pass goes on.
    fn skip(&mut self) -> Outcome {
        if let Some(t) = self.state.task.as_mut() {
            t.skip_consistency = true;
        }
        if let Some(r) = self.activity.runner() {
            r.check_control
                .cancel
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let _ = self.save();
        Ok(json!({"state": "consistency check skipped"}))
    }

    /// Stops a running pass at its next checkpoint and waits for it; no retry stays due.
    pub(super) async fn halt(&mut self) {
        if let Activity::Running { mut runner, .. } =
            std::mem::replace(&mut self.activity, Activity::Idle)
        {
            super::engine::cancel(&runner);
            let _ = tokio::task::spawn_blocking(move || runner.join()).await;
        }
    }
}
