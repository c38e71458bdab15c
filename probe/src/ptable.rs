//! Partition tables read from the disk itself: GPT (falling back to the backup header when the
//! primary is damaged) and MBR with extended/logical partitions.
//!
//! Layouts: UEFI Specification 2.10 §5.3 (GPT header and entries), and the classic PC MBR/EBR
//! layout (partition entries at byte 446, signature 0x55AA at 510).

use crate::io::ReadAt;

/// MBR boot signature at bytes 510–511.
const MBR_SIGNATURE: [u8; 2] = [0x55, 0xAA];
/// Offset of the four MBR partition entries.
const MBR_ENTRIES: usize = 446;
/// Size of one MBR partition entry.
const MBR_ENTRY_LEN: usize = 16;
/// Partition type of a GPT protective MBR entry.
const MBR_TYPE_GPT_PROTECTIVE: u8 = 0xEE;
/// Partition types of an extended partition (DOS, Win95 LBA, Linux).
const MBR_TYPES_EXTENDED: [u8; 3] = [0x05, 0x0F, 0x85];
/// Logical partitions followed before the EBR chain is declared looping. Linux stops at a
/// few hundred too (fs/partitions/msdos.c); nobody has that many.
const MAX_LOGICAL: u32 = 256;
/// GPT header signature.
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
/// Smallest legal GPT header (UEFI §5.3.2: 92 bytes).
const GPT_HEADER_MIN: usize = 92;
/// Smallest GPT entry (UEFI: 128 × 2^n).
const GPT_ENTRY_MIN: u32 = 128;
/// Largest entry size we accept: real tables use 128; a larger value is corruption, and
/// `entries × size` must stay within [`crate::io::MAX_READ`].
const GPT_ENTRY_MAX: u32 = 4096;
/// Largest number of entries we accept (the usual array has 128; some tools write 256+).
const GPT_ENTRIES_MAX: u32 = 4096;

/// Partitioning scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Master boot record.
    Mbr,
    /// GUID partition table.
    Gpt,
}

impl Style {
    /// `MBR` or `GPT`, as SMS spells `partition_style`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Style::Mbr => "MBR",
            Style::Gpt => "GPT",
        }
    }
}

/// Scheme-specific facts of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartKind {
    /// An MBR partition.
    Mbr {
        /// Partition type byte.
        type_byte: u8,
        /// Active flag.
        bootable: bool,
        /// The extended container itself.
        extended: bool,
        /// A logical partition inside the extended one.
        logical: bool,
    },
    /// A GPT partition.
    Gpt {
        /// Partition type GUID, lowercase.
        type_guid: String,
        /// Unique partition GUID, lowercase.
        unique_guid: String,
        /// Partition name.
        name: String,
    },
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Number as the kernel gives it (MBR: slots 1–4, logicals from 5; GPT: entry index + 1).
    pub number: u32,
    /// Start in bytes.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Scheme-specific facts.
    pub kind: PartKind,
}

/// A partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionTable {
    /// Scheme.
    pub style: Style,
    /// Partitions in number order.
    pub partitions: Vec<Partition>,
    /// Things worth a warning (a damaged primary GPT that the backup replaced).
    pub notes: Vec<String>,
}

/// Why a partition table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the disk failed.
    #[error("cannot read {what}: {source}")]
    Io {
        /// What was being read.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Both GPT headers are unusable.
    #[error("GPT is damaged: primary header {primary}; backup header {backup}")]
    GptDamaged {
        /// What is wrong with the primary.
        primary: String,
        /// What is wrong with the backup.
        backup: String,
    },
    /// The MBR/EBR structure is inconsistent.
    #[error("MBR is damaged: {0}")]
    MbrDamaged(String),
    /// An unusable sector size.
    #[error("sector size {0} is not 512, 1024, 2048 or 4096")]
    SectorSize(u64),
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A GUID in its canonical text form (the first three fields are little-endian on disk).
pub fn guid(b: &[u8]) -> String {
    if b.len() < 16 {
        return String::new();
    }
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
    )
}

