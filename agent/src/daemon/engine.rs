//! A block or file pass running for the daemon on its own thread, and what the daemon reports
//! of it: the `PUT …/progress` body (rate over the last 5 s before compression, ETA,
//! compression, host and agent CPU, memory and disk I/O) and the speed limit in force.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use transfer::block::{BlockError, SendOptions, SourceDisk};
use transfer::file::{CheckOptions, DirCheck, FileError};
use transfer::meter::Meter;
use transfer::session::Connector;
use transfer::task::{Control, Progress};
use transfer::{Code, TaskFailure};

/// What a completed pass did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Source bytes read (block) or file bytes sent plain (file).
    pub bytes_read: u64,
    /// Bytes on the wire.
    pub wire_sent: u64,
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
    handle: Option<std::thread::JoinHandle<Ended>>,
    meter: Option<Meter>,
    last_done: u64,
    usage: Usage,
}

impl Runner {
    fn spawn(
        subtask: &'static str,
        pass: u32,
        run: impl FnOnce(&Progress, &Control, &Control) -> Ended + Send + 'static,
    ) -> Self {
        let progress = Arc::new(Progress::default());
        let control = Arc::new(Control::default());
        let check_control = Arc::new(Control::default());
        let (p, c, k) = (
            Arc::clone(&progress),
            Arc::clone(&control),
            Arc::clone(&check_control),
        );
        let handle = std::thread::spawn(move || run(&p, &c, &k));
        Self {
            progress,
            control,
            check_control,
            subtask,
            pass,
            handle: Some(handle),
            meter: None,
            last_done: 0,
            usage: Usage::default(),
        }
    }

    /// Starts block pass `opts.pass` of `disks` against `connector` on a new thread.
    pub fn start_block(connector: Connector, disks: Vec<SourceDisk>, opts: SendOptions) -> Self {
        let subtask = if opts.sync {
            "SYNC_LINUX_BLOCK"
        } else {
            "MIGRATE_LINUX_BLOCK"
        };
        Self::spawn(
            subtask,
            opts.pass,
            move |p, c, _| match transfer::block::send(&connector, &disks, &opts, p, c) {
                Ok(r) => Ended::Done(Summary {
                    bytes_read: r.bytes_read,
                    wire_sent: r.wire_sent,
                    ..Summary::default()
                }),
                Err(e) => e.into(),
            },
        )
    }

    /// Starts file pass `pass` on a new thread, then its consistency check.
    pub fn start_file(connector: Connector, pass: u32, job: FileJob) -> Self {
        let subtask = if job.send.sync {
            "SYNC_LINUX_FILE"
        } else {
            "MIGRATE_LINUX_FILE"
        };
        Self::spawn(subtask, pass, move |p, c, k| {
            p.total.store(job.used_bytes, Ordering::Relaxed);
            let r = match transfer::file::send(&connector, &job.send, p, c) {
                Ok(r) => r,
                Err(e) => return e.into(),
            };
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

/// One sample of host and agent resource use.
#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    total_cpu: f64,
    agent_cpu: f64,
    total_mem_mb: u64,
    agent_mem_mb: u64,
    total_io_mbs: f64,
    agent_io_mbs: f64,
}

/// CPU and I/O counters from /proc, differenced between samples.
#[derive(Debug, Default)]
struct Usage {
    last: Option<(Instant, u64, u64, u64, u64, u64)>,
}

fn proc_nums(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl Usage {
    fn sample(&mut self) -> Sample {
        let stat = proc_nums("/proc/stat");
        let cpu: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let busy: u64 = cpu
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3 && *i != 4)
            .map(|(_, v)| v)
            .sum();
        let all: u64 = cpu.iter().sum();
        let me = proc_nums("/proc/self/stat");
        let me_cpu: u64 = me
            .rsplit_once(')')
            .map(|(_, r)| {
                r.split_whitespace()
                    .skip(11)
                    .take(2)
                    .filter_map(|v| v.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0);
        let field = |text: &str, key: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        let meminfo = proc_nums("/proc/meminfo");
        let status = proc_nums("/proc/self/status");
        let io = proc_nums("/proc/self/io");
        let my_io = field(&io, "read_bytes:") + field(&io, "write_bytes:");
        let disk_io: u64 = proc_nums("/proc/diskstats")
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let name = f.get(2)?;
                // Whole disks only, so partitions are not counted twice.
                if name.starts_with("loop") || name.starts_with("ram") {
                    return None;
                }
                let r: u64 = f.get(5)?.parse().ok()?;
                let w: u64 = f.get(9)?.parse().ok()?;
                Some((r + w) * 512)
            })
            .sum();
        let now = Instant::now();
        let mut s = Sample {
            total_mem_mb: field(&meminfo, "MemTotal:")
                .saturating_sub(field(&meminfo, "MemAvailable:"))
                / 1024,
            agent_mem_mb: field(&status, "VmRSS:") / 1024,
            ..Sample::default()
        };
        #[allow(clippy::cast_precision_loss)]
        if let Some((t, b0, a0, m0, i0, d0)) = self.last {
            let secs = now.duration_since(t).as_secs_f64().max(1e-3);
            let dall = all.saturating_sub(a0).max(1) as f64;
            s.total_cpu = busy.saturating_sub(b0) as f64 / dall * 100.0;
            // Clock ticks of this process against the host's per-CPU ticks.
            let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            s.agent_cpu = me_cpu.saturating_sub(m0) as f64 / (dall / ncpu) * 100.0 / ncpu;
            s.agent_io_mbs = my_io.saturating_sub(i0) as f64 / secs / 1e6;
            s.total_io_mbs = disk_io.saturating_sub(d0) as f64 / secs / 1e6;
        }
        self.last = Some((now, busy, all, me_cpu, my_io, disk_io));
        s
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

/// Applies the rules in force now to the runner's bucket.
pub fn apply_limit(control: &Control, rules: &[transfer::limit::Rule], utc_offset: i64) {
    let rate = transfer::limit::limit_at(rules, local_minute(utc_offset));
    control.bucket.set_rate(rate);
}

/// How long the daemon waits between progress reports.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);

/// Marks the transfer and its check cancelled (STOP, DELETE, shutdown).
pub fn cancel(r: &Runner) {
    r.control.cancel.store(true, Ordering::SeqCst);
    r.check_control.cancel.store(true, Ordering::SeqCst);
}
