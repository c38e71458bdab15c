//! Exactly-once shipping: each complete window's lines go to one object whose key the window
//! determines, and the end of the last shipped window is recorded durably
//! (`log-transfer.json` in the state directory) only after OBS took the object. A run killed
//! between the two ships the same window again to the same key with the same lines (an
//! overwrite, not a second copy); a run that was down for hours ships every window it missed;
//! an OBS or network outage leaves the offset where it was for the next attempt. A lock file
//! keeps the daemon and `sms-agent logs ship` from shipping at the same time.

use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::lts::{LogTransfer, StorageFormat};
use super::window::{line_time, object_key, stamp, window_of, Window};
use crate::logs::file::log_files;
use crate::obs::{ObsClient, ObsError};

/// The durable offset and the last shipment, in the state directory.
pub const STATE_FILE: &str = "log-transfer.json";
const LOCK_FILE: &str = "log-transfer.lock";
/// Seconds after a window's end before it is shipped, for the lines of events that were being
/// written as it closed.
pub const GRACE_SECS: u64 = 2;

/// One shipped window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipped {
    /// Window start (seconds since 1970).
    pub start: u64,
    /// Window end.
    pub end: u64,
    /// Window as `START/END` in `YYYYMMDDTHHMMSSZ`.
    pub window: String,
    /// Bucket.
    pub bucket: String,
    /// The object; none for a window without lines (nothing is written for it).
    pub object: Option<String>,
    /// Lines in it.
    pub lines: u64,
}

/// `log-transfer.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipState {
    /// Start of the first window not yet shipped.
    pub next_start: Option<u64>,
    /// The last window shipped.
    pub last: Option<Shipped>,
}

/// Why shipping stopped.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// The state directory or the log files.
    #[error("{what}: {err}")]
    Local {
        /// What was being done.
        what: String,
        /// Why it failed.
        err: std::io::Error,
    },
    /// OBS refused the object or could not be reached; the window is shipped next time.
    #[error("shipping window {window} to bucket {bucket}: {err}")]
    Obs {
        /// The window.
        window: String,
        /// Bucket.
        bucket: String,
        /// OBS's answer.
        err: ObsError,
    },
}

/// Everything a shipment needs.
#[derive(Debug, Clone)]
pub struct Shipper {
    /// `[log_transfer]`.
    pub cfg: LogTransfer,
    /// `[agent] log_dir`.
    pub log_dir: PathBuf,
    /// `[agent] state_dir`.
    pub state_dir: PathBuf,
    /// The OBS client.
    pub client: ObsClient,
    /// Region of the key layout.
    pub region: String,
    /// Source id (the key's "log group").
    pub source: String,
    /// Task id (the key's "log stream"), `agent` when none.
    pub task: String,
}

fn local(what: String) -> impl FnOnce(std::io::Error) -> ShipError {
    move |err| ShipError::Local { what, err }
}

