//! Partition-table reader on arbitrary disk images: never panics, never loops.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for ss in [512u64, 4096] {
        let _ = probe::ptable::read(data, data.len() as u64, ss);
        // The claimed disk may be larger than the bytes behind it.
        let _ = probe::ptable::read(data, (data.len() as u64).saturating_mul(3), ss);
    }
});
