//! A task's passes: start one (START/SYNC, or a resume after a restart or a retryable
//! failure), tend it while it runs, and record how it ended before SMS hears of it.

use std::num::NonZeroU16;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use transfer::{Code, TaskFailure};

use super::activity::{Activity, PASS_RETRIES};
use super::engine::{self, Ended, Runner};
use super::material::{self, Material};
use super::state::{Phase, TaskState};
use super::{plan, Daemon};
use crate::api::models::{CopyState, MigrationCycle, Task};

/// How often the speed limits are read again while a pass runs.
const RULES_EVERY: Duration = Duration::from_secs(60);

impl Daemon {
    /// START or SYNC of `task_id`: the next pass after a completed one, else the unfinished
    /// one again under its own number, so the receiver resumes its checkpoint.
    pub(super) async fn start(&mut self, name: &str, task_id: &str) -> Result<Value, TaskFailure> {
        if task_id.is_empty() {
            // §6.1 SMS.6013 "Incomplete request parameters" (line 25159).
            return Err(TaskFailure::new(
                Code::IncompleteParameters,
                format!("{name} without a task_id"),
            ));
        }
        match &mut self.activity {
            Activity::Running { attempt, .. } => {
                if self.state.task.as_ref().is_some_and(|t| t.id == task_id) {
                    // A repeated START of a running task is not a second run.
                    return Ok(json!({"task_id": task_id, "state": "already running"}));
                }
                *attempt = 0;
            }
            Activity::Failed { failure } => {
                tracing::info!(task_id, previous = %failure, "starting again after a failure");
                self.activity = Activity::Idle;
            }
            other => *other = Activity::Idle,
        }
        let task: Task = self
            .api
            .get(&format!("/v3/tasks/{task_id}"), &[])
            .await
            .map_err(|e| {
                let f = TaskFailure::new(
                    Code::ApiNetworkBusy,
                    format!("cannot read task {task_id}: {e}"),
                );
                // Not reported on the task (it cannot be read); the command result carries it.
                tracing::error!(task_id, error_code = %f.code, command = name, "task not started: {}", f.message);
                f
            })?;
        let prev = self.state.task.take().filter(|t| t.id == task_id);
        let first_start = prev.is_none();
        // The reference's SYNC command (§5.5.1 line 17025) is the operator's; the reference
        // says nothing of a final or frozen sync. With `[transfer] freeze` set, the agent makes
        // the pass of an explicit SYNC of a block task the cutover pass; the passes of
        // continuous sync (`syncing`, §5.4.1 line 9686) come through `continue_sync` and stay
        // unfrozen.
        let cutover =
            name == "SYNC" && task.kind == "MIGRATE_BLOCK" && !self.transfer.freeze.is_empty();
        let pass = match &prev {
            Some(t) if t.pass_done => t.pass + 1,
            // A cutover never resumes a checkpoint: what an earlier session sent was read
            // under no freeze or another one and may have changed since. A new pass number
            // makes the receiver start afresh (as a sync).
            Some(t) if cutover && t.pass > 0 => t.pass + 1,
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
            cutover: cutover && pass > 0,
            ..prev.unwrap_or_default()
        });
        self.status.task_id = Some(task_id.to_string());
        self.status.phase = Some(Phase::Init);
        let _ = self.save();
        if pass == 0 {
            self.change_state(CopyState::Init, MigrationCycle::Replicating)
                .await;
        }
        let material = match material::fetch(&self.api, task_id).await {
            Ok(m) => m,
            Err(f) => return Err(self.fail_task(f).await),
        };
        if first_start && pass == 0 && task.start_network_check == Some(true) {
            // §5.4.1 line 9688: the check runs before the first copy; its verdict is the
            // operator's to weigh, so the pass starts whatever it says.
            if let Err(f) = self.check_and_report(&task, material.tls.clone()).await {
                tracing::warn!(task_id, error_code = %f.code, "network check before the first pass: {}", f.message);
            }
        }
        self.launch(&task, pass, material, 0).await
    }

    /// Fetches the task and its material again and restarts its pass (after a restart, or
    /// for retry `attempt`).
    pub(super) async fn resume_task(&mut self, attempt: u32) {
        let Some(t) = self.state.task.clone() else {
            return;
        };
        tracing::info!(task_id = %t.id, pass = t.pass, attempt, "resuming the task from its checkpoint");
        let task: Task = match self.api.get(&format!("/v3/tasks/{}", t.id), &[]).await {
            Ok(task) => task,
            Err(e) => {
                // A due retry stays due: the next loop tries again.
                tracing::warn!(task_id = %t.id, attempt, error = %e, "cannot read the task to resume it; trying again at the next round");
                return;
            }
        };
        let material = match material::fetch(&self.api, &t.id).await {
            Ok(m) => m,
            Err(f) => {
                self.fail_task(f).await;
                return;
            }
        };
        // A cutover pass starts afresh under a new number (see `start`).
        let pass = if t.cutover { t.pass + 1 } else { t.pass };
        // A failure to launch went through `fail_task`, which logged and reported it.
        let _ = self.launch(&task, pass, material, attempt).await;
    }

    /// Plans pass `pass` (disks or filesystems) and starts it on its own thread; a pass after
    /// the first is a sync.
    async fn launch(
        &mut self,
        task: &Task,
        pass: u32,
        material: Material,
        attempt: u32,
    ) -> Result<Value, TaskFailure> {
        let sync = pass > 0;
        let cutover = sync && self.state.task.as_ref().is_some_and(|t| t.cutover);
        let runner = match self.plan(task, pass, sync, cutover, &material).await {
            Ok(r) => r,
            Err(f) => return Err(self.fail_task(f).await),
        };
        self.rules = material.rules;
        self.task_speed = task.speed_limit.unwrap_or(0);
        engine::apply_limit(&runner, &self.rules, self.task_speed, self.utc_offset);
        self.last_rules = Instant::now();
        self.activity = Activity::Running { runner, attempt };
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
            t.pass = pass;
            t.continuous = task.syncing == Some(true);
        }
        self.set_phase(phase);
        let _ = self.save();
        self.change_state(cs, cycle).await;
        self.set_activity(match (sync, cutover) {
            (true, true) => "cutover: syncing frozen",
            (true, false) => "syncing",
            _ => "replicating",
        });
        Ok(json!({"task_id": task.id, "state": "running", "pass": pass}))
    }

    /// The runner of pass `pass` of `task`, started, or why it cannot start; `cutover`: a
    /// block pass runs between a freeze and a thaw of `[transfer] freeze`.
    async fn plan(
        &self,
        task: &Task,
        pass: u32,
        sync: bool,
        cutover: bool,
        material: &Material,
    ) -> Result<Runner, TaskFailure> {
        if task.migration_ip.is_empty() {
            return Err(TaskFailure::new(
                Code::TargetUnreachable,
                "the task has no migration_ip",
            ));
        }
        let ip = &task.migration_ip;
        let addr = if ip.contains(':') && !ip.starts_with('[') {
            format!("[{ip}]:{}", self.transfer.port)
        } else {
            format!("{ip}:{}", self.transfer.port)
        };
        let connector = transfer::session::Connector {
            addr,
            tls: material.tls.clone(),
            timeout: Duration::from_secs(10),
        };
        let sched = engine::Sched {
            priority: transfer::sched::Priority::from_task(task.priority),
            pace_cpu: match engine::cpu::enforce(material.cpu_limit) {
                engine::cpu::Enforcement::Pacing => material.cpu_limit,
                engine::cpu::Enforcement::Cgroup(_) => None,
            },
        };
        match task.kind.as_str() {
            "MIGRATE_BLOCK" => {
                // Frozen before the plan and the tracker's drain: every write before the
                // freeze has then reached the disks and the tracker, and the used blocks
                // planned are those the frozen filesystems hold. An early return drops the
                // freeze, which thaws.
                let freeze = if cutover {
                    Some(self.freeze(&task.id, pass)?)
                } else {
                    None
                };
                let disks = plan::block(task).await?;
                let changed = self.cbt.before_pass(&task.id, &disks, sync);
                let opts = transfer::block::SendOptions {
                    task_id: task.id.clone(),
                    pass,
                    sync,
                    streams: self
                        .transfer
                        .streams
                        .map_or(transfer::block::STREAMS, NonZeroU16::get),
                    changed,
                    ..transfer::block::SendOptions::default()
                };
                Ok(Runner::start_block(connector, disks, opts, sched, freeze))
            }
            "MIGRATE_FILE" => {
                let skip = self.state.task.as_ref().is_some_and(|t| t.skip_consistency);
                let mut job =
                    plan::file(task, sync, skip, &material.settings, &self.transfer).await?;
                self.journal.prepare(&task.id, &mut job);
                Ok(Runner::start_file(connector, pass, job, sched))
            }
            other => {
                let kind = if other.is_empty() { "(none)" } else { other };
                // §6.1 SMS.6011 "The JSON request body does not meet the specifications"
                // (line 25157); the type's values: ref. §5.4.6 table 5-159.
                Err(TaskFailure::new(
                    Code::BodyNotToSpec,
                    format!("unknown task type {kind}: expected MIGRATE_BLOCK or MIGRATE_FILE"),
                ))
            }
        }
    }

    /// Freezes `[transfer] freeze` for the cutover pass `pass` of `task_id`, at most
    /// `[transfer] freeze_window` (the thaw guard's deadline).
    fn freeze(&self, task_id: &str, pass: u32) -> Result<engine::Cutover, TaskFailure> {
        let mounts = self.transfer.freeze.clone();
        let window = self.transfer.freeze_window;
        let at = Instant::now();
        let frozen = crate::freeze::Frozen::freeze(&mounts, window).map_err(|e| {
            // §6.1 SMS.1801 "Migration or synchronization task failed" (line 25037); the
            // reference has no code of its own for a freeze.
            TaskFailure::new(
                Code::parse("SMS.1801"),
                format!("cutover pass {pass}: {e}; check [transfer] freeze"),
            )
        })?;
        tracing::info!(task_id, pass, window_secs = window.as_secs_f64(), mounts = ?mounts, "cutover: filesystems frozen; this pass sends the last changes, then thaws");
        Ok(engine::Cutover { frozen, at, mounts })
    }

    /// Reports progress every 5 s, re-reads the speed limits every minute, and finishes the
    /// pass when its thread ends.
    pub(super) async fn tick_runner(&mut self) {
        if self.activity.runner().is_none() {
            return;
        }
        let task_id = self
            .state
            .task
            .as_ref()
            .map(|t| t.id.clone())
            .unwrap_or_default();
        self.refresh_rules(&task_id).await;
        let Activity::Running { runner, attempt } = &mut self.activity else {
            return;
        };
        engine::apply_limit(runner, &self.rules, self.task_speed, self.utc_offset);
        let finished = runner.finished();
        if !finished && self.last_report.elapsed() < engine::REPORT_EVERY {
            return;
        }
        let ended = finished.then(|| runner.join());
        let attempt = *attempt;
        let ok = matches!(ended, Some(Ended::Done(_)));
        let (mut body, (done, total, rate, eta)) = runner.report(self.utc_offset, ok);
        // The replication lag rides in `process_trace`, the free-text migration details
        // (ref. §5.4.8 request body, line 14359, at most 2048 characters); the reference has no field of
        // its own for it.
        if let Some(l) = self.cbt.lag() {
            if let Some(Value::String(t)) = body.get_mut("process_trace") {
                let add = format!("; replication lag {:.1} s", l.as_secs_f64());
                if t.len() + add.len() <= 2048 {
                    t.push_str(&add);
                }
            }
        }
        let sync = runner.subtask.starts_with("SYNC");
        let freeze = ended.as_ref().and_then(|_| runner.freeze_report());
        if ended.is_some() {
            self.activity = Activity::Idle;
        }
        if let Some(f) = freeze {
            if !f.within_window {
                tracing::error!(task_id = %task_id, pass = f.pass, window_secs = f.window_secs, "cutover: the frozen pass outlasted [transfer] freeze_window; the guard thawed the filesystems at its end, so the target is complete but not crash-consistent: SYNC again (it sends only what changed)");
                self.status.last_error = Some(format!(
                    "cutover pass {} outlasted the freeze window ({:.1} s): not crash-consistent; SYNC again",
                    f.pass, f.window_secs
                ));
            }
            self.status.last_freeze = Some(f);
        }
        self.last_report = Instant::now();
        self.status.bytes_done = done;
        self.status.bytes_total = total;
        self.status.rate = rate;
        self.status.eta_secs = eta;
        match ended {
            None | Some(Ended::Cancelled) => {
                if ended.is_some() {
                    self.cbt.pass_failed();
                }
                self.send_progress(&task_id, &body).await;
                let _ = self.publish();
            }
            Some(Ended::Done(sum)) => {
                self.cbt.pass_done(sum.chunks_resumed);
                self.record_pass_done(body).await;
                let _ = self.publish();
                tracing::info!(task_id = %task_id, sync, bytes_read = sum.bytes_read, wire = sum.wire_sent, "pass complete");
                self.upload_checks(&task_id, &sum).await;
                self.set_phase(Phase::Syncing);
                let _ = self.save();
                self.change_state(CopyState::Syncing, MigrationCycle::Syncing)
                    .await;
                self.schedule_sync();
            }
            Some(Ended::Failed(failure)) => {
                self.cbt.pass_failed();
                let _ = self.publish();
                self.pass_failed(&task_id, failure, attempt).await;
            }
        }
    }

    /// After a completed pass: a continuous-sync task waits `sync_interval` for its next sync
    /// pass, any other task for SYNC.
    pub(super) fn schedule_sync(&mut self) {
        let due = self.state.task.as_ref().is_some_and(|t| {
            t.continuous && t.pass_done && t.phase == Phase::Syncing && t.error.is_none()
        });
        if due && matches!(self.activity, Activity::Idle) {
            self.activity = Activity::SyncAt {
                at: Instant::now() + self.sync_interval,
            };
            self.set_activity(&format!(
                "pass complete; next sync in {} s",
                self.sync_interval.as_secs()
            ));
        } else if self.state.task.as_ref().is_some_and(|t| t.pass_done) {
            self.set_activity("pass complete; waiting for SYNC");
        }
    }

    /// The next pass of a continuous-sync task, unless the task no longer asks for it
    /// (`syncing` turned off, ref. §5.4.6 line 11779) or is being cut over. The reference does
    /// not enumerate the task's `state` (§5.4.5: "任务状态", free string); the cutover states
    /// checked are the copy states of §5.3.2 line 2756 (cutovering, finished), upper case.
    pub(super) async fn continue_sync(&mut self) {
        let Some(id) = self.state.task.as_ref().map(|t| t.id.clone()) else {
            self.activity = Activity::Idle;
            return;
        };
        let task: Task = match self.api.get(&format!("/v3/tasks/{id}"), &[]).await {
            Ok(t) => t,
            Err(e) => {
                // Try again at the next round.
                tracing::warn!(task_id = %id, error = %e, "cannot read the task for its next sync pass");
                return;
            }
        };
        let state = task.state.to_ascii_uppercase();
        let cutover = ["CUTOVERING", "CUTOVERED", "FINISHED"].contains(&state.as_str());
        if task.syncing != Some(true) || cutover {
            tracing::info!(task_id = %id, state = %task.state, syncing = ?task.syncing, "continuous sync ends");
            if let Some(t) = self.state.task.as_mut() {
                t.continuous = false;
            }
            self.activity = Activity::Idle;
            let _ = self.save();
            self.set_activity("pass complete; waiting for SYNC");
            return;
        }
        tracing::info!(task_id = %id, "continuous sync: next pass");
        // Not "SYNC": only the operator's SYNC makes a cutover pass.
        if let Err(f) = self.start("continuous SYNC", &id).await {
            tracing::error!(task_id = %id, code = %f.code, "continuous sync pass not started: {}", f.message);
        }
    }

    /// Reads the speed limits again when a minute has passed; keeps the old ones when SMS
    /// cannot be asked.
    async fn refresh_rules(&mut self, task_id: &str) {
        if self.last_rules.elapsed() < RULES_EVERY {
            return;
        }
        self.last_rules = Instant::now();
        if let Some(rules) = material::current_rules(&self.api, task_id).await {
            self.rules = rules;
        }
    }

    /// Records a completed pass with its final report, then sends the report. Recorded
    /// first: a kill after the report must not make the restarted daemon run the completed
    /// pass again, and a kill before it must not lose the report.
    async fn record_pass_done(&mut self, report: Value) {
        if let Some(t) = self.state.task.as_mut() {
            t.pass_done = true;
            t.final_report = Some(report);
        }
        self.set_phase(Phase::Syncing);
        let _ = self.save();
        self.send_final_report().await;
    }

    /// A failed pass starts again from its checkpoint after a wait when the failure is
    /// retryable and retries are left; otherwise the task fails.
    async fn pass_failed(&mut self, task_id: &str, failure: TaskFailure, attempt: u32) {
        let now = Instant::now();
        match Activity::after_failure(failure.clone(), attempt, now) {
            Activity::RetryAt { at, attempt: next } => {
                let wait = at.saturating_duration_since(now);
                tracing::warn!(task_id = %task_id, error_code = %failure.code, attempt = next, wait_secs = wait.as_secs(), "pass failed, starting it again from its checkpoint: {}", failure.message);
                self.status.last_error = Some(failure.to_string());
                self.activity = Activity::RetryAt { at, attempt: next };
                self.set_activity(&format!(
                    "retry {next} of {PASS_RETRIES} in {} s after {}",
                    wait.as_secs(),
                    failure.code
                ));
            }
            // `fail_task` logs it at ERROR and reports it.
            _ => {
                self.fail_task(failure).await;
            }
        }
    }

    /// Marks the task failed, logs it at ERROR, reports it to the service (the task's state
    /// and `error_json`, then the copy state ERROR), and gives the failure back for the result.
    pub(super) async fn fail_task(&mut self, failure: TaskFailure) -> TaskFailure {
        let task_id = self.state.task.as_ref().map(|t| t.id.clone());
        tracing::error!(task_id = task_id.as_deref().unwrap_or("-"), error_code = %failure.code, "task failed: {}", failure.message);
        if let Some(t) = self.state.task.as_mut() {
            t.error = Some(failure.to_string());
        }
        if let Some(id) = &task_id {
            self.report_task_failure(id, &failure).await;
        }
        self.set_phase(Phase::Failed);
        self.status.last_error = Some(failure.to_string());
        let _ = self.save();
        self.change_state(CopyState::Error, MigrationCycle::Replicating)
            .await;
        // A pass of another task may still run (START of a new task while one runs).
        if self.activity.runner().is_none() {
            self.activity = Activity::Failed {
                failure: failure.clone(),
            };
        }
        failure
    }
}
