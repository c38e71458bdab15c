//! Sessions over mutual TLS: the target's listener, which authenticates every connection,
//! reads its `Hello` and hands control streams to the engine of their mode and data streams
//! to the session they name; and the source's connector, which opens those streams.

use crate::lock;
use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::code::Code;
use crate::conn::{Conn, ConnReader, ConnWriter};
use crate::wire::{Message, Mode, WireError, VERSION};

/// How long a TLS handshake plus `Hello` may take before the connection is dropped: an
/// unauthenticated peer must not hold a thread for long.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a peer may stay silent on any stream, or take no data, before the session is
/// given up, unless configured (`--peer-timeout`). Both sides send keep-alives well within it
/// whenever they are legitimately quiet, so only a dead, stopped or cut-off peer reaches it.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(120);
/// TCP keep-alive: first probe after this much idleness, then every `KEEPALIVE_INTERVAL`, and
/// the connection is dropped after `KEEPALIVE_PROBES` unanswered ones. A host that vanished
/// (power cut, link cut without FIN or RST) is then noticed by the kernel in about 90 s even
/// where no read or write is pending.
const KEEPALIVE_IDLE: u32 = 30;
const KEEPALIVE_INTERVAL: u32 = 10;
const KEEPALIVE_PROBES: u32 = 6;

/// The peer timeout to use: `t`, or [`PEER_TIMEOUT`] when `t` is zero (options built with
/// `Default`).
pub fn peer_timeout(t: Duration) -> Duration {
    if t.is_zero() {
        PEER_TIMEOUT
    } else {
        t
    }
}

/// How often a quiet side sends a keep-alive under peer timeout `t`: four per timeout, so
/// one delayed or lost tick never makes the other side give up.
pub fn keepalive_every(t: Duration) -> Duration {
    (peer_timeout(t) / 4).max(Duration::from_millis(100))
}

/// Turns on TCP keep-alive probes (best effort: a socket that refuses still works, only
/// without the kernel's dead-peer detection).
fn tcp_keepalive(sock: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let r = setsockopt(sock, sockopt::KeepAlive, &true)
        .and_then(|()| setsockopt(sock, sockopt::TcpKeepIdle, &KEEPALIVE_IDLE))
        .and_then(|()| setsockopt(sock, sockopt::TcpKeepInterval, &KEEPALIVE_INTERVAL))
        .and_then(|()| setsockopt(sock, sockopt::TcpKeepCount, &KEEPALIVE_PROBES));
    if let Err(e) = r {
        tracing::debug!(error = %e, "TCP keep-alive not set");
    }
}

/// Most data streams one session may open.
pub const MAX_STREAMS: u16 = 64;
/// Most sessions served at once; more are refused (each holds threads and buffers).
pub const MAX_SESSIONS: usize = 16;
/// Most connections in their TLS handshake or `Hello` at once: each holds a thread, and a
/// peer needs no certificate to open one; more are dropped at once.
pub const MAX_HANDSHAKES: usize = 64;
/// Least time between two warnings about dropped connections: a flood must not flood the log.
const DROP_LOG_EVERY: Duration = Duration::from_secs(5);
/// Buffer of each stream's reader and writer: several frames per syscall on the small ones.
const STREAM_BUF: usize = 256 << 10;

