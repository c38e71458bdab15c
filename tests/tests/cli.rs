//! The command line of `migrate` and `receive` as an operator meets it: the progress bar on a
//! terminal, Ctrl-C and SIGTERM, `--json`, exit statuses, `receive --root` on a new directory.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module,
    clippy::cast_possible_truncation
)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sms_tests::procs::{signal, wait_bounded, Kit, Receiver};
use sms_tests::{run, sms_agent};

fn migrate_cmd(kit: &Kit, addr: &str, disks: &[(&Path, &str)], extra: &[&str]) -> Command {
    let mut cmd = Command::new(sms_agent());
    cmd.args(["migrate", "--mode", "block", "--target", addr])
        .args(["--ca", &kit.p("c/ca.pem"), "--cert", &kit.p("c/source.pem")])
        .args(["--key", &kit.p("c/source-key.pem")])
        .args(["--state-dir", &kit.p("source-state")]);
    for (s, n) in disks {
        cmd.arg("--disk").arg(format!("{}={n}", s.display()));
    }
    cmd.args(extra);
    cmd
}

fn noise(n: usize, mut x: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An image of `mib` MiB of incompressible data (every byte is used).
fn noise_image(dir: &Path, name: &str, mib: usize, seed: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, noise(mib << 20, seed)).unwrap();
    p
}

/// An empty (sparse) target image.
fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

