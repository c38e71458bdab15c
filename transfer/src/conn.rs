//! A TLS connection that one thread reads while another writes. Every engine is full duplex
//! (the sender streams data while the receiver answers with hashes, acks or an error), and a
//! plain rustls `StreamOwned` cannot be read and written at once.
//!
//! The rustls state sits behind one lock that is never held across a socket read, and the
//! socket's write side behind a second lock taken (while holding the first) so TLS records
//! leave in the order they were sealed. A reader that must send records of its own (a key
//! update) only try-locks the socket: if a writer is busy, that writer flushes them next, so a
//! reader can never wait on a writer that waits on the peer's reader.

use crate::lock;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

/// Largest TLS read from the socket at once.
const READ_BUF: usize = 64 << 10;

struct Shared {
    tls: Mutex<rustls::Connection>,
    wsock: Mutex<TcpStream>,
    /// Sealed records on their way to the socket, taken only while holding `wsock`: kept
    /// across writes, so a data stream does not allocate (and fault in) a buffer per write.
    out: Mutex<Vec<u8>>,
    peer: String,
}

/// Whether `e` is a socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO` report `EAGAIN`).
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A timeout named for the operator: which peer, which way, for how long.
fn silent(peer: &str, what: &str, t: Option<Duration>) -> io::Error {
    let secs = t.map_or(0.0, |t| t.as_secs_f64());
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("the peer {peer} {what} for {secs:.0} s (peer timeout)"),
    )
}

impl Shared {
    fn tls(&self) -> MutexGuard<'_, rustls::Connection> {
        lock(&self.tls)
    }

    /// Seals what rustls has pending and sends it, keeping record order; with `try_only`
    /// gives up (leaving the records for the next writer) when the socket is busy.
    fn flush_tls(
        &self,
        mut tls: MutexGuard<'_, rustls::Connection>,
        try_only: bool,
    ) -> io::Result<()> {
        if !tls.wants_write() {
            return Ok(());
        }
        let mut sock = match self.wsock.try_lock() {
            Ok(s) => s,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) if try_only => return Ok(()),
            Err(TryLockError::WouldBlock) => lock(&self.wsock),
        };
        let mut out = lock(&self.out);
        out.clear();
        while tls.wants_write() {
            tls.write_tls(&mut *out)?;
        }
        drop(tls);
        sock.write_all(&out).map_err(|e| {
            if is_timeout(&e) {
                silent(
                    &self.peer,
                    "took no data",
                    sock.write_timeout().ok().flatten(),
                )
            } else {
                e
            }
        })
    }
}

/// An established connection (handshake done), ready to be split.
pub struct Conn {
    shared: Arc<Shared>,
    rsock: TcpStream,
    peer: String,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("peer", &self.peer).finish()
    }
}

impl Conn {
    /// Runs the TLS handshake on `sock` (bounded by `timeout`) and wraps the result.
    pub fn handshake(
        sock: TcpStream,
        tls: impl Into<rustls::Connection>,
        timeout: Duration,
    ) -> io::Result<Self> {
        let mut tls: rustls::Connection = tls.into();
        let peer = sock
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        let mut s = &sock;
        while tls.is_handshaking() {
            tls.complete_io(&mut s)?;
        }
        // The client's last flight (its Finished) may still be pending.
        while tls.wants_write() {
            tls.write_tls(&mut s)?;
        }
        sock.set_read_timeout(None)?;
        sock.set_write_timeout(None)?;
        let rsock = sock.try_clone()?;
        Ok(Self {
            shared: Arc::new(Shared {
                tls: Mutex::new(tls),
                wsock: Mutex::new(sock),
                out: Mutex::new(Vec::new()),
                peer: peer.clone(),
            }),
            rsock,
            peer,
        })
    }

    /// The peer's address, for logs.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Limits how long a read may wait for the peer (`None`: forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.rsock.set_read_timeout(t)
    }

    /// Limits how long a write may wait for the peer to take data (`None`: forever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.rsock.set_write_timeout(t)
    }

    /// The two halves.
    pub fn split(self) -> (ConnReader, ConnWriter) {
        (
            ConnReader {
                shared: Arc::clone(&self.shared),
                sock: self.rsock,
                buf: vec![0u8; READ_BUF],
                start: 0,
                end: 0,
            },
            ConnWriter {
                shared: self.shared,
            },
        )
    }
}

/// The reading half.
pub struct ConnReader {
    shared: Arc<Shared>,
    sock: TcpStream,
    buf: Vec<u8>,
    /// Socket bytes not yet handed to rustls: `buf[start..end]`.
    start: usize,
    end: usize,
}

/// The writing half.
pub struct ConnWriter {
    shared: Arc<Shared>,
}

impl ConnWriter {
    /// Sends close_notify and shuts the socket's write side; the peer reads a clean end.
    pub fn close(&mut self) -> io::Result<()> {
        let mut tls = self.shared.tls();
        tls.send_close_notify();
        self.shared.flush_tls(tls, false)?;
        let sock = lock(&self.shared.wsock);
        sock.shutdown(Shutdown::Write)
    }

    /// Cuts the connection both ways at once (the reader sees an error); for aborts.
    pub fn abort(&self) {
        if let Ok(s) = self.shared.wsock.try_lock() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Read for ConnReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut tls = self.shared.tls();
                match tls.reader().read(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            // rustls holds at most 16 KiB of plaintext: feed it more only once it is drained.
            let eof = if self.start == self.end {
                let n = match self.sock.read(&mut self.buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if is_timeout(&e) => {
                        let t = self.sock.read_timeout().ok().flatten();
                        return Err(silent(&self.shared.peer, "sent nothing", t));
                    }
                    Err(e) => return Err(e),
                };
                self.start = 0;
                self.end = n;
                n == 0
            } else {
                false
            };
            let mut tls = self.shared.tls();
            let mut data = &self.buf[self.start..self.end];
            let before = data.len();
            // An empty slice tells rustls the peer closed the TCP stream.
            tls.read_tls(&mut data)?;
            self.start += before - data.len();
            if let Err(e) = tls.process_new_packets() {
                // Tell the peer why (an alert) before giving up.
                let _ = self.shared.flush_tls(tls, true);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            if eof {
                // rustls now reports either a clean close (Ok(0)) or an unexpected EOF.
                return tls.reader().read(out);
            }
            self.shared.flush_tls(tls, true)?;
        }
    }
}

impl Write for ConnWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut tls = self.shared.tls();
        let n = tls.writer().write(buf)?;
        self.shared.flush_tls(tls, false)?;
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the TLS connection accepts no more data",
            ));
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let tls = self.shared.tls();
        self.shared.flush_tls(tls, false)
    }
}
