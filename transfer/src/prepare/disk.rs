//! Partitioning, formatting and mounting the target disks.

use std::fmt::Write as _;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::code::Code;
use crate::file::layout::{Disk, Fs, Layout, Table};

use super::cmd::run;
use super::size::plan_disk;
use super::{PrepareError, PrepareOptions};

/// A created filesystem: where it is, what it is now.
#[derive(Debug, Clone)]
pub(super) struct Made {
    /// Its device node (a partition, or the whole disk).
    pub node: PathBuf,
    /// The source's filesystem.
    pub fs: Fs,
    /// Its UUID on the target (the source's unless the tool could not set it).
    pub uuid: String,
}

/// The prepared disks, mounted under the root until dropped.
#[derive(Debug)]
pub(super) struct Staged {
    pub layout: Layout,
    /// Target disk device of each layout disk, in layout order.
    pub disks: Vec<PathBuf>,
    pub made: Vec<Made>,
    /// Mounted directories, in mount order.
    mounts: Vec<PathBuf>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        nix::unistd::sync();
        for m in self.mounts.iter().rev() {
            if let Err(e) = nix::mount::umount(m) {
                tracing::warn!(dir = %m.display(), error = %e, "cannot unmount a prepared filesystem; detaching it lazily");
                let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// `/dev/loop0` + 1 → `/dev/loop0p1`; `/dev/vdb` + 1 → `/dev/vdb1`.
pub(super) fn part_node(disk: &Path, n: u32) -> PathBuf {
    let s = disk.as_os_str().to_string_lossy();
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        PathBuf::from(format!("{s}p{n}"))
    } else {
        PathBuf::from(format!("{s}{n}"))
    }
}

fn err(code: Code, msg: String) -> PrepareError {
    PrepareError::new(code, msg)
}

/// The UUID blkid reads on `node` now (empty when it has none).
pub(super) fn uuid_of(node: &Path) -> Result<String, PrepareError> {
    // Exit status 2 means "nothing found": not an error for this question.
    match run(
        "blkid",
        &[&*node.to_string_lossy(), "-p", "-s", "UUID", "-o", "value"],
        None,
    ) {
        Ok(s) => Ok(s.trim().to_string()),
        Err(e) if e.contains("exit status: 2") => Ok(String::new()),
        Err(e) => Err(err(Code::PartitionUuidFailed, e)),
    }
}

/// Signatures (partition table, filesystem) on a whole disk, and its partitions the kernel
/// knows.
fn contents(dev: &Path) -> Result<Vec<String>, PrepareError> {
    let mut found = Vec::new();
    let out = run(
        "wipefs",
        &[
            "--no-act",
            "--noheadings",
            "--output",
            "TYPE",
            &*dev.to_string_lossy(),
        ],
        None,
    )
    .map_err(|e| err(Code::DiskAbnormal, e))?;
    found.extend(
        out.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from),
    );
    if let Some(name) = dev.file_name() {
        let sys = Path::new("/sys/class/block").join(name);
        if let Ok(rd) = std::fs::read_dir(&sys) {
            for e in rd.flatten() {
                if e.path().join("partition").exists() {
                    found.push(format!("partition {}", e.file_name().to_string_lossy()));
                }
            }
        }
    }
    Ok(found)
}

/// Whether `name` (a node under `/dev`) is disk `disk` or one of its partitions
/// (`vdb`, `vdb1`; `loop1`, `loop1p2`, but not `loop10`).
fn is_disk_or_part(name: &str, disk: &str) -> bool {
    let Some(rest) = name.strip_prefix(disk) else {
        return false;
    };
    let digits = if disk.ends_with(|c: char| c.is_ascii_digit()) {
        match rest.strip_prefix('p') {
            Some(d) => d,
            None => return rest.is_empty(),
        }
    } else {
        rest
    };
    digits.is_empty() && rest.is_empty()
        || !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
}

/// Whether `dev` or a partition of it is mounted or used as swap.
fn in_use(dev: &Path) -> Option<String> {
    let name = dev.file_name()?.to_string_lossy().into_owned();
    let mut users = Vec::new();
    for f in ["/proc/self/mountinfo", "/proc/swaps"] {
        if let Ok(t) = std::fs::read_to_string(f) {
            for l in t.lines() {
                if l.split_whitespace().any(|w| {
                    w.strip_prefix("/dev/")
                        .is_some_and(|n| is_disk_or_part(n, &name))
                }) {
                    users.push(l.to_string());
                }
            }
        }
    }
    (!users.is_empty()).then(|| users.join("; "))
}

fn size_of(dev: &Path) -> Result<u64, PrepareError> {
    let out = run("blockdev", &["--getsize64", &*dev.to_string_lossy()], None)
        .map_err(|e| err(Code::DiskAbnormal, e))?;
    out.trim().parse().map_err(|_| {
        err(
            Code::DiskAbnormal,
            format!("blockdev --getsize64 {}: {out:?}", dev.display()),
        )
    })
}

/// The `sfdisk` script of a disk's new table.
fn sfdisk_script(d: &Disk, planned: &[super::Planned], sector: u64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "label: {}",
        if d.table == Table::Gpt { "gpt" } else { "dos" }
    );
    let _ = writeln!(s, "unit: sectors");
    for (p, q) in d.parts.iter().zip(planned) {
        let _ = write!(
            s,
            "{}: start={}, size={}, type={}",
            q.number,
            q.start / sector,
            q.size / sector,
            p.type_id
        );
        if d.table == Table::Gpt && !p.label.is_empty() {
            let _ = write!(s, ", name=\"{}\"", p.label.replace(['"', '\\'], "_"));
        }
        if d.table == Table::Mbr && p.bootable {
            s.push_str(", bootable");
        }
        s.push('\n');
    }
    s
}

