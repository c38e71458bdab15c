//! A block or file pass running for the daemon on its own thread, and what the daemon reports
//! of it: the `PUT …/progress` body (rate over the last 5 s before compression, ETA,
//! compression, host and agent CPU, memory and disk I/O) and the speed limit in force.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use transfer::block::{BlockError, SendOptions, SourceDisk};
use transfer::file::{CheckOptions, DirCheck, FileError};
use transfer::meter::Meter;
use transfer::session::Connector;
use transfer::task::{Control, Progress};
use transfer::{Code, TaskFailure};

pub mod cpu;
mod usage;
use usage::Usage;

use super::state::FreezeReport;
use crate::freeze::Frozen;

/// Filesystems frozen for a cutover pass, handed to the pass's thread, which thaws them as
/// soon as the send ends however it ends (a panic drops them: [`Frozen`] thaws on drop; a
/// dead daemon leaves it to the thaw guard).
pub struct Cutover {
    /// The freeze.
    pub frozen: Frozen,
    /// When it began.
    pub at: Instant,
    /// What is frozen.
    pub mounts: Vec<PathBuf>,
}

/// How the threads of a pass are scheduled.
#[derive(Debug, Clone, Copy)]
pub struct Sched {
    /// CPU and I/O priority of the pass's threads (the task's `priority`).
    pub priority: transfer::sched::Priority,
    /// `LINUX_CPU_LIMIT` to pace to (`None`: no limit, or `cpu.max` enforces it).
    pub pace_cpu: Option<u32>,
}

/// What a completed pass did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Source bytes read (block) or file bytes sent plain (file).
    pub bytes_read: u64,
    /// Bytes on the wire.
    pub wire_sent: u64,
    /// Chunks sent by an earlier session of the pass (block).
    pub chunks_resumed: u64,
    /// Consistency-check results to upload (file mode with `CONSISTENCY_DIR`).
    pub checks: Vec<DirCheck>,
    /// Why the consistency check did not run to the end (SKIP, or an error with its code).
    pub check_note: Option<String>,
}

/// How a pass ended.
#[derive(Debug)]
pub enum Ended {
    /// Every byte acknowledged durable.
    Done(Summary),
    /// Stopped at a checkpoint (STOP, DELETE, shutdown).
    Cancelled,
    /// Failed with an SMS code.
    Failed(TaskFailure),
}

impl From<BlockError> for Ended {
    fn from(e: BlockError) -> Self {
        match e {
            BlockError::Cancelled => Ended::Cancelled,
            e => Ended::Failed(TaskFailure::new(e.code(), e.to_string())),
        }
    }
}

impl From<FileError> for Ended {
    fn from(e: FileError) -> Self {
        match e {
            FileError::Cancelled => Ended::Cancelled,
            e => Ended::Failed(TaskFailure::new(e.code(), e.to_string())),
        }
    }
}

/// A file pass and the consistency check to run after it.
pub struct FileJob {
    /// The pass.
    pub send: transfer::file::SendOptions,
    /// The check (`None`: no `CONSISTENCY_DIR`).
    pub check: Option<CheckOptions>,
    /// Used bytes of the migrated filesystems: the progress total until the walk knows better.
    pub used_bytes: u64,
    /// The change journal whose take this pass covers, told when the pass completes.
    pub journal: Option<Arc<transfer::file::journal::Journal>>,
}

/// A pass in flight.
pub struct Runner {
    /// Counters the engine updates.
    pub progress: Arc<Progress>,
    /// Cancel flag and speed-limit bucket.
    pub control: Arc<Control>,
    /// Cancel flag of the consistency check (SKIP sets it, and so does STOP).
    pub check_control: Arc<Control>,
    /// `MIGRATE_LINUX_BLOCK`, `SYNC_LINUX_BLOCK`, `MIGRATE_LINUX_FILE` or `SYNC_LINUX_FILE`.
    pub subtask: &'static str,
    /// Pass number.
    pub pass: u32,
    /// Byte-rate caps (speed limits, CPU pacer) the bucket obeys.
    pub caps: Arc<cpu::Caps>,
    /// The freeze window of a cutover pass, once its thread has thawed.
    pub freeze: Arc<Mutex<Option<FreezeReport>>>,
    pacer_stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Ended>>,
    meter: Option<Meter>,
    last_done: u64,
    usage: Usage,
}

