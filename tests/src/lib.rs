//! Fixtures for the end-to-end tests: real loop-device disks with real filesystems, mounts and
//! LVM volume groups, each cleaned up on drop even when a test panics, and helpers to run the
//! real `sms-agent` binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub mod emulator;
pub mod procs;
pub mod relay;

pub use probe::model::PostSourceServerBody;

/// Runs a command and returns its stdout; panics with its output when it fails (fsck tools
/// report what they found on stdout).
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "`{cmd} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command, ignoring failure (cleanup paths).
pub fn run_quiet(cmd: &str, args: &[&str]) {
    let _ = Command::new(cmd)
        .args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output();
}

/// Fails the test at once, with the reason, unless it runs as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests build loop-device disks and must run as root (sudo cargo test)"
    );
}

/// A name unique within this machine for the life of the test run.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// A sparse image file attached to a loop device, with its mounts and VGs.
pub struct LoopDisk {
    /// The loop device, e.g. `/dev/loop3`.
    pub dev: PathBuf,
    /// Directory holding the image and mount points.
    pub dir: tempfile::TempDir,
    mounts: Vec<PathBuf>,
    vgs: Vec<String>,
    /// An attached existing image: its contents are kept on drop.
    keep: bool,
}

impl LoopDisk {
    /// A new sparse disk of `mib` MiB.
    pub fn new(mib: u64) -> Self {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(mib << 20).unwrap();
        drop(f);
        let dev = run("losetup", &["-f", "--show", img.to_str().unwrap()]);
        Self {
            dev: PathBuf::from(dev.trim()),
            dir,
            mounts: Vec::new(),
            vgs: Vec::new(),
            keep: false,
        }
    }

    /// Attaches an existing image (a migration target, say); its contents survive the drop.
    pub fn attach(img: &Path) -> Self {
        require_root();
        let dev = run("losetup", &["-f", "--show", img.to_str().unwrap()]);
        Self {
            dev: PathBuf::from(dev.trim()),
            dir: tempfile::tempdir().unwrap(),
            mounts: Vec::new(),
            vgs: Vec::new(),
            keep: true,
        }
    }

    /// The device path as text.
    pub fn path(&self) -> &str {
        self.dev.to_str().unwrap()
    }

    /// Node of partition `n`.
    pub fn part(&self, n: u32) -> PathBuf {
        PathBuf::from(format!("{}p{n}", self.path()))
    }

    /// Makes the kernel create partition nodes for the table written on the disk. This
    /// machine's kernel has no MSDOS/EFI partition parsers, so `losetup -P` finds nothing;
    /// `partx -a` adds them through BLKPG from util-linux's own reading of the table.
    pub fn add_partitions(&self, numbers: &[u32]) {
        run_quiet("partx", &["-d", self.path()]);
        run("partx", &["-a", self.path()]);
        for &n in numbers {
            let p = self.part(n);
            for _ in 0..100 {
                if p.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(p.exists(), "{} did not appear", p.display());
        }
    }

    /// Mounts `dev` at a new directory `name` under this disk's temp dir (with `opts`).
    pub fn mount(&mut self, dev: &Path, name: &str, opts: Option<&str>) -> PathBuf {
        let mp = self.dir.path().join(name);
        std::fs::create_dir_all(&mp).unwrap();
        let mut args = vec![dev.to_str().unwrap(), mp.to_str().unwrap()];
        if let Some(o) = opts {
            args.push("-o");
            args.push(o);
        }
        run("mount", &args);
        self.mounts.push(mp.clone());
        mp
    }

    /// Remembers a VG to remove on drop.
    pub fn own_vg(&mut self, vg: &str) {
        self.vgs.push(vg.to_string());
    }

    /// SHA-256 of the first and last MiB of the device: what the probe reads.
    pub fn edges_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&self.dev).unwrap();
        let len = f.seek(SeekFrom::End(0)).unwrap();
        let mut h = Sha256::new();
        for at in [0, len.saturating_sub(1 << 20)] {
            f.seek(SeekFrom::Start(at)).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            f.read_exact(&mut buf).unwrap();
            h.update(&buf);
        }
        format!("{:x}", h.finalize())
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            run_quiet("umount", &[m.to_str().unwrap_or("")]);
        }
        for vg in &self.vgs {
            run_quiet("vgremove", &["-f", "-y", vg]);
        }
        if !self.keep {
            run_quiet("wipefs", &["-a", "-q", self.path()]);
        }
        run_quiet("partx", &["-d", self.path()]);
        run_quiet("losetup", &["-d", self.path()]);
    }
}

