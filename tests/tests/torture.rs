//! Torture: `kill -9` of the sender, the receiver and the daemon at random moments of block
//! and file passes and of `--sync` rounds, each followed by a resume. At the end the target
//! must be identical to the source (block: every byte; file: `rsync --checksum` finds nothing
//! to do), and the bytes sent over all the interrupted runs and their resumes may exceed those
//! of the same rounds run without kills by at most 10 % of the data.
//!
//! `SMS_TORTURE_KILLS` sets the kills in all (`bench/torture.sh` runs 50); the suite runs a
//! few. `SMS_TORTURE_SEED` replays a run. The test runs again inside a network namespace of
//! its own, so that the loopback byte counters there count this traffic and nothing else.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss
)]

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sms_tests::procs::{Kit, Receiver};
use sms_tests::{run, run_quiet, sms_agent};

const NETNS_ENV: &str = "SMS_TORTURE_NETNS";
/// Kills in the suite's short run.
const SHORT_KILLS: u32 = 9;
/// Port of every receiver: the namespace is private.
const PORT: u16 = 8900;
/// Bound on any one run after a kill: a hang is a failure, not a slow pass.
const HANG: Duration = Duration::from_secs(120);

/// Deterministic noise.
fn noise(n: usize, mut x: u64) -> Vec<u8> {
    x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A xorshift for kill times and victims.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Bytes sent on this namespace's loopback so far.
fn lo_bytes() -> u64 {
    std::fs::read_to_string("/sys/class/net/lo/statistics/tx_bytes")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Runs this test again inside a new network namespace; false when the caller is the
/// outer run (whose job is then done).
fn inside_netns(test: &str) -> bool {
    if std::env::var_os(NETNS_ENV).is_some() {
        run("ip", &["link", "set", "lo", "up"]);
        return true;
    }
    sms_tests::require_root();
    let ns = sms_tests::unique("sms-torture-");
    run("ip", &["netns", "add", &ns]);
    let st = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(NETNS_ENV, &ns)
        .status()
        .unwrap();
    run_quiet("ip", &["netns", "del", &ns]);
    assert!(st.success(), "the torture run failed (see above)");
    false
}

/// What one mode's torture did.
#[derive(Debug, Default)]
struct Figures {
    kills: u32,
    resumes: u32,
    rounds: u32,
    data: u64,
    bytes: u64,
    clean_bytes: u64,
}

impl Figures {
    fn resent(&self) -> u64 {
        self.bytes.saturating_sub(self.clean_bytes)
    }

    #[allow(clippy::cast_precision_loss)]
    fn ratio(&self) -> f64 {
        self.resent() as f64 / self.data.max(1) as f64
    }

    fn print(&self, mode: &str) {
        println!(
            "torture {mode}: {} kills, {} resumes, {} rounds, {} data bytes, {} bytes on the wire ({} without kills), re-sent {} = {:.1} % of the data: {}",
            self.kills,
            self.resumes,
            self.rounds,
            self.data,
            self.bytes,
            self.clean_bytes,
            self.resent(),
            self.ratio() * 100.0,
            if self.ratio() <= 0.10 { "PASS" } else { "FAIL" }
        );
    }
}

fn kills_total() -> u32 {
    std::env::var("SMS_TORTURE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SHORT_KILLS)
}

fn rng() -> Rng {
    let seed = std::env::var("SMS_TORTURE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("torture seed {seed} (SMS_TORTURE_SEED={seed} replays the kill times)");
    Rng(seed | 1)
}

/// Waits for `child` up to `d`; whether it exited (and how).
fn wait_for(child: &mut Child, d: Duration) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if t.elapsed() >= d {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A process killed when dropped, so a failed assertion leaves nothing running.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        kill9(&mut self.0);
    }
}

/// How the sides of one attempt are started and its result checked.
struct Round<'a> {
    start_rx: &'a dyn Fn() -> Receiver,
    start: &'a dyn Fn() -> Child,
    /// Asserts that the target holds what the source held when the round began.
    check: &'a dyn Fn(),
    /// How long the last uninterrupted attempt of this kind took: kills land within it.
    took: &'a mut Option<Duration>,
}

/// One attempt of a round: starts the sender, kills a victim at a random moment of the
/// attempt's expected length when kills remain. Returns whether the round completed.
fn attempt(
    f: &mut Figures,
    rng: &mut Rng,
    kills: u32,
    rx: &mut Option<Receiver>,
    round: &mut Round<'_>,
) -> bool {
    if rx
        .as_mut()
        .is_none_or(|r| r.child.try_wait().unwrap().is_some())
    {
        *rx = Some((round.start_rx)());
    }
    let began = Instant::now();
    let mut child = (round.start)();
    if f.kills < kills {
        let span = round.took.map_or(2500, |d| d.as_millis() as u64 + 50);
        let at = Duration::from_millis(20 + rng.below(span));
        if wait_for(&mut child, at).is_none() {
            f.kills += 1;
            f.resumes += 1;
            if rng.below(2) == 0 {
                kill9(&mut child);
            } else {
                let r = rx.as_mut().unwrap();
                kill9(&mut r.child);
                let st =
                    wait_for(&mut child, HANG).expect("the sender hung after the receiver died");
                *rx = None;
                if st.success() {
                    // The receiver acknowledged the end before it died: a success is a
                    // promise, so the target must hold the round's data now.
                    (round.check)();
                    return true;
                }
            }
            return false;
        }
    }
    let st = wait_for(&mut child, HANG).expect("an uninterrupted run hung");
    assert!(st.success(), "an uninterrupted run failed");
    *round.took = Some(began.elapsed());
    true
}

/// Block mode: a 112 MiB used disk copied, then changed by 4 MiB and synced, round after
/// round, with kills anywhere.
fn block(kills: u32, rng: &mut Rng) -> Figures {
    let kit = Kit::new();
    let make = |name: &str| -> (PathBuf, PathBuf) {
        let src = PathBuf::from(kit.p(&format!("{name}-src.img")));
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(160 << 20).unwrap();
        f.write_all_at(&noise(96 << 20, 1), 0).unwrap();
        f.write_all_at(&noise(16 << 20, 2), 128 << 20).unwrap();
        let dst = PathBuf::from(kit.p(&format!("{name}-dst.img")));
        std::fs::File::create(&dst)
            .unwrap()
            .set_len(160 << 20)
            .unwrap();
        (src, dst)
    };
    let change = |src: &Path, round: u32| {
        let f = std::fs::OpenOptions::new().write(true).open(src).unwrap();
        let at = (u64::from(round) * (7 << 20)) % (92 << 20);
        f.write_all_at(&noise(4 << 20, 100 + u64::from(round)), at)
            .unwrap();
    };
    let receiver = |dst: &Path| {
        Receiver::start(
            &kit,
            &[
                "--listen".into(),
                format!("127.0.0.1:{PORT}"),
                "--disk".into(),
                format!("disk0={}", dst.display()),
                "--once".into(),
            ],
        )
    };
    let sender = |src: &Path, sync: bool| {
        let mut cmd = Command::new(sms_agent());
        cmd.args(["migrate", "--mode", "block", "--target"])
            .arg(format!("127.0.0.1:{PORT}"))
            .args(["--ca", &kit.p("c/ca.pem"), "--cert", &kit.p("c/source.pem")])
            .args(["--key", &kit.p("c/source-key.pem")])
            .args(["--state-dir", &kit.p("source-state")])
            .arg("--disk")
            .arg(format!("{}=disk0", src.display()))
            .args(["--limit-mbit", "400", "--checkpoint-secs", "0.5"]);
        if sync {
            cmd.arg("--sync");
        }
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };

    let mut f = Figures::default();
    let (src, dst) = make("t");
    let before = lo_bytes();
    let mut rx = None;
    let mut round = 0u32;
    let (mut copy_took, mut sync_took) = (None, None);
    loop {
        if round > 0 {
            change(&src, round);
        }
        let rs = || receiver(&dst);
        let ss = || sender(&src, round > 0);
        let check = || {
            assert!(
                std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap(),
                "block round {round}: migrate succeeded but the target differs"
            );
        };
        let mut r = Round {
            start_rx: &rs,
            start: &ss,
            check: &check,
            took: if round == 0 {
                &mut copy_took
            } else {
                &mut sync_took
            },
        };
        while !attempt(&mut f, rng, kills, &mut rx, &mut r) {}
        if let Some(r) = rx.take() {
            assert!(r.wait(), "the receiver failed");
        }
        round += 1;
        if f.kills >= kills && round >= 2 {
            break;
        }
    }
    f.bytes = lo_bytes() - before;
    f.rounds = round;
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap(),
        "block: the target differs from the source"
    );

    // The same rounds without kills, onto a new target from a new source.
    let (src, dst) = make("clean");
    let before = lo_bytes();
    for r in 0..round {
        if r > 0 {
            change(&src, r);
        }
        let rx = receiver(&dst);
        let st = sender(&src, r > 0).wait().unwrap();
        assert!(st.success());
        assert!(rx.wait());
    }
    f.clean_bytes = lo_bytes() - before;
    f.data = (112 << 20) + u64::from(round - 1) * (4 << 20);
    f
}

/// A tree: three large files and many small ones.
fn fill_tree(root: &Path) -> u64 {
    let mut total = 0;
    for i in 0..3u64 {
        let d = noise(24 << 20, 10 + i);
        std::fs::write(root.join(format!("big{i}.bin")), &d).unwrap();
        total += d.len() as u64;
    }
    for dir in 0..8u64 {
        let d = root.join(format!("d{dir}"));
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..60u64 {
            let data = noise(1000 + (i * 97) as usize % 9000, dir * 1000 + i);
            std::fs::write(d.join(format!("f{i}")), &data).unwrap();
            total += data.len() as u64;
        }
    }
    std::os::unix::fs::symlink("big0.bin", root.join("link")).unwrap();
    total
}

/// One round's changes: part of a large file, appends, rewrites, deletions, new files.
fn change_tree(root: &Path, round: u32) -> u64 {
    let r = u64::from(round);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join(format!("big{}.bin", r % 3)))
        .unwrap();
    f.write_all_at(&noise(2 << 20, 500 + r), (r * (3 << 20)) % (20 << 20))
        .unwrap();
    let mut a = std::fs::OpenOptions::new()
        .append(true)
        .open(root.join("big1.bin"))
        .unwrap();
    a.write_all(&noise(1 << 20, 600 + r)).unwrap();
    let d = root.join(format!("d{}", r % 8));
    for i in 0..10u64 {
        let _ = std::fs::remove_file(d.join(format!("f{}", (r * 10 + i) % 60)));
        std::fs::write(d.join(format!("n{r}-{i}")), noise(3000, 700 + r * 10 + i)).unwrap();
    }
    (3 << 20) + 10 * 3000
}

