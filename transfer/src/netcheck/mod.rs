//! The network check (`sms-agent netcheck`, and the daemon's `NETWORK_CHECK`): round trip,
//! jitter, loss and bandwidth between this host and a running receiver, over the receiver's
//! own port and mutual TLS, in a session of mode [`crate::wire::Mode::Check`]
//! (docs/wire.md, "Check messages").
//!
//! The check runs in two phases. First timed echoes on the control stream, one every
//! [`ECHO_EVERY`], with the link otherwise idle: their median round trip is the delay, the
//! RFC 3550 smoothing of successive round trips the jitter, and echoes answered after their
//! deadline (or never) count as lost. Then every data stream sends incompressible filler as
//! fast as it can; the target counts what arrives and reports it with its own clock, and the
//! rate is taken between the end of a warm-up (TCP's slow start, discarded) and the end of the
//! phase. The kernel's retransmission counters of the data streams give the second loss figure.

mod client;
pub mod serve;
pub mod stats;
pub mod tcpinfo;

use std::time::Duration;

pub use client::{run, CheckError};

/// Interval between two echoes of the delay phase.
pub const ECHO_EVERY: Duration = Duration::from_millis(50);
/// How often the target reports the filler it counted on a data stream.
pub const REPORT_EVERY: Duration = Duration::from_millis(50);
/// Longest check a target serves; a session past it is ended.
pub const MAX_CHECK: Duration = Duration::from_secs(15 * 60);
/// Shortest and longest check duration a source may ask for.
pub const SECONDS: std::ops::RangeInclusive<u64> = 4..=600;
/// Bytes of one filler frame: big enough that framing and TLS record overhead stay small.
pub const FILL_FRAME: usize = 256 << 10;

/// How to run a check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Task id announced in the `Hello` (for the target's log).
    pub task_id: String,
    /// Data streams of the bandwidth phase (1–[`crate::session::MAX_STREAMS`]).
    pub streams: u16,
    /// Whole duration of the check, both phases (within [`SECONDS`]).
    pub duration: Duration,
}

/// What a check measured.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct CheckReport {
    /// Median round trip of the echoes answered in time, ms.
    pub delay_ms: f64,
    /// Smallest round trip, ms.
    pub delay_min_ms: f64,
    /// Largest round trip answered in time, ms.
    pub delay_max_ms: f64,
    /// RFC 3550 jitter of successive round trips, ms.
    pub jitter_ms: f64,
    /// Echoes sent.
    pub echoes_sent: u64,
    /// Echoes answered after their deadline, or not at all.
    pub echoes_late: u64,
    /// The deadline of an echo, ms.
    pub echo_deadline_ms: f64,
    /// `echoes_late` as a share of `echoes_sent`, %.
    pub echo_loss_pct: f64,
    /// Segments the data streams retransmitted, as a share of those they sent (TCP_INFO), %;
    /// `None` where the kernel gives no counters.
    pub retrans_pct: Option<f64>,
    /// The loss figure reported: the larger of the two above, %.
    pub loss_pct: f64,
    /// Rate of the data streams together after the warm-up, Mbit/s.
    pub bandwidth_mbps: f64,
    /// Data streams used.
    pub streams: u16,
    /// Seconds of the bandwidth phase discarded as warm-up.
    pub warmup_secs: f64,
    /// Seconds over which the rate was measured.
    pub measured_secs: f64,
    /// Filler bytes the target counted over the whole bandwidth phase.
    pub bytes: u64,
}

/// Length of the delay phase of a check of `total`: a quarter, 1–5 s.
pub fn delay_phase(total: Duration) -> Duration {
    (total / 4).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// Warm-up discarded at the start of the bandwidth phase: fifteen round trips (slow start
/// reaches a window of a few MB in about ten), at least 1 s, at most half the phase.
pub fn warmup(rtt: Duration, phase: Duration) -> Duration {
    (rtt * 15).max(Duration::from_secs(1)).min(phase / 2)
}
