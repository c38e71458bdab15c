//! The source's side of a check: the delay phase on the control stream, then the bandwidth
//! phase on the data streams, and the figures from both.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::lock;
use crate::session::{Connector, SessionError, Stream, MAX_STREAMS};
use crate::wire::{self, Message, Mode, WireError, FILL};

use super::stats::{jitter, median, rate_bps};
use super::tcpinfo::TcpCounters;
use super::{delay_phase, warmup, CheckOptions, CheckReport, ECHO_EVERY, FILL_FRAME, SECONDS};

/// How long a check stream may wait on the target before the check fails.
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Shortest deadline of an echo; a longer one is four times the smallest round trip.
const MIN_ECHO_DEADLINE: Duration = Duration::from_secs(1);

/// Why a check could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The options are out of range.
    #[error("{0}")]
    Options(String),
    /// The target could not be reached, or refused the session. A receiver older than check
    /// mode closes the connection after the TLS handshake, which shows as a TLS error.
    #[error("{}{}", .0, older_hint(.0))]
    Connect(SessionError),
    /// The session failed during the check.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The check was cancelled.
    #[error("the check was cancelled")]
    Cancelled,
    /// Nothing could be measured (no echo answered, no filler counted).
    #[error("nothing measured: {0}")]
    Nothing(String),
}

impl CheckError {
    /// The SMS error code of the failure.
    pub fn code(&self) -> crate::Code {
        match self {
            CheckError::Options(_) => crate::Code::IncompleteParameters,
            CheckError::Connect(e) | CheckError::Session(e) => e.code(),
            CheckError::Cancelled | CheckError::Nothing(_) => crate::Code::TransmissionFailed,
        }
    }
}

/// A receiver older than check mode refuses its `Hello` by closing the connection, which the
/// source sees as a failure right after the TLS handshake; say so where that is what happened.
fn older_hint(e: &SessionError) -> &'static str {
    match e {
        SessionError::Tls { .. } | SessionError::Wire(_) => {
            " (a receiver older than network-check support closes the connection this way too)"
        }
        _ => "",
    }
}

fn io(e: impl std::fmt::Display) -> SessionError {
    SessionError::Wire(WireError::Io(e.to_string()))
}

/// Runs one check against the receiver of `connector`; `cancel` ends it early (an error).
pub fn run(
    connector: &Connector,
    opts: &CheckOptions,
    cancel: &AtomicBool,
) -> Result<CheckReport, CheckError> {
    if opts.streams == 0 || opts.streams > MAX_STREAMS {
        return Err(CheckError::Options(format!(
            "streams: {} is not within 1–{MAX_STREAMS}",
            opts.streams
        )));
    }
    let secs = opts.duration.as_secs();
    if !SECONDS.contains(&secs) {
        return Err(CheckError::Options(format!(
            "seconds: {secs} is not within {}–{}",
            SECONDS.start(),
            SECONDS.end()
        )));
    }
    let (control, session) = connector
        .open(&opts.task_id, Mode::Check, 0, opts.streams, 0)
        .map_err(CheckError::Connect)?;
    control.set_timeouts(STREAM_TIMEOUT);
    let mut data = Vec::new();
    for i in 1..=opts.streams {
        let (s, _) = connector.open(&opts.task_id, Mode::Check, i, opts.streams, session)?;
        s.set_timeouts(STREAM_TIMEOUT);
        data.push(s);
    }
    let base = Instant::now();
    let delay_len = delay_phase(opts.duration);
    let (control_w, echoes) = delay(control, base, delay_len, cancel)?;
    if cancel.load(Ordering::SeqCst) {
        return Err(CheckError::Cancelled);
    }
    let rtt = Duration::from_secs_f64(echoes.median_ms / 1000.0);
    let bw_len = opts.duration.saturating_sub(base.elapsed());
    let bw = bandwidth(data, bw_len, rtt, cancel)?;
    // The session ends on the control stream: Bye, answered by Bye.
    let mut control_w = control_w;
    Message::Bye
        .write_to(&mut control_w.writer)
        .map_err(SessionError::from)?;
    control_w.writer.flush().map_err(io)?;
    let _ = control_w.reader.join();
    let loss_pct = bw.retrans_pct.unwrap_or(0.0).max(echoes.loss_pct);
    Ok(CheckReport {
        delay_ms: echoes.median_ms,
        delay_min_ms: echoes.min_ms,
        delay_max_ms: echoes.max_ms,
        jitter_ms: echoes.jitter_ms,
        echoes_sent: echoes.sent,
        echoes_late: echoes.late,
        echo_deadline_ms: echoes.deadline_ms,
        echo_loss_pct: echoes.loss_pct,
        retrans_pct: bw.retrans_pct,
        loss_pct,
        bandwidth_mbps: bw.bps / 1e6,
        streams: opts.streams,
        warmup_secs: bw.warmup_secs,
        measured_secs: bw.measured_secs,
        bytes: bw.bytes,
    })
}

