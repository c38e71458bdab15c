//! Deletes, on worker threads, what a listing left out: freeing a file's blocks can wait on
//! the device (ext4 mounted `discard` without a journal discards synchronously, per file), and
//! on the control thread that wait would stall the whole listing once per deleted file.
//!
//! Only names a complete directory listing did not name are handed over, so no later entry of
//! the pass can need them; the control thread drains the reaper before it sets directory times
//! (a deletion changes its directory's mtime) and before the checkpoint.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::fcntl::OFlag;
use nix::sys::stat::FileStat;
use nix::unistd::UnlinkatFlags;

use super::lossy;
use super::proto::S_IFDIR;
use super::recv::{kind_of, stat_at, TEMP_PREFIX};
use super::sys;

/// Worker threads: enough for the device to overlap several discards.
const THREADS: usize = 4;
/// Deletions queued at most; the control thread waits beyond that. Each one may hold the only
/// descriptor of its directory (the cache has closed its own), so this bounds the descriptors
/// the reaper keeps open, well under the 1024 a service gets by default.
const QUEUE: usize = 256;

/// Removes `name` from `dir` (a directory recursively), never following a symlink. Returns the
/// entries removed.
pub(super) fn remove(dir: BorrowedFd<'_>, name: &[u8], st: &FileStat) -> std::io::Result<u64> {
    if kind_of(st) != S_IFDIR {
        nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            std::ffi::OsStr::from_bytes(name),
            UnlinkatFlags::NoRemoveDir,
        )?;
        return Ok(1);
    }
    let fd = sys::openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
        0,
    )?;
    let mut n = 0;
    for child in sys::list_dir(fd.as_fd())? {
        if let Some(cst) = stat_at(fd.as_fd(), &child)? {
            n += remove(fd.as_fd(), &child, &cst)?;
        }
    }
    nix::unistd::unlinkat(
        Some(dir.as_raw_fd()),
        std::ffi::OsStr::from_bytes(name),
        UnlinkatFlags::RemoveDir,
    )?;
    Ok(n + 1)
}

/// One name to delete.
struct Doomed {
    dir: Arc<OwnedFd>,
    name: Vec<u8>,
    /// Target-relative path, for the warning when it cannot be deleted.
    rel: Vec<u8>,
}

/// What the workers did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reaped {
    /// Entries deleted, recursively counted, leftovers of interrupted sessions not included.
    pub deleted: u64,
    /// Names that could not be deleted.
    pub failed: u64,
}

impl std::ops::AddAssign for Reaped {
    fn add_assign(&mut self, r: Reaped) {
        self.deleted += r.deleted;
        self.failed += r.failed;
    }
}

/// Deletion workers, started on the first deletion of a session.
#[derive(Default)]
pub(super) struct Reaper {
    tx: Option<SyncSender<Doomed>>,
    workers: Vec<JoinHandle<Reaped>>,
    done: Reaped,
}

impl Reaper {
    /// Deletes `name` (and everything below it) from `dir` soon.
    pub fn delete(&mut self, dir: Arc<OwnedFd>, name: Vec<u8>, rel: Vec<u8>) {
        let job = Doomed { dir, name, rel };
        if self.tx.is_none() {
            self.start();
        }
        let job = match &self.tx {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                // Every worker is gone (each ends only when the queue closes, so this is a
                // panic): delete here.
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        self.done += reap(&job);
    }

    fn start(&mut self) {
        let (tx, rx) = mpsc::sync_channel::<Doomed>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..THREADS {
            let rx = Arc::clone(&rx);
            match std::thread::Builder::new()
                .name(format!("reap-{i}"))
                .spawn(move || work(&rx))
            {
                Ok(h) => self.workers.push(h),
                Err(e) => tracing::warn!(error = %e, "cannot start a deletion worker"),
            }
        }
        // Without workers, `delete` deletes on the caller's thread.
        if !self.workers.is_empty() {
            self.tx = Some(tx);
        }
    }

    /// Waits until everything handed over is deleted; returns what was done since the last
    /// drain.
    pub fn drain(&mut self) -> Reaped {
        self.tx = None;
        for h in std::mem::take(&mut self.workers) {
            self.done += h.join().unwrap_or(Reaped {
                deleted: 0,
                failed: 1,
            });
        }
        std::mem::take(&mut self.done)
    }
}

impl Drop for Reaper {
    /// A failed session still finishes its deletions before the next one starts.
    fn drop(&mut self) {
        self.drain();
    }
}

fn work(rx: &Mutex<Receiver<Doomed>>) -> Reaped {
    let mut out = Reaped::default();
    loop {
        let job = match rx.lock() {
            Ok(q) => q.recv(),
            Err(_) => return out,
        };
        let Ok(job) = job else {
            return out;
        };
        out += reap(&job);
    }
}

fn reap(job: &Doomed) -> Reaped {
    let dir = job.dir.as_fd();
    let r = stat_at(dir, &job.name).and_then(|st| match st {
        Some(st) => remove(dir, &job.name, &st),
        None => Ok(0),
    });
    match r {
        Ok(_) if job.name.starts_with(TEMP_PREFIX) => Reaped::default(),
        Ok(k) => Reaped {
            deleted: k,
            failed: 0,
        },
        Err(e) => {
            tracing::warn!(path = %lossy(&job.rel), error = %e, "not deleted");
            Reaped {
                deleted: 0,
                failed: 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletes_files_and_trees_and_counts_them() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        std::fs::write(root.join("a/b/c/f"), b"x").unwrap();
        std::fs::write(root.join("a/g"), b"y").unwrap();
        std::fs::write(root.join("h"), b"z").unwrap();
        std::fs::write(root.join(".sms~0000000000000001.7"), b"left over").unwrap();
        std::os::unix::fs::symlink(root.join("h"), root.join("l")).unwrap();
        let fd = Arc::new(sys::open(root, OFlag::O_RDONLY | OFlag::O_DIRECTORY).unwrap());
        let mut r = Reaper::default();
        for n in ["a", "h", "l", "missing", ".sms~0000000000000001.7"] {
            r.delete(
                Arc::clone(&fd),
                n.as_bytes().to_vec(),
                n.as_bytes().to_vec(),
            );
        }
        // a, a/b, a/b/c, a/b/c/f, a/g, h, l; the leftover is deleted, not counted.
        assert_eq!(
            r.drain(),
            Reaped {
                deleted: 7,
                failed: 0
            }
        );
        assert_eq!(std::fs::read_dir(root).unwrap().count(), 0);
        // Usable again after a drain.
        std::fs::write(root.join("k"), b"k").unwrap();
        r.delete(Arc::clone(&fd), b"k".to_vec(), b"k".to_vec());
        assert_eq!(r.drain().deleted, 1);
    }

    #[test]
    fn a_failed_deletion_is_counted_not_fatal() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        // A regular file as the "directory": every unlinkat in it fails with ENOTDIR.
        let fd = Arc::new(sys::open(&file, OFlag::O_RDONLY).unwrap());
        let mut r = Reaper::default();
        r.delete(fd, b"x".to_vec(), b"f/x".to_vec());
        assert_eq!(r.drain().failed, 1);
        assert!(file.exists());
    }
}
