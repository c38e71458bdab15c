//! Chunk arithmetic of a block pass: which chunks of a disk hold allocated bytes, which of
//! them the target already has (the done bitmap), and the work items the streams share.

use std::ops::Range;

/// A bitmap with one bit per chunk, LSB first (the wire's `DoneMap` layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    bits: Vec<u8>,
    len: u64,
}

impl Bitmap {
    /// All clear, `len` bits.
    pub fn new(len: u64) -> Self {
        let bytes = usize::try_from(len.div_ceil(8)).unwrap_or(usize::MAX);
        Self {
            bits: vec![0; bytes],
            len,
        }
    }

    /// All clear, `len` bits, or `None` when the memory for them cannot be had: the length
    /// comes from a peer's plan, and a failed allocation must not abort the receiver.
    pub fn try_new(len: u64) -> Option<Self> {
        let bytes = usize::try_from(len.div_ceil(8)).ok()?;
        let mut bits = Vec::new();
        bits.try_reserve_exact(bytes).ok()?;
        bits.resize(bytes, 0);
        Some(Self { bits, len })
    }

    /// From wire/checkpoint bytes; `None` when the length does not fit `len` bits.
    pub fn from_bytes(bits: Vec<u8>, len: u64) -> Option<Self> {
        (bits.len() as u64 == len.div_ceil(8)).then_some(Self { bits, len })
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it has no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bit `i` (false past the end).
    pub fn get(&self, i: u64) -> bool {
        usize::try_from(i / 8)
            .ok()
            .and_then(|b| self.bits.get(b))
            .is_some_and(|byte| byte & (1 << (i % 8)) != 0)
    }

    /// Sets bit `i`; returns false when `i` is past the end.
    pub fn set(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        match usize::try_from(i / 8)
            .ok()
            .and_then(|b| self.bits.get_mut(b))
        {
            Some(byte) => {
                *byte |= 1 << (i % 8);
                true
            }
            None => false,
        }
    }

    /// The lowest and highest set bits, if any.
    pub fn ends(&self) -> Option<(u64, u64)> {
        let first = self.bits.iter().position(|&b| b != 0)?;
        let last = self.bits.iter().rposition(|&b| b != 0)?;
        let lo = first as u64 * 8 + u64::from(self.bits[first].trailing_zeros());
        let hi = last as u64 * 8 + 7 - u64::from(self.bits[last].leading_zeros());
        Some((lo, hi))
    }

    /// Bits set.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }
}

/// Chunks of a disk of `size` bytes.
pub fn chunk_count(size: u64, chunk: u64) -> u64 {
    size.div_ceil(chunk)
}

/// Byte range of chunk `i`, clipped to the disk.
pub fn chunk_range(i: u64, chunk: u64, size: u64) -> Range<u64> {
    let start = i.saturating_mul(chunk).min(size);
    start..start.saturating_add(chunk).min(size)
}

/// Gaps shorter than this between two used ranges of a chunk are read too: one larger read
/// and one frame beat many small ones, and the gap costs little.
const COALESCE: u64 = 64 << 10;

/// One unit of work: a chunk and the used byte ranges inside it (absolute disk offsets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Index into the pass's disks.
    pub disk: u16,
    /// Chunk index.
    pub chunk: u64,
    /// Used ranges inside the chunk, sorted, coalesced.
    pub ranges: Vec<Range<u64>>,
}

impl Item {
    /// Bytes the item covers.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }
}

/// Walks the chunks of one disk that intersect its used ranges, in offset order.
#[derive(Debug)]
pub struct DiskItems<'a> {
    disk: u16,
    chunk: u64,
    size: u64,
    used: &'a [Range<u64>],
    /// Index of the first used range that may still intersect the next chunk.
    at: usize,
    next_chunk: u64,
}

impl<'a> DiskItems<'a> {
    /// `used` must be sorted and non-overlapping (see [`normalize`]).
    pub fn new(disk: u16, chunk: u64, size: u64, used: &'a [Range<u64>]) -> Self {
        Self {
            disk,
            chunk,
            size,
            used,
            at: 0,
            next_chunk: 0,
        }
    }
}

impl<'a> DiskItems<'a> {
    /// Continues a walk at used range `at`, from chunk `next_chunk` on.
    pub fn resume(
        disk: u16,
        chunk: u64,
        size: u64,
        used: &'a [Range<u64>],
        at: usize,
        next_chunk: u64,
    ) -> Self {
        Self {
            disk,
            chunk,
            size,
            used,
            at,
            next_chunk,
        }
    }