/// Reads the partition table of a disk of `dev_size` bytes with logical sectors of
/// `sector_size` bytes; `Ok(None)` when it has none.
pub fn read(
    dev: &(impl ReadAt + ?Sized),
    dev_size: u64,
    sector_size: u64,
) -> Result<Option<PartitionTable>, Error> {
    if ![512, 1024, 2048, 4096].contains(&sector_size) {
        return Err(Error::SectorSize(sector_size));
    }
    if dev_size < 512 {
        return Ok(None);
    }
    let mbr = dev.read_vec(0, 512).map_err(|source| Error::Io {
        what: "the MBR",
        source,
    })?;
    let has_sig = mbr.get(510..512) == Some(&MBR_SIGNATURE[..]);
    let entries = mbr_entries(&mbr);
    let protective = has_sig
        && entries
            .iter()
            .any(|e| e.type_byte == MBR_TYPE_GPT_PROTECTIVE);
    // A GPT without a valid protective MBR still counts when its header checks out (the
    // kernel's `gpt` option does the same); a corrupt header there means "no GPT".
    match read_gpt(dev, dev_size, sector_size) {
        Ok(t) => return Ok(Some(t)),
        Err(e) if protective => return Err(e),
        Err(_) => {}
    }
    if !has_sig || looks_like_boot_sector(&mbr) || !entries_sane(&entries, dev_size / 512) {
        return Ok(None);
    }
    if entries.iter().all(|e| e.type_byte == 0) {
        return Ok(None);
    }
    read_mbr(dev, dev_size, &entries).map(Some)
}

#[derive(Debug, Clone, Copy)]
struct MbrEntry {
    boot: u8,
    type_byte: u8,
    lba: u32,
    sectors: u32,
}

fn mbr_entries(sector: &[u8]) -> Vec<MbrEntry> {
    (0..4)
        .filter_map(|i| {
            let at = MBR_ENTRIES + i * MBR_ENTRY_LEN;
            Some(MbrEntry {
                boot: *sector.get(at)?,
                type_byte: *sector.get(at + 4)?,
                lba: le32(sector, at + 8)?,
                sectors: le32(sector, at + 12)?,
            })
        })
        .collect()
}

/// A FAT or NTFS boot sector on an unpartitioned disk also ends in 0x55AA; its "entries" are
/// boot code (the kernel's msdos parser makes the same check).
fn looks_like_boot_sector(s: &[u8]) -> bool {
    s.get(3..11) == Some(b"NTFS    ")
        || s.get(54..59) == Some(b"FAT12")
        || s.get(54..59) == Some(b"FAT16")
        || s.get(82..87) == Some(b"FAT32")
}

fn entries_sane(entries: &[MbrEntry], sectors: u64) -> bool {
    entries.iter().all(|e| {
        (e.boot == 0 || e.boot == 0x80)
            && (e.type_byte == 0 || (e.sectors > 0 && u64::from(e.lba) < sectors.max(1)))
    })
}

