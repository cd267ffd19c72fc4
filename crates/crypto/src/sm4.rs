//! SM4 (GB/T 32907-2016): the raw block function and CTR mode.
//!
//! CTR is what the CLI and bulk relays use when a separate MAC (or none, for
//! interoperability tests) is in play: it needs no padding, is seekable, and
//! streams in constant memory. The counter is the whole 128-bit IV incremented
//! big-endian, which is what OpenSSL's `sm4-ctr` does, so files interoperate.
//! The raw block function is exposed only for known-answer tests and for building
//! other modes; it is not a safe way to encrypt data by itself. Authenticated
//! encryption lives in [`crate::gcm`] and [`crate::chunked`].

use sm4::cipher::{BlockCipherEncrypt, KeyInit, KeyIvInit, StreamCipher};

use crate::error::{CryptoError, Result};
use crate::secret::Sm4Key;

/// SM4 block length in bytes.
pub const SM4_BLOCK_LEN: usize = 16;

/// SM4 key length in bytes.
pub const SM4_KEY_LEN: usize = 16;

/// Builds the RustCrypto cipher from our key type (key schedule expansion).
pub(crate) fn cipher(key: &Sm4Key) -> sm4::Sm4 {
    sm4::Sm4::new(key.expose_secret().into())
}

/// The raw SM4 permutation with an expanded key (ECB of single blocks).
///
/// For known-answer tests and mode construction only: encrypting data block by
/// block with it is ECB and leaks patterns.
#[derive(Clone)]
pub struct Sm4Block(sm4::Sm4);

impl Sm4Block {
    /// Expands the key once.
    pub fn new(key: &Sm4Key) -> Self {
        Self(cipher(key))
    }

    /// Encrypts one block in place.
    pub fn encrypt_block(&self, block: &mut [u8; SM4_BLOCK_LEN]) {
        self.0.encrypt_block(block.into());
    }
}

impl core::fmt::Debug for Sm4Block {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Sm4Block { .. }")
    }
}

/// SM4 in counter mode with a 128-bit big-endian counter (OpenSSL `sm4-ctr` compatible).
///
/// Encryption and decryption are the same operation. The keystream continues across
/// calls, so a file may be processed in chunks of any size.
pub struct Sm4Ctr(ctr::Ctr128BE<sm4::Sm4>);

impl Sm4Ctr {
    /// Starts the keystream at counter block `iv`.
    pub fn new(key: &Sm4Key, iv: &[u8; SM4_BLOCK_LEN]) -> Self {
        Self(ctr::Ctr128BE::<sm4::Sm4>::new(
            key.expose_secret().into(),
            iv.into(),
        ))
    }

    /// Like [`Sm4Ctr::new`] but from slices, checking lengths (for user input).
    pub fn from_slices(key: &[u8], iv: &[u8]) -> Result<Self> {
        let key = Sm4Key::from_slice(key).map_err(|_| CryptoError::InvalidLength {
            what: "SM4 key",
            expected: SM4_KEY_LEN,
            got: key.len(),
        })?;
        let iv: &[u8; SM4_BLOCK_LEN] = iv.try_into().map_err(|_| CryptoError::InvalidLength {
            what: "SM4-CTR IV",
            expected: SM4_BLOCK_LEN,
            got: iv.len(),
        })?;
        Ok(Self::new(&key, iv))
    }

    /// XORs the next `buf.len()` keystream bytes into `buf`.
    ///
    /// Errors (leaving `buf` untouched) only if the 128-bit counter would wrap.
    pub fn apply_keystream(&mut self, buf: &mut [u8]) -> Result<()> {
        self.0
            .try_apply_keystream(buf)
            .map_err(|_| CryptoError::MessageTooLong("SM4-CTR"))
    }
}

impl core::fmt::Debug for Sm4Ctr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Sm4Ctr { .. }")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference CTR from the block function: obviously correct, slow.
    fn ctr_reference(key: &Sm4Key, iv: [u8; 16], data: &mut [u8]) {
        let block = Sm4Block::new(key);
        let mut counter = u128::from_be_bytes(iv);
        for chunk in data.chunks_mut(16) {
            let mut ks = counter.to_be_bytes();
            block.encrypt_block(&mut ks);
            for (d, k) in chunk.iter_mut().zip(ks) {
                *d ^= k;
            }
            counter = counter.wrapping_add(1);
        }
    }

    #[test]
    fn ctr_matches_block_reference_across_counter_carry_and_chunking() {
        let key = Sm4Key::new(*b"0123456789abcdef");
        // Low 64 bits about to carry into the high half: catches 64-bit counters.
        let iv = 0x0000_0000_0000_0001_ffff_ffff_ffff_fffeu128.to_be_bytes();
        let data: Vec<u8> = (0..200u8).collect();
        let mut want = data.clone();
        ctr_reference(&key, iv, &mut want);
        let mut got = data.clone();
        let mut c = Sm4Ctr::new(&key, &iv);
        for piece in got.chunks_mut(7) {
            c.apply_keystream(piece).expect("short stream");
        }
        assert_eq!(got, want);
    }

    #[test]
    fn from_slices_reports_lengths() {
        let e = Sm4Ctr::from_slices(&[0; 15], &[0; 16]).expect_err("short key");
        assert_eq!(
            e,
            CryptoError::InvalidLength {
                what: "SM4 key",
                expected: 16,
                got: 15
            }
        );
        let e = Sm4Ctr::from_slices(&[0; 16], &[0; 12]).expect_err("short iv");
        assert!(matches!(
            e,
            CryptoError::InvalidLength {
                what: "SM4-CTR IV",
                ..
            }
        ));
    }
}
