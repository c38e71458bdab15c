//! Block passes end to end over real mutual TLS on loopback, with image files for disks.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::session::{Connector, Listener};
use crate::task::{Control, Progress};
use crate::tls::{client_config, server_config, Identity};

struct Rig {
    dir: tempfile::TempDir,
    connector: Connector,
    stop: std::sync::mpsc::Receiver<Result<ReceiveReport, String>>,
}

fn tls(dir: &Path) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    crate::certs::generate(dir, &[]).unwrap();
    let r = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
    let ca = r("ca.pem");
    (
        server_config(
            Identity::from_pem(&r("target.pem"), &r("target-key.pem"), None).unwrap(),
            &ca,
        )
        .unwrap(),
        client_config(
            Identity::from_pem(&r("source.pem"), &r("source-key.pem"), None).unwrap(),
            &ca,
        )
        .unwrap(),
    )
}

/// A receiver serving sessions for the disks `names` (files `DIR/tgt-NAME.img`).
fn rig(names: &[&str]) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let disks = names
        .iter()
        .map(|n| TargetMap {
            name: (*n).to_string(),
            path: dir.path().join(format!("tgt-{n}.img")),
        })
        .collect();
    rig_mapped(dir, disks)
}

/// A receiver serving sessions for the given mappings, its certificates and state in `dir`.
fn rig_mapped(dir: tempfile::TempDir, disks: Vec<TargetMap>) -> Rig {
    let (server, client) = tls(dir.path());
    let l = Listener::bind("127.0.0.1:0", server).unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let opts = ReceiveOptions {
        disks,
        state_dir: dir.path().join("state"),
        peer_timeout: Duration::ZERO,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let tx = Mutex::new(tx);
        let _ = l.serve(move |inc, _guard| {
            let r = receive(inc, &opts).map_err(|e| e.to_string());
            let _ = tx.lock().unwrap().send(r);
            false
        });
    });
    Rig {
        dir,
        connector: Connector {
            addr,
            tls: client,
            timeout: Duration::from_secs(5),
        },
        stop: rx,
    }
}

use std::sync::Mutex;

fn noise(n: usize, mut x: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            crate::testutil::xorshift(&mut x);
            #[allow(clippy::cast_possible_truncation)]
            let b = x as u8;
            b
        })
        .collect()
}

/// A 16 MiB source image with data in a few places; returns its path and used ranges.
fn source(dir: &Path) -> (std::path::PathBuf, Vec<std::ops::Range<u64>>) {
    let p = dir.join("src.img");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(16 << 20).unwrap();
    f.write_all_at(&noise(3 << 20, 1), 0).unwrap();
    f.write_all_at(&b"text ".repeat(200_000), 5 << 20).unwrap();
    f.write_all_at(&noise(4096, 2), (9 << 20) + 12288).unwrap();
    // Data outside the used ranges must not travel.
    f.write_all_at(&noise(1 << 20, 3), 12 << 20).unwrap();
    (
        p,
        vec![0..(3 << 20), (5 << 20)..(6 << 20), (9 << 20)..(10 << 20)],
    )
}

