//! Superblock detection on arbitrary bytes: never panics.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = probe::fsdetect::detect(data, data.len() as u64);
});
