//! Freezing a source disk's mounted filesystems for a crash-consistent final block pass, with a
//! thaw guaranteed within the window whatever happens to this process: a guard child process
//! (`sms-agent thaw-guard`) thaws at the deadline, or at once when its parent dies.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use transfer::block::dev;

/// Longest freeze the agent allows: applications stall on writes while frozen.
pub const MAX_WINDOW: Duration = Duration::from_secs(30);

/// Why filesystems could not be frozen.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// The guard process did not start or did not report ready.
    #[error("the thaw guard did not start: {0}")]
    Guard(String),
    /// A filesystem refused FIFREEZE (everything frozen before it is thawed again).
    #[error("cannot freeze {path}: {source}")]
    Freeze {
        /// Mount point.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The mount points of filesystems on `dev`, its partitions, or devices stacked on them
/// (LVs), one per filesystem.
pub fn mounted_on(dev: &Path) -> Vec<PathBuf> {
    let Ok(canon) = std::fs::canonicalize(dev) else {
        return Vec::new();
    };
    let Some(name) = canon.file_name().and_then(|n| n.to_str()) else {
        return Vec::new();
    };
    let mut devs = BTreeSet::new();
    let sys = Path::new("/sys/class/block").join(name);
    let mut todo = vec![sys.clone()];
    // The disk's partitions are subdirectories holding `partition`.
    if let Ok(rd) = std::fs::read_dir(&sys) {
        for e in rd.flatten() {
            if e.path().join("partition").exists() {
                todo.push(e.path());
            }
        }
    }
    while let Some(d) = todo.pop() {
        if let Some(n) = read_devno(&d.join("dev")) {
            if !devs.insert(n) {
                continue;
            }
        }
        if let Ok(rd) = std::fs::read_dir(d.join("holders")) {
            todo.extend(
                rd.flatten()
                    .map(|h| Path::new("/sys/class/block").join(h.file_name())),
            );
        }
    }
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut seen = BTreeSet::new();
    probe::mounts::parse_mountinfo(&text)
        .0
        .into_iter()
        .filter(|m| devs.contains(&m.dev) && seen.insert(m.dev))
        .map(|m| PathBuf::from(m.mount_point))
        .collect()
}

fn read_devno(p: &Path) -> Option<(u32, u32)> {
    let s = std::fs::read_to_string(p).ok()?;
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Filesystems frozen until [`Frozen::thaw`] or drop, or until the guard's deadline.
pub struct Frozen {
    dirs: Vec<(PathBuf, File)>,
    guard: Option<(Child, ChildStdin)>,
    deadline: Instant,
}

impl Frozen {
    /// Starts the guard, then freezes each of `mounts`; on any failure everything is thawed.
    pub fn freeze(mounts: &[PathBuf], window: Duration) -> Result<Self, FreezeError> {
        let window = window.min(MAX_WINDOW);
        let exe = std::env::current_exe().map_err(|e| FreezeError::Guard(e.to_string()))?;
        let mut child = Command::new(exe)
            .arg("thaw-guard")
            .arg("--within-ms")
            .arg(window.as_millis().to_string())
            .args(mounts)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| FreezeError::Guard(e.to_string()))?;
        let ready = child.stdout.take().map(|o| {
            let mut line = String::new();
            let _ = BufReader::new(o).read_line(&mut line);
            line
        });
        let Some(stdin) = child
            .stdin
            .take()
            .filter(|_| ready.as_deref() == Some("ready\n"))
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(FreezeError::Guard(
                "it did not report ready (cannot open a mount point?)".into(),
            ));
        };
        let deadline = Instant::now() + window;
        let mut me = Self {
            dirs: Vec::new(),
            guard: Some((child, stdin)),
            deadline,
        };
        for (i, m) in mounts.iter().enumerate() {
            let f = File::open(m).map_err(|source| FreezeError::Freeze {
                path: m.clone(),
                source,
            })?;
            // The guard hears of each freeze before it is tried, so that it thaws this one
            // even if we die in the ioctl, and of a failure, so that it leaves alone a
            // filesystem someone else froze (EBUSY).
            me.tell(&format!("freezing {i}\n"));
            if let Err(source) = dev::freeze(&f) {
                me.tell(&format!("failed {i}\n"));
                return Err(FreezeError::Freeze {
                    path: m.clone(),
                    source,
                });
            }
            tracing::info!(mount = %m.display(), "filesystem frozen");
            me.dirs.push((m.clone(), f));
        }
        Ok(me)
    }

    /// Thaws everything now; whether that was still within the window (else the guard had
    /// thawed already and whatever was read after the deadline was read live).
    pub fn thaw(mut self) -> bool {
        let within = Instant::now() < self.deadline;
        self.release();
        within
    }

    fn tell(&mut self, line: &str) {
        if let Some((_, stdin)) = self.guard.as_mut() {
            let _ = stdin.write_all(line.as_bytes());
            let _ = stdin.flush();
        }
    }

    fn release(&mut self) {
        for (m, f) in self.dirs.drain(..).rev() {
            if thaw(&m, &f) {
                tracing::info!(mount = %m.display(), "filesystem thawed");
            }
        }
        if let Some((mut child, mut stdin)) = self.guard.take() {
            let _ = stdin.write_all(b"done\n");
            drop(stdin);
            let _ = child.wait();
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.release();
    }
}

/// Thaws the filesystem of `f` (mounted at `m`); whether this call thawed it. EINVAL means
/// it was not frozen any more (the other of migrate and its guard came first); other errors
/// are logged.
fn thaw(m: &Path, f: &File) -> bool {
    match dev::thaw(f) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => false,
        Err(e) => {
            tracing::error!(mount = %m.display(), error = %e, "thaw failed");
            false
        }
    }
}

/// The guard: opens `mounts`, says `ready`, then follows its parent's word on stdin
/// (`freezing I`, `failed I`, `done`) until `done`, EOF (the parent died) or the deadline,
/// whichever comes first, and thaws the filesystems the parent froze or was freezing.
pub fn guard_main(within: Duration, mounts: &[PathBuf]) -> std::io::Result<()> {
    let deadline = Instant::now() + within.min(MAX_WINDOW);
    let mut dirs = Vec::new();
    for m in mounts {
        dirs.push((m.clone(), File::open(m)?, false));
    }
    let mut out = std::io::stdout();
    out.write_all(b"ready\n")?;
    out.flush()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(std::io::stdin()).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                return;
            }
        }
        // EOF or a read error: the parent is gone; the dropped sender says so.
    });
    let why = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let (verb, idx) = l.split_once(' ').unwrap_or((l.as_str(), ""));
                let idx: Option<usize> = idx.trim().parse().ok();
                match (verb, idx.and_then(|i| dirs.get_mut(i))) {
                    ("freezing", Some(d)) => d.2 = true,
                    ("failed", Some(d)) => d.2 = false,
                    ("done", _) => break "released",
                    _ => tracing::warn!(line = %l, "thaw guard: unknown word from the parent"),
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break "the agent is gone",
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break "deadline",
        }
    };
    for (m, f, _) in dirs.iter().rev().filter(|d| d.2) {
        if thaw(m, f) {
            tracing::warn!(mount = %m.display(), why, "thaw guard thawed the filesystem");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_mounted_on_a_missing_device() {
        assert!(mounted_on(Path::new("/dev/no-such-disk")).is_empty());
        assert_eq!(read_devno(Path::new("/no/such")), None);
    }
}
