//! The few syscalls the file engine needs that have no safe wrapper in nix 0.29: `openat`
//! returning an owned descriptor, and the xattr calls (on a descriptor, or on a path whose last
//! component is not followed).
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::libc;
use nix::sys::stat::Mode;

/// Opens `name` relative to `dir` (one component or a relative path; the caller decides the
/// flags, `O_CLOEXEC` is always added).
pub fn openat(dir: BorrowedFd<'_>, name: &[u8], flags: OFlag, mode: u32) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        OsStr::from_bytes(name),
        flags | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )?;
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a path the operator gave (the root directories; may follow symlinks).
pub fn open(path: &Path, flags: OFlag) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::open(path, flags | OFlag::O_CLOEXEC, Mode::empty())?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `/proc/self/fd/N`: names exactly the object of descriptor N (used to reach a directory
/// opened with `O_PATH`, or a node that must not be opened for I/O).
pub fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// `/proc/self/fd/N/name`: the entry `name` of directory N. With the `l*` calls the final
/// component is not followed, so this path reaches the entry itself even when it is a symlink.
pub fn child_path(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<CString> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    CString::new(p).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// The names in directory `dir` (without `.` and `..`).
pub fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(fd_path(dir))? {
        names.push(e?.file_name().as_bytes().to_vec());
    }
    Ok(names)
}

/// `cachestat` (Linux 6.5), the same number on every architecture (the generic table).
const SYS_CACHESTAT: libc::c_long = 451;

/// `struct cachestat_range`.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` (only the kernel writes the fields past the first).
#[repr(C)]
#[derive(Default)]
#[allow(dead_code)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// How many pages of `f` are in the page cache; `None` when the kernel cannot tell.
pub fn cached(f: BorrowedFd<'_>) -> Option<u64> {
    // len 0: to the end of the file.
    let range = CachestatRange { off: 0, len: 0 };
    let mut cs = Cachestat::default();
    // SAFETY: both pointers are to live, correctly laid out structs for the duration of the
    // call; the kernel writes only `cs`.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const CachestatRange,
            &mut cs as *mut Cachestat,
            0u32,
        )
    };
    (r == 0).then_some(cs.nr_cache)
}

/// What an xattr call acts on.
#[derive(Clone, Copy)]
pub enum Node<'a> {
    /// An open descriptor (regular files, directories).
    Fd(BorrowedFd<'a>),
    /// A path whose last component is not followed (symlinks and other nodes).
    Path(&'a CStr),
    /// A path that is followed (a `/proc/self/fd/N` of an `O_PATH` descriptor).
    Follow(&'a CStr),
    /// The entry `name` (one component, not followed) of directory `dir`: `listxattrat` and
    /// `getxattrat` (Linux 6.13) where the kernel has them, which spares the lookup of a
    /// `/proc/self/fd/N/name` path (a tenth of a sync's CPU on each side); that path otherwise.
    At(BorrowedFd<'a>, &'a CStr),
}

/// `listxattrat` and `getxattrat`, the same numbers on every architecture (the generic table).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const SYS_XATTRAT: Option<(libc::c_long, libc::c_long)> = Some((465, 464));
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const SYS_XATTRAT: Option<(libc::c_long, libc::c_long)> = None;

/// Set once the kernel said `ENOSYS` to the `*xattrat` calls.
static NO_XATTRAT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `struct xattr_args` of `getxattrat`.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// Runs an `*xattrat` call, or `None` when the kernel has none (then the caller falls back).
fn xattrat(call: impl FnOnce(libc::c_long, libc::c_long) -> libc::c_long) -> Option<isize> {
    use std::sync::atomic::Ordering;
    let (list, get) = SYS_XATTRAT?;
    if NO_XATTRAT.load(Ordering::Relaxed) {
        return None;
    }
    let r = call(list, get);
    if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        NO_XATTRAT.store(true, Ordering::Relaxed);
        return None;
    }
    Some(isize::try_from(r).unwrap_or(-1))
}

/// The `/proc/self/fd/N/name` path of an [`Node::At`], for the calls without an `*at` form.
fn at_path(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<CString> {
    child_path(dir, name.to_bytes())
}

fn check(r: isize) -> io::Result<usize> {
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

fn list_raw(n: Node<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let (p, len) = (buf.as_mut_ptr().cast::<libc::c_char>(), buf.len());
    let r = match n {
        // SAFETY: the buffer pointer and length describe `buf`; the fd is open.
        Node::Fd(fd) => unsafe { libc::flistxattr(fd.as_raw_fd(), p, len) },
        // SAFETY: as above; the path is NUL-terminated.
        Node::Path(c) => unsafe { libc::llistxattr(c.as_ptr(), p, len) },
        // SAFETY: as above.
        Node::Follow(c) => unsafe { libc::listxattr(c.as_ptr(), p, len) },
        Node::At(dir, name) => {
            // SAFETY: dir is open, name NUL-terminated, the buffer pointer and length
            // describe `buf`; the kernel reads and writes nothing else.
            let at = xattrat(|list, _| unsafe {
                libc::syscall(
                    list,
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
                    p,
                    len,
                )
            });
            match at {
                Some(r) => r,
                None => return list_raw(Node::Path(&at_path(dir, name)?), buf),
            }
        }
    };
    check(r)
}

fn get_raw(n: Node<'_>, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    let (p, len) = (buf.as_mut_ptr().cast::<libc::c_void>(), buf.len());
    let r = match n {
        // SAFETY: the buffer pointer and length describe `buf`; name is NUL-terminated.
        Node::Fd(fd) => unsafe { libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), p, len) },
        // SAFETY: as above; the path is NUL-terminated.
        Node::Path(c) => unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), p, len) },
        // SAFETY: as above.
        Node::Follow(c) => unsafe { libc::getxattr(c.as_ptr(), name.as_ptr(), p, len) },
        Node::At(dir, entry) => {
            let mut args = XattrArgs {
                value: p as u64,
                size: u32::try_from(len).unwrap_or(u32::MAX),
                flags: 0,
            };
            // SAFETY: dir is open, both strings NUL-terminated, `args` describes `buf` and
            // its own size is passed; the kernel reads and writes nothing else.
            let at = xattrat(|_, get| unsafe {
                libc::syscall(
                    get,
                    dir.as_raw_fd(),
                    entry.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
                    name.as_ptr(),
                    std::ptr::addr_of_mut!(args),
                    std::mem::size_of::<XattrArgs>(),
                )
            });
            match at {
                Some(r) => r,
                None => return get_raw(Node::Path(&at_path(dir, entry)?), name, buf),
            }
        }
    };
    check(r)
}

