//! Changed-block tracking end to end: real `sms-agent migrate --continuous` and `receive`
//! processes, loop-device disks written at random through a mounted ext4 and raw while the
//! passes run, the tracker's ring buffer overflowed and the agent killed on purpose; after
//! the frozen final pass every target equals its source byte for byte.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module,
    clippy::cast_possible_truncation
)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use sms_tests::procs::{Kit, Receiver};
use sms_tests::{run, same_but_superblock, sms_agent, LoopDisk};

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn noise(n: usize, mut x: u64) -> Vec<u8> {
    (0..n).map(|_| xorshift(&mut x) as u8).collect()
}

/// A receiver that serves every pass (no `--once`).
fn receiver(kit: &Kit, disks: &[(&str, &Path)]) -> Receiver {
    let args: Vec<String> = disks
        .iter()
        .flat_map(|(n, p)| ["--disk".to_string(), format!("{n}={}", p.display())])
        .collect();
    Receiver::start(kit, &args)
}

fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

/// `migrate --continuous --freeze --json` of `disks`; stderr lines go to the returned channel.
fn continuous(
    kit: &Kit,
    addr: &str,
    disks: &[(&Path, &str)],
    env: &[(&str, &str)],
) -> (Child, mpsc::Receiver<String>) {
    let mut cmd = Command::new(sms_agent());
    cmd.args(["migrate", "--mode", "block", "--target", addr])
        .args(["--ca", &kit.p("c/ca.pem"), "--cert", &kit.p("c/source.pem")])
        .args(["--key", &kit.p("c/source-key.pem")])
        .args(["--state-dir", &kit.p("source-state")])
        .args([
            "--continuous",
            "--freeze",
            "--sync-interval",
            "0.5",
            "--json",
        ])
        .env("RUST_LOG", "info");
    for (s, n) in disks {
        cmd.arg("--disk").arg(format!("{}={n}", s.display()));
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    (child, rx)
}

/// Waits for a stderr line containing `what`; the lines read meanwhile.
fn wait_for(rx: &mpsc::Receiver<String>, what: &str, within: Duration) -> Vec<String> {
    let end = Instant::now() + within;
    let mut seen = Vec::new();
    while Instant::now() < end {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            let hit = l.contains(what);
            seen.push(l);
            if hit {
                return seen;
            }
        }
    }
    panic!(
        "no line with {what:?} within {within:?}: {}",
        seen.join("\n")
    );
}

/// Sends SIGTERM (the cutover) and returns the JSON summary's passes.
fn cutover(mut child: Child) -> Vec<serde_json::Value> {
    let pid = nix::unistd::Pid::from_raw(child.id().cast_signed());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "migrate failed: {out}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["verdict"], "complete", "{doc}");
    doc["passes"].as_array().unwrap().clone()
}

