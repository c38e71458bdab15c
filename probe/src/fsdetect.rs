//! Filesystem and volume signatures read straight from the superblock, like `blkid -p`, so no
//! udev database is needed: ext2/3/4, XFS, Btrfs, vfat, swap, LVM2 PV, LUKS, NTFS.
//!
//! Layouts: ext4 `struct ext4_super_block` (fs/ext4/ext4.h), XFS `struct xfs_dsb`
//! (fs/xfs/libxfs/xfs_format.h, big-endian), Btrfs `struct btrfs_super_block`
//! (fs/btrfs/accessors.h / uapi btrfs_tree.h), FAT boot sector (Microsoft FAT spec), swap header
//! (include/linux/swap.h), LVM2 label (lib/format_text/layout.h), LUKS1/2 on-disk format specs.

use crate::io::ReadAt;

/// What a superblock says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsInfo {
    /// Type as blkid names it (`ext4`, `xfs`, `btrfs`, `vfat`, `swap`, `LVM2_member`,
    /// `crypto_LUKS`, `ntfs`).
    pub fs_type: &'static str,
    /// UUID as blkid prints it.
    pub uuid: String,
    /// Label.
    pub label: String,
    /// Block (cluster) size in bytes, 0 when not applicable.
    pub block_size: u64,
    /// Blocks in the filesystem.
    pub block_count: u64,
    /// Free blocks, when the superblock keeps a count.
    pub free_blocks: Option<u64>,
    /// Bytes per inode record.
    pub inode_size: u64,
    /// Inodes (ext: total; xfs: allocated).
    pub inode_count: u64,
    /// Btrfs details.
    pub btrfs: Option<BtrfsSuper>,
}

/// The Btrfs superblock fields the inventory reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BtrfsSuper {
    /// Filesystem UUID.
    pub fsid: String,
    /// Label.
    pub label: String,
    /// Size of the filesystem in bytes.
    pub total_bytes: u64,
    /// Used bytes.
    pub bytes_used: u64,
    /// Tree node size.
    pub nodesize: u32,
    /// Sector size.
    pub sectorsize: u32,
    /// Member devices.
    pub num_devices: u64,
    /// This member's device id.
    pub devid: u64,
    /// This member's UUID.
    pub dev_uuid: String,
    /// Profile of the system chunks, from the superblock's bootstrap chunk array.
    pub system_profile: Option<String>,
}

/// A recognised signature whose structure is broken.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The superblock is damaged or cut short.
    #[error("{fs} superblock is corrupt: {reason}")]
    Corrupt {
        /// Filesystem type.
        fs: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Reading failed.
    #[error("cannot read the superblock area: {0}")]
    Io(#[from] std::io::Error),
}

fn corrupt(fs: &'static str, reason: impl Into<String>) -> Error {
    Error::Corrupt {
        fs,
        reason: reason.into(),
    }
}

fn le16(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, |a| u64::from(u16::from_le_bytes(a)))
}
fn le32(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, |a| u64::from(u32::from_le_bytes(a)))
}
fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}
fn be16(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, |a| u64::from(u16::from_be_bytes(a)))
}
fn be32(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, |a| u64::from(u32::from_be_bytes(a)))
}
fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// A NUL-padded byte string as text.
fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).trim_end().to_string()
}

