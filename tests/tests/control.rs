//! The daemon obeys the task fields and settings of the SMS reference: continuous sync
//! (`syncing`, ref. §5.4.1 line 9686), `priority` (§5.4.5 line 11252), the task's own
//! `speed_limit` (§5.4.5 line 11253, Mbit/s per §5.4.6 line 11823) and `LINUX_CPU_LIMIT`
//! (§5.10.1, example line 23196). Real daemon, real receiver, loop-device disks.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss
)]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sms_tests::procs::{Agent, Emulator, Kit, AK, SK};
use sms_tests::{require_root, same_but_superblock, size_of, sms_agent, LoopDisk};

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A loop disk of `mib` MiB holding `noise_mib` MiB of noise at its start.
fn source(mib: u64, noise_mib: usize) -> LoopDisk {
    let src = LoopDisk::new(mib);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&src.dev)
        .unwrap();
    f.write_all_at(&noise(noise_mib << 20, 7), 0).unwrap();
    f.sync_all().unwrap();
    src
}

/// An agent reporting `src`, sending to `port`, with `agent_extra` in `[agent]`.
fn agent(emu: &Emulator, src: &LoopDisk, port: u16, agent_extra: &str) -> Agent {
    let extra = format!(
        "{agent_extra}[probe]\ndevices = [\"{}\"]\n[transfer]\nport = {port}\nstreams = 2\n",
        src.path()
    );
    Agent::start_with(
        &emu.url(),
        &format!("access_key = \"{AK}\"\nsecret_key = \"{SK}\"\n"),
        &extra,
        &[],
    )
}

/// Creates a block task of `src` with the extra fields of `more`; returns its id.
fn task(emu: &Emulator, source_id: &str, src: &LoopDisk, more: &Value) -> String {
    let mut body = json!({"name": "blk", "type": "MIGRATE_BLOCK", "os_type": "LINUX",
        "source_server": {"id": source_id},
        "target_server": {"disks": [{"name": src.path(), "size": size_of(&src.dev)}]},
        "migration_ip": "127.0.0.1"});
    for (k, v) in more.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (st, t) = emu.operator("POST", "/v3/tasks", Some(body));
    assert_eq!(st, 200, "{t}");
    t["id"].as_str().unwrap().to_string()
}

