//! Which byte ranges of a filesystem are in use, so that block mode reads and sends only
//! allocated blocks (docs/engines.md, "What is read").
//!
//! Three sources, each a superset of what the filesystem needs ("when in doubt, include"):
//! the block bitmaps of an unmounted ext2/3/4 ([`ext4_used`]), the by-block-number free-space
//! B+trees of an unmounted XFS ([`xfs_used`]), and `FS_IOC_GETFSMAP` on a mounted ext4 or XFS
//! ([`fsmap_used`]). Every answer includes the first [`ALWAYS_USED`] bytes and all metadata.
//!
//! On-disk structures are untrusted: every read goes through [`read_vec`] (capped by
//! [`MAX_READ`]) and every field through the bounds-checked [`Fields`]; anything inconsistent is
//! an [`AllocError`], after which the caller reads the region in full. The result is held in a
//! [`RangeSet`], whose size is capped by [`MAX_RANGES`] however fragmented the map.

mod ext4;
mod fsmap;
mod xfs;

pub use ext4::ext4_used;
pub use fsmap::fsmap_used;
pub use xfs::xfs_used;

use std::io;

pub use crate::io::ReadAt;

/// A half-open byte range [start, end) relative to the start of the filesystem (the partition).
pub type Range = std::ops::Range<u64>;

/// Bytes at the start of every filesystem that are always reported used: boot code, the
/// superblock and the first group's or AG's headers live there, and other tools (boot loaders
/// in the ext2 boot block, partition-embedded signatures) may rely on it.
pub const ALWAYS_USED: u64 = 64 << 10;

/// Largest single read of on-disk metadata. The biggest structure read in one go is a 64 KiB
/// ext4 bitmap block or a 64 KiB XFS btree block; anything larger comes from a corrupt field.
/// The same bound as every other on-disk reader of this crate ([`crate::io::MAX_READ`]).
pub const MAX_READ: usize = crate::io::MAX_READ;

/// Most ranges a [`RangeSet`] holds before it starts bridging small gaps (16 MiB of ranges).
/// A hostile bitmap of alternating bits on a large disk would otherwise make the map grow to
/// gigabytes; bridging a gap only makes the result a larger superset, which is always safe.
pub const MAX_RANGES: usize = 1 << 20;

/// The smallest gap bridged once [`MAX_RANGES`] is reached; doubled until the set fits.
const MIN_GAP: u64 = 4096;

/// Why the allocation of a filesystem could not be determined (the caller then reads the
/// region in full).
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// Reading a structure from the device, or a syscall, failed.
    #[error("reading {what}: {source}")]
    Io {
        /// What was being read.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// No superblock of this filesystem type where one was expected.
    #[error("no {0} superblock (bad magic)")]
    BadMagic(&'static str),
    /// An on-disk structure is inconsistent; the bitmaps or trees cannot be trusted.
    #[error("corrupt filesystem: {0}")]
    Corrupt(String),
    /// A valid filesystem whose allocation this module cannot (safely) determine, e.g. a dirty
    /// journal or log, or a kernel without `FS_IOC_GETFSMAP` for it.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// Sorts and merges overlapping/adjacent ranges (empty ones are dropped).
pub fn merge(ranges: Vec<Range>) -> Vec<Range> {
    merge_bridging(ranges, 0)
}

/// [`merge`], also joining ranges separated by at most `gap` bytes.
fn merge_bridging(mut ranges: Vec<Range>, gap: u64) -> Vec<Range> {
    ranges.retain(|r| r.start < r.end);
    ranges.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(gap) => {
                last.end = last.end.max(r.end);
            }
            _ => out.push(r),
        }
    }
    out
}

/// Collects used ranges clipped to `[0, limit)`, in any order, with bounded memory: past
/// [`MAX_RANGES`] entries it bridges ever larger gaps (a superset, never a subset).
#[derive(Debug)]
pub(crate) struct RangeSet {
    ranges: Vec<Range>,
    limit: u64,
    gap: u64,
}

impl RangeSet {
    /// An empty set whose ranges are clipped to `[0, limit)`.
    pub(crate) fn new(limit: u64) -> Self {
        Self {
            ranges: Vec::new(),
            limit,
            gap: 0,
        }
    }

