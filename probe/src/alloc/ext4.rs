//! Used ranges of an unmounted ext2/3/4 from its on-disk block (or, with bigalloc, cluster)
//! bitmaps.
//!
//! Layout and field offsets follow the kernel's `fs/ext4/ext4.h` (`struct ext4_super_block`,
//! `struct ext4_group_desc`) and the placement rules of `fs/ext4/balloc.c`
//! (`ext4_bg_has_super`, `ext4_num_base_meta_blocks`, `ext4_init_block_bitmap`) and
//! `fs/ext4/super.c` (`descriptor_loc`, `ext4_check_descriptors`).
//!
//! Beyond what the bitmaps say, every group's superblock/descriptor backups, block and inode
//! bitmaps and inode table are always reported, so groups flagged `BLOCK_UNINIT` (whose bitmap
//! the kernel computes instead of reading) and `flex_bg` packing need no special trust.
//! Filesystems whose bitmaps may be stale (journal needing recovery, not cleanly unmounted,
//! errors recorded) are refused as [`AllocError::Unsupported`].

use super::{mul, read_into, read_vec, AllocError, Fields, Range, RangeSet, ReadAt, ALWAYS_USED};

/// Byte offset of the primary superblock from the start of the filesystem.
const SUPERBLOCK_OFFSET: u64 = 1024;
/// Bytes of `struct ext4_super_block`.
const SUPERBLOCK_SIZE: usize = 1024;
/// `EXT4_SUPER_MAGIC`.
const EXT4_SUPER_MAGIC: u16 = 0xEF53;

// Offsets in `struct ext4_super_block` (fs/ext4/ext4.h).
const S_INODES_COUNT: usize = 0x00;
const S_BLOCKS_COUNT_LO: usize = 0x04;
const S_FIRST_DATA_BLOCK: usize = 0x14;
const S_LOG_BLOCK_SIZE: usize = 0x18;
const S_LOG_CLUSTER_SIZE: usize = 0x1C;
const S_BLOCKS_PER_GROUP: usize = 0x20;
const S_CLUSTERS_PER_GROUP: usize = 0x24;
const S_INODES_PER_GROUP: usize = 0x28;
const S_MAGIC: usize = 0x38;
const S_STATE: usize = 0x3A;
const S_REV_LEVEL: usize = 0x4C;
const S_INODE_SIZE: usize = 0x58;
const S_FEATURE_COMPAT: usize = 0x5C;
const S_FEATURE_INCOMPAT: usize = 0x60;
const S_FEATURE_RO_COMPAT: usize = 0x64;
const S_RESERVED_GDT_BLOCKS: usize = 0xCE;
const S_DESC_SIZE: usize = 0xFE;
const S_FIRST_META_BG: usize = 0x104;
const S_BLOCKS_COUNT_HI: usize = 0x150;
const S_BACKUP_BGS: usize = 0x24C;

// `s_state` bits.
/// `EXT4_VALID_FS`: cleanly unmounted.
const EXT4_VALID_FS: u16 = 0x0001;
/// `EXT4_ERROR_FS`: errors detected.
const EXT4_ERROR_FS: u16 = 0x0002;

// Feature bits (`EXT4_FEATURE_*`).
const COMPAT_SPARSE_SUPER2: u32 = 0x0200;
const INCOMPAT_RECOVER: u32 = 0x0004;
const INCOMPAT_JOURNAL_DEV: u32 = 0x0008;
const INCOMPAT_META_BG: u32 = 0x0010;
const INCOMPAT_64BIT: u32 = 0x0080;
const INCOMPAT_FLEX_BG: u32 = 0x0200;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x0001;
const RO_COMPAT_GDT_CSUM: u32 = 0x0010;
const RO_COMPAT_BIGALLOC: u32 = 0x0200;
const RO_COMPAT_METADATA_CSUM: u32 = 0x0400;

// Offsets in `struct ext4_group_desc`.
const BG_BLOCK_BITMAP_LO: usize = 0x00;
const BG_INODE_BITMAP_LO: usize = 0x04;
const BG_INODE_TABLE_LO: usize = 0x08;
const BG_FLAGS: usize = 0x12;
const BG_BLOCK_BITMAP_HI: usize = 0x20;
const BG_INODE_BITMAP_HI: usize = 0x24;
const BG_INODE_TABLE_HI: usize = 0x28;
/// `EXT4_BG_BLOCK_UNINIT`: the block bitmap was never written; the kernel computes it.
const EXT4_BG_BLOCK_UNINIT: u16 = 0x0002;