fn run(rig: &Rig, disks: &[SourceDisk], pass: u32, sync: bool) -> PassReport {
    let opts = SendOptions {
        task_id: "task-1".into(),
        pass,
        sync,
        streams: 3,
        ..SendOptions::default()
    };
    let r = send(
        &rig.connector,
        disks,
        &opts,
        &Progress::default(),
        &Control::default(),
    )
    .unwrap();
    let rr = rig
        .stop
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap();
    assert!(rr.complete);
    r
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn full_copy_then_sync_sends_only_changes() {
    let rig = rig(&["d0"]);
    let (src, used) = source(rig.dir.path());
    let disks = vec![SourceDisk {
        path: src.clone(),
        name: "d0".into(),
        used: used.clone(),
    }];
    let r = run(&rig, &disks, 0, false);
    assert_eq!(r.chunks, 5);
    let (s, t) = (read(&src), read(&rig.dir.path().join("tgt-d0.img")));
    assert_eq!(s.len(), t.len());
    for u in &used {
        let (a, b) = (
            usize::try_from(u.start).unwrap(),
            usize::try_from(u.end).unwrap(),
        );
        assert!(s[a..b] == t[a..b], "range {u:?} differs");
    }
    assert!(
        t[12 << 20..13 << 20].iter().all(|&b| b == 0),
        "free space was copied"
    );
    // Zeros and free space are not sent.
    assert!(r.plain_sent < (4 << 20) + 100_000, "{r:?}");

    // Change three leaves; a sync sends about that much.
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&noise(4096, 9), 8192).unwrap();
    f.write_all_at(&noise(4096, 10), (5 << 20) + 40960).unwrap();
    f.write_all_at(&noise(100, 11), (9 << 20) + 12288).unwrap();
    let r = run(&rig, &disks, 1, true);
    assert!(r.plain_sent <= 3 * 4096, "{r:?}");
    let (s, t) = (read(&src), read(&rig.dir.path().join("tgt-d0.img")));
    for u in &used {
        let (a, b) = (
            usize::try_from(u.start).unwrap(),
            usize::try_from(u.end).unwrap(),
        );
        assert!(s[a..b] == t[a..b], "range {u:?} differs after sync");
    }
    // An unchanged sync sends nothing at all.
    let r = run(&rig, &disks, 2, true);
    assert_eq!(r.plain_sent, 0, "{r:?}");
}

#[test]
fn unaligned_ranges_and_a_ragged_disk_end_arrive_exact_and_nothing_else() {
    // Whole blocks are read O_DIRECT, ragged pieces through the cache; nothing of the source
    // outside the used ranges travels (a full pass leaves the target's bytes there alone).
    let rig = rig(&["d0"]);
    let size: u64 = (3 << 20) + 1500;
    let src = rig.dir.path().join("src.img");
    let f = std::fs::File::create(&src).unwrap();
    f.write_all_at(&noise(usize::try_from(size).unwrap(), 21), 0)
        .unwrap();
    let tgt = rig.dir.path().join("tgt-d0.img");
    std::fs::write(&tgt, vec![0xAAu8; usize::try_from(size).unwrap()]).unwrap();
    // Gaps longer than the 64 KiB that ride along with the data.
    let used = vec![
        100..5000,
        (100 << 10) + 8..(1 << 20) + 300,
        (1 << 20) + (200 << 10)..(1 << 20) + (264 << 10),
        (2 << 20) + 4096..size,
    ];
    let disks = vec![SourceDisk {
        path: src.clone(),
        name: "d0".into(),
        used: used.clone(),
    }];
    let r = run(&rig, &disks, 0, false);
    assert_eq!(r.chunks, 4);
    let (s, t) = (read(&src), read(&tgt));
    let mut want = vec![0xAAu8; s.len()];
    for u in &used {
        let (a, b) = (
            usize::try_from(u.start).unwrap(),
            usize::try_from(u.end).unwrap(),
        );
        want[a..b].copy_from_slice(&s[a..b]);
    }
    assert_eq!(t.len(), want.len());
    let first = t.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(
        first, None,
        "the target differs from the used ranges of the source"
    );
    assert_eq!(
        r.bytes_read,
        used.iter().map(|u| u.end - u.start).sum::<u64>()
    );
}

/// Whether the target holds the source's bytes in every used range.
fn same_in(src: &Path, tgt: &Path, used: &[std::ops::Range<u64>]) -> bool {
    let (s, t) = (read(src), read(tgt));
    used.iter().all(|u| {
        let (a, b) = (
            usize::try_from(u.start).unwrap(),
            usize::try_from(u.end).unwrap(),
        );
        s[a..b] == t[a..b]
    })
}

