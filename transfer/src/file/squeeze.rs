//! Whether compressing file data pays right now: only while the link holds the data streams
//! back (they spend a good share of their time waiting to write) and the host has a core to
//! spare. On a fast link zstd costs more time than the bytes it saves, and on a busy host it
//! would take CPU from the very workload being migrated.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the decision is revisited.
const WINDOW: Duration = Duration::from_millis(500);
/// Share of the streams' time spent waiting for the link above which it is the bottleneck.
const LINK_BOUND: f64 = 0.3;
/// Idle cores (of the whole host) needed to afford compression.
const SPARE_CORES: f64 = 0.5;

/// The shared decision of one pass's data streams.
pub struct Squeeze {
    streams: u32,
    waited_ns: AtomicU64,
    on: AtomicBool,
    window: Mutex<Window>,
}

struct Window {
    at: Instant,
    waited_ns: u64,
    cpu: Option<(u64, u64)>,
}

impl Squeeze {
    /// A decision for `streams` streams; compression starts on (the probe keeps incompressible
    /// data cheap) until the first window tells otherwise.
    pub fn new(streams: u16) -> Self {
        Self {
            streams: u32::from(streams.max(1)),
            waited_ns: AtomicU64::new(0),
            on: AtomicBool::new(true),
            window: Mutex::new(Window {
                at: Instant::now(),
                waited_ns: 0,
                cpu: read_cpu(),
            }),
        }
    }

    /// A stream spent `d` handing data to the link (pacing under a speed limit included).
    pub fn waited(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.waited_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Whether to try compressing now.
    pub fn wanted(&self) -> bool {
        if let Ok(mut w) = self.window.try_lock() {
            let elapsed = w.at.elapsed();
            if elapsed >= WINDOW {
                let waited = self.waited_ns.load(Ordering::Relaxed);
                #[allow(clippy::cast_precision_loss)]
                let share = (waited - w.waited_ns) as f64
                    / (elapsed.as_nanos() as f64 * f64::from(self.streams));
                let cpu = read_cpu();
                let idle = match (w.cpu, cpu) {
                    (Some(a), Some(b)) => idle_cores(a, b, cores()),
                    _ => None,
                };
                let on = decide(share, idle);
                if on != self.on.swap(on, Ordering::Relaxed) {
                    tracing::debug!(on, link_share = share, idle_cores = ?idle, "file data compression");
                }
                *w = Window {
                    at: Instant::now(),
                    waited_ns: waited,
                    cpu,
                };
            }
        }
        self.on.load(Ordering::Relaxed)
    }
}

/// Compress when the link is the bottleneck and (where known) a core is idle.
fn decide(link_share: f64, idle_cores: Option<f64>) -> bool {
    link_share >= LINK_BOUND && idle_cores.is_none_or(|c| c >= SPARE_CORES)
}

fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1.0, |n| {
        #[allow(clippy::cast_precision_loss)]
        let n = n.get() as f64;
        n
    })
}

/// Idle cores between two `(idle, total)` readings of `/proc/stat`.
fn idle_cores(a: (u64, u64), b: (u64, u64), cores: f64) -> Option<f64> {
    let total = b.1.checked_sub(a.1).filter(|&t| t > 0)?;
    let idle = b.0.checked_sub(a.0)?;
    #[allow(clippy::cast_precision_loss)]
    let share = idle as f64 / total as f64;
    Some(share.min(1.0) * cores)
}

fn read_cpu() -> Option<(u64, u64)> {
    parse_cpu(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// `(idle + iowait, all)` jiffies of the aggregate `cpu` line of `/proc/stat`.
fn parse_cpu(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    if v.len() < 5 {
        return None;
    }
    // guest and guest_nice (9th, 10th) are already counted in user and nice.
    let total = v.iter().take(8).sum();
    Some((v[3] + v[4], total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compresses_only_for_a_slow_link_on_a_host_with_cpu_to_spare() {
        assert!(decide(0.9, Some(1.5)));
        assert!(decide(0.9, None), "unknown CPU: the link decides");
        assert!(!decide(0.9, Some(0.1)), "a busy host keeps its CPU");
        assert!(!decide(0.05, Some(2.0)), "a fast link gains nothing");
    }

    #[test]
    fn proc_stat_is_read_and_bad_input_is_none() {
        let s = "cpu  100 5 50 800 20 1 2 3 7 0\ncpu0 50 2 25 400 10 0 1 1 0 0\n";
        assert_eq!(parse_cpu(s), Some((820, 981)));
        assert_eq!(parse_cpu("cpu  1 2 x 4 5"), None);
        assert_eq!(parse_cpu("cpu  1 2 3"), None);
        assert_eq!(parse_cpu("intr 5"), None);
        assert_eq!(idle_cores((800, 1000), (900, 1200), 2.0), Some(1.0));
        assert_eq!(idle_cores((800, 1000), (800, 1000), 2.0), None);
        assert!(read_cpu().is_some());
    }

    #[test]
    fn a_stream_that_waits_turns_it_on_and_one_that_does_not_turns_it_off() {
        let s = Squeeze::new(1);
        assert!(s.wanted(), "on until measured");
        std::thread::sleep(WINDOW);
        // Never waited: the link is not the bottleneck.
        assert!(!s.wanted());
        s.waited(WINDOW * 2);
        // With the host's CPU unknown, waiting the whole window turns it on.
        s.window.lock().unwrap().cpu = None;
        std::thread::sleep(WINDOW);
        assert!(s.wanted());
    }
}