fn mkfs(node: &Path, fs: &Fs) -> Result<(), PrepareError> {
    let n = node.to_string_lossy().into_owned();
    let mut a: Vec<String> = Vec::new();
    let (prog, code) = match fs.fs_type.as_str() {
        t @ ("ext2" | "ext3" | "ext4") => {
            a.extend(["-F".into(), "-q".into(), "-t".into(), t.into()]);
            if !fs.uuid.is_empty() {
                a.extend(["-U".into(), fs.uuid.clone()]);
            }
            if !fs.label.is_empty() {
                a.extend(["-L".into(), fs.label.chars().take(16).collect()]);
            }
            if fs.inode_size >= 128 {
                a.extend(["-I".into(), fs.inode_size.to_string()]);
            }
            ("mke2fs", Code::FormatFailed)
        }
        "xfs" => {
            a.extend(["-f".into(), "-q".into()]);
            if !fs.uuid.is_empty() {
                a.extend(["-m".into(), format!("uuid={}", fs.uuid)]);
            }
            if !fs.label.is_empty() {
                a.extend(["-L".into(), fs.label.chars().take(12).collect()]);
            }
            ("mkfs.xfs", Code::FormatFailed)
        }
        "btrfs" => {
            a.extend(["-f".into(), "-q".into()]);
            if !fs.uuid.is_empty() {
                a.extend(["-U".into(), fs.uuid.clone()]);
            }
            if !fs.label.is_empty() {
                a.extend(["-L".into(), fs.label.clone()]);
            }
            ("mkfs.btrfs", Code::FormatFailed)
        }
        "vfat" => {
            if !fs.uuid.is_empty() {
                a.extend(["-i".into(), fs.uuid.replace('-', "")]);
            }
            if !fs.label.is_empty() {
                a.extend(["-n".into(), fs.label.chars().take(11).collect()]);
            }
            ("mkfs.vfat", Code::FormatFailed)
        }
        "swap" => {
            a.push("-f".into());
            if !fs.uuid.is_empty() {
                a.extend(["-U".into(), fs.uuid.clone()]);
            }
            if !fs.label.is_empty() {
                a.extend(["-L".into(), fs.label.chars().take(15).collect()]);
            }
            ("mkswap", Code::SwapFailed)
        }
        other => {
            return Err(err(
                Code::FormatFailed,
                format!("partition {n}: cannot create a {other} filesystem"),
            ))
        }
    };
    a.push(n.clone());
    run(prog, &a, None)
        .map(drop)
        .map_err(|e| err(code, format!("partition {n} as {}: {e}", fs.fs_type)))
}