/// `EXT4_MIN_DESC_SIZE`: descriptors without `INCOMPAT_64BIT`.
const EXT4_MIN_DESC_SIZE: usize = 32;
/// `EXT4_MIN_DESC_SIZE_64BIT`.
const EXT4_MIN_DESC_SIZE_64BIT: usize = 64;
/// `EXT4_MAX_DESC_SIZE` (= `EXT4_MIN_BLOCK_SIZE`).
const EXT4_MAX_DESC_SIZE: usize = 1024;
/// `EXT4_MAX_BLOCK_LOG_SIZE` − 10: block sizes 1 KiB … 64 KiB.
const MAX_LOG_BLOCK_SIZE: u32 = 6;
/// `EXT4_MAX_CLUSTER_LOG_SIZE` − 10: bigalloc clusters up to 1 GiB.
const MAX_LOG_CLUSTER_SIZE: u32 = 20;
/// `EXT4_MAX_SUPP_REV` (`EXT4_DYNAMIC_REV`).
const EXT4_MAX_SUPP_REV: u32 = 1;
/// `EXT4_GOOD_OLD_INODE_SIZE`: inode size of revision 0.
const EXT4_GOOD_OLD_INODE_SIZE: u64 = 128;
/// mke2fs refuses fewer blocks per group ("blocks per group count out of range"); fewer
/// would make a large disk's group count, and so the work, absurd.
const MIN_BLOCKS_PER_GROUP: u64 = 256;

/// The used ranges of an unmounted ext2/3/4 whose superblock starts 1024 bytes into `dev` at
/// `base` (the partition offset), size `len` bytes. Ranges are relative to `base`, sorted,
/// merged, within [0, len).
pub fn ext4_used(
    dev: &(impl ReadAt + ?Sized),
    base: u64,
    len: u64,
) -> Result<Vec<Range>, AllocError> {
    let sb = read_vec(
        dev,
        base,
        SUPERBLOCK_OFFSET,
        SUPERBLOCK_SIZE,
        "ext4 superblock",
    )?;
    let geo = Geometry::parse(&sb, len)?;
    let bs = geo.block_size;
    let bs_usize = usize::try_from(bs).map_err(|_| corrupt("block size"))?;
    let mut set = RangeSet::new(geo.fs_bytes);
    set.push(0, ALWAYS_USED);
    // Blocks before the first group (block 0 with 1 KiB blocks) hold boot code.
    set.push(0, geo.first_data_block * bs);

    let mut desc_block = vec![0u8; bs_usize];
    let mut desc_block_no = None;
    let mut bitmap = vec![0u8; bs_usize];
    for group in 0..geo.groups {
        let nr = group / geo.desc_per_block;
        if desc_block_no != Some(nr) {
            let at = geo.desc_block(nr);
            if at >= geo.blocks_count {
                return Err(corrupt(format!(
                    "descriptor block {at} of group {group} past the end"
                )));
            }
            read_into(
                dev,
                base,
                at * bs,
                &mut desc_block,
                "ext4 group descriptors",
            )?;
            desc_block_no = Some(nr);
        }
        let idx = usize::try_from(group % geo.desc_per_block).map_err(|_| corrupt("index"))?;
        let off = idx * geo.desc_size;
        let raw = desc_block
            .get(off..off + geo.desc_size)
            .ok_or_else(|| corrupt("descriptor past its block"))?;
        let desc = Desc::parse(raw, geo.is_64bit)?;
        geo.check_desc(group, &desc)?;

        // Block numbers are validated against blocks_count, whose byte size fits in u64;
        // saturating keeps a one-group overshoot at the end harmless (RangeSet clips it).
        let at = |block: u64| block.saturating_mul(bs);
        let first = geo.group_first_block(group);
        set.push(at(first), at(first + geo.base_meta_blocks(group)));
        set.push(at(desc.block_bitmap), at(desc.block_bitmap + 1));
        set.push(at(desc.inode_bitmap), at(desc.inode_bitmap + 1));
        set.push(
            at(desc.inode_table),
            at(desc.inode_table + geo.itb_per_group),
        );

        // The kernel honours BLOCK_UNINIT only with descriptor checksums
        // (ext4_has_group_desc_csum); otherwise it reads the on-disk bitmap, and so do we.
        if desc.flags & EXT4_BG_BLOCK_UNINIT != 0 && geo.csum {
            continue;
        }
        read_into(
            dev,
            base,
            at(desc.block_bitmap),
            &mut bitmap,
            "ext4 block bitmap",
        )?;
        let blocks = (geo.blocks_count - first).min(geo.blocks_per_group);
        let units = blocks
            .div_ceil(geo.cluster_ratio)
            .min(geo.clusters_per_group);
        for_each_run(&bitmap, units, |a, b| {
            set.push(
                at(first + a * geo.cluster_ratio),
                at(first + b * geo.cluster_ratio),
            );
        });
    }
    Ok(set.finish())
}

fn corrupt(msg: impl Into<String>) -> AllocError {
    AllocError::Corrupt(format!("ext4: {}", msg.into()))
}

fn unsupported(msg: impl Into<String>) -> AllocError {
    AllocError::Unsupported(format!("ext4: {}", msg.into()))
}