/// Why a connection or session failed; each maps to the SMS code an operator will see.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The target cannot be reached (SMS.1807).
    #[error("{code}: cannot connect to the target {addr}: {source}", code = Code::TargetUnreachable)]
    Connect {
        /// `host:port`.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// TLS failed: a certificate the peer refused, or the peer's we refused (SMS.0304).
    #[error("{code}: TLS with {peer} failed: {source}", code = Code::TlsAuthFailed)]
    Tls {
        /// Peer address.
        peer: String,
        /// Why.
        source: std::io::Error,
    },
    /// A message that does not fit the protocol state, or a malformed one.
    #[error("{code}: protocol error with {peer}: {what}", code = Code::TransmissionFailed)]
    Protocol {
        /// Peer address.
        peer: String,
        /// What was wrong.
        what: String,
    },
    /// The peer reported an error.
    #[error("{code}: the peer reported: {message}")]
    Remote {
        /// SMS code.
        code: String,
        /// Text.
        message: String,
    },
    /// The wire failed (SMS.1908 data transmission failed).
    #[error("{code}: data transmission failed: {0}", code = Code::TransmissionFailed)]
    Wire(#[from] WireError),
}

impl SessionError {
    /// The SMS error code to report.
    pub fn code(&self) -> Code {
        match self {
            SessionError::Connect { .. } => Code::TargetUnreachable,
            SessionError::Tls { .. } => Code::TlsAuthFailed,
            SessionError::Protocol { .. } | SessionError::Wire(_) => Code::TransmissionFailed,
            SessionError::Remote { code, .. } => Code::parse(code),
        }
    }
}

/// One authenticated stream: buffered halves plus who it is.
pub struct Stream {
    /// Reads frames.
    pub reader: BufReader<ConnReader>,
    /// Writes frames (flush to send).
    pub writer: BufWriter<ConnWriter>,
    /// Peer address, for logs.
    pub peer: String,
    conn_ctl: ConnCtl,
}

/// Socket controls that outlive the split.
struct ConnCtl {
    sock: TcpStream,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("peer", &self.peer).finish()
    }
}

impl Stream {
    fn new(conn: Conn, sock: TcpStream) -> Self {
        let peer = conn.peer().to_string();
        let (r, w) = conn.split();
        Self {
            reader: BufReader::with_capacity(STREAM_BUF, r),
            writer: BufWriter::with_capacity(STREAM_BUF, w),
            peer,
            conn_ctl: ConnCtl { sock },
        }
    }

    /// Sends one message (buffered; call [`Stream::flush`] to push it out).
    pub fn send(&mut self, m: &Message) -> Result<(), WireError> {
        m.write_to(&mut self.writer)
    }

    /// Pushes buffered messages to the peer.
    pub fn flush(&mut self) -> Result<(), WireError> {
        self.writer
            .flush()
            .map_err(|e| WireError::Io(e.to_string()))
    }

    /// Reads one message.
    pub fn recv(&mut self) -> Result<Message, WireError> {
        Message::read_from(&mut self.reader)
    }

    /// Read timeout of the underlying socket.
    pub fn set_read_timeout(&self, t: Option<Duration>) {
        let _ = self.conn_ctl.sock.set_read_timeout(t);
    }

    /// Write timeout of the underlying socket.
    pub fn set_write_timeout(&self, t: Option<Duration>) {
        let _ = self.conn_ctl.sock.set_write_timeout(t);
    }

    /// Read and write timeout at once: the peer timeout of a session's stream.
    pub fn set_timeouts(&self, t: Duration) {
        self.set_read_timeout(Some(t));
        self.set_write_timeout(Some(t));
    }

