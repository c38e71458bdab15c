//! No peer can stop a receiver: a flood of plain TCP connections against a real
//! `sms-agent receive` held to a low task limit, and hostile plans, leave it serving.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

use std::net::TcpStream;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sms_tests::procs::{Kit, Receiver};
use sms_tests::{require_root, run, sms_agent};
use transfer::session::Connector;
use transfer::wire::{Message, Mode};

/// The prefix that runs a command as `uid` held to `nproc` tasks (RLIMIT_NPROC, which root
/// ignores), or `None` when this machine does not enforce it that way.
fn limited(uid: u32, nproc: u32) -> Vec<String> {
    vec![
        "prlimit".into(),
        format!("--nproc={nproc}"),
        "--".into(),
        "setpriv".into(),
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".into(),
        "--inh-caps=-all".into(),
    ]
}

/// A uid no process runs as, so that RLIMIT_NPROC counts the receiver's tasks alone.
fn idle_uid() -> Option<u32> {
    let busy: Vec<u32> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.metadata().ok().map(|m| m.uid()))
        .collect();
    (47_000..48_000)
        .map(|u| u + std::process::id() % 1000)
        .find(|u| !busy.contains(u))
}

/// Whether the task limit holds for `uid` here: a shell held to one task cannot fork.
fn limit_enforced(uid: u32) -> bool {
    let mut c = limited(uid, 1);
    c.extend(["/bin/sh".into(), "-c".into(), "/bin/true".into()]);
    let Ok(out) = Command::new(&c[0]).args(&c[1..]).output() else {
        return false;
    };
    let mut ok = limited(uid, 100);
    ok.extend(["/bin/sh".into(), "-c".into(), "/bin/true".into()]);
    let runs = Command::new(&ok[0])
        .args(&ok[1..])
        .status()
        .is_ok_and(|s| s.success());
    runs && !out.status.success()
}

fn noise(n: usize, mut x: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

fn connector(kit: &Kit, addr: &str) -> Connector {
    let r = |n: &str| std::fs::read_to_string(kit.p(n)).unwrap();
    let id = transfer::tls::Identity::from_pem(&r("c/source.pem"), &r("c/source-key.pem"), None)
        .unwrap();
    Connector {
        addr: addr.to_string(),
        tls: transfer::tls::client_config(id, &r("c/ca.pem")).unwrap(),
        timeout: Duration::from_secs(5),
    }
}

/// Tasks (threads) of process `pid`.
fn tasks(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count)
}

fn alive(rx: &mut Receiver) -> bool {
    rx.child.try_wait().unwrap().is_none()
}

#[test]
fn a_connection_flood_under_a_low_task_limit_leaves_the_receiver_serving() {
    require_root();
    let Some(uid) = idle_uid().filter(|&u| limit_enforced(u)) else {
        eprintln!(
            "SKIPPED a_connection_flood_under_a_low_task_limit_leaves_the_receiver_serving: \
             RLIMIT_NPROC is not enforced for an unprivileged uid through prlimit and setpriv here"
        );
        return;
    };
    // 150 as under a systemd TasksMax; 40 is below the handshake cap, so starting
    // connection threads fails too.
    for nproc in [150u32, 40] {
        let kit = Kit::new();
        let size = 16u64 << 20;
        let src = kit.dir.path().join("src.img");
        std::fs::write(
            &src,
            noise(usize::try_from(size).unwrap(), u64::from(nproc)),
        )
        .unwrap();
        let dst = kit.dir.path().join("dst.img");
        std::fs::File::create(&dst).unwrap().set_len(size).unwrap();
        let missing = kit.dir.path().join("big.img");
        std::fs::create_dir_all(kit.dir.path().join("state")).unwrap();
        run(
            "chown",
            &[
                "-R",
                &format!("{uid}:{uid}"),
                kit.dir.path().to_str().unwrap(),
            ],
        );
        let args: Vec<String> = [
            "--disk".to_string(),
            format!("disk0={}", dst.display()),
            "--disk".into(),
            format!("big={}", missing.display()),
            "--once".into(),
        ]
        .into();
        let mut rx = Receiver::start_wrapped(&kit, &limited(uid, nproc), &args);
        let pid = rx.child.id();
        assert_eq!(
            std::fs::metadata(format!("/proc/{pid}")).unwrap().uid(),
            uid,
            "the receiver does not run as {uid}"
        );

        // What an idle receiver runs (main, accept loop, handshake watchdog, signal handling):
        // counted, not assumed, so that a new helper thread does not break the bound below.
        // One connection first: the handshake watchdog starts with the first one.
        drop(TcpStream::connect(&rx.addr));
        std::thread::sleep(Duration::from_millis(500));
        let idle = tasks(pid);
        // Plain TCP, no certificate: each would have had a thread of its own.
        let flood: Vec<TcpStream> = (0..300)
            .filter_map(|_| TcpStream::connect(&rx.addr).ok())
            .collect();
        assert!(flood.len() > 250, "only {} connections opened", flood.len());
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            alive(&mut rx),
            "nproc {nproc}: the receiver died under the flood"
        );
        let held = tasks(pid);
        assert!(
            held <= idle + transfer::session::MAX_HANDSHAKES,
            "nproc {nproc}: {held} tasks for connections in their handshake"
        );
        drop(flood);
        // The connections' threads see their peers gone and end.
        let t0 = Instant::now();
        while tasks(pid) > idle {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "nproc {nproc}: {} tasks left after the flood",
                tasks(pid)
            );
            std::thread::sleep(Duration::from_millis(50));
        }

        // A plan of 2^63-1 bytes onto an image that does not exist yet.
        let c = connector(&kit, &rx.addr);
        let (mut ctl, _) = c.open("evil", Mode::Block, 0, 1, 0).unwrap();
        ctl.send(&Message::DiskPlan {
            pass: 0,
            sync: false,
            more: false,
            chunk_size: 1 << 20,
            disks: vec![("big".into(), i64::MAX.unsigned_abs())],
        })
        .unwrap();
        ctl.flush().unwrap();
        match ctl.recv().unwrap() {
            Message::Error { code, message } => assert_eq!(code, "SMS.1504", "{message}"),
            other => panic!("the plan was accepted: {other:?}"),
        }
        drop(ctl);
        assert!(!missing.exists(), "an image was created for a refused plan");
        assert!(alive(&mut rx), "nproc {nproc}: the receiver died of a plan");

        // An honest migration still goes through.
        let out = Command::new(sms_agent())
            .args(["migrate", "--mode", "block", "--target", &rx.addr])
            .args(["--ca", &kit.p("c/ca.pem"), "--cert", &kit.p("c/source.pem")])
            .args(["--key", &kit.p("c/source-key.pem")])
            .arg("--disk")
            .arg(format!("{}=disk0", src.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nproc {nproc}: migrate failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(rx.wait(), "nproc {nproc}: the receiver failed");
        assert!(same(&src, &dst), "nproc {nproc}: the copy differs");
    }
}

fn same(a: &Path, b: &Path) -> bool {
    let (fa, fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let len = fa.metadata().unwrap().len();
    let mut at = 0;
    while at < len {
        fa.read_exact_at(&mut x, at).unwrap();
        fb.read_exact_at(&mut y, at).unwrap();
        if x != y {
            return false;
        }
        at += 1 << 20;
    }
    fb.metadata().unwrap().len() == len
}
