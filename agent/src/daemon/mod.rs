//! `sms-agent run`: register the source, then poll SMS for commands and act on them, keeping
//! every step in `state_dir` so a restart (or `kill -9`) picks up where it was.

pub mod engine;
pub mod state;
pub mod systemd;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde_json::json;

use crate::api::backoff::{jitter_fraction, Backoff};
use crate::api::models::{
    CertKey, ChangeState, Command, CommandResult, CopyState, DiskInfo, IdResponse, MigrationCycle,
    Passphrase, PostSourceServerBody, SpeedLimits, Task,
};
use crate::api::{ApiError, Client};
use crate::config::Config;
use state::{Phase, State, StateError, Status, Store, TaskState};

/// SMS's answer to a registration whose `id` it does not know ("Invalid source server ID").
const UNKNOWN_SOURCE: &str = "SMS.6030";

/// Poll interval while a task runs: commands like STOP must be seen quickly.
const BUSY_POLL: Duration = Duration::from_secs(2);
/// Longest wait between retries of start-up calls.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(60);
/// A pass that fails for a transient reason (target unreachable, connection lost) is started
/// again from its checkpoint this many times, after 5, 10, 20, … s, before the task fails.
const PASS_RETRIES: u32 = 6;
const PASS_RETRY_FIRST: Duration = Duration::from_secs(5);
const PASS_RETRY_MAX: Duration = Duration::from_secs(120);