/// The control stream's writer after the delay phase, and its reader's thread (which ends at
/// the target's `Bye`).
struct ControlRest {
    writer: std::io::BufWriter<crate::conn::ConnWriter>,
    reader: JoinHandle<Result<(), SessionError>>,
}

/// What the delay phase measured.
struct Echoes {
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    jitter_ms: f64,
    sent: u64,
    late: u64,
    deadline_ms: f64,
    loss_pct: f64,
}

/// Round trips by echo sequence number (`None`: not answered yet).
type Rtts = Arc<Mutex<Vec<Option<f64>>>>;

fn nanos(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Sends an echo every [`ECHO_EVERY`] for `len`, then waits out the deadline of the last.
fn delay(
    control: Stream,
    base: Instant,
    len: Duration,
    cancel: &AtomicBool,
) -> Result<(ControlRest, Echoes), CheckError> {
    let (mut r, mut w) = control.into_halves();
    let rtts: Rtts = Arc::default();
    let got = Arc::clone(&rtts);
    let reader = std::thread::Builder::new()
        .name("sms-check-echo".into())
        .spawn(move || -> Result<(), SessionError> {
            loop {
                match Message::read_from(&mut r)? {
                    Message::EchoReply { seq, nanos: sent } => {
                        let now = nanos(base);
                        #[allow(clippy::cast_precision_loss)]
                        let ms = now.saturating_sub(sent) as f64 / 1e6;
                        let mut v = lock(&got);
                        if let Some(slot) = usize::try_from(seq).ok().and_then(|i| v.get_mut(i)) {
                            *slot = Some(ms);
                        }
                    }
                    Message::Bye => return Ok(()),
                    Message::Error { code, message } => {
                        return Err(SessionError::Remote { code, message })
                    }
                    other => {
                        return Err(SessionError::Protocol {
                            peer: String::new(),
                            what: format!(
                                "unexpected {} on the check's control stream",
                                crate::session::name_of(&other)
                            ),
                        })
                    }
                }
            }
        })
        .map_err(io)?;
    let start = Instant::now();
    let mut seq = 0u64;
    while start.elapsed() < len && !cancel.load(Ordering::SeqCst) && !reader.is_finished() {
        lock(&rtts).push(None);
        Message::Echo {
            seq,
            nanos: nanos(base),
        }
        .write_to(&mut w)
        .map_err(SessionError::from)?;
        w.flush().map_err(io)?;
        seq += 1;
        std::thread::sleep(ECHO_EVERY);
    }
    // Wait for the answers still due, up to the deadline.
    let deadline = |v: &[Option<f64>]| {
        let min = v.iter().flatten().copied().fold(f64::INFINITY, f64::min);
        let d = if min.is_finite() { min * 4.0 } else { 0.0 };
        d.max(MIN_ECHO_DEADLINE.as_secs_f64() * 1000.0)
    };
    let sent_all = Instant::now();
    loop {
        let v = lock(&rtts).clone();
        let dl = deadline(&v);
        if v.iter().all(Option::is_some)
            || sent_all.elapsed().as_secs_f64() * 1000.0 > dl
            || reader.is_finished()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if reader.is_finished() {
        // The reader ended early: the target failed or closed the stream.
        return Err(match reader.join() {
            Ok(Err(e)) => CheckError::Session(e),
            _ => CheckError::Nothing("the target closed the check's control stream".into()),
        });
    }
    let v = lock(&rtts).clone();
    let dl = deadline(&v);
    let in_time: Vec<f64> = v.iter().flatten().copied().filter(|&ms| ms <= dl).collect();
    let sent = v.len() as u64;
    let late = sent - in_time.len() as u64;
    let Some(median_ms) = median(&in_time) else {
        return Err(CheckError::Nothing(format!(
            "none of {sent} echoes was answered within {dl:.0} ms"
        )));
    };
    // Jitter over the answered echoes in the order they were sent.
    let ordered: Vec<f64> = v.iter().flatten().copied().collect();
    #[allow(clippy::cast_precision_loss)]
    let loss_pct = if sent == 0 {
        0.0
    } else {
        late as f64 * 100.0 / sent as f64
    };
    Ok((
        ControlRest { writer: w, reader },
        Echoes {
            median_ms,
            min_ms: in_time.iter().copied().fold(f64::INFINITY, f64::min),
            max_ms: in_time.iter().copied().fold(0.0, f64::max),
            jitter_ms: jitter(&ordered),
            sent,
            late,
            deadline_ms: dl,
            loss_pct,
        },
    ))
}

/// What the bandwidth phase measured.
struct Bandwidth {
    bps: f64,
    retrans_pct: Option<f64>,
    warmup_secs: f64,
    measured_secs: f64,
    bytes: u64,
}

/// Filler nobody can compress: BLAKE3's output stream under a random key.
fn filler() -> Vec<u8> {
    let mut key = [0u8; 32];
    for (i, c) in key.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(crate::random_u64() ^ i as u64).to_le_bytes());
    }
    let mut buf = vec![0u8; FILL_FRAME];
    blake3::Hasher::new_keyed(&key)
        .finalize_xof()
        .fill(&mut buf);
    buf
}

