//! Used ranges of a mounted ext4 or XFS through the `FS_IOC_GETFSMAP` ioctl
//! (`include/uapi/linux/fsmap.h`), which reports the extents of the filesystem's devices with
//! their owner: inode, metadata or free space.
//!
//! "Used" is everything of the data device except the records owned by free space: ext4 (as
//! of Linux 6.18) leaves some in-use stretches without any record, and a record can go
//! missing where two batches meet, so only what the kernel positively calls free is skipped.
//!
//! The answer is a snapshot of a live filesystem: blocks allocated after the call are not in
//! it, so a crash-consistent copy must freeze the filesystem (FIFREEZE) around the call and
//! the read, or re-read in a later sync pass.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{AllocError, Range, RangeSet, ALWAYS_USED};

/// Records asked for per call: 1024 × 64 bytes keeps the buffer at 64 KiB.
const BATCH_U32: u32 = 1024;
const BATCH: usize = BATCH_U32 as usize;

/// `FMH_OF_DEV_T`: `fmr_device` values are `dev_t` (`new_encode_dev`) numbers.
const FMH_OF_DEV_T: u32 = 0x1;
/// `FMR_OF_SPECIAL_OWNER`: `fmr_owner` is one of the `FMR_OWN_*` codes, not an inode.
const FMR_OF_SPECIAL_OWNER: u32 = 0x10;
/// `FMR_OF_LAST`: the last record of the whole query.
const FMR_OF_LAST: u32 = 0x20;
/// `FMR_OWN_FREE` = `FMR_OWNER(0, 1)`: free space.
const FMR_OWN_FREE: u64 = 1;

/// `struct fsmap`: one extent.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Fsmap {
    fmr_device: u32,
    fmr_flags: u32,
    fmr_physical: u64,
    fmr_owner: u64,
    fmr_offset: u64,
    fmr_length: u64,
    fmr_reserved: [u64; 3],
}

/// `struct fsmap_head` without its flexible `fmh_recs[]` array.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct FsmapHead {
    fmh_iflags: u32,
    fmh_oflags: u32,
    fmh_count: u32,
    fmh_entries: u32,
    fmh_reserved: [u64; 6],
    fmh_keys: [Fsmap; 2],
}

/// The header followed by room for [`BATCH`] records, as the kernel expects them.
#[repr(C)]
struct Query {
    head: FsmapHead,
    recs: [Fsmap; BATCH],
}

// The ioctl number encodes the header size; check the layout against fsmap.h.
const _: () = assert!(std::mem::size_of::<Fsmap>() == 64);
const _: () = assert!(std::mem::size_of::<FsmapHead>() == 192);
const _: () = assert!(std::mem::offset_of!(Query, recs) == 192);

nix::ioctl_readwrite!(
    /// `FS_IOC_GETFSMAP` = `_IOWR('X', 59, struct fsmap_head)`.
    fs_ioc_getfsmap,
    b'X',
    59,
    FsmapHead
);