/// What `rsync --checksum` would change to make `dst` like `src` (empty: identical).
fn tree_diff(src: &Path, dst: &Path) -> String {
    run(
        "rsync",
        &[
            "-aHAXS",
            "--delete",
            "--checksum",
            "--dry-run",
            "--itemize-changes",
            &format!("{}/", src.display()),
            &format!("{}/", dst.display()),
        ],
    )
    .trim()
    .to_string()
}

/// File mode: the tree copied, then changed and synced, round after round, with kills.
fn file(kills: u32, rng: &mut Rng) -> Figures {
    let kit = Kit::new();
    let make = |name: &str| -> (PathBuf, PathBuf, u64) {
        let src = PathBuf::from(kit.p(&format!("{name}-src")));
        let dst = PathBuf::from(kit.p(&format!("{name}-dst")));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        let n = fill_tree(&src);
        (src, dst, n)
    };
    let receiver = |dst: &Path| {
        Receiver::start(
            &kit,
            &[
                "--listen".into(),
                format!("127.0.0.1:{PORT}"),
                "--root".into(),
                dst.display().to_string(),
            ],
        )
    };
    let sender = |src: &Path, sync: bool| {
        let mut cmd = Command::new(sms_agent());
        cmd.args(["migrate", "--mode", "file", "--target"])
            .arg(format!("127.0.0.1:{PORT}"))
            .args(["--ca", &kit.p("c/ca.pem"), "--cert", &kit.p("c/source.pem")])
            .args(["--key", &kit.p("c/source-key.pem")])
            .arg("--source-root")
            .arg(src)
            .args(["--limit-mbit", "300"]);
        if sync {
            cmd.arg("--sync");
        }
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };

    let mut f = Figures::default();
    let (src, dst, size) = make("t");
    f.data = size;
    let before = lo_bytes();
    let mut rx = None;
    let mut round = 0u32;
    let (mut copy_took, mut sync_took) = (None, None);
    loop {
        if round > 0 {
            f.data += change_tree(&src, round);
        }
        let rs = || receiver(&dst);
        let ss = || sender(&src, round > 0);
        let check = || {
            let diff = tree_diff(&src, &dst);
            assert!(
                diff.is_empty(),
                "file round {round}: migrate succeeded but the target differs:\n{diff}"
            );
        };
        let mut r = Round {
            start_rx: &rs,
            start: &ss,
            check: &check,
            took: if round == 0 {
                &mut copy_took
            } else {
                &mut sync_took
            },
        };
        while !attempt(&mut f, rng, kills, &mut rx, &mut r) {}
        round += 1;
        if f.kills >= kills && round >= 2 {
            break;
        }
    }
    // A last --sync, not counted: whatever a killed pass left behind must be removed.
    drop(rx.take());
    let rx = receiver(&dst);
    assert!(sender(&src, true).wait().unwrap().success());
    drop(rx);
    f.bytes = lo_bytes() - before;
    f.rounds = round;
    let diff = tree_diff(&src, &dst);
    assert!(diff.is_empty(), "file: the target differs:\n{diff}");

    let (src, dst, _) = make("clean");
    let before = lo_bytes();
    let rx = receiver(&dst);
    for r in 0..round {
        if r > 0 {
            change_tree(&src, r);
        }
        assert!(sender(&src, r > 0).wait().unwrap().success());
    }
    assert!(sender(&src, true).wait().unwrap().success());
    drop(rx);
    f.clean_bytes = lo_bytes() - before;
    f
}