    /// Where the walk stands: (used range index, next chunk), for [`DiskItems::resume`].
    pub fn position(&self) -> (usize, u64) {
        (self.at, self.next_chunk)
    }
}

impl Iterator for DiskItems<'_> {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        loop {
            let first = self.used.get(self.at)?;
            // Jump straight to the chunk holding the next used byte.
            let c = self.next_chunk.max(first.start / self.chunk);
            let cr = chunk_range(c, self.chunk, self.size);
            if cr.is_empty() {
                return None;
            }
            let mut ranges: Vec<Range<u64>> = Vec::new();
            let mut i = self.at;
            while let Some(r) = self.used.get(i) {
                if r.start >= cr.end {
                    break;
                }
                let s = r.start.max(cr.start);
                let e = r.end.min(cr.end);
                if s < e {
                    match ranges.last_mut() {
                        Some(last) if s <= last.end + COALESCE => last.end = e,
                        _ => ranges.push(s..e),
                    }
                }
                if r.end <= cr.end {
                    i += 1;
                } else {
                    break;
                }
            }
            self.at = i;
            self.next_chunk = c + 1;
            if !ranges.is_empty() {
                return Some(Item {
                    disk: self.disk,
                    chunk: c,
                    ranges,
                });
            }
        }
    }
}

/// Sorts, clips to `size` and merges ranges.
pub fn normalize(mut v: Vec<Range<u64>>, size: u64) -> Vec<Range<u64>> {
    v.retain(|r| r.start < r.end && r.start < size);
    for r in &mut v {
        r.end = r.end.min(size);
    }
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Bytes of the used ranges that fall into chunks set in `done` (work already on the target).
pub fn done_bytes(used: &[Range<u64>], chunk: u64, size: u64, done: &Bitmap) -> u64 {
    DiskItems::new(0, chunk, size, used)
        .filter(|it| done.get(it.chunk))
        .map(|it| it.bytes())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_bits() {
        let mut b = Bitmap::new(10);
        assert_eq!(b.as_bytes().len(), 2);
        assert!(b.set(0) && b.set(9) && !b.set(10));
        assert!(b.get(0) && b.get(9) && !b.get(5) && !b.get(100));
        assert_eq!(b.count(), 2);
        assert!(Bitmap::from_bytes(vec![0; 3], 10).is_none());
        assert_eq!(b.ends(), Some((0, 9)));
        assert_eq!(Bitmap::try_new(10), Some(Bitmap::new(10)));
        assert!(Bitmap::try_new(u64::MAX).is_none());
        assert_eq!(Bitmap::from_bytes(b.as_bytes().to_vec(), 10), Some(b));
        let mut c = Bitmap::new(100);
        assert_eq!(c.ends(), None);
        c.set(42);
        assert_eq!(c.ends(), Some((42, 42)));
        c.set(17);
        assert_eq!(c.ends(), Some((17, 42)));
    }

    #[test]
    fn items_cover_exactly_the_used_bytes() {
        const C: u64 = 1 << 20;
        let size = 10 * C + 5;
        let used = normalize(
            vec![
                0..4096,
                8192..12288,
                (C - 100)..(C + 100),
                (3 * C)..(6 * C + 7),
                (10 * C)..(10 * C + 100),
                (20 * C)..(21 * C),
            ],
            size,
        );
        let items: Vec<_> = DiskItems::new(1, C, size, &used).collect();
        let chunks: Vec<u64> = items.iter().map(|i| i.chunk).collect();
        assert_eq!(chunks, vec![0, 1, 3, 4, 5, 6, 10]);
        // Small gaps coalesce inside a chunk.
        assert_eq!(items[0].ranges, vec![0..12288, (C - 100)..C]);
        assert_eq!(items[1].ranges, vec![C..C + 100]);
        assert_eq!(items[5].ranges, vec![6 * C..6 * C + 7]);
        assert_eq!(items[6].ranges, vec![10 * C..10 * C + 5]);
        assert!(items.iter().all(|i| i.disk == 1));
        // Every used byte is in exactly one item.
        let total: u64 = items.iter().map(Item::bytes).sum();
        assert!(total >= used.iter().map(|r| r.end - r.start).sum::<u64>());
        assert_eq!(DiskItems::new(0, C, size, &[]).count(), 0);
    }

    #[test]
    fn done_chunks_are_counted() {
        const C: u64 = 65536;
        let used = [0..C, C..3 * C];
        let mut d = Bitmap::new(3);
        d.set(1);
        assert_eq!(done_bytes(&used, C, 3 * C, &d), C);
    }
}