/// Calls `f(start, end)` for each run of set bits among the first `nbits` bits (bit `i` is
/// bit `i % 8` of byte `i / 8`, as `ext4_test_bit`).
fn for_each_run(bitmap: &[u8], nbits: u64, mut f: impl FnMut(u64, u64)) {
    let nbits = nbits.min(bitmap.len() as u64 * 8);
    let mut run: Option<u64> = None;
    let mut i = 0u64;
    while i < nbits {
        let byte = usize::try_from(i / 8)
            .ok()
            .and_then(|k| bitmap.get(k))
            .copied()
            .unwrap_or(0);
        if i & 7 == 0 && i + 8 <= nbits && (byte == 0 || byte == 0xFF) {
            match (byte, run) {
                (0, Some(s)) => {
                    f(s, i);
                    run = None;
                }
                (0xFF, None) => run = Some(i),
                _ => {}
            }
            i += 8;
            continue;
        }
        let set = byte >> (i % 8) & 1 == 1;
        match (set, run) {
            (true, None) => run = Some(i),
            (false, Some(s)) => {
                f(s, i);
                run = None;
            }
            _ => {}
        }
        i += 1;
    }
    if let Some(s) = run {
        f(s, nbits);
    }
}

/// The parts of a group descriptor used here, in block numbers.
#[derive(Debug)]
struct Desc {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    flags: u16,
}

impl Desc {
    fn parse(raw: &[u8], is_64bit: bool) -> Result<Self, AllocError> {
        let f = Fields::new(raw, "ext4 group descriptor");
        let wide = |lo: usize, hi: usize| -> Result<u64, AllocError> {
            let hi = if is_64bit { u64::from(f.le32(hi)?) } else { 0 };
            Ok(hi << 32 | u64::from(f.le32(lo)?))
        };
        Ok(Self {
            block_bitmap: wide(BG_BLOCK_BITMAP_LO, BG_BLOCK_BITMAP_HI)?,
            inode_bitmap: wide(BG_INODE_BITMAP_LO, BG_INODE_BITMAP_HI)?,
            inode_table: wide(BG_INODE_TABLE_LO, BG_INODE_TABLE_HI)?,
            flags: f.le16(BG_FLAGS)?,
        })
    }
}

/// The validated geometry of the filesystem.
#[derive(Debug)]
struct Geometry {
    block_size: u64,
    blocks_count: u64,
    /// `blocks_count * block_size`, ≤ the region's length.
    fs_bytes: u64,
    first_data_block: u64,
    /// Block number of the superblock's block (`logical_sb_block` in `ext4_fill_super`).
    sb_block: u64,
    blocks_per_group: u64,
    clusters_per_group: u64,
    /// Blocks per bitmap bit (1 without bigalloc).
    cluster_ratio: u64,
    groups: u64,
    desc_size: usize,
    desc_per_block: u64,
    /// Blocks of the group descriptor table (`s_gdb_count`).
    gdb_count: u64,
    reserved_gdt: u64,
    itb_per_group: u64,
    is_64bit: bool,
    meta_bg: bool,
    first_meta_bg: u64,
    flex_bg: bool,
    sparse_super: bool,
    sparse_super2: bool,
    backup_bgs: [u64; 2],
    csum: bool,
}

impl Geometry {
    /// The revision and the compatible, incompatible and read-only-compatible feature sets,
    /// after refusing what cannot be read safely (an external journal, a journal to recover,
    /// an unclean state).
    fn features(f: &Fields<'_>) -> Result<(u32, u32, u32, u32), AllocError> {
        if f.le16(S_MAGIC)? != EXT4_SUPER_MAGIC {
            return Err(AllocError::BadMagic("ext2/3/4"));
        }
        let rev = f.le32(S_REV_LEVEL)?;
        if rev > EXT4_MAX_SUPP_REV {
            return Err(unsupported(format!("revision {rev}")));
        }
        let (compat, incompat, ro_compat) = if rev == 0 {
            (0, 0, 0)
        } else {
            (
                f.le32(S_FEATURE_COMPAT)?,
                f.le32(S_FEATURE_INCOMPAT)?,
                f.le32(S_FEATURE_RO_COMPAT)?,
            )
        };
        if incompat & INCOMPAT_JOURNAL_DEV != 0 {
            return Err(unsupported("an external journal device, not a filesystem"));
        }
        // The journal may hold allocations the bitmaps do not show yet.
        if incompat & INCOMPAT_RECOVER != 0 {
            return Err(unsupported(
                "journal needs recovery (mounted, or not cleanly unmounted)",
            ));
        }
        let state = f.le16(S_STATE)?;
        if state & EXT4_VALID_FS == 0 || state & EXT4_ERROR_FS != 0 {
            return Err(unsupported(format!(
                "state {state:#x}: not clean, e2fsck needed"
            )));
        }
        Ok((rev, compat, incompat, ro_compat))
    }

