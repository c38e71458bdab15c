//! Block-level migration: whole source disks to mapped target disks over a session, reading
//! only the ranges the caller says are in use, resumable from the receiver's checkpoint, and
//! incremental by a two-level hash tree (chunk roots, then 4 KiB leaves).
//!
//! A pass (full copy = pass 0, sync passes after it) runs like this. On the control stream the
//! sender announces the plan; the receiver answers with the chunks it already holds durably
//! for that pass (its checkpoint) and `Ready`. N data streams then share the work items (one
//! chunk each, in offset order): a full pass sends the used data as `Chunk`/`Zero` frames and
//! `Done`; a sync pass first asks for the target's hashes (`SumReq`/`Sums`, pipelined), sends
//! only the leaves that differ, and `Done` carries the source chunk's root so the receiver
//! marks it done only when its copy hashes to it (else `Mismatch` and a resend). Every few
//! seconds the sender asks the receiver, on the control stream, to fdatasync and record what
//! it has (`Checkpoint`/`Ack`); a pass is complete when the receiver acks every item.

pub mod ckpt;
pub mod dev;
pub mod map;
mod recv;
mod send;

use std::ops::Range;
use std::path::PathBuf;

pub use recv::{receive, ReceiveOptions, ReceiveReport, TargetMap};
pub use send::{send, PassReport, SendOptions, STREAMS};

use crate::code::Code;
use crate::session::SessionError;
use crate::wire::WireError;

/// Default chunk size: the unit of resume and of sync comparison.
pub const DEFAULT_CHUNK: u32 = 1 << 20;

/// A source disk of a pass.
#[derive(Debug, Clone)]
pub struct SourceDisk {
    /// Device (or image) to read.
    pub path: PathBuf,
    /// Target disk name it is copied to.
    pub name: String,
    /// Byte ranges to read (sorted or not; clipped to the device); everything else is free.
    pub used: Vec<Range<u64>>,
}

/// Why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Connecting or talking to the peer failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The wire failed.
    #[error("{code}: data transmission failed: {0}", code = Code::TransmissionFailed)]
    Wire(#[from] WireError),
    /// A source disk could not be read.
    #[error("{code}: cannot read {path}: {source}", code = Code::VolumeUnreadable)]
    ReadDisk {
        /// The device.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A target disk could not be used or written.
    #[error("{code}: target disk {name} ({path}): {message}")]
    Target {
        /// SMS code (too small, not mapped, write failed).
        code: Code,
        /// Disk name.
        name: String,
        /// Its path on the target.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The peer broke the protocol.
    #[error("{code}: protocol error: {0}", code = Code::TransmissionFailed)]
    Protocol(String),
    /// The peer reported an error.
    #[error("{code}: the target reported: {message}")]
    Remote {
        /// SMS code.
        code: String,
        /// Text.
        message: String,
    },
    /// The receiver could not start a thread the session needs (a task limit reached).
    #[error("{code}: the target cannot start a thread for {what}: {source}", code = Code::TransmissionFailed)]
    Spawn {
        /// What the thread was for.
        what: &'static str,
        /// Why (EAGAIN at a task limit).
        source: std::io::Error,
    },
    /// The receiver's checkpoint could not be written.
    #[error("{code}: {0}", code = Code::TransmissionFailed)]
    Checkpoint(#[from] ckpt::CkptError),
    /// The pass was stopped (STOP, DELETE, a signal); the checkpoint holds what is done.
    #[error("{code}: the pass was stopped; it resumes from the last checkpoint", code = Code::TaskPaused)]
    Cancelled,
}

impl BlockError {
    /// The SMS error code for progress reports and command results.
    pub fn code(&self) -> Code {
        match self {
            BlockError::Session(e) => e.code(),
            BlockError::ReadDisk { .. } => Code::VolumeUnreadable,
            BlockError::Target { code, .. } => code.clone(),
            BlockError::Remote { code, .. } => Code::parse(code),
            BlockError::Cancelled => Code::TaskPaused,
            BlockError::Wire(_)
            | BlockError::Protocol(_)
            | BlockError::Checkpoint(_)
            | BlockError::Spawn { .. } => Code::TransmissionFailed,
        }
    }
}

/// Whether every byte of `b` is zero (word at a time).
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(16);
    let whole = words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0);
    whole && words.remainder().iter().all(|&x| x == 0)
}

/// Truncated BLAKE3 of one leaf.
pub(crate) fn leaf_hash(b: &[u8]) -> [u8; crate::wire::LEAF_HASH] {
    let mut out = [0u8; crate::wire::LEAF_HASH];
    out.copy_from_slice(&blake3::hash(b).as_bytes()[..crate::wire::LEAF_HASH]);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero_detection() {
        assert!(super::is_zero(&[]));
        assert!(super::is_zero(&[0; 4097]));
        let mut v = vec![0u8; 4097];
        v[4096] = 1;
        assert!(!super::is_zero(&v));
        v[4096] = 0;
        v[7] = 1;
        assert!(!super::is_zero(&v));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod e2e_tests;
