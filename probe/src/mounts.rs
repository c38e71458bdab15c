//! The mount table (`/proc/self/mountinfo`) and filesystem usage (`statvfs`).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// One line of `/proc/self/mountinfo` (proc(5)), with the octal escapes of paths undone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Device number of the mounted filesystem (for Btrfs an anonymous `0:N`).
    pub dev: (u32, u32),
    /// Path inside the filesystem that is mounted (`/` for a whole filesystem, `/@/home` for a
    /// Btrfs subvolume or a bind mount).
    pub root: String,
    /// Where it is mounted.
    pub mount_point: String,
    /// Filesystem type (`ext4`, `xfs`, `btrfs`, …).
    pub fs_type: String,
    /// Mount source, usually the device path.
    pub source: String,
    /// Per-superblock options (`rw,subvolid=257,subvol=/sub`).
    pub super_options: String,
}

impl MountEntry {
    /// The value of a `key=value` superblock option.
    pub fn super_option(&self, key: &str) -> Option<&str> {
        self.super_options
            .split(',')
            .find_map(|o| o.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
    }
}

/// Parses mountinfo text; malformed lines are skipped and returned as errors for warnings.
pub fn parse_mountinfo(text: &str) -> (Vec<MountEntry>, Vec<String>) {
    let mut entries = Vec::new();
    let mut bad = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line) {
            Some(e) => entries.push(e),
            None => bad.push(format!("line {}: cannot parse {:?}", n + 1, line)),
        }
    }
    (entries, bad)
}

fn parse_line(line: &str) -> Option<MountEntry> {
    // 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    let (left, right) = line.split_once(" - ")?;
    let mut l = left.split(' ');
    let _id = l.next()?;
    let _parent = l.next()?;
    let (maj, min) = l.next()?.split_once(':')?;
    let root = unescape(l.next()?);
    let mount_point = unescape(l.next()?);
    let mut r = right.split(' ');
    let fs_type = unescape(r.next()?);
    let source = unescape(r.next()?);
    let super_options = r.next().unwrap_or("").to_string();
    Some(MountEntry {
        dev: (maj.parse().ok()?, min.parse().ok()?),
        root,
        mount_point,
        fs_type,
        source,
        super_options,
    })
}

/// Undoes the kernel's `\ooo` octal escapes (space `\040`, tab `\011`, newline `\012`, `\134`).
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if let (b'\\', Some(oct)) = (b[i], b.get(i + 1..i + 4)) {
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = u32::from(oct[0] - b'0') * 64
                    + u32::from(oct[1] - b'0') * 8
                    + u32::from(oct[2] - b'0');
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Space and inode usage of a mounted filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Fundamental block size (`f_frsize`).
    pub block_size: u64,
    /// Total data blocks.
    pub blocks: u64,
    /// Free blocks (including those reserved for root).
    pub blocks_free: u64,
    /// Total inodes (`f_files`).
    pub files: u64,
}

impl Usage {
    /// Bytes in use, as `df` counts them (total − free).
    pub fn used_bytes(&self) -> u64 {
        self.blocks
            .saturating_sub(self.blocks_free)
            .saturating_mul(self.block_size)
    }
}

/// `statvfs(2)` of a mount point.
pub fn usage(mount_point: &Path) -> nix::Result<Usage> {
    let s = nix::sys::statvfs::statvfs(mount_point)?;
    Ok(Usage {
        block_size: s.fragment_size(),
        blocks: s.blocks(),
        blocks_free: s.blocks_free(),
        files: s.files(),
    })
}

/// Path of a mount point as an `OsStr` (mount points need not be UTF-8).
pub fn as_path(s: &str) -> &Path {
    Path::new(OsStr::from_bytes(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc5_example_and_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 22 7:3 / /tmp/a\\040b\\011c\\134d rw shared:9 - xfs /dev/loop3p2 rw,attr2\n\
                    41 22 0:51 /sub /mnt/s rw - btrfs /dev/loop3p4 rw,space_cache=v2,subvolid=257,subvol=/sub\n\
                    garbage\n";
        let (m, bad) = parse_mountinfo(text);
        assert_eq!(bad.len(), 1);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].dev, (98, 0));
        assert_eq!(m[0].root, "/mnt1");
        assert_eq!(m[1].mount_point, "/tmp/a b\tc\\d");
        assert_eq!(m[2].super_option("subvolid"), Some("257"));
        assert_eq!(m[2].super_option("subvol"), Some("/sub"));
        assert_eq!(m[2].super_option("space"), None);
    }

    #[test]
    fn unescape_leaves_bad_escapes() {
        assert_eq!(unescape("a\\04"), "a\\04");
        assert_eq!(unescape("a\\9999"), "a\\9999");
        assert_eq!(unescape("\\"), "\\");
        assert_eq!(unescape("x\\012"), "x\n");
    }
}
