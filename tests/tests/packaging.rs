//! `packaging/install.sh` into scratch roots: flags, checks that refuse and change nothing, and
//! an uninstall that leaves nothing behind.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::json;
use sms_tests::procs::Emulator;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/install.sh")
}

fn agent_bin() -> PathBuf {
    sms_tests::sms_agent()
}

fn install(prefix: &Path, args: &[&str]) -> Output {
    Command::new("sh")
        .arg(script())
        .arg("--prefix")
        .arg(prefix)
        .arg("--binary")
        .arg(agent_bin())
        .args(args)
        .output()
        .unwrap()
}

fn files_under(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(files_under(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn installs_from_flags_and_uninstalls_cleanly() {
    let emu = Emulator::start();
    let root = tempfile::tempdir().unwrap();
    let sk = root.path().join("sk.txt");
    std::fs::write(&sk, "THE-SECRET-KEY\n").unwrap();
    let prefix = root.path().join("root");
    let out = install(
        &prefix,
        &[
            "--endpoint",
            &emu.url(),
            "--ak",
            "MYAK",
            "--sk-file",
            sk.to_str().unwrap(),
            "--project-id",
            "p1",
            "--name",
            "web01",
            "--no-prompt",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = prefix.join("usr/local/bin/sms-agent");
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(mode(&prefix.join("etc/sms-agent")), 0o700);
    assert_eq!(mode(&prefix.join("etc/sms-agent/agent.toml")), 0o600);
    assert_eq!(mode(&prefix.join("etc/sms-agent/sk")), 0o600);
    let cfg = std::fs::read_to_string(prefix.join("etc/sms-agent/agent.toml")).unwrap();
    assert!(
        cfg.contains(&format!("endpoint = \"{}\"", emu.url()))
            && cfg.contains("access_key = \"MYAK\"")
            && cfg.contains("name = \"web01\""),
        "{cfg}"
    );
    assert!(
        !cfg.contains("THE-SECRET-KEY"),
        "the SK belongs in the sk file only"
    );
    assert_eq!(
        std::fs::read_to_string(prefix.join("etc/sms-agent/sk"))
            .unwrap()
            .trim(),
        "THE-SECRET-KEY"
    );
    // The installed binary works.
    // The config names the live path of the key file; point it into the scratch root.
    let probe = Command::new(&bin)
        .args(["probe", "--config"])
        .arg(prefix.join("etc/sms-agent/agent.toml"))
        .env(
            "SMS_AGENT_AUTH_SECRET_KEY_FILE",
            prefix.join("etc/sms-agent/sk"),
        )
        .output()
        .unwrap();
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&probe.stdout).unwrap();
    assert_eq!(body["name"], "web01");

    let out = Command::new("sh")
        .arg(script())
        .arg("--prefix")
        .arg(&prefix)
        .arg("--uninstall")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        files_under(&prefix).is_empty(),
        "left behind: {:?}",
        files_under(&prefix)
    );
}

#[test]
fn failed_checks_change_nothing() {
    let emu = Emulator::start();
    let root = tempfile::tempdir().unwrap();
    let sk = root.path().join("sk.txt");
    std::fs::write(&sk, "S\n").unwrap();
    let sk = sk.to_str().unwrap();
    let prefix = root.path().join("root");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--frobnicate".into()], "unknown option: --frobnicate"),
        (
            vec![
                "--endpoint".into(),
                emu.url(),
                "--ak".into(),
                "A".into(),
                "--sk".into(),
                "S".into(),
            ],
            "never taken on the command line",
        ),
        (
            vec![
                "--endpoint".into(),
                "ftp://x".into(),
                "--ak".into(),
                "A".into(),
                "--sk-file".into(),
                sk.into(),
                "--no-prompt".into(),
            ],
            "http(s) URL",
        ),
        (
            vec![
                "--endpoint".into(),
                "http://127.0.0.1:9".into(),
                "--ak".into(),
                "A".into(),
                "--sk-file".into(),
                sk.into(),
                "--no-prompt".into(),
            ],
            "cannot reach http://127.0.0.1:9",
        ),
        (
            vec![
                "--endpoint".into(),
                emu.url(),
                "--sk-file".into(),
                sk.into(),
                "--no-prompt".into(),
            ],
            "missing --ak",
        ),
        (
            vec![
                "--endpoint".into(),
                emu.url(),
                "--ak".into(),
                "A".into(),
                "--no-prompt".into(),
            ],
            "missing the secret key",
        ),
    ];
    for (args, want) in &cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = install(&prefix, &a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            files_under(&prefix).is_empty(),
            "{args:?} wrote {:?}",
            files_under(&prefix)
        );
    }
    // A clock an hour off the endpoint's breaks AK/SK signing: refused before anything is written.
    emu.admin(
        "POST",
        "/_emulator/clock",
        Some(json!({"offset_secs": 3600})),
    );
    let out = install(
        &prefix,
        &[
            "--endpoint",
            &emu.url(),
            "--ak",
            "A",
            "--sk-file",
            sk,
            "--no-prompt",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("SMS.0205"), "{err}");
    assert!(files_under(&prefix).is_empty());
}

#[test]
fn prompts_on_a_terminal_without_echoing_the_secret() {
    let emu = Emulator::start();
    let root = tempfile::tempdir().unwrap();
    let prefix = root.path().join("root");
    // `script` gives the installer a real terminal; the answers arrive as typed input.
    let cmd = format!(
        "sh {} --prefix {} --binary {}",
        script().display(),
        prefix.display(),
        agent_bin().display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Each answer is typed only once its prompt shows, as a person would.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let reader = {
        use std::io::Read;
        let mut stdout = child.stdout.take().unwrap();
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for (prompt, answer) in [
            ("SMS endpoint", emu.url().as_str()),
            ("Access key (AK)", "PROMPTAK"),
            ("Secret key (SK, not echoed)", "typed-secret-value"),
        ] {
            let t0 = std::time::Instant::now();
            while !String::from_utf8_lossy(&seen.lock().unwrap()).contains(prompt) {
                assert!(t0.elapsed().as_secs() < 30, "no prompt {prompt:?}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            writeln!(stdin, "{answer}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    reader.join().unwrap();
    let transcript = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    assert!(
        out.status.success(),
        "{transcript}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        transcript.contains("Secret key (SK, not echoed)"),
        "{transcript}"
    );
    assert!(
        transcript.contains("PROMPTAK"),
        "the AK is echoed as typed: {transcript}"
    );
    assert!(
        !transcript.contains("typed-secret-value"),
        "the secret was echoed: {transcript}"
    );
    assert_eq!(
        std::fs::read_to_string(prefix.join("etc/sms-agent/sk"))
            .unwrap()
            .trim(),
        "typed-secret-value"
    );
}