fn read_mbr(
    dev: &(impl ReadAt + ?Sized),
    dev_size: u64,
    entries: &[MbrEntry],
) -> Result<PartitionTable, Error> {
    // MBR addresses are always in 512-byte units on Linux, whatever the logical sector size,
    // except on 4K-native disks; the kernel uses the logical size. Use 512 unless the table
    // only makes sense in larger units.
    let unit = 512u64;
    let mut parts = Vec::new();
    let mut notes = Vec::new();
    let mut ext_start = None;
    for (i, e) in entries.iter().enumerate() {
        if e.type_byte == 0 || e.sectors == 0 {
            continue;
        }
        let number = u32::try_from(i + 1).unwrap_or(0);
        let extended = MBR_TYPES_EXTENDED.contains(&e.type_byte);
        let start = u64::from(e.lba) * unit;
        let size = u64::from(e.sectors) * unit;
        if start.saturating_add(size) > dev_size {
            notes.push(format!(
                "MBR partition {number} ends beyond the end of the disk"
            ));
        }
        if extended {
            if ext_start.is_some() {
                return Err(Error::MbrDamaged("more than one extended partition".into()));
            }
            ext_start = Some((u64::from(e.lba), u64::from(e.sectors)));
        }
        parts.push(Partition {
            number,
            start,
            size,
            kind: PartKind::Mbr {
                type_byte: e.type_byte,
                bootable: e.boot == 0x80,
                extended,
                logical: false,
            },
        });
    }
    if let Some((ext_lba, ext_len)) = ext_start {
        let mut ebr_rel = 0u64;
        let mut number = 5u32;
        let mut seen = Vec::new();
        loop {
            if seen.contains(&ebr_rel) || number - 5 >= MAX_LOGICAL {
                return Err(Error::MbrDamaged(format!(
                    "the chain of extended boot records loops (at sector {})",
                    ext_lba + ebr_rel
                )));
            }
            seen.push(ebr_rel);
            let at = (ext_lba + ebr_rel) * unit;
            let ebr = dev.read_vec(at, 512).map_err(|source| Error::Io {
                what: "an extended boot record",
                source,
            })?;
            if ebr.get(510..512) != Some(&MBR_SIGNATURE[..]) {
                if number == 5 {
                    // An empty extended partition.
                    break;
                }
                return Err(Error::MbrDamaged(format!(
                    "extended boot record at sector {} has no signature",
                    ext_lba + ebr_rel
                )));
            }
            let e = mbr_entries(&ebr);
            let (Some(first), Some(next)) = (e.first(), e.get(1)) else {
                break;
            };
            if first.type_byte != 0 && first.sectors > 0 {
                parts.push(Partition {
                    number,
                    start: (ext_lba + ebr_rel + u64::from(first.lba)) * unit,
                    size: u64::from(first.sectors) * unit,
                    kind: PartKind::Mbr {
                        type_byte: first.type_byte,
                        bootable: first.boot == 0x80,
                        extended: false,
                        logical: true,
                    },
                });
                number += 1;
            }
            if next.type_byte == 0 || next.sectors == 0 {
                break;
            }
            ebr_rel = u64::from(next.lba);
            if ebr_rel >= ext_len {
                return Err(Error::MbrDamaged(
                    "an extended boot record points outside the extended partition".into(),
                ));
            }
        }
    }
    parts.sort_by_key(|p| p.number);
    Ok(PartitionTable {
        style: Style::Mbr,
        partitions: parts,
        notes,
    })
}

fn read_gpt(dev: &(impl ReadAt + ?Sized), dev_size: u64, ss: u64) -> Result<PartitionTable, Error> {
    // Found by the `ptable` fuzz target: a device smaller than one sector underflowed here.
    let Some(last_lba) = (dev_size / ss).checked_sub(1).filter(|l| *l >= 2) else {
        return Err(Error::GptDamaged {
            primary: "the disk is too small for a GPT".into(),
            backup: "the disk is too small for a GPT".into(),
        });
    };
    let primary = gpt_at(dev, 1, dev_size, ss);
    match primary {
        Ok(parts) => Ok(PartitionTable {
            style: Style::Gpt,
            partitions: parts,
            notes: Vec::new(),
        }),
        Err(p) => match gpt_at(dev, last_lba, dev_size, ss) {
            Ok(parts) => Ok(PartitionTable {
                style: Style::Gpt,
                partitions: parts,
                notes: vec![format!(
                    "primary GPT header is damaged ({p}); using the backup GPT at LBA {last_lba}"
                )],
            }),
            Err(b) => Err(Error::GptDamaged {
                primary: p,
                backup: b,
            }),
        },
    }
}

