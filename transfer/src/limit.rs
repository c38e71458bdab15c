//! Speed limits: the task's time-windowed rules (`GET …/speed-limit`, docs/sms-api.md §8) and a
//! token bucket shared by all data streams that keeps the rate under the rule in force. The
//! rules can be replaced while a transfer runs; the bucket picks the new rate up on its next
//! refill.

use crate::lock;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One rule: `speed` Mbit/s between `start` and `end` (minutes after local midnight; a window
/// with `end <= start` wraps past midnight). Speed 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Start, minutes after midnight.
    pub start: u16,
    /// End, minutes after midnight (exclusive).
    pub end: u16,
    /// Mbit/s; 0 = no limit.
    pub speed_mbit: u64,
}

/// A rule that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("speed-limit time {0:?} is not H:MM or HH:MM")]
pub struct BadTime(pub String);

/// Parses `H:MM` or `HH:MM` (`24:00` is the end of the day).
pub fn parse_hhmm(s: &str) -> Result<u16, BadTime> {
    let bad = || BadTime(s.to_string());
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m > 59 || h > 24 || (h == 24 && m != 0) || s.trim().len() > 5 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

impl Rule {
    /// A rule from the API's strings.
    pub fn new(start: &str, end: &str, speed_mbit: u64) -> Result<Self, BadTime> {
        Ok(Self {
            start: parse_hhmm(start)?,
            end: parse_hhmm(end)?,
            speed_mbit,
        })
    }

    fn covers(&self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            // Wraps midnight (22:00–06:00), or covers the whole day when start == end.
            minute >= self.start || minute < self.end
        }
    }
}

/// The limit in bytes per second at `minute` after local midnight: the lowest non-zero speed of
/// the rules covering it (being under every applicable rule keeps the task from being stopped by
/// the service's over-speed check), or `None` for no limit.
pub fn limit_at(rules: &[Rule], minute: u16) -> Option<u64> {
    rules
        .iter()
        .filter(|r| r.speed_mbit > 0 && r.covers(minute))
        .map(|r| r.speed_mbit.saturating_mul(1_000_000) / 8)
        .min()
}

/// A token bucket shared by all streams of a task.
#[derive(Debug)]
pub struct Bucket {
    inner: Mutex<State>,
}

#[derive(Debug)]
struct State {
    rate: Option<u64>,
    tokens: f64,
    last: Instant,
}

/// Burst allowance: a tenth of a second of the rate, so a limit holds over any window longer
/// than that while single large chunks still pass.
const BURST_SECS: f64 = 0.1;

impl Bucket {
    /// A bucket at `rate` bytes/s (`None`: unlimited).
    pub fn new(rate: Option<u64>) -> Self {
        Self {
            inner: Mutex::new(State {
                rate,
                tokens: 0.0,
                last: Instant::now(),
            }),
        }
    }

    /// The rate in force (bytes/s; `None`: unlimited).
    pub fn rate(&self) -> Option<u64> {
        lock(&self.inner).rate
    }

    /// Changes the rate (rules re-read while running).
    pub fn set_rate(&self, rate: Option<u64>) {
        let mut s = lock(&self.inner);
        s.rate = rate;
    }

    /// Takes `bytes` from the bucket at `now`; returns how long the caller must wait before
    /// sending them (zero when it may send at once).
    pub fn take_at(&self, bytes: u64, now: Instant) -> Duration {
        let mut s = lock(&self.inner);
        let Some(rate) = s.rate.filter(|r| *r > 0) else {
            s.last = now;
            return Duration::ZERO;
        };
        #[allow(clippy::cast_precision_loss)]
        let rate = rate as f64;
        let elapsed = now.saturating_duration_since(s.last).as_secs_f64();
        s.last = now;
        s.tokens = (s.tokens + elapsed * rate).min(rate * BURST_SECS);
        #[allow(clippy::cast_precision_loss)]
        let need = bytes as f64;
        s.tokens -= need;
        if s.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.tokens / rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse() {
        assert_eq!(parse_hhmm("0:00"), Ok(0));
        assert_eq!(parse_hhmm("08:30"), Ok(510));
        assert_eq!(parse_hhmm("24:00"), Ok(1440));
        for bad in ["24:01", "8", "08:60", "-1:00", "aa:bb", "008:00"] {
            assert!(parse_hhmm(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn windows_and_overlaps() {
        let rules = [
            Rule::new("08:00", "18:00", 100).unwrap(),
            Rule::new("12:00", "13:00", 20).unwrap(),
            Rule::new("22:00", "06:00", 0).unwrap(),
            Rule::new("23:00", "01:00", 50).unwrap(),
        ];
        assert_eq!(limit_at(&rules, 7 * 60), None);
        assert_eq!(limit_at(&rules, 9 * 60), Some(12_500_000));
        assert_eq!(limit_at(&rules, 12 * 60 + 30), Some(2_500_000));
        assert_eq!(limit_at(&rules, 18 * 60), None, "end is exclusive");
        assert_eq!(limit_at(&rules, 23 * 60 + 30), Some(6_250_000));
        assert_eq!(limit_at(&rules, 30), Some(6_250_000), "wraps past midnight");
        assert_eq!(
            limit_at(&[Rule::new("0:00", "0:00", 8).unwrap()], 700),
            Some(1_000_000)
        );
    }

    #[test]
    fn bucket_holds_the_rate_over_time() {
        // 10 MB/s; send 1 MB chunks as fast as allowed for a simulated 10 s.
        let b = Bucket::new(Some(10_000_000));
        let start = Instant::now();
        let mut now = start;
        let mut sent = 0u64;
        while now.duration_since(start) < Duration::from_secs(10) {
            let wait = b.take_at(1_000_000, now);
            now += wait;
            sent += 1_000_000;
        }
        let secs = now.duration_since(start).as_secs_f64();
        #[allow(clippy::cast_precision_loss)]
        let rate = sent as f64 / secs;
        assert!((9_500_000.0..=10_600_000.0).contains(&rate), "{rate}");
        // Raised live; unlimited means no waiting at all.
        b.set_rate(None);
        assert_eq!(b.take_at(u64::MAX / 2, now), Duration::ZERO);
        b.set_rate(Some(1_000_000));
        let w = b.take_at(2_000_000, now + Duration::from_secs(5));
        assert!(w >= Duration::from_millis(1800), "{w:?}");
    }
}
