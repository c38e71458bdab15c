//! `/etc/sms-agent/agent.toml`: parsed once, every key overridable by `SMS_AGENT_<SECTION>_<KEY>`,
//! secrets kept in a type that never prints them.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::num::NonZeroU16;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Where the daemon and `probe` look for their configuration by default.
pub const DEFAULT_PATH: &str = "/etc/sms-agent/agent.toml";
/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "SMS_AGENT_";
/// Name of the systemd credential holding the secret key (`LoadCredential=secret_key:…`).
pub const SK_CREDENTIAL: &str = "secret_key";
/// Name of the systemd credential holding the IAM password.
pub const PASSWORD_CREDENTIAL: &str = "password";

/// A secret (SK, password, token): its `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for signing only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// A duration written as `10s`, `500ms`, `2m`, `1h` (or a bare number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval(pub Duration);

/// Parses `10s`, `500ms`, `2m`, `1h`, `1d` or a bare number of seconds.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (like 10s, 500ms, 2m, 1h)"))?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" | "min" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        other => {
            return Err(format!(
                "{s:?} has an unknown unit {other:?} (use ms, s, m, h, d)"
            ))
        }
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Interval(Duration::from_secs(n))),
            Raw::S(s) => parse_interval(&s)
                .map(Interval)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// `[api]`: where the SMS API is and how to reach it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// Base URL, e.g. `https://sms.cn-north-4.myhuaweicloud.com`.
    pub endpoint: String,
    /// Extra CA certificate (PEM) trusted for the API.
    pub ca_file: Option<PathBuf>,
    /// `X-Project-Id`.
    pub project_id: String,
    /// `X-Domain-Id`.
    pub domain_id: String,
    /// HTTP(S) proxy URL.
    pub proxy: String,
    /// Per-request timeout.
    pub timeout: Interval,
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            ca_file: None,
            project_id: String::new(),
            domain_id: String::new(),
            proxy: String::new(),
            timeout: Interval(Duration::from_secs(30)),
        }
    }
}

/// How the agent authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    /// AK/SK signing (`SDK-HMAC-SHA256`).
    #[default]
    Aksk,
    /// IAM token (`X-Auth-Token`).
    Token,
}

impl AuthMethod {
    /// The method as the config writes it.
    pub fn name(self) -> &'static str {
        match self {
            AuthMethod::Aksk => "aksk",
            AuthMethod::Token => "token",
        }
    }
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// `aksk` or `token`.
    pub method: AuthMethod,
    /// Access key id.
    pub access_key: String,
    /// Secret key, inline (the file must then be mode 0600).
    pub secret_key: Option<Secret>,
    /// File holding the secret key.
    pub secret_key_file: Option<PathBuf>,
    /// `X-Security-Token` of a temporary AK/SK.
    pub security_token: Option<Secret>,
    /// IAM endpoint for token auth.
    pub iam_endpoint: String,
    /// IAM user.
    pub username: String,
    /// IAM password, inline.
    pub password: Option<Secret>,
    /// File holding the IAM password.
    pub password_file: Option<PathBuf>,
    /// IAM domain (account) name.
    pub domain_name: String,
    /// IAM project name (region), the token's scope.
    pub project_name: String,
}

/// `[agent]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// Name to register under (default: the hostname).
    pub name: String,
    /// Where state and checkpoints are kept.
    pub state_dir: PathBuf,
    /// Where the log files go (as well as stderr / the journal); see `[logs]` for rotation.
    pub log_dir: PathBuf,
    /// `text` or `json` (one JSON object a line) for the files of `log_dir`.
    pub log_format: crate::logs::LogFormat,
    /// Time between command polls while idle.
    pub poll_interval: Interval,
    /// Time between re-probes of the disks (a change is sent with `PUT diskinfo`).
    pub reprobe_interval: Interval,
    /// Wait between the end of a pass and the next sync pass of a task created with
    /// `syncing: true` (continuous sync, ref. §5.4.1 line 9686, §5.4.5 line 10295).
    pub sync_interval: Interval,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            name: String::new(),
            state_dir: PathBuf::from("/var/lib/sms-agent"),
            log_dir: PathBuf::from("/var/log/sms-agent"),
            log_format: crate::logs::LogFormat::Text,
            poll_interval: Interval(Duration::from_secs(10)),
            reprobe_interval: Interval(Duration::from_secs(2 * 3600)),
            sync_interval: Interval(Duration::from_secs(5 * 60)),
        }
    }
}

