//! The header of a sealed file (`qkdnet_apps::format::Header::read`), parsed
//! before any key is known: any bytes give a header or an error, never a panic;
//! the recorded raw bytes are exactly the bytes consumed, the header re-encodes
//! to them, and its layout is consistent (the segments cover the plaintext).
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_apps::format::{Header, Mode};

fuzz_target!(|data: &[u8]| {
    let mut r = std::io::Cursor::new(data);
    let Ok((h, raw)) = Header::read(&mut r) else {
        return;
    };
    let used = usize::try_from(r.position()).expect("position within the input");
    assert_eq!(raw, &data[..used]);
    assert_eq!(h.encode(), raw);
    let (back, _) = Header::read(&mut raw.as_slice()).expect("a re-read header parses");
    assert_eq!(back, h);
    let layout = h.layout().expect("a parsed header has a valid layout");
    assert_eq!(layout.keys, h.key_ids.len() as u64);
    assert_eq!(h.mlkem.is_some(), h.mode == Mode::Hybrid);
    if h.mode != Mode::Otp && layout.segments <= 4096 {
        let total: u64 = (0..layout.segments).map(|s| h.segment_len(s)).sum();
        assert_eq!(total, h.plaintext_len);
    }
});