#[test]
fn a_completed_pass_is_never_resumed_and_a_recreated_target_is_never_trusted() {
    let rig = rig(&["d0"]);
    let (src, used) = source(rig.dir.path());
    let tgt = rig.dir.path().join("tgt-d0.img");
    let disks = vec![SourceDisk {
        path: src.clone(),
        name: "d0".into(),
        used: used.clone(),
    }];
    let first = run(&rig, &disks, 0, false);
    assert!(same_in(&src, &tgt, &used));
    assert!(!first.upgraded && first.held.is_none(), "{first:?}");

    // The same full pass again: the receiver holds a complete copy, so it runs as a sync
    // that checks every chunk and, the source being unchanged, sends nothing.
    let again = run(&rig, &disks, 0, false);
    assert!(again.upgraded, "{again:?}");
    assert_eq!(again.held, Some(0));
    assert_eq!(again.chunks_resumed, 0, "{again:?}");
    assert_eq!(again.plain_sent, 0, "{again:?}");

    // New source content, and the target deleted and created again at the same path (its
    // inode number may well be reused): nothing of the old copy may count as done.
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&noise(3 << 20, 77), 0).unwrap();
    f.write_all_at(&noise(1 << 20, 78), 5 << 20).unwrap();
    drop(f);
    std::fs::remove_file(&tgt).unwrap();
    std::fs::File::create(&tgt)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let fresh = run(&rig, &disks, 0, false);
    assert_eq!(fresh.chunks_resumed, 0, "{fresh:?}");
    assert!(!fresh.upgraded, "{fresh:?}");
    assert!(fresh.plain_sent >= 4 << 20, "{fresh:?}");
    assert!(same_in(&src, &tgt, &used), "the recreated target differs");
}

#[test]
fn a_resumed_pass_compares_chunks_written_after_the_last_checkpoint_instead_of_resending() {
    let rig = rig(&["d0"]);
    let (src, used) = source(rig.dir.path());
    let tgt = rig.dir.path().join("tgt-d0.img");
    let disks = vec![SourceDisk {
        path: src.clone(),
        name: "d0".into(),
        used: used.clone(),
    }];
    run(&rig, &disks, 0, false);
    // What a kill -9 after the writes but before any checkpoint leaves: data on the target,
    // nothing done, the lease recorded.
    let file = ckpt::path(&rig.dir.path().join("state"), "task-1");
    let (mut meta, maps) = ckpt::load(&file).unwrap().unwrap();
    assert!(
        meta.complete && meta.lease.iter().all(|&l| l > 0),
        "{meta:?}"
    );
    meta.complete = false;
    meta.samples.clear();
    let empty: Vec<_> = maps.iter().map(|m| map::Bitmap::new(m.len())).collect();
    ckpt::save(&file, &meta, &empty).unwrap();
    let r = run(&rig, &disks, 0, false);
    assert!(!r.upgraded, "{r:?}");
    assert_eq!(r.verified, r.chunks, "{r:?}");
    assert_eq!(r.plain_sent, 0, "{r:?}");
    assert!(same_in(&src, &tgt, &used));

    // A sampled chunk that no longer holds what the checkpoint says: the target was changed
    // behind the receiver's back, so nothing is resumed.
    let (mut meta, maps) = ckpt::load(&file).unwrap().unwrap();
    assert!(!meta.samples.is_empty(), "{meta:?}");
    meta.complete = false;
    ckpt::save(&file, &meta, &maps).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&tgt).unwrap();
    f.write_all_at(&noise(4096, 99), 4096).unwrap();
    drop(f);
    let r = run(&rig, &disks, 0, false);
    assert_eq!(r.chunks_resumed, 0, "{r:?}");
    assert!(
        same_in(&src, &tgt, &used),
        "the changed target was not repaired"
    );
}

