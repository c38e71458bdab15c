//! ext2/3/4 allocation from the on-disk bitmaps, on arbitrary images: never panics, and what it
//! returns is sorted, merged and non-empty ranges.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    // The partition may claim more bytes than are behind it.
    for claimed in [len, len.saturating_mul(16)] {
        if let Ok(ranges) = probe::alloc::ext4_used(data, 0, claimed) {
            assert!(ranges.iter().all(|r| r.start < r.end));
            assert!(ranges.windows(2).all(|w| w[0].end < w[1].start));
        }
    }
});
