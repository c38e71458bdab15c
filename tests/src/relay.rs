//! A long link on one machine, without netem: a userspace TCP relay that delays each direction
//! by half the round trip, caps the rate of each direction (all connections share it, as
//! they share a real link), and stalls or cuts on demand.
//!
//! Each direction is a serialisation clock: a read of `n` bytes leaves the link `n·8/rate`
//! after the previous one left (or now, when the link is idle) and is delivered one way's delay
//! later. A reader whose bytes would wait longer than the queue limit sleeps first, so the
//! relay holds at most that much data in flight per direction and pushes back on the sender.
//!
//! The relay terminates TCP: the end hosts' kernels see a short loopback round trip, so it
//! models what the application does across the delay (requests and answers, acknowledgements,
//! pipelining, streams) but not the end hosts' TCP windows.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The link a relay emulates.
#[derive(Debug, Clone, Copy)]
pub struct LinkSpec {
    /// Round trip the relay adds (half each way).
    pub rtt: Duration,
    /// Rate of each direction in bit/s; 0: no cap.
    pub rate_bps: u64,
    /// Most queueing delay a direction holds before it pushes back on the sender.
    pub queue: Duration,
}

impl LinkSpec {
    /// A link of `rtt_ms` round trip and `mbit` Mbit/s each way (0: no cap), queue 50 ms.
    pub fn new(rtt_ms: u64, mbit: u64) -> Self {
        Self {
            rtt: Duration::from_millis(rtt_ms),
            rate_bps: mbit * 1_000_000,
            queue: Duration::from_millis(50),
        }
    }
}

/// One direction of the link: when it is next free.
struct Direction {
    free_at: Mutex<Instant>,
}

struct Shared {
    spec: LinkSpec,
    up: Direction,
    down: Direction,
    stall_until: Mutex<Option<Instant>>,
    conns: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
}

/// A running relay; stopped (and its connections cut) on drop.
pub struct Relay {
    /// HOST:PORT to connect to instead of the upstream.
    pub addr: String,
    shared: Arc<Shared>,
}

/// Bytes read at once from a socket.
const READ: usize = 64 << 10;

impl Relay {
    /// Listens on `listen` (e.g. `127.0.0.1:0`) and relays every connection to `upstream`
    /// over a link of `spec`.
    pub fn start(listen: &str, upstream: &str, spec: LinkSpec) -> std::io::Result<Self> {
        let l = TcpListener::bind(listen)?;
        let addr = l.local_addr()?.to_string();
        let now = Instant::now();
        let shared = Arc::new(Shared {
            spec,
            up: Direction {
                free_at: Mutex::new(now),
            },
            down: Direction {
                free_at: Mutex::new(now),
            },
            stall_until: Mutex::new(None),
            conns: Mutex::default(),
            stop: AtomicBool::new(false),
        });
        let sh = Arc::clone(&shared);
        let upstream = upstream.to_string();
        l.set_nonblocking(true)?;
        std::thread::spawn(move || {
            while !sh.stop.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if let Ok(server) = TcpStream::connect(&upstream) {
                            connect(&sh, client, server);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self { addr, shared })
    }

    /// Holds every byte in flight, both ways, for `d` from now (a link that stalls).
    pub fn stall(&self, d: Duration) {
        *self.shared.stall_until.lock().unwrap() = Some(Instant::now() + d);
    }

    /// Resets every connection (a link that drops).
    pub fn cut(&self) {
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut();
    }
}

fn connect(sh: &Arc<Shared>, client: TcpStream, server: TcpStream) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    {
        let mut conns = sh.conns.lock().unwrap();
        for s in [&client, &server] {
            if let Ok(c) = s.try_clone() {
                conns.push(c);
            }
        }
    }
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    pump(Arc::clone(sh), client, s2, true);
    pump(Arc::clone(sh), server, c2, false);
}

/// Moves bytes from `src` to `dst` across one direction of the link: a reader that stamps
/// each read with its delivery time, a writer that delivers it then.
fn pump(sh: Arc<Shared>, mut src: TcpStream, mut dst: TcpStream, up: bool) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let shr = Arc::clone(&sh);
    std::thread::spawn(move || {
        let dir = if up { &shr.up } else { &shr.down };
        let one_way = shr.spec.rtt / 2;
        let mut buf = vec![0u8; READ];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let now = Instant::now();
            let leaves = {
                let mut free = dir.free_at.lock().unwrap();
                let start = (*free).max(now);
                let ser = if shr.spec.rate_bps == 0 {
                    Duration::ZERO
                } else {
                    Duration::from_secs_f64(n as f64 * 8.0 / shr.spec.rate_bps as f64)
                };
                *free = start + ser;
                *free
            };
            if tx.send((leaves + one_way, buf[..n].to_vec())).is_err() || n == 0 {
                return;
            }
            // Back-pressure: hold further reads while the queue is over its limit.
            let ahead = leaves.saturating_duration_since(Instant::now());
            if ahead > shr.spec.queue {
                std::thread::sleep(ahead - shr.spec.queue);
            }
        }
    });
    std::thread::spawn(move || {
        for (at, data) in rx {
            loop {
                let stall = *sh.stall_until.lock().unwrap();
                let until = stall.map_or(at, |s| s.max(at));
                let now = Instant::now();
                if until <= now {
                    break;
                }
                std::thread::sleep(until - now);
            }
            if data.is_empty() {
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
            if dst.write_all(&data).is_err() {
                let _ = dst.shutdown(Shutdown::Both);
                return;
            }
        }
    });
}