/// `[probe]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeSection {
    /// Extra block devices to report (loop, nbd).
    pub devices: Vec<PathBuf>,
    /// Interfaces to report although normally skipped.
    pub interfaces: Vec<String>,
}

/// `[transfer]` as written; [`TransferSection`] is what it validates into.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTransferSection {
    port: u16,
    streams: Option<u16>,
    exclude: Vec<String>,
    freeze: Vec<String>,
    freeze_window: Interval,
}

impl Default for RawTransferSection {
    fn default() -> Self {
        Self {
            port: DEFAULT_PORT,
            streams: None,
            exclude: Vec::new(),
            freeze: Vec::new(),
            freeze_window: Interval(DEFAULT_FREEZE_WINDOW),
        }
    }
}

/// How long a daemon cutover may hold the filesystems frozen unless `[transfer]
/// freeze_window` says otherwise.
pub const DEFAULT_FREEZE_WINDOW: Duration = Duration::from_secs(10);

/// Data port on the target unless `[transfer] port` says otherwise.
pub const DEFAULT_PORT: u16 = 8900;

/// `[transfer]`, validated.
#[derive(Debug, Clone)]
pub struct TransferSection {
    /// Data port on the target.
    pub port: NonZeroU16,
    /// Parallel data connections per task, at most [`transfer::session::MAX_STREAMS`]
    /// (unset: 4 for block-level, 8 for file-level).
    pub streams: Option<NonZeroU16>,
    /// Absolute paths excluded from file-level migration.
    pub exclude: Vec<PathBuf>,
    /// Mount points the daemon freezes for the pass of an explicit SYNC of a block task (the
    /// cutover pass); empty: no pass is frozen.
    pub freeze: Vec<PathBuf>,
    /// Longest time they stay frozen; the thaw guard thaws them at its end whatever happens.
    pub freeze_window: Duration,
}

impl Default for TransferSection {
    fn default() -> Self {
        Self {
            port: NonZeroU16::MIN.saturating_add(DEFAULT_PORT - 1),
            streams: None,
            exclude: Vec::new(),
            freeze: Vec::new(),
            freeze_window: DEFAULT_FREEZE_WINDOW,
        }
    }
}

/// The file as written: what serde reads before [`Config::load`] validates it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    api: ApiSection,
    auth: AuthSection,
    agent: AgentSection,
    probe: ProbeSection,
    transfer: RawTransferSection,
    logs: crate::logs::LogsSection,
    log_transfer: Option<crate::logs::transfer::RawLogTransfer>,
}

/// What the configuration is loaded for: the daemon needs the API settings, `probe` and
/// `status` do not and do not check them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `sms-agent run`: `[api]` and `[auth]` must allow calls to SMS.
    Daemon,
    /// Commands that only read the host or the state directory.
    Local,
}

/// How the agent proves who it is to SMS, with everything its method needs.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// AK/SK signing.
    Aksk {
        /// Access key id.
        access_key: String,
        /// Secret key.
        secret_key: Secret,
        /// `X-Security-Token` of a temporary AK/SK.
        security_token: Option<Secret>,
    },
    /// IAM token.
    Token {
        /// IAM endpoint, without a trailing `/`.
        iam_endpoint: String,
        /// IAM user.
        username: String,
        /// IAM password.
        password: Secret,
        /// IAM domain (account) name.
        domain_name: String,
        /// IAM project name, the token's scope.
        project_name: String,
    },
}

