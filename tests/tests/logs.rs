//! The agent's own log files (`[agent] log_dir`, `log_format`, `[logs]` rotation) written by
//! the real daemon and receiver processes, and kept free of secrets.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use sms_tests::procs::{Agent, Emulator, Kit, Receiver, AK, SK};

/// The temporary AK/SK's security token the daemon is given (it is sent, never written).
const TOKEN: &str = "SecurityTokenForTheLogTest-0123456789abcdefghijklmnopqrstuvwxyz";

/// Every file of `dir`, concatenated.
fn read_all(dir: &Path) -> String {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    names
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn daemon_writes_rotated_json_logs_without_secrets() {
    let emu = Emulator::start();
    let auth =
        format!("access_key = \"{AK}\"\nsecret_key = \"{SK}\"\nsecurity_token = \"{TOKEN}\"\n");
    // Trace level: the most the agent (and its HTTP stack) ever logs.
    let agent = Agent::start_with(
        &emu.url(),
        &auth,
        "log_format = \"json\"\n[logs]\nmax_file_size = \"8KiB\"\nmax_total = \"64KiB\"\n",
        &[("RUST_LOG", "trace")],
    );
    let logs = agent.dir.path().join("logs");
    wait_for("registration in the log file", 30, || {
        logs.join("agent.log").is_file() && read_all(&logs).contains("registered")
    });
    // Polls every second at trace level fill several 8 KiB files.
    wait_for("a rotation", 60, || {
        std::fs::read_dir(&logs).unwrap().count() >= 3
    });
    let files: Vec<_> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let mut total = 0;
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len();
        // One event may straddle: a file holds at most max_file_size, unless a single event
        // is longer than that.
        assert!(len <= 8 * 1024 + 4096, "{}: {len} bytes", f.display());
        total += len;
        let name = f.file_name().unwrap().to_str().unwrap();
        assert!(
            name == "agent.log"
                || name
                    .strip_prefix("agent.log.")
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())),
            "unexpected file {name}"
        );
    }
    assert!(total <= 64 * 1024 + 8 * 1024, "{total} bytes kept");
    let text = read_all(&logs);
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    assert!(!text.contains(SK), "the secret key is in the log files");
    assert!(
        !text.contains(TOKEN),
        "the security token is in the log files"
    );
    // stderr (the journal under systemd) is scrubbed the same way.
    let stderr = agent.log();
    assert!(!stderr.contains(SK) && !stderr.contains(TOKEN));
}

#[test]
fn receiver_writes_its_own_text_log() {
    let kit = Kit::new();
    let root = kit.dir.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let rx = Receiver::start(&kit, &["--root".into(), root.display().to_string()]);
    let log = kit.dir.path().join("logs").join("receive.log");
    wait_for("receive.log", 10, || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("receiver listening"))
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(&rx.addr), "{text}");
    // Plain text for a file: no colour escapes, whatever the terminal.
    assert!(!text.contains('\u{1b}'), "{text}");
    let key = std::fs::read_to_string(kit.dir.path().join("c/target-key.pem")).unwrap();
    let body = key.lines().nth(1).unwrap();
    assert!(!text.contains(body));
}
