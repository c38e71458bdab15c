//! A small cache of directory descriptors below a root, each opened one component at a time
//! with `O_NOFOLLOW | O_DIRECTORY`, so no symlink is ever followed on the way and no path
//! longer than one name reaches a syscall. Listings arrive directory by directory, so a few
//! slots hit almost always.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::fcntl::OFlag;

use super::sys;

/// Slots kept.
const SLOTS: usize = 8;

/// Cached descriptors of directories below one root.
pub struct DirCache {
    root: Arc<OwnedFd>,
    slots: Vec<(Vec<u8>, Arc<OwnedFd>)>,
}

fn is_prefix(dir: &[u8], of: &[u8]) -> bool {
    of.starts_with(dir) && (of.len() == dir.len() || of.get(dir.len()) == Some(&b'/'))
}

impl DirCache {
    /// A cache below `root`.
    pub fn new(root: Arc<OwnedFd>) -> Self {
        Self {
            root,
            slots: Vec::with_capacity(SLOTS),
        }
    }

    /// The root descriptor.
    pub fn root(&self) -> &Arc<OwnedFd> {
        &self.root
    }

    /// The directory `dir` (a relative path whose components were already checked; empty for
    /// the root). Fails when a component is missing, not a directory, or a symlink.
    pub fn open(&mut self, dir: &[u8]) -> io::Result<Arc<OwnedFd>> {
        if dir.is_empty() {
            return Ok(Arc::clone(&self.root));
        }
        if let Some(i) = self.slots.iter().position(|(p, _)| p == dir) {
            let slot = self.slots.remove(i);
            let fd = Arc::clone(&slot.1);
            self.slots.insert(0, slot);
            return Ok(fd);
        }
        // Start from the deepest cached ancestor.
        let (mut cur, start) = self
            .slots
            .iter()
            .filter(|(p, _)| is_prefix(p, dir))
            .max_by_key(|(p, _)| p.len())
            .map_or((Arc::clone(&self.root), 0), |(p, fd)| {
                (Arc::clone(fd), p.len() + 1)
            });
        for comp in dir[start..].split(|&b| b == b'/') {
            let next = sys::openat(
                cur.as_fd(),
                comp,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                0,
            )?;
            cur = Arc::new(next);
        }
        self.slots.insert(0, (dir.to_vec(), Arc::clone(&cur)));
        self.slots.truncate(SLOTS);
        Ok(cur)
    }

    /// Drops cached descriptors of `dir` and below (after it was removed or replaced).
    pub fn forget(&mut self, dir: &[u8]) {
        self.slots.retain(|(p, _)| !is_prefix(dir, p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_follows_a_symlink_on_the_way() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("a/link")).unwrap();
        let root = Arc::new(sys::open(t.path(), OFlag::O_RDONLY | OFlag::O_DIRECTORY).unwrap());
        let mut c = DirCache::new(root);
        assert!(c.open(b"a/b").is_ok());
        assert!(c.open(b"a").is_ok());
        assert!(c.open(b"a/link").is_err());
        assert!(c.open(b"a/missing").is_err());
        c.forget(b"a");
        assert!(c.slots.is_empty());
        assert!(is_prefix(b"a", b"a/b") && !is_prefix(b"a", b"ab"));
    }
}