/// Allocated bytes of a (sparse) file: how much the receiver wrote.
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map_or(0, |m| m.blocks() * 512)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `cmd` as one shell command line.
fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Text with ANSI escape sequences (CSI and the two-byte ones) removed.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if it.next() == Some('[') {
            for c in it.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// "N.NN MiB/s" of a bar segment, in MiB/s.
fn bar_rate(bar: &str) -> Option<f64> {
    let i = bar.find("/s ")?;
    let mut words = bar[..i].rsplit(' ');
    let unit = words.next()?;
    let n: f64 = words.next()?.parse().ok()?;
    let scale = match unit {
        "B" => 1.0 / 1048576.0,
        "KiB" => 1.0 / 1024.0,
        "MiB" => 1.0,
        "GiB" => 1024.0,
        _ => return None,
    };
    Some(n * scale)
}

/// "N.NN MiB" before "/64.00 MiB" of a bar segment, in MiB.
fn bar_done(bar: &str, total: &str) -> Option<f64> {
    let i = bar.find(&format!("/{total}"))?;
    let mut words = bar[..i].rsplit(' ');
    let unit = words.next()?;
    let n: f64 = words.next()?.parse().ok()?;
    Some(match unit {
        "B" => 0.0,
        "KiB" => n / 1024.0,
        _ => n,
    })
}

#[test]
fn the_progress_bar_on_a_terminal_reaches_100_only_at_the_full_size_and_logs_stay_whole() {
    use nix::sys::signal::Signal;
    let kit = Kit::new();
    let src = noise_image(kit.dir.path(), "src.img", 64, 11);
    let dst = image(kit.dir.path(), "dst.img", 64 << 20);
    let rx = Receiver::disks(&kit, &[("disk0", &dst)]);
    // 160 Mbit/s (19 MiB/s): about 3.5 s for the whole, many ticks of the bar; -v adds log
    // lines while it is drawn.
    let args = ["--limit-mbit", "160", "-v"];
    // First a run stopped part way (no terminal), so that the bar's run resumes.
    let first = migrate_cmd(&kit, &rx.addr, &[(&src, "disk0")], &args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while allocated(&dst) < 16 << 20 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&first, Signal::SIGINT);
    let (st, err) = wait_bounded(first, Duration::from_secs(30), "the first migrate");
    assert_eq!(st.code(), Some(130), "{err}");
    let cmd = migrate_cmd(&kit, &rx.addr, &[(&src, "disk0")], &args);
    // A pseudo-terminal as wide as an operator's window, so no line is cut at 80 columns.
    let line = format!("stty cols 160 rows 40; exec {}", command_line(&cmd));
    let out = Command::new("script")
        .args(["-qfec", &line, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "migrate failed under a terminal: {raw}"
    );
    assert!(rx.wait(), "the receiver did not complete");
    run("cmp", &[src.to_str().unwrap(), dst.to_str().unwrap()]);

    let text = strip_ansi(&raw);
    let segments: Vec<&str> = text
        .split(['\r', '\n'])
        .map(str::trim_end)
        .filter(|s| !s.trim().is_empty())
        .collect();
    let bars: Vec<&&str> = segments
        .iter()
        .filter(|s| s.trim_start().starts_with("copy ") && s.contains("MiB/"))
        .collect();
    assert!(bars.len() >= 3, "too few bar draws: {text}");
    let full = "64.00 MiB/64.00 MiB";
    for b in &bars {
        if b.contains("100%") {
            assert!(b.contains(full), "100 % before the full size: {b:?}");
        }
        // No spike from the resumed bytes, nor a rate far above the limit.
        if let Some(r) = bar_rate(b) {
            assert!(
                r < 40.0,
                "a rate of {r} MiB/s under a 19 MiB/s limit: {b:?}"
            );
        }
    }
    assert!(
        bars.iter().any(|b| b.contains("100%") && b.contains(full)),
        "the bar never reached 100 %: {text}"
    );
    assert!(
        bars.iter().any(|b| !b.contains("100%")),
        "the bar was never drawn mid-pass: {text}"
    );
    // It starts where the first run stopped, not at 0.
    let start = bar_done(bars[0], "64.00 MiB").unwrap();
    assert!(
        start >= 8.0,
        "the first draw shows {start} MiB: {:?}",
        bars[0]
    );
    let logs: Vec<&&str> = segments
        .iter()
        .filter(|s| {
            [" INFO ", " DEBUG ", " WARN "]
                .iter()
                .any(|l| s.contains(l))
        })
        .collect();
    assert!(!logs.is_empty(), "no log line under -v: {text}");
    for l in &logs {
        assert!(
            l.starts_with(|c: char| c.is_ascii_digit()),
            "a log line does not start its own line: {l:?}"
        );
        assert!(
            !l.contains("/s  ETA"),
            "a log line is mixed with the bar: {l:?}"
        );
    }
    // The summary comes after the bar, on its own line, and counts the resumed chunks.
    let summary = segments
        .iter()
        .find(|s| s.starts_with("copy complete: "))
        .unwrap_or_else(|| panic!("no summary line: {text}"));
    assert!(!summary.contains("(0 resumed"), "{summary}");
}

/// The resume command migrate printed on stderr.
fn resume_command(stderr: &str) -> String {
    let mut lines = stderr.lines();
    while let Some(l) = lines.next() {
        if l.starts_with("to resume, run the same command:") {
            return lines.next().unwrap_or_default().trim().to_string();
        }
    }
    panic!("no resume command in: {stderr}");
}

#[test]
fn sigint_and_sigterm_stop_migrate_at_a_checkpoint_and_the_printed_command_resumes() {
    use nix::sys::signal::Signal;
    let kit = Kit::new();
    let src = noise_image(kit.dir.path(), "src.img", 32, 7);
    for (sig, code) in [(Signal::SIGINT, 130), (Signal::SIGTERM, 143)] {
        let dst = image(kit.dir.path(), &format!("{sig}.img"), 32 << 20);
        let rx = Receiver::disks(&kit, &[("disk0", &dst)]);
        // 40 Mbit/s: about 7 s for the whole copy, so the signal lands mid-pass.
        let mut cmd = migrate_cmd(&kit, &rx.addr, &[(&src, "disk0")], &["--limit-mbit", "40"]);
        cmd.args(["--task-id", &format!("sig-{sig}")]);
        let tx = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while allocated(&dst) < 4 << 20 {
            assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
            std::thread::sleep(Duration::from_millis(20));
        }
        let stdout = take_stdout(&tx);
        signal(&tx, sig);
        let at = Instant::now();
        let (st, err) = wait_bounded(tx, Duration::from_secs(30), "the interrupted migrate");
        let took = at.elapsed();
        let out = stdout.join().unwrap();
        assert_eq!(st.code(), Some(code), "{sig}: {st}: {err}");
        assert!(
            took < Duration::from_secs(5),
            "{sig}: took {took:?} to stop"
        );
        assert!(
            err.contains(&format!("{sig}: stopped at a checkpoint")),
            "{err}"
        );
        assert!(out.contains("copy pass 0 stopped: "), "{sig}: {out}");
        let resume = resume_command(&err);
        assert!(
            resume.contains("--limit-mbit 40") && resume.contains(" migrate "),
            "{resume}"
        );
        assert!(
            allocated(&dst) < 32 << 20 || !out.contains("copy complete"),
            "{sig}: the copy ended before the signal"
        );
        // The printed command, run as printed, finishes the copy into the same receiver.
        let again = Command::new("sh")
            .args(["-c", &resume])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let again_out = String::from_utf8_lossy(&again.stdout);
        assert!(
            again.status.success(),
            "{sig}: the resume failed: {again_out}{}",
            String::from_utf8_lossy(&again.stderr)
        );
        assert!(again_out.contains("copy complete: "), "{again_out}");
        let resumed: u64 = again_out
            .split(" resumed")
            .next()
            .and_then(|s| s.rsplit('(').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        assert!(resumed > 0, "{sig}: nothing was resumed: {again_out}");
        assert!(rx.wait(), "{sig}: the receiver did not complete");
        run("cmp", &[src.to_str().unwrap(), dst.to_str().unwrap()]);
    }
}

fn take_stdout(child: &Child) -> std::thread::JoinHandle<String> {
    // Child::stdout cannot be taken through a shared reference; read it via /proc instead
    // would race, so the pipe is dup'ed.
    use std::os::fd::AsFd;
    let fd = child
        .stdout
        .as_ref()
        .unwrap()
        .as_fd()
        .try_clone_to_owned()
        .unwrap();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::fs::File::from(fd).read_to_string(&mut s);
        s
    })
}

/// A receiver whose stdout (its `--json` document) is piped; its address, read from stderr.
fn json_receiver(kit: &Kit, args: &[&str]) -> (Child, String) {
    let mut child = Command::new(sms_agent())
        .args(["receive", "--listen", "127.0.0.1:0", "--json"])
        .args(["--ca", &kit.p("c/ca.pem"), "--cert", &kit.p("c/target.pem")])
        .args(["--key", &kit.p("c/target-key.pem")])
        .args(["--state-dir", &kit.p("state")])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let mut addr = String::new();
    while err.read_line(&mut line).unwrap() > 0 {
        if let Some(a) = line.trim().strip_prefix("sms-agent receive: listening on ") {
            addr = a.to_string();
            break;
        }
        line.clear();
    }
    assert!(!addr.is_empty(), "receiver did not start: {line}");
    std::thread::spawn(move || {
        let mut sink = String::new();
        while err.read_line(&mut sink).unwrap_or(0) > 0 {
            sink.clear();
        }
    });
    (child, addr)
}

fn wait_json(mut child: Child) -> (std::process::ExitStatus, Value) {
    let mut s = String::new();
    child.stdout.take().unwrap().read_to_string(&mut s).unwrap();
    let st = child.wait().unwrap();
    let v =
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("not one JSON document ({e}): {s:?}"));
    (st, v)
}