/// Makes (or finds already made) the layout on the mapped disks and mounts it under `root`.
pub(super) fn stage(
    layout: &Layout,
    opts: &PrepareOptions,
    root: &Path,
) -> Result<Staged, PrepareError> {
    let mut disks = Vec::new();
    for d in &layout.disks {
        let Some((_, dev)) = opts.disks.iter().find(|(n, _)| *n == d.name) else {
            return Err(err(
                Code::TooFewTargetDisks,
                format!(
                    "the source's disk {} is mapped to no target disk (give --disk {}=DEVICE)",
                    d.name, d.name
                ),
            ));
        };
        let dev = std::fs::canonicalize(dev).map_err(|e| {
            err(
                Code::DiskAbnormal,
                format!("target disk {}: {e}", dev.display()),
            )
        })?;
        let meta = std::fs::metadata(&dev).map_err(|e| {
            err(
                Code::DiskAbnormal,
                format!("target disk {}: {e}", dev.display()),
            )
        })?;
        if !meta.file_type().is_block_device() {
            return Err(err(
                Code::DiskAbnormal,
                format!(
                    "target disk {} is not a block device (attach an image with losetup)",
                    dev.display()
                ),
            ));
        }
        disks.push(dev);
    }
    let mut made = Vec::new();
    for (d, dev) in layout.disks.iter().zip(&disks) {
        made.extend(prepare_disk(d, dev, opts)?);
    }
    let mut staged = Staged {
        layout: layout.clone(),
        disks,
        made,
        mounts: Vec::new(),
    };
    // Parents first: `/` before `/boot` before `/boot/efi`.
    let mut order: Vec<&Made> = staged
        .made
        .iter()
        .filter(|m| !m.fs.mount.is_empty() && m.fs.fs_type != "swap")
        .collect();
    order.sort_by_key(|m| {
        (
            m.fs.mount.matches('/').count() - usize::from(m.fs.mount == "/"),
            m.fs.mount.len(),
        )
    });
    let mut mounted = Vec::new();
    for m in order {
        let dir = root.join(m.fs.mount.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).map_err(|e| {
            err(
                Code::MountFailed,
                format!(
                    "partition {} to directory {}: cannot create it: {e}",
                    m.node.display(),
                    dir.display()
                ),
            )
        })?;
        nix::mount::mount(
            Some(&m.node),
            &dir,
            Some(m.fs.fs_type.as_str()),
            nix::mount::MsFlags::empty(),
            // The staging host may have the source's XFS itself mounted (a copy of its own
            // disk, a test): XFS refuses a second filesystem with the same UUID otherwise.
            (m.fs.fs_type == "xfs").then_some("nouuid"),
        )
        .map_err(|e| {
            err(
                Code::MountFailed,
                format!(
                    "partition {} to directory {}: {e}",
                    m.node.display(),
                    dir.display()
                ),
            )
        })?;
        tracing::info!(node = %m.node.display(), dir = %dir.display(), "prepared filesystem mounted");
        mounted.push(dir);
    }
    staged.mounts = mounted;
    Ok(staged)
}

