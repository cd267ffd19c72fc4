//! The link-session hello (`qkdnet_net::session::Hello::read`), read from a
//! stream as both link ends do: any bytes give a hello or an error, never a
//! panic; a hello read re-encodes to exactly the bytes it consumed.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_net::session::Hello;

fuzz_target!(|data: &[u8]| {
    let mut r = std::io::Cursor::new(data);
    let Ok(h) = Hello::read(&mut r) else { return };
    let used = usize::try_from(r.position()).expect("position within the input");
    assert_eq!(h.encode(), &data[..used]);
    let back = Hello::read(&mut &data[..used]).expect("a re-read hello parses");
    assert_eq!(back, h);
});
