//! File-level migration: every file of the migrated filesystems, with all its metadata, over
//! the session's mutual-TLS streams.
//!
//! One pass = one session. The source lists its trees on the control stream; the target
//! compares each entry with what it has, creates directories, links and nodes at once, and asks
//! (`Need`) for the contents of regular files that are missing or differ — with its chunk sums
//! when it holds an older copy, so only changed chunks travel. The source's data streams send
//! those files in parallel (small files whole in one frame, large ones in chunks, holes
//! skipped, zstd when it pays); the target writes each under a temporary name and renames it
//! into place only when complete, owner, xattrs, mode and times set. After the data, hard links
//! and directory times, then a checkpoint the target acknowledges once `syncfs` is done.
//!
//! A first copy, an incremental sync and a resume after an interruption are the same pass: what
//! is complete on the target (final name, same size and mtime) is skipped, what vanished from
//! the source is deleted. [`consistency`] runs the same listing in check mode, changing nothing.
//!
//! Modules: [`proto`] messages, [`path`] path checks and excludes, [`walk`] the source walk,
//! [`journal`] the change journal (what a sync visits instead of everything), [`meta`]
//! metadata capture and apply, [`dirs`] the descriptor cache, [`recv`] the target, [`send`]
//! the source, `reap` the deletions, `squeeze` when compression pays, `sys` the few
//! unsafe syscalls.

pub(crate) mod direct;
pub mod dirs;
pub mod journal;
pub mod layout;
pub mod meta;
pub mod path;
pub mod proto;
mod reap;
pub mod recv;
pub mod send;
mod squeeze;
mod sys;
pub mod walk;

use std::path::PathBuf;

pub use path::{Excludes, PathError, DEFAULT_EXCLUDES};
pub use recv::{receive, ReceiveOptions, ReceiveReport};
pub use send::{consistency, send, CheckOptions, DirCheck, SendOptions, SendReport, STREAMS};

use crate::code::Code;
use crate::session::SessionError;
use crate::wire::WireError;

