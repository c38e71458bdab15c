//! Migrations onto blank disks (`receive --prepare`) and boot tests: a Debian disk built by
//! `tests/boot/source-image.sh` (debootstrap, kernel, GRUB; cached in
//! /var/cache/sms-agent-tests) is migrated file-level onto blank images, or block-level, and
//! each copy is booted in qemu (TCG, serial console) until the marker unit prints that
//! multi-user.target was reached. One boot case runs with the suite; the others are
//! `#[ignore]`d and run by `bench/boot.sh` (they need minutes each under TCG).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sms_tests::procs::{wait_bounded, Kit, Receiver};
use sms_tests::{blkid, require_root, run, run_quiet, LoopDisk};

/// A repository file.
fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The cached bootable source image of `variant` (built on first use).
fn source_image(variant: &str) -> PathBuf {
    let out = Command::new(repo("tests/boot/source-image.sh"))
        .arg(variant)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tests/boot/source-image.sh {variant} failed"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A cached image attached read-only, its filesystems mounted read-only under `root`.
struct RoSource {
    dev: String,
    dir: tempfile::TempDir,
    mounts: Vec<PathBuf>,
}

impl RoSource {
    /// Attaches `img` and mounts partition `n` at each `(n, path, fstype)`, parents first.
    fn mount(img: &Path, parts: &[(u32, &str, &str)]) -> Self {
        require_root();
        let dev = run("losetup", &["-r", "-f", "--show", img.to_str().unwrap()])
            .trim()
            .to_string();
        run_quiet("partx", &["-a", &dev]);
        let mut s = Self {
            dev,
            dir: tempfile::tempdir().unwrap(),
            mounts: Vec::new(),
        };
        for (n, at, fstype) in parts {
            let mp = s.root().join(at.trim_start_matches('/'));
            std::fs::create_dir_all(&mp).ok();
            // Never replay a journal: the cached image stays as it was built.
            let opts = match *fstype {
                "xfs" => "ro,norecovery",
                _ => "ro,noload",
            };
            run(
                "mount",
                &[
                    "-t",
                    fstype,
                    "-o",
                    opts,
                    &format!("{}p{n}", s.dev),
                    mp.to_str().unwrap(),
                ],
            );
            s.mounts.push(mp);
        }
        s
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
}

impl Drop for RoSource {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            run_quiet("umount", &[m.to_str().unwrap()]);
        }
        run_quiet("partx", &["-d", &self.dev]);
        run_quiet("losetup", &["-d", &self.dev]);
    }
}

/// A blank target image of `mib` MiB attached to a loop device; `detach` before booting it.
struct BlankTarget {
    dir: tempfile::TempDir,
    dev: Option<String>,
}