/// Creates VG `vg` on `pvs` and gives it the LVs `(name, MiB)` by restoring crafted metadata:
/// this kernel has no device-mapper, so `lvcreate` cannot work, but `vgcfgrestore` only writes
/// metadata.
pub fn make_vg(vg: &str, pvs: &[&Path], lvs: &[(&str, u64)]) {
    let pv_args: Vec<&str> = pvs.iter().map(|p| p.to_str().unwrap()).collect();
    for p in &pv_args {
        run("pvcreate", &["-q", "-y", "-ff", p]);
    }
    let mut args = vec!["-q", vg];
    args.extend(pv_args.iter());
    run("vgcreate", &args);
    if lvs.is_empty() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("vg.txt");
    run("vgcfgbackup", &["-q", "-f", backup.to_str().unwrap(), vg]);
    let text = std::fs::read_to_string(&backup).unwrap();
    // Extents are 4 MiB by default; lay the LVs out one after the other on pv0.
    let mut lv_text = String::from("\n\tlogical_volumes {\n");
    let mut start = 0;
    for (i, (name, mib)) in lvs.iter().enumerate() {
        let extents = mib.div_ceil(4);
        let id = format!("lvidxx-xxxx-xxxx-xxxx-xxxx-xxxx-xxxx{i:02}");
        lv_text.push_str(&format!(
            "\t\t{name} {{\n\t\t\tid = \"{id}\"\n\t\t\tstatus = [\"READ\", \"WRITE\", \"VISIBLE\"]\n\t\t\tflags = []\n\t\t\tsegment_count = 1\n\t\t\tsegment1 {{\n\t\t\t\tstart_extent = 0\n\t\t\t\textent_count = {extents}\n\t\t\t\ttype = \"striped\"\n\t\t\t\tstripe_count = 1\n\t\t\t\tstripes = [\"pv0\", {start}]\n\t\t\t}}\n\t\t}}\n",
        ));
        start += extents;
    }
    lv_text.push_str("\t}\n");
    let end = text.rfind('}').unwrap();
    let restored = format!("{}{}{}", &text[..end], lv_text, &text[end..]);
    std::fs::write(&backup, restored).unwrap();
    run("vgcfgrestore", &["-q", "-f", backup.to_str().unwrap(), vg]);
}

/// A binary built by this workspace (`sms-agent`, `sms-emulator`).
pub fn bin(name: &str) -> PathBuf {
    // Integration tests live in target/<profile>/deps; the binaries one directory up.
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build --workspace && cargo test --workspace`)",
        bin.display()
    );
    bin
}

/// The `sms-agent` binary built by this workspace.
pub fn sms_agent() -> PathBuf {
    bin("sms-agent")
}

/// Output of one `sms-agent probe` run.
pub struct ProbeRun {
    /// The parsed registration body.
    pub body: PostSourceServerBody,
    /// Raw stdout.
    pub stdout: String,
    /// Warnings and logs.
    pub stderr: String,
}

/// Runs `sms-agent probe --device D…` plus `extra` arguments; asserts exit status 0.
pub fn probe(devices: &[&Path], extra: &[&str]) -> ProbeRun {
    // An empty config of our own: the default path may hold one on a developer machine.
    let cfg = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = Command::new(sms_agent());
    cmd.arg("probe").arg("--config").arg(cfg.path());
    for d in devices {
        cmd.arg("--device").arg(d);
    }
    cmd.args(extra);
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "probe failed: {stderr}");
    let body = if extra.contains(&"--human") {
        PostSourceServerBody::default()
    } else {
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("probe printed invalid JSON ({e}): {stdout}"))
    };
    ProbeRun {
        body,
        stdout,
        stderr,
    }
}

/// `blkid -p -o value -s KEY DEV`, empty when absent.
pub fn blkid(dev: &Path, key: &str) -> String {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", key])
        .arg(dev)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `blockdev --getsize64 DEV`.
pub fn size_of(dev: &Path) -> u64 {
    run("blockdev", &["--getsize64", dev.to_str().unwrap()])
        .trim()
        .parse()
        .unwrap()
}

/// `cmp` of two ext4 disks but for the primary superblock (bytes 1024..2048), which a freeze's
/// thaw rewrites on the source (ext4 marks its journal in use again).
pub fn same_but_superblock(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let head = |p: &Path| {
        let mut v = vec![0u8; 1024];
        std::fs::File::open(p)
            .unwrap()
            .read_exact_at(&mut v, 0)
            .unwrap();
        v
    };
    let rest = Command::new("cmp")
        .args(["-s", "-i", "2048"])
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success();
    rest && head(a) == head(b)
}

/// `stat -f -c FMT PATH` as a number.
pub fn statfs(path: &Path, fmt: &str) -> u64 {
    run("stat", &["-f", "-c", fmt, path.to_str().unwrap()])
        .trim()
        .parse()
        .unwrap()
}

/// A tmpfs of a given size (a target filesystem that can fill up), unmounted on drop.
pub struct Tmpfs {
    /// Mount point.
    pub dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB on the fresh directory `dir`.
    pub fn mount(dir: &Path, mib: u64) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let opt = format!("size={mib}m");
        run(
            "mount",
            &["-t", "tmpfs", "-o", &opt, "tmpfs", dir.to_str().unwrap()],
        );
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// Grows (or shrinks) it to `mib` MiB in place.
    pub fn resize(&self, mib: u64) {
        let opt = format!("remount,size={mib}m");
        run("mount", &["-o", &opt, self.dir.to_str().unwrap()]);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        run_quiet("umount", &["-l", self.dir.to_str().unwrap_or("")]);
    }
}