/// A receiver of task `tid` on `port` writing `src` to `dst`; `once`: one session only.
fn receiver(kit: &Kit, emu: &Emulator, tid: &str, port: u16, dst: &Path) -> Child {
    let (ca, cert, key) = (
        kit.p(&format!("{tid}-ca.pem")),
        kit.p(&format!("{tid}-cert.pem")),
        kit.p(&format!("{tid}-key.pem")),
    );
    emu.save_target_certs(tid, &ca, &cert, &key);
    let child = Command::new(sms_agent())
        .args(["receive", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--ca", &ca, "--cert", &cert, "--key", &key])
        .args(["--state-dir", &kit.p("state")])
        // The target ECS disk the emulator names the task's only disk (`relation_name`,
        // ref. §5.4.5 table 5-148).
        .arg("--disk")
        .arg(format!("/dev/vda={}", dst.display()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    child
}

fn action(emu: &Emulator, tid: &str, op: &str) {
    let (st, r) = emu.operator(
        "POST",
        &format!("/v3/tasks/{tid}/action"),
        Some(json!({ "operation": op })),
    );
    assert_eq!(st, 200, "{r}");
}

/// The progress reports of the journal.
fn reports(emu: &Emulator) -> Vec<Value> {
    emu.journal()
        .into_iter()
        .filter(|e| e["method"] == "PUT" && e["path"].as_str().unwrap_or("").ends_with("/progress"))
        .map(|e| e["body"].clone())
        .collect()
}

/// Completed sync passes reported so far.
fn syncs_done(emu: &Emulator) -> usize {
    reports(emu)
        .iter()
        .filter(|b| b["subtask_name"] == "SYNC_LINUX_BLOCK" && b["progress"] == 100)
        .count()
}

/// (nice, tid) of every thread of `pid`.
fn thread_nices(pid: u64) -> Vec<(i64, String)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            let after = &stat[stat.rfind(')')? + 2..];
            let nice = after.split(' ').nth(16)?.parse().ok()?;
            Some((nice, t.file_name().to_string_lossy().into_owned()))
        })
        .collect()
}

/// CPU time (user + system) of `pid` so far, from `/proc/PID/stat` (clock ticks of 10 ms).
fn cpu_secs(pid: u64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

#[test]
fn a_syncing_task_syncs_by_itself_at_its_priority_and_speed_until_stop() {
    require_root();
    let kit = Kit::new();
    let src = source(32, 6);
    let dst = kit.dir.path().join("dst.img");
    std::fs::File::create(&dst)
        .unwrap()
        .set_len(size_of(&src.dev))
        .unwrap();
    let port = free_port();
    let emu = Emulator::start();
    let mut agent = agent(&emu, &src, port, "sync_interval = \"1s\"\n");
    let id = emu.source_id(&agent);
    // 16 Mbit/s: the 6 MiB of noise take about 3 s.
    let tid = task(
        &emu,
        &id,
        &src,
        &json!({"syncing": true, "priority": 0, "speed_limit": 16}),
    );
    let mut rx = receiver(&kit, &emu, &tid, port, &dst);
    action(&emu, &tid, "start");

    // While the copy runs, the transfer threads run at nice 19 (priority 0: low).
    let pid = agent.status()["pid"].as_u64().unwrap();
    let t0 = Instant::now();
    let mut low = false;
    while !low
        && emu.operator("GET", &format!("/v3/tasks/{tid}"), None).1["state"] != "MIGRATE_SUCCESS"
    {
        low = thread_nices(pid).iter().any(|(n, _)| *n == 19);
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        low,
        "no transfer thread at nice 19: {:?}",
        thread_nices(pid)
    );
    // The daemon's own threads keep their priority.
    assert!(thread_nices(pid).iter().any(|(n, _)| *n == 0));
    emu.wait_task(&tid, "MIGRATE_SUCCESS", 120);

    // A change after the copy arrives by the passes the daemon starts by itself.
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&src.dev)
            .unwrap();
        f.write_all_at(&noise(64 << 10, 99), 20 << 20).unwrap();
        f.sync_all().unwrap();
    }
    let t0 = Instant::now();
    while syncs_done(&emu) < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "fewer than two sync passes by themselves: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Started by the daemon itself: the test sent no SYNC, and the log says so.
    assert!(
        agent.log().matches("continuous sync: next pass").count() >= 2,
        "{}",
        agent.log()
    );
    assert!(
        std::fs::read(&dst).unwrap() == std::fs::read(&src.dev).unwrap(),
        "target differs after the sync passes"
    );
    // The tracker made the later passes read only what changed, and status shows the lag.
    assert!(
        agent
            .log()
            .contains("changed-block tracking: this pass reads only the changed blocks"),
        "{}",
        agent.log()
    );
    assert!(
        agent
            .status()
            .as_object()
            .unwrap()
            .contains_key("replication_lag_secs"),
        "{}",
        agent.status()
    );
    // The task's speed_limit holds: no 5-second rate over 16 Mbit/s (5 % for the meter).
    let fast: Vec<f64> = reports(&emu)
        .iter()
        .filter_map(|b| b["migrate_speed"].as_f64())
        .filter(|s| *s > 16.0 * 1.05)
        .collect();
    assert!(
        fast.is_empty(),
        "rates over the task's speed_limit: {fast:?}"
    );

    // STOP ends the passes: none starts after it.
    action(&emu, &tid, "stop");
    let t0 = Instant::now();
    while !agent.log().contains("\"stopped\"")
        && !emu.journal().iter().any(|e| {
            e["path"].as_str().unwrap_or("").ends_with("/changestate")
                && e["body"]["copystate"] == "STOPPED"
        })
    {
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", agent.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    let passes = agent.log().matches("continuous sync: next pass").count();
    let reports_then = reports(&emu).len();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        agent.log().matches("continuous sync: next pass").count(),
        passes,
        "a sync pass started after STOP: {}",
        agent.log()
    );
    assert_eq!(reports(&emu).len(), reports_then, "progress after STOP");
    assert!(passes >= 2, "{}", agent.log());
    let _ = rx.kill();
    let _ = rx.wait();
    agent.kill9();
}