/// Why a file pass failed; [`FileError::code`] is the SMS code to report.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Opening or running the session failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The stream failed or carried a malformed frame (SMS.1908).
    #[error("{code}: data transmission failed: {0}", code = Code::TransmissionFailed)]
    Wire(#[from] WireError),
    /// A message the protocol state does not allow (SMS.1908).
    #[error("{code}: file protocol error: {0}", code = Code::TransmissionFailed)]
    Protocol(String),
    /// The peer reported an error.
    #[error("{code}: the peer reported: {message}")]
    Remote {
        /// SMS code.
        code: String,
        /// Text.
        message: String,
    },
    /// The source cannot be read (SMS.1901).
    #[error("{code}: cannot read {path}: {source}", code = Code::DiskUnreadable)]
    Source {
        /// What.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The target cannot write (SMS.1908).
    #[error("{code}: the target cannot write {path}: {source}", code = Code::TransmissionFailed)]
    Target {
        /// What.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The target's filesystem is full (SMS.1504): nothing of the file counts as written.
    #[error("{code}: no space left on the target for {path}: {}", space_text(*.needed, *.free), code = Code::DiskSizeMismatch)]
    NoSpace {
        /// What could not be written.
        path: String,
        /// Bytes it still needed, when known.
        needed: Option<u64>,
        /// Bytes free on its filesystem (for unprivileged writers), when known.
        free: Option<u64>,
    },
    /// A path from the peer was refused (SMS.1908).
    #[error("{code}: refused path {path:?}: {source}", code = Code::TransmissionFailed)]
    Path {
        /// The path, lossily.
        path: String,
        /// Why.
        source: PathError,
    },
    /// The target could not start a thread the session needs (a task limit reached).
    #[error("{code}: the target cannot start a thread for {what}: {source}", code = Code::TransmissionFailed)]
    Spawn {
        /// What the thread was for.
        what: &'static str,
        /// Why (EAGAIN at a task limit).
        source: std::io::Error,
    },
    /// Preparing or configuring the target disks failed (`receive --prepare`).
    #[error(transparent)]
    Prepare(#[from] crate::prepare::PrepareError),
    /// Bad options (nothing was sent).
    #[error("invalid file-migration options: {0}")]
    Options(String),
    /// The pass stopped at a checkpoint because it was cancelled; what was sent is durable.
    #[error("the file pass was cancelled at a checkpoint")]
    Cancelled,
}

impl FileError {
    /// The SMS error code to report.
    pub fn code(&self) -> Code {
        match self {
            FileError::Session(e) => e.code(),
            FileError::Source { .. } => Code::DiskUnreadable,
            FileError::NoSpace { .. } => Code::DiskSizeMismatch,
            FileError::Remote { code, .. } => Code::parse(code),
            FileError::Prepare(e) => e.code.clone(),
            FileError::Wire(_)
            | FileError::Protocol(_)
            | FileError::Target { .. }
            | FileError::Path { .. }
            | FileError::Spawn { .. }
            | FileError::Options(_)
            | FileError::Cancelled => Code::TransmissionFailed,
        }
    }

    fn path(path: &[u8], source: PathError) -> Self {
        FileError::Path {
            path: lossy(path),
            source,
        }
    }

    fn target(path: &[u8], source: impl Into<std::io::Error>) -> Self {
        let source = source.into();
        if is_no_space(&source) {
            return FileError::NoSpace {
                path: lossy(path),
                needed: None,
                free: None,
            };
        }
        FileError::Target {
            path: lossy(path),
            source,
        }
    }

    /// A write of `path` failed with `source`: a full filesystem (`fs`: any descriptor on
    /// it) becomes [`FileError::NoSpace`] with the bytes still `needed`.
    fn write_failed(
        path: &[u8],
        fs: std::os::fd::BorrowedFd<'_>,
        needed: Option<u64>,
        source: std::io::Error,
    ) -> Self {
        if !is_no_space(&source) {
            return FileError::target(path, source);
        }
        let free = nix::sys::statvfs::fstatvfs(fs)
            .ok()
            .map(|v| v.blocks_available().saturating_mul(v.fragment_size()));
        FileError::NoSpace {
            path: lossy(path),
            needed,
            free,
        }
    }
}

/// Whether a write failed because the filesystem (or the writer's quota) is full.
pub(crate) fn is_no_space(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::ENOSPC) | Some(nix::libc::EDQUOT)
    )
}

/// The "how much" of a [`FileError::NoSpace`].
fn space_text(needed: Option<u64>, free: Option<u64>) -> String {
    let needed = needed.map_or_else(
        || "more space is needed".to_string(),
        |n| format!("it needs {n} more bytes"),
    );
    match free {
        Some(f) => format!("{needed}, its filesystem has {f} bytes free; free some and run the pass again, it resumes"),
        None => format!("{needed}; free some and run the pass again, it resumes"),
    }
}

/// A path for messages (never for syscalls).
fn lossy(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(p);
    if s.len() > 300 {
        let mut cut = 300;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &s[..cut])
    } else {
        s.into_owned()
    }
}

/// Where a source root goes on the target: `/` → the root, `/boot` → `boot`, and with
/// `to_root` (standalone `--source-root DIR`) the root itself.
pub fn target_rel(source: &std::path::Path, to_root: bool) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    if to_root {
        return Vec::new();
    }
    let mut out = Vec::new();
    for c in source.components() {
        if let std::path::Component::Normal(n) = c {
            if !out.is_empty() {
                out.push(b'/');
            }
            out.extend_from_slice(n.as_bytes());
        }
    }
    out
}

/// The source path of a target-relative path under a root (for reports only).
fn source_path(root: &std::path::Path, src_rel: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    if src_rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(std::ffi::OsStr::from_bytes(src_rel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_map_below_the_target_root() {
        assert_eq!(target_rel("/".as_ref(), false), b"");
        assert_eq!(target_rel("/boot".as_ref(), false), b"boot");
        assert_eq!(target_rel("/var/lib/".as_ref(), false), b"var/lib");
        assert_eq!(target_rel("/srv/x".as_ref(), true), b"");
        assert_eq!(
            FileError::Source {
                path: "x".into(),
                source: std::io::Error::other("y")
            }
            .code(),
            "SMS.1901"
        );
        assert_eq!(lossy(&[b'a'; 400]).chars().count(), 301);
    }
}
