//! The target's side of a check session: answer echoes on the control stream at once, and on
//! each data stream count the filler that arrives and report the count every
//! [`REPORT_EVERY`]. Nothing is written anywhere.

use std::io::Read;
use std::time::{Duration, Instant};

use crate::session::{Incoming, SessionError, Stream};
use crate::wire::{Message, WireError, BYE, FILL, HEADER_LEN};

use super::{MAX_CHECK, REPORT_EVERY};

/// What a check session did, for the receiver's log.
#[derive(Debug, Clone, Default)]
pub struct ServeReport {
    /// Echoes answered.
    pub echoes: u64,
    /// Filler bytes received over all data streams.
    pub bytes: u64,
    /// Data streams that joined.
    pub streams: u16,
}

/// Serves one check session until the source's `Bye`, a failure, or [`MAX_CHECK`].
pub fn serve(inc: Incoming, peer_timeout: Duration) -> Result<ServeReport, SessionError> {
    let started = Instant::now();
    let timeout = crate::session::peer_timeout(peer_timeout);
    let Incoming {
        control,
        data,
        streams,
        ..
    } = inc;
    // Data streams join while the control stream already echoes.
    let joiner = std::thread::Builder::new()
        .name("sms-check-join".into())
        .spawn(move || {
            let mut handles = Vec::new();
            for _ in 0..streams {
                match data.recv_timeout(crate::session::HELLO_TIMEOUT * 2) {
                    Ok(s) => {
                        let h = std::thread::Builder::new()
                            .name("sms-check-data".into())
                            .spawn(move || sink(s, started, timeout));
                        match h {
                            Ok(h) => handles.push(h),
                            Err(e) => tracing::warn!(error = %e, "cannot start a check stream"),
                        }
                    }
                    Err(_) => break,
                }
            }
            let joined = u16::try_from(handles.len()).unwrap_or(u16::MAX);
            let bytes = handles
                .into_iter()
                .filter_map(|h| h.join().ok())
                .filter_map(Result::ok)
                .sum::<u64>();
            (joined, bytes)
        })
        .map_err(|e| SessionError::Protocol {
            peer: control.peer.clone(),
            what: format!("cannot start a thread: {e}"),
        })?;
    let echoes = echo(control, started, timeout)?;
    let (streams, bytes) = joiner.join().unwrap_or((0, 0));
    Ok(ServeReport {
        echoes,
        bytes,
        streams,
    })
}

/// Nanoseconds since `t`, saturating.
fn nanos_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The control stream: every `Echo` answered at once, until `Bye`.
fn echo(mut s: Stream, started: Instant, timeout: Duration) -> Result<u64, SessionError> {
    s.set_timeouts(timeout);
    let mut n = 0;
    loop {
        if started.elapsed() > MAX_CHECK {
            s.send_error(&crate::Code::TransmissionFailed, "the check ran too long");
            return Err(over_time(&s));
        }
        match s.recv()? {
            Message::Echo { seq, nanos } => {
                s.send(&Message::EchoReply { seq, nanos })?;
                s.flush()?;
                n += 1;
            }
            Message::Bye => {
                s.send(&Message::Bye)?;
                s.flush()?;
                s.close();
                return Ok(n);
            }
            other => {
                let what = format!(
                    "unexpected {} on a check control stream",
                    crate::session::name_of(&other)
                );
                s.send_error(&crate::Code::TransmissionFailed, &what);
                return Err(SessionError::Protocol { peer: s.peer, what });
            }
        }
    }
}

fn over_time(s: &Stream) -> SessionError {
    SessionError::Protocol {
        peer: s.peer.clone(),
        what: format!("check session longer than {} s", MAX_CHECK.as_secs()),
    }
}

/// One data stream: counts `Fill` payload bytes (read into one reused buffer, never decoded)
/// and reports the count, with the time, every [`REPORT_EVERY`] and once more at `Bye`.
fn sink(mut s: Stream, started: Instant, timeout: Duration) -> Result<u64, SessionError> {
    s.set_timeouts(timeout);
    let mut bytes = 0u64;
    let mut buf = Vec::new();
    let mut last = Instant::now();
    loop {
        let mut h = [0u8; HEADER_LEN];
        s.reader
            .read_exact(&mut h)
            .map_err(|e| WireError::Io(e.to_string()))?;
        let (kind, len) = Message::parse_header(&h)?;
        buf.resize(len, 0);
        s.reader
            .read_exact(&mut buf)
            .map_err(|e| WireError::Io(e.to_string()))?;
        match kind {
            FILL => bytes += len as u64,
            BYE => {
                s.send(&Message::Filled {
                    bytes,
                    nanos: nanos_since(started),
                })?;
                s.send(&Message::Bye)?;
                s.flush()?;
                s.close();
                return Ok(bytes);
            }
            other => {
                let what = format!("unexpected message type {other} on a check data stream");
                s.send_error(&crate::Code::TransmissionFailed, &what);
                return Err(SessionError::Protocol { peer: s.peer, what });
            }
        }
        if last.elapsed() >= REPORT_EVERY {
            last = Instant::now();
            s.send(&Message::Filled {
                bytes,
                nanos: nanos_since(started),
            })?;
            s.flush()?;
            if started.elapsed() > MAX_CHECK {
                s.send_error(&crate::Code::TransmissionFailed, "the check ran too long");
                return Err(over_time(&s));
            }
        }
    }
}
