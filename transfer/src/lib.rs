//! Block and file transfer engines, wire protocol and TLS sessions of sms-agent.
//!
//! This crate is the third stage of the one-way data flow probe → agent → transfer: it moves
//! data between a source and a target, and holds both sides. Its modules:
//!
//! - [`wire`]: the framed, versioned wire protocol, its block-mode messages and the bounded
//!   reader every decoder uses (docs/wire.md).
//! - [`tls`]: the mutual-TLS set-up from the PEMs SMS hands out; [`certs`]: the CA and
//!   certificates of standalone mode.
//! - [`conn`]: a full-duplex TLS connection shared by a stream's reader and writer;
//!   [`session`]: the target's listener (handshake, `Hello`, sessions of one control and N data
//!   streams) and the source's connector.
//! - [`block`]: the block engine (whole disks, allocated chunks, checkpoints, hash-tree sync);
//!   which byte ranges of a filesystem are in use comes from `probe::alloc`.
//! - [`file`]: the file engine (listing, data streams, partials, deletions, consistency check).
//! - [`code`]: the SMS error codes every failure carries, and [`TaskFailure`];
//!   [`durable`]: the one atomic, durable file write (checkpoints, records, state).
//! - [`chunk`]: chunk hashing and zstd compression; [`limit`]: speed limits;
//!   [`meter`]: progress and rate metering; [`netcheck`]: the network check (delay, jitter,
//!   loss, bandwidth to a receiver); [`task`]: what a running pass shares with
//!   whoever watches and steers it (counters, cancel flag, speed-limit bucket).
//!
//! How the engines behave is described in docs/engines.md.
#![deny(unsafe_code)]

/// The TLS library the session types use, for callers that hold its configs.
pub use rustls;

pub use code::{Code, TaskFailure};

pub mod block;
pub mod certs;
pub mod chunk;
pub mod code;
pub mod conn;
pub mod durable;
pub mod file;
pub mod limit;
pub mod meter;
pub mod netcheck;
pub mod prepare;
pub mod sched;
pub mod session;
pub mod task;
pub mod tls;
pub mod wire;

/// Locks `m`, taking the data of a poisoned lock too: a thread that panicked holding one of
/// this crate's locks left counters or queues that are still consistent, and the session's
/// error path must still run.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// 64 bits nobody can guess (session and migration ids), from the kernel's random source; where
/// that cannot be read, a hash of the clock and the process id, unique but guessable.
pub fn random_u64() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mix = blake3::hash(format!("{t}:{}", std::process::id()).as_bytes());
        b.copy_from_slice(&mix.as_bytes()[..8]);
    }
    u64::from_le_bytes(b)
}

/// Test-only helpers shared by the modules' tests.
#[cfg(test)]
pub(crate) mod testutil {
    /// One step of xorshift64: cheap, seedable noise for no-panic loops over random input.
    pub(crate) fn xorshift(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }
}
