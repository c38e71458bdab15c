//! Exponential backoff with jitter, and the decision of which failures are worth retrying.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Exponential backoff: `base · 2^attempt`, capped at `max`, with "full jitter" (a uniform
/// random share of the step) so that a fleet of agents does not retry in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

/// A backoff that could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("backoff base {base:?} must be non-zero and at most max {max:?}")]
pub struct InvalidBackoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    /// A backoff from `base` doubling up to `max`; `base` must be non-zero and ≤ `max`.
    pub fn new(base: Duration, max: Duration) -> Result<Self, InvalidBackoff> {
        if base.is_zero() || base > max {
            return Err(InvalidBackoff { base, max });
        }
        Ok(Self { base, max })
    }

    /// The ceiling of the wait before retry number `attempt` (0-based), saturating at `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The wait before retry number `attempt`: uniform in `[ceiling/2, ceiling]`, so a retry never
    /// comes immediately (no busy loop) yet agents spread out.
    pub fn delay(&self, attempt: u32) -> Duration {
        let c = self.ceiling(attempt);
        let half = c / 2;
        half + mul_fraction(c - half, jitter_fraction())
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            max: Duration::from_secs(60),
        }
    }
}

fn mul_fraction(d: Duration, f: f64) -> Duration {
    Duration::from_secs_f64(d.as_secs_f64() * f.clamp(0.0, 1.0))
}

/// A pseudo-random fraction in [0, 1): the sub-second clock mixed through splitmix64. Jitter
/// needs spread between processes, not cryptographic quality.
pub fn jitter_fraction() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // Only the low bits vary; truncation is the point.
    #[allow(clippy::cast_possible_truncation)]
    let low = nanos as u64;
    let mut z = low ^ u64::from(std::process::id()).rotate_left(32);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    #[allow(clippy::cast_precision_loss)]
    let f = (z >> 11) as f64 / (1u64 << 53) as f64;
    f
}

/// Whether an HTTP status is worth retrying: 5xx, 429 and 408. Every other 4xx means the request
/// itself is wrong and will fail the same way again.
pub fn retryable_status(status: u16) -> bool {
    status >= 500 || status == 429 || status == 408
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validated_at_construction() {
        assert!(Backoff::new(Duration::ZERO, Duration::from_secs(1)).is_err());
        assert!(Backoff::new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
        assert!(Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn grows_saturates_and_stays_in_bounds() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10)).unwrap();
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(20), Duration::from_secs(10));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(10));
        for attempt in [0, 1, 5, 40, u32::MAX] {
            for _ in 0..50 {
                let d = b.delay(attempt);
                let c = b.ceiling(attempt);
                assert!(d >= c / 2 && d <= c, "{d:?} outside [{:?}, {c:?}]", c / 2);
            }
        }
    }

    #[test]
    fn retry_decisions() {
        for s in [500, 502, 503, 504, 429, 408] {
            assert!(retryable_status(s), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 200] {
            assert!(!retryable_status(s), "{s}");
        }
    }
}
