//! The check's arithmetic: median round trip, RFC 3550 jitter, and the rate of a set of
//! streams between two instants of the target's clock.

use std::time::Duration;

/// The median of `xs` (the mean of the two middle values for an even count), `None` when empty.
pub fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Interarrival jitter as RFC 3550 §6.4.1 smooths it, over successive round trips (in send
/// order): `J += (|D| - J) / 16`, `D` the difference of two successive samples.
pub fn jitter(rtts: &[f64]) -> f64 {
    let mut j = 0.0;
    for w in rtts.windows(2) {
        let d = (w[1] - w[0]).abs();
        j += (d - j) / 16.0;
    }
    j
}

/// Bytes a stream had delivered at target time `t` (ns), by linear interpolation between its
/// reports `(nanos, bytes)` (sorted by time); `None` outside the reports.
pub fn bytes_at(reports: &[(u64, u64)], t: u64) -> Option<f64> {
    let i = reports.partition_point(|&(n, _)| n < t);
    #[allow(clippy::cast_precision_loss)] // byte counts and nanoseconds far below 2^52
    match (
        i.checked_sub(1).and_then(|j| reports.get(j)),
        reports.get(i),
    ) {
        (_, Some(&(n, b))) if n == t => Some(b as f64),
        (Some(&(n0, b0)), Some(&(n1, b1))) => {
            let f = (t - n0) as f64 / (n1 - n0) as f64;
            Some(b0 as f64 + f * (b1 as f64 - b0 as f64))
        }
        _ => None,
    }
}

/// Bits per second all `streams` moved together between target times `from` and `to` (ns);
/// `None` when a stream has no report on both sides.
pub fn rate_bps(streams: &[Vec<(u64, u64)>], from: u64, to: u64) -> Option<f64> {
    if to <= from {
        return None;
    }
    let mut bytes = 0.0;
    for s in streams {
        bytes += bytes_at(s, to)? - bytes_at(s, from)?;
    }
    #[allow(clippy::cast_precision_loss)]
    let secs = Duration::from_nanos(to - from).as_secs_f64();
    Some(bytes * 8.0 / secs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn jitter_follows_rfc_3550() {
        assert_eq!(jitter(&[10.0; 50]), 0.0);
        // One step of 16 ms: J = 16/16 = 1, then decays by 15/16 per equal sample.
        let j = jitter(&[10.0, 26.0, 26.0]);
        assert!((j - 15.0 / 16.0).abs() < 1e-9, "{j}");
        // Alternating ±2 ms converges towards 2.
        let alt: Vec<f64> = (0..400)
            .map(|i| if i % 2 == 0 { 50.0 } else { 52.0 })
            .collect();
        assert!((jitter(&alt) - 2.0).abs() < 0.01);
    }

    #[test]
    fn rates_interpolate_between_reports() {
        // 1 MB per 100 ms on each of two streams: 2 × 80 Mbit/s.
        let s: Vec<(u64, u64)> = (0..=10).map(|i| (i * 100_000_000, i * 1_000_000)).collect();
        let r = rate_bps(&[s.clone(), s.clone()], 150_000_000, 850_000_000).unwrap();
        assert!((r - 160e6).abs() < 1.0, "{r}");
        assert_eq!(rate_bps(&[s], 0, 2_000_000_000), None);
    }
}