/// `[api]` and `[auth]`, validated: everything the API client needs.
#[derive(Debug, Clone)]
pub struct ApiAccess {
    /// Base URL, http(s), without a trailing `/`.
    pub endpoint: String,
    /// Credentials.
    pub credentials: Credentials,
    /// Proxy for every request.
    pub proxy: Option<reqwest::Proxy>,
    /// Extra CA trusted for the API.
    pub ca: Option<reqwest::Certificate>,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl ApiAccess {
    /// Checks `[api]` and `[auth]` of `cfg`, naming every bad or missing key.
    pub fn from_config(cfg: &Config) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let endpoint = cfg.api.endpoint.trim_end_matches('/').to_string();
        if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
            problems.push(format!(
                "[api] endpoint {:?} must be an http(s) URL, e.g. https://sms.cn-north-4.myhuaweicloud.com",
                cfg.api.endpoint
            ));
        }
        if cfg.api.timeout.0.is_zero() {
            problems.push("[api] timeout must be more than 0".into());
        }
        let proxy = (!cfg.api.proxy.is_empty())
            .then(|| reqwest::Proxy::all(&cfg.api.proxy))
            .transpose()
            .unwrap_or_else(|e| {
                problems.push(format!("[api] proxy {:?}: {e}", cfg.api.proxy));
                None
            });
        let ca = cfg
            .api
            .ca_file
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
            .and_then(|ca| {
                let cert = fs::read(ca).map_err(|e| e.to_string()).and_then(|pem| {
                    reqwest::Certificate::from_pem(&pem).map_err(|e| e.to_string())
                });
                cert.map_err(|e| problems.push(format!("[api] ca_file {}: {e}", ca.display())))
                    .ok()
            });
        let credentials = credentials(&cfg.auth, &mut problems);
        match credentials {
            Some(credentials) if problems.is_empty() => Ok(Self {
                endpoint,
                credentials,
                proxy,
                ca,
                timeout: cfg.api.timeout.0,
            }),
            _ => Err(problems),
        }
    }
}

/// The credentials of `[auth]`, or `None` with a problem per missing key.
fn credentials(a: &AuthSection, problems: &mut Vec<String>) -> Option<Credentials> {
    let mut required = |v: &str, key: &str| {
        if v.trim().is_empty() {
            problems.push(format!(
                "[auth] {key} is required for {} auth",
                a.method.name()
            ));
            None
        } else {
            Some(v.to_string())
        }
    };
    match a.method {
        AuthMethod::Aksk => {
            let access_key = required(&a.access_key, "access_key");
            let secret_key = a.secret_key.clone();
            if secret_key.is_none() {
                problems.push("[auth] secret_key or secret_key_file is required for aksk".into());
            }
            Some(Credentials::Aksk {
                access_key: access_key?,
                secret_key: secret_key?,
                security_token: a.security_token.clone(),
            })
        }
        AuthMethod::Token => {
            let iam_endpoint = required(&a.iam_endpoint, "iam_endpoint");
            let username = required(&a.username, "username");
            let domain_name = required(&a.domain_name, "domain_name");
            let project_name = required(&a.project_name, "project_name");
            let password = a.password.clone();
            if password.is_none() {
                problems.push("[auth] password or password_file is required for token".into());
            }
            Some(Credentials::Token {
                iam_endpoint: iam_endpoint?.trim_end_matches('/').to_string(),
                username: username?,
                password: password?,
                domain_name: domain_name?,
                project_name: project_name?,
            })
        }
    }
}

/// The whole configuration, validated.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// `[api]`.
    pub api: ApiSection,
    /// `[auth]`.
    pub auth: AuthSection,
    /// `[agent]`.
    pub agent: AgentSection,
    /// `[probe]`.
    pub probe: ProbeSection,
    /// `[transfer]`.
    pub transfer: TransferSection,
    /// `[logs]`: log file rotation and the OBS endpoint of log uploads.
    pub logs: crate::logs::LogsSection,
    /// `[log_transfer]`, when present and switched on: periodic shipping to OBS.
    pub log_transfer: Option<crate::logs::transfer::LogTransfer>,
    /// `[api]` and `[auth]` as the client uses them; set when loaded for [`Purpose::Daemon`].
    pub access: Option<ApiAccess>,
}