    /// Whether the peer has closed or reset the connection, even with data of it still
    /// unread (a sender that gave up while its session waited for its turn).
    pub fn peer_gone(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let mut fds = [PollFd::new(
            self.conn_ctl.sock.as_fd(),
            PollFlags::from_bits_retain(nix::libc::POLLRDHUP)
                | PollFlags::POLLHUP
                | PollFlags::POLLERR,
        )];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// A handle that can cut this stream from another thread (`shutdown`), e.g. to end a
    /// control stream when a data stream failed.
    pub fn cutter(&self) -> Option<TcpStream> {
        self.conn_ctl.sock.try_clone().ok()
    }

    /// Sends an error to the peer, best effort.
    pub fn send_error(&mut self, code: &Code, message: &str) {
        let mut msg: String = message.chars().take(1000).collect();
        if msg.len() > crate::wire::MAX_STRING {
            msg.truncate(0);
        }
        let _ = self.send(&Message::Error {
            code: code.to_string(),
            message: msg,
        });
        let _ = self.flush();
    }

    /// Splits into an owned reader and writer for two threads.
    pub fn into_halves(self) -> (BufReader<ConnReader>, BufWriter<ConnWriter>) {
        (self.reader, self.writer)
    }

    /// Ends the stream cleanly (close_notify).
    pub fn close(mut self) {
        let _ = self.writer.flush();
        let _ = self.writer.get_mut().close();
    }
}

/// What the listener hands an engine: the control stream and the data streams as they join.
pub struct Incoming {
    /// The task the session belongs to.
    pub task_id: String,
    /// Transfer mode.
    pub mode: Mode,
    /// Data streams announced.
    pub streams: u16,
    /// Session id.
    pub session: u64,
    /// The control stream (HelloAck already sent).
    pub control: Stream,
    /// Data streams of this session, each after its HelloAck.
    pub data: Receiver<Stream>,
}

/// A session's way to its data streams, and how many may still join it: a peer opening more
/// than it announced would have them queue, each with its buffers, until the session ends.
struct Joining {
    tx: Sender<Stream>,
    left: u16,
}

type Registry = Arc<Mutex<HashMap<u64, Joining>>>;

/// A session id nobody can guess: the data streams prove they belong with it (on top of TLS).
fn new_session_id() -> u64 {
    crate::random_u64() | 1
}

/// Unregisters a session when its engine returns.
pub struct SessionGuard {
    registry: Registry,
    id: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Ok(mut r) = self.registry.lock() {
            r.remove(&self.id);
        }
    }
}

/// The target's listener.
pub struct Listener {
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    registry: Registry,
}

