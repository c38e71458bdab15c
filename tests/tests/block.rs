//! Block-level migration end to end: real `sms-agent receive` and `sms-agent migrate`
//! processes, real mutual TLS, real loop-device disks with real filesystems, processes killed
//! with SIGKILL midway.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss
)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sms_tests::procs::{Kit, Receiver};
use sms_tests::{make_vg, run, run_quiet, sms_agent, LoopDisk};

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

/// Runs migrate to completion; returns its stdout (the pass summaries).
fn migrate(kit: &Kit, addr: &str, disks: &[(&Path, &str)], extra: &[&str]) -> String {
    let out = migrate_cmd(kit, addr, disks, extra).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "migrate failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// "N data sent (W on the wire)" of the summary line starting with `label`.
fn sent(summary: &str, label: &str) -> (u64, u64) {
    let line = summary
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label} line in {summary}"));
    let num = |after: &str| -> u64 {
        let i = line.find(after).unwrap();
        line[..i]
            .trim_end()
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (num(" data sent"), num(" on the wire"))
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

fn write_files(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    std::fs::write(dir.join("random.bin"), noise(6 << 20, seed)).unwrap();
    std::fs::write(
        dir.join("sub/text.txt"),
        "all work and no play\n".repeat(100_000),
    )
    .unwrap();
    for i in 0..50 {
        std::fs::write(
            dir.join(format!("sub/deeper/f{i}")),
            noise(3000 + i * 97, seed + i as u64),
        )
        .unwrap();
    }
}

/// `sha256sum` of every file under `dir`, sorted: what the target must read back.
fn tree_digest(dir: &Path) -> String {
    run(
        "sh",
        &[
            "-c",
            &format!(
                "cd '{}' && find . -type f -print0 | sort -z | xargs -0 sha256sum",
                dir.display()
            ),
        ],
    )
}

fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

#[test]
fn a_gpt_disk_with_ext4_xfs_btrfs_swap_and_lvm_arrives_identical_and_syncs() {
    let kit = Kit::new();
    let mut disk = LoopDisk::new(1100);
    run(
        "sgdisk",
        &[
            "-o",
            "-n1:0:+200M",
            "-n2:0:+300M",
            "-n3:0:+150M",
            "-n4:0:+32M",
            "-n5:0:+120M",
            disk.path(),
        ],
    );
    disk.add_partitions(&[1, 2, 3, 4, 5]);
    let parts: Vec<String> = (1..=5)
        .map(|n| disk.part(n).to_str().unwrap().to_string())
        .collect();
    let p = |n: usize| parts[n - 1].clone();
    run("mkfs.ext4", &["-q", "-F", &p(1)]);
    run("mkfs.xfs", &["-q", "-f", &p(2)]);
    run("mkfs.btrfs", &["-q", "-f", &p(3)]);
    run("mkswap", &["-q", &p(4)]);
    let vg = sms_tests::unique("blkvg");
    make_vg(&vg, &[&disk.part(5)], &[("data", 40)]);
    disk.own_vg(&vg);
    // LV data: the LV cannot be activated here, so it is written at its extents on the PV.
    let pe_start: u64 = run(
        "lvm",
        &[
            "pvs",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "pe_start",
            &p(5),
        ],
    )
    .trim()
    .parse()
    .unwrap();
    let lv_data = noise(40 << 20, 77);
    std::fs::OpenOptions::new()
        .write(true)
        .open(disk.part(5))
        .unwrap()
        .write_all_at(&lv_data, pe_start)
        .unwrap();
    let ext = disk.mount(&disk.part(1), "ext", None);
    write_files(&ext, 1);
    let xfs = disk.mount(&disk.part(2), "xfs", None);
    write_files(&xfs, 2);
    run("umount", &[xfs.to_str().unwrap()]);
    let btr = disk.mount(&disk.part(3), "btr", None);
    write_files(&btr, 3);
    run("umount", &[btr.to_str().unwrap()]);
    run("sync", &[]);
    let digests: Vec<String> = ["ext"]
        .iter()
        .map(|m| tree_digest(&disk.dir.path().join(m)))
        .collect();
    let dst = image(kit.dir.path(), "dst.img", 1100 << 20);
    // ext4 stays mounted (GETFSMAP), read-only so that nothing (atime, lazy inode-table
    // init) writes to it mid-copy: a copy of a filesystem that is written meanwhile is not
    // crash-consistent without --freeze (freeze_makes_the_last_pass_consistent_…).
    run("mount", &["-o", "remount,ro", ext.to_str().unwrap()]);

    // XFS is read from its btrees, the rest in full.
    let rx = Receiver::disks(&kit, &[("disk0", &dst)]);
    let out = migrate(&kit, &rx.addr, &[(&disk.dev, "disk0")], &[]);
    assert!(rx.wait());
    let (plain, _) = sent(&out, "copy complete");
    assert!(plain < 700 << 20, "free space was sent: {out}");

    let t = LoopDisk::attach(&dst);
    t.add_partitions(&[1, 2, 3, 4, 5]);
    assert_eq!(
        t.edges_digest(),
        disk.edges_digest(),
        "partition tables differ"
    );
    let tp = |n| t.part(n).to_str().unwrap().to_string();
    // Every partition arrives as it is, byte for byte: their free blocks were never written
    // on this new disk, so they are zeros on both sides.
    for n in 1..=5u32 {
        run("cmp", &[&p(n as usize), &tp(n)]);
    }
    run("e2fsck", &["-fn", &tp(1)]);
    run("xfs_repair", &["-n", &tp(2)]);
    run("btrfs", &["check", "--readonly", &tp(3)]);
    assert_eq!(sms_tests::blkid(&t.part(4), "TYPE"), "swap");
    let mut got = vec![0u8; lv_data.len()];
    std::fs::File::open(t.part(5))
        .unwrap()
        .read_exact_at(&mut got, pe_start)
        .unwrap();
    assert!(got == lv_data, "LV extents differ");
    let mnt = tempfile::tempdir().unwrap();
    for (n, seed, fs) in [(1u32, 1u64, "ext"), (2, 2, "xfs"), (3, 3, "btr")] {
        run("mount", &["-o", "ro", &tp(n), mnt.path().to_str().unwrap()]);
        let got = tree_digest(mnt.path());
        run("umount", &[mnt.path().to_str().unwrap()]);
        let want = if fs == "ext" {
            digests[0].clone()
        } else {
            let d = tempfile::tempdir().unwrap();
            write_files(d.path(), seed);
            tree_digest(d.path())
        };
        assert_eq!(got, want, "{fs} files differ");
    }
    drop(t);

    // Change about 1 % of the ext4 data blocks in place; the sync sends about that much.
    run("mount", &["-o", "remount,rw", ext.to_str().unwrap()]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(ext.join("random.bin"))
        .unwrap();
    for i in 0..16u64 {
        f.write_all_at(&noise(4096, 1000 + i), i * 97 * 4096 % (6 << 20))
            .unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let changed = 16 * 4096u64;
    let rx = Receiver::disks(&kit, &[("disk0", &dst)]);
    let out = migrate(&kit, &rx.addr, &[(&disk.dev, "disk0")], &["--sync"]);
    assert!(rx.wait());
    let (_, wire) = sent(&out, "sync complete");
    // The filesystem's own metadata updates (inode times, journal) are real changes too.
    assert!(
        wire <= changed * 105 / 100 + (1 << 20),
        "sync sent {wire} for {changed}: {out}"
    );
    let t = LoopDisk::attach(&dst);
    t.add_partitions(&[1]);
    let mnt = tempfile::tempdir().unwrap();
    run(
        "mount",
        &[
            "-o",
            "ro,noload",
            t.part(1).to_str().unwrap(),
            mnt.path().to_str().unwrap(),
        ],
    );
    let got = tree_digest(mnt.path());
    run("umount", &[mnt.path().to_str().unwrap()]);
    assert_eq!(got, tree_digest(&ext), "ext4 files differ after sync");
}

/// Bytes sent so far on each TCP connection to `port`, by local address (`ss -tin`).
fn tcp_sent(port: &str, seen: &mut std::collections::HashMap<String, u64>) {
    let Ok(out) = Command::new("ss")
        .args(["-tinH", "state", "all", &format!("dport = :{port}")])
        .output()
    else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut local = String::new();
    for tok in text.split_whitespace() {
        if tok.starts_with("127.0.0.1:") && local.is_empty() {
            local = tok.to_string();
        } else if let Some(v) = tok.strip_prefix("bytes_sent:") {
            if let Ok(n) = v.parse::<u64>() {
                let e = seen.entry(std::mem::take(&mut local)).or_insert(0);
                *e = (*e).max(n);
            }
        } else if tok.starts_with("127.0.0.1:") {
            // The peer address of the same line.
        }
        if tok == "ESTAB"
            || tok.starts_with("CLOSE")
            || tok.starts_with("FIN")
            || tok == "LAST-ACK"
            || tok == "TIME-WAIT"
        {
            local.clear();
        }
    }
}

/// Runs migrate, killing `victim` after `kill_after` (when given); returns (bytes written by
/// migrate, success).
fn migrate_run(
    kit: &Kit,
    rx: &mut Receiver,
    src: &Path,
    kill: Option<(bool, Duration)>,
) -> (u64, bool) {
    let mut child = migrate_cmd(
        kit,
        &rx.addr,
        &[(src, "disk0")],
        &["--limit-mbit", "200", "--checkpoint-secs", "0.2"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let start = Instant::now();
    let port = rx.addr.rsplit(':').next().unwrap().to_string();
    let mut seen = std::collections::HashMap::new();
    let mut last = 0;
    loop {
        tcp_sent(&port, &mut seen);
        last = seen.values().sum::<u64>().max(last);
        if let Some(st) = child.try_wait().unwrap() {
            eprintln!("migrate ended after {:?}: {st}", start.elapsed());
            return (last, st.success());
        }
        if let Some((sender, after)) = kill {
            if start.elapsed() >= after {
                if sender {
                    child.kill().unwrap();
                } else {
                    rx.child.kill().unwrap();
                }
                let st = child.wait().unwrap();
                let _ = rx.child.kill();
                let _ = rx.child.wait();
                return (last, st.success());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kill_9_of_either_side_resumes_without_a_wrong_byte_or_much_resending() {
    let kit = Kit::new();
    let src = image(kit.dir.path(), "src.img", 256 << 20);
    {
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        for i in 0..12u64 {
            f.write_all_at(&noise(12 << 20, i + 5), i * (20 << 20))
                .unwrap();
        }
    }
    let want = std::fs::read(&src).unwrap();
    // A clean run as the yardstick.
    let clean_dst = image(kit.dir.path(), "clean.img", 256 << 20);
    let mut rx = Receiver::disks(&kit, &[("disk0", &clean_dst)]);
    let (clean, ok) = migrate_run(&kit, &mut rx, &src, None);
    assert!(ok);
    let _ = std::fs::remove_dir_all(kit.p("state"));
    let _ = std::fs::remove_dir_all(kit.p("source-state"));
    let mut seed = 0x5eed_u64;
    for (round, sender) in [(0, true), (1, false), (2, true), (3, false)] {
        let dst = image(kit.dir.path(), &format!("dst{round}.img"), 256 << 20);
        let mut total = 0;
        let mut rx = Receiver::disks(&kit, &[("disk0", &dst)]);
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        // Somewhere between 20 % and 80 % of a run of about 6 s.
        let after = Duration::from_millis(1200 + seed % 3600);
        let (w, ok) = migrate_run(&kit, &mut rx, &src, Some((sender, after)));
        assert!(!ok, "the killed run must not succeed");
        total += w;
        let mut rx = Receiver::disks(&kit, &[("disk0", &dst)]);
        let (w, ok) = migrate_run(&kit, &mut rx, &src, None);
        assert!(ok, "the resumed run failed");
        total += w;
        let got = std::fs::read(&dst).unwrap();
        assert!(
            got == want,
            "round {round}: the target differs from the source"
        );
        let ratio = total as f64 / clean as f64;
        eprintln!(
            "round {round} (kill {}): {ratio:.3} of a clean run",
            if sender { "sender" } else { "receiver" }
        );
        assert!(
            ratio < 1.1,
            "round {round}: {total} bytes against {clean} clean ({ratio:.3})"
        );
        // Each round is a new migration onto a new target: forget both sides' records.
        let _ = std::fs::remove_dir_all(kit.p("state"));
        let _ = std::fs::remove_dir_all(kit.p("source-state"));
    }
}

/// Writes `n` bytes of noise from `seed` over the start of `dev` and flushes them.
fn overwrite(dev: &Path, n: usize, seed: u64) -> Vec<u8> {
    let data = noise(n, seed);
    let f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.write_all_at(&data, 0).unwrap();
    f.sync_all().unwrap();
    data
}

#[test]
fn a_second_migration_onto_a_recreated_target_copies_everything_again() {
    // The README's commands, twice: a loop disk of random data copied to a fresh image;
    // then new random data over the whole disk and the image deleted and created again
    // (its inode number is likely reused). The second run must copy, not "resume".
    let kit = Kit::new();
    let disk = LoopDisk::new(64);
    let first = overwrite(&disk.dev, 64 << 20, 1);
    let dst = image(kit.dir.path(), "t.img", 64 << 20);
    let rx = Receiver::disks(&kit, &[("disk0", &dst)]);
    migrate(&kit, &rx.addr, &[(&disk.dev, "disk0")], &[]);
    assert!(rx.wait());
    assert!(std::fs::read(&dst).unwrap() == first, "first copy differs");

    let second = overwrite(&disk.dev, 64 << 20, 2);
    std::fs::remove_file(&dst).unwrap();
    let dst = image(kit.dir.path(), "t.img", 64 << 20);
    let rx = Receiver::disks(&kit, &[("disk0", &dst)]);
    let out = migrate(&kit, &rx.addr, &[(&disk.dev, "disk0")], &[]);
    assert!(rx.wait());
    assert!(out.contains("(0 resumed"), "{out}");
    let (plain, _) = sent(&out, "copy complete");
    assert!(plain >= 64 << 20, "{out}");
    assert!(
        std::fs::read(&dst).unwrap() == second,
        "second copy differs: {out}"
    );

    // The same migration again, source changed in one place only: the target holds a
    // complete copy, so the run verifies it and sends about what changed.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk.dev)
        .unwrap();
    f.write_all_at(&noise(8192, 3), 30 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let want = std::fs::read(&disk.dev).unwrap();
    let rx = Receiver::disks(&kit, &[("disk0", &dst)]);
    let out = migrate(&kit, &rx.addr, &[(&disk.dev, "disk0")], &[]);
    assert!(rx.wait());
    let (plain, _) = sent(&out, "sync complete");
    assert!(plain <= 8192, "{out}");
    assert!(
        std::fs::read(&dst).unwrap() == want,
        "verified copy differs"
    );
}

#[test]
fn a_repeated_or_interrupted_sync_sends_only_what_changed() {
    let kit = Kit::new();
    let src = image(kit.dir.path(), "src.img", 96 << 20);
    {
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&noise(80 << 20, 21), 0).unwrap();
    }
    let dst = image(kit.dir.path(), "dst.img", 96 << 20);
    let rx = Receiver::disks(&kit, &[("disk0", &dst)]);
    migrate(&kit, &rx.addr, &[(&src, "disk0")], &["--sync"]);
    assert!(rx.wait());
    // About 10 MiB change; a second --sync sends that, not the whole used disk.
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&noise(10 << 20, 22), 40 << 20).unwrap();
    drop(f);
    let rx = Receiver::disks(&kit, &[("disk0", &dst)]);
    let out = migrate(&kit, &rx.addr, &[(&src, "disk0")], &["--sync"]);
    assert!(rx.wait());
    let (plain, _) = sent(&out, "sync complete");
    assert!(plain <= 10 << 20, "{out}");
    assert!(!out.contains("copy complete"), "{out}");
    assert!(std::fs::read(&dst).unwrap() == std::fs::read(&src).unwrap());

    // A third --sync killed once it has saved a checkpoint, then run again: the rerun
    // resumes that sync pass, and neither sends the whole disk.
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&noise(10 << 20, 23), 60 << 20).unwrap();
    drop(f);
    let mut rx = Receiver::disks(&kit, &[("disk0", &dst)]);
    let mut child = migrate_cmd(
        &kit,
        &rx.addr,
        &[(&src, "disk0")],
        &["--sync", "--limit-mbit", "40", "--checkpoint-secs", "0.2"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = rx.child.kill();
    let _ = rx.child.wait();
    let rx = Receiver::disks(&kit, &[("disk0", &dst)]);
    let out = migrate(&kit, &rx.addr, &[(&src, "disk0")], &["--sync"]);
    assert!(rx.wait());
    let (plain, _) = sent(&out, "sync complete");
    assert!(plain <= 10 << 20, "{out}");
    assert!(std::fs::read(&dst).unwrap() == std::fs::read(&src).unwrap());
}

#[test]
fn the_speed_limit_holds_within_five_percent() {
    let kit = Kit::new();
    let src = image(kit.dir.path(), "src.img", 512 << 20);
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&noise(200 << 20, 3), 0).unwrap();
    drop(f);
    let dst = image(kit.dir.path(), "dst.img", 512 << 20);
    let rx = Receiver::disks(&kit, &[("disk0", &dst)]);
    // 40 Mbit/s = 5 MB/s: 200 MiB of random data take about 42 s. The rate is read off the
    // TCP connections over 30 s of the steady state, so start-up and the final flush (which
    // a busy machine makes slow) are not in it.
    let mut child = migrate_cmd(&kit, &rx.addr, &[(&src, "disk0")], &["--limit-mbit", "40"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let port = rx.addr.rsplit(':').next().unwrap().to_string();
    let mut seen = std::collections::HashMap::new();
    let total = |seen: &mut std::collections::HashMap<String, u64>| {
        tcp_sent(&port, seen);
        seen.values().sum::<u64>()
    };
    let t0 = Instant::now();
    while total(&mut seen) < 4 << 20 {
        assert!(t0.elapsed() < Duration::from_secs(20), "no data flowed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (a, ta) = (total(&mut seen), Instant::now());
    std::thread::sleep(Duration::from_secs(30));
    let (b, tb) = (total(&mut seen), Instant::now());
    assert!(child.wait().unwrap().success());
    assert!(rx.wait());
    let secs = (tb - ta).as_secs_f64();
    let rate = (b - a) as f64 / secs;
    assert!(
        (4_750_000.0..=5_250_000.0).contains(&rate),
        "{rate} B/s over {secs:.1} s against a limit of 5,000,000"
    );
}

#[test]
fn bad_arguments_and_unreachable_targets_fail_clearly() {
    let kit = Kit::new();
    let src = image(kit.dir.path(), "src.img", 8 << 20);
    let out = migrate_cmd(&kit, "127.0.0.1:1", &[(&src, "disk0")], &[])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SMS.1807"));
    let out = Command::new(sms_agent())
        .args([
            "migrate",
            "--mode",
            "block",
            "--target",
            "x:1",
            "--ca",
            "/nonexistent",
        ])
        .args(["--cert", "/x", "--key", "/y", "--disk", "nonsense"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    run_quiet("true", &[]);
}

/// `(relation_name, name)` of the first disk of a task as `GET /v3/tasks/{id}` shows it: the
/// target ECS disk and the source disk (reference §5.4.5, example lines 1238-1239).
fn task_disk(emu: &sms_tests::procs::Emulator, task: &serde_json::Value) -> (String, String) {
    let tid = task["id"].as_str().unwrap();
    let (_, t) = emu.operator("GET", &format!("/v3/tasks/{tid}"), None);
    let d = &t["target_server"]["disks"][0];
    (
        d["relation_name"].as_str().unwrap_or_default().to_string(),
        d["name"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn the_daemon_runs_a_block_task_from_start_to_sync_with_progress() {
    use serde_json::json;
    use sms_tests::procs::{Agent, Emulator, AK, SK};
    let kit = Kit::new();
    let src = LoopDisk::new(128);
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&src.dev)
            .unwrap();
        f.write_all_at(&noise(20 << 20, 1), 0).unwrap();
        f.write_all_at(&"text ".repeat(1 << 20).into_bytes(), 64 << 20)
            .unwrap();
        f.sync_all().unwrap();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let emu = Emulator::start();
    let extra = format!(
        "[probe]\ndevices = [\"{}\"]\n[transfer]\nport = {port}\nstreams = 2\n",
        src.path()
    );
    let mut agent = Agent::start_with(
        &emu.url(),
        &format!("access_key = \"{AK}\"\nsecret_key = \"{SK}\"\n"),
        &extra,
        &[],
    );
    let id = emu.source_id(&agent);
    let (st, task) = emu.operator(
        "POST",
        "/v3/tasks",
        Some(json!({"name": "blk", "type": "MIGRATE_BLOCK", "os_type": "LINUX", "source_server": {"id": id},
                    "target_server": {"disks": [{"name": src.path(), "size": 128 << 20}]}, "migration_ip": "127.0.0.1"})),
    );
    assert_eq!(st, 200, "{task}");
    // Reference §5.4.5 (line 1239): the service names the target ECS disk in `relation_name`.
    assert_eq!(
        task_disk(&emu, &task),
        ("/dev/vda".to_string(), src.path().to_string())
    );
    let tid = task["id"].as_str().unwrap().to_string();
    emu.save_target_certs(
        &tid,
        &kit.p("c/tca.pem"),
        &kit.p("c/tcert.pem"),
        &kit.p("c/tkey.pem"),
    );
    let dst = image(kit.dir.path(), "dst.img", 128 << 20);
    let receiver = || {
        let mut cmd = Command::new(sms_agent());
        cmd.args([
            "receive",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--once",
        ])
        .args(["--ca", &kit.p("c/tca.pem"), "--cert", &kit.p("c/tcert.pem")])
        .args([
            "--key",
            &kit.p("c/tkey.pem"),
            "--state-dir",
            &kit.p("state"),
        ])
        // The receiver names the target ECS disk (`relation_name`), not the source one.
        .arg("--disk")
        .arg(format!("/dev/vda={}", dst.display()))
        .stderr(Stdio::null());
        cmd.spawn().unwrap()
    };
    // 24 Mbit/s: the 20 MiB of noise take about 7 s, long enough to kill the agent midway.
    let (st, _) = emu.operator(
        "POST",
        &format!("/v3/tasks/{tid}/speed-limit"),
        Some(json!({"speed_limit": [{"start": "00:00", "end": "23:59", "speed": 24}]})),
    );
    assert_eq!(st, 200);
    // START before the target listens: the pass fails (SMS.1807) and the daemon tries it
    // again a few seconds later, without the operator and without reporting ERROR.
    emu.operator(
        "POST",
        &format!("/v3/tasks/{tid}/action"),
        Some(json!({"operation": "start"})),
    );
    std::thread::sleep(Duration::from_millis(2500));
    let mut rx = receiver();
    // Once data flows, kill -9 the agent and start it again: it resumes the pass itself.
    let t0 = Instant::now();
    while !emu.journal().iter().any(|e| {
        e["method"] == "PUT"
            && e["path"].as_str().unwrap_or("").ends_with("/progress")
            && e["body"]["replicatesize"].as_u64() > Some(0)
    }) {
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.kill9();
    agent.restart();
    let t = emu.wait_task(&tid, "MIGRATE_SUCCESS", 120);
    let log = agent.log();
    assert!(
        log.contains("starting it again from its checkpoint"),
        "no retry: {log}"
    );
    assert!(
        log.contains("resuming the task from its checkpoint"),
        "no resume after the restart: {log}"
    );
    assert!(rx.wait().unwrap().success());
    let sub = &t["sub_tasks"][0];
    assert_eq!(sub["name"], "MIGRATE_LINUX_BLOCK", "{t}");
    assert_eq!(sub["progress"], 100);
    let want = std::fs::read(&src.dev).unwrap();
    assert!(
        std::fs::read(&dst).unwrap() == want,
        "target differs from source"
    );
    // Every progress report carries the fields of the API.
    let j = emu.journal();
    let reports: Vec<_> = j
        .iter()
        .filter(|e| e["method"] == "PUT" && e["path"].as_str().unwrap_or("").ends_with("/progress"))
        .collect();
    assert!(!reports.is_empty());
    for k in [
        "replicatesize",
        "totalsize",
        "migrate_speed",
        "compress_rate",
        "remain_time",
        "agent_cpu_usage",
        "total_mem_usage",
        "agent_time",
    ] {
        assert!(
            reports.iter().all(|r| !r["body"][k].is_null()),
            "{k} missing: {:?}",
            reports[0]
        );
    }
    let states: Vec<_> = j
        .iter()
        .filter(|e| e["path"].as_str().unwrap_or("").ends_with("/changestate"))
        .map(|e| e["body"]["copystate"].as_str().unwrap_or("").to_string())
        .collect();
    for s in ["INIT", "REPLICATE", "SYNCING"] {
        assert!(
            states.iter().any(|x| x == s),
            "{s} not reported: {states:?}"
        );
    }
    assert!(!states.iter().any(|x| x == "ERROR"), "{states:?}");

    // Change a little, SYNC: only that travels, and the target matches again.
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&src.dev)
            .unwrap();
        f.write_all_at(&noise(8192, 99), 3 << 20).unwrap();
        f.sync_all().unwrap();
    }
    let mut rx = receiver();
    std::thread::sleep(Duration::from_millis(300));
    emu.operator(
        "POST",
        &format!("/v3/tasks/{tid}/action"),
        // ref. §5.4.7 has no `sync` operation: `start` of a copied task is a SYNC.
        Some(json!({"operation": "start"})),
    );
    emu.wait_task(&tid, "SYNC_SUCCESS", 120);
    assert!(rx.wait().unwrap().success());
    assert!(
        std::fs::read(&dst).unwrap() == std::fs::read(&src.dev).unwrap(),
        "target differs after sync"
    );
    drop(agent);
}

/// Appends to a file on `dir` and fsyncs, over and over, recording when each write returned
/// (writes stall while the filesystem is frozen).
struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(dir: &Path) -> Self {
        use std::io::Write;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, d) = (stop.clone(), done.clone());
        let path = dir.join("log");
        let handle = std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap();
            let mut n = 0u64;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                writeln!(f, "line {n}").unwrap();
                f.sync_data().unwrap();
                d.lock().unwrap().push(Instant::now());
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self {
            stop,
            done,
            handle: Some(handle),
        }
    }

    /// Waits until a write returns after `t`; how long after `t` that was.
    fn resumed_after(&self, t: Instant, within: Duration) -> Option<Duration> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(w) = self.done.lock().unwrap().iter().find(|w| **w > t) {
                return Some(*w - t);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
    }
}

/// Spawns migrate and returns it with its stdout lines, once a line starting `frozen` shows.
#[allow(clippy::zombie_processes)] // the caller waits for it
fn migrate_until_frozen(
    kit: &Kit,
    addr: &str,
    dev: &Path,
    extra: &[&str],
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<String>,
    Instant,
) {
    use std::io::BufRead;
    let mut child = migrate_cmd(kit, addr, &[(dev, "disk0")], extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    loop {
        let l = rx.recv_timeout(Duration::from_secs(120)).unwrap();
        if l.starts_with("frozen") {
            return (child, rx, Instant::now());
        }
    }
}

#[test]
fn freeze_makes_the_last_pass_consistent_and_always_thaws() {
    let kit = Kit::new();
    let mut disk = LoopDisk::new(256);
    run("mkfs.ext4", &["-q", disk.path()]);
    let dev = disk.dev.clone();
    let m = disk.mount(&dev, "m", None);
    std::fs::write(m.join("data"), noise(40 << 20, 11)).unwrap();
    run("sync", &[]);
    let writer = Writer::start(&m);
    let dst = image(kit.dir.path(), "dst.img", 256 << 20);

    // A clean run: the frozen pass comes last and the target needs no journal recovery.
    let rx = Receiver::disks(&kit, &[("disk0", &dst)]);
    let out = migrate(&kit, &rx.addr, &[(&dev, "disk0")], &["--sync", "--freeze"]);
    assert!(rx.wait());
    assert!(
        out.contains(&format!("frozen for at most 30 s: {}", m.display())),
        "{out}"
    );
    assert!(out.contains("thawed after"), "{out}");
    run("e2fsck", &["-fn", dst.to_str().unwrap()]);
    let t = LoopDisk::attach(&dst);
    let tm = tempfile::tempdir().unwrap();
    run(
        "mount",
        &["-o", "ro", t.path(), tm.path().to_str().unwrap()],
    );
    let got_log = std::fs::read(tm.path().join("log")).unwrap();
    let got_data = std::fs::read(tm.path().join("data")).unwrap();
    run("umount", &[tm.path().to_str().unwrap()]);
    drop(t);
    assert!(got_data == noise(40 << 20, 11), "data differs");
    let src_log = std::fs::read(m.join("log")).unwrap();
    assert!(
        !got_log.is_empty() && src_log.starts_with(&got_log),
        "the target's log is not a prefix of the source's"
    );

    // The frozen pass outlives a 2 s window (the receiver is stopped): the guard thaws at
    // the deadline while migrate still waits, and migrate then fails saying so.
    let rx = Receiver::disks(&kit, &[("disk0", &dst)]);
    let pid = nix::unistd::Pid::from_raw(rx.child.id().cast_signed());
    let (child, _lines, frozen) = migrate_until_frozen(
        &kit,
        &rx.addr,
        &dev,
        &["--sync", "--freeze", "--freeze-secs", "2"],
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let gap = writer
        .resumed_after(frozen + Duration::from_millis(50), Duration::from_secs(20))
        .expect("writes never resumed");
    assert!(gap < Duration::from_secs(6), "thawed only after {gap:?}");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "an overrun window must fail migrate");
    drop(rx);

    // kill -9 of migrate while frozen: the guard thaws at once, not after 30 s.
    let rx = Receiver::disks(&kit, &[("disk0", &dst)]);
    let pid = nix::unistd::Pid::from_raw(rx.child.id().cast_signed());
    let (mut child, _lines, _) =
        migrate_until_frozen(&kit, &rx.addr, &dev, &["--sync", "--freeze"]);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    child.kill().unwrap();
    child.wait().unwrap();
    let gap = writer
        .resumed_after(killed, Duration::from_secs(40))
        .expect("writes never resumed");
    assert!(gap < Duration::from_secs(5), "thawed only after {gap:?}");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    drop(rx);

    // A filesystem someone else froze: migrate fails, and leaves it frozen (fsfreeze -f on a
    // frozen filesystem fails with EBUSY).
    let mp = m.to_str().unwrap();
    run("fsfreeze", &["--freeze", mp]);
    let rx = Receiver::disks(&kit, &[("disk0", &dst)]);
    let out = migrate_cmd(&kit, &rx.addr, &[(&dev, "disk0")], &["--sync", "--freeze"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot freeze"),
        "{err}"
    );
    let again = Command::new("fsfreeze")
        .args(["--freeze", mp])
        .output()
        .unwrap();
    run("fsfreeze", &["--unfreeze", mp]);
    assert!(
        !again.status.success(),
        "the guard thawed a freeze that was not its own"
    );
    drop(rx);
    writer.stop();
}

/// An image of `mib` MiB of incompressible data (no filesystem: every byte is used).
fn noise_image(dir: &Path, name: &str, mib: usize, seed: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, noise(mib << 20, seed)).unwrap();
    p
}

#[test]
fn stopping_either_side_past_the_peer_timeout_ends_cleanly_and_a_rerun_is_identical() {
    use nix::sys::signal::Signal;
    use sms_tests::procs::{signal, wait_bounded};
    let kit = Kit::new();
    let src = noise_image(kit.dir.path(), "src.img", 48, 5);
    for stop_receiver in [false, true] {
        let task = format!("stop-{stop_receiver}");
        let dst = image(kit.dir.path(), &format!("{task}.img"), 48 << 20);
        let arg = format!("disk0={}", dst.display());
        let rx = Receiver::start(
            &kit,
            &["--disk".into(), arg, "--peer-timeout".into(), "3".into()],
        );
        // 40 Mbit/s: the copy takes about 10 s, so the stop lands mid-pass.
        let tx = migrate_cmd(&kit, &rx.addr, &[(&src, "disk0")], &["--limit-mbit", "40"])
            .args(["--peer-timeout", "3", "--task-id", &task])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while std::fs::metadata(&dst).map_or(0, |m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        }) < 8 << 20
        {
            assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
            std::thread::sleep(Duration::from_millis(20));
        }
        let stopped = if stop_receiver { &rx.child } else { &tx };
        signal(stopped, Signal::SIGSTOP);
        std::thread::sleep(Duration::from_secs(7));
        signal(stopped, Signal::SIGCONT);
        let (st, err) = wait_bounded(tx, Duration::from_secs(60), "the interrupted migrate");
        eprintln!("stop receiver {stop_receiver}: {st}: {err}");
        assert!(
            st.success() || err.contains("SMS."),
            "the interrupted migrate failed without an SMS code: {err}"
        );
        if !st.success() && stop_receiver {
            assert!(
                err.contains("peer timeout"),
                "a stopped receiver is reported as silent: {err}"
            );
        }
        // The rerun resumes (into the same receiver, which gave the old session up).
        let again = migrate_cmd(&kit, &rx.addr, &[(&src, "disk0")], &[])
            .args(["--peer-timeout", "3", "--task-id", &task])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (st, err) = wait_bounded(again, Duration::from_secs(60), "the rerun");
        assert!(st.success(), "the rerun failed: {err}");
        run("cmp", &[src.to_str().unwrap(), dst.to_str().unwrap()]);
        drop(rx);
    }
}

#[test]
fn a_full_filesystem_under_the_target_image_fails_clearly_and_the_next_pass_resumes() {
    use sms_tests::procs::wait_bounded;
    sms_tests::require_root();
    let kit = Kit::new();
    let src = noise_image(kit.dir.path(), "src.img", 64, 9);
    // The filesystem is large enough for the image (a plan for an image larger than its
    // filesystem is refused before anything is written), but a filler leaves too little free
    // for the data: the pass runs into ENOSPC midway.
    let fs = sms_tests::Tmpfs::mount(&kit.dir.path().join("small"), 80);
    let filler = fs.dir.join("filler");
    std::fs::write(&filler, vec![1u8; 40 << 20]).unwrap();
    let dst = fs.dir.join("dst.img");
    let arg = format!("disk0={}", dst.display());
    let rx = Receiver::start(&kit, &["--disk".into(), arg]);
    let first = migrate_cmd(&kit, &rx.addr, &[(&src, "disk0")], &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (st, err) = wait_bounded(first, Duration::from_secs(60), "migrate onto a full disk");
    eprintln!("full disk: {st}: {err}");
    assert!(!st.success(), "a full target filesystem must fail the pass");
    assert!(err.contains("SMS.1504"), "no SMS.1504 in: {err}");
    assert!(err.contains(dst.to_str().unwrap()), "no path in: {err}");
    assert!(
        err.contains("no space left") && err.contains("bytes are free") && err.contains("more"),
        "no space figures in: {err}"
    );
    std::fs::remove_file(&filler).unwrap();
    let again = migrate_cmd(&kit, &rx.addr, &[(&src, "disk0")], &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (st, err) = wait_bounded(again, Duration::from_secs(60), "migrate after the grow");
    assert!(st.success(), "the resumed pass failed: {err}");
    run("cmp", &[src.to_str().unwrap(), dst.to_str().unwrap()]);
    drop(rx);
}

/// Item "disk mapping" of the SMS reference: a task made with the official Python SDK
/// (`huaweicloudsdksms`) maps source loop disks to the target ECS disks the service names
/// (`/dev/vda`, `/dev/vdb`; reference §5.4.5, `name` the source disk and `relation_name` the
/// target one, example lines 1238-1239); the agent reads the loop disks and the receiver,
/// which fetches its own TLS material for the task (`receive --task --config`), writes
/// `/dev/vda` and `/dev/vdb`. Both targets come out identical to their sources.
#[test]
fn an_sdk_block_task_maps_source_loop_disks_to_target_vda_and_vdb() {
    use serde_json::json;
    use sms_tests::procs::{Agent, Emulator, AK, SK};
    let kit = Kit::new();
    let (a, b) = (LoopDisk::new(16), LoopDisk::new(24));
    for (d, seed) in [(&a, 7), (&b, 8)] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&d.dev)
            .unwrap();
        f.write_all_at(&noise(6 << 20, seed), 1 << 20).unwrap();
        f.sync_all().unwrap();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let emu = Emulator::start();
    let extra = format!(
        "[probe]\ndevices = [\"{}\", \"{}\"]\n[transfer]\nport = {port}\nstreams = 2\n",
        a.path(),
        b.path()
    );
    let agent = Agent::start_with(
        &emu.url(),
        &format!("access_key = \"{AK}\"\nsecret_key = \"{SK}\"\n"),
        &extra,
        &[],
    );
    let id = emu.source_id(&agent);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/sdk_client.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([&emu.url(), AK, SK, "create-block-task", &id, "127.0.0.1"])
        .arg(format!("{}:{}", a.path(), 16 << 20))
        .arg(format!("{}:{}", b.path(), 24 << 20))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "the SDK client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let disks: Vec<&str> = stdout.lines().filter(|l| l.starts_with("disk ")).collect();
    assert_eq!(
        disks,
        [
            format!("disk {} /dev/vda", a.path()),
            format!("disk {} /dev/vdb", b.path())
        ],
        "{stdout}"
    );
    let tid = stdout
        .lines()
        .find_map(|l| l.strip_prefix("task "))
        .unwrap()
        .trim()
        .to_string();
    let (vda, vdb) = (
        image(kit.dir.path(), "vda.img", 16 << 20),
        image(kit.dir.path(), "vdb.img", 24 << 20),
    );
    // The receiver takes the target ECS disk names, and its TLS material from SMS.
    let log = kit.dir.path().join("receive.log");
    let mut rx = Command::new(sms_agent())
        .args([
            "receive",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--once",
        ])
        .args(["--task", &tid, "--config"])
        .arg(agent.dir.path().join("agent.toml"))
        .args(["--state-dir", &kit.p("state")])
        .arg("--disk")
        .arg(format!("/dev/vda={}", vda.display()))
        .arg("--disk")
        .arg(format!("/dev/vdb={}", vdb.display()))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("listening on")
    {
        assert!(
            rx.try_wait().unwrap().is_none(),
            "the receiver ended: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "receiver not listening"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (st, _) = emu.operator(
        "POST",
        &format!("/v3/tasks/{tid}/action"),
        Some(json!({"operation": "start"})),
    );
    assert_eq!(st, 200);
    emu.wait_task(&tid, "MIGRATE_SUCCESS", 120);
    assert!(rx.wait().unwrap().success());
    for (src, dst) in [(&a, &vda), (&b, &vdb)] {
        let st = Command::new("cmp").arg(&src.dev).arg(dst).status().unwrap();
        assert!(
            st.success(),
            "{} differs from {}",
            dst.display(),
            src.path()
        );
    }
    // Nothing secret in the receiver's log.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    drop(agent);
}
