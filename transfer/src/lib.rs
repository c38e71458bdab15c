//! Block and file transfer engines, wire protocol and TLS setup of sms-agent.
//!
//! This crate is the third stage of the one-way data flow probe → agent → transfer. So far it
//! holds the mutual-TLS setup from the PEMs SMS hands out (`tls`), the certificates of
//! standalone mode (`certs`), the framed wire protocol (`wire`), chunk hashing and compression
//! (`chunk`), speed limits (`limit`), progress metering (`meter`) and the SMS error codes
//! every failure carries (`code`); the block and file engines that use them come next.
#![deny(unsafe_code)]

/// The TLS library the session types use, for callers that hold its configs.
pub use rustls;

pub use code::{Code, TaskFailure};

pub mod alloc;
pub mod block;
pub mod certs;
pub mod chunk;
pub mod code;
pub mod conn;
pub mod durable;
pub mod file;
pub mod limit;
pub mod meter;
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
