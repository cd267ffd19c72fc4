//! SM3 (GB/T 32905-2016) and HMAC-SM3 (RFC 2104 instantiated with SM3).
//!
//! Thin, typed wrappers over RustCrypto `sm3` and `hmac`: the rest of qkdnet should
//! not need to know the `digest` trait zoo, and fixed `[u8; 32]` outputs make
//! lengths a type rather than a runtime check. Streaming types are provided for
//! files and long transcripts; one-shot functions for everything else. MAC
//! verification goes through `Mac::verify_slice`, which compares in constant time.

use hmac::{Hmac, KeyInit, Mac};
use sm3::Digest;

use crate::error::{CryptoError, Result};

/// Length of an SM3 digest and of an HMAC-SM3 tag, in bytes.
pub const SM3_LEN: usize = 32;

/// SM3 block size in bytes (used by HMAC).
pub const SM3_BLOCK_LEN: usize = 64;

/// An SM3 digest.
pub type Sm3Digest = [u8; SM3_LEN];

/// One-shot SM3 of `data`.
pub fn sm3(data: &[u8]) -> Sm3Digest {
    sm3::Sm3::digest(data).into()
}

/// Incremental SM3 for data that arrives in pieces (files, transcripts).
#[derive(Clone, Default)]
pub struct Sm3Hasher(sm3::Sm3);

impl Sm3Hasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Absorbs more data.
    pub fn update(&mut self, data: &[u8]) {
        Digest::update(&mut self.0, data);
    }

    /// Finishes and returns the digest.
    pub fn finalize(self) -> Sm3Digest {
        self.0.finalize().into()
    }
}

impl core::fmt::Debug for Sm3Hasher {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // The internal state is a function of possibly secret input: do not print it.
        f.write_str("Sm3Hasher { .. }")
    }
}

/// One-shot HMAC-SM3 of `data` under `key` (any key length).
pub fn hmac_sm3(key: &[u8], data: &[u8]) -> Sm3Digest {
    let mut mac = HmacSm3::new(key);
    mac.update(data);
    mac.finalize()
}

/// Incremental HMAC-SM3.
#[derive(Clone)]
pub struct HmacSm3(Hmac<sm3::Sm3>);

impl HmacSm3 {
    /// Keys a new MAC. HMAC accepts keys of any length (long keys are hashed first).
    pub fn new(key: &[u8]) -> Self {
        Self(
            <Hmac<sm3::Sm3> as KeyInit>::new_from_slice(key)
                .expect("invariant: HMAC accepts keys of any length"),
        )
    }

    /// Absorbs more data.
    pub fn update(&mut self, data: &[u8]) {
        Mac::update(&mut self.0, data);
    }

    /// Finishes and returns the tag.
    pub fn finalize(self) -> Sm3Digest {
        self.0.finalize().into_bytes().into()
    }

    /// Finishes and checks the tag in constant time. Truncated tags are rejected:
    /// `tag` must be the full 32 bytes.
    pub fn verify(self, tag: &[u8]) -> Result<()> {
        if tag.len() != SM3_LEN {
            return Err(CryptoError::AuthenticationFailed);
        }
        self.0
            .verify_slice(tag)
            .map_err(|_| CryptoError::AuthenticationFailed)
    }
}

impl core::fmt::Debug for HmacSm3 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("HmacSm3 { .. }")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_matches_one_shot() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let mut h = Sm3Hasher::new();
        for piece in data.chunks(37) {
            h.update(piece);
        }
        assert_eq!(h.finalize(), sm3(&data));

        let mut m = HmacSm3::new(b"key");
        for piece in data.chunks(61) {
            m.update(piece);
        }
        assert_eq!(m.finalize(), hmac_sm3(b"key", &data));
    }

    #[test]
    fn hmac_verify_rejects_wrong_and_truncated_tags() {
        let tag = hmac_sm3(b"k", b"msg");
        let mut m = HmacSm3::new(b"k");
        m.update(b"msg");
        assert!(m.clone().verify(&tag).is_ok());
        assert_eq!(
            m.clone().verify(&tag[..16]),
            Err(CryptoError::AuthenticationFailed)
        );
        let mut bad = tag;
        bad[31] ^= 1;
        assert_eq!(m.verify(&bad), Err(CryptoError::AuthenticationFailed));
    }
}