    /// Block size, blocks per bitmap bit (bigalloc clusters) and whether bigalloc is on.
    fn block_and_cluster(
        f: &Fields<'_>,
        rev: u32,
        ro_compat: u32,
    ) -> Result<(u64, u64, bool), AllocError> {
        let log_bs = f.le32(S_LOG_BLOCK_SIZE)?;
        if log_bs > MAX_LOG_BLOCK_SIZE {
            return Err(corrupt(format!(
                "block size 2^{} bytes",
                u64::from(log_bs) + 10
            )));
        }
        let block_size = 1024u64 << log_bs;
        let bigalloc = ro_compat & RO_COMPAT_BIGALLOC != 0;
        let log_cs = f.le32(S_LOG_CLUSTER_SIZE)?;
        let cluster_ratio = if bigalloc {
            if log_cs < log_bs || log_cs > MAX_LOG_CLUSTER_SIZE {
                return Err(corrupt(format!(
                    "cluster size log {log_cs} for block size log {log_bs}"
                )));
            }
            1u64 << (log_cs - log_bs)
        } else {
            // Before bigalloc this field was the fragment size, always equal to the block size.
            if rev > 0 && log_cs != log_bs {
                return Err(corrupt(format!(
                    "cluster size log {log_cs} without bigalloc"
                )));
            }
            1
        };
        Ok((block_size, cluster_ratio, bigalloc))
    }