/// The daemon: a block task started and synced by the emulator's operator, with the daemon
/// and the receiver killed at random moments; the daemon resumes from the receiver's
/// checkpoint by itself.
fn daemon(kills: u32, rng: &mut Rng) -> Figures {
    use serde_json::json;
    use sms_tests::procs::{Agent, Emulator, AK, SK};
    let kit = Kit::new();
    let src = sms_tests::LoopDisk::new(96);
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&src.dev)
            .unwrap();
        f.write_all_at(&noise(64 << 20, 31), 0).unwrap();
        f.sync_all().unwrap();
    }
    let emu = Emulator::start();
    let extra = format!(
        "[probe]\ndevices = [\"{}\"]\n[transfer]\nport = {PORT}\nstreams = 2\n",
        src.path()
    );
    let mut agent = Agent::start_with(
        &emu.url(),
        &format!("access_key = \"{AK}\"\nsecret_key = \"{SK}\"\n"),
        &extra,
        &[],
    );
    let id = emu.source_id(&agent);
    let task = |name: &str, dst: &Path| -> String {
        let (st, task) = emu.operator(
            "POST",
            "/v3/tasks",
            Some(json!({"name": name, "type": "MIGRATE_BLOCK", "os_type": "LINUX", "source_server": {"id": id},
                        "target_server": {"disks": [{"name": src.path(), "size": 96 << 20}]}, "migration_ip": "127.0.0.1"})),
        );
        assert_eq!(st, 200, "{task}");
        let tid = task["id"].as_str().unwrap().to_string();
        emu.save_target_certs(
            &tid,
            &kit.p(&format!("c/{name}-ca.pem")),
            &kit.p(&format!("c/{name}-cert.pem")),
            &kit.p(&format!("c/{name}-key.pem")),
        );
        let (st, _) = emu.operator(
            "POST",
            &format!("/v3/tasks/{tid}/speed-limit"),
            Some(json!({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 300}]})),
        );
        assert_eq!(st, 200);
        let _ = dst;
        tid
    };
    let receiver = |name: &str, dst: &Path| -> Guard {
        let c = Command::new(sms_agent())
            .args(["receive", "--listen", &format!("127.0.0.1:{PORT}")])
            .args(["--ca", &kit.p(&format!("c/{name}-ca.pem"))])
            .args(["--cert", &kit.p(&format!("c/{name}-cert.pem"))])
            .args(["--key", &kit.p(&format!("c/{name}-key.pem"))])
            .args(["--state-dir", &kit.p("state")])
            // The target ECS disk the emulator names the task's only disk (`relation_name`).
            .arg("--disk")
            .arg(format!("/dev/vda={}", dst.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Guard(c)
    };
    let state_of = |tid: &str| -> String {
        let (_, t) = emu.operator("GET", &format!("/v3/tasks/{tid}"), None);
        t["state"].as_str().unwrap_or("").to_string()
    };
    let change = |round: u32| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&src.dev)
            .unwrap();
        f.write_all_at(
            &noise(2 << 20, 900 + u64::from(round)),
            u64::from(round) * (5 << 20),
        )
        .unwrap();
        f.sync_all().unwrap();
    };

    let mut f = Figures::default();
    let dst = PathBuf::from(kit.p("dst.img"));
    std::fs::File::create(&dst)
        .unwrap()
        .set_len(96 << 20)
        .unwrap();
    let tid = task("t", &dst);
    let before = lo_bytes();
    let mut rx = receiver("t", &dst);
    // Round 0 is the copy (START), round 1 a sync (SYNC).
    for (round, op, want) in [
        (0u32, "start", "MIGRATE_SUCCESS"),
        (1, "start", "SYNC_SUCCESS"), // start of a copied task: SYNC (ref. §5.4.7)
    ] {
        if round > 0 {
            change(round);
        }
        emu.operator(
            "POST",
            &format!("/v3/tasks/{tid}/action"),
            Some(json!({"operation": op})),
        );
        let per_round = kills.div_ceil(2);
        let mut here = 0;
        let t0 = Instant::now();
        while state_of(&tid) != want {
            if t0.elapsed() > HANG * 2 {
                let (_, t) = emu.operator("GET", &format!("/v3/tasks/{tid}"), None);
                panic!(
                    "daemon round {round} hung: task {t}\nagent log:\n{}",
                    agent.log()
                );
            }
            if here < per_round && f.kills < kills {
                std::thread::sleep(Duration::from_millis(200 + rng.below(1500)));
                if state_of(&tid) == want {
                    break;
                }
                if rng.below(2) == 0 {
                    agent.kill9();
                    agent.restart();
                } else {
                    drop(rx);
                    rx = receiver("t", &dst);
                }
                here += 1;
                f.kills += 1;
                f.resumes += 1;
            } else {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        assert!(
            std::fs::read(&dst).unwrap() == std::fs::read(&src.dev).unwrap(),
            "daemon round {round}: the target differs from the source"
        );
        f.rounds += 1;
    }
    drop(rx);
    f.bytes = lo_bytes() - before;
    f.data = (64 << 20) + (2 << 20);

    // The same two rounds without kills: a new task onto a new target, from the same
    // content (round 1's change undone first, then applied again).
    let f0 = std::fs::OpenOptions::new()
        .write(true)
        .open(&src.dev)
        .unwrap();
    f0.write_all_at(&noise(64 << 20, 31), 0).unwrap();
    f0.sync_all().unwrap();
    let dst = PathBuf::from(kit.p("clean.img"));
    std::fs::File::create(&dst)
        .unwrap()
        .set_len(96 << 20)
        .unwrap();
    let tid = task("c", &dst);
    let before = lo_bytes();
    let rx = receiver("c", &dst);
    for (round, op, want) in [
        (0u32, "start", "MIGRATE_SUCCESS"),
        (1, "start", "SYNC_SUCCESS"), // start of a copied task: SYNC (ref. §5.4.7)
    ] {
        if round > 0 {
            change(round);
        }
        emu.operator(
            "POST",
            &format!("/v3/tasks/{tid}/action"),
            Some(json!({"operation": op})),
        );
        emu.wait_task(&tid, want, 120);
    }
    drop(rx);
    f.clean_bytes = lo_bytes() - before;
    drop(agent);
    f
}

#[test]
fn torture_kill_9_anywhere_then_resume() {
    if !inside_netns("torture_kill_9_anywhere_then_resume") {
        return;
    }
    let total = kills_total();
    let mut rng = rng();
    let (kb, kf) = (total * 2 / 5, total * 2 / 5);
    let kd = total - kb - kf;
    let only_daemon = std::env::var_os("SMS_TORTURE_ONLY_DAEMON").is_some();
    let b = if only_daemon {
        Figures::default()
    } else {
        block(kb, &mut rng)
    };
    b.print("block");
    let fl = if only_daemon {
        Figures::default()
    } else {
        file(kf, &mut rng)
    };
    fl.print("file");
    let d = if std::env::var_os("SMS_TORTURE_NO_DAEMON").is_some() {
        Figures::default()
    } else {
        daemon(kd, &mut rng)
    };
    d.print("daemon");
    let all = Figures {
        kills: b.kills + fl.kills + d.kills,
        resumes: b.resumes + fl.resumes + d.resumes,
        rounds: b.rounds + fl.rounds + d.rounds,
        data: b.data + fl.data + d.data,
        bytes: b.bytes + fl.bytes + d.bytes,
        clean_bytes: b.clean_bytes + fl.clean_bytes + d.clean_bytes,
    };
    all.print("all");
    for (m, x) in [("block", &b), ("file", &fl), ("daemon", &d), ("all", &all)] {
        assert!(
            x.ratio() <= 0.10,
            "{m}: re-sent {} bytes, {:.1} % of {} data bytes",
            x.resent(),
            x.ratio() * 100.0,
            x.data
        );
    }
}
