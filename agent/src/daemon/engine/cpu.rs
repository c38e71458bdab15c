//! The task setting `LINUX_CPU_LIMIT` (ref. §5.10.1, example at line 23196: "配置任务是
//! LINUX_CPU_LIMIT，限制值是50"): the agent's share of CPU while a pass runs.
//!
//! The reference gives only the example value 50, not its unit. The agent reads it as a
//! percentage of one CPU, the unit of cgroup v2 `cpu.max` (quota per period) and of `top`;
//! this is an assumption, noted in README.
//!
//! Enforced through cgroup v2 `cpu.max` of the agent's own cgroup when that file can be
//! written (systemd's delegated service cgroup, or root on a unified hierarchy); otherwise by
//! pacing: a thread measures the process's CPU time every [`WINDOW`] and lowers (or raises
//! again) a byte-rate cap that the pass's token bucket obeys next to the speed limits, so the
//! transfer threads sleep instead of spending CPU.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use transfer::task::{Control, Progress};

/// How often the pacer measures and adjusts.
pub const WINDOW: Duration = Duration::from_millis(250);
/// The cap never goes under this (bytes/s), so a pass always moves.
const FLOOR: u64 = 64 << 10;
/// The `cpu.max` period in µs.
const PERIOD_US: u64 = 100_000;

/// The byte-rate caps a pass's bucket obeys: the speed limit (rules and the task's own
/// `speed_limit`) and the CPU pacer's; 0 means none. The bucket gets the lower.
#[derive(Debug, Default)]
pub struct Caps {
    /// From the speed limits.
    pub speed: AtomicU64,
    /// From the CPU pacer.
    pub cpu: AtomicU64,
}

impl Caps {
    /// Sets the bucket's rate to the lower cap in force.
    pub fn apply(&self, control: &Control) {
        let rate = [&self.speed, &self.cpu]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .filter(|r| *r > 0)
            .min();
        control.bucket.set_rate(rate);
    }
}

/// Reads `LINUX_CPU_LIMIT`: 1..=100 (a number or a string of digits).
pub fn parse(v: &serde_json::Value) -> Result<u32, String> {
    let n = match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().trim_end_matches('%').parse().ok(),
        _ => None,
    };
    match n.and_then(|n| u32::try_from(n).ok()) {
        Some(n @ 1..=100) => Ok(n),
        _ => Err(format!(
            "LINUX_CPU_LIMIT {v} is not a percentage of 1 to 100"
        )),
    }
}

/// How a limit is enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforcement {
    /// Written to this `cpu.max`.
    Cgroup(PathBuf),
    /// By the pacer.
    Pacing,
}

