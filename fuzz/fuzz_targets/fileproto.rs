//! File-mode message decoding: never panics, and whatever decodes re-encodes to the same
//! payload (the format has one encoding per message), and through a frame to the same frame.
#![no_main]
use transfer::file::proto::{read_any, Any, FileMsg};
use transfer::wire::{FILE_TYPES, MAX_PAYLOAD};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The first byte picks one of the 64 file-mode types, the rest is the payload.
    if let Some((&k, payload)) = data.split_first() {
        let kind = FILE_TYPES.start() + k % 64;
        if let Ok(m) = FileMsg::decode(kind, payload) {
            assert_eq!(m.kind(), kind);
            if payload.len() <= MAX_PAYLOAD {
                let again = m.payload().expect("a decoded message encodes");
                assert_eq!(&again[..], payload);
            }
        }
    }
    // Whole frames, as a stream reader sees them (keep-alives skipped, common types too).
    let mut r = data;
    if let Ok(Any::File(m)) = read_any(&mut r) {
        let mut frame = Vec::new();
        m.write_to(&mut frame).expect("a decoded message encodes");
        let used = data.len() - r.len();
        assert_eq!(&frame[..], &data[used - frame.len()..used]);
    }
});