    /// Adds `[start, end)` (clipped; empty ranges are ignored).
    pub(crate) fn push(&mut self, start: u64, end: u64) {
        let end = end.min(self.limit);
        if start >= end {
            return;
        }
        // Input mostly arrives in ascending order: extend the last range when possible so the
        // vector stays small without a sort.
        if let Some(last) = self.ranges.last_mut() {
            if start >= last.start && start <= last.end.saturating_add(self.gap) {
                last.end = last.end.max(end);
                return;
            }
        }
        self.ranges.push(start..end);
        if self.ranges.len() >= MAX_RANGES {
            self.compact();
        }
    }

    fn compact(&mut self) {
        loop {
            self.gap = if self.gap == 0 {
                MIN_GAP
            } else {
                self.gap.saturating_mul(2)
            };
            self.ranges = merge_bridging(std::mem::take(&mut self.ranges), self.gap);
            if self.ranges.len() <= MAX_RANGES / 2 {
                break;
            }
        }
        tracing::debug!(
            gap = self.gap,
            "allocation map too fragmented; bridging small gaps"
        );
    }

    /// The sorted, merged ranges.
    pub(crate) fn finish(self) -> Vec<Range> {
        merge_bridging(self.ranges, self.gap)
    }
}

/// Reads `len` bytes at `base + off` into a new buffer, refusing lengths over [`MAX_READ`].
pub(crate) fn read_vec(
    dev: &(impl ReadAt + ?Sized),
    base: u64,
    off: u64,
    len: usize,
    what: &'static str,
) -> Result<Vec<u8>, AllocError> {
    if len > MAX_READ {
        return Err(AllocError::Corrupt(format!(
            "{what}: refusing a {len}-byte read (limit {MAX_READ})"
        )));
    }
    let mut buf = vec![0u8; len];
    read_into(dev, base, off, &mut buf, what)?;
    Ok(buf)
}

/// Fills `buf` from `base + off`.
pub(crate) fn read_into(
    dev: &(impl ReadAt + ?Sized),
    base: u64,
    off: u64,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), AllocError> {
    let pos = base
        .checked_add(off)
        .ok_or_else(|| AllocError::Corrupt(format!("{what}: offset {off} overflows")))?;
    dev.read_exact_at(buf, pos)
        .map_err(|source| AllocError::Io { what, source })
}

/// Bounds-checked fixed-offset fields of an on-disk structure; a field past the end of the
/// buffer is [`AllocError::Corrupt`], never a panic.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fields<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Fields<'a> {
    /// Fields of `buf`, named `what` in errors.
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    /// `N` bytes at `off`.
    pub(crate) fn bytes<const N: usize>(&self, off: usize) -> Result<[u8; N], AllocError> {
        off.checked_add(N)
            .and_then(|end| self.buf.get(off..end))
            .and_then(|s| <[u8; N]>::try_from(s).ok())
            .ok_or_else(|| {
                AllocError::Corrupt(format!(
                    "{}: field at {off}+{N} past its {} bytes",
                    self.what,
                    self.buf.len()
                ))
            })
    }

    pub(crate) fn u8(&self, off: usize) -> Result<u8, AllocError> {
        Ok(self.bytes::<1>(off)?[0])
    }
    pub(crate) fn le16(&self, off: usize) -> Result<u16, AllocError> {
        self.bytes(off).map(u16::from_le_bytes)
    }
    pub(crate) fn le32(&self, off: usize) -> Result<u32, AllocError> {
        self.bytes(off).map(u32::from_le_bytes)
    }
    pub(crate) fn be16(&self, off: usize) -> Result<u16, AllocError> {
        self.bytes(off).map(u16::from_be_bytes)
    }
    pub(crate) fn be32(&self, off: usize) -> Result<u32, AllocError> {
        self.bytes(off).map(u32::from_be_bytes)
    }
    pub(crate) fn be64(&self, off: usize) -> Result<u64, AllocError> {
        self.bytes(off).map(u64::from_be_bytes)
    }
}

