//! Used ranges of an unmounted XFS: the complement, in every allocation group (AG), of the
//! free extents recorded in the AG's free-space B+tree indexed by block number (bnobt).
//!
//! Structures and constants follow the kernel's `fs/xfs/libxfs/xfs_format.h` (`struct
//! xfs_dsb`, `struct xfs_agf`, `struct xfs_btree_block`, `struct xfs_alloc_rec`) and
//! `fs/xfs/libxfs/xfs_log_format.h`; all fields are big-endian. Everything outside the bnobt
//! free extents counts as used, so AG headers, the AGFL reserve, inode chunks, every btree and
//! the internal log are included without being parsed.
//!
//! The on-disk btrees are only current when the log is clean: a log that still holds
//! transactions (mounted, or crashed) may record allocations the btrees lack, so the log head
//! is located the way `xlog_find_head` does and the last record must be an unmount record
//! (`xlog_check_unmount_rec`); otherwise [`AllocError::Unsupported`].

use super::{mul, read_vec, AllocError, Fields, Range, RangeSet, ReadAt, ALWAYS_USED};

/// `XFS_SB_MAGIC` ("XFSB").
const XFS_SB_MAGIC: u32 = 0x5846_5342;
/// `XFS_AGF_MAGIC` ("XAGF").
const XFS_AGF_MAGIC: u32 = 0x5841_4746;
/// `XFS_AGF_VERSION`.
const XFS_AGF_VERSION: u32 = 1;
/// `XFS_ABTB_MAGIC` ("ABTB"): bnobt block of a v4 filesystem.
const XFS_ABTB_MAGIC: u32 = 0x4142_5442;
/// `XFS_ABTB_CRC_MAGIC` ("AB3B"): bnobt block of a v5 (CRC) filesystem.
const XFS_ABTB_CRC_MAGIC: u32 = 0x4142_3342;

// Offsets in `struct xfs_dsb`.
const SB_MAGICNUM: usize = 0;
const SB_BLOCKSIZE: usize = 4;
const SB_DBLOCKS: usize = 8;
const SB_UUID: usize = 32;
const SB_LOGSTART: usize = 48;
const SB_AGBLOCKS: usize = 84;
const SB_AGCOUNT: usize = 88;
const SB_LOGBLOCKS: usize = 96;
const SB_VERSIONNUM: usize = 100;
const SB_SECTSIZE: usize = 102;
const SB_BLOCKLOG: usize = 120;
const SB_SECTLOG: usize = 121;
const SB_AGBLKLOG: usize = 124;
const SB_INPROGRESS: usize = 126;
const SB_FEATURES_INCOMPAT: usize = 216;
const SB_META_UUID: usize = 248;
/// Bytes of the v5 superblock read (through `sb_meta_uuid`).
const SB_READ: usize = 512;

/// `XFS_SB_VERSION_NUMBITS`.
const XFS_SB_VERSION_NUMBITS: u16 = 0x000f;
const XFS_SB_VERSION_4: u16 = 4;
const XFS_SB_VERSION_5: u16 = 5;
/// `XFS_SB_VERSION_LOGV2BIT`: v2 log records (always on in v5).
const XFS_SB_VERSION_LOGV2BIT: u16 = 0x0400;
/// `XFS_SB_FEAT_INCOMPAT_META_UUID`: metadata stamped with `sb_meta_uuid`, not `sb_uuid`.
const XFS_SB_FEAT_INCOMPAT_META_UUID: u32 = 1 << 2;
/// `XFS_SB_FEAT_INCOMPAT_NEEDSREPAIR`: xfs_repair must run before anything trusts the fs.
const XFS_SB_FEAT_INCOMPAT_NEEDSREPAIR: u32 = 1 << 4;

/// `XFS_MIN_BLOCKSIZE_LOG` / `XFS_MAX_BLOCKSIZE_LOG`.
const BLOCKLOG: std::ops::RangeInclusive<u8> = 9..=16;
/// `XFS_MIN_SECTORSIZE_LOG` / `XFS_MAX_SECTORSIZE_LOG`.
const SECTLOG: std::ops::RangeInclusive<u8> = 9..=15;
/// `XFS_MIN_AG_BLOCKS`.
const XFS_MIN_AG_BLOCKS: u64 = 64;
/// `XFS_MAX_AG_BYTES` (1 TiB): an AG may not be larger.
const XFS_MAX_AG_BYTES: u64 = 1 << 40;

// Offsets in `struct xfs_agf`.
const AGF_MAGICNUM: usize = 0;
const AGF_VERSIONNUM: usize = 4;
const AGF_SEQNO: usize = 8;
const AGF_LENGTH: usize = 12;
const AGF_BNO_ROOT: usize = 16;
const AGF_BNO_LEVEL: usize = 28;
const AGF_FREEBLKS: usize = 52;
/// Bytes of the AGF read (its fields used here end well before).
const AGF_READ: usize = 512;
/// The AG headers (superblock, AGF, AGI, AGFL) take the first four sectors of an AG.
const AG_HEADER_SECTORS: u64 = 4;

// `struct xfs_btree_block` with short (AG-relative) pointers.
const BB_MAGIC: usize = 0;
const BB_LEVEL: usize = 4;
const BB_NUMRECS: usize = 6;
const BB_BLKNO: usize = 16;
const BB_UUID: usize = 32;
const BB_OWNER: usize = 48;
/// `XFS_BTREE_SBLOCK_LEN`: v4 short-form header.
const XFS_BTREE_SBLOCK_LEN: usize = 16;
/// `XFS_BTREE_SBLOCK_CRC_LEN`: v5 short-form header.
const XFS_BTREE_SBLOCK_CRC_LEN: usize = 56;
/// `struct xfs_alloc_rec` / `xfs_alloc_key`: start block and block count, 4 bytes each.
const ALLOC_REC_LEN: usize = 8;
/// `xfs_alloc_ptr_t`: an AG block number.
const ALLOC_PTR_LEN: usize = 4;
/// Deepest bnobt accepted. Real trees are at most 5 levels deep even for 1 TiB AGs of 512-byte
/// blocks; more means a corrupt level field or a loop.
const MAX_BTREE_LEVELS: u32 = 8;
/// Sectors of 512 bytes, the unit of `bb_blkno` and of the log (`BBSHIFT`).
const BBSHIFT: u32 = 9;
const BBSIZE: u64 = 1 << BBSHIFT;

