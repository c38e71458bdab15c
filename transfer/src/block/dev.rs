//! The ioctls a block pass makes on the source: a device's buffer-cache flush, and the
//! freeze and thaw of a mounted filesystem for a crash-consistent final pass.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;

nix::ioctl_none!(
    /// BLKFLSBUF = `_IO(0x12, 97)`: write back and invalidate a block device's buffer cache.
    blkflsbuf,
    0x12,
    97
);
nix::ioctl_readwrite!(
    /// FIFREEZE = `_IOWR('X', 119, int)`; the argument is unused.
    fifreeze,
    b'X',
    119,
    nix::libc::c_int
);
nix::ioctl_readwrite!(
    /// FITHAW = `_IOWR('X', 120, int)`; the argument is unused.
    fithaw,
    b'X',
    120,
    nix::libc::c_int
);

nix::ioctl_read!(
    /// FS_IOC_GETVERSION = `_IOR('v', 1, long)`: the inode's generation number.
    fs_ioc_getversion,
    b'v',
    1,
    nix::libc::c_long
);

/// The inode generation of a file, where its filesystem keeps one (ext4, Btrfs): a file
/// deleted and created again may get the same inode number, but not the same generation.
pub fn generation(file: &File) -> Option<i64> {
    let mut v: nix::libc::c_long = 0;
    // SAFETY: the fd is open for the call's duration and `v` is a valid c_long to write.
    unsafe { fs_ioc_getversion(file.as_raw_fd(), &mut v) }
        .ok()
        .map(i64::from)
}

/// Invalidates the whole cache of a block device at the start of a pass, so that no page
/// read before a filesystem wrote through one of its partitions is reused (files, whose
/// cache is coherent, need none). False when a device's cache could not be invalidated.
pub fn flush_cache(file: &File) -> bool {
    let is_block = file
        .metadata()
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if !is_block {
        return true;
    }
    // SAFETY: BLKFLSBUF takes no argument; the fd is open for the call's duration.
    match unsafe { blkflsbuf(file.as_raw_fd()) } {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "BLKFLSBUF failed; dropping cached pages chunk by chunk");
            false
        }
    }
}

/// Freezes the filesystem that `dir` (opened on its mount point) belongs to: writes block and
/// everything dirty is on the device when this returns.
pub fn freeze(dir: &File) -> std::io::Result<()> {
    let mut arg: nix::libc::c_int = 0;
    // SAFETY: the fd is open; the kernel ignores the int the pointer refers to.
    unsafe { fifreeze(dir.as_raw_fd(), &mut arg) }
        .map(|_| ())
        .map_err(std::io::Error::from)
}

/// Thaws a filesystem frozen with [`freeze`]; thawing one that is not frozen is an error
/// (EINVAL) that callers may ignore.
pub fn thaw(dir: &File) -> std::io::Result<()> {
    let mut arg: nix::libc::c_int = 0;
    // SAFETY: as for freeze.
    unsafe { fithaw(dir.as_raw_fd(), &mut arg) }
        .map(|_| ())
        .map_err(std::io::Error::from)
}