impl Runner {
    fn spawn(
        subtask: &'static str,
        pass: u32,
        sched: Sched,
        run: impl FnOnce(&Progress, &Control, &Control) -> Ended + Send + 'static,
    ) -> Self {
        let progress = Arc::new(Progress::default());
        let control = Arc::new(Control::default());
        let check_control = Arc::new(Control::default());
        let caps = Arc::new(cpu::Caps::default());
        let pacer_stop = Arc::new(AtomicBool::new(false));
        let (p, c, k) = (
            Arc::clone(&progress),
            Arc::clone(&control),
            Arc::clone(&check_control),
        );
        let handle = std::thread::spawn(move || {
            // The stream threads this one starts inherit the nice value and I/O priority.
            if let Err(e) = transfer::sched::apply_to_current_thread(sched.priority) {
                tracing::warn!(priority = ?sched.priority, error = %e, "cannot set the priority of the transfer threads");
            }
            run(&p, &c, &k)
        });
        if let Some(percent) = sched.pace_cpu {
            let started = cpu::spawn_pacer(
                percent,
                Arc::clone(&progress),
                Arc::clone(&control),
                Arc::clone(&caps),
                Arc::clone(&pacer_stop),
            );
            if let Err(e) = started {
                tracing::warn!(error = %e, "cannot start the CPU pacer; LINUX_CPU_LIMIT not enforced");
            }
        }
        Self {
            progress,
            control,
            check_control,
            subtask,
            pass,
            caps,
            freeze: Arc::default(),
            pacer_stop,
            handle: Some(handle),
            meter: None,
            last_done: 0,
            usage: Usage::new(),
        }
    }