    /// Validates the superblock `sb` of a filesystem in a region of `len` bytes.
    fn parse(sb: &[u8], len: u64) -> Result<Self, AllocError> {
        let f = Fields::new(sb, "ext4 superblock");
        let (rev, compat, incompat, ro_compat) = Self::features(&f)?;
        let (block_size, cluster_ratio, bigalloc) = Self::block_and_cluster(&f, rev, ro_compat)?;
        let bits_per_bitmap = block_size * 8;
        let blocks_per_group = u64::from(f.le32(S_BLOCKS_PER_GROUP)?);
        let clusters_per_group = if bigalloc {
            u64::from(f.le32(S_CLUSTERS_PER_GROUP)?)
        } else {
            blocks_per_group
        };
        if clusters_per_group == 0
            || clusters_per_group > bits_per_bitmap
            || blocks_per_group != clusters_per_group * cluster_ratio
            || blocks_per_group < MIN_BLOCKS_PER_GROUP
        {
            return Err(corrupt(format!(
                "{blocks_per_group} blocks / {clusters_per_group} clusters per group"
            )));
        }

        let is_64bit = incompat & INCOMPAT_64BIT != 0;
        let lo = u64::from(f.le32(S_BLOCKS_COUNT_LO)?);
        let hi = if is_64bit {
            u64::from(f.le32(S_BLOCKS_COUNT_HI)?)
        } else {
            0
        };
        let blocks_count = hi << 32 | lo;
        let fs_bytes = mul(blocks_count, block_size, "filesystem size")?;
        if fs_bytes > len {
            return Err(corrupt(format!(
                "filesystem of {fs_bytes} bytes in a region of {len}"
            )));
        }
        let first_data_block = u64::from(f.le32(S_FIRST_DATA_BLOCK)?);
        // mke2fs puts group 0 at block 1 only for 1 KiB blocks without bigalloc; the layout
        // arithmetic below assumes one of the two.
        if first_data_block > u64::from(block_size == 1024) || first_data_block >= blocks_count {
            return Err(corrupt(format!("first data block {first_data_block}")));
        }
        let groups = (blocks_count - first_data_block).div_ceil(blocks_per_group);
        let inodes_per_group = u64::from(f.le32(S_INODES_PER_GROUP)?);
        if inodes_per_group == 0 || inodes_per_group > bits_per_bitmap {
            return Err(corrupt(format!("{inodes_per_group} inodes per group")));
        }
        // ext4_fill_super's own consistency check between the counts.
        let inodes_count = u64::from(f.le32(S_INODES_COUNT)?);
        if groups.checked_mul(inodes_per_group) != Some(inodes_count) {
            return Err(corrupt(format!(
                "{inodes_count} inodes ≠ {groups} groups × {inodes_per_group}"
            )));
        }
        let inode_size = if rev == 0 {
            EXT4_GOOD_OLD_INODE_SIZE
        } else {
            u64::from(f.le16(S_INODE_SIZE)?)
        };
        if inode_size < EXT4_GOOD_OLD_INODE_SIZE
            || inode_size > block_size
            || !inode_size.is_power_of_two()
        {
            return Err(corrupt(format!("inode size {inode_size}")));
        }
        let itb_per_group = (inodes_per_group * inode_size).div_ceil(block_size);

        let desc_size = if is_64bit {
            let d = usize::from(f.le16(S_DESC_SIZE)?);
            if !(EXT4_MIN_DESC_SIZE_64BIT..=EXT4_MAX_DESC_SIZE).contains(&d) || !d.is_power_of_two()
            {
                return Err(corrupt(format!("descriptor size {d}")));
            }
            d
        } else {
            EXT4_MIN_DESC_SIZE
        };
        let desc_per_block = block_size / desc_size as u64;
        let gdb_count = groups.div_ceil(desc_per_block);
        let reserved_gdt = u64::from(f.le16(S_RESERVED_GDT_BLOCKS)?);
        // ext4_fill_super: "Number of reserved GDT blocks insanely large".
        if reserved_gdt > block_size / 4 {
            return Err(corrupt(format!("{reserved_gdt} reserved GDT blocks")));
        }
        let meta_bg = incompat & INCOMPAT_META_BG != 0;
        let first_meta_bg = if meta_bg {
            u64::from(f.le32(S_FIRST_META_BG)?)
        } else {
            0
        };
        if first_meta_bg > gdb_count {
            return Err(corrupt(format!(
                "first meta_bg {first_meta_bg} > {gdb_count} GDT blocks"
            )));
        }
        let backup_bgs = [
            u64::from(f.le32(S_BACKUP_BGS)?),
            u64::from(f.le32(S_BACKUP_BGS + 4)?),
        ];
        let geo = Self {
            block_size,
            blocks_count,
            fs_bytes,
            first_data_block,
            sb_block: SUPERBLOCK_OFFSET / block_size,
            blocks_per_group,
            clusters_per_group,
            cluster_ratio,
            groups,
            desc_size,
            desc_per_block,
            gdb_count,
            reserved_gdt,
            itb_per_group,
            is_64bit,
            meta_bg,
            first_meta_bg,
            flex_bg: incompat & INCOMPAT_FLEX_BG != 0,
            sparse_super: ro_compat & RO_COMPAT_SPARSE_SUPER != 0,
            sparse_super2: compat & COMPAT_SPARSE_SUPER2 != 0,
            backup_bgs,
            csum: ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM) != 0,
        };
        // The metadata at the start of group 0 must fit in the filesystem.
        let meta0 = geo.sb_block + 1 + geo.base_meta_blocks(0);
        if meta0 > blocks_count {
            return Err(corrupt(format!(
                "{meta0} metadata blocks in a {blocks_count}-block filesystem"
            )));
        }
        Ok(geo)
    }

    fn group_first_block(&self, group: u64) -> u64 {
        self.first_data_block + group * self.blocks_per_group
    }

    /// The last block of `group` (`ext4_group_last_block_no`).
    fn group_last_block(&self, group: u64) -> u64 {
        if group + 1 >= self.groups {
            self.blocks_count - 1
        } else {
            self.group_first_block(group) + self.blocks_per_group - 1
        }
    }

    /// `ext4_bg_has_super`: whether `group` holds a superblock (and, without meta_bg, GDT) copy.
    fn has_super(&self, group: u64) -> bool {
        if group == 0 {
            return true;
        }
        if self.sparse_super2 {
            return group == self.backup_bgs[0] || group == self.backup_bgs[1];
        }
        if group <= 1 || !self.sparse_super {
            return true;
        }
        if group & 1 == 0 {
            return false;
        }
        is_power_of(group, 3) || is_power_of(group, 5) || is_power_of(group, 7)
    }

    /// `ext4_num_base_meta_blocks`: blocks at the start of `group` taken by its superblock
    /// copy, descriptor blocks and reserved GDT blocks.
    fn base_meta_blocks(&self, group: u64) -> u64 {
        let sup = u64::from(self.has_super(group));
        if !self.meta_bg || group < self.first_meta_bg * self.desc_per_block {
            if sup == 0 {
                return 0;
            }
            let gdb = if self.meta_bg {
                self.first_meta_bg
            } else {
                self.gdb_count
            };
            sup + gdb + self.reserved_gdt
        } else {
            // ext4_bg_num_gdb_meta: the first, second and last group of a meta group hold its
            // descriptor block.
            let first = group / self.desc_per_block * self.desc_per_block;
            let last = first + self.desc_per_block - 1;
            sup + u64::from(group == first || group == first + 1 || group == last)
        }
    }

    /// `descriptor_loc`: the block holding descriptor block `nr`.
    fn desc_block(&self, nr: u64) -> u64 {
        if !self.meta_bg || nr < self.first_meta_bg {
            return self.sb_block + nr + 1;
        }
        let bg = self.desc_per_block * nr;
        let mut has_super = u64::from(self.has_super(bg));
        if self.block_size == 1024 && nr == 0 && self.first_data_block == 0 {
            has_super += 1;
        }
        has_super + self.group_first_block(bg)
    }

    /// `ext4_check_descriptors`: bitmaps and inode table inside the filesystem (inside the
    /// group without flex_bg) and clear of the primary superblock and descriptors.
    fn check_desc(&self, group: u64, d: &Desc) -> Result<(), AllocError> {
        let (lo, hi) = if self.flex_bg {
            (self.first_data_block, self.blocks_count - 1)
        } else {
            (self.group_first_block(group), self.group_last_block(group))
        };
        // ext4_bg_num_gdb(sb, 0): the descriptor blocks right after the primary superblock.
        let gdb0 = match (self.meta_bg, self.first_meta_bg) {
            (false, _) => self.gdb_count,
            (true, 0) => 1,
            (true, n) => n,
        };
        let gdt_end = self.sb_block + gdb0;
        let bad = |b: u64, n: u64| {
            let last = b.saturating_add(n - 1);
            b < lo || last > hi || (b <= gdt_end && last >= self.sb_block)
        };
        for (what, b, n) in [
            ("block bitmap", d.block_bitmap, 1),
            ("inode bitmap", d.inode_bitmap, 1),
            ("inode table", d.inode_table, self.itb_per_group),
        ] {
            if bad(b, n) {
                return Err(corrupt(format!(
                    "group {group}: {what} at block {b} (+{n}) outside {lo}..={hi} or on the superblock/GDT"
                )));
            }
        }
        Ok(())
    }
}