/// Standard UUID text of 16 raw bytes (big-endian order, as ext/xfs/btrfs/swap store them).
fn uuid_be(b: &[u8]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    if h.len() != 32 {
        return String::new();
    }
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Reads `len` bytes at `off`, or `None` when the device is too short for them.
fn grab(
    dev: &(impl ReadAt + ?Sized),
    size: u64,
    off: u64,
    len: usize,
) -> Result<Option<Vec<u8>>, Error> {
    if off + len as u64 > size {
        return Ok(None);
    }
    Ok(Some(dev.read_vec(off, len)?))
}

/// Identifies what is on a device (partition, disk or LV) of `size` bytes.
pub fn detect(dev: &(impl ReadAt + ?Sized), size: u64) -> Result<Option<FsInfo>, Error> {
    let Some(head) = grab(
        dev,
        size,
        0,
        4096.min(usize::try_from(size).unwrap_or(4096)),
    )?
    else {
        return Ok(None);
    };
    if head.len() < 512 {
        return Ok(None);
    }
    if let Some(i) = luks(&head) {
        return Ok(Some(i));
    }
    if let Some(i) = lvm(&head)? {
        return Ok(Some(i));
    }
    if head.get(0..4) == Some(b"XFSB") {
        return xfs(&head, size).map(Some);
    }
    if let Some(sb) = grab(dev, size, 1024, 1024)? {
        if le16(&sb, 56) == 0xEF53 {
            return ext(&sb, size).map(Some);
        }
    } else if size >= 1024 + 58 {
        // The magic is there but the rest of the superblock is not.
        if let Ok(m) = dev.read_vec(1080, 2) {
            if m == [0x53, 0xEF] {
                return Err(corrupt(
                    "ext4",
                    format!("device of {size} bytes cuts the superblock short"),
                ));
            }
        }
    }
    if let Some(sb) = grab(dev, size, 0x10000, 4096)? {
        if sb.get(0x40..0x48) == Some(b"_BHRfS_M") {
            return btrfs(&sb).map(Some);
        }
    } else if size > 0x10048 {
        if let Ok(m) = dev.read_vec(0x10040, 8) {
            if m == b"_BHRfS_M" {
                return Err(corrupt(
                    "btrfs",
                    format!("device of {size} bytes cuts the superblock short"),
                ));
            }
        }
    }
    for page in [4096u64, 8192, 16384, 65536] {
        if let Some(sig) = grab(dev, size, page - 10, 10)? {
            if sig == b"SWAPSPACE2" || sig == b"SWAP-SPACE" {
                let h = dev.read_vec(1024, 64)?;
                return Ok(Some(FsInfo {
                    fs_type: "swap",
                    uuid: uuid_be(h.get(12..28).unwrap_or(&[])),
                    label: cstr(h.get(28..44).unwrap_or(&[])),
                    block_size: page,
                    block_count: le32(&h, 4) + 1,
                    ..FsInfo::default()
                }));
            }
        }
    }
    if head.get(3..11) == Some(b"NTFS    ") {
        return ntfs(&head, size).map(Some);
    }
    Ok(vfat(&head))
}

fn luks(h: &[u8]) -> Option<FsInfo> {
    if h.get(0..6) != Some(b"LUKS\xba\xbe") {
        return None;
    }
    let version = be16(h, 6);
    Some(FsInfo {
        fs_type: "crypto_LUKS",
        uuid: cstr(h.get(168..208)?),
        label: if version == 2 {
            cstr(h.get(24..72)?)
        } else {
            String::new()
        },
        ..FsInfo::default()
    })
}

fn lvm(h: &[u8]) -> Result<Option<FsInfo>, Error> {
    // The label may sit in any of the first four sectors.
    for sector in 0..4usize {
        let at = sector * 512;
        let Some(l) = h.get(at..at + 512) else { break };
        if l.get(0..8) != Some(b"LABELONE") || l.get(24..32) != Some(b"LVM2 001") {
            continue;
        }
        let off = usize::try_from(le32(l, 20)).unwrap_or(usize::MAX);
        let Some(raw) = l.get(off..off.saturating_add(32)) else {
            return Err(corrupt(
                "LVM2_member",
                format!("PV header offset {off} is outside the label sector"),
            ));
        };
        let id = String::from_utf8_lossy(raw).into_owned();
        let mut uuid = String::new();
        for (i, len) in [6, 4, 4, 4, 4, 4, 6].iter().enumerate() {
            let start: usize = [0, 6, 10, 14, 18, 22, 26][i];
            if i > 0 {
                uuid.push('-');
            }
            uuid.push_str(id.get(start..start + len).unwrap_or(""));
        }
        return Ok(Some(FsInfo {
            fs_type: "LVM2_member",
            uuid,
            ..FsInfo::default()
        }));
    }
    Ok(None)
}

fn xfs(sb: &[u8], size: u64) -> Result<FsInfo, Error> {
    if sb.len() < 160 {
        return Err(corrupt("xfs", "superblock cut short"));
    }
    let bs = be32(sb, 4);
    let dblocks = be64(sb, 8);
    let isize = be16(sb, 104);
    if !(512..=65536).contains(&bs) || !bs.is_power_of_two() {
        return Err(corrupt("xfs", format!("block size {bs}")));
    }
    if !(256..=2048).contains(&isize) || !isize.is_power_of_two() {
        return Err(corrupt("xfs", format!("inode size {isize}")));
    }
    if dblocks == 0 || dblocks.saturating_mul(bs) > size.saturating_mul(2).max(size) {
        return Err(corrupt(
            "xfs",
            format!("{dblocks} blocks of {bs} bytes do not fit a {size}-byte device"),
        ));
    }
    Ok(FsInfo {
        fs_type: "xfs",
        uuid: uuid_be(&sb[32..48]),
        label: cstr(&sb[108..120]),
        block_size: bs,
        block_count: dblocks,
        free_blocks: Some(be64(sb, 144)),
        inode_size: isize,
        inode_count: be64(sb, 128),
        btrfs: None,
    })
}

/// ext3 knows only these incompat/ro_compat features; anything else makes it ext4 (as blkid's
/// `EXT3_FEATURE_*_SUPP` masks decide).
const EXT3_INCOMPAT_SUPP: u64 = 0x0002 | 0x0004 | 0x0010;
const EXT3_RO_COMPAT_SUPP: u64 = 0x0001 | 0x0002 | 0x0004;
const EXT_COMPAT_HAS_JOURNAL: u64 = 0x0004;
const EXT_INCOMPAT_64BIT: u64 = 0x0080;

fn ext(sb: &[u8], size: u64) -> Result<FsInfo, Error> {
    let log = le32(sb, 24);
    if log > 6 {
        return Err(corrupt("ext4", format!("block size 2^(10+{log})")));
    }
    let bs = 1024u64 << log;
    let incompat = le32(sb, 96);
    let ro_compat = le32(sb, 100);
    let compat = le32(sb, 92);
    let is64 = incompat & EXT_INCOMPAT_64BIT != 0;
    let blocks = le32(sb, 4) | if is64 { le32(sb, 0x150) << 32 } else { 0 };
    let free = le32(sb, 12) | if is64 { le32(sb, 0x158) << 32 } else { 0 };
    let fs_type = if incompat & !EXT3_INCOMPAT_SUPP != 0 || ro_compat & !EXT3_RO_COMPAT_SUPP != 0 {
        "ext4"
    } else if compat & EXT_COMPAT_HAS_JOURNAL != 0 {
        "ext3"
    } else {
        "ext2"
    };
    if blocks == 0 || blocks.saturating_mul(bs) > size {
        return Err(corrupt(
            fs_type,
            format!("{blocks} blocks of {bs} bytes do not fit a {size}-byte device"),
        ));
    }
    if free > blocks {
        return Err(corrupt(fs_type, format!("{free} free blocks of {blocks}")));
    }
    let inode_size = if le32(sb, 76) == 0 { 128 } else { le16(sb, 88) };
    if inode_size < 128 || !inode_size.is_power_of_two() || inode_size > bs {
        return Err(corrupt(fs_type, format!("inode size {inode_size}")));
    }
    Ok(FsInfo {
        fs_type,
        uuid: uuid_be(sb.get(104..120).unwrap_or(&[])),
        label: cstr(sb.get(120..136).unwrap_or(&[])),
        block_size: bs,
        block_count: blocks,
        free_blocks: Some(free),
        inode_size,
        inode_count: le32(sb, 0),
        btrfs: None,
    })
}

/// Block group profile bits of a chunk type (uapi btrfs_tree.h `BTRFS_BLOCK_GROUP_*`).
const BTRFS_PROFILES: &[(u64, &str)] = &[
    (0x8, "raid0"),
    (0x10, "raid1"),
    (0x20, "dup"),
    (0x40, "raid10"),
    (0x80, "raid5"),
    (0x100, "raid6"),
    (0x200, "raid1c3"),
    (0x400, "raid1c4"),
];
/// `BTRFS_BLOCK_GROUP_SYSTEM`.
const BTRFS_SYSTEM: u64 = 0x2;
/// Bytes of a `btrfs_disk_key`.
const BTRFS_KEY_LEN: usize = 17;
/// Bytes of a `btrfs_chunk` before its stripes.
const BTRFS_CHUNK_LEN: usize = 48;
/// Bytes of a `btrfs_stripe`.
const BTRFS_STRIPE_LEN: usize = 32;

fn profile_name(flags: u64) -> &'static str {
    BTRFS_PROFILES
        .iter()
        .find(|(bit, _)| flags & bit != 0)
        .map_or("single", |(_, n)| n)
}

