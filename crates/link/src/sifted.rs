//! Sifted-key files for offline post-processing (`qkdnet postproc`).
//!
//! Two formats, chosen by the caller:
//! - `bits`: ASCII `0`/`1`, one character per bit, optionally ending in one
//!   newline (`\n` or `\r\n`); anything else is an error naming its offset.
//! - `packed`: magic `QKDBITS` + version byte `1`, the bit count (u64 LE),
//!   then ⌈n/8⌉ bytes, bit i in byte i/8 at position i%8 (LSB first), unused
//!   high bits of the last byte zero. Truncation and trailing bytes are errors.

use qkdnet_postproc::bits::BitVec;

use crate::LinkError;

const MAGIC: &[u8; 8] = b"QKDBITS\x01";

/// Parses the ASCII form.
pub fn parse_ascii(data: &[u8]) -> Result<BitVec, LinkError> {
    let body = data
        .strip_suffix(b"\r\n")
        .or_else(|| data.strip_suffix(b"\n"))
        .unwrap_or(data);
    if let Some(i) = body.iter().position(|&c| c != b'0' && c != b'1') {
        return Err(LinkError::Usage(format!(
            "byte {i} is {:?}, not '0' or '1'",
            char::from(body[i])
        )));
    }
    let mut words = vec![0u64; body.len().div_ceil(64)];
    for (i, &c) in body.iter().enumerate() {
        if c == b'1' {
            words[i / 64] |= 1 << (i % 64);
        }
    }
    BitVec::from_words(words, body.len()).map_err(|e| LinkError::Usage(e.to_string()))
}

/// Parses the packed form.
pub fn parse_packed(data: &[u8]) -> Result<BitVec, LinkError> {
    if data.len() < 16 || &data[..8] != MAGIC {
        return Err(LinkError::Usage(
            "not a packed sifted-key file (expected magic QKDBITS, version 1)".into(),
        ));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&data[8..16]);
    let n = u64::from_le_bytes(n);
    let body = &data[16..];
    if n > 8 * body.len() as u64 {
        return Err(LinkError::Usage(format!(
            "file is truncated: {n} bits declared, {} present",
            8 * body.len()
        )));
    }
    if (n as usize).div_ceil(8) != body.len() {
        return Err(LinkError::Usage(format!(
            "{} trailing bytes after {n} bits",
            body.len() - (n as usize).div_ceil(8)
        )));
    }
    if n % 8 != 0 && body[body.len() - 1] >> (n % 8) != 0 {
        return Err(LinkError::Usage(
            "unused bits of the last byte are not zero".into(),
        ));
    }
    BitVec::from_bytes(body, n as usize).map_err(|e| LinkError::Usage(e.to_string()))
}

/// Writes the packed form.
pub fn write_packed(bits: &BitVec) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&(bits.len() as u64).to_le_bytes());
    out.extend_from_slice(&bits.to_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_and_packed_agree_and_reject_garbage() {
        let a = parse_ascii(b"0110100111\n").unwrap();
        assert_eq!(a.len(), 10);
        assert!(!a.get(0) && a.get(1) && a.get(2) && a.get(9));
        assert_eq!(parse_packed(&write_packed(&a)).unwrap(), a);
        assert!(
            parse_ascii(b"0102")
                .unwrap_err()
                .to_string()
                .contains("byte 3")
        );
        assert!(parse_ascii(b"01\n\n").is_err());
        let p = write_packed(&a);
        for cut in 0..p.len() {
            assert!(parse_packed(&p[..cut]).is_err(), "cut {cut}");
        }
        let mut extra = p.clone();
        extra.push(0);
        assert!(parse_packed(&extra).is_err());
        let mut dirty = p;
        *dirty.last_mut().unwrap() |= 0x80;
        assert!(parse_packed(&dirty).is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = parse_ascii(&data);
            let _ = parse_packed(&data);
        }
    }
}