impl BlankTarget {
    fn new(mib: u64) -> Self {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let img = dir.path().join("target.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let dev = run("losetup", &["-f", "--show", img.to_str().unwrap()])
            .trim()
            .to_string();
        Self {
            dir,
            dev: Some(dev),
        }
    }
    fn img(&self) -> PathBuf {
        self.dir.path().join("target.img")
    }
    fn dev(&self) -> &str {
        self.dev.as_deref().unwrap()
    }
    fn detach(&mut self) {
        if let Some(d) = self.dev.take() {
            run_quiet("partx", &["-d", &d]);
            run("losetup", &["-d", &d]);
        }
    }
}

impl Drop for BlankTarget {
    fn drop(&mut self) {
        self.detach();
    }
}

/// `migrate --mode file` of `root` to the receiver, naming the source disk `disk0`.
fn migrate_file(kit: &Kit, addr: &str, root: &Path, src_disk: &str) -> (bool, String) {
    let child = Command::new(sms_tests::sms_agent())
        .args(["migrate", "--mode", "file", "--target", addr])
        .args(["--ca", &kit.p("c/ca.pem"), "--cert", &kit.p("c/source.pem")])
        .args(["--key", &kit.p("c/source-key.pem")])
        .arg("--source-root")
        .arg(root)
        .args(["--disk", &format!("{src_disk}=disk0")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (st, err) = wait_bounded(child, Duration::from_secs(900), "migrate --mode file");
    (st.success(), err)
}

/// The last `n` characters of `s`.
fn tail(s: &str, n: usize) -> String {
    let skip = s.chars().count().saturating_sub(n);
    s.chars().skip(skip).collect()
}

/// Boots `img` in qemu; the marker line, or a panic with where the console got to.
fn boot(img: &Path) -> String {
    let log = img.with_extension("console.log");
    let out = Command::new(repo("tests/boot/boot.sh"))
        .arg(img)
        .arg("900")
        .arg(&log)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let marker = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && marker.starts_with("SMS-BOOT-OK"),
        "{} did not reach multi-user; console:\n{}",
        img.display(),
        tail(&std::fs::read_to_string(&log).unwrap_or_default(), 3000)
    );
    marker
}

/// File-level migration of the cached `variant` onto a blank image of `mib` MiB with
/// `--prepare`, then a boot; the marker line.
fn file_migration_boots(variant: &str, parts: &[(u32, &str, &str)], mib: u64) -> String {
    let img = source_image(variant);
    let src = RoSource::mount(&img, parts);
    let mut target = BlankTarget::new(mib);
    let kit = Kit::new();
    let staging = kit.dir.path().join("staging");
    let rx = Receiver::start(
        &kit,
        &[
            "--root".into(),
            staging.display().to_string(),
            "--prepare".into(),
            "--clear-machine-id".into(),
            "--disk".into(),
            format!("disk0={}", target.dev()),
            "--once".into(),
        ],
    );
    let (ok, err) = migrate_file(&kit, &rx.addr, &src.root(), &src.dev);
    assert!(ok, "migrate failed: {err}");
    assert!(rx.wait(), "the receiver did not end complete");
    // The source's filesystem UUIDs, kept on the target.
    run_quiet("partx", &["-a", target.dev()]);
    for (n, _, _) in parts {
        let s = blkid(Path::new(&format!("{}p{n}", src.dev)), "UUID");
        let t = blkid(Path::new(&format!("{}p{n}", target.dev())), "UUID");
        assert_eq!(s, t, "partition {n}: UUID not kept");
    }
    target.detach();
    drop(src);
    boot(&target.img())
}

#[test]
fn file_migration_onto_blank_disks_boots_in_qemu() {
    let m = file_migration_boots("plain", &[(1, "/", "ext4")], 2048);
    assert!(m.contains("root=/dev/vda1"), "{m}");
}

#[test]
#[ignore = "minutes under TCG: run by bench/boot.sh"]
fn file_migration_with_separate_boot_and_swap_onto_a_smaller_disk_boots() {
    let m = file_migration_boots("sepboot", &[(4, "/", "ext4"), (2, "/boot", "ext4")], 1600);
    assert!(
        m.contains("root=/dev/vda4") && m.contains("boot=/dev/vda2"),
        "{m}"
    );
}

#[test]
#[ignore = "minutes under TCG: run by bench/boot.sh"]
fn file_migration_of_an_xfs_root_boots() {
    let m = file_migration_boots("xfs", &[(1, "/", "xfs")], 2048);
    assert!(m.contains("root=/dev/vda1"), "{m}");
}

#[test]
#[ignore = "minutes under TCG: run by bench/boot.sh"]
fn block_migration_onto_a_blank_disk_boots_in_qemu() {
    let img = source_image("plain");
    let src = RoSource::mount(&img, &[]);
    let mut target = BlankTarget::new(2048);
    let kit = Kit::new();
    let rx = Receiver::disks(&kit, &[("disk0", Path::new(target.dev()))]);
    let child = Command::new(sms_tests::sms_agent())
        .args(["migrate", "--mode", "block", "--target", &rx.addr])
        .args(["--ca", &kit.p("c/ca.pem"), "--cert", &kit.p("c/source.pem")])
        .args(["--key", &kit.p("c/source-key.pem")])
        .args(["--state-dir", &kit.p("mstate")])
        .args(["--disk", &format!("{}=disk0", src.dev)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (st, err) = wait_bounded(child, Duration::from_secs(900), "migrate --mode block");
    assert!(st.success(), "{err}");
    assert!(rx.wait());
    target.detach();
    drop(src);
    let m = boot(&target.img());
    assert!(m.contains("root=/dev/vda1"), "{m}");
}

/// A small non-bootable source: GPT with a BIOS boot partition, /boot, swap and / (files and
/// an fstab naming them by UUID), mounted under `root`.
struct SmallSource {
    disk: LoopDisk,
    root: PathBuf,
}

fn small_source(extra_fstab: &str) -> SmallSource {
    let mut disk = LoopDisk::new(160);
    let table = "label: gpt\nstart=2048, size=1MiB, type=21686148-6449-6E6F-744E-656564454649\nsize=40MiB\nsize=16MiB, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F\ntype=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n";
    let mut c = Command::new("sfdisk")
        .args(["-q", disk.path()])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut c.stdin.take().unwrap(), table.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success());
    disk.add_partitions(&[1, 2, 3, 4]);
    run(
        "mkfs.ext4",
        &["-q", "-L", "SBOOT", disk.part(2).to_str().unwrap()],
    );
    run("mkswap", &["-L", "SSWAP", disk.part(3).to_str().unwrap()]);
    run(
        "mkfs.ext4",
        &["-q", "-L", "SROOT", disk.part(4).to_str().unwrap()],
    );
    let root = disk.mount(&disk.part(4), "root", None);
    std::fs::create_dir_all(root.join("boot")).unwrap();
    run(
        "mount",
        &[
            disk.part(2).to_str().unwrap(),
            root.join("boot").to_str().unwrap(),
        ],
    );
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("boot/vmlinuz-test"), vec![7u8; 300_000]).unwrap();
    std::fs::write(root.join("etc/hostname"), "small\n").unwrap();
    let fstab = format!(
        "UUID={} / ext4 defaults 0 1\nUUID={} /boot ext4 defaults 0 2\nUUID={} none swap sw 0 0\nproc /proc proc defaults 0 0\n{extra_fstab}",
        blkid(&disk.part(4), "UUID"),
        blkid(&disk.part(2), "UUID"),
        blkid(&disk.part(3), "UUID")
    );
    std::fs::write(root.join("etc/fstab"), fstab).unwrap();
    SmallSource { disk, root }
}

impl Drop for SmallSource {
    fn drop(&mut self) {
        run_quiet("umount", &[self.root.join("boot").to_str().unwrap()]);
    }
}

fn prepare_receiver(kit: &Kit, staging: &Path, target: &str, extra: &[&str]) -> Receiver {
    let mut args = vec![
        "--root".to_string(),
        staging.display().to_string(),
        "--prepare".into(),
        "--disk".into(),
        format!("disk0={target}"),
    ];
    args.extend(extra.iter().map(|s| (*s).to_string()));
    Receiver::start(kit, &args)
}

#[test]
fn prepare_refuses_a_used_disk_then_wipes_it_and_lays_out_the_source() {
    let src = small_source("");
    let target = LoopDisk::new(200);
    run("mkfs.ext4", &["-q", target.path()]);
    let before = blkid(&target.dev, "UUID");
    let kit = Kit::new();
    let staging = kit.dir.path().join("staging");

    // A disk holding a filesystem is refused, and left as it was.
    let rx = prepare_receiver(&kit, &staging, target.path(), &["--no-configure", "--once"]);
    let (ok, err) = migrate_file(&kit, &rx.addr, &src.root, src.disk.path());
    assert!(!ok);
    assert!(
        err.contains("SMS.1404") && err.contains("give --wipe"),
        "{err}"
    );
    drop(rx);
    assert_eq!(blkid(&target.dev, "UUID"), before);

    // With --wipe: the source's table, partitions, UUIDs and labels, the last partition
    // grown to the larger disk, and the files on the filesystems they came from.
    let rx = prepare_receiver(&kit, &staging, target.path(), &["--no-configure", "--wipe"]);
    let (ok, err) = migrate_file(&kit, &rx.addr, &src.root, src.disk.path());
    assert!(ok, "{err}");
    // A second pass to the same receiver (the used bytes in its layout differ) writes into
    // the filesystems it prepared.
    std::fs::write(src.root.join("etc/hostname"), "small2\n").unwrap();
    let (ok, err) = migrate_file(&kit, &rx.addr, &src.root, src.disk.path());
    assert!(ok, "{err}");
    sms_tests::procs::signal(&rx.child, nix::sys::signal::Signal::SIGTERM);
    let _ = rx.wait();
    // A restarted receiver finds the layout it made (no --wipe needed) and syncs into it.
    std::fs::write(src.root.join("etc/motd"), "hello\n").unwrap();
    let rx = prepare_receiver(&kit, &staging, target.path(), &["--no-configure", "--once"]);
    let (ok, err) = migrate_file(&kit, &rx.addr, &src.root, src.disk.path());
    assert!(ok, "{err}");
    assert!(rx.wait());
    // Done, the receiver has unmounted the prepared filesystems (they can be booted now).
    assert_eq!(mounted_under(&staging), Vec::<String>::new());
    let table: serde_json::Value =
        serde_json::from_str(&run("sfdisk", &["-J", target.path()])).unwrap();
    let parts = table["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(table["partitiontable"]["label"], "gpt");
    assert_eq!(parts.len(), 4);
    assert_eq!(parts[0]["type"], "21686148-6449-6E6F-744E-656564454649");
    assert_eq!(parts[2]["type"], "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F");
    let src_last = parts[3]["size"].as_u64().unwrap() * 512;
    assert!(
        src_last > 130 << 20,
        "last partition not grown to the larger disk: {src_last}"
    );
    target.add_partitions(&[1, 2, 3, 4]);
    for n in [2, 3, 4] {
        assert_eq!(
            blkid(&target.part(n), "UUID"),
            blkid(&src.disk.part(n), "UUID"),
            "partition {n}"
        );
        assert_eq!(
            blkid(&target.part(n), "LABEL"),
            blkid(&src.disk.part(n), "LABEL"),
            "partition {n}"
        );
    }
    assert_eq!(blkid(&target.part(3), "TYPE"), "swap");
    let mut t = target;
    let root = t.mount(&t.part(4), "troot", Some("ro"));
    let boot = t.mount(&t.part(2), "tboot", Some("ro"));
    assert_eq!(
        std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
        "small2\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/motd")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        std::fs::read(boot.join("vmlinuz-test")).unwrap(),
        vec![7u8; 300_000]
    );
    assert!(
        !root.join("boot/vmlinuz-test").exists(),
        "/boot's files landed on the root filesystem"
    );
}

#[test]
fn configuration_refuses_an_fstab_record_naming_a_missing_filesystem() {
    let src = small_source("UUID=0badc0de-0000-4000-8000-000000000000 /data xfs defaults 0 0\n");
    let target = LoopDisk::new(160);
    let kit = Kit::new();
    let staging = kit.dir.path().join("staging");
    let rx = prepare_receiver(&kit, &staging, target.path(), &["--once"]);
    let (ok, err) = migrate_file(&kit, &rx.addr, &src.root, src.disk.path());
    assert!(
        !ok,
        "a target whose fstab names a missing filesystem was reported complete"
    );
    assert!(
        err.contains("SMS.3105")
            && err.contains("UUID=0badc0de-0000-4000-8000-000000000000 /data xfs"),
        "{err}"
    );
    // Stopped after a failed session, the receiver unmounts what it prepared.
    sms_tests::procs::signal(&rx.child, nix::sys::signal::Signal::SIGTERM);
    let _ = rx.wait();
    assert_eq!(mounted_under(&staging), Vec::<String>::new());
}

/// Mount points at or below `dir`.
fn mounted_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .map(str::to_owned)
        .collect()
}

#[test]
fn prepare_refuses_a_source_that_sends_no_layout() {
    // A directory that is not a mounted filesystem has no disk layout to send.
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("f"), "x").unwrap();
    let target = LoopDisk::new(64);
    let kit = Kit::new();
    let staging = kit.dir.path().join("staging");
    let rx = prepare_receiver(&kit, &staging, target.path(), &["--once"]);
    let (ok, err) = migrate_file(&kit, &rx.addr, src.path(), target.path());
    assert!(!ok);
    assert!(
        err.contains("SMS.1312") && err.contains("no disk layout"),
        "{err}"
    );
    // Nothing was written to the target disk.
    assert_eq!(blkid(&target.dev, "TYPE"), "");
    assert!(!staging.join("f").exists());
}