#[test]
fn a_target_smaller_than_the_source_or_unmapped_is_refused() {
    let rig = rig(&["d0"]);
    let (src, used) = source(rig.dir.path());
    let tgt = rig.dir.path().join("tgt-d0.img");
    std::fs::File::create(&tgt)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let disks = vec![SourceDisk {
        path: src.clone(),
        name: "d0".into(),
        used: used.clone(),
    }];
    let opts = SendOptions {
        task_id: "t".into(),
        ..SendOptions::default()
    };
    let e = send(
        &rig.connector,
        &disks,
        &opts,
        &Progress::default(),
        &Control::default(),
    )
    .unwrap_err();
    assert_eq!(e.code(), "SMS.1504", "{e}");
    assert_eq!(std::fs::metadata(&tgt).unwrap().len(), 1 << 20);
    let disks = vec![SourceDisk {
        path: src,
        name: "other".into(),
        used,
    }];
    let e = send(
        &rig.connector,
        &disks,
        &opts,
        &Progress::default(),
        &Control::default(),
    )
    .unwrap_err();
    assert_eq!(e.code(), "SMS.1311", "{e}");
}

/// A hand-made frame sequence.
type Attack = Box<dyn Fn(&mut crate::session::Stream)>;

/// Opens a session by hand up to the data stream, as a hostile sender would.
fn hand_session(rig: &Rig, size: u64) -> (crate::session::Stream, crate::session::Stream) {
    use crate::wire::{Message, Mode};
    let (mut ctl, session) = rig.connector.open("evil", Mode::Block, 0, 1, 0).unwrap();
    ctl.send(&Message::DiskPlan {
        pass: 0,
        sync: false,
        more: false,
        chunk_size: DEFAULT_CHUNK,
        disks: vec![("d0".into(), size)],
    })
    .unwrap();
    ctl.flush().unwrap();
    assert!(matches!(ctl.recv().unwrap(), Message::Accepted { .. }));
    assert!(matches!(ctl.recv().unwrap(), Message::DoneMap { .. }));
    assert!(matches!(ctl.recv().unwrap(), Message::VerifyMap { .. }));
    assert_eq!(ctl.recv().unwrap(), Message::Ready);
    let (data, _) = rig
        .connector
        .open("evil", Mode::Block, 1, 1, session)
        .unwrap();
    (ctl, data)
}