/// A failure that stops the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory cannot be used.
    #[error(transparent)]
    State(#[from] StateError),
    /// The API client cannot be built from the config.
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// The running daemon.
pub struct Daemon {
    api: Client,
    store: Store,
    state: State,
    status: Status,
    probe_opts: probe::Options,
    poll_interval: Duration,
    reprobe_interval: Duration,
    backoff: Backoff,
    transfer: crate::config::TransferSection,
    runner: Option<engine::Runner>,
    last_report: Instant,
    rules: Vec<transfer::limit::Rule>,
    last_rules: Instant,
    utc_offset: i64,
    /// When the failed pass is started again, and how many retries went before.
    retry: Option<(Instant, u32)>,
}

/// What a transfer needs from the service.
struct Material {
    tls: std::sync::Arc<transfer::rustls::ClientConfig>,
    rules: Vec<transfer::limit::Rule>,
    settings: crate::api::models::TaskSettings,
}

/// Why the main loop ended.
enum Exit {
    Shutdown,
}

impl Daemon {
    /// Opens the state directory (taking its lock) and builds the client; nothing is sent yet.
    pub fn new(cfg: &Config, api: Client) -> Result<Self, DaemonError> {
        let store = Store::open(&cfg.agent.state_dir)?;
        let state = store.load()?;
        let probe_opts = probe::Options {
            devices: cfg.probe.devices.clone(),
            interfaces: cfg.probe.interfaces.clone(),
            name: Some(cfg.agent.name.clone()).filter(|n| !n.is_empty()),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            ..probe::Options::default()
        };
        let status = Status {
            pid: std::process::id(),
            source_id: state.source_id.clone(),
            ..Status::default()
        };
        let backoff = Backoff::new(Duration::from_secs(1), MAX_RETRY_WAIT).unwrap_or_default();
        Ok(Self {
            api,
            store,
            state,
            status,
            probe_opts,
            poll_interval: cfg.agent.poll_interval.0,
            reprobe_interval: cfg.agent.reprobe_interval.0,
            backoff,
            transfer: cfg.transfer.clone(),
            runner: None,
            last_report: Instant::now(),
            rules: Vec::new(),
            last_rules: Instant::now(),
            utc_offset: engine::utc_offset(),
            retry: None,
        })
    }

    /// Runs until `shutdown` resolves; returns after saving state.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), DaemonError> {
        tokio::pin!(shutdown);
        if let Some(every) = systemd::watchdog_interval() {
            tokio::spawn(async move {
                let mut t = tokio::time::interval(every);
                loop {
                    t.tick().await;
                    systemd::notify("WATCHDOG=1");
                }
            });
        }
        let exit = tokio::select! {
            r = self.main_loop() => r?,
            () = &mut shutdown => Exit::Shutdown,
        };
        match exit {
            Exit::Shutdown => {
                systemd::notify("STOPPING=1");
                if let Some(r) = self.runner.as_mut() {
                    // Stop at a checkpoint; a restarted agent resumes from it.
                    engine::cancel(r);
                    let _ = r.join();
                }
                self.set_activity("stopped");
                self.save()?;
                tracing::info!("shut down");
            }
        }
        Ok(())
    }

    async fn main_loop(&mut self) -> Result<Exit, DaemonError> {
        self.set_activity("probing");
        let body = self.probe().await;
        self.register(body.clone()).await?;
        self.change_state(CopyState::Waiting, MigrationCycle::Checking)
            .await;
        systemd::ready();
        self.set_activity("waiting for commands");
        let mut last_probe = Instant::now();
        self.state.disk_fingerprint = fingerprint(&body);
        self.save()?;
        if self.task_active() {
            // Killed or restarted mid-pass: carry on from the receiver's checkpoint.
            self.resume_task().await;
        }
        loop {
            self.flush_results().await?;
            self.send_final_report().await;
            self.tick_runner().await;
            if let Some((at, _)) = self.retry {
                if Instant::now() >= at && self.runner.is_none() && self.task_active() {
                    self.resume_task().await;
                }
            }
            if last_probe.elapsed() >= self.reprobe_interval {
                last_probe = Instant::now();
                self.reprobe().await?;
            }
            match self.poll().await {
                Ok(cmd) => self.dispatch(cmd).await?,
                Err(e) => {
                    tracing::warn!(error = %e, "polling for commands failed");
                    self.status.last_error = Some(e.to_string());
                }
            }
            let base = if self.task_active() {
                BUSY_POLL
            } else {
                self.poll_interval
            };
            // ±10 % jitter keeps a fleet of agents from polling in step.
            let wait = base.mul_f64(0.9 + 0.2 * jitter_fraction());
            tokio::time::sleep(wait).await;
        }
    }

    fn task_active(&self) -> bool {
        self.state
            .task
            .as_ref()
            .is_some_and(|t| matches!(t.phase, Phase::Replicating | Phase::Syncing) && !t.pass_done)
    }

    /// Sends the final progress report of a completed pass that the service has not taken
    /// yet (the daemon was killed in between, or the call failed).
    async fn send_final_report(&mut self) {
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
                tracing::warn!(error_code = "SMS.0501", error = %e, "final progress report failed; it is sent again later");
            }
        }
    }

    async fn probe(&self) -> PostSourceServerBody {
        let opts = self.probe_opts.clone();
        let report = tokio::task::spawn_blocking(move || probe::probe(&opts))
            .await
            .unwrap_or_else(|e| probe::Report {
                body: PostSourceServerBody::default(),
                warnings: vec![probe::Warning {
                    subject: "probe".into(),
                    reason: format!("the probe thread failed: {e}"),
                }],
            });
        for w in &report.warnings {
            tracing::warn!(subject = %w.subject, reason = %w.reason, "probe warning");
        }
        report.body
    }

    /// Registers (or, with a saved id, updates) the source; retries until it succeeds.
    async fn register(&mut self, mut body: PostSourceServerBody) -> Result<(), DaemonError> {
        self.set_activity("registering");
        if self.state.source_id.is_none() && self.state.registering {
            // A previous run may have registered and died before saving the id.
            if let Some(id) = self.find_registered(&body).await {
                tracing::info!(source_id = %id, "found this source registered by an earlier run");
                self.state.source_id = Some(id);
            }
        }
        let mut attempt = 0;
        loop {
            body.id = self.state.source_id.clone();
            if body.id.is_none() && !self.state.registering {
                self.state.registering = true;
                self.save()?;
            }
            match self
                .api
                .send::<_, IdResponse>(Method::POST, "/v3/sources", &body)
                .await
            {
                Ok(r) if !r.id.is_empty() => {
                    tracing::info!(source_id = %r.id, updated = body.id.is_some(), "registered");
                    self.state.source_id = Some(r.id.clone());
                    self.state.registering = false;
                    self.status.source_id = Some(r.id);
                    self.save()?;
                    return Ok(());
                }
                Ok(_) => {
                    self.registration_failed(
                        "SMS.0502: registration answered without an id",
                        attempt,
                    );
                }
                // The saved id names a source SMS no longer has (deleted in the console, or
                // another region): retrying it would never succeed, so register as new. Its
                // task and unsent results went with it.
                Err(ApiError::Status { code, .. })
                    if code == UNKNOWN_SOURCE && body.id.is_some() =>
                {
                    tracing::warn!(
                        source_id = body.id.as_deref().unwrap_or_default(),
                        "SMS does not know the saved source id; registering as a new source"
                    );
                    self.state.source_id = None;
                    self.state.task = None;
                    self.state.pending_results.clear();
                    self.status.source_id = None;
                    continue;
                }
                Err(e) => {
                    self.registration_failed(
                        &format!("SMS.0502: registration failed: {e}"),
                        attempt,
                    );
                }
            }
            tokio::time::sleep(self.backoff.delay(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
    }

    fn registration_failed(&mut self, msg: &str, attempt: u32) {
        tracing::error!(attempt, "{msg}");
        self.status.last_error = Some(msg.to_string());
        systemd::status(msg);
        let _ = self.store.publish(&self.status);
    }

    /// Looks for a source with our name and hostname registered earlier.
    async fn find_registered(&self, body: &PostSourceServerBody) -> Option<String> {
        let q = [
            ("name".to_string(), body.name.clone()),
            ("ip".to_string(), body.ip.clone()),
        ];
        let list: serde_json::Value = self.api.get("/v3/sources", &q).await.ok()?;
        list.get("source_servers")?
            .as_array()?
            .iter()
            .find(|s| s.get("name").and_then(|n| n.as_str()) == Some(body.name.as_str()))
            .and_then(|s| s.get("id")?.as_str().map(str::to_string))
    }

    fn source_id(&self) -> String {
        self.state.source_id.clone().unwrap_or_default()
    }

    /// Sends a copy state; pairs the service refuses are never sent.
    async fn change_state(&mut self, copystate: CopyState, migrationcycle: MigrationCycle) {
        let cs = ChangeState {
            copystate,
            migrationcycle,
        };
        if !cs.is_valid() {
            tracing::error!(
                ?copystate,
                ?migrationcycle,
                "refusing to send a copy state pair SMS rejects (SMS.7728)"
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

    async fn poll(&self) -> Result<Command, ApiError> {
        self.api
            .get(&format!("/v3/sources/{}/command", self.source_id()), &[])
            .await
    }

    /// Sends the pending command results, oldest first; stops at the first failure.
    async fn flush_results(&mut self) -> Result<(), DaemonError> {
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
    async fn dispatch(&mut self, cmd: Command) -> Result<(), DaemonError> {
        let name = cmd.command_name.trim().to_string();
        if name.is_empty() {
            return Ok(());
        }
        let task_id = cmd
            .command_param
            .as_ref()
            .map(|p| p.task_id.clone())
            .unwrap_or_default();
        tracing::info!(command = %name, task_id = %task_id, "command received");
        let outcome = match name.as_str() {
            "START" | "SYNC" => self.start(&name, &task_id).await,
            "STOP" => self.stop().await,
            "DELETE" => self.delete().await,
            "SKIP" => self.skip(),
            // Log bundles go to the operator's OBS bucket, which needs an OBS client this build
            // does not have; say so rather than claim success.
            "UPLOAD_LOG" | "RSET_LOG_ACL" => Err((
                "SMS.0414".to_string(),
                format!("{name}: uploading logs to OBS is not supported by this agent build; logs are in the journal / log_dir"),
            )),
            _ => {
                tracing::warn!(command = %name, "unknown command ignored");
                Err((
                    "SMS.9999".to_string(),
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
            Err((code, msg)) => CommandResult {
                command_name: name,
                result: "fail".into(),
                result_detail: json!({"error_code": code, "error_msg": msg}),
            },
        };
        self.state.pending_results.push(result);
        self.save()?;
        self.flush_results().await
    }

    async fn start(
        &mut self,
        name: &str,
        task_id: &str,
    ) -> Result<serde_json::Value, (String, String)> {
        if task_id.is_empty() {
            return Err(("SMS.9004".into(), format!("{name} without a task_id")));
        }
        if self.runner.is_some() && self.state.task.as_ref().is_some_and(|t| t.id == task_id) {
            // A repeated START of a running task is not a second run.
            return Ok(json!({"task_id": task_id, "state": "already running"}));
        }
        self.retry = None;
        let task: Task = self
            .api
            .get(&format!("/v3/tasks/{task_id}"), &[])
            .await
            .map_err(|e| {
                (
                    "SMS.0201".to_string(),
                    format!("cannot read task {task_id}: {e}"),
                )
            })?;
        let prev = self.state.task.take().filter(|t| t.id == task_id);
        // A pass that completed is never run again: the next one is a sync. One that did not
        // complete is run again under its own number, so the receiver resumes its checkpoint.
        let pass = match &prev {
            Some(t) if t.pass_done => t.pass + 1,
            Some(t) => t.pass,
            None => 0,
        };
        self.state.task = Some(TaskState {
            id: task_id.to_string(),
            kind: task.kind.clone(),
            phase: Phase::Init,
            pass,
            pass_done: false,
            final_report: None,
            error: None,
            ..prev.unwrap_or_default()
        });
        self.status.task_id = Some(task_id.to_string());
        self.status.phase = Some(Phase::Init);
        let _ = self.save();
        if pass == 0 {
            self.change_state(CopyState::Init, MigrationCycle::Replicating)
                .await;
        }
        let material = match self.fetch_task_material(task_id).await {
            Ok(m) => m,
            Err((code, msg)) => return Err(self.fail_task(code, msg).await),
        };
        self.launch(&task, pass, pass > 0, material).await
    }

    /// Fetches the task and its material again and restarts its pass (after a restart).
    async fn resume_task(&mut self) {
        let Some(t) = self.state.task.clone() else {
            return;
        };
        tracing::info!(task_id = %t.id, pass = t.pass, "resuming the task from its checkpoint");
        let task: Task = match self.api.get(&format!("/v3/tasks/{}", t.id), &[]).await {
            Ok(task) => task,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the task to resume it");
                return;
            }
        };
        let material = match self.fetch_task_material(&t.id).await {
            Ok(m) => m,
            Err((code, msg)) => {
                self.fail_task(code, msg).await;
                return;
            }
        };
        if let Err((code, msg)) = self.launch(&task, t.pass, t.pass > 0, material).await {
            tracing::error!(code = %code, "{msg}");
        }
    }

    /// Plans the pass (disks or filesystems) and starts pass `pass` on its own thread.
    async fn launch(
        &mut self,
        task: &Task,
        pass: u32,
        sync: bool,
        material: Material,
    ) -> Result<serde_json::Value, (String, String)> {
        let task_id = task.id.clone();
        if task.migration_ip.is_empty() {
            return Err(self
                .fail_task("SMS.1807".into(), "the task has no migration_ip".into())
                .await);
        }
        let ip = &task.migration_ip;
        let addr = if ip.contains(':') && !ip.starts_with('[') {
            format!("[{ip}]:{}", self.transfer.port)
        } else {
            format!("{ip}:{}", self.transfer.port)
        };
        let connector = transfer::session::Connector {
            addr,
            tls: material.tls,
            timeout: Duration::from_secs(10),
        };
        let planned = match task.kind.as_str() {
            "MIGRATE_BLOCK" => plan_block(task).await.map(|disks| {
                let opts = transfer::block::SendOptions {
                    task_id: task_id.clone(),
                    pass,
                    sync,
                    streams: self
                        .transfer
                        .streams
                        .unwrap_or(transfer::block::STREAMS)
                        .max(1),
                    ..transfer::block::SendOptions::default()
                };
                engine::Runner::start_block(connector, disks, opts)
            }),
            "MIGRATE_FILE" => {
                let skip = self.state.task.as_ref().is_some_and(|t| t.skip_consistency);
                self.plan_file(task, sync, skip, &material.settings)
                    .await
                    .map(|job| engine::Runner::start_file(connector, pass, job))
            }
            other => {
                let kind = if other.is_empty() { "(none)" } else { other };
                Err((
                    "SMS.1908".into(),
                    format!("unknown task type {kind}: expected MIGRATE_BLOCK or MIGRATE_FILE"),
                ))
            }
        };
        let runner = match planned {
            Ok(r) => r,
            Err((code, msg)) => return Err(self.fail_task(code, msg).await),
        };
        self.rules = material.rules;
        engine::apply_limit(&runner.control, &self.rules, self.utc_offset);
        self.last_rules = Instant::now();
        self.runner = Some(runner);
        self.last_report = Instant::now();
        let (phase, cs, cycle) = if sync {
            (Phase::Syncing, CopyState::Syncing, MigrationCycle::Syncing)
        } else {
            (
                Phase::Replicating,
                CopyState::Replicate,
                MigrationCycle::Replicating,
            )
        };
        if let Some(t) = self.state.task.as_mut() {
            t.phase = phase;
            t.pass = pass;
        }
        self.status.phase = Some(phase);
        let _ = self.save();
        self.change_state(cs, cycle).await;
        self.set_activity(if sync { "syncing" } else { "replicating" });
        Ok(json!({"task_id": task_id, "state": "running", "pass": pass}))
    }

    /// The file pass of a `MIGRATE_FILE` task: its filesystems, the excludes of the task
    /// settings and the config, and the consistency check unless SKIP said otherwise.
    async fn plan_file(
        &self,
        task: &Task,
        sync: bool,
        skip_check: bool,
        settings: &crate::api::models::TaskSettings,
    ) -> Result<engine::FileJob, (String, String)> {
        let ts = task.target_server.clone().unwrap_or_default();
        let sources =
            crate::fileplan::sources(&ts).map_err(|e| ("SMS.1507".into(), e.to_string()))?;
        let st =
            crate::fileplan::settings(settings).map_err(|e| ("SMS.1510".into(), e.to_string()))?;
        let mut excludes = st.excludes(sync);
        for e in &self.transfer.exclude {
            if !e.starts_with('/') {
                return Err((
                    "SMS.1510".into(),
                    format!("config [transfer] exclude {e:?} is not an absolute path"),
                ));
            }
            excludes.push(e.into());
        }
        for s in &sources {
            if !s.is_dir() {
                return Err((
                    "SMS.1508".into(),
                    format!(
                        "mount point {} of the task is not a directory here",
                        s.display()
                    ),
                ));
            }
        }
        let for_used = sources.clone();
        let used_bytes =
            tokio::task::spawn_blocking(move || crate::fileplan::used_bytes(&for_used))
                .await
                .unwrap_or(0);
        let check = (!st.consistency_dirs.is_empty() && !skip_check).then(|| {
            transfer::file::CheckOptions {
                sources: sources.clone(),
                map_to_root: false,
                dirs: st.consistency_dirs.clone(),
                excludes: excludes.clone(),
                hash_mode: st.consistency_hash,
                task_id: task.id.clone(),
                peer_timeout: transfer::session::PEER_TIMEOUT,
            }
        });
        tracing::info!(task_id = %task.id, sources = ?sources, excludes = excludes.len(), used_bytes, check = check.is_some(), "file pass planned");
        Ok(engine::FileJob {
            send: transfer::file::SendOptions {
                sources,
                map_to_root: false,
                excludes,
                streams: self
                    .transfer
                    .streams
                    .unwrap_or(transfer::file::STREAMS)
                    .max(1),
                sync,
                hash_mode: false,
                task_id: task.id.clone(),
                peer_timeout: transfer::session::PEER_TIMEOUT,
            },
            check,
            used_bytes,
        })
    }

    /// Reports progress every 5 s, re-reads the speed limits every minute, and finishes the
    /// pass when its thread ends.
    async fn tick_runner(&mut self) {
        if self.runner.is_none() {
            return;
        }
        let task_id = self
            .state
            .task
            .as_ref()
            .map(|t| t.id.clone())
            .unwrap_or_default();
        if self.last_rules.elapsed() >= Duration::from_secs(60) {
            self.last_rules = Instant::now();
            if let Ok(l) = self
                .api
                .get::<SpeedLimits>(&format!("/v3/tasks/{task_id}/speed-limit"), &[])
                .await
            {
                self.rules = l
                    .speed_limit
                    .iter()
                    .filter_map(|r| transfer::limit::Rule::new(&r.start, &r.end, r.speed).ok())
                    .collect();
            }
        }
        if let Some(r) = self.runner.as_ref() {
            engine::apply_limit(&r.control, &self.rules, self.utc_offset);
        }
        let Some(r) = self.runner.as_mut() else {
            return;
        };
        let finished = r.finished();
        if !finished && self.last_report.elapsed() < engine::REPORT_EVERY {
            return;
        }
        let result = if finished { Some(r.join()) } else { None };
        let ok = matches!(result, Some(engine::Ended::Done(_)));
        let (body, (done, total, rate, eta)) = r.report(self.utc_offset, ok);
        let sync = r.subtask.starts_with("SYNC");
        self.last_report = Instant::now();
        self.status.bytes_done = done;
        self.status.bytes_total = total;
        self.status.rate = rate;
        self.status.eta_secs = eta;
        let path = format!("/v3/tasks/{task_id}/progress");
        if ok {
            // Recorded before the service hears of it: a kill after the report must not make
            // the restarted daemon run the completed pass again, and a kill before it must
            // not lose the report.
            if let Some(t) = self.state.task.as_mut() {
                t.pass_done = true;
                t.phase = Phase::Syncing;
                t.final_report = Some(body.clone());
            }
            self.status.phase = Some(Phase::Syncing);
            let _ = self.save();
            self.send_final_report().await;
        } else if !matches!(result, Some(engine::Ended::Failed { .. })) {
            if let Err(e) = self
                .api
                .send::<_, serde_json::Value>(Method::PUT, &path, &body)
                .await
            {
                tracing::warn!(error_code = "SMS.0501", error = %e, "progress report failed");
            }
        }
        let _ = self.publish();
        match result {
            None | Some(engine::Ended::Cancelled) => {
                if result.is_some() {
                    self.runner = None;
                }
            }
            Some(engine::Ended::Done(sum)) => {
                self.runner = None;
                self.retry = None;
                tracing::info!(task_id = %task_id, sync, bytes_read = sum.bytes_read, wire = sum.wire_sent, "pass complete");
                self.upload_checks(&task_id, &sum).await;
                if let Some(t) = self.state.task.as_mut() {
                    t.phase = Phase::Syncing;
                }
                self.status.phase = Some(Phase::Syncing);
                let _ = self.save();
                self.change_state(CopyState::Syncing, MigrationCycle::Syncing)
                    .await;
                self.set_activity("pass complete; waiting for SYNC");
            }
            Some(engine::Ended::Failed { code, message }) => {
                self.runner = None;
                let tries = self.retry.map_or(0, |(_, n)| n);
                // Unreachable target or a lost connection: the pass resumes from its
                // checkpoint, so trying again costs little; anything else needs the operator.
                if matches!(code.as_str(), "SMS.1807" | "SMS.1908") && tries < PASS_RETRIES {
                    let wait = PASS_RETRY_FIRST
                        .saturating_mul(1 << tries.min(16))
                        .min(PASS_RETRY_MAX);
                    tracing::warn!(task_id = %task_id, error_code = %code, attempt = tries + 1, wait_secs = wait.as_secs(), "pass failed, starting it again from its checkpoint: {message}");
                    self.retry = Some((Instant::now() + wait, tries + 1));
                    self.status.last_error = Some(format!("{code}: {message}"));
                    self.set_activity(&format!(
                        "retry {} of {PASS_RETRIES} in {} s after {code}",
                        tries + 1,
                        wait.as_secs()
                    ));
                } else {
                    tracing::error!(task_id = %task_id, error_code = %code, "pass failed: {message}");
                    self.retry = None;
                    self.fail_task(code, message).await;
                }
            }
        }
    }

    /// Uploads a pass's consistency-check results (at most 30, as the service takes them).
    async fn upload_checks(&mut self, task_id: &str, sum: &engine::Summary) {
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

    /// Marks the task failed, reports ERROR, and returns the (code, message) for the result.
    async fn fail_task(&mut self, code: String, msg: String) -> (String, String) {
        if let Some(t) = self.state.task.as_mut() {
            t.phase = Phase::Failed;
            t.error = Some(format!("{code}: {msg}"));
        }
        self.status.phase = Some(Phase::Failed);
        self.status.last_error = Some(format!("{code}: {msg}"));
        let _ = self.save();
        self.change_state(CopyState::Error, MigrationCycle::Replicating)
            .await;
        (code, msg)
    }

    /// Fetches what a transfer needs: TLS material (and the key's passphrase when encrypted),
    /// speed limits and task settings. Nothing of it is logged: the keys are secrets.
    async fn fetch_task_material(&self, task_id: &str) -> Result<Material, (String, String)> {
        let q = [("enable_ca_cert".to_string(), "true".to_string())];
        let ck: CertKey = self
            .api
            .get(&format!("/v3/tasks/{task_id}/certkey"), &q)
            .await
            .map_err(|e| {
                (
                    "SMS.0511".to_string(),
                    format!("private key and certificates not obtained: {e}"),
                )
            })?;
        let mut passphrase = None;
        if ck.private_key.contains("ENCRYPTED") {
            let p: Passphrase = self
                .api
                .get(&format!("/v3/tasks/{task_id}/passphrase"), &[])
                .await
                .map_err(|e| {
                    (
                        "SMS.0521".to_string(),
                        format!("certificate password not obtained: {e}"),
                    )
                })?;
            if p.passphrase.is_empty() {
                return Err((
                    "SMS.0521".into(),
                    "certificate password not obtained: empty passphrase".into(),
                ));
            }
            passphrase = Some(p.passphrase);
        }
        // Load the material now, so a bad certificate fails the task before any data moves.
        let tls =
            transfer::tls::Identity::from_pem(&ck.cert, &ck.private_key, passphrase.as_deref())
                .and_then(|id| transfer::tls::client_config(id, &ck.ca))
                .map_err(|e| {
                    (
                        "SMS.3301".to_string(),
                        format!("SSL certificate not loaded: {e}"),
                    )
                })?;
        let limits: SpeedLimits = self
            .api
            .get(&format!("/v3/tasks/{task_id}/speed-limit"), &[])
            .await
            .map_err(|e| {
                (
                    "SMS.0201".to_string(),
                    format!("speed limits not obtained: {e}"),
                )
            })?;
        let settings: crate::api::models::TaskSettings = self
            .api
            .get(&format!("/v3/tasks/{task_id}/configuration-setting"), &[])
            .await
            .map_err(|e| {
                (
                    "SMS.0201".to_string(),
                    format!("task settings not obtained: {e}"),
                )
            })?;
        let mut rules = Vec::new();
        for r in &limits.speed_limit {
            rules.push(
                transfer::limit::Rule::new(&r.start, &r.end, r.speed).map_err(|e| {
                    (
                        "SMS.9004".to_string(),
                        format!("speed-limit rule refused: {e}"),
                    )
                })?,
            );
        }
        tracing::info!(
            task_id,
            speed_rules = limits.speed_limit.len(),
            "task material fetched"
        );
        Ok(Material {
            tls,
            rules,
            settings,
        })
    }

    /// Stops a running pass at its next checkpoint and waits for it.
    async fn halt(&mut self) {
        self.retry = None;
        if let Some(mut r) = self.runner.take() {
            engine::cancel(&r);
            let _ = tokio::task::spawn_blocking(move || r.join()).await;
        }
    }

    async fn stop(&mut self) -> Result<serde_json::Value, (String, String)> {
        self.halt().await;
        let Some(t) = self.state.task.as_mut() else {
            return Ok(json!({"state": "no task"}));
        };
        let cycle = if t.phase == Phase::Syncing {
            MigrationCycle::Syncing
        } else {
            MigrationCycle::Replicating
        };
        t.phase = Phase::Stopped;
        self.status.phase = Some(Phase::Stopped);
        let _ = self.save();
        self.change_state(CopyState::Stopped, cycle).await;
        Ok(json!({"state": "stopped"}))
    }

    async fn delete(&mut self) -> Result<serde_json::Value, (String, String)> {
        self.halt().await;
        self.state.task = None;
        self.status.task_id = None;
        self.status.phase = None;
        let _ = self.save();
        self.change_state(CopyState::Waiting, MigrationCycle::Checking)
            .await;
        Ok(json!({"state": "deleted"}))
    }

    fn skip(&mut self) -> Result<serde_json::Value, (String, String)> {
        if let Some(t) = self.state.task.as_mut() {
            t.skip_consistency = true;
        }
        // A check under way stops; the pass itself goes on.
        if let Some(r) = self.runner.as_ref() {
            r.check_control
                .cancel
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let _ = self.save();
        Ok(json!({"state": "consistency check skipped"}))
    }

    /// Re-probes and sends `PUT diskinfo` when the disks changed.
    async fn reprobe(&mut self) -> Result<(), DaemonError> {
        let body = self.probe().await;
        let fp = fingerprint(&body);
        if fp == self.state.disk_fingerprint {
            return Ok(());
        }
        tracing::warn!(
            error_code = "SMS.0515",
            "source disks changed; updating the disk information"
        );
        let info = DiskInfo {
            disks: body.disks,
            volumegroups: body.volume_groups,
            btrfs_list: body.btrfs_list,
        };
        let path = format!("/v3/sources/{}/diskinfo", self.source_id());
        match self
            .api
            .send::<_, serde_json::Value>(Method::PUT, &path, &info)
            .await
        {
            Ok(_) => {
                self.state.disk_fingerprint = fp;
                self.save()?;
            }
            Err(e) => {
                tracing::warn!(error = %e, "disk information not updated; will retry at the next re-probe")
            }
        }
        Ok(())
    }

    fn set_activity(&mut self, a: &str) {
        self.status.activity = a.to_string();
        systemd::status(a);
        let _ = self.publish();
    }

    fn publish(&mut self) -> Result<(), StateError> {
        self.status.updated_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.store.publish(&self.status)
    }

    fn save(&mut self) -> Result<(), StateError> {
        self.store.save(&self.state)?;
        self.publish()
    }
}

/// SHA-256 over the layout of the storage (names, sizes, filesystems), not its usage, which
/// changes all the time without the target needing to change.
fn fingerprint(body: &PostSourceServerBody) -> String {
    let disks: Vec<_> = body
        .disks
        .iter()
        .map(|d| {
            let parts: Vec<_> = d
                .physical_volumes
                .iter()
                .map(|p| (&p.name, p.size, &p.file_system, &p.uuid))
                .collect();
            (&d.name, d.size, &d.partition_style, parts)
        })
        .collect();
    let vgs: Vec<_> = body
        .volume_groups
        .iter()
        .map(|v| {
            let lvs: Vec<_> = v
                .logical_volumes
                .iter()
                .map(|l| (&l.name, l.size))
                .collect();
            (&v.name, v.size, &v.components, lvs)
        })
        .collect();
    let btrfs: Vec<_> = body
        .btrfs_list
        .iter()
        .map(|b| (&b.uuid, &b.device, b.size))
        .collect();
    let v = json!({"d": disks, "v": vgs, "b": btrfs});
    crate::api::sign::sha256_hex(v.to_string().as_bytes())
}

/// The source disks of a `MIGRATE_BLOCK` task and their used ranges.
async fn plan_block(task: &Task) -> Result<Vec<transfer::block::SourceDisk>, (String, String)> {
    let pairs: Vec<(String, String)> = task
        .target_server
        .as_ref()
        .map(|ts| {
            ts.disks
                .iter()
                .filter_map(|d| {
                    let rel = d.relation_name.clone().filter(|r| !r.is_empty())?;
                    Some((rel, d.name.clone()))
                })
                .collect()
        })
        .unwrap_or_default();
    if pairs.is_empty() {
        return Err((
            "SMS.1311".into(),
            "the task maps no target disk to a source disk (relation_name)".into(),
        ));
    }
    tokio::task::spawn_blocking(move || {
        let mut disks = Vec::new();
        for (src, name) in pairs {
            let path = if src.starts_with('/') {
                std::path::PathBuf::from(&src)
            } else {
                std::path::PathBuf::from("/dev").join(&src)
            };
            let (used, notes) = crate::blockplan::used_ranges(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            for n in notes {
                tracing::info!(disk = %path.display(), "{n}");
            }
            disks.push(transfer::block::SourceDisk { path, name, used });
        }
        Ok::<_, String>(disks)
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
    .map_err(|msg| ("SMS.1905".into(), msg))
}