/// What is wrong with the configuration; the message names the file, key or variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {err}", path = path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// Bad TOML, an unknown key, or a value of the wrong type.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and key.
        message: String,
    },
    /// Settings that parse but cannot be used; every one found is listed.
    #[error("{path}: {}", list(problems), path = path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// One line per bad setting, each naming its `[section] key`.
        problems: Vec<String>,
    },
    /// An `SMS_AGENT_*` variable that names no key.
    #[error("environment variable {var} names no config key (known: {known})")]
    UnknownEnv {
        /// The variable.
        var: String,
        /// Known sections.
        known: String,
    },
    /// A file holding a secret can be read by others.
    #[error("{path} holds {what} but is readable by group or others (mode {mode:o}); run `chmod 600 {path}`", path = path.display())]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Which secret.
        what: &'static str,
        /// Its mode bits.
        mode: u32,
    },
}

/// One problem inline; several one a line, so that each can be read and fixed.
fn list(problems: &[String]) -> String {
    match problems {
        [one] => one.clone(),
        many => format!("{} invalid settings:\n  {}", many.len(), many.join("\n  ")),
    }
}

/// Sections and keys, for mapping `SMS_AGENT_<SECTION>_<KEY>` (keys may contain `_`).
const SECTIONS: &[&str] = &[
    "api",
    "auth",
    "agent",
    "probe",
    "transfer",
    "logs",
    "log_transfer",
];

impl Config {
    /// Reads `path` (a missing file is an empty config only when `optional`), applies the
    /// `SMS_AGENT_*` variables of `env`, reads secrets from files and from
    /// `$CREDENTIALS_DIRECTORY`, and validates every setting `purpose` needs, reporting all
    /// bad ones at once.
    pub fn load(
        path: &Path,
        optional: bool,
        env: &BTreeMap<String, String>,
        purpose: Purpose,
    ) -> Result<Self, ConfigError> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    err: source,
                })
            }
        };
        let syntax = |message: String| ConfigError::Syntax {
            path: path.to_path_buf(),
            message,
        };
        // Parsed straight from the text first, so that errors carry the line of the bad key.
        toml::from_str::<RawConfig>(&text)
            .map_err(|e| syntax(e.to_string().trim_end().to_string()))?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| syntax(e.to_string()))?;
        apply_env(&mut table, env)?;
        let mut raw = RawConfig::deserialize(toml::Value::Table(table)).map_err(|e| {
            syntax(format!(
                "with the {ENV_PREFIX}* environment overrides applied: {}",
                e.to_string().trim_end()
            ))
        })?;
        let mut problems = Vec::new();
        load_secrets(path, &mut raw.auth, env, &mut problems);
        let transfer = transfer_section(&raw.transfer, &mut problems);
        agent_section(&raw.agent, &mut problems);
        raw.logs.check(&mut problems);
        let log_transfer = raw
            .log_transfer
            .as_ref()
            .and_then(|t| t.check(&mut problems));
        let mut cfg = Config {
            api: raw.api,
            auth: raw.auth,
            agent: raw.agent,
            probe: raw.probe,
            transfer,
            logs: raw.logs,
            log_transfer,
            access: None,
        };
        if purpose == Purpose::Daemon {
            match ApiAccess::from_config(&cfg) {
                Ok(a) => cfg.access = Some(a),
                Err(p) => problems.extend(p),
            }
        }
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }
}

/// Fills the secret key and password from their files or systemd credentials; a problem
/// per secret that is exposed or unreadable.
fn load_secrets(
    path: &Path,
    auth: &mut AuthSection,
    env: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) {
    if auth.secret_key.is_some() || auth.password.is_some() {
        if let Err(e) = check_private(path, "a secret (secret_key or password)") {
            problems.push(e.to_string());
        }
    }
    let creds = env.get("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    if auth.secret_key.is_none() {
        auth.secret_key = read_secret(
            auth.secret_key_file.as_deref(),
            creds.as_deref(),
            SK_CREDENTIAL,
            "the secret key",
        )
        .unwrap_or_else(|e| {
            problems.push(format!("[auth] secret_key_file: {e}"));
            None
        });
    }
    if auth.password.is_none() {
        auth.password = read_secret(
            auth.password_file.as_deref(),
            creds.as_deref(),
            PASSWORD_CREDENTIAL,
            "the IAM password",
        )
        .unwrap_or_else(|e| {
            problems.push(format!("[auth] password_file: {e}"));
            None
        });
    }
}