/// One disk: already holding this layout (a restarted receiver), blank, or wiped when told.
fn prepare_disk(d: &Disk, dev: &Path, opts: &PrepareOptions) -> Result<Vec<Made>, PrepareError> {
    let expected: Vec<(PathBuf, &Fs)> = if d.table == Table::None {
        d.whole.iter().map(|f| (dev.to_path_buf(), f)).collect()
    } else {
        d.parts
            .iter()
            .filter_map(|p| p.fs.as_ref().map(|f| (part_node(dev, p.number), f)))
            .collect()
    };
    if let Some(users) = in_use(dev) {
        return Err(err(
            Code::DiskAbnormal,
            format!(
                "disk {} is in use ({users}); expected status: unused",
                dev.display()
            ),
        ));
    }
    let found = contents(dev)?;
    if !found.is_empty() {
        if d.table != Table::None {
            // A partition table whose nodes the kernel has not made yet (no partition
            // parsers, or a restarted receiver).
            let _ = run("partx", &["-a", &*dev.to_string_lossy()], None);
        }
        let ours = !expected.is_empty()
            && expected
                .iter()
                .all(|(node, f)| !f.uuid.is_empty() && uuid_of(node).is_ok_and(|u| u == f.uuid));
        if ours {
            tracing::info!(disk = %dev.display(), "target disk already holds this layout; using it as it is");
            return Ok(expected
                .into_iter()
                .map(|(node, f)| Made {
                    node,
                    uuid: f.uuid.clone(),
                    fs: f.clone(),
                })
                .collect());
        }
        if !opts.wipe {
            return Err(err(
                Code::DiskAbnormal,
                format!(
                    "disk {} is abnormal. Expected status: blank; it holds {} (give --wipe to erase it)",
                    dev.display(),
                    found.join(", ")
                ),
            ));
        }
        tracing::warn!(disk = %dev.display(), holds = %found.join(", "), "--wipe: erasing the target disk");
        let _ = run("partx", &["-d", &*dev.to_string_lossy()], None);
        run("wipefs", &["-a", "-q", &*dev.to_string_lossy()], None).map_err(|e| {
            err(
                Code::PartitionFailed,
                format!("disk {}: {e}", dev.display()),
            )
        })?;
    }
    let size = size_of(dev)?;
    let planned = plan_disk(d, size)?;
    if d.table != Table::None {
        let sector = run("blockdev", &["--getss", &*dev.to_string_lossy()], None)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|s| [512, 1024, 2048, 4096].contains(s))
            .unwrap_or(512);
        let script = sfdisk_script(d, &planned, sector);
        run(
            "sfdisk",
            &[
                "--quiet",
                "--wipe",
                "always",
                "--wipe-partitions",
                "always",
                &*dev.to_string_lossy(),
            ],
            Some(script.as_bytes()),
        )
        .map_err(|e| {
            err(
                Code::PartitionFailed,
                format!("disk {}: {e}", dev.display()),
            )
        })?;
        // Kernels without the table's parser (and loop devices without partscan) make the
        // partition nodes only through BLKPG.
        let _ = run("partx", &["-a", &*dev.to_string_lossy()], None);
        for p in &planned {
            let node = part_node(dev, p.number);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !node.exists() {
                if std::time::Instant::now() > deadline {
                    return Err(err(
                        Code::PartitionFailed,
                        format!(
                            "disk {}: partition node {} did not appear",
                            dev.display(),
                            node.display()
                        ),
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        tracing::info!(disk = %dev.display(), partitions = planned.len(), "target disk partitioned");
    }
    let mut made = Vec::new();
    for (node, fs) in expected {
        mkfs(&node, fs)?;
        let uuid = uuid_of(&node)?;
        if uuid.is_empty() {
            return Err(err(
                Code::PartitionUuidFailed,
                format!(
                    "partition {}: no UUID after formatting it as {}",
                    node.display(),
                    fs.fs_type
                ),
            ));
        }
        if !fs.uuid.is_empty() && !uuid.eq_ignore_ascii_case(&fs.uuid) {
            tracing::warn!(node = %node.display(), source_uuid = %fs.uuid, uuid = %uuid, "the filesystem got a new UUID; fstab will be rewritten");
        }
        made.push(Made {
            node,
            fs: fs.clone(),
            uuid,
        });
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_is_told_from_its_neighbours() {
        assert!(is_disk_or_part("loop1", "loop1"));
        assert!(is_disk_or_part("loop1p2", "loop1"));
        assert!(!is_disk_or_part("loop10", "loop1"));
        assert!(!is_disk_or_part("loop10p1", "loop1"));
        assert!(is_disk_or_part("vdb", "vdb"));
        assert!(is_disk_or_part("vdb12", "vdb"));
        assert!(!is_disk_or_part("vdba", "vdb"));
        assert!(!is_disk_or_part("loop1p", "loop1"));
    }

    #[test]
    fn partition_nodes_follow_the_kernel_names() {
        assert_eq!(
            part_node(Path::new("/dev/loop3"), 2),
            Path::new("/dev/loop3p2")
        );
        assert_eq!(part_node(Path::new("/dev/vdb"), 1), Path::new("/dev/vdb1"));
        assert_eq!(
            part_node(Path::new("/dev/nvme0n1"), 4),
            Path::new("/dev/nvme0n1p4")
        );
    }
}
