//! Classical-channel messages of the link protocol (`qkdnet_link::msg::Msg`):
//! any bytes decode to a message or an error, never a panic; the encoding is
//! canonical, so whatever decodes re-encodes to exactly the input bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_link::msg::Msg;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Msg::decode(data) else { return };
    let _ = (m.block(), m.name());
    let mut again = Vec::with_capacity(data.len());
    m.encode(&mut again);
    assert_eq!(again, data, "{} does not re-encode to its input", m.name());
    let back = Msg::decode(&again).expect("a re-encoded message decodes");
    assert_eq!(back, m);
});