/// `a * b` or a [`AllocError::Corrupt`] naming `what`.
pub(crate) fn mul(a: u64, b: u64, what: &str) -> Result<u64, AllocError> {
    a.checked_mul(b)
        .ok_or_else(|| AllocError::Corrupt(format!("{what} overflows")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::xorshift;

    #[test]
    fn merge_sorts_and_joins_overlapping_and_adjacent() {
        let m = merge(vec![10..20, 0..5, 5..7, 15..30, 40..40, 31..32]);
        assert_eq!(m, vec![0..7, 10..30, 31..32]);
        assert!(merge(vec![]).is_empty());
    }

    #[test]
    fn range_set_clips_and_accepts_any_order() {
        let mut s = RangeSet::new(100);
        s.push(50, 60);
        s.push(0, 10);
        s.push(10, 20);
        s.push(95, 200);
        s.push(120, 130);
        s.push(55, 58);
        assert_eq!(s.finish(), vec![0..20, 50..60, 95..100]);
    }

    #[test]
    fn range_set_bridges_gaps_when_too_fragmented() {
        // Alternating blocks: one range per block until the cap, then bridged gaps.
        let n = (MAX_RANGES as u64) * 3;
        let mut s = RangeSet::new(u64::MAX);
        for i in 0..n {
            s.push(i * 8192, i * 8192 + 4096);
        }
        let r = s.finish();
        assert!(r.len() <= MAX_RANGES, "{} ranges", r.len());
        // A superset of every pushed range.
        let mut x = 7u64;
        for _ in 0..10_000 {
            let i = xorshift(&mut x) % n;
            let want = i * 8192..i * 8192 + 4096;
            let k = r.partition_point(|q| q.end <= want.start);
            assert!(r[k].start <= want.start && r[k].end >= want.end);
        }
    }

    #[test]
    fn slices_read_exactly_or_fail() {
        let data: Vec<u8> = (0..100).collect();
        let mut b = [0u8; 5];
        data.read_exact_at(&mut b, 10).unwrap();
        assert_eq!(b, [10, 11, 12, 13, 14]);
        let e = data.read_exact_at(&mut b, 96).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(data.read_exact_at(&mut b, u64::MAX - 1).is_err());
        assert!(read_vec(&data, 0, 0, MAX_READ + 1, "x").is_err());
        assert!(read_vec(&data, u64::MAX, 1, 1, "x").is_err());
    }

    #[test]
    fn fields_are_bounds_checked() {
        let buf = [1u8, 2, 3, 4, 5];
        let f = Fields::new(&buf, "t");
        assert_eq!(f.le32(0).unwrap(), 0x0403_0201);
        assert_eq!(f.be32(1).unwrap(), 0x0203_0405);
        assert!(f.le32(2).is_err());
        assert!(f.be64(usize::MAX).is_err());
    }
}

/// Real filesystems on loop-mounted sparse images, shared by the modules' tests (run as root).
#[cfg(test)]
pub(crate) mod testfs {
    use super::{fsmap_used, merge, AllocError, Range};
    use crate::testutil::xorshift;
    use std::fs::{self, File};
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::time::Instant;

    /// Runs a command, panicking with its output if it fails.
    pub(crate) fn run(cmd: &str, args: &[&str]) -> String {
        let (code, out) = status(cmd, args);
        assert_eq!(code, 0, "{cmd} {args:?} failed:\n{out}");
        out
    }

    /// Runs a command; its exit code (-1 when killed) and stdout+stderr.
    pub(crate) fn status(cmd: &str, args: &[&str]) -> (i32, String) {
        let out = Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }

    /// Fails the test unless `tool` is installed (the project's test script installs them).
    pub(crate) fn require(tool: &str) {
        let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists());
        assert!(
            found,
            "{tool} is missing: apt-get install -y e2fsprogs xfsprogs"
        );
    }

    /// A sparse zero-filled image of `size` bytes.
    pub(crate) fn sparse_image(path: &Path, size: u64) {
        File::create(path).unwrap().set_len(size).unwrap();
    }

    /// A loop mount, unmounted on drop so a failing test leaves nothing mounted.
    pub(crate) struct Mount {
        dir: PathBuf,
        mounted: bool,
    }

    impl Mount {
        /// `mount -o loop[,opts] image dir`.
        pub(crate) fn new(image: &Path, dir: &Path, opts: &str) -> Self {
            fs::create_dir_all(dir).unwrap();
            let o = if opts.is_empty() {
                "loop".to_string()
            } else {
                format!("loop,{opts}")
            };
            run("mount", &["-o", &o, path(image), path(dir)]);
            Self {
                dir: dir.to_path_buf(),
                mounted: true,
            }
        }

        /// Unmounts, failing the test if that fails (the guard stays armed until it worked).
        pub(crate) fn unmount(mut self) {
            let out = self.try_unmount();
            assert!(
                out.is_none(),
                "umount {} failed:\n{}",
                self.dir.display(),
                out.unwrap_or_default()
            );
            self.mounted = false;
        }

        /// `umount`, retried for up to 5 s in case the mount is busy for a moment. `None` on
        /// success, else the last error output.
        fn try_unmount(&self) -> Option<String> {
            let mut last = String::new();
            for _ in 0..20 {
                let (code, out) = status("umount", &[path(&self.dir)]);
                if code == 0 {
                    return None;
                }
                last = out;
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            Some(last)
        }
    }

    impl Drop for Mount {
        fn drop(&mut self) {
            if self.mounted && self.try_unmount().is_some() {
                let _ = status("umount", &["-l", path(&self.dir)]);
            }
        }
    }

    /// A path as `&str` for command arguments (test paths are ASCII).
    pub(crate) fn path(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    /// A regular file written by a test: path relative to the fs root, size and hash.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct FileInfo {
        pub(crate) rel: PathBuf,
        pub(crate) size: u64,
        pub(crate) hash: blake3::Hash,
    }

    fn noise(seed: &mut u64, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&xorshift(seed).to_le_bytes());
        }
        v.truncate(len);
        v
    }

    /// Writes a tree of random files totalling about `big` bytes in a few large files plus
    /// `small` small files spread over directories, then syncs. Returns what was written.
    pub(crate) fn populate(root: &Path, seed: u64, big: usize, small: usize) -> Vec<FileInfo> {
        let mut seed = seed | 1;
        let mut out = Vec::new();
        let mut write = |rel: PathBuf, data: &[u8]| {
            let p = root.join(&rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            let mut f = File::create(&p).unwrap();
            f.write_all(data).unwrap();
            out.push(FileInfo {
                rel,
                size: data.len() as u64,
                hash: blake3::hash(data),
            });
        };
        // Uneven sizes so that file tails end mid-block.
        for (i, part) in [5usize, 3, 2, 1].iter().enumerate() {
            let len = big / 11 * part + 777 * i;
            write(
                PathBuf::from(format!("big/file{i}.bin")),
                &noise(&mut seed, len),
            );
        }
        for i in 0..small {
            let len = usize::try_from(xorshift(&mut seed) % 20_000).unwrap() + 1;
            let rel = format!("tree/d{}/sub{}/f{i}.dat", i % 7, i % 3);
            write(PathBuf::from(rel), &noise(&mut seed, len));
        }
        run("sync", &[]);
        out
    }

    /// Fragments free space: writes `n` one-block files into `frag/`, deletes every other one,
    /// syncs. Returns the files kept.
    pub(crate) fn fragment(root: &Path, seed: u64, n: usize, block: usize) -> Vec<FileInfo> {
        let mut seed = seed | 1;
        let dir = root.join("frag");
        fs::create_dir_all(&dir).unwrap();
        let mut kept = Vec::new();
        for i in 0..n {
            let data = noise(&mut seed, block);
            let rel = PathBuf::from(format!("frag/{i}"));
            fs::write(root.join(&rel), &data).unwrap();
            if i % 2 == 0 {
                kept.push(FileInfo {
                    rel,
                    size: block as u64,
                    hash: blake3::hash(&data),
                });
            }
        }
        run("sync", &[]);
        for i in (1..n).step_by(2) {
            fs::remove_file(dir.join(i.to_string())).unwrap();
        }
        run("sync", &[]);
        kept
    }

    /// Checks that `root` holds exactly the regular files `files` (ignoring `lost+found`)
    /// with the same contents.
    pub(crate) fn verify_tree(root: &Path, files: &[FileInfo]) {
        let mut found = Vec::new();
        walk(root, root, &mut found);
        found.sort();
        let mut want: Vec<PathBuf> = files.iter().map(|f| f.rel.clone()).collect();
        want.sort();
        assert_eq!(found, want, "file sets differ");
        for f in files {
            let data = fs::read(root.join(&f.rel)).unwrap();
            assert_eq!(data.len() as u64, f.size, "{}", f.rel.display());
            assert_eq!(
                blake3::hash(&data),
                f.hash,
                "content of {} differs",
                f.rel.display()
            );
        }
    }

    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                if e.file_name() != "lost+found" {
                    walk(root, &e.path(), out);
                }
            } else if t.is_file() {
                out.push(e.path().strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }

    /// Physical byte extents of the files, from `filefrag -v -b1` (FIEMAP).
    pub(crate) fn extents(root: &Path, files: &[FileInfo]) -> Vec<Range> {
        let mut out = Vec::new();
        for f in files {
            let p = root.join(&f.rel);
            let text = run("filefrag", &["-v", "-b1", path(&p)]);
            for line in text.lines() {
                let cols: Vec<&str> = line.split(':').map(str::trim).collect();
                if cols.len() < 4 || cols[0].parse::<u64>().is_err() {
                    continue;
                }
                let start: u64 = cols[2].split("..").next().unwrap().trim().parse().unwrap();
                let len: u64 = cols[3].parse().unwrap();
                out.push(start..start + len);
            }
        }
        merge(out)
    }

    /// Copies only `ranges` of `src` into a fresh sparse image `dst` of the same size.
    pub(crate) fn copy_ranges(src: &Path, dst: &Path, ranges: &[Range]) {
        let s = File::open(src).unwrap();
        let size = s.metadata().unwrap().len();
        let d = File::create(dst).unwrap();
        d.set_len(size).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for r in ranges {
            let mut pos = r.start;
            while pos < r.end {
                let n = usize::try_from((r.end - pos).min(buf.len() as u64)).unwrap();
                s.read_exact_at(&mut buf[..n], pos).unwrap();
                d.write_all_at(&buf[..n], pos).unwrap();
                pos += n as u64;
            }
        }
        d.sync_all().unwrap();
    }

    /// Total bytes of merged ranges.
    pub(crate) fn total(ranges: &[Range]) -> u64 {
        ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// The parts of `inner` not covered by `outer` (both sorted and merged).
    pub(crate) fn missing(outer: &[Range], inner: &[Range]) -> Vec<Range> {
        let mut out = Vec::new();
        for r in inner {
            let mut pos = r.start;
            let mut k = outer.partition_point(|o| o.end <= pos);
            while pos < r.end {
                match outer.get(k) {
                    Some(o) if o.start <= pos => {
                        pos = o.end.min(r.end);
                        k += 1;
                    }
                    Some(o) => {
                        let next = o.start.min(r.end);
                        out.push(pos..next);
                        pos = next;
                    }
                    None => {
                        out.push(pos..r.end);
                        pos = r.end;
                    }
                }
            }
        }
        out
    }

    /// Bytes of `inner` not covered by `outer` (both sorted and merged).
    pub(crate) fn uncovered(outer: &[Range], inner: &[Range]) -> u64 {
        total(&missing(outer, inner))
    }

    /// Asserts that `outer` covers `inner`, listing the first gaps otherwise.
    pub(crate) fn assert_covers(outer: &[Range], inner: &[Range], what: &str) {
        let gaps = missing(outer, inner);
        assert!(
            gaps.is_empty(),
            "{what}: {} bytes missing, first {:?}",
            total(&gaps),
            &gaps[..gaps.len().min(8)]
        );
    }

    /// Asserts the basic shape of a result: sorted, merged, non-empty ranges within `[0, len)`.
    pub(crate) fn assert_well_formed(ranges: &[Range], len: u64) {
        for w in ranges.windows(2) {
            assert!(w[0].end < w[1].start, "not sorted/merged: {w:?}");
        }
        for r in ranges {
            assert!(
                r.start < r.end && r.end <= len,
                "bad range {r:?} (len {len})"
            );
        }
    }

    /// One real-filesystem round trip: how to make and check it.
    pub(crate) struct Case<'a> {
        /// Name in the printed numbers.
        pub(crate) label: &'a str,
        /// mkfs command and arguments; the image path is appended.
        pub(crate) mkfs: &'a [&'a str],
        /// Image size in bytes.
        pub(crate) size: u64,
        /// Files of `frag_block` bytes written and half deleted to fragment free space.
        pub(crate) fragment: usize,
        /// Size of each fragmenting file.
        pub(crate) frag_block: usize,
        /// The offline map of an image.
        pub(crate) offline: fn(&File, u64) -> Result<Vec<Range>, AllocError>,
        /// Checker command and arguments, image appended; exit 0 = clean.
        pub(crate) fsck: &'a [&'a str],
        /// Mount options of the read-only copy.
        pub(crate) ro_opts: &'a str,
    }

    /// Measured numbers of one round trip, printed (with `--nocapture`) for the report.
    struct Stats {
        label: String,
        size: u64,
        data: u64,
        offline: u64,
        fsmap: u64,
        offline_us: u128,
        fsmap_us: u128,
    }

    impl Drop for Stats {
        fn drop(&mut self) {
            let mib = |b: u64| b as f64 / 1_048_576.0;
            eprintln!(
                "{}: image {:.0} MiB, file data {:.1} MiB, offline used {:.1} MiB ({:.1} %) in {:.1} ms, \
                 fsmap used {:.1} MiB in {:.1} ms",
                self.label,
                mib(self.size),
                mib(self.data),
                mib(self.offline),
                100.0 * self.offline as f64 / self.size as f64,
                self.offline_us as f64 / 1000.0,
                mib(self.fsmap),
                self.fsmap_us as f64 / 1000.0
            );
        }
    }

    /// mkfs → mount → write files → fsmap → umount → offline map → for each map, copy only
    /// the used ranges into a zeroed image, check it with fsck and compare every file.
    /// `inspect` sees the original image after umount (e.g. to assert the tree shape).
    pub(crate) fn roundtrip(c: &Case, inspect: impl Fn(&Path)) {
        require(c.mkfs[0]);
        require(c.fsck[0]);
        require("filefrag");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let img = dir.join("fs.img");
        sparse_image(&img, c.size);
        let mut mkfs = c.mkfs.to_vec();
        mkfs.push(path(&img));
        run(mkfs[0], &mkfs[1..]);

        let mnt = dir.join("mnt");
        let m = Mount::new(&img, &mnt, "");
        let mut files = populate(&mnt, c.size ^ 0x9e37, 20 << 20, 150);
        if c.fragment > 0 {
            files.extend(fragment(&mnt, 77, c.fragment, c.frag_block));
        }
        let data = extents(&mnt, &files);
        let t = Instant::now();
        let live = fsmap_used(&mnt, c.size).unwrap();
        let fsmap_us = t.elapsed().as_micros();
        m.unmount();
        inspect(&img);

        let t = Instant::now();
        let used = (c.offline)(&File::open(&img).unwrap(), c.size).unwrap();
        let offline_us = t.elapsed().as_micros();
        let _stats = Stats {
            label: c.label.to_string(),
            size: c.size,
            data: total(&data),
            offline: total(&used),
            fsmap: total(&live),
            offline_us,
            fsmap_us,
        };
        assert_well_formed(&used, c.size);
        assert_well_formed(&live, c.size);
        assert_covers(&used, &data, "offline map vs file data");
        assert_covers(&live, &data, "fsmap vs file data");
        assert!(total(&used) >= total(&data));
        assert!(
            total(&used) < c.size / 4,
            "{} of {} bytes used",
            total(&used),
            c.size
        );
        // Both describe the same filesystem; they may differ only by what umount wrote (and
        // the lazy inode-table init thread, racing the test): about 1 %, counted in whole
        // clusters, which bigalloc makes 64 KiB, hence 2 %.
        let extra = uncovered(&used, &live);
        assert!(
            extra < c.size / 50,
            "fsmap has {extra} bytes the offline map lacks"
        );

        for (name, ranges) in [("offline", &used), ("fsmap", &live)] {
            let copy = dir.join(format!("copy-{name}.img"));
            copy_ranges(&img, &copy, ranges);
            let mut fsck = c.fsck.to_vec();
            fsck.push(path(&copy));
            let (code, out) = status(fsck[0], &fsck[1..]);
            assert_eq!(code, 0, "{} of the {name} copy:\n{out}", fsck[0]);
            let cmnt = dir.join(format!("mnt-{name}"));
            let cm = Mount::new(&copy, &cmnt, c.ro_opts);
            verify_tree(&cmnt, &files);
            cm.unmount();
        }
    }

    /// A reader over a file with some bytes replaced, for fuzzing real images without
    /// copying them into memory.
    pub(crate) struct Patched<'a> {
        pub(crate) file: &'a File,
        /// (offset, byte), any order.
        pub(crate) patches: Vec<(u64, u8)>,
    }

    impl super::ReadAt for Patched<'_> {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            let n = FileExt::read_at(self.file, buf, offset)?;
            let buf = &mut buf[..n];
            let end = offset + n as u64;
            for &(at, b) in &self.patches {
                if at >= offset && at < end {
                    buf[usize::try_from(at - offset).unwrap()] = b;
                }
            }
            Ok(n)
        }
    }
}