/// Runs a size-query-then-fill call, growing the buffer if the value grew in between.
fn sized(mut f: impl FnMut(&mut [u8]) -> io::Result<usize>) -> io::Result<Vec<u8>> {
    // Most lists and values fit a small buffer: one syscall instead of a size query first
    // (a sync of many files makes this two syscalls per file on each side otherwise).
    let mut buf = vec![0u8; 512];
    match f(&mut buf) {
        Ok(m) => {
            buf.truncate(m);
            return Ok(buf);
        }
        Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {}
        Err(e) => return Err(e),
    }
    for _ in 0..4 {
        let n = f(&mut [])?;
        let mut buf = vec![0u8; n];
        match f(&mut buf) {
            Ok(m) => {
                buf.truncate(m);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::from_raw_os_error(libc::ERANGE))
}

/// The xattr names of a node (empty where the filesystem has none).
pub fn xattr_list(n: Node<'_>) -> io::Result<Vec<Vec<u8>>> {
    match sized(|b| list_raw(n, b)) {
        Ok(buf) => Ok(buf
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(<[u8]>::to_vec)
            .collect()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// One xattr value.
pub fn xattr_get(n: Node<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    sized(|b| get_raw(n, name, b))
}

/// Sets an xattr.
pub fn xattr_set(n: Node<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
    let (p, len) = (value.as_ptr().cast::<libc::c_void>(), value.len());
    let r = match n {
        // SAFETY: pointer and length describe `value`; name is NUL-terminated.
        Node::Fd(fd) => unsafe { libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), p, len, 0) },
        // SAFETY: as above; the path is NUL-terminated.
        Node::Path(c) => unsafe { libc::lsetxattr(c.as_ptr(), name.as_ptr(), p, len, 0) },
        // SAFETY: as above.
        Node::Follow(c) => unsafe { libc::setxattr(c.as_ptr(), name.as_ptr(), p, len, 0) },
        Node::At(dir, entry) => return xattr_set(Node::Path(&at_path(dir, entry)?), name, value),
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes an xattr.
pub fn xattr_remove(n: Node<'_>, name: &CStr) -> io::Result<()> {
    let r = match n {
        // SAFETY: name is NUL-terminated; the fd is open.
        Node::Fd(fd) => unsafe { libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()) },
        // SAFETY: both strings are NUL-terminated.
        Node::Path(c) => unsafe { libc::lremovexattr(c.as_ptr(), name.as_ptr()) },
        // SAFETY: both strings are NUL-terminated.
        Node::Follow(c) => unsafe { libc::removexattr(c.as_ptr(), name.as_ptr()) },
        Node::At(dir, entry) => return xattr_remove(Node::Path(&at_path(dir, entry)?), name),
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn xattrs_at_an_entry_match_its_path_and_never_follow_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        std::os::unix::fs::symlink("f", t.path().join("link")).unwrap();
        let cf = CString::new(f.as_os_str().as_bytes()).unwrap();
        let name = CString::new("user.k").unwrap();
        xattr_set(Node::Path(&cf), &name, b"v1").unwrap();
        let dir = open(t.path(), OFlag::O_RDONLY | OFlag::O_DIRECTORY).unwrap();
        let fname = CString::new("f").unwrap();
        let at = Node::At(dir.as_fd(), &fname);
        assert_eq!(
            xattr_list(at).unwrap(),
            xattr_list(Node::Path(&cf)).unwrap()
        );
        assert!(xattr_list(at).unwrap().contains(&b"user.k".to_vec()));
        assert_eq!(xattr_get(at, &name).unwrap(), b"v1");
        // Set and remove go through the entry's /proc path.
        xattr_set(at, &name, b"v2").unwrap();
        assert_eq!(xattr_get(Node::Path(&cf), &name).unwrap(), b"v2");
        let link = CString::new("link").unwrap();
        let l = Node::At(dir.as_fd(), &link);
        assert!(!xattr_list(l).unwrap().contains(&b"user.k".to_vec()));
        assert!(xattr_get(l, &name).is_err());
        xattr_remove(at, &name).unwrap();
        assert!(xattr_get(at, &name).is_err());
        let gone = CString::new("gone").unwrap();
        assert!(xattr_list(Node::At(dir.as_fd(), &gone)).is_err());
    }
}