// Log (fs/xfs/libxfs/xfs_log_format.h, fs/xfs/xfs_log_priv.h, fs/xfs/xfs_log_recover.c).
/// `XLOG_HEADER_MAGIC_NUM`: first word of a log record header.
const XLOG_HEADER_MAGIC_NUM: u32 = 0xFEED_BABE;
// Offsets in `struct xlog_rec_header`.
const H_CYCLE: usize = 4;
const H_VERSION: usize = 8;
const H_LEN: usize = 12;
const H_NUM_LOGOPS: usize = 40;
const H_SIZE: usize = 320;
/// `XLOG_VERSION_2`.
const XLOG_VERSION_2: u32 = 2;
/// `XLOG_HEADER_CYCLE_SIZE`: record data covered by one header block.
const XLOG_HEADER_CYCLE_SIZE: u32 = 32 << 10;
/// `XLOG_MAX_RECORD_BSIZE`: largest log record.
const XLOG_MAX_RECORD_BSIZE: u32 = 256 << 10;
/// `oh_flags` in `struct xlog_op_header` (after `oh_tid`, `oh_len`, `oh_clientid`).
const OH_FLAGS: usize = 9;
/// `XLOG_UNMOUNT_TRANS`: the operation is an unmount record.
const XLOG_UNMOUNT_TRANS: u8 = 0x20;
/// `XLOG_TOTAL_REC_SHIFT`: blocks the in-core logs can have in flight (`XLOG_MAX_ICLOGS` = 8
/// records of 2^`XLOG_MAX_RECORD_BSHIFT` (v2) or 2^`XLOG_BIG_RECORD_BSHIFT` (v1) bytes), the
/// window `xlog_find_head` re-checks for torn writes.
const TOTAL_REC_BBS_V2: u64 = (8 << 18) / BBSIZE;
const TOTAL_REC_BBS_V1: u64 = (8 << 15) / BBSIZE;
/// Log blocks read per request while scanning.
const LOG_CHUNK_BBS: u64 = 256;

/// The used ranges of an unmounted XFS whose superblock is at `base`, size `len` bytes.
/// Ranges are relative to `base`, sorted, merged, within [0, len).
pub fn xfs_used(
    dev: &(impl ReadAt + ?Sized),
    base: u64,
    len: u64,
) -> Result<Vec<Range>, AllocError> {
    let raw = read_vec(dev, base, 0, SB_READ, "XFS superblock")?;
    let sb = Sb::parse(&raw, len)?;
    check_log(dev, base, &sb)?;
    let mut set = RangeSet::new(sb.dblocks * sb.block_size);
    set.push(0, ALWAYS_USED);
    for agno in 0..sb.agcount {
        scan_ag(dev, base, &sb, agno, &mut set)?;
    }
    Ok(set.finish())
}

fn corrupt(msg: impl Into<String>) -> AllocError {
    AllocError::Corrupt(format!("XFS: {}", msg.into()))
}

fn unsupported(msg: impl Into<String>) -> AllocError {
    AllocError::Unsupported(format!("XFS: {}", msg.into()))
}

/// The validated superblock fields used here.
#[derive(Debug)]
struct Sb {
    block_size: u64,
    blocklog: u32,
    sectsize: u64,
    dblocks: u64,
    agblocks: u64,
    agcount: u64,
    agblklog: u32,
    v5: bool,
    logv2: bool,
    /// UUID stamped in v5 metadata blocks.
    meta_uuid: [u8; 16],
    logstart: u64,
    logblocks: u64,
}

impl Sb {
    fn parse(raw: &[u8], len: u64) -> Result<Self, AllocError> {
        let f = Fields::new(raw, "XFS superblock");
        if f.be32(SB_MAGICNUM)? != XFS_SB_MAGIC {
            return Err(AllocError::BadMagic("XFS"));
        }
        let version = f.be16(SB_VERSIONNUM)?;
        let v5 = match version & XFS_SB_VERSION_NUMBITS {
            XFS_SB_VERSION_4 => false,
            XFS_SB_VERSION_5 => true,
            v => return Err(unsupported(format!("superblock version {v}"))),
        };
        if f.u8(SB_INPROGRESS)? != 0 {
            return Err(unsupported("mkfs did not finish (sb_inprogress)"));
        }
        let incompat = if v5 { f.be32(SB_FEATURES_INCOMPAT)? } else { 0 };
        if incompat & XFS_SB_FEAT_INCOMPAT_NEEDSREPAIR != 0 {
            return Err(unsupported("flagged as needing xfs_repair"));
        }
        let blocklog = f.u8(SB_BLOCKLOG)?;
        let block_size = u64::from(f.be32(SB_BLOCKSIZE)?);
        if !BLOCKLOG.contains(&blocklog) || block_size != 1 << blocklog {
            return Err(corrupt(format!("block size {block_size} (log {blocklog})")));
        }
        let sectlog = f.u8(SB_SECTLOG)?;
        let sectsize = u64::from(f.be16(SB_SECTSIZE)?);
        if !SECTLOG.contains(&sectlog) || sectsize != 1 << sectlog || sectsize > block_size {
            return Err(corrupt(format!("sector size {sectsize} (log {sectlog})")));
        }
        let agblocks = u64::from(f.be32(SB_AGBLOCKS)?);
        let agcount = u64::from(f.be32(SB_AGCOUNT)?);
        let agblklog = u32::from(f.u8(SB_AGBLKLOG)?);
        let dblocks = f.be64(SB_DBLOCKS)?;
        if agblocks < XFS_MIN_AG_BLOCKS
            || agblocks.saturating_mul(block_size) > XFS_MAX_AG_BYTES
            || agblklog != u64::BITS - (agblocks - 1).leading_zeros()
        {
            return Err(corrupt(format!(
                "{agblocks} blocks per AG (log {agblklog})"
            )));
        }
        // xfs_validate_sb_common: the last AG is non-empty and no longer than the others.
        let full = agcount.checked_sub(1).and_then(|n| n.checked_mul(agblocks));
        match full {
            Some(before_last) if dblocks > before_last && dblocks - before_last <= agblocks => {}
            _ => {
                return Err(corrupt(format!(
                    "{dblocks} blocks in {agcount} AGs of {agblocks}"
                )))
            }
        }
        let fs_bytes = mul(dblocks, block_size, "filesystem size")?;
        if fs_bytes > len {
            return Err(corrupt(format!(
                "filesystem of {fs_bytes} bytes in a region of {len}"
            )));
        }
        let meta_uuid = if incompat & XFS_SB_FEAT_INCOMPAT_META_UUID != 0 {
            f.bytes(SB_META_UUID)?
        } else {
            f.bytes(SB_UUID)?
        };
        Ok(Self {
            block_size,
            blocklog: u32::from(blocklog),
            sectsize,
            dblocks,
            agblocks,
            agcount,
            agblklog,
            v5,
            logv2: v5 || version & XFS_SB_VERSION_LOGV2BIT != 0,
            meta_uuid,
            logstart: f.be64(SB_LOGSTART)?,
            logblocks: u64::from(f.be32(SB_LOGBLOCKS)?),
        })
    }

