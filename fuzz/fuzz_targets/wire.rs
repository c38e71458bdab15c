//! Wire decoding: never panics, and whatever decodes re-encodes to the same frame.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut r = data;
    if let Ok(m) = transfer::wire::Message::read_from(&mut r) {
        let used = data.len() - r.len();
        let again = m.encode().expect("a decoded message encodes");
        assert_eq!(&again[..], &data[..used]);
    }
    if let Some((&kind, payload)) = data.split_first() {
        let _ = transfer::wire::Message::decode(kind, payload);
    }
});