/// `[transfer]` validated; a problem per bad key.
fn transfer_section(raw: &RawTransferSection, problems: &mut Vec<String>) -> TransferSection {
    let mut t = TransferSection::default();
    match NonZeroU16::new(raw.port) {
        Some(p) => t.port = p,
        None => problems.push("[transfer] port must be 1..=65535, not 0".into()),
    }
    let max = transfer::session::MAX_STREAMS;
    match raw.streams {
        None => {}
        Some(n) if (1..=max).contains(&n) => t.streams = NonZeroU16::new(n),
        Some(n) => problems.push(format!("[transfer] streams must be 1..={max}, not {n}")),
    }
    for e in &raw.exclude {
        if e.starts_with('/') {
            t.exclude.push(PathBuf::from(e));
        } else {
            problems.push(format!("[transfer] exclude {e:?} is not an absolute path"));
        }
    }
    for f in &raw.freeze {
        let p = PathBuf::from(f);
        if !f.starts_with('/') {
            problems.push(format!("[transfer] freeze {f:?} is not an absolute path"));
        } else if t.freeze.contains(&p) {
            problems.push(format!("[transfer] freeze names {f:?} twice"));
        } else {
            t.freeze.push(p);
        }
    }
    let w = raw.freeze_window.0;
    if w.is_zero() || w > crate::freeze::MAX_WINDOW {
        problems.push(format!(
            "[transfer] freeze_window must be more than 0 and at most {} s, not {} ms",
            crate::freeze::MAX_WINDOW.as_secs(),
            w.as_millis()
        ));
    } else {
        t.freeze_window = w;
    }
    t
}

/// `[agent]` checked; a problem per bad key.
fn agent_section(a: &AgentSection, problems: &mut Vec<String>) {
    if a.state_dir.as_os_str().is_empty() {
        problems.push("[agent] state_dir must not be empty".into());
    }
    if a.poll_interval.0.is_zero() {
        problems.push("[agent] poll_interval must be more than 0".into());
    }
    if a.reprobe_interval.0.is_zero() {
        problems.push("[agent] reprobe_interval must be more than 0".into());
    }
    // Under a second a sync pass would start again before its own final report settled.
    if a.sync_interval.0 < Duration::from_secs(1) {
        problems.push("[agent] sync_interval must be at least 1s".into());
    }
}

fn read_secret(
    file: Option<&Path>,
    creds: Option<&Path>,
    credential: &str,
    what: &'static str,
) -> Result<Option<Secret>, ConfigError> {
    // systemd's credential wins: it is what the unit hands over, already private. An empty one
    // (the packaged unit always loads /etc/sms-agent/sk, which may be left empty when the key
    // is in the config) counts as absent.
    let candidates = [
        creds.map(|d| d.join(credential)),
        file.map(Path::to_path_buf),
    ];
    for path in candidates.into_iter().flatten() {
        if !path.is_file() && creds.is_some_and(|d| path.starts_with(d)) {
            continue;
        }
        check_private(&path, what)?;
        let text = fs::read_to_string(&path).map_err(|err| ConfigError::Read {
            path: path.clone(),
            err,
        })?;
        let secret = text.trim_end_matches(['\n', '\r']);
        if !secret.is_empty() {
            return Ok(Some(Secret(secret.to_string())));
        }
    }
    Ok(None)
}

fn check_private(path: &Path, what: &'static str) -> Result<(), ConfigError> {
    let meta = fs::metadata(path).map_err(|err| ConfigError::Read {
        path: path.to_path_buf(),
        err,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::Exposed {
            path: path.to_path_buf(),
            what,
            mode,
        });
    }
    Ok(())
}