/// Random 4 KiB writes to `dev` at `offsets_within` (bytes), fsynced in batches, until stopped.
struct RandomWriter {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

impl RandomWriter {
    fn start(path: PathBuf, span: std::ops::Range<u64>, seed: u64, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            // A device is written O_DIRECT, as a database would: buffered writes to a block
            // device go out as whole page-cache folios, more than the test wrote.
            let direct = std::fs::metadata(&path)
                .unwrap()
                .file_type()
                .is_block_device();
            let f = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(if direct { nix::libc::O_DIRECT } else { 0 })
                .open(&path)
                .unwrap();
            let mut buf = vec![0u8; 8192];
            let skip = buf.as_ptr().align_offset(4096);
            let mut x = seed;
            let blocks = (span.end - span.start) / 4096;
            let mut n = 0;
            while !s.load(Ordering::Relaxed) {
                for _ in 0..16 {
                    let b = xorshift(&mut x) % blocks;
                    let block = &mut buf[skip..skip + 4096];
                    block.copy_from_slice(&noise(4096, xorshift(&mut x)));
                    f.write_all_at(block, span.start + b * 4096).unwrap();
                    n += 1;
                }
                f.sync_data().unwrap();
                std::thread::sleep(pause);
            }
            n
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

fn same(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

#[test]
fn continuous_sync_under_random_writes_ends_identical_after_the_frozen_pass() {
    let kit = Kit::new();
    // Disk 0: ext4 on the whole disk, written through a file; disk 1: raw, written directly.
    let mut fs = LoopDisk::new(128);
    run(
        "mkfs.ext4",
        // Every group's bitmaps written by mkfs: ext4 builds an uninitialised group's bitmap
        // in the device's page cache without ever writing it, so a copy read through that
        // cache could hold bytes the source's disk never will (harmless, but not `cmp`-equal).
        &[
            "-q",
            "-b",
            "4096",
            "-O",
            "^metadata_csum,^uninit_bg",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            fs.path(),
        ],
    );
    let fs_dev = fs.dev.clone();
    let m = fs.mount(&fs_dev, "m", None);
    let data = m.join("data");
    std::fs::write(&data, noise(24 << 20, 1)).unwrap();
    let raw = LoopDisk::new(64);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw.dev)
        .unwrap()
        .write_all_at(&noise(32 << 20, 2), 0)
        .unwrap();
    run("sync", &[]);
    let t0 = image(kit.dir.path(), "t0.img", 128 << 20);
    let t1 = image(kit.dir.path(), "t1.img", 64 << 20);
    let rx = receiver(&kit, &[("disk0", &t0), ("disk1", &t1)]);

    // Writes from before the copy starts to well into the continuous syncs.
    let w_fs = RandomWriter::start(data.clone(), 0..(24 << 20), 3, Duration::from_millis(20));
    let w_raw = RandomWriter::start(raw.dev.clone(), 0..(64 << 20), 4, Duration::from_millis(20));
    let (child, lines) = continuous(
        &kit,
        &rx.addr,
        &[(&fs_dev, "disk0"), (&raw.dev, "disk1")],
        &[],
    );
    wait_for(&lines, "continuous sync:", Duration::from_secs(120));
    // A few tracked passes while the writers run.
    for _ in 0..3 {
        wait_for(
            &lines,
            "this pass reads only the changed blocks",
            Duration::from_secs(60),
        );
    }
    let written = w_fs.stop() + w_raw.stop();
    assert!(written > 0);
    let passes = cutover(child);
    drop(rx);

    let last = passes.last().unwrap();
    assert!(last["freeze_seconds"].as_f64().is_some(), "{last}");
    assert_eq!(last["disks_tracked"], 2, "{last}");
    // Every sync after the copy read only what changed: together no more than the writers
    // wrote (overwrites of a block count once), plus the filesystem's journal.
    let tracked: Vec<_> = passes
        .iter()
        .filter(|p| p["kind"] == "sync" && p["disks_tracked"] == 2)
        .collect();
    assert!(tracked.len() >= 3, "{passes:?}");
    let read: u64 = tracked
        .iter()
        .map(|p| p["bytes_read"].as_u64().unwrap())
        .sum();
    assert!(
        read <= written * 4096 + (8 << 20),
        "tracked passes read {read} bytes for {written} blocks written: {passes:?}"
    );
    assert!(same(&raw.dev, &t1), "the raw disk's target differs");
    // The thaw rewrote the source's superblock (ext4 marks its journal in use again): every
    // other byte is the same, the target's filesystem is clean and holds the same file.
    assert!(
        same_but_superblock(&fs_dev, &t0),
        "the ext4 disk's target differs"
    );
    run("e2fsck", &["-fn", t0.to_str().unwrap()]);
    let tl = LoopDisk::attach(&t0);
    let tm = tempfile::tempdir().unwrap();
    run(
        "mount",
        &["-o", "ro,noload", tl.path(), tm.path().to_str().unwrap()],
    );
    let got = std::fs::read(tm.path().join("data")).unwrap();
    run("umount", &[tm.path().to_str().unwrap()]);
    assert!(
        got == std::fs::read(&data).unwrap(),
        "the file differs on the target"
    );
}

#[test]
fn an_overflowed_or_killed_tracker_falls_back_to_hash_sync_and_stays_exact() {
    let kit = Kit::new();
    let raw = LoopDisk::new(64);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw.dev)
        .unwrap()
        .write_all_at(&noise(48 << 20, 5), 0)
        .unwrap();
    let t = image(kit.dir.path(), "t.img", 64 << 20);

    // A one-page ring buffer polled every 2 s overflows under bursts of scattered writes.
    let rx = receiver(&kit, &[("disk0", &t)]);
    let (child, lines) = continuous(
        &kit,
        &rx.addr,
        &[(&raw.dev, "disk0")],
        &[
            ("SMS_AGENT_CBT_RING_KIB", "4"),
            ("SMS_AGENT_CBT_POLL_MS", "2000"),
        ],
    );
    wait_for(&lines, "continuous sync:", Duration::from_secs(120));
    let w = RandomWriter::start(
        raw.dev.clone(),
        (1 << 20)..(64 << 20),
        6,
        Duration::from_millis(1),
    );
    wait_for(&lines, "ring buffer overflowed", Duration::from_secs(60));
    wait_for(
        &lines,
        "this pass compares every used chunk",
        Duration::from_secs(60),
    );
    w.stop();
    let passes = cutover(child);
    assert!(passes
        .iter()
        .any(|p| p["kind"] == "sync" && p["disks_tracked"] == 0));
    assert!(same(&raw.dev, &t), "the target differs after an overflow");
    drop(rx);

    // kill -9 while writes go on: the next run cannot know what changed meanwhile and
    // compares everything first.
    let rx = receiver(&kit, &[("disk0", &t)]);
    let (mut child, lines) = continuous(&kit, &rx.addr, &[(&raw.dev, "disk0")], &[]);
    wait_for(&lines, "continuous sync:", Duration::from_secs(120));
    // Past the first 64 KiB, which identify a raw disk: the rerun is the same migration.
    let w = RandomWriter::start(
        raw.dev.clone(),
        (1 << 20)..(64 << 20),
        7,
        Duration::from_millis(5),
    );
    wait_for(
        &lines,
        "this pass reads only the changed blocks",
        Duration::from_secs(60),
    );
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    w.stop();
    let (child, lines) = continuous(&kit, &rx.addr, &[(&raw.dev, "disk0")], &[]);
    let seen = wait_for(&lines, "continuous sync:", Duration::from_secs(120));
    assert!(
        seen.iter()
            .any(|l| l.contains("no writes were recorded before the tracker started")),
        "{}",
        seen.join("\n")
    );
    let passes = cutover(child);
    assert_eq!(passes[0]["disks_tracked"], 0, "{passes:?}");
    assert!(
        same(&raw.dev, &t),
        "the target differs after a killed tracker"
    );
}