fn btrfs(sb: &[u8]) -> Result<FsInfo, Error> {
    let sectorsize = le32(sb, 0x90);
    let nodesize = le32(sb, 0x94);
    if !(512..=65536).contains(&sectorsize) || !sectorsize.is_power_of_two() {
        return Err(corrupt("btrfs", format!("sector size {sectorsize}")));
    }
    if !(4096..=65536).contains(&nodesize) || !nodesize.is_power_of_two() {
        return Err(corrupt("btrfs", format!("node size {nodesize}")));
    }
    let arr_len = usize::try_from(le32(sb, 0xa0)).unwrap_or(usize::MAX);
    let arr = sb
        .get(0x32b..0x32b + arr_len.min(2048))
        .ok_or_else(|| corrupt("btrfs", "system chunk array cut short"))?;
    let mut system_profile = None;
    let mut at = 0;
    while at + BTRFS_KEY_LEN + BTRFS_CHUNK_LEN <= arr.len() {
        let chunk = &arr[at + BTRFS_KEY_LEN..];
        let kind = le64(chunk, 24);
        let stripes = usize::try_from(le16(chunk, 44)).unwrap_or(0);
        if kind & BTRFS_SYSTEM != 0 && system_profile.is_none() {
            system_profile = Some(profile_name(kind).to_string());
        }
        at += BTRFS_KEY_LEN + BTRFS_CHUNK_LEN + stripes * BTRFS_STRIPE_LEN;
    }
    let label = cstr(&sb[0x12b..0x12b + 256]);
    let fsid = uuid_be(&sb[0x20..0x30]);
    let dev = &sb[0xc9..0xc9 + 0x62];
    Ok(FsInfo {
        fs_type: "btrfs",
        uuid: fsid.clone(),
        label: label.clone(),
        block_size: sectorsize,
        block_count: le64(sb, 0x70) / sectorsize,
        free_blocks: None,
        inode_size: 0,
        inode_count: 0,
        btrfs: Some(BtrfsSuper {
            fsid,
            label,
            total_bytes: le64(sb, 0x70),
            bytes_used: le64(sb, 0x78),
            nodesize: u32::try_from(nodesize).unwrap_or(0),
            sectorsize: u32::try_from(sectorsize).unwrap_or(0),
            num_devices: le64(sb, 0x88),
            devid: le64(dev, 0),
            dev_uuid: uuid_be(&dev[0x42..0x52]),
            system_profile,
        }),
    })
}

