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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::session::{Connector, Listener};
    use crate::tls::{client_config, server_config, Identity};
    use std::sync::atomic::AtomicBool;

    /// A listener serving check sessions on loopback, and a connector to it.
    fn rig(dir: &std::path::Path) -> Connector {
        crate::certs::generate(dir, &[]).unwrap();
        let r = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
        let ca = r("ca.pem");
        let id = |c: &str, k: &str| Identity::from_pem(&r(c), &r(k), None).unwrap();
        let l = Listener::bind(
            "127.0.0.1:0",
            server_config(id("target.pem", "target-key.pem"), &ca).unwrap(),
        )
        .unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            l.serve(|inc, _guard| {
                assert_eq!(inc.mode, crate::wire::Mode::Check);
                serve::serve(inc, Duration::from_secs(30)).unwrap();
                false
            })
        });
        Connector {
            addr,
            tls: client_config(id("source.pem", "source-key.pem"), &ca).unwrap(),
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_check_over_loopback_measures_every_figure() {
        let dir = tempfile::tempdir().unwrap();
        let c = rig(dir.path());
        let opts = CheckOptions {
            task_id: "t".into(),
            streams: 2,
            duration: Duration::from_secs(4),
        };
        let r = run(&c, &opts, &AtomicBool::new(false)).unwrap();
        assert!(r.echoes_sent >= 10, "{r:?}");
        assert!(r.delay_ms > 0.0 && r.delay_min_ms <= r.delay_ms, "{r:?}");
        assert!(r.bandwidth_mbps > 0.0 && r.bytes > 0, "{r:?}");
        assert!(r.measured_secs > 0.0 && r.warmup_secs >= 1.0, "{r:?}");
        assert_eq!(r.streams, 2);
        assert!(r.retrans_pct.is_some(), "{r:?}");
    }

    /// A receiver that predates check mode: it completes the handshake, reads the `Hello`,
    /// cannot decode its mode, and closes the connection (what `accept_one` did then).
    #[test]
    fn an_older_receiver_is_a_clear_connect_failure() {
        let dir = tempfile::tempdir().unwrap();
        crate::certs::generate(dir.path(), &[]).unwrap();
        let r = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap();
        let ca = r("ca.pem");
        let server = server_config(
            Identity::from_pem(&r("target.pem"), &r("target-key.pem"), None).unwrap(),
            &ca,
        )
        .unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (sock, _) = l.accept().unwrap();
            let tls = rustls::ServerConnection::new(server).unwrap();
            let conn = crate::conn::Conn::handshake(sock, tls, Duration::from_secs(5)).unwrap();
            let (mut rd, _w) = conn.split();
            let (kind, payload) = crate::wire::read_frame(&mut rd).unwrap();
            assert_eq!(kind, 1);
            // Mode byte 2 after the task id: what an older decoder refused.
            assert_eq!(payload[2 + usize::from(payload[1])], 2);
        });
        let c = Connector {
            addr,
            tls: client_config(
                Identity::from_pem(&r("source.pem"), &r("source-key.pem"), None).unwrap(),
                &ca,
            )
            .unwrap(),
            timeout: Duration::from_secs(5),
        };
        let opts = CheckOptions {
            task_id: "t".into(),
            streams: 1,
            duration: Duration::from_secs(4),
        };
        let e = run(&c, &opts, &AtomicBool::new(false)).unwrap_err();
        assert!(matches!(e, CheckError::Connect(_)), "{e}");
        assert!(
            e.to_string().contains("older than network-check support"),
            "{e}"
        );
    }

    #[test]
    fn out_of_range_options_are_refused_before_connecting() {
        let c = Connector {
            addr: "127.0.0.1:9".into(),
            tls: {
                let dir = tempfile::tempdir().unwrap();
                crate::certs::generate(dir.path(), &[]).unwrap();
                let r = |n: &str| std::fs::read_to_string(dir.path().join(n)).unwrap();
                let id = Identity::from_pem(&r("source.pem"), &r("source-key.pem"), None).unwrap();
                client_config(id, &r("ca.pem")).unwrap()
            },
            timeout: Duration::from_secs(1),
        };
        for (streams, secs) in [(0, 10), (65, 10), (4, 3), (4, 601)] {
            let opts = CheckOptions {
                task_id: "t".into(),
                streams,
                duration: Duration::from_secs(secs),
            };
            assert!(matches!(
                run(&c, &opts, &AtomicBool::new(false)),
                Err(CheckError::Options(_))
            ));
        }
    }
}