/// The `cpu.max` of this process's cgroup on a unified (v2) hierarchy, if there is one.
fn own_cpu_max() -> Option<PathBuf> {
    let root = PathBuf::from("/sys/fs/cgroup");
    if !root.join("cgroup.controllers").exists() {
        return None; // v1 or hybrid: no cpu.max
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let file = root.join(rel.trim_start_matches('/')).join("cpu.max");
    file.exists().then_some(file)
}

/// Sets the limit through `cpu.max` when it can be written, else the caller paces. Without a
/// limit nothing is written: `cpu.max` may hold the administrator's own quota (systemd
/// `CPUQuota=`), so a quota this agent wrote stays until the service restarts.
pub fn enforce(limit: Option<u32>) -> Enforcement {
    let (Some(p), Some(file)) = (limit, own_cpu_max()) else {
        return Enforcement::Pacing;
    };
    let value = format!("{} {PERIOD_US}", u64::from(p) * PERIOD_US / 100);
    match std::fs::write(&file, value) {
        Ok(()) => Enforcement::Cgroup(file),
        Err(e) => {
            tracing::debug!(file = %file.display(), error = %e, "cpu.max not writable; pacing");
            Enforcement::Pacing
        }
    }
}

/// Starts the pacer of a pass: it runs until `stop` is set, keeping the process's CPU use
/// at or under `percent` of one CPU by capping the byte rate.
pub fn spawn_pacer(
    percent: u32,
    progress: Arc<Progress>,
    control: Arc<Control>,
    caps: Arc<Caps>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("cpu-pacer".into())
        .spawn(move || {
            let target = f64::from(percent) / 100.0;
            let mut last_cpu = transfer::sched::process_cpu_time().unwrap_or_default();
            let mut last_done = Progress::get(&progress.done);
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(WINDOW);
                let now = Instant::now();
                let Ok(cpu) = transfer::sched::process_cpu_time() else {
                    continue;
                };
                let done = Progress::get(&progress.done);
                let wall = now.duration_since(last).as_secs_f64();
                if wall <= 0.0 {
                    continue;
                }
                let share = cpu.saturating_sub(last_cpu).as_secs_f64() / wall;
                let rate = done.saturating_sub(last_done) as f64 / wall;
                (last_cpu, last_done, last) = (cpu, done, now);
                let cap = caps.cpu.load(Ordering::Relaxed);
                let next = next_cap(cap, share, rate, target);
                if next != cap {
                    caps.cpu.store(next, Ordering::Relaxed);
                    caps.apply(&control);
                }
            }
            caps.cpu.store(0, Ordering::Relaxed);
            caps.apply(&control);
        })
}

/// The next cap (bytes/s, 0: none) after a window that used `share` of a CPU moving `rate`
/// bytes/s under `cap`, for a `target` share.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss,
    reason = "byte rates: non-negative and far below 2^52"
)]
pub fn next_cap(cap: u64, share: f64, rate: f64, target: f64) -> u64 {
    if share > target && rate > 0.0 {
        // CPU per byte is about constant: scale the rate to the target, with 10 % margin
        // for the daemon's own work.
        let want = rate * target / share * 0.9;
        let want = want as u64;
        let lowered = if cap == 0 { want } else { want.min(cap) };
        lowered.max(FLOOR)
    } else if cap > 0 && share < target * 0.8 {
        // Room left: raise the cap by a quarter; lift it once it is far above the rate.
        let raised = cap.saturating_add(cap / 4);
        if rate > 0.0 && raised as f64 > rate * 8.0 {
            0
        } else {
            raised
        }
    } else {
        cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_setting_is_a_percentage() {
        assert_eq!(parse(&json!(50)), Ok(50));
        assert_eq!(parse(&json!("50")), Ok(50));
        assert_eq!(parse(&json!("30%")), Ok(30));
        assert!(parse(&json!(0)).is_err());
        assert!(parse(&json!(101)).is_err());
        assert!(parse(&json!("half")).is_err());
    }

    #[test]
    fn the_cap_falls_with_too_much_cpu_and_rises_with_room() {
        // 100 % of a CPU at 100 MB/s, target 50 %: about 45 MB/s.
        let c = next_cap(0, 1.0, 100e6, 0.5);
        assert_eq!(c, 45_000_000);
        // Under target by far: a quarter more.
        assert_eq!(next_cap(c, 0.2, 20e6, 0.5), c + c / 4);
        // Near the target: kept.
        assert_eq!(next_cap(c, 0.45, 40e6, 0.5), c);
        // Never under the floor.
        assert_eq!(next_cap(0, 10.0, 1000.0, 0.5), FLOOR);
    }

    #[test]
    fn the_bucket_gets_the_lower_cap() {
        let control = Control::default();
        let caps = Caps::default();
        caps.speed.store(1000, Ordering::Relaxed);
        caps.cpu.store(500, Ordering::Relaxed);
        caps.apply(&control);
        assert_eq!(control.bucket.rate(), Some(500));
        caps.cpu.store(0, Ordering::Relaxed);
        caps.apply(&control);
        assert_eq!(control.bucket.rate(), Some(1000));
    }
}