/// Every data stream sends filler for `len`; the target's reports give the rate after the
/// warm-up.
fn bandwidth(
    data: Vec<Stream>,
    len: Duration,
    rtt: Duration,
    cancel: &AtomicBool,
) -> Result<Bandwidth, CheckError> {
    let fill = Arc::new(filler());
    let end = Instant::now() + len;
    let stop = Arc::new(AtomicBool::new(false));
    let mut socks: Vec<(TcpStream, Option<TcpCounters>)> = Vec::new();
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for s in data {
        if let Some(sock) = s.cutter() {
            let before = TcpCounters::of(&sock);
            socks.push((sock, before));
        }
        let (mut r, mut w) = s.into_halves();
        let fill = Arc::clone(&fill);
        let stop_w = Arc::clone(&stop);
        writers.push(
            std::thread::Builder::new()
                .name("sms-check-fill".into())
                .spawn(move || -> Result<(), SessionError> {
                    while Instant::now() < end && !stop_w.load(Ordering::SeqCst) {
                        wire::write_frame(&mut w, FILL, &fill)?;
                    }
                    Message::Bye.write_to(&mut w)?;
                    w.flush().map_err(io)?;
                    Ok(())
                })
                .map_err(io)?,
        );
        readers.push(
            std::thread::Builder::new()
                .name("sms-check-count".into())
                .spawn(move || -> Result<Vec<(u64, u64)>, SessionError> {
                    let mut reports = Vec::new();
                    loop {
                        match Message::read_from(&mut r)? {
                            Message::Filled { bytes, nanos } => reports.push((nanos, bytes)),
                            Message::Bye => return Ok(reports),
                            Message::Error { code, message } => {
                                return Err(SessionError::Remote { code, message })
                            }
                            other => {
                                return Err(SessionError::Protocol {
                                    peer: String::new(),
                                    what: format!(
                                        "unexpected {} on a check data stream",
                                        crate::session::name_of(&other)
                                    ),
                                })
                            }
                        }
                    }
                })
                .map_err(io)?,
        );
    }
    while Instant::now() < end {
        if cancel.load(Ordering::SeqCst) || readers.iter().any(JoinHandle::is_finished) {
            stop.store(true, Ordering::SeqCst);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut first_err = None;
    for w in writers {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(io("a check stream's thread panicked"));
            }
        }
    }
    let mut streams = Vec::new();
    for r in readers {
        match r.join() {
            Ok(Ok(reports)) => streams.push(reports),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(io("a check stream's thread panicked"));
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e.into());
    }
    if cancel.load(Ordering::SeqCst) {
        return Err(CheckError::Cancelled);
    }
    // Retransmissions over the whole phase (the kernel counts per connection).
    let (mut segs, mut retrans, mut known) = (0u64, 0u64, true);
    for (sock, before) in &socks {
        match (before, TcpCounters::of(sock)) {
            (Some(b), Some(a)) => {
                let d = a.since(*b);
                segs += d.segs_out;
                retrans += d.retrans;
            }
            _ => known = false,
        }
    }
    #[allow(clippy::cast_precision_loss)]
    let retrans_pct = (known && segs > 0).then(|| retrans as f64 * 100.0 / segs as f64);
    // The target's timeline: from its first report to the first stream's last one.
    let first = streams
        .iter()
        .filter_map(|s| s.first().map(|r| r.0))
        .min()
        .ok_or_else(|| CheckError::Nothing("the target counted no filler".into()))?;
    let last = streams
        .iter()
        .filter_map(|s| s.last().map(|r| r.0))
        .min()
        .unwrap_or(first);
    let bytes: u64 = streams.iter().filter_map(|s| s.last().map(|r| r.1)).sum();
    let phase = Duration::from_nanos(last.saturating_sub(first));
    let wu = warmup(rtt, phase);
    let from = first + u64::try_from(wu.as_nanos()).unwrap_or(0);
    let (bps, from) = match rate_bps(&streams, from, last) {
        Some(r) => (r, from),
        // A stream without reports on both sides (a very slow link): the whole phase.
        None => (
            rate_bps(&streams, first, last).ok_or_else(|| {
                CheckError::Nothing("too few reports from the target to take a rate".into())
            })?,
            first,
        ),
    };
    Ok(Bandwidth {
        bps,
        retrans_pct,
        warmup_secs: Duration::from_nanos(from - first).as_secs_f64(),
        measured_secs: Duration::from_nanos(last - from).as_secs_f64(),
        bytes,
    })
}
