//! mountinfo parsing and unescaping on arbitrary text: never panics.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = probe::mounts::parse_mountinfo(s);
        let _ = probe::mounts::unescape(s);
    }
});