    fn ag_len(&self, agno: u64) -> u64 {
        (self.dblocks - agno * self.agblocks).min(self.agblocks)
    }

    /// Byte offset of block `agbno` of AG `agno`.
    fn byte(&self, agno: u64, agbno: u64) -> u64 {
        (agno * self.agblocks + agbno) * self.block_size
    }
}

/// Adds the used ranges of AG `agno`: everything but the bnobt's free extents.
fn scan_ag(
    dev: &(impl ReadAt + ?Sized),
    base: u64,
    sb: &Sb,
    agno: u64,
    set: &mut RangeSet,
) -> Result<(), AllocError> {
    let ag_len = sb.ag_len(agno);
    let raw = read_vec(
        dev,
        base,
        sb.byte(agno, 0) + sb.sectsize,
        AGF_READ,
        "XFS AGF",
    )?;
    let f = Fields::new(&raw, "XFS AGF");
    if f.be32(AGF_MAGICNUM)? != XFS_AGF_MAGIC {
        return Err(corrupt(format!("AG {agno}: bad AGF magic")));
    }
    if f.be32(AGF_VERSIONNUM)? != XFS_AGF_VERSION
        || u64::from(f.be32(AGF_SEQNO)?) != agno
        || u64::from(f.be32(AGF_LENGTH)?) != ag_len
    {
        return Err(corrupt(format!(
            "AG {agno}: AGF version, number or length wrong"
        )));
    }
    let root = u64::from(f.be32(AGF_BNO_ROOT)?);
    let levels = f.be32(AGF_BNO_LEVEL)?;
    if levels == 0 || levels > MAX_BTREE_LEVELS {
        return Err(corrupt(format!("AG {agno}: bnobt of {levels} levels")));
    }
    let mut walk = Walk {
        dev,
        base,
        sb,
        agno,
        ag_len,
        hdr: if sb.v5 {
            XFS_BTREE_SBLOCK_CRC_LEN
        } else {
            XFS_BTREE_SBLOCK_LEN
        },
        magic: if sb.v5 {
            XFS_ABTB_CRC_MAGIC
        } else {
            XFS_ABTB_MAGIC
        },
        cursor: 0,
        free: 0,
        visits: 0,
        set,
    };
    walk.visit(root, levels - 1, None)?;
    let Walk { cursor, free, .. } = walk;
    set.push(sb.byte(agno, cursor), sb.byte(agno, ag_len));
    // The AGF counter is updated in the same transactions as the tree: a mismatch means the
    // tree (or the AGF) is not what the filesystem believes.
    let agf_free = u64::from(f.be32(AGF_FREEBLKS)?);
    if free != agf_free {
        return Err(corrupt(format!(
            "AG {agno}: bnobt holds {free} free blocks, AGF says {agf_free}"
        )));
    }
    Ok(())
}

/// An in-order walk of one AG's bnobt, emitting the used gaps between free extents.
struct Walk<'a, D: ReadAt + ?Sized> {
    dev: &'a D,
    base: u64,
    sb: &'a Sb,
    agno: u64,
    ag_len: u64,
    hdr: usize,
    magic: u32,
    /// AG block after the last free extent seen; records must not go back before it.
    cursor: u64,
    free: u64,
    visits: u64,
    set: &'a mut RangeSet,
}

impl<D: ReadAt + ?Sized> Walk<'_, D> {
    /// Visits block `agbno`, which must be at `level`; `key` is the parent's key for it.
    fn visit(&mut self, agbno: u64, level: u32, key: Option<u32>) -> Result<(), AllocError> {
        let agno = self.agno;
        let sb = self.sb;
        let bad = |msg: String| corrupt(format!("AG {agno} bnobt block {agbno}: {msg}"));
        // Each block of a sound tree is visited once, and a tree cannot be bigger than its AG.
        self.visits += 1;
        if self.visits > self.ag_len {
            return Err(bad("more blocks visited than the AG has (loop)".into()));
        }
        if agbno * sb.block_size < AG_HEADER_SECTORS * sb.sectsize || agbno >= self.ag_len {
            return Err(bad("pointer outside the AG".into()));
        }
        let bs = usize::try_from(sb.block_size).map_err(|_| bad("block size".into()))?;
        let raw = read_vec(
            self.dev,
            self.base,
            sb.byte(agno, agbno),
            bs,
            "XFS bnobt block",
        )?;
        let f = Fields::new(&raw, "XFS bnobt block");
        if f.be32(BB_MAGIC)? != self.magic {
            return Err(bad("bad magic".into()));
        }
        let got = u32::from(f.be16(BB_LEVEL)?);
        if got != level {
            return Err(bad(format!("level {got}, expected {level}")));
        }
        if self.sb.v5 {
            let daddr = (agno * sb.agblocks + agbno) << (sb.blocklog - BBSHIFT);
            if f.be64(BB_BLKNO)? != daddr
                || u64::from(f.be32(BB_OWNER)?) != agno
                || f.bytes::<16>(BB_UUID)? != sb.meta_uuid
            {
                return Err(bad(
                    "block number, owner or UUID stamp wrong (stale block)".into()
                ));
            }
        }
        let numrecs = usize::from(f.be16(BB_NUMRECS)?);
        // Only an empty root leaf (no free space in the AG) may have no records.
        if numrecs == 0 && key.is_some() {
            return Err(bad("empty non-root block".into()));
        }
        if level == 0 {
            let maxrecs = (bs - self.hdr) / ALLOC_REC_LEN;
            if numrecs > maxrecs {
                return Err(bad(format!("{numrecs} records, at most {maxrecs} fit")));
            }
            for i in 0..numrecs {
                let at = self.hdr + i * ALLOC_REC_LEN;
                let start = f.be32(at)?;
                let count = u64::from(f.be32(at + 4)?);
                if i == 0 && key.is_some_and(|k| k != start) {
                    return Err(bad("first record does not match the parent's key".into()));
                }
                let start = u64::from(start);
                if count == 0 || start < self.cursor || start + count > self.ag_len {
                    return Err(bad(format!(
                        "free extent {start}+{count} out of order or range"
                    )));
                }
                self.set
                    .push(sb.byte(agno, self.cursor), sb.byte(agno, start));
                self.cursor = start + count;
                self.free += count;
            }
        } else {
            let maxrecs = (bs - self.hdr) / (ALLOC_REC_LEN + ALLOC_PTR_LEN);
            if numrecs > maxrecs {
                return Err(bad(format!("{numrecs} keys, at most {maxrecs} fit")));
            }
            let ptrs = self.hdr + maxrecs * ALLOC_REC_LEN;
            for i in 0..numrecs {
                let k = f.be32(self.hdr + i * ALLOC_REC_LEN)?;
                if i == 0 && key.is_some_and(|p| p != k) {
                    return Err(bad("first key does not match the parent's key".into()));
                }
                let child = u64::from(f.be32(ptrs + i * ALLOC_PTR_LEN)?);
                self.visit(child, level - 1, Some(k))?;
            }
        }
        Ok(())
    }
}

