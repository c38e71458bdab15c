//! UPLOAD_LOG and RSET_LOG_ACL end to end: the emulator's `POST /v3/tasks/{id}/log`, the
//! daemon, and a real S3 server (`sms-s3`: s3s verifying signature V4, s3s-fs storing on
//! disk) as the OBS endpoint the emulator's `GET /v3/config` names in `obs_domain`.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sms_tests::bin;
use sms_tests::procs::{summary, Agent, Emulator, AK, SK};

const BUCKET: &str = "migration-logs";
const TOKEN: &str = "TemporarySecurityToken-For-The-Upload-Test-0123456789";

/// A running `sms-s3` over a directory; killed on drop.
struct S3 {
    child: Option<Child>,
    addr: String,
    root: tempfile::TempDir,
}

impl S3 {
    /// Starts a store accepting `AK`/`sk` with bucket [`BUCKET`].
    fn start(sk: &str, extra: &[&str]) -> Self {
        let root = tempfile::tempdir().unwrap();
        let mut s = Self {
            child: None,
            addr: "127.0.0.1:0".into(),
            root,
        };
        s.spawn(sk, extra);
        s
    }

    fn spawn(&mut self, sk: &str, extra: &[&str]) {
        let mut child = Command::new(bin("sms-s3"))
            .args([
                "--listen", &self.addr, "--ak", AK, "--sk", sk, "--bucket", BUCKET,
            ])
            .args(extra)
            .arg(self.root.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        self.addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("sms-s3 did not start: {line:?}"))
            .to_string();
        self.child = Some(child);
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The stored object.
    fn object(&self, key: &str) -> PathBuf {
        self.root.path().join(BUCKET).join(key)
    }

    /// The canned ACL PutObjectAcl set on `key`.
    fn acl(&self, key: &str) -> Option<String> {
        std::fs::read_to_string(self.root.path().join(".acl").join(BUCKET).join(key)).ok()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn results(emu: &Emulator) -> Vec<Value> {
    emu.db()["results"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|r| r[1].clone())
        .collect()
}

/// Waits for the result of command `name`.
fn result_of(emu: &Emulator, name: &str, secs: u64) -> Value {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(r) = results(emu).into_iter().find(|r| r["command_name"] == name) {
            return r;
        }
        assert!(
            Instant::now() < end,
            "no {name} result: {}",
            summary(&emu.journal())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts the emulator naming `s3` as `obs_domain`, a daemon with `extra` config, and a task
/// of its source; returns the task id.
fn setup(s3: &S3, extra: &str) -> (Emulator, Agent, String) {
    let emu = Emulator::start_args(&["--obs-domain", &s3.url()]);
    let auth =
        format!("access_key = \"{AK}\"\nsecret_key = \"{SK}\"\nsecurity_token = \"{TOKEN}\"\n");
    let agent = Agent::start_with(&emu.url(), &auth, extra, &[]);
    let id = emu.source_id(&agent);
    let (st, task) = emu.operator(
        "POST",
        "/v3/tasks",
        Some(json!({"name": "t1", "type": "MIGRATE_FILE", "os_type": "LINUX", "source_server": {"id": id},
                    "target_server": {"disks": []}, "migration_ip": "127.0.0.1"})),
    );
    assert_eq!(st, 200, "{task}");
    (emu, agent, task["id"].as_str().unwrap().to_string())
}

fn ask_for_logs(emu: &Emulator, tid: &str, bucket: &str) {
    let (st, body) = emu.operator(
        "POST",
        &format!("/v3/tasks/{tid}/log"),
        Some(json!({"log_bucket": bucket})),
    );
    assert_eq!(st, 200, "{body}");
}

fn log_status(emu: &Emulator, tid: &str) -> String {
    let (_, t) = emu.operator("GET", &format!("/v3/tasks/{tid}"), None);
    t["log_collect_status"].as_str().unwrap_or("").to_string()
}

fn sha256_file(p: &Path) -> String {
    let b = std::fs::read(p).unwrap();
    Sha256::digest(&b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Every file of the unpacked bundle, with its content.
fn unpack(bundle: &Path) -> Vec<(String, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("tar")
        .arg("-xzf")
        .arg(bundle)
        .arg("-C")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut files = Vec::new();
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir.path()).unwrap().display().to_string();
                files.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    files.sort();
    files
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn upload_and_acl_reset_end_to_end_with_a_bundle_free_of_secrets() {
    let s3 = S3::start(SK, &[]);
    let (emu, agent, tid) = setup(&s3, "");
    // Secrets that reached files the bundle takes: a key pasted into the log directory and the
    // SK in a state file. The bundle must carry neither.
    let logs = agent.dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let key_body = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQDtestkeybody";
    std::fs::write(
        logs.join("debug.txt"),
        format!(
            "dump\n-----BEGIN PRIVATE KEY-----\n{key_body}\n-----END PRIVATE KEY-----\nsk={SK}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        agent.dir.path().join("state").join("leak.json"),
        format!("{{\"sk\": \"{SK}\", \"ak\": \"{AK}\", \"token\": \"{TOKEN}\"}}"),
    )
    .unwrap();
    assert_eq!(log_status(&emu, &tid), "INIT");
    ask_for_logs(&emu, &tid, BUCKET);
    let r = result_of(&emu, "UPLOAD_LOG", 60);
    assert_eq!(r["result"], "success", "{r}");
    let d = &r["result_detail"];
    assert_eq!(d["bucket"], BUCKET);
    let object = d["object"].as_str().unwrap();
    assert!(
        object.starts_with("sms-agent-logs/") && object.ends_with(".tar.gz"),
        "{object}"
    );
    let stored = s3.object(object);
    assert_eq!(
        std::fs::metadata(&stored).unwrap().len(),
        d["size"].as_u64().unwrap()
    );
    assert_eq!(sha256_file(&stored), d["sha256"].as_str().unwrap());

    let files = unpack(&stored);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "sms-agent-logs/manifest.json",
        "sms-agent-logs/probe.json",
        "sms-agent-logs/config.txt",
        "sms-agent-logs/logs/agent.log",
        "sms-agent-logs/logs/debug.txt",
        "sms-agent-logs/state/state.json",
        "sms-agent-logs/state/leak.json",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for (name, data) in &files {
        for secret in [SK, AK, TOKEN, key_body, "PRIVATE KEY-----\n"] {
            assert!(!contains(data, secret), "{name} holds {secret:?}");
        }
    }
    let probe = &files
        .iter()
        .find(|(n, _)| n.ends_with("probe.json"))
        .unwrap()
        .1;
    let probe: Value = serde_json::from_slice(probe).unwrap();
    assert!(probe["os_type"].is_string(), "{probe}");

    // The emulator then asks for the ACL reset, and the object becomes private.
    let r = result_of(&emu, "RSET_LOG_ACL", 30);
    assert_eq!(r["result"], "success", "{r}");
    assert_eq!(r["result_detail"]["object"], object);
    assert_eq!(s3.acl(object).as_deref(), Some("private"));
    assert_eq!(log_status(&emu, &tid), "SERVER_COLLECT_SUCCESS");
    // Every OBS call was signed and accepted: the agent says so in its own log file.
    let log = std::fs::read_to_string(logs.join("agent.log")).unwrap();
    assert!(
        log.contains("log bundle uploaded") && log.contains("log bundle made private"),
        "{log}"
    );
    assert!(!log.contains(SK) && !log.contains(TOKEN));
}

#[test]
fn a_wrong_secret_key_fails_with_sms_0503_and_the_reason() {
    let s3 = S3::start("NotTheSecretKeyOfTheAgent0000000000000000", &[]);
    let (emu, _agent, tid) = setup(&s3, "[logs]\nupload_retry_for = \"5s\"\n");
    ask_for_logs(&emu, &tid, BUCKET);
    let r = result_of(&emu, "UPLOAD_LOG", 60);
    assert_eq!(r["result"], "fail", "{r}");
    assert_eq!(r["result_detail"]["error_code"], "SMS.0503");
    let msg = r["result_detail"]["error_msg"].as_str().unwrap();
    assert!(
        msg.contains("SignatureDoesNotMatch") && msg.contains("403"),
        "{msg}"
    );
    assert!(!msg.contains(SK));
    assert_eq!(log_status(&emu, &tid), "AGENT_COLLECT_FAIL");
    // Nothing stored, and no ACL reset asked for.
    assert!(!results(&emu)
        .iter()
        .any(|r| r["command_name"] == "RSET_LOG_ACL"));
}

#[test]
fn a_missing_bucket_fails_with_sms_0503_naming_it() {
    let s3 = S3::start(SK, &[]);
    let (emu, _agent, tid) = setup(&s3, "[logs]\nupload_retry_for = \"5s\"\n");
    ask_for_logs(&emu, &tid, "no-such-bucket");
    let r = result_of(&emu, "UPLOAD_LOG", 60);
    assert_eq!(r["result"], "fail", "{r}");
    assert_eq!(r["result_detail"]["error_code"], "SMS.0503");
    let msg = r["result_detail"]["error_msg"].as_str().unwrap();
    assert!(
        msg.contains("NoSuchBucket") && msg.contains("no-such-bucket"),
        "{msg}"
    );
}

/// 16 MiB that does not compress (xorshift64): a bundle of 4 parts of 5 MiB.
fn noise() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..16u64 << 17)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// Waits for `child` to exit; its exit code.
fn exited(child: &mut Child, what: &str) -> Option<i32> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        assert!(Instant::now() < end, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn multipart_upload_resumes_in_a_restarted_agent() {
    // The store goes down at part 3; while the agent retries, it is killed (-9). Both come
    // back: SMS hands the unanswered UPLOAD_LOG out again, and the new agent continues the
    // same multipart upload of the same bundle (state_dir/log-upload.json).
    let mut s3 = S3::start(SK, &["--exit-at-part", "3"]);
    let (emu, mut agent, tid) = setup(
        &s3,
        "[logs]\nupload_part_size = \"5MiB\"\nupload_retry_for = \"90s\"\n",
    );
    std::fs::create_dir_all(agent.dir.path().join("logs")).unwrap();
    std::fs::write(
        agent
            .dir
            .path()
            .join("logs")
            .join("agent.log.00000000000000000001"),
        noise(),
    )
    .unwrap();
    ask_for_logs(&emu, &tid, BUCKET);
    assert_eq!(
        exited(s3.child.as_mut().unwrap(), "the store never reached part 3"),
        Some(3)
    );
    s3.child = None;
    let record = agent.dir.path().join("state").join("log-upload.json");
    let rec: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert!(rec["upload_id"].is_string(), "{rec}");
    agent.kill9();
    s3.spawn(SK, &[]);
    agent.restart();
    let r = result_of(&emu, "UPLOAD_LOG", 120);
    assert_eq!(r["result"], "success", "{r}");
    let d = &r["result_detail"];
    assert_eq!(d["object"], rec["object"]);
    assert_eq!(d["sha256"], rec["sha256"]);
    assert_eq!(
        sha256_file(&s3.object(d["object"].as_str().unwrap())),
        d["sha256"].as_str().unwrap()
    );
    let log = std::fs::read_to_string(agent.dir.path().join("logs").join("agent.log")).unwrap();
    assert!(
        log.contains("resuming the unfinished log upload") && log.contains("parts_resumed=2"),
        "{log}"
    );
    // Exactly one result for the one command.
    assert_eq!(
        results(&emu)
            .iter()
            .filter(|r| r["command_name"] == "UPLOAD_LOG")
            .count(),
        1
    );
}

#[test]
fn multipart_upload_resumes_after_the_store_stops_mid_upload() {
    // The store exits when the third part arrives (parts 1 and 2 are stored), and comes back
    // on the same address two seconds later, with what it had on disk.
    let mut s3 = S3::start(SK, &["--exit-at-part", "3"]);
    let (emu, agent, tid) = setup(
        &s3,
        "[logs]\nupload_part_size = \"5MiB\"\nupload_retry_for = \"90s\"\n",
    );
    let data = noise();
    std::fs::create_dir_all(agent.dir.path().join("logs")).unwrap();
    std::fs::write(
        agent
            .dir
            .path()
            .join("logs")
            .join("agent.log.00000000000000000001"),
        &data,
    )
    .unwrap();
    ask_for_logs(&emu, &tid, BUCKET);
    let child = s3.child.as_mut().unwrap();
    let end = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < end,
            "the store never reached part 3: {}\n{:?}",
            agent.log(),
            results(&emu)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(3));
    s3.child = None;
    std::thread::sleep(Duration::from_secs(2));
    s3.spawn(SK, &[]);

    let r = result_of(&emu, "UPLOAD_LOG", 120);
    assert_eq!(r["result"], "success", "{r}");
    let d = &r["result_detail"];
    let object = d["object"].as_str().unwrap();
    let stored = s3.object(object);
    assert_eq!(sha256_file(&stored), d["sha256"].as_str().unwrap());
    assert_eq!(
        std::fs::metadata(&stored).unwrap().len(),
        d["size"].as_u64().unwrap()
    );
    assert!(d["size"].as_u64().unwrap() > 15 << 20, "{d}");
    // One object in the bucket, no multipart upload left behind.
    let mut left: Vec<String> = std::fs::read_dir(s3.root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".upload"))
        .collect();
    left.sort();
    assert!(left.is_empty(), "{left:?}");
    let log = std::fs::read_to_string(agent.dir.path().join("logs").join("agent.log")).unwrap();
    // Parts 1 and 2 were found on the store after the restart, not sent again.
    assert!(
        log.contains("parts_resumed=2") && log.contains("parts=4"),
        "{log}"
    );
    let files = unpack(&stored);
    let big = files
        .iter()
        .find(|(n, _)| n.ends_with("agent.log.00000000000000000001"))
        .unwrap();
    assert_eq!(big.1, data);
}

/// `YYYY-MM-DDTHH:MM:SS.000000Z` of second `t`, as the agent's log lines start.
fn iso(t: u64) -> String {
    let s = sms_agent::api::time::sdk_date(std::time::UNIX_EPOCH + Duration::from_secs(t));
    format!(
        "{}-{}-{}T{}:{}:{}.000000Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..15]
    )
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Every stored object under `dir`, by key.
fn objects(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let key = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((key, std::fs::read_to_string(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn bad_log_transfer_values_are_refused_with_lts_codes_and_exit_64() {
    let s3 = S3::start(SK, &[]);
    let emu = Emulator::start_args(&["--obs-domain", &s3.url()]);
    let dir = tempfile::tempdir().unwrap();
    let base = "obs_bucket_name = \"migration-logs\"\n";
    for (body, want) in [
        (
            "period = 5\nperiod_unit = \"min\"\nstorage_format = \"CSV\"\n",
            "LTS.1901: storage_format is not in the list [RAW, JSON]",
        ),
        (
            "period = 10\nperiod_unit = \"min\"\n",
            "LTS.1901: period+period_unit is not in the list [2min, 5min, 30min, 1hour, 3hour, 6hour, 12hour]",
        ),
        (
            "period = 1\nperiod_unit = \"day\"\n",
            "LTS.1901: period_unit is not in the list [min, hour]",
        ),
        (
            "period = 2\nperiod_unit = \"min\"\nprefix_name = \"bad prefix!\"\n",
            "LTS.1902: prefix_name is invalid, please verify if it's provided as required",
        ),
        (
            "period = 2\nperiod_unit = \"min\"\ndir_prefix_name = \"/abs\"\n",
            "LTS.1902: dir_prefix_name is invalid, please verify if it's provided as required",
        ),
    ] {
        let cfg = dir.path().join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "[api]\nendpoint = \"{}\"\n[auth]\naccess_key = \"{AK}\"\nsecret_key = \"{SK}\"\n[agent]\nstate_dir = \"{}\"\nlog_dir = \"{}\"\n[log_transfer]\n{base}{body}",
                emu.url(),
                dir.path().join("state").display(),
                dir.path().join("logs").display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
        for args in [&["run"][..], &["logs", "ship"][..]] {
            let out = Command::new(sms_tests::sms_agent())
                .args(args)
                .arg("--config")
                .arg(&cfg)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{args:?} {body}: {err}");
            assert!(err.contains(&format!("[log_transfer] {want}")), "{err}");
        }
    }
    // Nothing registered: the daemon stopped before its first call.
    assert!(emu.db()["sources"].as_object().unwrap().is_empty());
}

#[test]
fn periodic_windows_are_shipped_once_across_kill_9() {
    let s3 = S3::start(SK, &[]);
    let emu = Emulator::start_args(&["--obs-domain", &s3.url()]);
    let auth = format!("access_key = \"{AK}\"\nsecret_key = \"{SK}\"\n");
    let mut agent = Agent::start_with(
        &emu.url(),
        &auth,
        &format!("[log_transfer]\nobs_bucket_name = \"{BUCKET}\"\nperiod = 2\nperiod_unit = \"min\"\nprefix_name = \"agent\"\ndir_prefix_name = \"sms/logs\"\n"),
        &[],
    );
    let _ = emu.source_id(&agent);
    agent.kill9();
    // An agent that was down for half an hour: the offset is 15 windows back and the log holds
    // a line every 7 seconds since then.
    let t0 = (now() - 1800) / 120 * 120;
    let mut synthetic = String::new();
    let mut t = t0;
    let mut n = 0u64;
    while t + 5 < now() {
        synthetic.push_str(&format!("{}  INFO test::synthetic: line {n}\n", iso(t)));
        n += 1;
        t += 7;
    }
    let logs = agent.dir.path().join("logs");
    std::fs::write(logs.join("agent.log.00000000000000000001"), &synthetic).unwrap();
    let state = agent.dir.path().join("state").join("log-transfer.json");
    std::fs::write(&state, format!("{{\"next_start\": {t0}}}")).unwrap();
    // kill -9 at points spread over the daemon's start and its first shipments.
    for delay_ms in [150u64, 400, 700, 1000, 1400] {
        agent.restart();
        std::thread::sleep(Duration::from_millis(delay_ms));
        agent.kill9();
    }
    // Once more, killed as soon as the daemon has shipped a window (however slow its start).
    agent.restart();
    let end_wait = Instant::now() + Duration::from_secs(60);
    let before: Value = loop {
        let v: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
        if v["next_start"].as_u64().is_some_and(|n| n > t0) {
            break v;
        }
        assert!(
            Instant::now() < end_wait,
            "the daemon ships nothing: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    agent.kill9();
    // What is left, `sms-agent logs ship` ships now.
    let out = Command::new(sms_tests::sms_agent())
        .args(["logs", "ship", "--config"])
        .arg(agent.dir.path().join("agent.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    let after: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let end = after["next_start"].as_u64().unwrap();
    assert!(end + 120 + 5 >= now(), "not caught up: {after}\n{printed}");
    assert!(before["next_start"].as_u64().unwrap() > t0);

    // Every line of [t0, end) is in exactly one object, in the object of its window.
    let mut expected: Vec<String> = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort_by_key(|p| {
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        (n == "agent.log", n)
    });
    for p in names {
        let mut last = None;
        for line in std::fs::read_to_string(&p).unwrap().lines() {
            if let Some(t) = sms_agent::logs::transfer::window::line_time(line) {
                last = Some(t);
            }
            if last.is_some_and(|t| (t0..end).contains(&t)) {
                expected.push(line.to_string());
            }
        }
    }
    let stored = objects(&s3.root.path().join(BUCKET));
    let mut shipped: Vec<String> = Vec::new();
    let mut windows = Vec::new();
    for (key, text) in &stored {
        assert!(key.starts_with("sms/logs/LogTanks/"), "{key}");
        let file = key.rsplit('/').next().unwrap();
        let w = file
            .strip_prefix("agent_")
            .and_then(|f| f.strip_suffix(".log"))
            .unwrap_or_else(|| panic!("{key}"));
        windows.push(w.to_string());
        for line in text.lines() {
            let t = sms_agent::logs::transfer::window::line_time(line);
            let (ws, we) = w.split_once('_').unwrap();
            let start = sms_agent::api::time::parse_sdk_date(ws).unwrap();
            let stop = sms_agent::api::time::parse_sdk_date(we).unwrap();
            if let Some(t) = t {
                let at = std::time::UNIX_EPOCH + Duration::from_secs(t);
                assert!(start <= at && at < stop, "{line} in {key}");
            }
            shipped.push(line.to_string());
        }
    }
    // One object per window: the synthetic lines fill all 15 windows, each shipped once.
    let mut uniq = windows.clone();
    uniq.dedup();
    assert_eq!(uniq, windows);
    assert!(windows.len() >= 15, "{windows:?}");
    let mut a = expected.clone();
    let mut b = shipped.clone();
    a.sort();
    b.sort();
    assert_eq!(
        a.len(),
        b.len(),
        "lines expected {} shipped {}",
        a.len(),
        b.len()
    );
    assert!(a == b, "shipped lines differ from the log's");
    // The synthetic lines of the complete windows, all of them (the current window's wait).
    let due = (0..n).filter(|i| t0 + 7 * i < end).count();
    assert!(due > 200, "{due}");
    assert_eq!(
        shipped
            .iter()
            .filter(|l| l.contains("test::synthetic"))
            .count(),
        due
    );

    // `sms-agent status` names the last shipped window.
    let st = agent.status();
    assert_eq!(st["log_transfer"]["next_start"].as_u64(), Some(end));
    let last = st["log_transfer"]["last"]["window"]
        .as_str()
        .unwrap()
        .to_string();
    let out = Command::new(sms_tests::sms_agent())
        .args(["status", "--config"])
        .arg(agent.dir.path().join("agent.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("log transfer: window {last} shipped")),
        "{text}"
    );
}

#[test]
fn a_store_outage_leaves_the_window_for_the_next_run_in_json() {
    let mut s3 = S3::start(SK, &[]);
    let emu = Emulator::start_args(&["--obs-domain", &s3.url()]);
    let auth = format!("access_key = \"{AK}\"\nsecret_key = \"{SK}\"\n");
    let mut agent = Agent::start_with(
        &emu.url(),
        &auth,
        &format!("log_format = \"json\"\n[logs]\nupload_retry_for = \"2s\"\n[log_transfer]\nobs_bucket_name = \"{BUCKET}\"\nperiod = 2\nperiod_unit = \"min\"\nstorage_format = \"JSON\"\n"),
        &[],
    );
    let _ = emu.source_id(&agent);
    agent.kill9();
    // Three windows due, written as the daemon writes JSON lines, and a text line that is
    // not JSON (a foreign file's) that JSON storage wraps.
    let t0 = (now() - 420) / 120 * 120;
    let mut lines = String::new();
    for i in 0..36u64 {
        lines.push_str(&format!(
            "{{\"timestamp\":\"{}\",\"level\":\"INFO\",\"fields\":{{\"message\":\"line {i}\"}},\"target\":\"test\"}}\n",
            iso(t0 + i * 10)
        ));
    }
    lines.push_str(&format!("{}  INFO plain text line\n", iso(t0 + 5)));
    let logs = agent.dir.path().join("logs");
    std::fs::write(logs.join("agent.log.00000000000000000001"), &lines).unwrap();
    let state = agent.dir.path().join("state").join("log-transfer.json");
    std::fs::write(&state, format!("{{\"next_start\": {t0}}}")).unwrap();
    // The store is down: the shipment fails, naming the window, and the offset stays.
    let mut c = s3.child.take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    let ship = || {
        Command::new(sms_tests::sms_agent())
            .args(["logs", "ship", "--config"])
            .arg(agent.dir.path().join("agent.toml"))
            .output()
            .unwrap()
    };
    let out = ship();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("shipping window") && err.contains("cannot reach OBS"),
        "{err}"
    );
    let st: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(st["next_start"].as_u64(), Some(t0));
    // Back: everything from t0 on goes up, each line once, as JSON objects.
    s3.spawn(SK, &[]);
    let out = ship();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = objects(&s3.root.path().join(BUCKET));
    let all: Vec<Value> = stored
        .iter()
        .inspect(|(k, _)| assert!(k.starts_with("LogTanks/") && k.ends_with(".json"), "{k}"))
        .flat_map(|(_, t)| {
            t.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    for i in 0..36u64 {
        let n = all
            .iter()
            .filter(|v| v["fields"]["message"] == format!("line {i}"))
            .count();
        assert_eq!(n, 1, "line {i}");
    }
    assert_eq!(
        all.iter()
            .filter(|v| v["message"]
                .as_str()
                .is_some_and(|m| m.ends_with("plain text line")))
            .count(),
        1
    );
}
