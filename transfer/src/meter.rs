//! Progress metering: bytes done of a total, the rate over the last five seconds (what SMS
//! reports as `migrate_speed`, measured before compression), and the time left at that rate.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Window over which the rate is measured (docs/sms-api.md §6: "the last 5 s").
pub const WINDOW: Duration = Duration::from_secs(5);

/// Tracks one transfer's progress.
#[derive(Debug)]
pub struct Meter {
    total: u64,
    done: u64,
    samples: VecDeque<(Instant, u64)>,
}

impl Meter {
    /// A meter for `total` bytes, `done` of which were already done (a resumed transfer).
    pub fn new(total: u64, done: u64, now: Instant) -> Self {
        let mut samples = VecDeque::new();
        samples.push_back((now, done));
        Self {
            total,
            done,
            samples,
        }
    }

    /// Records `bytes` more done at `now`.
    pub fn add(&mut self, bytes: u64, now: Instant) {
        self.done = self
            .done
            .saturating_add(bytes)
            .min(self.total.max(self.done));
        self.samples.push_back((now, self.done));
        // Keep one sample older than the window so the rate spans all of it.
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Bytes done.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// 0–100, as the progress report wants it.
    pub fn percent(&self) -> u32 {
        if self.total == 0 {
            return 100;
        }
        u32::try_from(u128::from(self.done) * 100 / u128::from(self.total)).unwrap_or(100)
    }

    /// Bytes per second over the last [`WINDOW`] at `now` (over the meter's life when it is
    /// younger than that).
    pub fn rate(&self, now: Instant) -> f64 {
        let base = now
            .checked_sub(WINDOW)
            .and_then(|cutoff| self.samples.iter().rev().find(|(t, _)| *t <= cutoff))
            .map(|&(_, d)| (d, WINDOW.as_secs_f64()));
        let (d0, secs) = match base {
            Some(b) => b,
            None => match self.samples.front() {
                Some(&(t0, d0)) => (d0, now.saturating_duration_since(t0).as_secs_f64()),
                None => return 0.0,
            },
        };
        if secs <= 0.0 {
            return 0.0;
        }
        #[allow(clippy::cast_precision_loss)]
        let r = self.done.saturating_sub(d0) as f64 / secs;
        r
    }

    /// Seconds left at the current rate, `None` when nothing is moving.
    pub fn eta(&self, now: Instant) -> Option<u64> {
        let r = self.rate(now);
        if r <= 0.0 {
            return None;
        }
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let s = (self.total.saturating_sub(self.done) as f64 / r).ceil() as u64;
        Some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_covers_the_last_five_seconds() {
        let t = Instant::now();
        let mut m = Meter::new(1_000_000_000, 100_000_000, t);
        assert_eq!(m.percent(), 10);
        // 10 MB/s for 10 s, then 1 MB/s for 10 s.
        for s in 1..=10u64 {
            m.add(10_000_000, t + Duration::from_secs(s));
        }
        let now = t + Duration::from_secs(10);
        assert!((m.rate(now) - 10_000_000.0).abs() < 1.0, "{}", m.rate(now));
        for s in 11..=20u64 {
            m.add(1_000_000, t + Duration::from_secs(s));
        }
        let now = t + Duration::from_secs(20);
        assert!((m.rate(now) - 1_000_000.0).abs() < 1.0, "{}", m.rate(now));
        assert_eq!(m.done(), 210_000_000);
        assert_eq!(m.eta(now), Some(790));
        assert_eq!(m.percent(), 21);
        // Stalled: no rate, no ETA.
        assert_eq!(m.eta(now + Duration::from_secs(60)), None);
    }

    #[test]
    fn never_past_the_total() {
        let t = Instant::now();
        let mut m = Meter::new(10, 0, t);
        m.add(100, t + Duration::from_secs(1));
        assert_eq!((m.done(), m.percent()), (10, 100));
        assert_eq!(Meter::new(0, 0, t).percent(), 100);
    }
}
