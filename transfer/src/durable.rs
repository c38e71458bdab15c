//! The one durable replacement of a small file: temp file, fsync, rename, fsync of the directory.
//!
//! A reader then sees either the old or the new content whatever instant the machine stops at;
//! checkpoints, the daemon's state and the standalone record all depend on that.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Mode of a file that only its owner may read: state files hold task ids and addresses.
pub const PRIVATE: u32 = 0o600;

/// Per-process counter that, with the pid, makes each writer's temp name its own: two threads
/// saving the same file at once must never write into one temp file.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `bytes` atomically and durably; a new file gets `mode` (less the umask).
///
/// The directory of `path` must exist. On failure `path` is untouched and the temp file removed.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = temp_name(path);
    let written = write_synced(&tmp, bytes, mode).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        // Best effort: the error that matters is the one being returned.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename is durable only once the directory entry is.
    File::open(dir).and_then(|d| d.sync_all())
}

/// A hidden name next to `path`, unique to this process and call.
fn temp_name(path: &Path) -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{}.{n}.tmp", std::process::id()));
    path.with_file_name(name)
}

fn write_synced(tmp: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn replaces_content_with_mode_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        write_atomic(&p, b"old", PRIVATE).unwrap();
        write_atomic(&p, b"new", PRIVATE).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn temp_names_differ_per_call() {
        let p = Path::new("/x/state.json");
        let (a, b) = (temp_name(p), temp_name(p));
        assert_ne!(a, b);
        assert_eq!(a.parent(), p.parent());
        assert!(a
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".state.json."));
    }

    #[test]
    fn concurrent_writers_each_leave_a_whole_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let bodies: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 64 << 10]).collect();
        std::thread::scope(|s| {
            for b in &bodies {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..10 {
                        write_atomic(p, b, PRIVATE).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&p).unwrap();
        assert!(bodies.contains(&got), "a torn or mixed file");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn failure_leaves_target_and_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_atomic(&p, b"kept", PRIVATE).unwrap();
        // A directory in the way of the rename makes it fail after the temp file was written.
        let blocked = d.path().join("sub");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("x"), b"").unwrap();
        assert!(write_atomic(&blocked, b"new", PRIVATE).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"kept");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
    }

    #[test]
    fn missing_directory_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("no/such/f");
        let e = write_atomic(&p, b"x", PRIVATE).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