#[test]
fn json_summaries_of_migrate_and_receive_are_one_document_each() {
    let kit = Kit::new();
    let src = noise_image(kit.dir.path(), "src.img", 8, 3);
    let dst = image(kit.dir.path(), "dst.img", 8 << 20);
    let arg = format!("disk0={}", dst.display());
    let (rx, addr) = json_receiver(&kit, &["--once", "--disk", &arg]);
    let out = migrate_cmd(&kit, &addr, &[(&src, "disk0")], &["--sync", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("migrate --json is not one JSON document ({e}): {stdout:?}"));
    assert_eq!(v["command"], "migrate");
    assert_eq!(v["mode"], "block");
    assert_eq!(v["verdict"], "complete");
    assert_eq!(v["disks"][0]["name"], "disk0");
    let passes = v["passes"].as_array().unwrap();
    assert_eq!(passes.len(), 2, "{v}");
    let (copy, sync) = (&passes[0], &passes[1]);
    assert_eq!(copy["kind"], "copy");
    assert_eq!(copy["verdict"], "complete");
    assert_eq!(copy["bytes_read"], 8 << 20);
    assert_eq!(copy["bytes_sent"], 8 << 20);
    assert_eq!(copy["chunks_resumed"], 0);
    for k in [
        "bytes_on_wire",
        "bytes_zero",
        "chunks_resent",
        "chunks_compared_before_sending",
        "seconds",
        "rate_bytes_per_sec",
    ] {
        assert!(copy[k].is_number(), "{k} missing: {copy}");
    }
    assert_eq!(sync["kind"], "sync");
    assert_eq!(
        sync["bytes_sent"], 0,
        "an unchanged source sends nothing: {sync}"
    );

    let (st, r) = wait_json(rx);
    assert!(st.success(), "receive --once --json: {st}: {r}");
    assert_eq!(r["command"], "receive");
    assert_eq!(r["verdict"], "complete");
    let sessions = r["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2, "{r}");
    assert_eq!(sessions[0]["pass"], 0);
    assert_eq!(sessions[0]["verdict"], "complete");
    assert_eq!(sessions[0]["more_passes_follow"], true);
    assert_eq!(sessions[0]["bytes_written"], 8 << 20);
    assert_eq!(sessions[1]["pass"], 1);
    assert_eq!(sessions[1]["more_passes_follow"], false);
    run("cmp", &[src.to_str().unwrap(), dst.to_str().unwrap()]);
}

#[test]
fn receive_root_is_created_when_its_parent_exists_and_refused_with_64_when_not() {
    use std::os::unix::fs::PermissionsExt;
    let kit = Kit::new();
    let start = |root: &Path| {
        let mut c = Command::new(sms_agent());
        c.args(["receive", "--listen", "127.0.0.1:0"])
            .args(["--ca", &kit.p("c/ca.pem"), "--cert", &kit.p("c/target.pem")])
            .args(["--key", &kit.p("c/target-key.pem")])
            .args(["--state-dir", &kit.p("state")])
            .arg("--root")
            .arg(root);
        c
    };
    // A missing parent is refused, clearly, as a bad configuration.
    let missing = kit.dir.path().join("no-such-dir/root");
    let out = start(&missing).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("parent directory") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!missing.exists());

    // A missing root under an existing parent is made (0700) and a file migration fills it.
    let root = kit.dir.path().join("new-root");
    let src = kit.dir.path().join("tree");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/a.bin"), noise(300_000, 9)).unwrap();
    std::fs::write(src.join("b.txt"), "hello\n").unwrap();
    let (rx, addr) = json_receiver(&kit, &["--once", "--root", root.to_str().unwrap()]);
    let mode = std::fs::metadata(&root).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "the new root's mode is {mode:o}");
    let out = Command::new(sms_agent())
        .args(["migrate", "--mode", "file", "--target", &addr, "--json"])
        .args(["--ca", &kit.p("c/ca.pem"), "--cert", &kit.p("c/source.pem")])
        .args(["--key", &kit.p("c/source-key.pem")])
        .arg("--source-root")
        .arg(&src)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["mode"], "file");
    assert_eq!(v["verdict"], "complete");
    let fs = &v["passes"][0]["filesystems"][0];
    assert_eq!(fs["files_sent"], 2, "{v}");
    let (st, r) = wait_json(rx);
    assert!(st.success(), "{r}");
    assert_eq!(r["sessions"][0]["mode"], "file");
    assert_eq!(r["sessions"][0]["files_written"], 2, "{r}");
    assert_eq!(
        std::fs::read(root.join("sub/a.bin")).unwrap(),
        noise(300_000, 9)
    );
    assert_eq!(std::fs::read(root.join("b.txt")).unwrap(), b"hello\n");
}