#[test]
fn hostile_frames_are_rejected_without_harm() {
    use crate::wire::Message;
    use std::io::Write;
    let rig = rig(&["d0"]);
    let size = 4u64 << 20;
    let tgt = rig.dir.path().join("tgt-d0.img");
    let zeros = vec![0u8; usize::try_from(size).unwrap()];
    let attacks: Vec<Attack> = vec![
        // A chunk whose data does not match its hash.
        Box::new(|s| {
            let mut m = crate::chunk::Compressor::default()
                .chunk(0, 0, &noise(4096, 1))
                .unwrap();
            if let Message::Chunk { hash, .. } = &mut m {
                hash[0] ^= 1;
            }
            s.send(&m).unwrap();
        }),
        // A valid chunk that would write past the end of the disk.
        Box::new(move |s| {
            let m = crate::chunk::Compressor::default()
                .chunk(0, size - 100, &noise(4096, 2))
                .unwrap();
            s.send(&m).unwrap();
        }),
        // A zero run past the end, and a chunk for a disk not in the plan.
        Box::new(move |s| {
            s.send(&Message::Zero {
                disk: 0,
                offset: size,
                len: 4096,
            })
            .unwrap();
        }),
        Box::new(|s| {
            let m = crate::chunk::Compressor::default()
                .chunk(7, 0, &noise(4096, 3))
                .unwrap();
            s.send(&m).unwrap();
        }),
        // A frame header announcing 4 GiB.
        Box::new(|s| {
            let mut h = Message::Bye.encode().unwrap();
            h[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
            s.writer.write_all(&h).unwrap();
        }),
    ];
    for (i, attack) in attacks.iter().enumerate() {
        let (_ctl, mut data) = hand_session(&rig, size);
        attack(&mut data);
        let _ = data.flush();
        // The receiver answers with an error and drops the stream.
        let mut refused = false;
        while let Ok(m) = data.recv() {
            if matches!(m, Message::Error { .. }) {
                refused = true;
                break;
            }
        }
        assert!(
            refused || data.recv().is_err(),
            "attack {i} was not refused"
        );
        let r = rig.stop.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(r.is_err(), "attack {i}: session reported success");
        assert!(read(&tgt) == zeros, "attack {i} changed the target");
    }
    // The receiver still serves an honest sender afterwards.
    let src = rig.dir.path().join("ok.img");
    std::fs::write(&src, noise(usize::try_from(size).unwrap(), 5)).unwrap();
    let disks = vec![SourceDisk {
        path: src.clone(),
        name: "d0".into(),
        used: std::iter::once(0..size).collect(),
    }];
    run(&rig, &disks, 0, false);
    assert!(read(&tgt) == read(&src));
}

/// A command that must succeed (mounts and loop devices of the tests).
fn sh(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A 64 MiB tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new() -> Self {
        let d = tempfile::tempdir().unwrap();
        sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "size=64m",
                "sms-test",
                d.path().to_str().unwrap(),
            ],
        );
        Self(d)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: a session abandoned by the test may still hold an image open.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// A loop device over an image file, detached on drop.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// Sends a one-disk plan by hand and returns the receiver's answer.
fn hand_plan(rig: &Rig, disk: &str, size: u64) -> crate::wire::Message {
    use crate::wire::{Message, Mode};
    let (mut ctl, _) = rig.connector.open("evil", Mode::Block, 0, 1, 0).unwrap();
    ctl.send(&Message::DiskPlan {
        pass: 0,
        sync: false,
        more: false,
        chunk_size: DEFAULT_CHUNK,
        disks: vec![(disk.into(), size)],
    })
    .unwrap();
    ctl.flush().unwrap();
    ctl.recv().unwrap()
}

#[test]
fn plans_larger_than_their_target_are_refused_before_anything_is_created() {
    use crate::wire::Message;
    assert!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0,
        "this test mounts a tmpfs and attaches a loop device: run it as root"
    );
    let fs = Tmpfs::new();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("loop.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let dev = Loop(sh("losetup", &["--find", "--show", img.to_str().unwrap()]));
    let missing = fs.0.path().join("new.img");
    let rig = rig_mapped(
        dir,
        vec![
            TargetMap {
                name: "img".into(),
                path: missing.clone(),
            },
            TargetMap {
                name: "dev".into(),
                path: dev.0.clone().into(),
            },
        ],
    );
    let cases = [
        ("img", i64::MAX as u64),
        ("img", u64::MAX),
        ("img", 0),
        // Under the done-map cap, over the 64 MiB filesystem.
        ("img", 1 << 30),
        ("dev", (8 << 20) + 512),
        ("dev", i64::MAX as u64),
        ("dev", 0),
    ];
    for (disk, size) in cases {
        match hand_plan(&rig, disk, size) {
            Message::Error { code, message } => {
                eprintln!("{disk} {size}: {code}: {message}");
                assert_eq!(code, "SMS.1504", "{disk} {size}: {message}");
                assert!(
                    message.contains(disk) && message.contains(&size.to_string()),
                    "{disk} {size}: the refusal names neither the disk nor its size: {message}"
                );
            }
            other => panic!("{disk} {size}: plan accepted: {other:?}"),
        }
        let r = rig.stop.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(r.is_err(), "{disk} {size}: session reported success");
        assert!(!missing.exists(), "{disk} {size}: an image was created");
        assert_eq!(std::fs::read_dir(fs.0.path()).unwrap().count(), 0);
    }
    // The same receiver still takes honest plans for both.
    for (disk, size) in [("img", 4u64 << 20), ("dev", 8 << 20)] {
        assert!(
            matches!(hand_plan(&rig, disk, size), Message::Accepted { .. }),
            "{disk} {size} refused"
        );
    }
    assert_eq!(std::fs::metadata(&missing).unwrap().len(), 4 << 20);
    drop(dev);
}