/// Copies `src` once as a new task with `configurations` and returns (seconds the agent
/// was busy, its CPU seconds in them): CPU is sampled every 100 ms and the busy span runs
/// from the first to the last sample that used more than 10 % of a CPU.
fn timed_copy(
    kit: &Kit,
    emu: &Emulator,
    agent: &Agent,
    src: &LoopDisk,
    port: u16,
    name: &str,
    configurations: Value,
) -> (f64, f64) {
    let id = emu.source_id(agent);
    let tid = task(emu, &id, src, &json!({ "configurations": configurations }));
    let dst = kit.dir.path().join(name);
    std::fs::File::create(&dst)
        .unwrap()
        .set_len(size_of(&src.dev))
        .unwrap();
    let mut rx = receiver(kit, emu, &tid, port, &dst);
    let pid = agent.status()["pid"].as_u64().unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = std::sync::Arc::clone(&done);
    let sampler = std::thread::spawn(move || {
        let mut v = Vec::new();
        while !d.load(std::sync::atomic::Ordering::Relaxed) {
            v.push((Instant::now(), cpu_secs(pid)));
            std::thread::sleep(Duration::from_millis(100));
        }
        v
    });
    action(emu, &tid, "start");
    emu.wait_task(&tid, "MIGRATE_SUCCESS", 300);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    let _ = rx.kill();
    let _ = rx.wait();
    std::fs::remove_file(&dst).unwrap();
    let busy: Vec<usize> = (1..samples.len())
        .filter(|&i| {
            let dt = samples[i].0.duration_since(samples[i - 1].0).as_secs_f64();
            samples[i].1 - samples[i - 1].1 > 0.1 * dt
        })
        .collect();
    let (first, last) = (busy[0] - 1, *busy.last().unwrap());
    (
        samples[last]
            .0
            .duration_since(samples[first].0)
            .as_secs_f64(),
        samples[last].1 - samples[first].1,
    )
}

#[test]
fn linux_cpu_limit_holds_the_agent_to_its_share_of_a_cpu() {
    require_root();
    let kit = Kit::new();
    let src = source(384, 384);
    let port = free_port();
    let emu = Emulator::start();
    let agent = agent(&emu, &src, port, "");
    let (w0, c0) = timed_copy(&kit, &emu, &agent, &src, port, "free.img", json!([]));
    // The reference's own example (§5.10.1 line 23196): 50.
    let (w1, c1) = timed_copy(
        &kit,
        &emu,
        &agent,
        &src,
        port,
        "limited.img",
        json!([{"config_key": "LINUX_CPU_LIMIT", "config_value": 50}]),
    );
    let (free, limited) = (c0 / w0 * 100.0, c1 / w1 * 100.0);
    eprintln!(
        "LINUX_CPU_LIMIT: unlimited {free:.0} % of a CPU over {w0:.1} s; limit 50: {limited:.0} % over {w1:.1} s"
    );
    // The daemon's start-up and the pacer's first windows count too: 10 points of slack.
    assert!(
        limited <= 60.0,
        "agent used {limited:.0} % of a CPU under a limit of 50 %"
    );
    // Only when the free copy used more than the limit (a busy machine may not let it) must
    // the limited one take longer.
    if free > 60.0 {
        assert!(
            w1 > w0,
            "the limited copy ({w1:.1} s) was not slower than the free one ({w0:.1} s)"
        );
    }
}

/// Whether a write and fsync of a new file under `dir` complete within `within` (they
/// block while the filesystem is frozen). The thread is left to finish on its own if not.
fn writable(dir: &Path, name: &str, within: Duration) -> bool {
    let p = dir.join(name);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let f = std::fs::File::create(&p).unwrap();
        f.write_all_at(b"after the thaw", 0).unwrap();
        f.sync_all().unwrap();
        let _ = tx.send(());
    });
    rx.recv_timeout(within).is_ok()
}

