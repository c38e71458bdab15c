//! The changed blocks of one disk at 4 KiB granularity, kept sparse: a 2 TB disk with a few
//! megabytes changed costs a few kilobytes.

use std::collections::BTreeMap;
use std::ops::Range;

/// Tracking granularity: one bit per 4 KiB block (the sync's leaf size).
pub const BLOCK: u64 = 4096;
/// Blocks per group: one group covers 1 MiB.
const GROUP_BLOCKS: u64 = 256;

/// A set of changed 4 KiB blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dirty {
    groups: BTreeMap<u64, [u64; 4]>,
    blocks: u64,
}

impl Dirty {
    /// Marks the blocks that `[start, end)` (bytes) touches.
    pub fn mark(&mut self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let mut b = start / BLOCK;
        let last = end.div_ceil(BLOCK);
        while b < last {
            let g = b / GROUP_BLOCKS;
            let bits = self.groups.entry(g).or_insert([0; 4]);
            let group_end = ((g + 1) * GROUP_BLOCKS).min(last);
            while b < group_end {
                let i = b % GROUP_BLOCKS;
                let (w, m) = (usize::try_from(i / 64).unwrap_or(0), 1u64 << (i % 64));
                if bits[w] & m == 0 {
                    bits[w] |= m;
                    self.blocks += 1;
                }
                b += 1;
            }
        }
    }

    /// Adds every block of `other`.
    pub fn merge(&mut self, other: &Dirty) {
        for r in other.ranges() {
            self.mark(r.start, r.end);
        }
    }

    /// Bytes changed (whole blocks).
    pub fn bytes(&self) -> u64 {
        self.blocks * BLOCK
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.blocks == 0
    }

    /// The changed bytes as sorted, merged ranges.
    pub fn ranges(&self) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for (&g, bits) in &self.groups {
            for (w, &word) in bits.iter().enumerate() {
                let mut x = word;
                while x != 0 {
                    let i = u64::from(x.trailing_zeros());
                    x &= x - 1;
                    let b = g * GROUP_BLOCKS + w as u64 * 64 + i;
                    let (s, e) = (b * BLOCK, (b + 1) * BLOCK);
                    match out.last_mut() {
                        Some(last) if last.end == s => last.end = e,
                        _ => out.push(s..e),
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_whole_blocks_and_merges_neighbours() {
        let mut d = Dirty::default();
        assert!(d.is_empty());
        d.mark(100, 101);
        d.mark(4096, 8192);
        d.mark(10 << 20, (10 << 20) + 1);
        assert_eq!(d.ranges(), vec![0..8192, (10 << 20)..(10 << 20) + 4096]);
        assert_eq!(d.bytes(), 3 * 4096);
        // Across a group boundary.
        let mut e = Dirty::default();
        e.mark((1 << 20) - 512, (1 << 20) + 512);
        assert_eq!(e.ranges(), vec![(1 << 20) - 4096..(1 << 20) + 4096]);
        d.merge(&e);
        d.mark(0, 0);
        assert_eq!(d.bytes(), 5 * 4096);
        assert_eq!(d.ranges().len(), 3);
    }
}