/// Reads the shipping state of `state_dir` (default when none).
pub fn read_state(state_dir: &std::path::Path) -> ShipState {
    std::fs::read(state_dir.join(STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Now, in seconds since 1970.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Shipper {
    fn save(&self, st: &ShipState) -> Result<(), ShipError> {
        let path = self.state_dir.join(STATE_FILE);
        let bytes = serde_json::to_vec_pretty(st).map_err(|e| ShipError::Local {
            what: "encoding the shipping state".into(),
            err: std::io::Error::other(e),
        })?;
        crate::daemon::state::write_atomic(&path, &bytes).map_err(|e| ShipError::Local {
            what: format!("writing {}", path.display()),
            err: std::io::Error::other(e.to_string()),
        })
    }

    /// Ships every complete window up to `now` not shipped yet; the windows shipped (empty
    /// when another shipper holds the lock or none is due). The first run starts with the
    /// window holding `now`.
    pub async fn ship_due(&self, now: u64) -> Result<Vec<Shipped>, ShipError> {
        std::fs::create_dir_all(&self.state_dir)
            .map_err(local(format!("creating {}", self.state_dir.display())))?;
        let lock_path = self.state_dir.join(LOCK_FILE);
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(local(format!("opening {}", lock_path.display())))?;
        let Ok(_lock) = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        else {
            tracing::info!("another log shipment is under way");
            return Ok(Vec::new());
        };
        let mut st = read_state(&self.state_dir);
        let period = self.cfg.period;
        let next = match st.next_start {
            Some(n) => n,
            None => {
                let start = window_of(now, period).start;
                st.next_start = Some(start);
                self.save(&st)?;
                start
            }
        };
        let mut w = window_of(next, period);
        if w.end + GRACE_SECS > now {
            return Ok(Vec::new());
        }
        let lines = self.read_lines()?;
        let mut shipped = Vec::new();
        while w.end + GRACE_SECS <= now {
            let s = self.ship_window(w, &lines).await?;
            st.next_start = Some(w.end);
            st.last = Some(s.clone());
            self.save(&st)?;
            tracing::info!(window = %s.window, object = s.object.as_deref().unwrap_or("-"), lines = s.lines, "log window shipped");
            shipped.push(s);
            w = window_of(w.end, period);
        }
        Ok(shipped)
    }

    /// Every line of the agent's log files with the second it was written (continuation
    /// lines take that of the line they continue), oldest file first.
    fn read_lines(&self) -> Result<Vec<(u64, String)>, ShipError> {
        let files = log_files(&self.log_dir, "agent")
            .map_err(local(format!("listing {}", self.log_dir.display())))?;
        let mut out = Vec::new();
        for p in files {
            // Rotated away since the listing: its lines are in the next file or pruned.
            let Ok(bytes) = std::fs::read(&p) else {
                continue;
            };
            let text = String::from_utf8_lossy(&bytes);
            let mut last = None;
            for line in text.lines() {
                if let Some(t) = line_time(line) {
                    last = Some(t);
                }
                if let Some(t) = last {
                    out.push((t, line.to_string()));
                }
            }
        }
        Ok(out)
    }

    async fn ship_window(&self, w: Window, lines: &[(u64, String)]) -> Result<Shipped, ShipError> {
        let mine: Vec<&str> = lines
            .iter()
            .filter(|(t, _)| (w.start..w.end).contains(t))
            .map(|(_, l)| l.as_str())
            .collect();
        let window = format!("{}/{}", stamp(w.start), stamp(w.end));
        let mut s = Shipped {
            start: w.start,
            end: w.end,
            window: window.clone(),
            bucket: self.cfg.bucket.clone(),
            object: None,
            lines: mine.len() as u64,
        };
        if mine.is_empty() {
            return Ok(s);
        }
        let mut body = String::new();
        for l in &mine {
            match self.cfg.format {
                StorageFormat::Raw => body.push_str(l),
                StorageFormat::Json => {
                    if serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v.is_object()) {
                        body.push_str(l);
                    } else {
                        body.push_str(&serde_json::json!({"message": l}).to_string());
                    }
                }
            }
            body.push('\n');
        }
        let key = object_key(&self.cfg, &self.region, &self.source, &self.task, w);
        let ctype = match self.cfg.format {
            StorageFormat::Raw => "text/plain",
            StorageFormat::Json => "application/x-ndjson",
        };
        self.client
            .put_object(&self.cfg.bucket, &key, body.into_bytes(), "private", ctype)
            .await
            .map_err(|err| ShipError::Obs {
                window,
                bucket: self.cfg.bucket.clone(),
                err,
            })?;
        s.object = Some(key);
        Ok(s)
    }
}

/// How long to wait before the next window is due, from `now`.
pub fn until_due(st: &ShipState, period: Duration, now: u64) -> Duration {
    let next = st.next_start.unwrap_or(now);
    let due = window_of(next, period).end + GRACE_SECS;
    Duration::from_secs(due.saturating_sub(now))
}
