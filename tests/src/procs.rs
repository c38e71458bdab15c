//! Real processes for the control-plane tests: the emulator and the agent daemon, each killed on
//! drop, plus a small HTTP client for the emulator's admin and operator calls.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bin;

/// Access key the tests use.
pub const AK: &str = "TESTACCESSKEY0000000";
/// Secret key the tests use.
pub const SK: &str = "TestSecretKey0000000000000000000000000000";

/// A running `sms-emulator`.
pub struct Emulator {
    child: Child,
    /// `127.0.0.1:port`.
    pub addr: String,
    /// Its `--state` file.
    pub state: PathBuf,
    /// Served over HTTPS.
    pub tls: bool,
    _dir: Option<tempfile::TempDir>,
}

impl Emulator {
    /// Starts an emulator with a fresh state file.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("emu.json");
        let mut e = Self::start_with(&state, "127.0.0.1:0");
        e._dir = Some(dir);
        e
    }

    /// Starts an emulator with a fresh state file and extra command-line arguments.
    pub fn start_args(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("emu.json");
        let mut e = Self::spawn(&state, "127.0.0.1:0", extra);
        e._dir = Some(dir);
        e
    }

    /// Starts an emulator on `listen` keeping its state in `state`.
    pub fn start_with(state: &Path, listen: &str) -> Self {
        Self::spawn(state, listen, &[])
    }

    /// Starts an HTTPS emulator with the given certificate and key files.
    pub fn start_tls(cert: &Path, key: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("emu.json");
        let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
        let mut e = Self::spawn(&state, "127.0.0.1:0", &["--tls-cert", c, "--tls-key", k]);
        e._dir = Some(dir);
        e
    }

    fn spawn(state: &Path, listen: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(bin("sms-emulator"))
            .args([
                "--listen",
                listen,
                "--ak",
                AK,
                "--sk",
                SK,
                "--iam-user",
                "op",
                "--iam-password",
                "pw",
                "--token-ttl",
                "3",
            ])
            .args(extra)
            .arg("--state")
            .arg(state)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .trim_start_matches("listening on http://")
            .trim_start_matches("listening on https://")
            .to_string();
        assert!(addr.contains(':'), "emulator did not start: {line:?}");
        Self {
            child,
            addr,
            state: state.to_path_buf(),
            tls: line.starts_with("listening on https://"),
            _dir: None,
        }
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// An unauthenticated admin call.
    pub fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        if self.tls {
            // The test's own tiny client speaks no TLS; curl does.
            let mut args = vec![
                "-sk".to_string(),
                "-X".into(),
                method.into(),
                format!("https://{}{path}", self.addr),
            ];
            if let Some(b) = body {
                args.extend(["-d".to_string(), b.to_string()]);
            }
            let out = Command::new("curl").args(&args).output().unwrap();
            assert!(out.status.success(), "curl {path} failed");
            return serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        }
        let (status, text) = http(
            &self.addr,
            method,
            path,
            &[],
            body.map(|b| b.to_string()).as_deref(),
        );
        assert_eq!(status, 200, "{method} {path}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// The request journal.
    pub fn journal(&self) -> Vec<Value> {
        self.admin("GET", "/_emulator/journal", None)
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The persistent state (sources, tasks, commands, results).
    pub fn db(&self) -> Value {
        self.admin("GET", "/_emulator/state", None)
    }

    /// Injects a fault.
    pub fn fault(&self, f: Value) {
        self.admin("POST", "/_emulator/faults", Some(f));
    }

    /// Queues a raw command for a source.
    pub fn command(&self, source: &str, name: &str, param: Value) {
        self.admin(
            "POST",
            &format!("/_emulator/sources/{source}/commands"),
            Some(serde_json::json!({"command_name": name, "command_param": param})),
        );
    }

    /// An operator call signed with AK/SK, as a console or SDK user sends it.
    pub fn operator(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let date = sms_agent::api::time::sdk_date(std::time::SystemTime::now());
        let headers = vec![
            ("Host".to_string(), self.addr.clone()),
            ("X-Sdk-Date".to_string(), date),
            ("Content-Type".to_string(), "application/json".to_string()),
        ];
        let req = sms_agent::api::sign::Request {
            method,
            path,
            query: &[],
            headers: &headers,
            body: body.as_bytes(),
        };
        let authz = sms_agent::api::sign::authorization(&req, AK, SK.as_bytes());
        let mut h: Vec<(String, String)> = headers[1..].to_vec();
        h.push(("Authorization".into(), authz));
        let (status, text) = http(
            &self.addr,
            method,
            path,
            &h,
            if body.is_empty() { None } else { Some(&body) },
        );
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Waits until `pred` holds for the journal, or fails after `secs`.
    pub fn wait_journal(
        &self,
        secs: u64,
        what: &str,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let j = self.journal();
            if pred(&j) {
                return j;
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}; journal: {}",
                summary(&j)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The id of the first source registered, waiting up to 30 s for `agent` to register.
    pub fn source_id(&self, agent: &Agent) -> String {
        let start = Instant::now();
        loop {
            if let Some(id) = self.db()["sources"]
                .as_object()
                .and_then(|m| m.keys().next().cloned())
            {
                return id;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no registration: {}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until task `tid` reaches `state`; fails after `secs`.
    pub fn wait_task(&self, tid: &str, state: &str, secs: u64) -> Value {
        let start = Instant::now();
        loop {
            let (_, t) = self.operator("GET", &format!("/v3/tasks/{tid}"), None);
            if t["state"] == state {
                return t;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "task never reached {state}: {t}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Writes task `tid`'s `certkey` CA, target certificate and target key to `ca`, `cert`
    /// and `key`, as a receiver for the task needs them.
    pub fn save_target_certs(&self, tid: &str, ca: &str, cert: &str, key: &str) {
        let (st, ck) = self.operator("GET", &format!("/v3/tasks/{tid}/certkey"), None);
        assert_eq!(st, 200, "{ck}");
        for (k, f) in [
            ("ca", ca),
            ("target_data_cert", cert),
            ("target_data_private_key", key),
        ] {
            std::fs::write(f, ck[k].as_str().unwrap()).unwrap();
        }
    }

    /// Stops it (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One line per journal entry, for failure messages.
pub fn summary(j: &[Value]) -> String {
    j.iter()
        .map(|e| {
            format!(
                "{} {} {} -> {}",
                e["seq"],
                e["method"].as_str().unwrap_or(""),
                e["path"].as_str().unwrap_or(""),
                e["status"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A minimal HTTP/1.1 request (Connection: close) → (status, body).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A running `sms-agent run` with its own config and state directory.
pub struct Agent {
    child: Option<Child>,
    /// Directory holding config, state and log.
    pub dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Agent {
    /// Writes a config for `endpoint` (with `sk`) and starts the daemon.
    pub fn start(endpoint: &str, sk: &str) -> Self {
        Self::start_with_auth(
            endpoint,
            &format!("access_key = \"{AK}\"\nsecret_key = \"{sk}\"\n"),
        )
    }

    /// Starts the daemon with the given `[auth]` section body.
    pub fn start_with_auth(endpoint: &str, auth: &str) -> Self {
        Self::start_with(endpoint, auth, "", &[])
    }

    /// Starts the daemon with the given `[auth]` body, extra config text and environment.
    pub fn start_with(endpoint: &str, auth: &str, extra: &str, env: &[(&str, &str)]) -> Self {
        let api = format!("[api]\nendpoint = \"{endpoint}\"\ntimeout = \"5s\"\n");
        Self::start_full(&api, auth, extra, env)
    }

    /// Starts the daemon with a whole `[api]` section.
    pub fn start_with_config(api: &str, auth: &str) -> Self {
        Self::start_full(api, auth, "", &[])
    }

    fn start_full(api: &str, auth: &str, extra: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = format!(
            "{api}[auth]\n{auth}[agent]\nname = \"src-under-test\"\nstate_dir = \"{}\"\nlog_dir = \"{}\"\npoll_interval = \"1s\"\n{extra}",
            dir.path().join("state").display(),
            dir.path().join("logs").display()
        );
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, cfg).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut a = Self {
            child: None,
            dir,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        a.restart();
        a
    }

    /// Starts (again) the daemon on the same config and state.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let child = Command::new(bin("sms-agent"))
            .args(["run", "--config"])
            .arg(self.dir.path().join("agent.toml"))
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits; returns the exit status and how long it took.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let mut c = self.child.take().unwrap();
        let t = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let st = c.wait().unwrap();
        (st, t.elapsed())
    }

    /// Runs `sms-agent status --json` on this agent's config.
    pub fn status(&self) -> Value {
        let out = Command::new(bin("sms-agent"))
            .args(["status", "--json", "--config"])
            .arg(self.dir.path().join("agent.toml"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Certificates (`sms-agent certs`) and a scratch dir for one transfer test.
pub struct Kit {
    /// Holds `c/` (the certificates) and whatever the test puts there.
    pub dir: tempfile::TempDir,
}

impl Kit {
    /// Makes a CA and source and target certificates under `c/`.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(crate::sms_agent())
            .args(["certs", "--out"])
            .arg(dir.path().join("c"))
            .output()
            .unwrap();
        assert!(out.status.success());
        Self { dir }
    }

    /// A path under the kit's dir, as a string.
    pub fn p(&self, n: &str) -> String {
        self.dir.path().join(n).to_str().unwrap().to_string()
    }
}

impl Default for Kit {
    fn default() -> Self {
        Self::new()
    }
}

/// A running `sms-agent receive` and the address it listens on; killed on drop.
pub struct Receiver {
    /// The process.
    pub child: Child,
    /// HOST:PORT it listens on.
    pub addr: String,
}

impl Receiver {
    /// A block receiver (`--once`) writing target disks NAME to PATH.
    pub fn disks(kit: &Kit, disks: &[(&str, &Path)]) -> Self {
        let args: Vec<String> = disks
            .iter()
            .flat_map(|(n, p)| ["--disk".to_string(), format!("{n}={}", p.display())])
            .chain(["--once".to_string()])
            .collect();
        Self::start(kit, &args)
    }

    /// A file receiver into `root` (serving until killed).
    pub fn root(kit: &Kit, root: &Path) -> Self {
        Self::start(kit, &["--root".into(), root.display().to_string()])
    }

    /// A receiver on a free port with the kit's target certificate, state in `state/`.
    pub fn start(kit: &Kit, args: &[String]) -> Self {
        Self::start_wrapped(kit, &[], args)
    }

    /// As [`Receiver::start`], run through `wrapper` (a command prefix that execs the rest,
    /// such as `prlimit … setpriv …`), so the receiver's pid is the process's.
    pub fn start_wrapped(kit: &Kit, wrapper: &[String], args: &[String]) -> Self {
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(crate::sms_agent());
                c
            }
            None => Command::new(crate::sms_agent()),
        };
        cmd.arg("receive");
        if !args.iter().any(|a| a == "--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(["--ca", &kit.p("c/ca.pem"), "--cert", &kit.p("c/target.pem")])
            .args(["--key", &kit.p("c/target-key.pem")])
            .args(["--state-dir", &kit.p("state")])
            .args(args);
        if !args.iter().any(|a| a == "--log-dir") {
            cmd.args(["--log-dir", &kit.p("logs")]);
        }
        let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut addr = String::new();
        let mut line = String::new();
        while err.read_line(&mut line).unwrap() > 0 {
            if let Some(a) = line.trim().strip_prefix("sms-agent receive: listening on ") {
                addr = a.to_string();
                break;
            }
            line.clear();
        }
        assert!(!addr.is_empty(), "receiver did not start");
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while err.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        Self { child, addr }
    }

    /// Waits for the receiver to exit; whether it succeeded.
    pub fn wait(mut self) -> bool {
        self.child.wait().unwrap().success()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `sig` to a child process (SIGSTOP/SIGCONT: a peer that goes silent, then wakes).
pub fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, sig).unwrap();
}

/// Waits for a child that must end within `limit` (a hang detector, not a performance bound):
/// kills it and panics with `what` when it does not. Returns its status and its stderr, when
/// that was piped.
pub fn wait_bounded(
    mut child: Child,
    limit: Duration,
    what: &str,
) -> (std::process::ExitStatus, String) {
    let mut err = child.stderr.take();
    // Drained on the side, so a chatty child never blocks on a full pipe.
    let drain = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st, drain.join().unwrap());
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not end within {limit:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