/// The used ranges of the mounted filesystem at `mount_point` (ext4 or XFS) on its data
/// device, via FS_IOC_GETFSMAP, relative to the start of that device (partition); `len` is the
/// partition size (clip to it).
///
/// Everything in `[0, len)` that the kernel does not report as free space counts as used,
/// including the first [`ALWAYS_USED`] bytes and any part of the partition past the end of
/// the filesystem. Any path inside the filesystem works as `mount_point`.
pub fn fsmap_used(mount_point: &Path, len: u64) -> Result<Vec<Range>, AllocError> {
    let dir = File::open(mount_point).map_err(|source| AllocError::Io {
        what: "mount point",
        source,
    })?;
    let st_dev = dir
        .metadata()
        .map_err(|source| AllocError::Io {
            what: "mount point",
            source,
        })?
        .dev();
    let device = encode_dev(st_dev).ok_or_else(|| {
        AllocError::Unsupported(format!(
            "device number {st_dev:#x} does not fit fsmap's 32 bits"
        ))
    })?;

    let mut query = Box::new(Query {
        head: FsmapHead::default(),
        recs: [Fsmap::default(); BATCH],
    });
    query.head.fmh_keys[1] = Fsmap {
        fmr_device: u32::MAX,
        fmr_flags: u32::MAX,
        fmr_physical: u64::MAX,
        fmr_owner: u64::MAX,
        fmr_offset: u64::MAX,
        // XFS converts lengths to 512-byte units before insisting on 0 or all ones (as
        // xfs_io sends it).
        fmr_length: 0,
        fmr_reserved: [0; 3],
    };
    let mut set = RangeSet::new(len);
    set.push(0, ALWAYS_USED);
    // Start of the stretch not yet known to be free.
    let mut cursor = 0u64;
    let mut seen_device = false;
    let mut last_key = None;
    loop {
        query.head.fmh_count = BATCH_U32;
        query.head.fmh_entries = 0;
        let ptr: *mut FsmapHead = std::ptr::addr_of_mut!(*query).cast();
        // SAFETY: `dir` is an open descriptor for the whole call, and `ptr` points to a
        // `FsmapHead` followed by `fmh_count` = BATCH records, all inside the live `query`
        // (repr(C), header first); the kernel writes at most `fmh_count` records.
        let res = unsafe { fs_ioc_getfsmap(dir.as_raw_fd(), ptr) };
        match res {
            Ok(_) => {}
            Err(e @ (nix::errno::Errno::ENOTTY | nix::errno::Errno::EOPNOTSUPP)) => {
                return Err(AllocError::Unsupported(format!(
                    "FS_IOC_GETFSMAP on {}: {e}",
                    mount_point.display()
                )));
            }
            Err(e) => {
                return Err(AllocError::Io {
                    what: "FS_IOC_GETFSMAP",
                    source: io::Error::from(e),
                })
            }
        }
        let n = usize::try_from(query.head.fmh_entries).map_or(BATCH, |n| n.min(BATCH));
        let Some(recs) = query.recs.get(..n).filter(|r| !r.is_empty()) else {
            break;
        };
        if query.head.fmh_oflags & FMH_OF_DEV_T == 0 {
            return Err(AllocError::Unsupported(
                "fsmap reports device cookies, not dev_t".into(),
            ));
        }
        for rec in recs.iter().filter(|r| r.fmr_device == device) {
            seen_device = true;
            if let Some(free) = free(rec) {
                cursor = used_before(&mut set, cursor, free);
            }
        }
        let last = *recs
            .last()
            .ok_or_else(|| AllocError::Corrupt("fsmap: empty batch".into()))?;
        if last.fmr_flags & FMR_OF_LAST != 0 {
            break;
        }
        // The kernel resumes after keys[0]; insist on progress so that a misbehaving
        // filesystem cannot loop us forever.
        let key = (
            last.fmr_device,
            last.fmr_physical,
            last.fmr_owner,
            last.fmr_offset,
            last.fmr_flags,
        );
        if last_key.is_some_and(|k| key <= k) {
            return Err(AllocError::Corrupt("fsmap: records do not advance".into()));
        }
        last_key = Some(key);
        query.head.fmh_keys[0] = last;
    }
    set.push(cursor, len);
    if !seen_device {
        return Err(AllocError::Unsupported(format!(
            "fsmap of {} has no records for its device {device:#x}",
            mount_point.display()
        )));
    }
    Ok(set.finish())
}

/// The byte range of a free-space record.
fn free(rec: &Fsmap) -> Option<Range> {
    if rec.fmr_flags & FMR_OF_SPECIAL_OWNER == 0 || rec.fmr_owner != FMR_OWN_FREE {
        return None;
    }
    let end = rec.fmr_physical.saturating_add(rec.fmr_length);
    (end > rec.fmr_physical).then_some(rec.fmr_physical..end)
}

/// Adds `[cursor, free.start)` as used and returns where the next used stretch starts.
/// Records arrive sorted; a free range reaching back before `cursor` only frees its part
/// after it (what was already declared used stays used).
fn used_before(set: &mut RangeSet, cursor: u64, free: Range) -> u64 {
    set.push(cursor, free.start);
    cursor.max(free.end)
}