/// Reads and checks the GPT header at `lba` and its entry array.
fn gpt_at(
    dev: &(impl ReadAt + ?Sized),
    lba: u64,
    dev_size: u64,
    ss: u64,
) -> Result<Vec<Partition>, String> {
    let ss_usize = usize::try_from(ss).map_err(|_| "sector size too large".to_string())?;
    let h = dev
        .read_vec(lba * ss, ss_usize)
        .map_err(|e| format!("unreadable: {e}"))?;
    if h.get(0..8) != Some(&GPT_SIGNATURE[..]) {
        return Err("no \"EFI PART\" signature".into());
    }
    let hsize = le32(&h, 12).ok_or("truncated")? as usize;
    if hsize < GPT_HEADER_MIN || hsize > h.len() {
        return Err(format!("header size {hsize} out of range"));
    }
    let stored = le32(&h, 16).ok_or("truncated")?;
    let mut copy = h.get(..hsize).ok_or("truncated")?.to_vec();
    copy[16..20].fill(0);
    if crc32fast::hash(&copy) != stored {
        return Err("header CRC mismatch".into());
    }
    let my_lba = le64(&h, 24).ok_or("truncated")?;
    if my_lba != lba {
        return Err(format!("header says it is at LBA {my_lba}, found at {lba}"));
    }
    let entries_lba = le64(&h, 72).ok_or("truncated")?;
    let count = le32(&h, 80).ok_or("truncated")?;
    let esize = le32(&h, 84).ok_or("truncated")?;
    let ecrc = le32(&h, 88).ok_or("truncated")?;
    if !(GPT_ENTRY_MIN..=GPT_ENTRY_MAX).contains(&esize) || esize % 8 != 0 {
        return Err(format!("entry size {esize} out of range"));
    }
    if count > GPT_ENTRIES_MAX {
        return Err(format!("{count} entries is more than {GPT_ENTRIES_MAX}"));
    }
    let len = usize::try_from(u64::from(count) * u64::from(esize))
        .map_err(|_| "entry array too large")?;
    let arr = dev
        .read_vec(entries_lba.saturating_mul(ss), len)
        .map_err(|e| format!("entry array unreadable: {e}"))?;
    if crc32fast::hash(&arr) != ecrc {
        return Err("partition entry array CRC mismatch".into());
    }
    let mut parts = Vec::new();
    for i in 0..count {
        let at = usize::try_from(u64::from(i) * u64::from(esize)).map_err(|_| "entry offset")?;
        let Some(e) = arr.get(at..at + 128) else {
            break;
        };
        if e[..16].iter().all(|b| *b == 0) {
            continue;
        }
        let first = le64(e, 32).ok_or("truncated entry")?;
        let last = le64(e, 40).ok_or("truncated entry")?;
        if last < first || last.saturating_add(1).saturating_mul(ss) > dev_size {
            return Err(format!(
                "entry {} spans LBA {first}–{last}, outside the disk",
                i + 1
            ));
        }
        let name_units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|u| *u != 0)
            .collect();
        parts.push(Partition {
            number: i + 1,
            start: first * ss,
            size: (last - first + 1) * ss,
            kind: PartKind::Gpt {
                type_guid: guid(&e[0..16]),
                unique_guid: guid(&e[16..32]),
                name: String::from_utf16_lossy(&name_units),
            },
        });
    }
    Ok(parts)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// A 1 MiB disk image with a GPT holding one partition at LBA 34–99.
    fn gpt_image() -> Vec<u8> {
        let ss = 512usize;
        let sectors = 2048u64;
        let mut img = vec![0u8; ss * sectors as usize];
        // Protective MBR.
        img[446 + 4] = 0xEE;
        put32(&mut img, 446 + 8, 1);
        put32(&mut img, 446 + 12, (sectors - 1) as u32);
        img[510] = 0x55;
        img[511] = 0xAA;
        let mut entries = vec![0u8; 128 * 128];
        entries[0] = 0xAF; // some type GUID
        entries[16] = 0x01;
        put64(&mut entries, 32, 34);
        put64(&mut entries, 40, 99);
        for (i, u) in "root".encode_utf16().enumerate() {
            entries[56 + 2 * i..58 + 2 * i].copy_from_slice(&u.to_le_bytes());
        }
        let ecrc = crc32fast::hash(&entries);
        let header = |my: u64, alt: u64, elba: u64| {
            let mut h = vec![0u8; 92];
            h[0..8].copy_from_slice(GPT_SIGNATURE);
            put32(&mut h, 8, 0x0001_0000);
            put32(&mut h, 12, 92);
            put64(&mut h, 24, my);
            put64(&mut h, 32, alt);
            put64(&mut h, 40, 34);
            put64(&mut h, 48, sectors - 34);
            put64(&mut h, 72, elba);
            put32(&mut h, 80, 128);
            put32(&mut h, 84, 128);
            put32(&mut h, 88, ecrc);
            let c = crc32fast::hash(&h);
            put32(&mut h, 16, c);
            h
        };
        let last = sectors - 1;
        let h1 = header(1, last, 2);
        let h2 = header(last, 1, last - 32);
        img[ss..ss + 92].copy_from_slice(&h1);
        img[2 * ss..2 * ss + entries.len()].copy_from_slice(&entries);
        let l = last as usize;
        img[l * ss..l * ss + 92].copy_from_slice(&h2);
        img[(l - 32) * ss..(l - 32) * ss + entries.len()].copy_from_slice(&entries);
        img
    }

    #[test]
    fn reads_gpt_and_falls_back_to_backup() {
        let img = gpt_image();
        let t = read(&img, img.len() as u64, 512).unwrap().unwrap();
        assert_eq!(t.style, Style::Gpt);
        assert!(t.notes.is_empty());
        assert_eq!(t.partitions.len(), 1);
        assert_eq!(t.partitions[0].start, 34 * 512);
        assert_eq!(t.partitions[0].size, 66 * 512);
        assert!(matches!(&t.partitions[0].kind, PartKind::Gpt { name, .. } if name == "root"));

        let mut damaged = img.clone();
        damaged[512..1024].fill(0);
        let t = read(&damaged, damaged.len() as u64, 512).unwrap().unwrap();
        assert_eq!(t.partitions.len(), 1);
        assert!(t.notes[0].contains("backup"), "{:?}", t.notes);

        let mut both = damaged.clone();
        let l = both.len() - 512;
        both[l] ^= 0xFF;
        let e = read(&both, both.len() as u64, 512).unwrap_err().to_string();
        assert!(e.contains("primary") && e.contains("backup"), "{e}");
    }

    #[test]
    fn reads_mbr_with_logicals_and_detects_loops() {
        let mut img = vec![0u8; 1 << 20];
        let entry = |img: &mut [u8], sector: usize, slot: usize, t: u8, lba: u32, n: u32| {
            let at = sector * 512 + 446 + slot * 16;
            img[at + 4] = t;
            put32(img, at + 8, lba);
            put32(img, at + 12, n);
            img[sector * 512 + 510] = 0x55;
            img[sector * 512 + 511] = 0xAA;
        };
        entry(&mut img, 0, 0, 0x83, 2, 100);
        entry(&mut img, 0, 1, 0x05, 200, 1000);
        // EBR 1 at sector 200: logical at +2, next EBR at +300.
        entry(&mut img, 200, 0, 0x83, 2, 50);
        entry(&mut img, 200, 1, 0x05, 300, 100);
        // EBR 2 at sector 500: logical at +2, end of chain.
        entry(&mut img, 500, 0, 0x82, 2, 60);
        let t = read(&img, img.len() as u64, 512).unwrap().unwrap();
        assert_eq!(t.style, Style::Mbr);
        let nums: Vec<_> = t
            .partitions
            .iter()
            .map(|p| (p.number, p.start / 512, p.size / 512))
            .collect();
        assert_eq!(
            nums,
            vec![(1, 2, 100), (2, 200, 1000), (5, 202, 50), (6, 502, 60)]
        );

        // Point EBR 2 back at EBR 1.
        entry(&mut img, 500, 1, 0x05, 0, 100);
        let e = read(&img, img.len() as u64, 512).unwrap_err().to_string();
        assert!(e.contains("loops"), "{e}");
    }

    #[test]
    fn no_table_and_garbage() {
        let blank = vec![0u8; 4096];
        assert!(read(&blank, 4096, 512).unwrap().is_none());
        let mut fat = vec![0u8; 4096];
        fat[82..87].copy_from_slice(b"FAT32");
        fat[510] = 0x55;
        fat[511] = 0xAA;
        fat[446] = 0x12;
        assert!(read(&fat, 4096, 512).unwrap().is_none());
        assert!(read(&blank, 4096, 333).is_err());
        // Pseudo-random sectors never panic.
        let mut x = 0x1234_5678u64;
        for _ in 0..200 {
            let mut img = vec![0u8; 8192];
            for b in img.iter_mut() {
                crate::testutil::xorshift(&mut x);
                *b = x as u8;
            }
            img[510] = 0x55;
            img[511] = 0xAA;
            img[512..520].copy_from_slice(GPT_SIGNATURE);
            let _ = read(&img, 8192, 512);
        }
        // Smaller than a sector at 4 KiB sectors (found by fuzzing: used to underflow).
        assert!(read(&vec![0u8; 1024], 1024, 4096).unwrap().is_none());
        // Truncated: the claimed disk is larger than the bytes behind it.
        let img = gpt_image();
        let short = img[..4096].to_vec();
        assert!(read(&short, img.len() as u64, 512).is_err());
    }
}
