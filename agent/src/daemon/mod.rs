//! `sms-agent run`: register the source, then poll SMS for commands and act on them, keeping
//! every step in `state_dir` so a restart (or `kill -9`) picks up where it was.
//!
//! The [`Daemon`] is one type whose work is spread over modules by job: `register` (who we
//! are to SMS), `commands` (what SMS asks), `task` (a task's passes and their end),
//! `material` (what a pass needs from SMS), `plan` (which disks or filesystems a pass moves),
//! `report` (what SMS hears of a task), `reprobe` (disk changes), `fjournal` (a file task's
//! change journal) and `activity` (what the daemon is doing with its task right now).

mod activity;
mod cbt;
mod commands;
pub mod engine;
mod fjournal;
mod log_transfer;
mod logs_cmd;
mod material;
mod netcheck;
mod plan;
mod register;
mod report;
mod reprobe;
pub mod state;
pub mod systemd;
mod task;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::api::backoff::{jitter_fraction, Backoff};
use crate::api::models::{CopyState, MigrationCycle};
use crate::api::{ApiError, Client};
use crate::config::Config;
use activity::Activity;
use state::{Phase, State, StateError, Status, Store};

/// Poll interval while a task runs: commands like STOP must be seen quickly.
const BUSY_POLL: Duration = Duration::from_secs(2);
/// Longest wait between retries of start-up calls.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(60);

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
    sync_interval: Duration,
    backoff: Backoff,
    transfer: crate::config::TransferSection,
    activity: Activity,
    last_report: Instant,
    rules: Vec<transfer::limit::Rule>,
    /// The task's own `speed_limit` in Mbit/s (0: none).
    task_speed: u64,
    last_rules: Instant,
    utc_offset: i64,
    /// What `GET /v3/config` said at start-up (`register.rs`); `obs_domain` is for a later
    /// log upload.
    service_config: crate::api::models::ServiceConfig,
    /// The file task's change journal.
    journal: fjournal::Holder,
    /// What UPLOAD_LOG / RSET_LOG_ACL need of the configuration.
    log_upload: crate::logs::upload::Settings,
    /// The log command under way (`logs_cmd.rs`).
    log_commands: logs_cmd::LogCommands,
    /// `[log_transfer]` when switched on (`log_transfer.rs`).
    log_transfer: Option<crate::logs::transfer::LogTransfer>,
    /// The shipment under way.
    log_ship: Option<tokio::task::JoinHandle<()>>,
    /// When the next window is due (seconds since 1970).
    log_ship_next: u64,
    /// The changed-block tracker of the current block task.
    cbt: cbt::Cbt,
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
            agent_version: crate::api::REPORTED_AGENT_VERSION.to_string(),
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
            sync_interval: cfg.agent.sync_interval.0,
            backoff,
            transfer: cfg.transfer.clone(),
            activity: Activity::Idle,
            last_report: Instant::now(),
            rules: Vec::new(),
            task_speed: 0,
            last_rules: Instant::now(),
            utc_offset: engine::utc_offset(),
            service_config: crate::api::models::ServiceConfig::default(),
            journal: fjournal::Holder::default(),
            log_upload: crate::logs::upload_settings(cfg),
            log_commands: logs_cmd::LogCommands::default(),
            log_transfer: cfg.log_transfer.clone(),
            log_ship: None,
            log_ship_next: 0,
            cbt: cbt::Cbt::default(),
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
        tokio::select! {
            r = self.main_loop() => r?,
            () = &mut shutdown => {}
        }
        systemd::notify("STOPPING=1");
        if let Activity::Running { runner, .. } = &mut self.activity {
            // Stop at a checkpoint; a restarted agent resumes from it.
            engine::cancel(runner);
            let _ = runner.join();
        }
        self.set_activity("stopped");
        self.save()?;
        tracing::info!("shut down");
        Ok(())
    }

    /// Registers, then polls for commands and tends the task until an error stops it.
    async fn main_loop(&mut self) -> Result<(), DaemonError> {
        self.fetch_service_config().await;
        self.set_activity("probing");
        let body = self.probe().await;
        self.register(body.clone()).await?;
        self.change_state(CopyState::Waiting, MigrationCycle::Checking)
            .await;
        systemd::ready();
        self.set_activity("waiting for commands");
        let mut last_probe = Instant::now();
        self.state.disk_fingerprint = reprobe::fingerprint(&body);
        self.save()?;
        if self.task_active() {
            // Killed or restarted mid-pass: carry on from the receiver's checkpoint.
            self.resume_task(0).await;
        } else {
            self.schedule_sync();
        }
        loop {
            self.tick_log_transfer();
            self.finish_log_command().await?;
            self.flush_results().await?;
            self.send_final_report().await;
            self.tick_runner().await;
            if let Activity::RetryAt { at, attempt } = self.activity {
                if Instant::now() >= at && self.task_active() {
                    self.resume_task(attempt).await;
                }
            }
            if let Activity::SyncAt { at } = self.activity {
                if Instant::now() >= at {
                    self.continue_sync().await;
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

    /// Whether a pass is due or under way: a completed pass waits for the next START/SYNC.
    fn task_active(&self) -> bool {
        self.state
            .task
            .as_ref()
            .is_some_and(|t| matches!(t.phase, Phase::Replicating | Phase::Syncing) && !t.pass_done)
    }

    fn source_id(&self) -> String {
        self.state.source_id.clone().unwrap_or_default()
    }

    /// Sets the task's phase in the state and the status (the caller saves).
    fn set_phase(&mut self, phase: Phase) {
        if let Some(t) = self.state.task.as_mut() {
            t.phase = phase;
        }
        self.status.phase = Some(phase);
    }

    fn set_activity(&mut self, a: &str) {
        self.status.activity = a.to_string();
        systemd::status(a);
        let _ = self.publish();
    }

    fn publish(&mut self) -> Result<(), StateError> {
        self.status.replication_lag_secs = self.cbt.lag().map(|l| l.as_secs_f64());
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