/// Sets `SMS_AGENT_<SECTION>_<KEY>=value` into the table; the value is read as TOML when it
/// parses (numbers, arrays, booleans) and as a string otherwise.
fn apply_env(table: &mut toml::Table, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (var, value) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let lower = rest.to_ascii_lowercase();
        let Some((section, key)) = SECTIONS.iter().find_map(|s| {
            lower
                .strip_prefix(s)
                .and_then(|k| k.strip_prefix('_'))
                .filter(|k| !k.is_empty())
                .map(|k| (*s, k))
        }) else {
            return Err(ConfigError::UnknownEnv {
                var: var.clone(),
                known: SECTIONS.join(", "),
            });
        };
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let sec = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(t) = sec {
            t.insert(key.to_string(), parsed);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        let mut f = fs::File::create(&p).unwrap();
        f.write_all(text.as_bytes()).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn reads_design_example() {
        let t = tempfile::tempdir().unwrap();
        let p = write(
            t.path(),
            "agent.toml",
            r#"
[api]
endpoint = "https://sms.cn-north-4.myhuaweicloud.com"
ca_file = ""
project_id = ""
proxy = ""
[auth]
method = "aksk"
access_key = "AK"
secret_key = "SK"
[agent]
name = ""
state_dir = "/var/lib/sms-agent"
log_dir = "/var/log/sms-agent"
poll_interval = "10s"
sync_interval = "90s"
[probe]
devices = ["/dev/loop3"]
[transfer]
port = 8900
streams = 4
exclude = []
"#,
            0o600,
        );
        let c = Config::load(&p, false, &BTreeMap::new(), Purpose::Local).unwrap();
        assert_eq!(c.api.endpoint, "https://sms.cn-north-4.myhuaweicloud.com");
        assert_eq!(c.auth.secret_key.as_ref().unwrap().expose(), "SK");
        assert_eq!(c.agent.poll_interval.0, Duration::from_secs(10));
        assert_eq!(c.agent.sync_interval.0, Duration::from_secs(90));
        assert_eq!(c.probe.devices, vec![PathBuf::from("/dev/loop3")]);
        assert!(
            !format!("{c:?}").contains("SK\""),
            "secret leaked into Debug"
        );
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let t = tempfile::tempdir().unwrap();
        let p = write(
            t.path(),
            "a.toml",
            "[agent]\nname = \"x\"\npoll_intervall = \"5s\"\n",
            0o644,
        );
        let e = Config::load(&p, false, &BTreeMap::new(), Purpose::Local)
            .unwrap_err()
            .to_string();
        assert!(e.contains("poll_intervall") && e.contains("line 3"), "{e}");
        let p = write(t.path(), "b.toml", "[agent\nname = 1\n", 0o644);
        let e = Config::load(&p, false, &BTreeMap::new(), Purpose::Local)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("b.toml"), "{e}");
    }

    #[test]
    fn secrets_in_readable_files_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = write(t.path(), "a.toml", "[auth]\nsecret_key = \"SK\"\n", 0o644);
        let e = Config::load(&p, false, &BTreeMap::new(), Purpose::Local)
            .unwrap_err()
            .to_string();
        assert!(e.contains("chmod 600") && e.contains("a.toml"), "{e}");
        let sk = write(t.path(), "sk", "SECRET\n", 0o640);
        let p = write(
            t.path(),
            "b.toml",
            &format!("[auth]\nsecret_key_file = {:?}\n", sk),
            0o644,
        );
        let e = Config::load(&p, false, &BTreeMap::new(), Purpose::Local)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sk") && e.contains("640"), "{e}");
        fs::set_permissions(&sk, fs::Permissions::from_mode(0o600)).unwrap();
        let c = Config::load(&p, false, &BTreeMap::new(), Purpose::Local).unwrap();
        assert_eq!(c.auth.secret_key.unwrap().expose(), "SECRET");
    }

    #[test]
    fn credentials_directory_and_env_overrides() {
        let t = tempfile::tempdir().unwrap();
        let creds = t.path().join("creds");
        fs::create_dir(&creds).unwrap();
        write(&creds, SK_CREDENTIAL, "FROM-SYSTEMD", 0o400);
        let env: BTreeMap<String, String> = [
            ("CREDENTIALS_DIRECTORY", creds.to_str().unwrap()),
            ("SMS_AGENT_API_ENDPOINT", "http://127.0.0.1:8080"),
            ("SMS_AGENT_TRANSFER_PORT", "9000"),
            ("SMS_AGENT_AGENT_POLL_INTERVAL", "2s"),
            ("SMS_AGENT_PROBE_DEVICES", "[\"/dev/loop1\"]"),
            ("PATH", "/bin"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = Config::load(&t.path().join("missing.toml"), true, &env, Purpose::Local).unwrap();
        assert_eq!(c.auth.secret_key.unwrap().expose(), "FROM-SYSTEMD");
        assert_eq!(c.api.endpoint, "http://127.0.0.1:8080");
        assert_eq!(c.transfer.port.get(), 9000);
        assert_eq!(c.agent.poll_interval.0, Duration::from_secs(2));
        assert_eq!(c.probe.devices, vec![PathBuf::from("/dev/loop1")]);

        let bad: BTreeMap<String, String> =
            [("SMS_AGENT_NOPE_X".to_string(), "1".to_string())].into();
        let e = Config::load(&t.path().join("missing.toml"), true, &bad, Purpose::Local)
            .unwrap_err()
            .to_string();
        assert!(e.contains("SMS_AGENT_NOPE_X"), "{e}");
        let bad: BTreeMap<String, String> =
            [("SMS_AGENT_API_ENDPOINTS".to_string(), "x".to_string())].into();
        let e = Config::load(&t.path().join("missing.toml"), true, &bad, Purpose::Local)
            .unwrap_err()
            .to_string();
        assert!(e.contains("endpoints"), "{e}");
        let e = Config::load(
            &t.path().join("missing.toml"),
            false,
            &BTreeMap::new(),
            Purpose::Local,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("missing.toml"), "{e}");
    }

    #[test]
    fn an_empty_credential_falls_back_to_the_key_file() {
        let t = tempfile::tempdir().unwrap();
        let creds = t.path().join("creds");
        fs::create_dir(&creds).unwrap();
        write(&creds, SK_CREDENTIAL, "", 0o400);
        let sk = write(t.path(), "sk", "FROM-FILE\n", 0o600);
        let p = write(
            t.path(),
            "a.toml",
            &format!("[auth]\nsecret_key_file = {sk:?}\n"),
            0o644,
        );
        let env: BTreeMap<String, String> = [(
            "CREDENTIALS_DIRECTORY".to_string(),
            creds.to_str().unwrap().to_string(),
        )]
        .into();
        let c = Config::load(&p, false, &env, Purpose::Local).unwrap();
        assert_eq!(c.auth.secret_key.unwrap().expose(), "FROM-FILE");
    }

    /// Loads `text` (mode 0600) for `purpose` and returns the problems it has.
    fn problems(text: &str, purpose: Purpose) -> Vec<String> {
        let t = tempfile::tempdir().unwrap();
        let p = write(t.path(), "c.toml", text, 0o600);
        match Config::load(&p, false, &BTreeMap::new(), purpose) {
            Err(ConfigError::Invalid { path, problems }) => {
                assert_eq!(path, p);
                problems
            }
            other => panic!("expected invalid settings, got {other:?}"),
        }
    }

    #[test]
    fn every_bad_setting_is_named_at_once() {
        let got = problems(
            r#"
[api]
endpoint = "ftp://x"
proxy = "::no proxy::"
timeout = "0s"
ca_file = "/nonexistent/ca.pem"
[auth]
method = "aksk"
[agent]
state_dir = ""
poll_interval = 0
reprobe_interval = "0s"
sync_interval = "500ms"
[transfer]
port = 0
streams = 0
exclude = ["/tmp", "var/cache", "relative"]
freeze = ["/srv", "srv", "/srv"]
freeze_window = "31s"
"#,
            Purpose::Daemon,
        );
        for key in [
            "[api] endpoint",
            "[api] proxy",
            "[api] timeout",
            "[api] ca_file /nonexistent/ca.pem",
            "[auth] access_key",
            "[auth] secret_key",
            "[agent] state_dir",
            "[agent] poll_interval",
            "[agent] reprobe_interval",
            "[agent] sync_interval must be at least 1s",
            "[transfer] port",
            "[transfer] streams must be 1..=64, not 0",
            "[transfer] exclude \"var/cache\"",
            "[transfer] exclude \"relative\"",
            "[transfer] freeze \"srv\" is not an absolute path",
            "[transfer] freeze names \"/srv\" twice",
            "[transfer] freeze_window must be more than 0 and at most 30 s",
        ] {
            assert!(
                got.iter().any(|p| p.starts_with(key)),
                "{key} not named in {got:#?}"
            );
        }
        assert_eq!(got.len(), 17, "{got:#?}");
    }

    #[test]
    fn token_auth_names_each_missing_key() {
        let got = problems(
            "[api]\nendpoint = \"https://sms\"\n[auth]\nmethod = \"token\"\nusername = \"u\"\n",
            Purpose::Daemon,
        );
        for key in ["iam_endpoint", "domain_name", "project_name", "password"] {
            assert!(
                got.iter().any(|p| p.starts_with(&format!("[auth] {key}"))),
                "{key} not named in {got:#?}"
            );
        }
        assert_eq!(got.len(), 4, "{got:#?}");
    }

    #[test]
    fn streams_above_the_session_limit_are_refused() {
        let got = problems("[transfer]\nstreams = 65\n", Purpose::Local);
        assert_eq!(got, ["[transfer] streams must be 1..=64, not 65"]);
    }

    #[test]
    fn local_use_ignores_the_api_and_valid_settings_become_types() {
        let t = tempfile::tempdir().unwrap();
        let p = write(
            t.path(),
            "c.toml",
            "[transfer]\nport = 9000\nstreams = 3\nexclude = [\"/srv/cache\"]\nfreeze = [\"/srv\"]\nfreeze_window = \"5s\"\n",
            0o600,
        );
        let c = Config::load(&p, false, &BTreeMap::new(), Purpose::Local).unwrap();
        assert!(c.access.is_none());
        assert_eq!(c.transfer.port.get(), 9000);
        assert_eq!(c.transfer.streams.map(NonZeroU16::get), Some(3));
        assert_eq!(c.transfer.exclude, [PathBuf::from("/srv/cache")]);
        assert_eq!(c.transfer.freeze, [PathBuf::from("/srv")]);
        assert_eq!(c.transfer.freeze_window, Duration::from_secs(5));
        assert_eq!(TransferSection::default().port.get(), DEFAULT_PORT);
        let e = Config::load(&p, false, &BTreeMap::new(), Purpose::Daemon)
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.toml") && e.contains("[api] endpoint"), "{e}");
    }

    #[test]
    fn a_daemon_config_carries_its_api_access() {
        let t = tempfile::tempdir().unwrap();
        let p = write(
            t.path(),
            "c.toml",
            "[api]\nendpoint = \"https://sms.example/\"\n[auth]\naccess_key = \"AK\"\nsecret_key = \"SK\"\n",
            0o600,
        );
        let c = Config::load(&p, false, &BTreeMap::new(), Purpose::Daemon).unwrap();
        let a = c.access.unwrap();
        assert_eq!(a.endpoint, "https://sms.example");
        assert!(
            matches!(a.credentials, Credentials::Aksk { ref access_key, .. } if access_key == "AK")
        );
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_interval("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_interval("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_interval("7").unwrap(), Duration::from_secs(7));
        assert!(parse_interval("ten").is_err());
        assert!(parse_interval("5 parsecs").is_err());
        assert!(parse_interval("99999999999999999999d").is_err());
    }
}
