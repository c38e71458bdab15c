//! Metadata: captured from the source's `lstat` and xattrs, applied on the target through a
//! descriptor (regular files, directories, `O_PATH` nodes) or a non-following path (symlinks),
//! in the order that keeps every bit: owner, then xattrs (a chown clears file capabilities),
//! then mode (setuid/setgid survive, the ACL mask stays as the source had it), then times.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;

use nix::sys::stat::{FileStat, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;

use super::proto::{Meta, Time, MAX_NAME, MAX_XATTRS, MAX_XATTR_TOTAL, MAX_XATTR_VALUE};
use super::sys::{self, Node};

/// Metadata of a stat result (xattrs empty).
pub fn from_stat(st: &FileStat) -> Meta {
    Meta {
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        size: u64::try_from(st.st_size).unwrap_or(0),
        rdev: st.st_rdev,
        atime: Time {
            sec: st.st_atime,
            nsec: u32::try_from(st.st_atime_nsec).unwrap_or(0),
        },
        mtime: Time {
            sec: st.st_mtime,
            nsec: u32::try_from(st.st_mtime_nsec).unwrap_or(0),
        },
        xattrs: Vec::new(),
    }
}

/// The (mtime, ctime, size) triple that tells whether a file changed.
pub fn change_key(st: &FileStat) -> (i64, i64, i64, i64, i64) {
    (
        st.st_size,
        st.st_mtime,
        st.st_mtime_nsec,
        st.st_ctime,
        st.st_ctime_nsec,
    )
}

/// (name, value) pairs.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// The xattrs of a node, sorted by name. Attributes over the wire limits are skipped and
/// reported in the returned count (the entry itself is still migrated).
pub fn read_xattrs(n: Node<'_>) -> io::Result<(Xattrs, usize)> {
    let mut names = sys::xattr_list(n)?;
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    let (mut total, mut skipped) = (0usize, 0usize);
    for name in names {
        let Ok(c) = CString::new(name.clone()) else {
            continue;
        };
        let value = match sys::xattr_get(n, &c) {
            Ok(v) => v,
            // Removed meanwhile.
            Err(e) if e.raw_os_error() == Some(nix::libc::ENODATA) => continue,
            Err(e) => return Err(e),
        };
        if name.len() > MAX_NAME
            || value.len() > MAX_XATTR_VALUE
            || out.len() >= MAX_XATTRS
            || total + name.len() + value.len() > MAX_XATTR_TOTAL
        {
            skipped += 1;
            continue;
        }
        total += name.len() + value.len();
        out.push((name, value));
    }
    Ok((out, skipped))
}

/// Makes the node's xattrs exactly `want`: removes the others (an inherited default ACL, a
/// stale label), sets those that differ. Returns how many could not be set (a kernel without
/// SELinux may refuse `security.selinux`); other errors are returned.
pub fn sync_xattrs(n: Node<'_>, want: &[(Vec<u8>, Vec<u8>)]) -> io::Result<usize> {
    let mut failed = 0;
    let have = sys::xattr_list(n)?;
    for name in &have {
        if want.iter().any(|(w, _)| w == name) {
            continue;
        }
        let Ok(c) = CString::new(name.clone()) else {
            continue;
        };
        if let Err(e) = sys::xattr_remove(n, &c) {
            tracing::debug!(error = %e, name = %String::from_utf8_lossy(name), "xattr not removed");
            failed += 1;
        }
    }
    for (name, value) in want {
        let Ok(c) = CString::new(name.clone()) else {
            failed += 1;
            continue;
        };
        if have.contains(name) && sys::xattr_get(n, &c).is_ok_and(|v| &v == value) {
            continue;
        }
        if let Err(e) = sys::xattr_set(n, &c, value) {
            tracing::warn!(error = %e, name = %String::from_utf8_lossy(name), "xattr not set");
            failed += 1;
        }
    }
    Ok(failed)
}

fn ts(t: Time) -> TimeSpec {
    TimeSpec::new(t.sec, i64::from(t.nsec))
}

/// Applies owner, xattrs, mode and (with `times`) atime/mtime through an open descriptor of a
/// regular file or directory. Returns the count of xattrs that could not be set.
pub fn apply_fd(fd: BorrowedFd<'_>, m: &Meta, times: bool) -> io::Result<usize> {
    std::os::unix::fs::fchown(fd, Some(m.uid), Some(m.gid))?;
    let failed = sync_xattrs(Node::Fd(fd), &m.xattrs)?;
    nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(m.perm()))?;
    if times {
        nix::sys::stat::futimens(fd.as_raw_fd(), &ts(m.atime), &ts(m.mtime))?;
    }
    Ok(failed)
}

/// Applies metadata to a symlink `name` in `dir` without following it (symlinks have no mode
/// of their own on Linux).
pub fn apply_symlink(dir: BorrowedFd<'_>, name: &[u8], m: &Meta) -> io::Result<usize> {
    let p = sys::child_path(dir, name)?;
    let path = std::path::Path::new(OsStr::from_bytes(p.as_bytes()));
    std::os::unix::fs::lchown(path, Some(m.uid), Some(m.gid))?;
    let failed = sync_xattrs(Node::Path(&p), &m.xattrs)?;
    set_times_at(dir, name, m.atime, m.mtime)?;
    Ok(failed)
}

/// Applies metadata to a device node, FIFO or socket reached through an `O_PATH` descriptor
/// (never opened for I/O; the descriptor pins the very node that was checked).
pub fn apply_node(fd: BorrowedFd<'_>, m: &Meta) -> io::Result<usize> {
    let p = sys::fd_path(fd.as_fd());
    std::os::unix::fs::chown(&p, Some(m.uid), Some(m.gid))?;
    let c = CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let failed = sync_xattrs(Node::Follow(&c), &m.xattrs)?;
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(m.perm()))?;
    nix::sys::stat::utimensat(
        None,
        &p,
        &ts(m.atime),
        &ts(m.mtime),
        UtimensatFlags::FollowSymlink,
    )?;
    Ok(failed)
}

/// Sets the times of `name` in `dir`, never following a symlink.
pub fn set_times_at(dir: BorrowedFd<'_>, name: &[u8], atime: Time, mtime: Time) -> io::Result<()> {
    nix::sys::stat::utimensat(
        Some(dir.as_raw_fd()),
        OsStr::from_bytes(name),
        &ts(atime),
        &ts(mtime),
        UtimensatFlags::NoFollowSymlink,
    )?;
    Ok(())
}

/// Sets a directory's times (the final phase, after its contents stopped changing).
pub fn set_times(fd: BorrowedFd<'_>, atime: Time, mtime: Time) -> io::Result<()> {
    nix::sys::stat::futimens(fd.as_raw_fd(), &ts(atime), &ts(mtime))?;
    Ok(())
}