/// Refuses the filesystem unless its internal log ends with an unmount record.
fn check_log(dev: &(impl ReadAt + ?Sized), base: u64, sb: &Sb) -> Result<(), AllocError> {
    if sb.logstart == 0 {
        return Err(unsupported("external log: cannot check that it is clean"));
    }
    let agno = sb.logstart >> sb.agblklog;
    let agbno = sb.logstart & ((1 << sb.agblklog) - 1);
    if agno >= sb.agcount
        || sb.logblocks == 0
        || agbno.saturating_add(sb.logblocks) > sb.ag_len(agno)
    {
        return Err(corrupt(format!(
            "log of {} blocks at {} outside its AG",
            sb.logblocks, sb.logstart
        )));
    }
    let log = Log {
        dev,
        start: base
            .checked_add(sb.byte(agno, agbno))
            .ok_or_else(|| corrupt("log offset overflows"))?,
        bbs: sb.logblocks * sb.block_size / BBSIZE,
        window: if sb.logv2 {
            TOTAL_REC_BBS_V2
        } else {
            TOTAL_REC_BBS_V1
        },
    };
    if log.is_clean()? {
        Ok(())
    } else {
        Err(unsupported(
            "log is dirty (mounted, or not cleanly unmounted): run xfs_repair or mount once",
        ))
    }
}

/// The internal log: `bbs` blocks of 512 bytes at byte `start` of `dev`.
struct Log<'a, D: ReadAt + ?Sized> {
    dev: &'a D,
    start: u64,
    bbs: u64,
    window: u64,
}

