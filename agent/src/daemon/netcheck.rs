//! The network check of a task (reference §5.9.1): on the operator's `network_check` action
//! (§5.4.7 line 12922, which reaches the agent as the NETWORK_CHECK command) or before the
//! first pass of a task created with `start_network_check` (§5.4.1 line 9688), measure the
//! link to the task's `migration_ip`, check the SMS (and OBS) endpoints, and post
//! `POST /v3/{task_id}/update-network-check-info`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use transfer::netcheck::CheckOptions;
use transfer::{Code, TaskFailure};

use super::{material, Daemon};
use crate::api::models::Task;
use crate::api::ApiError;
use crate::netcheck::{body, evaluate, measure};

/// Duration of a check the daemon runs: a quarter echoes, the rest data.
pub(super) const CHECK_SECS: u64 = 10;
/// How long the OBS endpoint may take to answer.
const OBS_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets its flag when dropped: a check whose daemon is shutting down (the future dropped)
/// ends at once instead of running out its seconds.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// `host:port` of the receiver of `task` (brackets around an IPv6 address).
pub(super) fn target_addr(task: &Task, port: u16) -> String {
    let ip = &task.migration_ip;
    if ip.contains(':') && !ip.starts_with('[') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

impl Daemon {
    /// NETWORK_CHECK of `task_id`: fetch the task and its TLS material, check, report.
    pub(super) async fn network_check(&mut self, task_id: &str) -> Result<Value, TaskFailure> {
        if task_id.is_empty() {
            // §6.1 SMS.6013 "Incomplete request parameters" (line 25159).
            return Err(TaskFailure::new(
                Code::IncompleteParameters,
                "NETWORK_CHECK without a task_id",
            ));
        }
        if self.activity.runner().is_some() {
            // The bandwidth phase would compete with the pass and measure neither.
            return Err(TaskFailure::new(
                Code::CommandMismatch,
                "a pass is running; a network check now would measure the migration's own traffic. Ask again when the task is idle",
            ));
        }
        let task: Task = self
            .api
            .get(&format!("/v3/tasks/{task_id}"), &[])
            .await
            .map_err(|e| {
                TaskFailure::new(
                    Code::ApiNetworkBusy,
                    format!("cannot read task {task_id}: {e}"),
                )
            })?;
        let m = material::fetch(&self.api, task_id).await?;
        self.check_and_report(&task, m.tls).await
    }

    /// Measures the link to `task`'s receiver with `tls`, posts the result on the task, and
    /// says what was posted; a check that measured nothing is posted too, then fails.
    pub(super) async fn check_and_report(
        &mut self,
        task: &Task,
        tls: Arc<transfer::rustls::ClientConfig>,
    ) -> Result<Value, TaskFailure> {
        if task.migration_ip.is_empty() {
            return Err(TaskFailure::new(
                Code::TargetUnreachable,
                "the task has no migration_ip",
            ));
        }
        let previous = self.status.activity.clone();
        self.set_activity("checking the network");
        let connector = transfer::session::Connector {
            addr: target_addr(task, self.transfer.port.get()),
            tls,
            timeout: Duration::from_secs(10),
        };
        let opts = CheckOptions {
            task_id: task.id.clone(),
            streams: self
                .transfer
                .streams
                .map_or(transfer::block::STREAMS, std::num::NonZeroU16::get),
            duration: Duration::from_secs(CHECK_SECS),
        };
        let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let flag = Arc::clone(&cancel.0);
        let measured = tokio::task::spawn_blocking(move || measure(&connector, &opts, &flag)).await;
        drop(cancel);
        let mut report = measured.map_err(|e| {
            TaskFailure::new(
                Code::TransmissionFailed,
                format!("the network check's thread failed: {e}"),
            )
        })?;
        report.domain_connectivity = Some(self.domain_connectivity().await);
        report.evaluation = evaluate(&report).to_string();
        let info = body(&report);
        self.set_activity(&previous);
        tracing::info!(
            task_id = %task.id,
            target = %report.target,
            delay_ms = info.network_delay,
            jitter_ms = info.network_jitter,
            mbit_s = info.migration_speed,
            loss_pct = info.loss_percentage,
            destination = report.destination_connectivity,
            domain = ?report.domain_connectivity,
            evaluation = %info.evaluation_result,
            error = report.error.as_deref().unwrap_or(""),
            "network check done"
        );
        // Note the path: `/v3/{task_id}/…`, no `/tasks/` (§5.9.1, line 22794).
        self.api
            .send::<_, Value>(
                Method::POST,
                &format!("/v3/{}/update-network-check-info", task.id),
                &info,
            )
            .await
            .map_err(|e| {
                TaskFailure::new(
                    Code::ApiNetworkBusy,
                    format!("network check result not delivered: {e}"),
                )
            })?;
        match (&report.check, &report.error) {
            (Some(_), _) => Ok(json!({"task_id": task.id, "network_check_info": info})),
            (None, e) => Err(TaskFailure::new(
                report
                    .error_code
                    .as_deref()
                    .map_or(Code::TargetUnreachable, Code::parse),
                format!(
                    "network check to {}: {} (reported on the task)",
                    report.target,
                    e.as_deref().unwrap_or("nothing measured")
                ),
            )),
        }
    }

    /// DNS and TLS to the SMS endpoint (any answer of `GET /v3/config` proves both) and, when
    /// the service named one (`obs_domain`, §5.2.1), to the OBS endpoint.
    async fn domain_connectivity(&self) -> bool {
        let sms = match self.api.get::<Value>("/v3/config", &[]).await {
            Ok(_) | Err(ApiError::Status { .. }) => true,
            Err(e) => {
                tracing::warn!(error = %e, "network check: the SMS endpoint cannot be reached");
                false
            }
        };
        let Some(obs) = self.service_config.obs_domain.clone() else {
            return sms;
        };
        let client = match reqwest::Client::builder().timeout(OBS_TIMEOUT).build() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "network check: no HTTP client for OBS");
                return false;
            }
        };
        // Any HTTP answer, even an error status, means DNS, TCP and TLS worked.
        match client.head(format!("https://{obs}/")).send().await {
            Ok(_) => sms,
            Err(e) => {
                tracing::warn!(error = %e, obs = %obs, "network check: the OBS endpoint cannot be reached");
                false
            }
        }
    }
}
