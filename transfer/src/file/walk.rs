//! The source-side walk: each root is walked depth-first without crossing into another mount,
//! through directory descriptors (`openat`, never a long absolute path), skipping excluded
//! paths; every directory's children are listed together and followed by its `DirEnd`, so the
//! target can delete what the listing did not name. Later names of a multiply-linked inode
//! become links to its first name.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::FileStat;

use super::journal::RootChanges;
use super::meta;
use super::path::{join, Excludes};
use super::proto::{Meta, MAX_PATH, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use super::sys::{self, Node};
use super::FileError;

/// A directory tree to migrate and where it goes on the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    /// Source directory (a mount point, or any directory for a check).
    pub src: PathBuf,
    /// Its path relative to the target root (empty: the target root itself).
    pub rel: Vec<u8>,
    /// Whether to list the source's parent directories of `rel` first (so the target has them).
    pub ancestors: bool,
}

/// One thing the walk found.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Item<'a> {
    /// An entry with its metadata.
    Entry {
        /// Index of the root it belongs to.
        root: usize,
        /// Path relative to the source root.
        src_rel: &'a [u8],
        /// Path relative to the target root.
        rel: &'a [u8],
        /// Metadata (xattrs included).
        meta: Meta,
        /// Symlink target.
        target: Vec<u8>,
        /// First name of an inode with more names.
        linked: bool,
        /// Content hash (hash mode, regular files).
        hash: Option<[u8; 32]>,
        /// (size, mtime, ctime) when listed, to detect a change while it is read.
        key: (i64, i64, i64, i64, i64),
        /// Device and inode, to check the file read is the one listed.
        ino: (u64, u64),
    },
    /// Another name of an inode listed earlier.
    Link {
        /// This name (target-relative).
        rel: &'a [u8],
        /// The first name (target-relative).
        target: &'a [u8],
    },
    /// A changed name that no longer exists (journal pass): the target deletes it.
    Gone {
        /// The name (target-relative).
        rel: &'a [u8],
    },
    /// A directory's listing is complete.
    DirEnd {
        /// The directory (target-relative).
        rel: &'a [u8],
    },
}

/// How to walk.
pub struct WalkOptions<'a> {
    /// Excluded target-relative paths.
    pub excludes: &'a Excludes,
    /// Hash every regular file (hash mode).
    pub hash: bool,
    /// List later hard-link names as plain entries (consistency check).
    pub links_as_entries: bool,
    /// Stop early (the listing then ends without the `DirEnd`s not reached).
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
}

/// Walks roots, feeding a sink.
pub struct Walker<'a, F> {
    opts: WalkOptions<'a>,
    sink: F,
    links: HashMap<(u64, u64), Vec<u8>>,
    /// Things the operator should hear about (unreadable entries, skipped xattrs).
    pub notes: Vec<String>,
    /// Entries listed.
    pub entries: u64,
}

