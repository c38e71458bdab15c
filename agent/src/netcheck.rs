//! The network check as the agent reports it: the transfer crate's measurement
//! (`transfer::netcheck`) plus the source's CPU and memory during it, the verdict from
//! [`evaluate`], and the body of `POST /v3/{task_id}/update-network-check-info` (reference
//! §5.9.1, table 5-362, lines 22807-22821).

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use transfer::netcheck::{CheckError, CheckOptions, CheckReport};
use transfer::session::Connector;

use crate::api::models::NetworkCheckInfo;

/// Verdicts of [`evaluate`]. The reference gives `evaluation_result` only a length, 6–8
/// characters (line 22821), no values, and its example sends "" (line 22886), which the table
/// refuses; these three words fit the table.
pub const NORMAL: &str = "NORMAL";
/// Usable, but the migration will be slower or less steady than it could be.
pub const WARNING: &str = "WARNING";
/// A migration over this link is likely to fail or crawl.
pub const ABNORMAL: &str = "ABNORMAL";

/// Thresholds of [`evaluate`] (docs/daemon.md, "Network check"): (WARNING above, ABNORMAL
/// above) for delay ms, jitter ms and loss %; (WARNING below, ABNORMAL below) for Mbit/s.
pub const DELAY_MS: (f64, f64) = (100.0, 300.0);
/// Jitter thresholds, ms.
pub const JITTER_MS: (f64, f64) = (30.0, 100.0);
/// Loss thresholds, %.
pub const LOSS_PCT: (f64, f64) = (1.0, 5.0);
/// Bandwidth thresholds, Mbit/s.
pub const SPEED_MBPS: (f64, f64) = (100.0, 10.0);
/// Source CPU and memory above which the source itself may hold a migration back, %.
pub const BUSY_PCT: f64 = 90.0;

/// One check as reported: what was measured, or why nothing was.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NetReport {
    /// `HOST:PORT` of the receiver.
    pub target: String,
    /// The measurement, when the target could be reached and measured.
    pub check: Option<CheckReport>,
    /// Why there is no measurement.
    pub error: Option<String>,
    /// The SMS code of that failure.
    pub error_code: Option<String>,
    /// A session with the receiver was opened (TCP, mutual TLS, `Hello`).
    pub destination_connectivity: bool,
    /// DNS and TLS to the SMS (and OBS) endpoints worked; `None` when not checked (standalone).
    pub domain_connectivity: Option<bool>,
    /// Host CPU busy during the check, % of all cores.
    pub cpu_usage: f64,
    /// Host memory in use (total − available) at the end of the check, %.
    pub mem_usage: f64,
    /// [`NORMAL`], [`WARNING`] or [`ABNORMAL`].
    pub evaluation: String,
}

/// Runs the check against `connector` and samples the host meanwhile (blocking: seconds).
pub fn measure(connector: &Connector, opts: &CheckOptions, cancel: &AtomicBool) -> NetReport {
    // Without the host's counters the figures are 0 (the reference requires them).
    let mut sys = sysinfo::System::new().ok();
    if let Some(s) = sys.as_mut() {
        s.refresh_cpu_usage();
    }
    let started = Instant::now();
    let result = transfer::netcheck::run(connector, opts, cancel);
    // sysinfo's CPU figure is the busy share since the previous refresh: the whole check.
    if started.elapsed() < sysinfo::MINIMUM_CPU_UPDATE_INTERVAL {
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
    }
    let (cpu_usage, mem_usage) = sys.as_mut().map_or((0.0, 0.0), |s| {
        s.refresh_cpu_usage();
        s.refresh_memory();
        #[allow(clippy::cast_precision_loss)]
        let mem = if s.total_memory() == 0 {
            0.0
        } else {
            s.used_memory() as f64 * 100.0 / s.total_memory() as f64
        };
        (
            f64::from(s.global_cpu_usage()).clamp(0.0, 100.0),
            mem.clamp(0.0, 100.0),
        )
    });
    let (check, error, error_code, destination_connectivity) = match result {
        Ok(r) => (Some(r), None, None, true),
        Err(e) => {
            // Reached but failed later still means the target answered.
            let reached = !matches!(e, CheckError::Connect(_) | CheckError::Options(_));
            (
                None,
                Some(e.to_string()),
                Some(e.code().to_string()),
                reached,
            )
        }
    };
    let mut r = NetReport {
        target: connector.addr.clone(),
        check,
        error,
        error_code,
        destination_connectivity,
        domain_connectivity: None,
        cpu_usage,
        mem_usage,
        evaluation: String::new(),
    };
    r.evaluation = evaluate(&r).to_string();
    r
}