    /// Starts block pass `opts.pass` of `disks` against `connector` on a new thread; with
    /// `cutover`, the thread thaws the filesystems as soon as the send ends.
    pub fn start_block(
        connector: Connector,
        disks: Vec<SourceDisk>,
        opts: SendOptions,
        sched: Sched,
        cutover: Option<Cutover>,
    ) -> Self {
        let subtask = if opts.sync {
            "SYNC_LINUX_BLOCK"
        } else {
            "MIGRATE_LINUX_BLOCK"
        };
        let slot: Arc<Mutex<Option<FreezeReport>>> = Arc::default();
        let report = Arc::clone(&slot);
        let pass = opts.pass;
        let mut runner = Self::spawn(subtask, pass, sched, move |p, c, _| {
            if let Some(cut) = &cutover {
                p.note(format!(
                    "cutover: frozen {}",
                    cut.mounts
                        .iter()
                        .map(|m| m.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            let r = transfer::block::send(&connector, &disks, &opts, p, c);
            if let Some(cut) = cutover {
                let within = cut.frozen.thaw();
                let secs = cut.at.elapsed().as_secs_f64();
                let completed = r.is_ok();
                tracing::info!(
                    pass,
                    window_secs = secs,
                    within_window = within,
                    completed,
                    "cutover: filesystems thawed after {secs:.3} s frozen"
                );
                p.note(if within {
                    format!("cutover: thawed after {secs:.3} s")
                } else {
                    format!("cutover: frozen {secs:.3} s, past the window; the guard thawed at its end, so this pass is not crash-consistent")
                });
                let mounts = cut.mounts.iter().map(|m| m.display().to_string()).collect();
                if let Ok(mut s) = report.lock() {
                    *s = Some(FreezeReport {
                        pass,
                        mounts,
                        window_secs: secs,
                        within_window: within,
                        completed,
                    });
                }
            }
            match r {
                Ok(r) => Ended::Done(Summary {
                    bytes_read: r.bytes_read,
                    wire_sent: r.wire_sent,
                    chunks_resumed: r.chunks_resumed,
                    ..Summary::default()
                }),
                Err(e) => e.into(),
            }
        });
        runner.freeze = slot;
        runner
    }

    /// The freeze window of this pass, once thawed (cutover passes only).
    pub fn freeze_report(&self) -> Option<FreezeReport> {
        self.freeze.lock().ok().and_then(|s| s.clone())
    }

    /// Starts file pass `pass` on a new thread, then its consistency check.
    pub fn start_file(connector: Connector, pass: u32, job: FileJob, sched: Sched) -> Self {
        let subtask = if job.send.sync {
            "SYNC_LINUX_FILE"
        } else {
            "MIGRATE_LINUX_FILE"
        };
        Self::spawn(subtask, pass, sched, move |p, c, k| {
            p.total.store(job.used_bytes, Ordering::Relaxed);
            let r = match transfer::file::send(&connector, &job.send, p, c) {
                Ok(r) => r,
                Err(e) => return e.into(),
            };
            if let Some(j) = &job.journal {
                j.completed();
            }
            let mut sum = Summary {
                bytes_read: r.bytes_plain,
                wire_sent: r.bytes_sent,
                ..Summary::default()
            };
            if let Some(check) = job.check.filter(|_| !k.cancelled()) {
                p.note("consistency check running");
                let quiet = Progress::default();
                match transfer::file::consistency(&connector, &check, &quiet, k) {
                    Ok(v) if !k.cancelled() => sum.checks = v,
                    Ok(_) | Err(FileError::Cancelled) => {
                        sum.check_note = Some("consistency check skipped".into());
                    }
                    Err(e) => {
                        sum.check_note = Some(format!(
                            "{}: consistency check failed: {e}",
                            Code::ConsistencyCheckFailed
                        ));
                    }
                }
            } else if k.cancelled() {
                sum.check_note = Some("consistency check skipped".into());
            }
            if c.cancelled() {
                return Ended::Cancelled;
            }
            Ended::Done(sum)
        })
    }

    /// Whether the pass has ended.
    pub fn finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Waits for the pass and returns how it ended.
    pub fn join(&mut self) -> Ended {
        self.pacer_stop.store(true, Ordering::Relaxed);
        match self.handle.take().map(std::thread::JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => Ended::Failed(TaskFailure::new(
                Code::TransmissionFailed,
                "the transfer thread failed",
            )),
        }
    }

    /// The progress body, and (done, total, rate B/s, ETA) for `status`.
    pub fn report(
        &mut self,
        utc_offset: i64,
        final_100: bool,
    ) -> (Value, (u64, u64, f64, Option<u64>)) {
        let now = Instant::now();
        let p = &self.progress;
        let (done, total) = (Progress::get(&p.done), Progress::get(&p.total));
        let m = self
            .meter
            .get_or_insert_with(|| Meter::new(total, done, now));
        m.add(done.saturating_sub(self.last_done), now);
        self.last_done = done;
        let rate = m.rate(now);
        let eta = m.eta(now);
        let percent = if final_100 {
            100
        } else {
            // 100 means finished to the service: hold at 99 until the pass is acked.
            m.percent().min(99)
        };
        let notes = p.notes.lock().map(|n| n.join("; ")).unwrap_or_default();
        let trace: String = format!(
            "pass {}: {done} of {total} bytes, {} durable; {notes}",
            self.pass,
            Progress::get(&p.durable)
        )
        .chars()
        .take(2048)
        .collect();
        let u = self.usage.sample();
        let body = json!({
            "subtask_name": self.subtask,
            "progress": percent,
            "replicatesize": done,
            "totalsize": total,
            "process_trace": trace,
            "migrate_speed": rate * 8.0 / 1e6,
            "compress_rate": p.compress_ratio(),
            "remain_time": eta.unwrap_or(0),
            "total_cpu_usage": u.total_cpu,
            "agent_cpu_usage": u.agent_cpu,
            "total_mem_usage": u.total_mem_mb,
            "agent_mem_usage": u.agent_mem_mb,
            "total_disk_io": u.total_io_mbs,
            "agent_disk_io": u.agent_io_mbs,
            "agent_time": crate::api::time::agent_time(SystemTime::now(), utc_offset),
        });
        (body, (done, total, rate, eta))
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        // The pacer ends with its pass, however the pass ends.
        self.pacer_stop.store(true, Ordering::Relaxed);
    }
}

/// The local time zone's offset from UTC in seconds (`date +%z`; 0 when unknown).
pub fn utc_offset() -> i64 {
    let out = std::process::Command::new("date").arg("+%z").output();
    let s = out
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let (sign, rest) = match s.split_at_checked(1) {
        Some(("-", r)) => (-1, r),
        Some(("+", r)) => (1, r),
        _ => return 0,
    };
    let h: i64 = rest.get(..2).and_then(|v| v.parse().ok()).unwrap_or(0);
    let m: i64 = rest.get(2..4).and_then(|v| v.parse().ok()).unwrap_or(0);
    sign * (h * 3600 + m * 60)
}

/// Minutes after local midnight now.
pub fn local_minute(utc_offset: i64) -> u16 {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let local = i64::try_from(secs).unwrap_or(0) + utc_offset;
    u16::try_from(local.rem_euclid(86_400) / 60).unwrap_or(0)
}

/// Applies the speed limit in force now to the runner's bucket: the lowest of the rules in
/// force and the task's own `speed_limit` (Mbit/s, ref. §5.4.5 line 11253, §5.4.6 line 11823
/// "限制迁移速率, 单位: Mbps"; 0: none). Keeping under it also keeps the 5-second averages
/// the service compares with `over_speed_threshold` (ref. §5.4.9 line 14673) under it: the
/// bucket's burst is a tenth of a second of the rate.
pub fn apply_limit(r: &Runner, rules: &[transfer::limit::Rule], task_mbit: u64, utc_offset: i64) {
    let task = (task_mbit > 0).then(|| task_mbit.saturating_mul(1_000_000) / 8);
    let rate = [
        transfer::limit::limit_at(rules, local_minute(utc_offset)),
        task,
    ]
    .into_iter()
    .flatten()
    .min();
    r.caps.speed.store(rate.unwrap_or(0), Ordering::Relaxed);
    r.caps.apply(&r.control);
}

/// How long the daemon waits between progress reports.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);

/// Marks the transfer and its check cancelled (STOP, DELETE, shutdown).
pub fn cancel(r: &Runner) {
    r.pacer_stop.store(true, Ordering::Relaxed);
    r.control.cancel.store(true, Ordering::SeqCst);
    r.check_control.cancel.store(true, Ordering::SeqCst);
}