/// Waits until the agent's log holds `what`.
fn wait_log(agent: &Agent, what: &str, secs: u64) {
    let t0 = Instant::now();
    while !agent.log().contains(what) {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "no {what:?} in the log: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_explicit_sync_with_transfer_freeze_is_a_frozen_cutover_that_always_thaws() {
    require_root();
    let kit = Kit::new();
    let mut src = LoopDisk::new(96);
    // Every group's bitmaps written by mkfs: an uninitialised group's bitmap lives only in
    // the device's page cache, so a copy read through it need not `cmp` equal to the disk.
    sms_tests::run(
        "mkfs.ext4",
        &[
            "-q",
            "-b",
            "4096",
            "-O",
            "^metadata_csum,^uninit_bg",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            src.path(),
        ],
    );
    let dev = src.dev.clone();
    let mnt = src.mount(&dev, "m", None);
    std::fs::write(mnt.join("base"), noise(12 << 20, 1)).unwrap();
    sms_tests::run("sync", &[]);
    let dst = kit.dir.path().join("dst.img");
    std::fs::File::create(&dst)
        .unwrap()
        .set_len(size_of(&dev))
        .unwrap();
    let port = free_port();
    let emu = Emulator::start();
    let extra = format!(
        "[probe]\ndevices = [\"{}\"]\n[transfer]\nport = {port}\nstreams = 2\nfreeze = [\"{}\"]\nfreeze_window = \"25s\"\n",
        src.path(),
        mnt.display()
    );
    let mut agent = Agent::start_with(
        &emu.url(),
        &format!("access_key = \"{AK}\"\nsecret_key = \"{SK}\"\n"),
        &extra,
        &[],
    );
    let id = emu.source_id(&agent);
    // 40 Mbit/s: the frozen pass below takes seconds, long enough to be interrupted.
    let tid = task(&emu, &id, &src, &json!({"speed_limit": 40}));
    let mut rx = receiver(&kit, &emu, &tid, port, &dst);

    // The copy runs under writes through the filesystem, fsynced in batches.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, data) = (std::sync::Arc::clone(&stop), mnt.join("base"));
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
            let mut x = 5u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for _ in 0..16 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    f.write_all_at(&noise(4096, x), (x % 3072) * 4096).unwrap();
                }
                f.sync_data().unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    action(&emu, &tid, "start");
    emu.wait_task(&tid, "MIGRATE_SUCCESS", 120);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    // The copy was no cutover: nothing was frozen.
    assert!(!agent.log().contains("cutover:"), "{}", agent.log());

    // Buffered and not fsynced: only the freeze's flush puts this on the disk before the
    // pass reads it.
    std::fs::write(mnt.join("late"), noise(16 << 20, 2)).unwrap();
    // `start` of a copied task is SYNC (the emulator, after ref. §5.4.7): the cutover pass.
    action(&emu, &tid, "start");
    wait_log(&agent, "cutover: filesystems frozen", 60);
    // Frozen: a write does not get through.
    assert!(
        !writable(&mnt, "during", Duration::from_millis(500)),
        "the filesystem took a write while the cutover pass ran"
    );
    assert!(!agent.log().contains("thawed"), "{}", agent.log());
    // SIGTERM mid-pass: the daemon stops at a checkpoint and thaws before it exits.
    let (st, _) = agent.terminate();
    assert!(st.success(), "{}", agent.log());
    assert!(
        writable(&mnt, "between", Duration::from_secs(5)),
        "the filesystem stayed frozen after the daemon stopped"
    );
    assert!(
        agent.log().contains("cutover: filesystems thawed after"),
        "{}",
        agent.log()
    );

    // The restarted daemon resumes the cutover pass, frozen again, and completes it.
    agent.restart();
    let t0 = Instant::now();
    while syncs_done(&emu) < 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the cutover pass did not complete: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        agent.log().matches("cutover: filesystems frozen").count(),
        2,
        "{}",
        agent.log()
    );
    // The freeze window is reported: in the final progress report and in status --json.
    let last = reports(&emu)
        .into_iter()
        .rfind(|b| b["subtask_name"] == "SYNC_LINUX_BLOCK" && b["progress"] == 100)
        .unwrap();
    assert!(
        last["process_trace"]
            .as_str()
            .unwrap()
            .contains("cutover: thawed after"),
        "{last}"
    );
    let t0 = Instant::now();
    let freeze = loop {
        let s = agent.status();
        if s["last_freeze"]["completed"] == true {
            break s["last_freeze"].clone();
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{s}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(freeze["within_window"], true, "{freeze}");
    assert_eq!(freeze["mounts"][0], mnt.to_str().unwrap(), "{freeze}");
    assert!(freeze["window_secs"].as_f64().unwrap() > 0.0, "{freeze}");

    // The target is the source as frozen: every byte but the superblock the thaw rewrote,
    // and a clean filesystem holding the same files, the unflushed one too.
    assert!(same_but_superblock(&dev, &dst), "the target differs");
    sms_tests::run("e2fsck", &["-fn", dst.to_str().unwrap()]);
    let tl = LoopDisk::attach(&dst);
    let tm = tempfile::tempdir().unwrap();
    sms_tests::run(
        "mount",
        &["-o", "ro,noload", tl.path(), tm.path().to_str().unwrap()],
    );
    for f in ["base", "late", "during", "between"] {
        let same = std::fs::read(tm.path().join(f)).ok() == std::fs::read(mnt.join(f)).ok();
        assert!(same, "{f} differs on the target");
    }
    sms_tests::run("umount", &[tm.path().to_str().unwrap()]);
    // Thawed afterwards.
    assert!(
        writable(&mnt, "after", Duration::from_secs(5)),
        "the filesystem stayed frozen after the cutover pass"
    );
    let _ = rx.kill();
    let _ = rx.wait();
    agent.kill9();
}