#[test]
fn bad_configuration_exits_64_and_bad_usage_2() {
    let kit = Kit::new();
    let out = Command::new(sms_agent())
        .args(["migrate", "--mode", "block", "--target", "127.0.0.1:9"])
        .args(["--ca", &kit.p("c/ca.pem"), "--cert", &kit.p("c/nope.pem")])
        .args(["--key", &kit.p("c/source-key.pem"), "--disk", "/dev/null=d"])
        .args(["--state-dir", &kit.p("s")])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(sms_agent())
        .args(["migrate", "--no-such-option"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let help = Command::new(sms_agent())
        .args(["migrate", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for s in ["Exit status:", "130", "143", "64"] {
        assert!(help.contains(s), "--help lacks {s}: {help}");
    }
}

#[test]
fn sigterm_and_sigint_stop_receive_with_143_and_130_and_the_copy_resumes() {
    use nix::sys::signal::Signal;
    let kit = Kit::new();
    let src = noise_image(kit.dir.path(), "src.img", 32, 21);
    let dst = image(kit.dir.path(), "dst.img", 32 << 20);
    let arg = format!("disk0={}", dst.display());
    // A receiver that serves until stopped, stopped by SIGTERM while a session runs.
    let (rx, addr) = json_receiver(&kit, &["--disk", &arg]);
    let tx = migrate_cmd(&kit, &addr, &[(&src, "disk0")], &["--limit-mbit", "40"])
        .args(["--task-id", "rx-signal", "--peer-timeout", "5"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while allocated(&dst) < 4 << 20 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(&rx, Signal::SIGTERM);
    let at = Instant::now();
    let (st, doc) = wait_json(rx);
    assert_eq!(st.code(), Some(143), "{doc}");
    assert!(
        at.elapsed() < Duration::from_secs(6),
        "took {:?}",
        at.elapsed()
    );
    assert_eq!(doc["verdict"], "interrupted", "{doc}");
    // The sender loses its receiver and fails; what arrived stays resumable.
    let (st, err) = wait_bounded(tx, Duration::from_secs(60), "the cut-off migrate");
    assert_eq!(st.code(), Some(1), "{err}");

    // A new receiver on the same targets and state: the rerun resumes and completes.
    let (rx, addr) = json_receiver(&kit, &["--once", "--disk", &arg]);
    let out = migrate_cmd(&kit, &addr, &[(&src, "disk0")], &[])
        .args(["--task-id", "rx-signal"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stdout.contains("(0 resumed"),
        "nothing was resumed: {stdout}"
    );
    let (st, doc) = wait_json(rx);
    assert!(st.success(), "{doc}");
    run("cmp", &[src.to_str().unwrap(), dst.to_str().unwrap()]);

    // An idle receiver stops at once on SIGINT.
    let (rx, _) = json_receiver(&kit, &["--disk", &arg]);
    signal(&rx, Signal::SIGINT);
    let at = Instant::now();
    let (st, doc) = wait_json(rx);
    assert_eq!(st.code(), Some(130), "{doc}");
    assert!(
        at.elapsed() < Duration::from_secs(2),
        "took {:?}",
        at.elapsed()
    );
    assert_eq!(doc["sessions"].as_array().map(Vec::len), Some(0), "{doc}");
}

/// Item: colour codes only on a terminal. A command whose stderr is a pipe (as under a
/// redirect, `| tee`, or a service manager that is not the journal) logs plain text.
#[test]
fn logs_to_a_pipe_carry_no_ansi_escapes() {
    let kit = Kit::new();
    // A refused target makes migrate log (at ERROR) and exit; -v adds debug lines.
    let out = Command::new(sms_agent())
        .args([
            "-v",
            "migrate",
            "--mode",
            "block",
            "--target",
            "127.0.0.1:9",
        ])
        .args(["--ca", &kit.p("c/ca.pem"), "--cert", &kit.p("c/source.pem")])
        .args(["--key", &kit.p("c/source-key.pem"), "--disk", "/dev/null=d"])
        .args(["--state-dir", &kit.p("s")])
        .env_remove("JOURNAL_STREAM")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.lines().count() >= 1, "no log lines at all: {err}");
    assert!(
        !err.contains("\x1b["),
        "ANSI escapes in piped stderr: {err:?}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("\x1b["));
}

/// Item: `--version` is honest about this build and names the `agent_version` reported to
/// SMS (the lowest the service's documented gate accepts: SMS.7707, ≥ 25.2.0).
#[test]
fn version_names_our_own_and_the_reported_agent_version() {
    let out = Command::new(sms_agent()).arg("--version").output().unwrap();
    assert!(out.status.success());
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(
        v.starts_with(&format!("sms-agent {}", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    assert!(
        v.contains(&format!(
            "agent_version {}",
            sms_agent::api::REPORTED_AGENT_VERSION
        )),
        "{v}"
    );
}
