//! Post-copy configuration of the migrated system, in a chroot of the target with its own
//! tools: fstab and crypttab checked (and fstab rewritten where UUIDs changed), machine-id
//! cleared on request, the initramfs regenerated, GRUB 2 installed for BIOS and its
//! configuration regenerated.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use crate::code::Code;
use crate::file::layout::Table;

use super::cmd::run;
use super::disk::{Made, Staged};
use super::fstab::{check_crypttab, check_fstab, Have};
use super::{PrepareError, PrepareOptions};

/// GPT type of a BIOS boot partition (where GRUB embeds its core image on a GPT disk).
const BIOS_BOOT: &str = "21686148-6449-6e6f-744e-656564454649";

/// The chroot's `/proc`, `/sys`, `/dev` and `/run`, unmounted when dropped.
struct Chroot {
    mounts: Vec<PathBuf>,
}

impl Drop for Chroot {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            if umount2(m, MntFlags::empty()).is_err() {
                let _ = umount2(m, MntFlags::MNT_DETACH);
            }
        }
    }
}

fn cfg_err(code: Code, msg: String) -> PrepareError {
    PrepareError::new(code, msg)
}

/// Copies the device node `src` (host `/dev`) to `dst` with the same numbers.
fn copy_node(src: &Path, dst: &Path) -> Result<(), String> {
    let m = std::fs::metadata(src).map_err(|e| format!("{}: {e}", src.display()))?;
    let kind = if m.mode() & 0o170_000 == 0o060_000 {
        SFlag::S_IFBLK
    } else {
        SFlag::S_IFCHR
    };
    let rdev = m.rdev();
    mknod(
        dst,
        kind,
        Mode::from_bits_truncate(m.mode() & 0o777),
        makedev(nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)),
    )
    .map_err(|e| format!("mknod {}: {e}", dst.display()))
}

impl Chroot {
    /// Mounts what the target's tools need, with a `/dev` holding only the target disks,
    /// their partitions and `/dev/disk/by-uuid` links: grub-mkconfig writes `root=UUID=` only
    /// when that link exists, and nothing of the host's other disks is visible.
    fn enter(root: &Path, staged: &Staged) -> Result<Chroot, String> {
        let mut c = Chroot { mounts: Vec::new() };
        let mut put = |src: Option<&str>,
                       dir: &str,
                       fstype: Option<&str>,
                       flags: MsFlags|
         -> Result<PathBuf, String> {
            let d = root.join(dir);
            std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
            mount(src, &d, fstype, flags, None::<&str>)
                .map_err(|e| format!("mount {}: {e}", d.display()))?;
            c.mounts.push(d.clone());
            Ok(d)
        };
        put(Some("proc"), "proc", Some("proc"), MsFlags::empty())?;
        put(Some("/sys"), "sys", None, MsFlags::MS_BIND)?;
        put(Some("run"), "run", Some("tmpfs"), MsFlags::empty())?;
        let dev = put(Some("dev"), "dev", Some("tmpfs"), MsFlags::empty())?;
        for n in ["null", "zero", "full", "random", "urandom", "tty"] {
            copy_node(&Path::new("/dev").join(n), &dev.join(n))?;
        }
        let by_uuid = dev.join("disk/by-uuid");
        std::fs::create_dir_all(&by_uuid).map_err(|e| format!("{}: {e}", by_uuid.display()))?;
        let mut nodes: Vec<PathBuf> = staged.disks.clone();
        nodes.extend(staged.made.iter().map(|m| m.node.clone()));
        for d in &staged.disks {
            for p in 1..=128u32 {
                let n = super::disk::part_node(d, p);
                if n.exists() && !nodes.contains(&n) {
                    nodes.push(n);
                }
            }
        }
        for n in &nodes {
            let rel = n
                .strip_prefix("/dev")
                .map_err(|_| format!("{} is not under /dev", n.display()))?;
            let dst = dev.join(rel);
            if let Some(p) = dst.parent() {
                std::fs::create_dir_all(p).map_err(|e| format!("{}: {e}", p.display()))?;
            }
            copy_node(n, &dst)?;
        }
        for m in &staged.made {
            let rel = m.node.strip_prefix("/dev").unwrap_or(&m.node);
            let _ = std::os::unix::fs::symlink(Path::new("../..").join(rel), by_uuid.join(&m.uuid));
        }
        Ok(c)
    }
}