fn ntfs(h: &[u8], size: u64) -> Result<FsInfo, Error> {
    let bps = le16(h, 11);
    let spc = u64::from(*h.get(13).unwrap_or(&0));
    if !(256..=4096).contains(&bps) || !bps.is_power_of_two() || spc == 0 {
        return Err(corrupt(
            "ntfs",
            format!("{bps} bytes per sector, {spc} sectors per cluster"),
        ));
    }
    let sectors = le64(h, 0x28);
    Ok(FsInfo {
        fs_type: "ntfs",
        uuid: format!("{:016X}", le64(h, 0x48)),
        block_size: bps * spc,
        block_count: sectors.min(size / bps) / spc,
        ..FsInfo::default()
    })
}

fn vfat(h: &[u8]) -> Option<FsInfo> {
    if h.get(510..512) != Some(&[0x55, 0xAA][..]) || !matches!(h.first(), Some(0xEB | 0xE9)) {
        return None;
    }
    let bps = le16(h, 11);
    let spc = u64::from(*h.get(13)?);
    let fats = *h.get(16)?;
    if !(512..=4096).contains(&bps)
        || !bps.is_power_of_two()
        || spc == 0
        || !spc.is_power_of_two()
        || !(1..=2).contains(&fats)
    {
        return None;
    }
    let total = if le16(h, 19) != 0 {
        le16(h, 19)
    } else {
        le32(h, 32)
    };
    let fat32 = le16(h, 22) == 0;
    let (id_at, label_at) = if fat32 { (67, 71) } else { (39, 43) };
    let id = le32(h, id_at);
    let mut label = cstr(h.get(label_at..label_at + 11)?);
    if label == "NO NAME" {
        label.clear();
    }
    Some(FsInfo {
        fs_type: "vfat",
        uuid: format!("{:04X}-{:04X}", id >> 16, id & 0xFFFF),
        label,
        block_size: bps * spc,
        block_count: total / spc,
        ..FsInfo::default()
    })
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_blank_never_panic() {
        assert!(detect(&vec![0u8; 100], 100).unwrap().is_none());
        assert!(detect(&vec![0u8; 1 << 17], 1 << 17).unwrap().is_none());
        let mut x = 0x9E37_79B9u64;
        for round in 0..300 {
            let mut img = vec![0u8; 1 << 17];
            for b in img.iter_mut() {
                crate::testutil::xorshift(&mut x);
                *b = x as u8;
            }
            // Plant each magic in turn over random bytes.
            match round % 6 {
                0 => img[0..4].copy_from_slice(b"XFSB"),
                1 => img[1080..1082].copy_from_slice(&[0x53, 0xEF]),
                2 => img[0x10040..0x10048].copy_from_slice(b"_BHRfS_M"),
                3 => {
                    img[512..520].copy_from_slice(b"LABELONE");
                    img[536..544].copy_from_slice(b"LVM2 001");
                }
                4 => img[3..11].copy_from_slice(b"NTFS    "),
                _ => img[0..6].copy_from_slice(b"LUKS\xba\xbe"),
            }
            let _ = detect(&img, img.len() as u64);
        }
    }

    #[test]
    fn truncated_ext_superblock_is_an_error() {
        let mut img = vec![0u8; 1100];
        img[1080..1082].copy_from_slice(&[0x53, 0xEF]);
        let e = detect(&img, 1100).unwrap_err().to_string();
        assert!(e.contains("ext4") && e.contains("short"), "{e}");
    }

    #[test]
    fn ext_with_impossible_size_is_an_error() {
        let mut img = vec![0u8; 8192];
        img[1024 + 56..1024 + 58].copy_from_slice(&[0x53, 0xEF]);
        img[1024 + 4..1024 + 8].copy_from_slice(&1_000_000u32.to_le_bytes());
        let e = detect(&img, 8192).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
    }

    #[test]
    fn swap_and_lvm_and_vfat_from_hand_made_headers() {
        let mut img = vec![0u8; 8192];
        img[4086..4096].copy_from_slice(b"SWAPSPACE2");
        img[1036..1052].copy_from_slice(&[0x11; 16]);
        img[1052..1056].copy_from_slice(b"swp\0");
        let i = detect(&img, 8192).unwrap().unwrap();
        assert_eq!((i.fs_type, i.label.as_str()), ("swap", "swp"));
        assert_eq!(i.uuid, "11111111-1111-1111-1111-111111111111");

        let mut img = vec![0u8; 8192];
        img[512..520].copy_from_slice(b"LABELONE");
        img[512 + 20..512 + 24].copy_from_slice(&32u32.to_le_bytes());
        img[536..544].copy_from_slice(b"LVM2 001");
        img[544..576].copy_from_slice(b"abcdefghijklmnopqrstuvwxyz012345");
        let i = detect(&img, 8192).unwrap().unwrap();
        assert_eq!(i.fs_type, "LVM2_member");
        assert_eq!(i.uuid, "abcdef-ghij-klmn-opqr-stuv-wxyz-012345");

        let mut img = vec![0u8; 8192];
        img[0] = 0xEB;
        img[11..13].copy_from_slice(&512u16.to_le_bytes());
        img[13] = 4;
        img[16] = 2;
        img[32..36].copy_from_slice(&100_000u32.to_le_bytes());
        img[67..71].copy_from_slice(&0x1234_ABCDu32.to_le_bytes());
        img[71..82].copy_from_slice(b"ESP        ");
        img[510] = 0x55;
        img[511] = 0xAA;
        let i = detect(&img, 8192).unwrap().unwrap();
        assert_eq!(
            (i.fs_type, i.uuid.as_str(), i.label.as_str()),
            ("vfat", "1234-ABCD", "ESP")
        );
        assert_eq!(i.block_size, 2048);
    }
}
