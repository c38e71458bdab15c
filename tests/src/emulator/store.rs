//! What the emulator remembers: sources, tasks and queued commands (persisted with `--state`),
//! plus the request journal, injected faults, tokens and clock offset (runtime only).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A registered source server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Source {
    /// Id given at registration.
    pub id: String,
    /// Last registration body.
    pub body: Value,
    /// Copy state last reported.
    pub copystate: String,
    /// Migration cycle last reported.
    pub migrationcycle: String,
    /// Disk info from `PUT diskinfo`, when sent.
    pub diskinfo: Option<Value>,
}

/// A migration task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRec {
    /// Task id.
    pub id: String,
    /// The create body, completed with ids and relation names.
    pub body: Value,
    /// READY, RUNNING, MIGRATE_SUCCESS, SYNC_SUCCESS, MIGRATE_FAIL, …
    pub state: String,
    /// `error_json` as the last `PUT /v3/tasks/{id}` set it (ref. §5.4.6 line 11838, at most
    /// 1,024 characters); empty when none, as the reference's examples show it (line 11476).
    #[serde(default)]
    pub error_json: String,
    /// Subtasks from progress reports, by name.
    pub sub_tasks: BTreeMap<String, Value>,
    /// Speed-limit rules.
    pub speed_limit: Vec<Value>,
    /// Consistency results uploaded by the agent.
    pub consistency: Vec<Value>,
    /// Source it belongs to.
    pub source_id: String,
    /// TLS material, made on first request.
    #[serde(default)]
    pub certkey: Option<Value>,
    /// Passphrase the private keys are encrypted with (none: plain PKCS#1).
    #[serde(default)]
    pub key_passphrase: Option<String>,
    /// `log_collect_status` (ref. §5.4.5 line 10293): INIT until a log upload is asked for,
    /// then driven by the UPLOAD_LOG / RSET_LOG_ACL commands and their results.
    #[serde(default)]
    pub log_collect_status: Option<String>,
}

/// A command waiting for its agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Cmd {
    /// START, STOP, …
    pub command_name: String,
    /// `{task_id, bucket}`.
    pub command_param: Value,
    /// How often it was handed out without a result coming back.
    pub delivered: u32,
}

/// The persistent part.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Db {
    /// Sources by id.
    pub sources: BTreeMap<String, Source>,
    /// Tasks by id.
    pub tasks: BTreeMap<String, TaskRec>,
    /// Command queues by source id. A command stays queued until its result arrives, so one
    /// handed to an agent that dies before acting is handed out again.
    pub commands: BTreeMap<String, VecDeque<Cmd>>,
    /// Results received, in order: (source id, body).
    pub results: Vec<(String, Value)>,
    /// Id counter.
    pub next_id: u64,
}

impl Db {
    /// A fresh id with a prefix.
    pub fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!(
            "{prefix}{:08x}-0000-4000-8000-{:012x}",
            self.next_id,
            std::process::id()
        )
    }
}

/// One journal line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// Sequence number.
    pub seq: u64,
    /// Unix time (emulator clock).
    pub time: i64,
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Raw query.
    pub query: String,
    /// Status answered.
    pub status: u16,
    /// `aksk`, `token` or `none`.
    pub auth: String,
    /// Body as JSON (null when empty or not JSON).
    pub body: Value,
    /// Body length.
    pub body_len: usize,
}

/// A fault to inject into matching requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fault {
    /// Which requests.
    #[serde(default, rename = "match")]
    pub matcher: FaultMatch,
    /// `status`, `retry_after`, `delay`, `drop` or `body`.
    pub kind: String,
    /// Status for `status`/`body`/`retry_after`.
    #[serde(default)]
    pub status: Option<u16>,
    /// Seconds for `retry_after`.
    #[serde(default)]
    pub retry_after_secs: Option<u64>,
    /// Milliseconds for `delay`.
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// Raw body for `body` (may be malformed JSON).
    #[serde(default)]
    pub body: Option<String>,
    /// Size of a generated body for `body` (`body_len` bytes of `[`), to test size limits.
    #[serde(default)]
    pub body_len: Option<usize>,
    /// How many requests it applies to.
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// Request filter of a fault.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FaultMatch {
    /// Method, any when absent.
    pub method: Option<String>,
    /// Path prefix, any when absent.
    pub path_prefix: Option<String>,
}

/// Journal entries kept; older ones are dropped (their sequence numbers are not reused).
pub const JOURNAL_LIMIT: usize = 100_000;

/// Everything, behind one lock.
#[derive(Debug, Default)]
pub struct Store {
    /// Persistent data.
    pub db: Db,
    /// Request journal, the newest [`JOURNAL_LIMIT`] entries.
    pub journal: VecDeque<Entry>,
    /// Sequence number of the last journal entry.
    pub journal_seq: u64,
    /// Pending faults.
    pub faults: Vec<Fault>,
    /// Seconds added to the real clock.
    pub clock_offset: i64,
    /// IAM tokens and their expiry (emulator clock).
    pub tokens: HashMap<String, i64>,
    /// Where the db is saved.
    pub state_path: Option<PathBuf>,
    /// `obs_domain` of `GET /v3/config` (ref. §5.2.1 line 2163), the OBS endpoint an
    /// UPLOAD_LOG goes to; absent from the answer when unset, as in the reference's example.
    pub obs_domain: Option<String>,
}

impl Store {
    /// Loads the db from `path` when it exists.
    pub fn open(path: Option<&Path>) -> Result<Self, String> {
        let mut s = Store {
            state_path: path.map(Path::to_path_buf),
            ..Store::default()
        };
        if let Some(p) = path {
            match std::fs::read(p) {
                Ok(b) => {
                    s.db = serde_json::from_slice(&b)
                        .map_err(|e| format!("{}: corrupt state: {e}", p.display()))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: {e}", p.display())),
            }
        }
        Ok(s)
    }

    /// Saves the db atomically (temp, fsync, rename).
    pub fn save(&self) {
        let Some(p) = &self.state_path else { return };
        let tmp = p.with_extension("tmp");
        let Ok(bytes) = serde_json::to_vec_pretty(&self.db) else {
            return;
        };
        let ok = std::fs::File::create(&tmp).and_then(|mut f| {
            use std::io::Write;
            f.write_all(&bytes)?;
            f.sync_all()
        });
        if ok.is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }

    /// The emulator's clock (real time plus the injected offset).
    pub fn now(&self) -> i64 {
        let real = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        real + self.clock_offset
    }

    /// Takes one use of the first fault matching `method path`.
    pub fn take_fault(&mut self, method: &str, path: &str) -> Option<Fault> {
        let i = self.faults.iter().position(|f| {
            f.matcher
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && f.matcher
                    .path_prefix
                    .as_deref()
                    .is_none_or(|p| path.starts_with(p))
        })?;
        let f = self.faults[i].clone();
        self.faults[i].count = self.faults[i].count.saturating_sub(1);
        if self.faults[i].count == 0 {
            self.faults.remove(i);
        }
        Some(f)
    }
}
