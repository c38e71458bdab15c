//! What a running transfer shares with whoever watches and steers it (the daemon's progress
//! reporter, `sms-agent status`, the terminal progress bar): counters updated by the engine's
//! threads, a cancel flag, and the speed-limit bucket all streams draw from.

use crate::lock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::limit::Bucket;

/// Counters of one pass; all in bytes unless said otherwise.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes the pass has to cover (allocated bytes for block mode, used bytes for file mode).
    pub total: AtomicU64,
    /// Bytes covered so far, resumed ones included.
    pub done: AtomicU64,
    /// Plain (uncompressed) data bytes sent.
    pub plain_sent: AtomicU64,
    /// Bytes put on the wire for data (after compression).
    pub wire_sent: AtomicU64,
    /// Bytes the target has made durable.
    pub durable: AtomicU64,
    /// Things worth telling the operator (changed-while-read files, re-sent chunks), for
    /// `process_trace`.
    pub notes: Mutex<Vec<String>>,
}

impl Progress {
    /// Adds to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Records a note (kept to the most recent 50).
    pub fn note(&self, s: impl Into<String>) {
        let mut n = lock(&self.notes);
        if n.len() >= 50 {
            n.remove(0);
        }
        n.push(s.into());
    }

    /// Plain bytes per wire byte (1.0 before anything was sent).
    pub fn compress_ratio(&self) -> f64 {
        let (p, w) = (Self::get(&self.plain_sent), Self::get(&self.wire_sent));
        if w == 0 {
            return 1.0;
        }
        #[allow(clippy::cast_precision_loss)]
        let r = p as f64 / w as f64;
        r
    }
}

/// Steering of a running transfer.
#[derive(Debug)]
pub struct Control {
    /// Set to stop at the next checkpoint (STOP, DELETE, SIGTERM).
    pub cancel: AtomicBool,
    /// Shared by all streams; its rate may change while running.
    pub bucket: Bucket,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            cancel: AtomicBool::new(false),
            bucket: Bucket::new(None),
        }
    }
}

impl Control {
    /// Whether the transfer should stop.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Waits until `bytes` may be sent under the speed limit (or the transfer is cancelled).
    pub fn pace(&self, bytes: u64) {
        let wait = self.bucket.take_at(bytes, std::time::Instant::now());
        if !wait.is_zero() {
            // Sleep in slices so a cancel is seen promptly even at a very low limit.
            let until = std::time::Instant::now() + wait;
            while !self.cancelled() {
                let left = until.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::sleep(left.min(std::time::Duration::from_millis(100)));
            }
        }
    }
}