/// The verdict of a report: [`ABNORMAL`] past any second threshold or without a measurement
/// or a reachable SMS, [`WARNING`] past any first threshold, else [`NORMAL`].
pub fn evaluate(r: &NetReport) -> &'static str {
    let Some(c) = &r.check else {
        return ABNORMAL;
    };
    if r.domain_connectivity == Some(false)
        || c.delay_ms > DELAY_MS.1
        || c.jitter_ms > JITTER_MS.1
        || c.loss_pct > LOSS_PCT.1
        || c.bandwidth_mbps < SPEED_MBPS.1
    {
        return ABNORMAL;
    }
    if c.delay_ms > DELAY_MS.0
        || c.jitter_ms > JITTER_MS.0
        || c.loss_pct > LOSS_PCT.0
        || c.bandwidth_mbps < SPEED_MBPS.0
        || r.cpu_usage > BUSY_PCT
        || r.mem_usage > BUSY_PCT
    {
        return WARNING;
    }
    NORMAL
}

/// Rounds to two decimals (the reference's example sends "20.00") within `0..=max`.
fn field(x: f64, max: f64) -> f64 {
    let x = if x.is_finite() {
        x.clamp(0.0, max)
    } else {
        0.0
    };
    (x * 100.0).round() / 100.0
}

/// The body of `update-network-check-info`, each figure within the range of table 5-362
/// (delay and jitter 0–10000 ms, migration_speed 0–10000 Mbit/s, the rest 0–100 %). Without a
/// measurement the required figures are 0 and the flags and the verdict say why.
pub fn body(r: &NetReport) -> NetworkCheckInfo {
    let c = r.check.clone().unwrap_or_default();
    NetworkCheckInfo {
        domain_connectivity: r.domain_connectivity,
        destination_connectivity: Some(r.destination_connectivity),
        network_delay: field(c.delay_ms, 10_000.0),
        network_jitter: field(c.jitter_ms, 10_000.0),
        migration_speed: field(c.bandwidth_mbps, 10_000.0),
        loss_percentage: field(c.loss_pct, 100.0),
        cpu_usage: field(r.cpu_usage, 100.0),
        mem_usage: field(r.mem_usage, 100.0),
        evaluation_result: r.evaluation.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(delay: f64, mbps: f64, loss: f64) -> NetReport {
        NetReport {
            target: "t:1".into(),
            check: Some(CheckReport {
                delay_ms: delay,
                bandwidth_mbps: mbps,
                loss_pct: loss,
                ..CheckReport::default()
            }),
            error: None,
            error_code: None,
            destination_connectivity: true,
            domain_connectivity: Some(true),
            cpu_usage: 10.0,
            mem_usage: 20.0,
            evaluation: String::new(),
        }
    }

    #[test]
    fn verdicts_follow_the_thresholds() {
        assert_eq!(evaluate(&report(20.0, 900.0, 0.0)), NORMAL);
        assert_eq!(evaluate(&report(150.0, 900.0, 0.0)), WARNING);
        assert_eq!(evaluate(&report(20.0, 50.0, 0.0)), WARNING);
        assert_eq!(evaluate(&report(20.0, 900.0, 2.0)), WARNING);
        assert_eq!(evaluate(&report(400.0, 900.0, 0.0)), ABNORMAL);
        assert_eq!(evaluate(&report(20.0, 5.0, 0.0)), ABNORMAL);
        let mut r = report(20.0, 900.0, 0.0);
        r.domain_connectivity = Some(false);
        assert_eq!(evaluate(&r), ABNORMAL);
        r.check = None;
        assert_eq!(evaluate(&r), ABNORMAL);
        for v in [NORMAL, WARNING, ABNORMAL] {
            assert!((6..=8).contains(&v.len()), "{v}");
        }
    }

    #[test]
    fn the_body_stays_within_the_reference_ranges() {
        let mut r = report(20_000.0, 40_000.0, 0.123_456);
        r.cpu_usage = f64::NAN;
        r.evaluation = evaluate(&r).into();
        let b = body(&r);
        assert_eq!(b.network_delay, 10_000.0);
        assert_eq!(b.migration_speed, 10_000.0);
        assert_eq!(b.loss_percentage, 0.12);
        assert_eq!(b.cpu_usage, 0.0);
        assert_eq!(b.evaluation_result, ABNORMAL);
        assert_eq!(b.destination_connectivity, Some(true));
    }
}