impl Listener {
    /// Binds `addr`.
    pub fn bind(addr: &str, tls: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(addr)?,
            tls,
            registry: Arc::default(),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections forever; `engine` runs (on its own thread) for every new session and
    /// returns whether the listener should stop (`--once`). Returns when an engine asked to stop.
    pub fn serve<F>(&self, engine: F) -> std::io::Result<()>
    where
        F: Fn(Incoming, SessionGuard) -> bool + Send + Sync + 'static,
    {
        let engine = Arc::new(engine);
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let watch = Watch::start();
        let mut drops = Drops::default();
        self.listener.set_nonblocking(true)?;
        loop {
            if stop_rx.try_recv().is_ok() {
                return Ok(());
            }
            let sock = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Wake at the next connection (a sleep here delayed each of a session's
                    // streams), or after a while to see a stop.
                    use std::os::fd::AsFd;
                    let mut fds = [nix::poll::PollFd::new(
                        self.listener.as_fd(),
                        nix::poll::PollFlags::POLLIN,
                    )];
                    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let _ = sock.set_nonblocking(false);
            tcp_keepalive(&sock);
            // Every accepted connection holds a handshake slot until its Hello is routed: an
            // unauthenticated flood gets at most MAX_HANDSHAKES threads, never the process.
            let Some(slot) = Slot::take(&handshakes, &watch, &sock) else {
                let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                drops.note("too many connections in their handshake", &peer);
                continue;
            };
            let tls = Arc::clone(&self.tls);
            let registry = Arc::clone(&self.registry);
            let engine = Arc::clone(&engine);
            let stop_tx = stop_tx.clone();
            let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let spawned = std::thread::Builder::new()
                .name("sms-conn".into())
                .spawn(move || {
                    let accepted = accept_one(sock, tls, &registry);
                    drop(slot);
                    match accepted {
                        Ok(Some((inc, guard))) => {
                            tracing::info!(peer = %peer, task_id = %inc.task_id, streams = inc.streams, "session started");
                            if engine(inc, guard) {
                                let _ = stop_tx.send(());
                            }
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(peer = %peer, error = %e, "connection refused"),
                    }
                });
            // On failure the closure, and with it the socket and its slot, is dropped.
            if let Err(e) = spawned {
                drops.note("cannot start a thread", &e);
            }
        }
    }
}

/// One of the [`MAX_HANDSHAKES`] handshake slots, its socket watched until its deadline;
/// given back on drop.
struct Slot {
    count: Arc<AtomicUsize>,
    watch: Arc<Watch>,
    id: u64,
}

impl Slot {
    fn take(count: &Arc<AtomicUsize>, watch: &Arc<Watch>, sock: &TcpStream) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_HANDSHAKES).then_some(n + 1)
            })
            .ok()?;
        Some(Self {
            count: Arc::clone(count),
            watch: Arc::clone(watch),
            id: watch.add(sock),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.watch.remove(self.id);
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Cuts connections still in their handshake or `Hello` at [`HELLO_TIMEOUT`] after their
/// accept: a socket timeout bounds each read, not a peer that sends a byte now and then.
#[derive(Default)]
struct Watch {
    next: AtomicU64,
    socks: Mutex<HashMap<u64, (Instant, TcpStream)>>,
}

impl Watch {
    /// A watch with its one thread, which ends with the last reference to the watch.
    fn start() -> Arc<Self> {
        let watch = Arc::new(Self::default());
        let weak = Arc::downgrade(&watch);
        let spawned = std::thread::Builder::new()
            .name("sms-hello-watch".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                match weak.upgrade() {
                    Some(w) => w.cut_late(),
                    None => return,
                }
            });
        if let Err(e) = spawned {
            // Each read of a handshake is still bounded by its socket timeout.
            tracing::warn!(error = %e, "cannot start the handshake watchdog");
        }
        watch
    }

    fn socks(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Instant, TcpStream)>> {
        lock(&self.socks)
    }

    fn add(&self, sock: &TcpStream) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(s) = sock.try_clone() {
            self.socks().insert(id, (Instant::now() + HELLO_TIMEOUT, s));
        }
        id
    }

    fn remove(&self, id: u64) {
        self.socks().remove(&id);
    }

    fn cut_late(&self) {
        let now = Instant::now();
        self.socks().retain(|_, (deadline, s)| {
            let late = *deadline <= now;
            if late {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            !late
        });
    }
}

/// Warnings about connections the listener dropped unserved: at most one per
/// [`DROP_LOG_EVERY`], with the number dropped since the last one.
#[derive(Default)]
struct Drops {
    last: Option<Instant>,
    unlogged: u64,
}

impl Drops {
    /// Counts one connection dropped (the caller drops the socket), and warns when due.
    fn note(&mut self, reason: &'static str, detail: &dyn std::fmt::Display) {
        self.unlogged += 1;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < DROP_LOG_EVERY)
        {
            return;
        }
        self.last = Some(now);
        tracing::warn!(
            reason,
            detail = %detail,
            dropped = self.unlogged,
            "connections dropped unserved"
        );
        self.unlogged = 0;
    }
}

/// Handshake, `Hello`, and routing of one connection; a new session is returned to run.
fn accept_one(
    sock: TcpStream,
    tls: Arc<rustls::ServerConfig>,
    registry: &Registry,
) -> Result<Option<(Incoming, SessionGuard)>, SessionError> {
    let peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let server = rustls::ServerConnection::new(tls).map_err(|e| SessionError::Tls {
        peer: peer.clone(),
        source: std::io::Error::other(e),
    })?;
    let ctl = sock.try_clone().map_err(|e| SessionError::Tls {
        peer: peer.clone(),
        source: e,
    })?;
    let conn = Conn::handshake(sock, server, HELLO_TIMEOUT).map_err(|e| SessionError::Tls {
        peer: peer.clone(),
        source: e,
    })?;
    let mut s = Stream::new(conn, ctl);
    s.set_read_timeout(Some(HELLO_TIMEOUT));
    let hello = s.recv()?;
    s.set_read_timeout(None);
    let Message::Hello {
        task_id,
        mode,
        stream,
        streams,
        session,
    } = hello
    else {
        s.send_error(&Code::TransmissionFailed, "expected Hello");
        return Err(SessionError::Protocol {
            peer,
            what: "the first message was not Hello".into(),
        });
    };
    if streams == 0 || streams > MAX_STREAMS || stream > streams {
        s.send_error(&Code::TransmissionFailed, "bad stream numbers");
        return Err(SessionError::Protocol {
            peer,
            what: format!("stream {stream} of {streams} (1–{MAX_STREAMS} data streams allowed)"),
        });
    }
    let mut reg = lock(registry);
    if stream == 0 {
        if reg.len() >= MAX_SESSIONS {
            drop(reg);
            s.send_error(
                &Code::TransmissionFailed,
                "the target serves too many sessions",
            );
            return Err(SessionError::Protocol {
                peer,
                what: "too many sessions".into(),
            });
        }
        let id = new_session_id();
        let (tx, rx) = mpsc::channel();
        reg.insert(id, Joining { tx, left: streams });
        drop(reg);
        s.send(&Message::HelloAck {
            version: VERSION,
            session: id,
        })?;
        s.flush()?;
        let guard = SessionGuard {
            registry: Arc::clone(registry),
            id,
        };
        return Ok(Some((
            Incoming {
                task_id,
                mode,
                streams,
                session: id,
                control: s,
                data: rx,
            },
            guard,
        )));
    }
    let Some(joining) = reg.get_mut(&session) else {
        drop(reg);
        s.send_error(&Code::TransmissionFailed, "no such session");
        return Err(SessionError::Protocol {
            peer,
            what: format!("data stream {stream} for an unknown session"),
        });
    };
    let Some(left) = joining.left.checked_sub(1) else {
        drop(reg);
        s.send_error(
            &Code::TransmissionFailed,
            "the session has all its data streams",
        );
        return Err(SessionError::Protocol {
            peer,
            what: format!("data stream {stream} past the number the session announced"),
        });
    };
    joining.left = left;
    let tx = joining.tx.clone();
    drop(reg);
    s.send(&Message::HelloAck {
        version: VERSION,
        session,
    })?;
    s.flush()?;
    let _ = tx.send(s);
    Ok(None)
}

/// The source's side: where the target is and how to authenticate.
#[derive(Clone)]
pub struct Connector {
    /// `host:port`.
    pub addr: String,
    /// Client TLS config (task CA, source certificate).
    pub tls: Arc<rustls::ClientConfig>,
    /// Connect timeout.
    pub timeout: Duration,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Connector {
    /// Opens stream `stream` of a session (0 = control, `session` 0) and returns it with the
    /// session id the target gave.
    pub fn open(
        &self,
        task_id: &str,
        mode: Mode,
        stream: u16,
        streams: u16,
        session: u64,
    ) -> Result<(Stream, u64), SessionError> {
        let connect_err = |e| SessionError::Connect {
            addr: self.addr.clone(),
            source: e,
        };
        let addrs: Vec<_> = self.addr.to_socket_addrs().map_err(connect_err)?.collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        let mut sock = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, self.timeout) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let sock = sock.ok_or_else(|| connect_err(last))?;
        tcp_keepalive(&sock);
        let host = self
            .addr
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']))
            .unwrap_or("sms-target")
            .to_string();
        // The name only fills SNI: the certificate is checked against the task CA, not a name.
        let name = rustls::pki_types::ServerName::try_from(host).unwrap_or(
            rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        );
        let peer = self.addr.clone();
        let client = rustls::ClientConnection::new(Arc::clone(&self.tls), name).map_err(|e| {
            SessionError::Tls {
                peer: peer.clone(),
                source: std::io::Error::other(e),
            }
        })?;
        let ctl = sock.try_clone().map_err(connect_err)?;
        let conn = Conn::handshake(sock, client, HELLO_TIMEOUT).map_err(|e| SessionError::Tls {
            peer: peer.clone(),
            source: e,
        })?;
        let mut s = Stream::new(conn, ctl);
        s.send(&Message::Hello {
            task_id: task_id.to_string(),
            mode,
            stream,
            streams,
            session,
        })?;
        s.flush()?;
        s.set_read_timeout(Some(HELLO_TIMEOUT));
        // A refused client certificate surfaces here, as the first read after the handshake.
        let reply = s.recv().map_err(|e| match e {
            WireError::Io(m) => SessionError::Tls {
                peer: peer.clone(),
                source: std::io::Error::other(m),
            },
            other => SessionError::Wire(other),
        })?;
        s.set_read_timeout(None);
        match reply {
            Message::HelloAck { version, session } if version == VERSION => Ok((s, session)),
            Message::HelloAck { version, .. } => Err(SessionError::Protocol {
                peer,
                what: format!("the target speaks protocol version {version}"),
            }),
            Message::Error { code, message } => Err(SessionError::Remote { code, message }),
            other => Err(SessionError::Protocol {
                peer,
                what: format!("expected HelloAck, got {}", name_of(&other)),
            }),
        }
    }
}

/// A short name of a message for error texts (never its data).
pub fn name_of(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "Hello",
        Message::HelloAck { .. } => "HelloAck",
        Message::DiskPlan { .. } => "DiskPlan",
        Message::Chunk { .. } => "Chunk",
        Message::Ack { .. } => "Ack",
        Message::Checkpoint { .. } => "Checkpoint",
        Message::Error { .. } => "Error",
        Message::Bye => "Bye",
        Message::DoneMap { .. } => "DoneMap",
        Message::Ready => "Ready",
        Message::Zero { .. } => "Zero",
        Message::Done { .. } => "Done",
        Message::SumReq { .. } => "SumReq",
        Message::Sums { .. } => "Sums",
        Message::Mismatch { .. } => "Mismatch",
        Message::Accepted { .. } => "Accepted",
        Message::VerifyMap { .. } => "VerifyMap",
        Message::Echo { .. } => "Echo",
        Message::EchoReply { .. } => "EchoReply",
        Message::Fill { .. } => "Fill",
        Message::Filled { .. } => "Filled",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::tls::{client_config, server_config, Identity};

    /// A listener on loopback whose sessions wait for their data streams and then end, and a
    /// connector to it.
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
                for _ in 0..inc.streams {
                    let _ = inc.data.recv_timeout(Duration::from_secs(30));
                }
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
    fn a_handshake_that_trickles_is_cut_at_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let c = rig(dir.path());
        let mut s = TcpStream::connect(&c.addr).unwrap();
        // A TLS record header, a byte every second: each read on its own is quick.
        let started = std::time::Instant::now();
        let mut cut = false;
        for b in [22u8, 3, 1, 0x40, 0].iter().cycle() {
            if s.write_all(&[*b]).is_err() {
                cut = true;
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
            if started.elapsed() > HELLO_TIMEOUT * 3 {
                break;
            }
        }
        assert!(cut, "the trickling connection was never cut");
    }

    #[test]
    fn a_session_takes_no_more_data_streams_than_it_announced() {
        let dir = tempfile::tempdir().unwrap();
        let c = rig(dir.path());
        let (_ctl, session) = c.open("t", Mode::Block, 0, 1, 0).unwrap();
        let (_data, _) = c.open("t", Mode::Block, 1, 1, session).unwrap();
        let e = c.open("t", Mode::Block, 1, 1, session).unwrap_err();
        assert!(
            matches!(&e, SessionError::Remote { code, .. } if code == Code::TransmissionFailed.as_str()),
            "{e}"
        );
    }
}