impl<D: ReadAt + ?Sized> Log<'_, D> {
    fn block(&self, bb: u64) -> Result<Vec<u8>, AllocError> {
        read_vec(
            self.dev,
            self.start,
            (bb % self.bbs) * BBSIZE,
            512,
            "XFS log",
        )
    }

    /// `xlog_get_cycle`: the cycle stamped in the first word of every log block (in the
    /// second word of a record header, whose first word is the magic).
    fn cycle_of(raw: &[u8]) -> Result<u32, AllocError> {
        let f = Fields::new(raw, "XFS log block");
        let w = f.be32(0)?;
        if w == XLOG_HEADER_MAGIC_NUM {
            f.be32(H_CYCLE)
        } else {
            Ok(w)
        }
    }

    fn cycle(&self, bb: u64) -> Result<u32, AllocError> {
        Self::cycle_of(&self.block(bb)?)
    }

    /// `xlog_find_verify_cycle`: the first block in `[from, to)` stamped `cycle`.
    fn first_with(&self, from: u64, to: u64, cycle: u32) -> Result<Option<u64>, AllocError> {
        let mut bb = from;
        while bb < to {
            let n = (to - bb).min(LOG_CHUNK_BBS);
            let len = usize::try_from(n * BBSIZE).map_err(|_| corrupt("log chunk"))?;
            let raw = read_vec(self.dev, self.start, bb * BBSIZE, len, "XFS log")?;
            for (i, blk) in raw.chunks_exact(512).enumerate() {
                if Self::cycle_of(blk)? == cycle {
                    return Ok(Some(bb + i as u64));
                }
            }
            bb += n;
        }
        Ok(None)
    }

    /// `xlog_find_head`: the block after the last one written.
    fn head(&self) -> Result<u64, AllocError> {
        let n = self.bbs;
        let first = self.cycle(0)?;
        let last = self.cycle(n - 1)?;
        let (mut head, stop) = if first == last {
            // The whole log carries one cycle: the head is at the physical end unless a hole
            // of the previous cycle shows otherwise.
            (n, last.wrapping_sub(1))
        } else {
            // `xlog_find_cycle_start`: binary search for the first block of cycle `last`.
            let (mut lo, mut hi) = (0, n - 1);
            let mut mid = (lo + hi) / 2;
            while mid != lo && mid != hi {
                if self.cycle(mid)? == last {
                    hi = mid;
                } else {
                    lo = mid;
                }
                mid = (lo + hi) / 2;
            }
            (hi, last)
        };
        // Writes in flight may have landed out of order: re-check the window before the head
        // for blocks still carrying `stop`, and move the head back to the first one.
        let scan = n.min(self.window);
        if head >= scan {
            if let Some(b) = self.first_with(head - scan, head, stop)? {
                head = b;
            }
        } else if let Some(b) = self.first_with(n - (scan - head), n, stop.wrapping_sub(1))? {
            head = b;
        } else if let Some(b) = self.first_with(0, head, stop)? {
            head = b;
        }
        Ok(head % n)
    }

    /// Whether the last record before the head is an unmount record and nothing follows it.
    fn is_clean(&self) -> Result<bool, AllocError> {
        if self.bbs < 2 {
            return Err(corrupt(format!("log of {} sectors", self.bbs)));
        }
        // xlog_find_zeroed: a never-written log has nothing to replay.
        if self.cycle(0)? == 0 {
            return Ok(true);
        }
        let head = self.head()?;
        // The header of the last record is at most one maximal record (plus its extra header
        // blocks) before the head.
        let back = (u64::from(XLOG_MAX_RECORD_BSIZE) / BBSIZE + 16).min(self.bbs);
        for i in 1..=back {
            let rec = (head + self.bbs - i) % self.bbs;
            let raw = self.block(rec)?;
            let f = Fields::new(&raw, "XFS log record header");
            if f.be32(0)? != XLOG_HEADER_MAGIC_NUM {
                continue;
            }
            let version = f.be32(H_VERSION)?;
            let h_len = f.be32(H_LEN)?;
            let h_size = f.be32(H_SIZE)?;
            if h_len > XLOG_MAX_RECORD_BSIZE || h_size > XLOG_MAX_RECORD_BSIZE {
                return Ok(false);
            }
            // xlog_logrec_hblks: big v2 records carry extra header blocks.
            let hblks = if version & XLOG_VERSION_2 != 0 && h_size > XLOG_HEADER_CYCLE_SIZE {
                u64::from(h_size.div_ceil(XLOG_HEADER_CYCLE_SIZE))
            } else {
                1
            };
            let end = (rec + hblks + u64::from(h_len).div_ceil(BBSIZE)) % self.bbs;
            if end != head || f.be32(H_NUM_LOGOPS)? != 1 {
                return Ok(false);
            }
            let op = self.block(rec + hblks)?;
            return Ok(Fields::new(&op, "XFS log op").u8(OH_FLAGS)? & XLOG_UNMOUNT_TRANS != 0);
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::merge;
    use crate::alloc::testfs::*;
    use crate::testutil::xorshift;
    use std::fs::File;
    use std::path::Path;

    const BS: usize = 4096;
    const AGBLOCKS: u32 = 128;
    const DBLOCKS: u32 = 200;
    const UUID: [u8; 16] = *b"0123456789abcdef";

    fn put16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }
    fn byte(x: &mut u64) -> u8 {
        xorshift(x).to_le_bytes()[0]
    }
    fn blk(agno: u32, agbno: u32) -> usize {
        usize::try_from((agno * AGBLOCKS + agbno) as u64 * BS as u64).unwrap()
    }

    /// A bnobt block with short-form header at AG `agno` block `agbno`.
    fn btree_block(
        img: &mut [u8],
        v5: bool,
        agno: u32,
        agbno: u32,
        level: u16,
        recs: &[(u32, u32)],
        ptrs: &[u32],
    ) {
        let b = &mut img[blk(agno, agbno)..blk(agno, agbno) + BS];
        put32(
            b,
            BB_MAGIC,
            if v5 {
                XFS_ABTB_CRC_MAGIC
            } else {
                XFS_ABTB_MAGIC
            },
        );
        put16(b, BB_LEVEL, level);
        put16(b, BB_NUMRECS, u16::try_from(recs.len()).unwrap());
        put32(b, 8, u32::MAX);
        put32(b, 12, u32::MAX);
        let hdr = if v5 {
            XFS_BTREE_SBLOCK_CRC_LEN
        } else {
            XFS_BTREE_SBLOCK_LEN
        };
        if v5 {
            put64(
                b,
                BB_BLKNO,
                u64::from(agno * AGBLOCKS + agbno) * (BS as u64 / 512),
            );
            b[BB_UUID..BB_UUID + 16].copy_from_slice(&UUID);
            put32(b, BB_OWNER, agno);
        }
        for (i, &(s, c)) in recs.iter().enumerate() {
            put32(b, hdr + i * 8, s);
            put32(b, hdr + i * 8 + 4, c);
        }
        let maxrecs = (BS - hdr) / 12;
        for (i, &p) in ptrs.iter().enumerate() {
            put32(b, hdr + maxrecs * 8 + i * 4, p);
        }
    }

    fn agf(img: &mut [u8], agno: u32, root: u32, level: u32, free: u32) {
        let len = (DBLOCKS - agno * AGBLOCKS).min(AGBLOCKS);
        let a = &mut img[blk(agno, 0) + 512..blk(agno, 0) + 1024];
        put32(a, AGF_MAGICNUM, XFS_AGF_MAGIC);
        put32(a, AGF_VERSIONNUM, XFS_AGF_VERSION);
        put32(a, AGF_SEQNO, agno);
        put32(a, AGF_LENGTH, len);
        put32(a, AGF_BNO_ROOT, root);
        put32(a, AGF_BNO_LEVEL, level);
        put32(a, AGF_FREEBLKS, free);
    }

    /// 2 AGs of 128 and 72 blocks, a zeroed 8-block log at AG 0 block 100. Free: AG 0
    /// [20, 100) and [108, 128) in a root leaf; AG 1 [10, 30) and [40, 72) in two leaves under
    /// a root node.
    fn crafted(v5: bool) -> Vec<u8> {
        let mut img = vec![0u8; DBLOCKS as usize * BS];
        let s = &mut img[..512];
        put32(s, SB_MAGICNUM, XFS_SB_MAGIC);
        put32(s, SB_BLOCKSIZE, 4096);
        put64(s, SB_DBLOCKS, u64::from(DBLOCKS));
        s[SB_UUID..SB_UUID + 16].copy_from_slice(&UUID);
        put64(s, SB_LOGSTART, 100);
        put32(s, SB_AGBLOCKS, AGBLOCKS);
        put32(s, SB_AGCOUNT, 2);
        put32(s, SB_LOGBLOCKS, 8);
        put16(
            s,
            SB_VERSIONNUM,
            if v5 { 5 } else { 4 | XFS_SB_VERSION_LOGV2BIT },
        );
        put16(s, SB_SECTSIZE, 512);
        s[SB_BLOCKLOG] = 12;
        s[SB_SECTLOG] = 9;
        s[SB_AGBLKLOG] = 7;
        agf(&mut img, 0, 1, 1, 100);
        btree_block(&mut img, v5, 0, 1, 0, &[(20, 80), (108, 20)], &[]);
        agf(&mut img, 1, 1, 2, 52);
        btree_block(&mut img, v5, 1, 1, 1, &[(10, 0), (40, 0)], &[2, 3]);
        btree_block(&mut img, v5, 1, 2, 0, &[(10, 20)], &[]);
        btree_block(&mut img, v5, 1, 3, 0, &[(40, 32)], &[]);
        img
    }

    fn bytes(a: usize, b: usize) -> Range {
        (a * BS) as u64..(b * BS) as u64
    }

    #[test]
    fn crafted_v4_and_v5_give_exact_ranges() {
        for v5 in [false, true] {
            let img = crafted(v5);
            let r = xfs_used(&img, 0, img.len() as u64).unwrap();
            assert_eq!(
                r,
                vec![
                    bytes(0, 20),
                    bytes(100, 108),
                    bytes(128, 138),
                    bytes(158, 168)
                ],
                "v5={v5}"
            );
        }
    }

    /// Sectors of the crafted log (8 blocks at AG 0 block 100).
    const LOG_BBS: u32 = 64;

    /// Stamps every sector of the crafted log with `cycle(bb)` and writes record headers
    /// `(bb, h_len, h_num_logops, oh_flags of the first op)` (data block right after).
    fn write_log(img: &mut [u8], cycle: impl Fn(u32) -> u32, recs: &[(u32, u32, u32, u8)]) {
        let log = blk(0, 100);
        let at = |bb: u32| log + usize::try_from(bb).unwrap() * 512;
        for bb in 0..LOG_BBS {
            put32(&mut img[at(bb)..], 0, cycle(bb));
        }
        for &(bb, len, ops, flags) in recs {
            let h = &mut img[at(bb)..];
            put32(h, 0, XLOG_HEADER_MAGIC_NUM);
            put32(h, H_CYCLE, cycle(bb));
            put32(h, H_VERSION, XLOG_VERSION_2);
            put32(h, H_LEN, len);
            put32(h, H_NUM_LOGOPS, ops);
            put32(h, H_SIZE, XLOG_HEADER_CYCLE_SIZE);
            img[at(bb + 1) + OH_FLAGS] = flags;
        }
    }

    fn log_state(img: &[u8]) -> Result<(), AllocError> {
        xfs_used(img, 0, img.len() as u64).map(|_| ())
    }

    /// The log head is found as `xlog_find_head` does, and only an unmount record right
    /// before it counts as clean.
    #[test]
    fn crafted_log_head_and_unmount_record() {
        let dirty = |r: Result<(), AllocError>| matches!(r, Err(AllocError::Unsupported(_)));
        let mut img = crafted(true);
        // First cycle, as mkfs leaves it: unmount record in sectors 0-1, the rest never written.
        let first = |bb| u32::from(bb < 2);
        write_log(&mut img, first, &[(0, 20, 1, XLOG_UNMOUNT_TRANS)]);
        assert!(log_state(&img).is_ok());
        write_log(&mut img, first, &[(0, 20, 1, 0)]);
        assert!(
            dirty(log_state(&img)),
            "a transaction, not an unmount record"
        );
        write_log(&mut img, first, &[(0, 20, 2, XLOG_UNMOUNT_TRANS)]);
        assert!(
            dirty(log_state(&img)),
            "unmount record with other operations"
        );
        // A further sector written after the unmount record: the head moved past it.
        write_log(
            &mut img,
            |bb| u32::from(bb < 3),
            &[(0, 20, 1, XLOG_UNMOUNT_TRANS)],
        );
        assert!(dirty(log_state(&img)));

        // Wrapped: cycle 2 up to sector 10, cycle 1 after it.
        let wrapped = |bb| if bb < 10 { 2 } else { 1 };
        let recs = [
            (20, 1024, 3, 0),
            (4, 1536, 3, 0),
            (8, 20, 1, XLOG_UNMOUNT_TRANS),
        ];
        write_log(&mut img, wrapped, &recs);
        assert!(log_state(&img).is_ok());
        // A torn write: sector 6 still carries the old cycle, so the head is there and the
        // last complete record before it is a transaction.
        write_log(&mut img, |bb| if bb == 6 { 1 } else { wrapped(bb) }, &recs);
        assert!(dirty(log_state(&img)));

        // Head at the physical end: every sector in cycle 3, unmount record in the last two.
        write_log(
            &mut img,
            |_| 3,
            &[(30, 512, 3, 0), (62, 20, 1, XLOG_UNMOUNT_TRANS)],
        );
        assert!(log_state(&img).is_ok());
        // The same, with no record header anywhere near the head.
        write_log(&mut img, |_| 3, &[]);
        assert!(dirty(log_state(&img)));
    }

    #[test]
    fn crafted_errors_are_typed() {
        let len = crafted(true).len() as u64;
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut img = crafted(true);
            f(&mut img);
            xfs_used(&img, 0, len)
        };
        let corrupt = |f: &dyn Fn(&mut Vec<u8>)| matches!(with(f), Err(AllocError::Corrupt(_)));
        assert!(matches!(
            with(&|i| put32(i, SB_MAGICNUM, 1)),
            Err(AllocError::BadMagic(_))
        ));
        assert!(matches!(
            with(&|i| put16(i, SB_VERSIONNUM, 3)),
            Err(AllocError::Unsupported(_))
        ));
        assert!(corrupt(&|i| put32(i, SB_BLOCKSIZE, 8192)));
        assert!(corrupt(&|i| put32(i, SB_AGCOUNT, 3)));
        assert!(corrupt(&|i| put32(i, SB_AGCOUNT, 1)));
        assert!(corrupt(&|i| put32(i, SB_AGBLOCKS, 32)));
        assert!(corrupt(&|i| put64(i, SB_DBLOCKS, 1 << 40)));
        assert!(corrupt(&|i| put64(i, SB_LOGSTART, 125)));
        assert!(matches!(
            with(&|i| put64(i, SB_LOGSTART, 0)),
            Err(AllocError::Unsupported(_))
        ));
        // AGF and tree pointers.
        assert!(corrupt(&|i| put32(i, blk(1, 0) + 512 + AGF_MAGICNUM, 0)));
        assert!(corrupt(&|i| put32(i, blk(1, 0) + 512 + AGF_SEQNO, 0)));
        for root in [0, 72, u32::MAX] {
            assert!(
                corrupt(&|i| put32(i, blk(1, 0) + 512 + AGF_BNO_ROOT, root)),
                "{root}"
            );
        }
        assert!(corrupt(&|i| put32(i, blk(1, 0) + 512 + AGF_BNO_LEVEL, 9)));
        assert!(corrupt(&|i| put32(i, blk(1, 0) + 512 + AGF_BNO_LEVEL, 3)));
        assert!(corrupt(&|i| put32(i, blk(0, 0) + 512 + AGF_FREEBLKS, 99)));
        // A node pointing to itself (level mismatch), twice to the same leaf (records repeat),
        // a leaf record past the AG, overlapping records, a stale v5 block.
        assert!(corrupt(&|i| btree_block(
            i,
            true,
            1,
            1,
            1,
            &[(10, 0), (40, 0)],
            &[2, 1]
        )));
        assert!(corrupt(&|i| btree_block(
            i,
            true,
            1,
            1,
            1,
            &[(10, 0), (10, 0)],
            &[2, 2]
        )));
        assert!(corrupt(&|i| btree_block(
            i,
            true,
            1,
            3,
            0,
            &[(40, 33)],
            &[]
        )));
        assert!(corrupt(&|i| btree_block(
            i,
            true,
            0,
            1,
            0,
            &[(20, 90), (108, 10)],
            &[]
        )));
        assert!(corrupt(&|i| put64(i, blk(1, 3) + BB_BLKNO, 0)));
        assert!(corrupt(&|i| put16(i, blk(0, 1) + BB_NUMRECS, 600)));
        // Truncated device, and a region smaller than the filesystem.
        let img = crafted(true);
        assert!(matches!(
            xfs_used(&img[..100], 0, len),
            Err(AllocError::Io { .. })
        ));
        assert!(matches!(
            xfs_used(&img[..blk(1, 1)], 0, len),
            Err(AllocError::Io { .. })
        ));
        assert!(matches!(
            xfs_used(&img, 0, len - 1),
            Err(AllocError::Corrupt(_))
        ));
    }

    /// A chain of nodes deeper than [`MAX_BTREE_LEVELS`] is refused even when consistent.
    #[test]
    fn crafted_deep_tree_is_refused() {
        let mut img = crafted(false);
        for level in 1..=9u16 {
            let b = u32::from(level) + 1;
            btree_block(&mut img, false, 1, b, level, &[(10, 0)], &[b - 1]);
        }
        btree_block(&mut img, false, 1, 1, 0, &[(10, 62)], &[]);
        agf(&mut img, 1, 10, 10, 62);
        assert!(matches!(
            xfs_used(&img, 0, img.len() as u64),
            Err(AllocError::Corrupt(_))
        ));
        agf(&mut img, 1, 9, 9, 62);
        assert!(matches!(
            xfs_used(&img, 0, img.len() as u64),
            Err(AllocError::Corrupt(_))
        ));
        agf(&mut img, 1, 8, 8, 62);
        assert!(xfs_used(&img, 0, img.len() as u64).is_ok());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0xfeed_u64;
        let good = crafted(true);
        let mut img = good.clone();
        for round in 0..3000 {
            img.copy_from_slice(&good);
            if round % 3 == 0 {
                for v in img[..3 * BS].iter_mut() {
                    *v = byte(&mut x);
                }
                put32(&mut img, SB_MAGICNUM, XFS_SB_MAGIC);
            } else {
                for _ in 0..1 + xorshift(&mut x) % 8 {
                    let ag = blk(u32::from(byte(&mut x) & 1), 0);
                    let at = ag + usize::try_from(xorshift(&mut x) % (4 * BS as u64)).unwrap();
                    img[at] = byte(&mut x);
                }
            }
            let len = xorshift(&mut x) % (2 * img.len() as u64);
            if let Ok(r) = xfs_used(&img, 0, len) {
                assert_well_formed(&r, len);
            }
        }
    }

    fn case<'a>(
        label: &'a str,
        mkfs: &'a [&'a str],
        size: u64,
        fragment: usize,
        frag_block: usize,
    ) -> Case<'a> {
        Case {
            label,
            mkfs,
            size,
            fragment,
            frag_block,
            offline: |f, len| xfs_used(f, 0, len),
            fsck: &["xfs_repair", "-n", "-f"],
            ro_opts: "ro,nouuid",
        }
    }

    /// `p FIELD` of `xfs_db -r -c CMD` as a number.
    fn xfs_db(img: &Path, cmd: &str, field: &str) -> u64 {
        let out = run(
            "xfs_db",
            &["-r", "-c", cmd, "-c", &format!("p {field}"), path(img)],
        );
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{field} = ")))
            .map(str::trim)
            .map(|v| match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
                None => v.parse().unwrap(),
            })
            .unwrap()
    }

    #[test]
    fn real_xfs_v5() {
        roundtrip(
            &case("xfs v5", &["mkfs.xfs", "-q", "-f"], 512 << 20, 0, 0),
            |img| {
                assert_eq!(xfs_db(img, "sb 0", "versionnum") & 0xf, 5);
            },
        );
    }

    /// Seven AGs on 512 MiB: the last one is shorter.
    #[test]
    fn real_xfs_short_last_ag() {
        let mkfs = ["mkfs.xfs", "-q", "-f", "-d", "agcount=7"];
        roundtrip(&case("xfs agcount=7", &mkfs, 512 << 20, 0, 0), |img| {
            let (ag, n, d) = (
                xfs_db(img, "sb 0", "agblocks"),
                xfs_db(img, "sb 0", "agcount"),
                xfs_db(img, "sb 0", "dblocks"),
            );
            assert!(
                n >= 7 && d < n * ag,
                "agcount {n}, agblocks {ag}, dblocks {d}"
            );
        });
    }

    /// 1 KiB blocks and thousands of holes: the bnobt grows to more than one level.
    #[test]
    fn real_xfs_multilevel_bnobt() {
        let mkfs = ["mkfs.xfs", "-q", "-f", "-b", "size=1024", "-d", "agcount=2"];
        roundtrip(
            &case("xfs 1K fragmented", &mkfs, 512 << 20, 3000, 1024),
            |img| {
                let levels: Vec<u64> = (0..2)
                    .map(|ag| xfs_db(img, &format!("agf {ag}"), "bnolevel"))
                    .collect();
                assert!(levels.iter().any(|&l| l >= 2), "bnobt levels {levels:?}");
            },
        );
    }

    /// The kernel here cannot mount v4 (no CONFIG_XFS_SUPPORT_V4): populate with a mkfs
    /// protofile and read the copy's files back through `xfs_db` block maps.
    #[test]
    fn real_xfs_v4_offline() {
        require("mkfs.xfs");
        require("xfs_db");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let src = dir.join("src");
        let files = populate(&src, 4, 12 << 20, 30);
        let mut proto = String::from("/dev/null\n0 0\nd--755 0 0\n");
        proto_dir(&src, 1, &mut proto);
        proto.push_str("$\n");
        std::fs::write(dir.join("proto"), proto).unwrap();
        let img = dir.join("fs.img");
        let size = 512 << 20;
        sparse_image(&img, size);
        let (code, out) = status(
            "mkfs.xfs",
            &[
                "-q",
                "-f",
                "-m",
                "crc=0",
                "-p",
                path(&dir.join("proto")),
                path(&img),
            ],
        );
        assert_eq!(code, 0, "mkfs.xfs -m crc=0 is not available:\n{out}");
        assert_eq!(xfs_db(&img, "sb 0", "versionnum") & 0xf, 4);
        let used = xfs_used(&File::open(&img).unwrap(), 0, size).unwrap();
        assert_well_formed(&used, size);
        let copy = dir.join("copy.img");
        copy_ranges(&img, &copy, &used);
        let (code, out) = status("xfs_repair", &["-n", "-f", path(&copy)]);
        assert_eq!(code, 0, "xfs_repair:\n{out}");
        let bs = xfs_db(&img, "sb 0", "blocksize");
        let ag = xfs_db(&img, "sb 0", "agblocks");
        let mut data = Vec::new();
        let copy_file = File::open(&copy).unwrap();
        for f in &files {
            let map = run(
                "xfs_db",
                &[
                    "-r",
                    "-c",
                    &format!("path /{}", f.rel.display()),
                    "-c",
                    "bmap",
                    path(&copy),
                ],
            );
            let mut content = vec![0u8; usize::try_from(f.size).unwrap()];
            for line in map.lines().filter(|l| l.starts_with("data offset")) {
                // "data offset 0 startblock 32780 (1/12) count 25 flag 0"
                let w: Vec<&str> = line.split_whitespace().collect();
                let off: u64 = w[2].parse().unwrap();
                let (a, b) = w[5]
                    .trim_matches(|c| c == '(' || c == ')')
                    .split_once('/')
                    .unwrap();
                let phys = (a.parse::<u64>().unwrap() * ag + b.parse::<u64>().unwrap()) * bs;
                let count: u64 = w[7].parse().unwrap();
                data.push(phys..phys + count * bs);
                for k in 0..count {
                    let lo = (off + k) * bs;
                    if lo >= f.size {
                        break;
                    }
                    let hi = (lo + bs).min(f.size);
                    let dst =
                        &mut content[usize::try_from(lo).unwrap()..usize::try_from(hi).unwrap()];
                    std::os::unix::fs::FileExt::read_exact_at(&copy_file, dst, phys + k * bs)
                        .unwrap();
                }
            }
            assert_eq!(blake3::hash(&content), f.hash, "{}", f.rel.display());
        }
        assert_eq!(uncovered(&used, &merge(data)), 0);
        assert!(total(&used) < size / 4);
    }

    /// Protofile lines for the tree under `dir`.
    fn proto_dir(dir: &Path, depth: usize, out: &mut String) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        let pad = " ".repeat(depth);
        for p in entries {
            let name = p.file_name().unwrap().to_str().unwrap();
            if p.is_dir() {
                out.push_str(&format!("{pad}{name} d--755 0 0\n"));
                proto_dir(&p, depth + 1, out);
                out.push_str(&format!("{pad}$\n"));
            } else {
                out.push_str(&format!("{pad}{name} ---644 0 0 {}\n", path(&p)));
            }
        }
    }

    /// A mounted filesystem with changes in its log is refused; after umount it is accepted.
    #[test]
    fn real_mounted_log_is_dirty() {
        require("mkfs.xfs");
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("fs.img");
        let size = 512 << 20;
        sparse_image(&img, size);
        run("mkfs.xfs", &["-q", "-f", path(&img)]);
        assert!(
            xfs_used(&File::open(&img).unwrap(), 0, size).is_ok(),
            "fresh mkfs log"
        );
        let m = Mount::new(&img, &tmp.path().join("mnt"), "");
        std::fs::write(tmp.path().join("mnt/x"), b"x").unwrap();
        run("sync", &[]);
        let r = xfs_used(&File::open(&img).unwrap(), 0, size);
        assert!(matches!(r, Err(AllocError::Unsupported(_))), "{r:?}");
        m.unmount();
        assert!(xfs_used(&File::open(&img).unwrap(), 0, size).is_ok());
    }

    /// Random byte changes in the AG headers and btree roots of a real filesystem.
    #[test]
    fn real_image_mutations_never_panic() {
        require("mkfs.xfs");
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("fs.img");
        let size = 512 << 20;
        sparse_image(&img, size);
        run("mkfs.xfs", &["-q", "-f", "-d", "agcount=4", path(&img)]);
        let file = File::open(&img).unwrap();
        xfs_used(&file, 0, size).unwrap();
        let ag_bytes = xfs_db(&img, "sb 0", "agblocks") * xfs_db(&img, "sb 0", "blocksize");
        let mut x = 1234u64;
        for _ in 0..1500 {
            let mut patches = Vec::new();
            for _ in 0..1 + xorshift(&mut x) % 4 {
                let at = (xorshift(&mut x) % 4) * ag_bytes + xorshift(&mut x) % (8 * 4096);
                patches.push((at, byte(&mut x)));
            }
            let dev = Patched {
                file: &file,
                patches,
            };
            if let Ok(r) = xfs_used(&dev, 0, size) {
                assert_well_formed(&r, size);
            }
        }
    }
}
