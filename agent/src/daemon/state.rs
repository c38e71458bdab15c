//! The daemon's durable state in `state_dir`: written atomically (temp, fsync, rename, fsync of
//! the directory) so that `kill -9` at any instant leaves either the old or the new version.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::models::CommandResult;

/// File holding [`State`].
pub const STATE_FILE: &str = "state.json";
/// File holding [`Status`], read by `sms-agent status`.
pub const STATUS_FILE: &str = "status.json";
/// Lock file that keeps a second daemon from starting.
pub const LOCK_FILE: &str = "agent.lock";

/// What must survive a restart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Source id assigned by SMS at registration.
    #[serde(default)]
    pub source_id: Option<String>,
    /// Set just before a registration without id is sent, cleared once the id is saved: a
    /// restart that finds it set looks the source up instead of registering twice.
    #[serde(default)]
    pub registering: bool,
    /// The task this agent works on.
    #[serde(default)]
    pub task: Option<TaskState>,
    /// Command results not yet acknowledged by the service, oldest first.
    #[serde(default)]
    pub pending_results: Vec<CommandResult>,
    /// SHA-256 of the disk inventory last sent, to detect disk changes.
    #[serde(default)]
    pub disk_fingerprint: String,
}

/// The task in hand and where it stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskState {
    /// Task id.
    pub id: String,
    /// `MIGRATE_BLOCK` or `MIGRATE_FILE`.
    #[serde(default)]
    pub kind: String,
    /// Where the task stands.
    pub phase: Phase,
    /// Whether SKIP asked to skip the consistency check.
    #[serde(default)]
    pub skip_consistency: bool,
    /// Last error, with its SMS code.
    #[serde(default)]
    pub error: Option<String>,
    /// Block pass last started (0 = full copy, then one per sync).
    #[serde(default)]
    pub pass: u32,
    /// Whether pass `pass` completed (the receiver acknowledged every chunk durable): a
    /// restarted daemon then waits for SYNC instead of running that pass again.
    #[serde(default)]
    pub pass_done: bool,
    /// The final progress report of a completed pass, kept until the service has taken it, so
    /// a daemon killed between the two sends it after its restart.
    #[serde(default)]
    pub final_report: Option<serde_json::Value>,
    /// Whether the task was created with `syncing: true` (ref. §5.4.1 line 9686): after a
    /// completed pass the next sync pass starts by itself after `[agent] sync_interval`.
    #[serde(default)]
    pub continuous: bool,
    /// Whether this pass is a cutover pass (an explicit SYNC with `[transfer] freeze` set),
    /// run between a freeze and a thaw; kept so that its retry or resume is frozen too.
    #[serde(default)]
    pub cutover: bool,
}

/// Phases of a task, as the daemon drives them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Accepted, not started.
    #[default]
    Init,
    /// Full copy under way.
    Replicating,
    /// Incremental sync under way.
    Syncing,
    /// Stopped by STOP; START resumes.
    Stopped,
    /// Failed; see `error`.
    Failed,
}

/// How long a cutover pass held the filesystems frozen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FreezeReport {
    /// Pass number.
    pub pass: u32,
    /// Mount points frozen.
    pub mounts: Vec<String>,
    /// Seconds from the freeze to the thaw.
    pub window_secs: f64,
    /// Whether the agent thawed within `[transfer] freeze_window` (else the thaw guard did at
    /// its end, and what the pass read after it was read live: not crash-consistent).
    pub within_window: bool,
    /// Whether the pass completed (every chunk durable on the target).
    pub completed: bool,
}

/// What `sms-agent status` shows; rewritten by the daemon as things change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Daemon pid.
    pub pid: u32,
    /// What the daemon is doing (`registering`, `waiting for commands`, …).
    pub activity: String,
    /// Source id.
    pub source_id: Option<String>,
    /// Current task id.
    pub task_id: Option<String>,
    /// Current task phase.
    pub phase: Option<Phase>,
    /// Bytes done.
    pub bytes_done: u64,
    /// Bytes in all.
    pub bytes_total: u64,
    /// Rate over the last 5 s, bytes/s.
    pub rate: f64,
    /// Seconds left.
    pub eta_secs: Option<u64>,
    /// Last error.
    pub last_error: Option<String>,
    /// Age in seconds of the oldest change to the source disks not yet on the target (block
    /// tasks with changed-block tracking).
    #[serde(default)]
    pub replication_lag_secs: Option<f64>,
    /// The freeze of the last cutover pass (block tasks with `[transfer] freeze`).
    #[serde(default)]
    pub last_freeze: Option<FreezeReport>,
    /// Unix time of this snapshot.
    pub updated_at: u64,
}

/// A state-directory error; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// I/O on a state file failed.
    #[error("{path}: {err}", path = path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// A state file is corrupt.
    #[error("{path} is corrupt ({detail}); move it aside to start afresh")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Parser message.
        detail: String,
    },
    /// Another daemon holds the lock.
    #[error("another sms-agent daemon is running with state directory {0} (lock held on {0}/agent.lock)")]
    Locked(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |err| StateError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// Writes `bytes` to `path` atomically and durably, mode 0600.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    transfer::durable::write_atomic(path, bytes, transfer::durable::PRIVATE).map_err(io_err(path))
}

/// The state directory: its lock, state and status files.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

impl Store {
    /// Creates `dir` (0700) if needed and takes its lock; fails when another daemon holds it.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        // What the agent knows of the host and its tasks is nobody else's business.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| StateError::Locked(dir.display().to_string()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// Loads the state; a missing file is a fresh start.
    pub fn load(&self) -> Result<State, StateError> {
        read_json(&self.dir.join(STATE_FILE)).map(Option::unwrap_or_default)
    }

    /// Saves the state atomically.
    pub fn save(&self, s: &State) -> Result<(), StateError> {
        let path = self.dir.join(STATE_FILE);
        let bytes = serde_json::to_vec_pretty(s).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        write_atomic(&path, &bytes)
    }

    /// Publishes a status snapshot for `sms-agent status`.
    pub fn publish(&self, s: &Status) -> Result<(), StateError> {
        let path = self.dir.join(STATUS_FILE);
        let bytes = serde_json::to_vec_pretty(s).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        write_atomic(&path, &bytes)
    }
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(StateError::Io {
                path: path.to_path_buf(),
                err,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StateError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_locks() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(t.path()).unwrap();
        assert_eq!(store.load().unwrap(), State::default());
        let s = State {
            source_id: Some("src-1".into()),
            task: Some(TaskState {
                id: "t1".into(),
                phase: Phase::Stopped,
                ..Default::default()
            }),
            ..Default::default()
        };
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), s);
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(t.path().join(STATE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = Store::open(t.path()).unwrap_err().to_string();
        assert!(second.contains("another sms-agent"), "{second}");
        drop(store);
        assert!(Store::open(t.path()).is_ok());
    }

    #[test]
    fn corrupt_state_is_named() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join(STATE_FILE), b"{not json").unwrap();
        let store = Store::open(t.path()).unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(e.contains("state.json") && e.contains("corrupt"), "{e}");
    }
}