fn dev_ino(st: &FileStat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

impl<'a, F> Walker<'a, F>
where
    F: FnMut(Item<'_>) -> Result<(), FileError>,
{
    /// A walker feeding `sink`.
    pub fn new(opts: WalkOptions<'a>, sink: F) -> Self {
        Self {
            opts,
            sink,
            links: HashMap::new(),
            notes: Vec::new(),
            entries: 0,
        }
    }

    fn note(&mut self, s: String) {
        tracing::warn!("{s}");
        if self.notes.len() < 1000 {
            self.notes.push(s);
        }
    }

    /// Walks root `index`.
    pub fn walk(&mut self, index: usize, root: &Root) -> Result<(), FileError> {
        let src_err = |e: std::io::Error| FileError::Source {
            path: root.src.display().to_string(),
            source: e,
        };
        let fd = sys::open(&root.src, OFlag::O_RDONLY | OFlag::O_DIRECTORY).map_err(src_err)?;
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| src_err(e.into()))?;
        if root.ancestors && !root.rel.is_empty() {
            self.ancestors(index, root)?;
        }
        let mut m = meta::from_stat(&st);
        m.xattrs = self.xattrs(Node::Fd(fd.as_fd()), &root.src.display().to_string());
        self.emit_entry(index, b"", &root.rel, m, Vec::new(), false, None, &st)?;
        self.dir(index, &fd, st.st_dev, b"", &root.rel)
    }

    /// Lists the source's directories above a root that maps below the target root.
    fn ancestors(&mut self, index: usize, root: &Root) -> Result<(), FileError> {
        let comps: Vec<&[u8]> = root.rel.split(|&b| b == b'/').collect();
        let mut src = root.src.clone();
        let mut chain = Vec::new();
        for i in (1..comps.len()).rev() {
            if !src.pop() {
                break;
            }
            chain.push((comps[..i].join(&b'/'), src.clone()));
        }
        for (rel, src) in chain.into_iter().rev() {
            let fd = match sys::open(&src, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
                Ok(fd) => fd,
                Err(e) => {
                    self.note(format!("cannot open {}: {e}", src.display()));
                    continue;
                }
            };
            let Ok(st) = nix::sys::stat::fstat(fd.as_raw_fd()) else {
                continue;
            };
            let mut m = meta::from_stat(&st);
            m.xattrs = self.xattrs(Node::Fd(fd.as_fd()), &src.display().to_string());
            self.emit_entry(index, b"", &rel, m, Vec::new(), false, None, &st)?;
        }
        Ok(())
    }

    fn xattrs(&mut self, n: Node<'_>, what: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        match meta::read_xattrs(n) {
            Ok((x, 0)) => x,
            Ok((x, skipped)) => {
                self.note(format!(
                    "{what}: {skipped} xattrs over the size limits not migrated"
                ));
                x
            }
            Err(e) => {
                self.note(format!("{what}: cannot read xattrs: {e}"));
                Vec::new()
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn emit_entry(
        &mut self,
        root: usize,
        src_rel: &[u8],
        rel: &[u8],
        meta: Meta,
        target: Vec<u8>,
        linked: bool,
        hash: Option<[u8; 32]>,
        st: &FileStat,
    ) -> Result<(), FileError> {
        self.entries += 1;
        (self.sink)(Item::Entry {
            root,
            src_rel,
            rel,
            meta,
            target,
            linked,
            hash,
            key: meta::change_key(st),
            ino: dev_ino(st),
        })
    }

    fn dir(
        &mut self,
        root: usize,
        fd: &OwnedFd,
        dev: u64,
        src_rel: &[u8],
        rel: &[u8],
    ) -> Result<(), FileError> {
        let mut names = match sys::list_dir(fd.as_fd()) {
            Ok(n) => n,
            Err(e) => {
                // Without a complete listing there is no DirEnd: nothing gets deleted.
                self.note(format!("cannot list {}: {e}", String::from_utf8_lossy(rel)));
                return Ok(());
            }
        };
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            if (self.opts.cancelled)() {
                return Ok(());
            }
            if let Some(sub) = self.child(root, fd, dev, src_rel, rel, &name, false)? {
                subdirs.push((name, sub));
            }
        }
        self.entries += 1;
        (self.sink)(Item::DirEnd { rel })?;
        for (name, id) in subdirs {
            if (self.opts.cancelled)() {
                return Ok(());
            }
            let sub = match sys::openat(
                fd.as_fd(),
                &name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                0,
            ) {
                Ok(s) => s,
                Err(e) => {
                    self.note(format!(
                        "cannot open {}: {e}",
                        String::from_utf8_lossy(&join(rel, &name))
                    ));
                    continue;
                }
            };
            // The directory listed must be the one descended into (no swap in between).
            match nix::sys::stat::fstat(sub.as_raw_fd()) {
                Ok(st) if dev_ino(&st) == id => {}
                _ => continue,
            }
            self.dir(root, &sub, dev, &join(src_rel, &name), &join(rel, &name))?;
        }
        Ok(())
    }

    /// Walks only what changed below root `index` since the last pass (a journal pass): each
    /// changed directory's own entry, its changed names (a name that no longer exists as
    /// [`Item::Gone`]), and whole every directory created or moved in. Directories are taken
    /// parents first, so a new directory exists on the target before anything below it.
    pub fn walk_changes(
        &mut self,
        index: usize,
        root: &Root,
        changes: &RootChanges,
    ) -> Result<(), FileError> {
        let src_err = |e: std::io::Error| FileError::Source {
            path: root.src.display().to_string(),
            source: e,
        };
        let rfd = sys::open(&root.src, OFlag::O_RDONLY | OFlag::O_DIRECTORY).map_err(src_err)?;
        let rst = nix::sys::stat::fstat(rfd.as_raw_fd()).map_err(|e| src_err(e.into()))?;
        let dev = rst.st_dev;
        // An event names one name of an inode; the journal sends a pass with several names of
        // a changed file to the full walk, so any met here changed after it looked.
        let links_as_entries = std::mem::replace(&mut self.opts.links_as_entries, true);
        // Directories walked whole: nothing below them is visited again.
        let mut whole: Vec<Vec<u8>> = Vec::new();
        let below = |whole: &[Vec<u8>], p: &[u8]| {
            whole.iter().any(|w| {
                w.is_empty()
                    || (p.starts_with(w) && p.get(w.len()) == Some(&b'/'))
                    || p == w.as_slice()
            })
        };
        let mut res = Ok(());
        for (dir_src, ch) in &changes.dirs {
            if (self.opts.cancelled)() {
                break;
            }
            if below(&whole, dir_src) {
                continue;
            }
            let rel = join(&root.rel, dir_src);
            if !dir_src.is_empty() && self.opts.excludes.matches(&rel) {
                continue;
            }
            // Gone since the take (its removal is an event for the next pass) or replaced.
            let Ok(dfd) = super::journal::open_rel(rfd.as_fd(), dev, dir_src) else {
                continue;
            };
            let Ok(st) = nix::sys::stat::fstat(dfd.as_raw_fd()) else {
                continue;
            };
            let mut m = meta::from_stat(&st);
            m.xattrs = self.xattrs(Node::Fd(dfd.as_fd()), &String::from_utf8_lossy(&rel));
            let src_rel = dir_src.as_slice();
            if let Err(e) = self.emit_entry(index, src_rel, &rel, m, Vec::new(), false, None, &st) {
                res = Err(e);
                break;
            }
            if ch.all {
                whole.push(dir_src.clone());
                if let Err(e) = self.dir(index, &dfd, dev, src_rel, &rel) {
                    res = Err(e);
                    break;
                }
                continue;
            }
            for (name, fresh) in &ch.names {
                if (self.opts.cancelled)() {
                    break;
                }
                let sub = match self.child(index, &dfd, dev, src_rel, &rel, name, true) {
                    Ok(s) => s,
                    Err(e) => {
                        res = Err(e);
                        break;
                    }
                };
                let (Some(id), true) = (sub, *fresh) else {
                    continue;
                };
                let csrc = join(src_rel, name);
                whole.push(csrc.clone());
                let Ok(sfd) = sys::openat(
                    dfd.as_fd(),
                    name,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                    0,
                ) else {
                    continue;
                };
                match nix::sys::stat::fstat(sfd.as_raw_fd()) {
                    Ok(st) if dev_ino(&st) == id => {}
                    _ => continue,
                }
                if let Err(e) = self.dir(index, &sfd, dev, &csrc, &join(&rel, name)) {
                    res = Err(e);
                    break;
                }
            }
            if res.is_err() {
                break;
            }
        }
        self.opts.links_as_entries = links_as_entries;
        res
    }

    /// Lists entry `name` of directory `fd` (`src_rel`/`rel`); returns its device and inode
    /// when it is a directory to descend into. With `gone`, a name that no longer exists is
    /// listed as [`Item::Gone`].
    #[allow(clippy::too_many_arguments)]
    fn child(
        &mut self,
        root: usize,
        fd: &OwnedFd,
        dev: u64,
        src_rel: &[u8],
        rel: &[u8],
        name: &[u8],
        gone: bool,
    ) -> Result<Option<(u64, u64)>, FileError> {
        let crel = join(rel, name);
        if self.opts.excludes.matches(&crel) {
            return Ok(None);
        }
        if crel.len() > MAX_PATH {
            self.note(format!(
                "path longer than {MAX_PATH} bytes skipped: {}",
                String::from_utf8_lossy(&crel[..64])
            ));
            return Ok(None);
        }
        let csrc = join(src_rel, name);
        let st = match nix::sys::stat::fstatat(
            Some(fd.as_raw_fd()),
            std::ffi::OsStr::from_bytes(name),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => st,
            Err(nix::errno::Errno::ENOENT) if gone => {
                self.entries += 1;
                (self.sink)(Item::Gone { rel: &crel })?;
                return Ok(None);
            }
            Err(nix::errno::Errno::ENOENT) => return Ok(None),
            Err(e) => {
                self.note(format!(
                    "cannot stat {}: {e}",
                    String::from_utf8_lossy(&crel)
                ));
                return Ok(None);
            }
        };
        let kind = st.st_mode & S_IFMT;
        if kind == S_IFREG && st.st_nlink > 1 && !self.opts.links_as_entries {
            if let Some(first) = self.links.get(&dev_ino(&st)) {
                let first = first.clone();
                self.entries += 1;
                (self.sink)(Item::Link {
                    rel: &crel,
                    target: &first,
                })?;
                return Ok(None);
            }
        }
        let mut m = meta::from_stat(&st);
        match std::ffi::CString::new(name) {
            Ok(c) => {
                let at = Node::At(fd.as_fd(), &c);
                m.xattrs = self.xattrs(at, &String::from_utf8_lossy(&crel));
            }
            Err(e) => self.note(format!("{}: {e}", String::from_utf8_lossy(&crel))),
        }
        let mut target = Vec::new();
        let mut hash = None;
        let mut linked = false;
        let mut sub = None;
        match kind {
            S_IFDIR if st.st_dev == dev => sub = Some(dev_ino(&st)),
            S_IFLNK => {
                match nix::fcntl::readlinkat(
                    Some(fd.as_raw_fd()),
                    std::ffi::OsStr::from_bytes(name),
                ) {
                    Ok(t) => target = t.as_bytes().to_vec(),
                    Err(e) => {
                        self.note(format!(
                            "cannot read link {}: {e}",
                            String::from_utf8_lossy(&crel)
                        ));
                        return Ok(None);
                    }
                }
            }
            S_IFREG => {
                if st.st_nlink > 1 && !self.opts.links_as_entries {
                    self.links.insert(dev_ino(&st), crel.clone());
                    linked = true;
                }
                if self.opts.hash {
                    match hash_file(fd, name) {
                        Ok(h) => hash = Some(h),
                        Err(e) => {
                            self.note(format!(
                                "cannot read {}: {e}",
                                String::from_utf8_lossy(&crel)
                            ));
                            return Ok(None);
                        }
                    }
                }
            }
            _ => {}
        }
        self.emit_entry(root, &csrc, &crel, m, target, linked, hash, &st)?;
        Ok(sub)
    }
}

/// Opens a regular file of the source for reading without changing its atime where allowed.
pub fn open_source(dir: &OwnedFd, name: &[u8]) -> std::io::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK;
    match sys::openat(dir.as_fd(), name, flags | OFlag::O_NOATIME, 0) {
        Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => {
            sys::openat(dir.as_fd(), name, flags, 0)
        }
        r => r,
    }
}

/// BLAKE3 of a regular file's contents.
pub fn hash_file(dir: &OwnedFd, name: &[u8]) -> std::io::Result<[u8; 32]> {
    hash_reader(std::fs::File::from(open_source(dir, name)?))
}

/// BLAKE3 of everything readable from `f`.
pub fn hash_reader(mut f: impl std::io::Read) -> std::io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(*h.finalize().as_bytes())
}