/// Whether `n` is a power of `base` (`test_root`), `n` ≥ 1.
fn is_power_of(mut n: u64, base: u64) -> bool {
    while n > 1 && n / base * base == n {
        n /= base;
    }
    n == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::merge;
    use crate::alloc::testfs::*;
    use crate::testutil::xorshift;
    use std::fs::File;

    const BS: usize = 4096;
    const BLOCKS_U32: u32 = 2048;
    const BLOCKS: usize = BLOCKS_U32 as usize;

    /// The low byte of the next noise word.
    fn byte(x: &mut u64) -> u8 {
        xorshift(x).to_le_bytes()[0]
    }

    fn put16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// An 8 MiB ext2-like image: 4 KiB blocks, one group, GDT in block 1, bitmaps in 2 and 3,
    /// a 2-block inode table at 4; data blocks 10..13 and 100 allocated.
    fn crafted() -> Vec<u8> {
        let mut img = vec![0u8; BS * BLOCKS];
        let sb = &mut img[1024..2048];
        put32(sb, S_INODES_COUNT, 64);
        put32(sb, S_BLOCKS_COUNT_LO, BLOCKS_U32);
        put32(sb, S_LOG_BLOCK_SIZE, 2);
        put32(sb, S_LOG_CLUSTER_SIZE, 2);
        put32(sb, S_BLOCKS_PER_GROUP, 32768);
        put32(sb, S_CLUSTERS_PER_GROUP, 32768);
        put32(sb, S_INODES_PER_GROUP, 64);
        put16(sb, S_MAGIC, EXT4_SUPER_MAGIC);
        put16(sb, S_STATE, EXT4_VALID_FS);
        put32(sb, S_REV_LEVEL, 1);
        put16(sb, S_INODE_SIZE, 128);
        put32(sb, S_FEATURE_RO_COMPAT, RO_COMPAT_SPARSE_SUPER);
        let gd = &mut img[BS..BS + 32];
        put32(gd, BG_BLOCK_BITMAP_LO, 2);
        put32(gd, BG_INODE_BITMAP_LO, 3);
        put32(gd, BG_INODE_TABLE_LO, 4);
        let bm = &mut img[2 * BS..3 * BS];
        bm[0] = 0b0011_1111; // blocks 0..=5: sb, GDT, bitmaps, inode table
        bm[1] = 0b0011_1100; // blocks 10..=13
        bm[12] = 0b0001_0000; // block 100
        bm[BLOCKS / 8..].fill(0xFF); // padding past the last block, as mke2fs writes it
        img
    }

    fn b(blocks: std::ops::Range<u64>) -> Range {
        blocks.start * BS as u64..blocks.end * BS as u64
    }

    #[test]
    fn crafted_image_gives_exact_ranges() {
        let img = crafted();
        let len = img.len() as u64;
        let r = ext4_used(&img, 0, len).unwrap();
        // 64 KiB always; blocks 10..14 and 100.
        assert_eq!(r, vec![b(0..16), b(100..101)]);
        // The same filesystem at a partition offset.
        let mut disk = vec![0u8; 3 * 512];
        disk.extend_from_slice(&img);
        assert_eq!(ext4_used(&disk, 1536, len).unwrap(), r);
    }

    #[test]
    fn crafted_block_uninit_group_uses_computed_metadata() {
        let mut img = crafted();
        put32(
            &mut img[1024..2048],
            S_FEATURE_RO_COMPAT,
            RO_COMPAT_SPARSE_SUPER | RO_COMPAT_GDT_CSUM,
        );
        put16(&mut img[BS..BS + 32], BG_FLAGS, EXT4_BG_BLOCK_UNINIT);
        // The stale on-disk bitmap (block 100 set) must be ignored, as the kernel does.
        let r = ext4_used(&img, 0, img.len() as u64).unwrap();
        assert_eq!(r, vec![b(0..16)]);
        // Without descriptor checksums the kernel ignores the flag: so do we.
        put32(
            &mut img[1024..2048],
            S_FEATURE_RO_COMPAT,
            RO_COMPAT_SPARSE_SUPER,
        );
        let r = ext4_used(&img, 0, img.len() as u64).unwrap();
        assert_eq!(r, vec![b(0..16), b(100..101)]);
    }

    #[test]
    fn crafted_errors_are_typed() {
        let base = crafted();
        let len = base.len() as u64;
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut img = base.clone();
            f(&mut img);
            ext4_used(&img, 0, len)
        };
        let sb = |at: usize, v: u32| move |img: &mut Vec<u8>| put32(&mut img[1024..2048], at, v);
        assert!(matches!(
            with(&|i| put16(&mut i[1024..], S_MAGIC, 0x1234)),
            Err(AllocError::BadMagic(_))
        ));
        assert!(matches!(
            with(&sb(S_LOG_BLOCK_SIZE, 7)),
            Err(AllocError::Corrupt(_))
        ));
        assert!(matches!(
            with(&sb(S_BLOCKS_COUNT_LO, BLOCKS_U32 + 1)),
            Err(AllocError::Corrupt(_))
        ));
        assert!(matches!(
            with(&sb(S_INODES_COUNT, 65)),
            Err(AllocError::Corrupt(_))
        ));
        assert!(matches!(
            with(&sb(S_BLOCKS_PER_GROUP, 0)),
            Err(AllocError::Corrupt(_))
        ));
        assert!(matches!(
            with(&sb(S_BLOCKS_PER_GROUP, 40000)),
            Err(AllocError::Corrupt(_))
        ));
        assert!(matches!(
            with(&sb(S_FEATURE_INCOMPAT, INCOMPAT_RECOVER)),
            Err(AllocError::Unsupported(_))
        ));
        assert!(matches!(
            with(&|i| put16(&mut i[1024..], S_STATE, 0)),
            Err(AllocError::Unsupported(_))
        ));
        assert!(matches!(
            with(&sb(S_FEATURE_INCOMPAT, INCOMPAT_64BIT)),
            Err(AllocError::Corrupt(_))
        ));
        let gd = |at: usize, v: u32| move |img: &mut Vec<u8>| put32(&mut img[BS..BS + 32], at, v);
        for bad in [0, 1, BLOCKS_U32, u32::MAX] {
            assert!(
                matches!(
                    with(&gd(BG_BLOCK_BITMAP_LO, bad)),
                    Err(AllocError::Corrupt(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            with(&gd(BG_INODE_TABLE_LO, BLOCKS_U32 - 1)),
            Err(AllocError::Corrupt(_))
        ));
        // Truncated images: superblock or bitmap missing.
        assert!(matches!(
            ext4_used(&base[..1500], 0, len),
            Err(AllocError::Io { .. })
        ));
        assert!(matches!(
            ext4_used(&base[..2 * BS + 10], 0, len),
            Err(AllocError::Io { .. })
        ));
        // A region smaller than the filesystem.
        assert!(matches!(
            ext4_used(&base, 0, len - 1),
            Err(AllocError::Corrupt(_))
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0x5eed_u64;
        let good = crafted();
        // One buffer, its first blocks restored each round: cloning 8 MiB per round would
        // dominate the test's time.
        let mut img = good.clone();
        for round in 0..3000 {
            img[..3 * BS].copy_from_slice(&good[..3 * BS]);
            if round % 2 == 0 {
                for v in img[..3 * BS].iter_mut() {
                    *v = byte(&mut x);
                }
                put16(&mut img[1024..], S_MAGIC, EXT4_SUPER_MAGIC);
            } else {
                for _ in 0..1 + xorshift(&mut x) % 8 {
                    let at = usize::try_from(xorshift(&mut x) % (2 * BS as u64)).unwrap();
                    img[at] = byte(&mut x);
                }
            }
            let len = xorshift(&mut x) % (2 * img.len() as u64);
            if let Ok(r) = ext4_used(&img, 0, len) {
                assert_well_formed(&r, len);
            }
        }
    }

    #[test]
    fn bit_runs() {
        let mut runs = Vec::new();
        for_each_run(&[0xFF, 0x01, 0x80, 0xFF], 32, |a, b| runs.push(a..b));
        assert_eq!(runs, vec![0..9, 23..32]);
        runs.clear();
        for_each_run(&[0xFF, 0xFF], 12, |a, b| runs.push(a..b));
        assert_eq!(runs, vec![0..12]);
        runs.clear();
        for_each_run(&[0xFF], 1000, |a, b| runs.push(a..b));
        assert_eq!(runs, vec![0..8]);
        assert!(
            is_power_of(1, 3) && is_power_of(27, 3) && is_power_of(49, 7) && !is_power_of(15, 3)
        );
    }

    fn case<'a>(label: &'a str, mkfs: &'a [&'a str], size: u64, fragment: usize) -> Case<'a> {
        Case {
            label,
            mkfs,
            size,
            fragment,
            frag_block: 1024,
            offline: |f, len| ext4_used(f, 0, len),
            fsck: &["e2fsck", "-fn"],
            ro_opts: "ro",
        }
    }

    fn ext4(label: &str, mkfs: &[&str], size: u64, fragment: usize) {
        roundtrip(&case(label, mkfs, size, fragment), |_| {});
    }

    #[test]
    fn real_ext4_4k() {
        ext4(
            "ext4 4K",
            &["mkfs.ext4", "-q", "-F", "-b", "4096"],
            256 << 20,
            0,
        );
    }

    #[test]
    fn real_ext4_1k_fragmented() {
        ext4(
            "ext4 1K",
            &["mkfs.ext4", "-q", "-F", "-b", "1024"],
            256 << 20,
            2000,
        );
    }

    #[test]
    fn real_ext4_no_flex_bg() {
        ext4(
            "ext4 ^flex_bg",
            &["mkfs.ext4", "-q", "-F", "-O", "^flex_bg"],
            256 << 20,
            0,
        );
    }

    #[test]
    fn real_ext4_64bit() {
        ext4(
            "ext4 64bit",
            &["mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "64bit"],
            256 << 20,
            0,
        );
    }

    #[test]
    fn real_ext4_32bit_descriptors() {
        ext4(
            "ext4 ^64bit",
            &["mkfs.ext4", "-q", "-F", "-O", "^64bit"],
            256 << 20,
            0,
        );
    }

    #[test]
    fn real_ext4_meta_bg() {
        let args = [
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            "1024",
            "-O",
            "meta_bg,^resize_inode",
        ];
        ext4("ext4 meta_bg", &args, 256 << 20, 0);
    }

    #[test]
    fn real_ext4_sparse_super2() {
        ext4(
            "ext4 sparse_super2",
            &["mkfs.ext4", "-q", "-F", "-O", "sparse_super2"],
            256 << 20,
            0,
        );
    }

    #[test]
    fn real_ext4_bigalloc() {
        let args = [
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            "4096",
            "-O",
            "bigalloc",
            "-C",
            "65536",
        ];
        ext4("ext4 bigalloc", &args, 256 << 20, 0);
    }

    #[test]
    fn real_ext3() {
        ext4("ext3", &["mkfs.ext3", "-q", "-F"], 256 << 20, 0);
    }

    #[test]
    fn real_ext2() {
        ext4("ext2", &["mkfs.ext2", "-q", "-F"], 256 << 20, 500);
    }

    #[test]
    fn real_ext4_512m_timing() {
        ext4("ext4 512M", &["mkfs.ext4", "-q", "-F"], 512 << 20, 0);
    }

    /// 64 KiB blocks cannot be mounted with 4 KiB pages: populate at mkfs time (`mke2fs -d`)
    /// and read the copy back with debugfs.
    #[test]
    fn real_ext4_64k_blocks_offline() {
        require("mkfs.ext4");
        require("debugfs");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let src = dir.join("src");
        let files = populate(&src, 64, 6 << 20, 40);
        let img = dir.join("fs.img");
        let size = 512 << 20;
        sparse_image(&img, size);
        run(
            "mkfs.ext4",
            &["-q", "-F", "-b", "65536", "-d", path(&src), path(&img)],
        );
        let used = ext4_used(&File::open(&img).unwrap(), 0, size).unwrap();
        assert_well_formed(&used, size);
        assert!(total(&used) < size / 4, "{} bytes used", total(&used));
        let copy = dir.join("copy.img");
        copy_ranges(&img, &copy, &used);
        let (code, out) = status("e2fsck", &["-fn", path(&copy)]);
        assert_eq!(code, 0, "e2fsck:\n{out}");
        for f in &files {
            let out = dir.join("out");
            let req = format!("dump /{} {}", f.rel.display(), path(&out));
            run("debugfs", &["-R", &req, path(&copy)]);
            let data = std::fs::read(&out).unwrap();
            assert_eq!(blake3::hash(&data), f.hash, "{}", f.rel.display());
        }
    }

    /// A mounted filesystem (journal needs recovery) is refused; so is an unclean ext2.
    #[test]
    fn real_mounted_or_unclean_is_refused() {
        require("mkfs.ext4");
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("fs.img");
        let size = 64 << 20;
        for mkfs in ["mkfs.ext4", "mkfs.ext2"] {
            sparse_image(&img, size);
            run(mkfs, &["-q", "-F", path(&img)]);
            let m = Mount::new(&img, &tmp.path().join("mnt"), "");
            std::fs::write(tmp.path().join("mnt/x"), b"x").unwrap();
            run("sync", &[]);
            let r = ext4_used(&File::open(&img).unwrap(), 0, size);
            assert!(
                matches!(r, Err(AllocError::Unsupported(_))),
                "{mkfs}: {r:?}"
            );
            m.unmount();
            assert!(ext4_used(&File::open(&img).unwrap(), 0, size).is_ok());
        }
    }

    /// Random byte changes in the metadata of a real filesystem: errors or well-formed maps,
    /// never a panic.
    #[test]
    fn real_image_mutations_never_panic() {
        require("mkfs.ext4");
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("fs.img");
        let size = 32 << 20;
        sparse_image(&img, size);
        run("mkfs.ext4", &["-q", "-F", "-b", "1024", path(&img)]);
        let file = File::open(&img).unwrap();
        let clean = ext4_used(&file, 0, size).unwrap();
        // Mutate inside the metadata at the start of the first groups.
        let targets = merge(
            clean
                .iter()
                .filter(|r| r.start < (2 << 20))
                .cloned()
                .collect(),
        );
        let mut x = 99u64;
        for _ in 0..1500 {
            let mut patches = Vec::new();
            for _ in 0..1 + xorshift(&mut x) % 4 {
                let r = &targets[usize::try_from(xorshift(&mut x) % targets.len() as u64).unwrap()];
                let at = r.start + xorshift(&mut x) % (r.end - r.start).min(8192);
                patches.push((at, byte(&mut x)));
            }
            let dev = Patched {
                file: &file,
                patches,
            };
            if let Ok(r) = ext4_used(&dev, 0, size) {
                assert_well_formed(&r, size);
            }
        }
    }
}