fn in_root(root: &Path, rel: &str) -> PathBuf {
    root.join(rel.trim_start_matches('/'))
}

fn exists_in(root: &Path, rels: &[&'static str]) -> Option<&'static str> {
    rels.iter().copied().find(|r| in_root(root, r).exists())
}

fn chroot(root: &Path, args: &[&str]) -> Result<String, String> {
    let mut a: Vec<&str> = vec![root.to_str().unwrap_or("/nonexistent")];
    a.extend_from_slice(args);
    run("chroot", &a, None)
}

/// Runs every post-copy step; the first failure ends it with its SMS code.
pub(super) fn run_all(
    staged: &Staged,
    root: &Path,
    opts: &PrepareOptions,
) -> Result<(), PrepareError> {
    let have: Vec<Have> = staged
        .made
        .iter()
        .map(|m: &Made| Have {
            uuid: m.uuid.clone(),
            source_uuid: m.fs.uuid.clone(),
            label: m.fs.label.clone(),
            mount: m.fs.mount.clone(),
            swap: m.fs.fs_type == "swap",
        })
        .collect();
    fstab(root, &have)?;
    if opts.clear_machine_id {
        let p = in_root(root, "etc/machine-id");
        // Empty, not removed: systemd then makes a new id at first boot and keeps it.
        std::fs::write(&p, b"")
            .map_err(|e| cfg_err(Code::TargetFileWriteFailed, format!("{}: {e}", p.display())))?;
        tracing::info!("machine-id cleared");
    }
    let _env = Chroot::enter(root, staged).map_err(|e| {
        cfg_err(
            Code::TargetConfigFailed,
            format!("cannot set up the chroot of {}: {e}", root.display()),
        )
    })?;
    initramfs(root)?;
    grub(root, staged)?;
    nix::unistd::sync();
    Ok(())
}

fn fstab(root: &Path, have: &[Have]) -> Result<(), PrepareError> {
    let p = in_root(root, "etc/fstab");
    match std::fs::read_to_string(&p) {
        Ok(text) => match check_fstab(&text, have) {
            Ok(None) => tracing::info!("fstab: every record names a filesystem the target has"),
            Ok(Some(new)) => {
                let bak = in_root(root, "etc/fstab.sms-agent.orig");
                std::fs::write(&bak, &text).map_err(|e| cfg_err(Code::TargetFileCreateFailed, format!("{}: {e}", bak.display())))?;
                crate::durable::write_atomic(&p, new.as_bytes(), 0o644)
                    .map_err(|e| cfg_err(Code::TargetFileWriteFailed, format!("{}: {e}", p.display())))?;
                tracing::info!(original = %bak.display(), "fstab: UUIDs rewritten for the target's filesystems");
            }
            Err(rec) => {
                return Err(cfg_err(
                    Code::FstabInvalid,
                    format!("fstab record \"{rec}\" is invalid: /etc/fstab names a filesystem the target does not have"),
                ))
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => tracing::warn!("the migrated system has no /etc/fstab"),
        Err(e) => return Err(cfg_err(Code::TargetConfigFailed, format!("{}: {e}", p.display()))),
    }
    let c = in_root(root, "etc/crypttab");
    if let Ok(text) = std::fs::read_to_string(&c) {
        check_crypttab(&text, have).map_err(|rec| {
            cfg_err(Code::TargetConfigFailed, format!("/etc/crypttab record \"{rec}\" names a device the target does not have (--prepare creates no encrypted volumes)"))
        })?;
    }
    Ok(())
}

fn initramfs(root: &Path) -> Result<(), PrepareError> {
    let r = if exists_in(
        root,
        &["usr/sbin/update-initramfs", "sbin/update-initramfs"],
    )
    .is_some()
    {
        chroot(root, &["update-initramfs", "-u", "-k", "all"])
    } else if exists_in(root, &["usr/bin/dracut", "usr/sbin/dracut", "sbin/dracut"]).is_some() {
        chroot(root, &["dracut", "-f", "--regenerate-all"])
    } else {
        return Err(cfg_err(
            Code::InitrdFailed,
            "the migrated system has neither update-initramfs nor dracut".into(),
        ));
    };
    r.map_err(|e| cfg_err(Code::InitrdFailed, e))?;
    tracing::info!("initramfs regenerated");
    Ok(())
}

fn grub(root: &Path, staged: &Staged) -> Result<(), PrepareError> {
    let (install, mkconfig, cfg) =
        if exists_in(root, &["usr/sbin/grub-install", "sbin/grub-install"]).is_some() {
            ("grub-install", "grub-mkconfig", "/boot/grub/grub.cfg")
        } else if exists_in(root, &["usr/sbin/grub2-install", "sbin/grub2-install"]).is_some() {
            ("grub2-install", "grub2-mkconfig", "/boot/grub2/grub.cfg")
        } else {
            return Err(cfg_err(
                Code::BootloaderFailed,
                "the migrated system has no GRUB 2 (grub-install or grub2-install)".into(),
            ));
        };
    // BIOS only: GRUB's i386-pc modules must be there and, on a GPT disk, a BIOS boot
    // partition to embed its core image into. UEFI is not configured: this project's test
    // machine cannot mount an EFI system partition (no vfat in its kernel), so an EFI
    // install could not be tested; a UEFI-only source fails here rather than being reported
    // bootable.
    let disk_of = |mount: &str| {
        staged
            .layout
            .disks
            .iter()
            .zip(&staged.disks)
            .find(|(d, _)| {
                d.parts
                    .iter()
                    .filter_map(|p| p.fs.as_ref())
                    .chain(d.whole.iter())
                    .any(|f| f.mount == mount)
            })
    };
    // The disk holding /boot, else the one holding /.
    let (boot_disk, dev) = disk_of("/boot").or_else(|| disk_of("/")).ok_or_else(|| {
        cfg_err(
            Code::BootloaderFailed,
            "no target disk holds /boot or /".into(),
        )
    })?;
    if exists_in(root, &["usr/lib/grub/i386-pc"]).is_none() {
        return Err(cfg_err(
            Code::BootloaderFailed,
            "the migrated system has no /usr/lib/grub/i386-pc (install grub-pc / grub2-pc on the source and sync again; UEFI-only systems are not configured)".into(),
        ));
    }
    if boot_disk.table == Table::Gpt
        && !boot_disk
            .parts
            .iter()
            .any(|p| p.type_id.eq_ignore_ascii_case(BIOS_BOOT))
    {
        return Err(cfg_err(
            Code::BootloaderFailed,
            format!("GPT disk {} has no BIOS boot partition for GRUB (UEFI-only systems are not configured)", dev.display()),
        ));
    }
    let disk = dev.to_string_lossy().into_owned();
    chroot(root, &[install, "--target=i386-pc", &disk])
        .map_err(|e| cfg_err(Code::BootloaderFailed, e))?;
    tracing::info!(disk = %disk, "GRUB installed for BIOS");
    chroot(root, &[mkconfig, "-o", cfg]).map_err(|e| cfg_err(Code::TargetConfigFailed, e))?;
    // grub-mkconfig falls back to the device path when it cannot name the root by UUID; that
    // path is the staging host's and does not exist when the target boots.
    let text = std::fs::read_to_string(in_root(root, cfg))
        .map_err(|e| cfg_err(Code::TargetConfigFailed, format!("{cfg}: {e}")))?;
    if let Some(l) = text
        .lines()
        .find(|l| l.contains("root=/dev/") && !l.contains("root=/dev/mapper/"))
    {
        return Err(cfg_err(
            Code::TargetConfigFailed,
            format!(
                "{cfg} names the root by a device path of this host: {}",
                l.trim()
            ),
        ));
    }
    tracing::info!(config = cfg, "GRUB configuration regenerated");
    Ok(())
}
