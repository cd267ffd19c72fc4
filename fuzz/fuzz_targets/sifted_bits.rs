//! Sifted-key files of `qkdnet postproc` (`qkdnet_link::sifted`): the ASCII
//! `bits` and the binary `packed` formats. Any bytes give a bit string or an
//! error, never a panic; both formats round-trip through their writers, and a
//! string read in one format reads back the same from the other.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_link::sifted::{parse_ascii, parse_packed, write_packed};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = parse_ascii(data) {
        let body = data
            .strip_suffix(b"\r\n")
            .or_else(|| data.strip_suffix(b"\n"))
            .unwrap_or(data);
        assert_eq!(v.len(), body.len());
        assert_eq!(v.to_ascii().as_bytes(), body);
        let packed = write_packed(&v);
        assert_eq!(
            parse_packed(&packed).expect("written packed file parses"),
            v
        );
    }
    if let Ok(v) = parse_packed(data) {
        // the packed format has no slack: the writer gives back the input
        assert_eq!(write_packed(&v), data);
        assert_eq!(
            parse_ascii(v.to_ascii().as_bytes()).expect("ASCII rendering parses"),
            v
        );
    }
});