/// The kernel's `new_encode_dev` of a userspace `dev_t`, as found in `fmr_device`.
fn encode_dev(dev: u64) -> Option<u32> {
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let enc = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
    u32::try_from(enc).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::testfs::*;

    #[test]
    fn only_free_space_records_are_skipped() {
        let rec = |flags, owner, physical, length| Fsmap {
            fmr_flags: flags,
            fmr_owner: owner,
            fmr_physical: physical,
            fmr_length: length,
            ..Fsmap::default()
        };
        assert_eq!(
            free(&rec(FMR_OF_SPECIAL_OWNER, FMR_OWN_FREE, 4096, 8192)),
            Some(4096..12288)
        );
        // Inode 1 (not special) is data, and metadata or unknown owners are in use.
        assert_eq!(free(&rec(0, FMR_OWN_FREE, 4096, 8192)), None);
        assert_eq!(free(&rec(FMR_OF_SPECIAL_OWNER, 2, 0, 1024)), None);
        assert_eq!(
            free(&rec(
                FMR_OF_SPECIAL_OWNER | FMR_OF_LAST,
                FMR_OWN_FREE,
                10,
                0
            )),
            None
        );
        let end = free(&rec(FMR_OF_SPECIAL_OWNER, FMR_OWN_FREE, u64::MAX - 1, 10));
        assert_eq!(end, Some(u64::MAX - 1..u64::MAX));

        // Gaps between free records are used, overlapping free records never un-use.
        let mut set = RangeSet::new(100);
        let mut c = 0;
        for f in [10..20, 15..30, 25..28, 40..50, 45..60, 90..95] {
            c = used_before(&mut set, c, f);
        }
        set.push(c, 100);
        assert_eq!(set.finish(), vec![0..10, 30..40, 60..90, 95..100]);
    }

    #[test]
    fn device_numbers_encode_as_the_kernel_does() {
        // loop0 = 7:0, sda1 = 8:1, nvme 259:65536 (minor > 255 uses the high bits).
        assert_eq!(encode_dev(nix::sys::stat::makedev(7, 0)), Some(0x700));
        assert_eq!(encode_dev(nix::sys::stat::makedev(8, 1)), Some(0x801));
        assert_eq!(
            encode_dev(nix::sys::stat::makedev(259, 65536)),
            Some(0x1000_0000 | 259 << 8)
        );
    }

    #[test]
    fn missing_path_is_an_io_error() {
        let r = fsmap_used(Path::new("/nonexistent/sms-alloc-test"), 1 << 20);
        assert!(matches!(r, Err(AllocError::Io { .. })), "{r:?}");
    }

    /// tmpfs has no FS_IOC_GETFSMAP.
    #[test]
    fn real_tmpfs_is_unsupported() {
        let tmp = tempfile::tempdir().unwrap();
        let mnt = tmp.path().join("t");
        std::fs::create_dir(&mnt).unwrap();
        run(
            "mount",
            &["-t", "tmpfs", "-o", "size=1m", "none", path(&mnt)],
        );
        let r = fsmap_used(&mnt, 1 << 20);
        run("umount", &[path(&mnt)]);
        assert!(matches!(r, Err(AllocError::Unsupported(_))), "{r:?}");
    }

    /// Any path inside the filesystem gives the same answer, clipped to `len`, and many
    /// batches (a 1 KiB-block fs with thousands of extents) are stitched together.
    #[test]
    fn real_batches_and_clipping() {
        require("mkfs.ext4");
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("fs.img");
        let size = 128 << 20;
        sparse_image(&img, size);
        run("mkfs.ext4", &["-q", "-F", "-b", "1024", path(&img)]);
        let mnt = tmp.path().join("mnt");
        let m = Mount::new(&img, &mnt, "");
        let files = fragment(&mnt, 5, 6000, 1024);
        let data = extents(&mnt, &files);
        let all = fsmap_used(&mnt, size).unwrap();
        assert!(all.len() > 2 * BATCH, "only {} ranges", all.len());
        assert_eq!(uncovered(&all, &data), 0);
        assert_eq!(fsmap_used(&mnt.join("frag"), size).unwrap(), all);
        let half = fsmap_used(&mnt, size / 2).unwrap();
        assert_well_formed(&half, size / 2);
        assert_eq!(
            half,
            crate::alloc::merge(
                all.iter()
                    .filter(|r| r.start < size / 2)
                    .map(|r| r.start..r.end.min(size / 2))
                    .collect()
            )
        );
        m.unmount();
    }
}
