//! SM4 (GB/T 32907-2016): the raw block function and CTR mode.
//!
//! CTR is what the CLI and bulk relays use when a separate MAC (or none, for
//! interoperability tests) is in play: it needs no padding, is seekable, and
//! streams in constant memory. The counter is the whole 128-bit IV incremented
//! big-endian, which is what OpenSSL's `sm4-ctr` does, so files interoperate.
//! The raw block function is exposed only for known-answer tests and for building
//! other modes; it is not a safe way to encrypt data by itself. Authenticated
//! encryption lives in [`crate::gcm`] and [`crate::chunked`].
//!
//! The block function itself is qkdnet's own constant-time kernel (`kernel`):
//! AVX-512 + GFNI where the CPU has them, a bitsliced portable one elsewhere,
//! up to sixty-four blocks per pass; [`kernel()`] names the one in use. Every kernel is
//! tested against the table-based RustCrypto `sm4` crate and GB/T 32907's vectors.

use zeroize::Zeroize;

use crate::error::{CryptoError, Result};
use crate::secret::Sm4Key;

mod consts;
mod kernel;
mod soft;
#[cfg(target_arch = "x86_64")]
mod x86;

use consts::{BATCH, Block};
pub(crate) use kernel::RoundKeys;
pub use kernel::Sm4Kernel;

/// SM4 block length in bytes.
pub const SM4_BLOCK_LEN: usize = 16;

/// SM4 key length in bytes.
pub const SM4_KEY_LEN: usize = 16;

/// The SM4 kernel this process uses (for logs and benchmark reports).
pub fn kernel() -> Sm4Kernel {
    Sm4Kernel::detect()
}

/// Expands our key type for the fastest kernel.
pub(crate) fn round_keys(key: &Sm4Key) -> RoundKeys {
    RoundKeys::new(key.expose_secret())
}

/// The raw SM4 permutation with an expanded key (ECB of single blocks).
///
/// For known-answer tests and mode construction only: encrypting data block by
/// block with it is ECB and leaks patterns.
#[derive(Clone)]
pub struct Sm4Block(RoundKeys);

impl Sm4Block {
    /// Expands the key once.
    pub fn new(key: &Sm4Key) -> Self {
        Self(round_keys(key))
    }

    /// Expands the key for a chosen kernel (differential tests and benchmarks);
    /// a kernel the CPU lacks falls back to [`Sm4Kernel::Soft`].
    pub fn with_kernel(key: &Sm4Key, kernel: Sm4Kernel) -> Self {
        Self(RoundKeys::with_kernel(key.expose_secret(), kernel))
    }

    /// The kernel this value runs on.
    pub fn kernel(&self) -> Sm4Kernel {
        self.0.kernel()
    }

    /// Encrypts one block in place.
    pub fn encrypt_block(&self, block: &mut [u8; SM4_BLOCK_LEN]) {
        self.0.encrypt_blocks(core::slice::from_mut(block));
    }

    /// Encrypts many blocks in place (up to sixty-four per kernel pass: batch for speed).
    pub fn encrypt_blocks(&self, blocks: &mut [[u8; SM4_BLOCK_LEN]]) {
        self.0.encrypt_blocks(blocks);
    }
}

impl core::fmt::Debug for Sm4Block {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Sm4Block { .. }")
    }
}

/// How a counter block steps: the whole 128 bits (OpenSSL `sm4-ctr`) or only the
/// low 32 bits (GCM's `inc32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Increment {
    /// 128-bit big-endian, wrapping.
    Whole128,
    /// Low 32 bits big-endian, wrapping within them (NIST SP 800-38D).
    Low32,
}

/// Counter-mode keystream, generated up to [`BATCH`] blocks per kernel pass and consumed
/// at any granularity.
#[derive(Clone)]
pub(crate) struct Keystream {
    rk: RoundKeys,
    counter: Block,
    inc: Increment,
    buf: [Block; BATCH],
    /// Bytes of `buf` already used / valid / ever written (what drop must wipe:
    /// zeroizing is a volatile store per byte, so only the written part).
    used: usize,
    filled: usize,
    written: usize,
    /// Bytes the caller said it will still ask for: sizes the first partial batch
    /// so a short message costs one kernel pass, not two.
    expect: u64,
}

impl Keystream {
    pub(crate) fn new(rk: RoundKeys, counter: Block, inc: Increment, expect: u64) -> Self {
        Self {
            rk,
            counter,
            inc,
            buf: [[0u8; 16]; BATCH],
            used: 0,
            filled: 0,
            written: 0,
            expect,
        }
    }

    /// Refills `buf` with `n` (1..=BATCH) keystream blocks.
    fn refill(&mut self, n: usize) {
        let c = self.counter;
        match self.inc {
            Increment::Whole128 => {
                let base = u128::from_be_bytes(c);
                for (i, b) in self.buf[..n].iter_mut().enumerate() {
                    *b = base.wrapping_add(i as u128).to_be_bytes();
                }
                self.counter = base.wrapping_add(n as u128).to_be_bytes();
            }
            Increment::Low32 => {
                let low = u32::from_be_bytes([c[12], c[13], c[14], c[15]]);
                for (i, b) in self.buf[..n].iter_mut().enumerate() {
                    b[..12].copy_from_slice(&c[..12]);
                    b[12..].copy_from_slice(&low.wrapping_add(i as u32).to_be_bytes());
                }
                self.counter[12..].copy_from_slice(&low.wrapping_add(n as u32).to_be_bytes());
            }
        }
        self.rk.encrypt_blocks(&mut self.buf[..n]);
        self.used = 0;
        self.filled = 16 * n;
        self.written = self.written.max(self.filled);
    }

    /// XORs the next `data.len()` keystream bytes into `data`.
    pub(crate) fn apply(&mut self, data: &mut [u8]) {
        self.expect = self.expect.saturating_sub(data.len() as u64);
        let mut data = data;
        if self.used < self.filled {
            let take = (self.filled - self.used).min(data.len());
            let ks = &self.buf.as_flattened()[self.used..self.used + take];
            xor(&mut data[..take], ks);
            self.used += take;
            data = &mut data[take..];
        }
        while !data.is_empty() {
            let want = (data.len() as u64).saturating_add(self.expect);
            let blocks = want.div_ceil(16).min(BATCH as u64) as usize;
            self.refill(blocks);
            let take = self.filled.min(data.len());
            xor(&mut data[..take], &self.buf.as_flattened()[..take]);
            self.used = take;
            data = &mut data[take..];
        }
    }
}

impl Drop for Keystream {
    fn drop(&mut self) {
        self.buf.as_flattened_mut()[..self.written].zeroize();
        self.counter.zeroize();
    }
}

/// `data ^= ks` (same lengths).
fn xor(data: &mut [u8], ks: &[u8]) {
    for (d, k) in data.iter_mut().zip(ks) {
        *d ^= k;
    }
}

/// SM4 in counter mode with a 128-bit big-endian counter (OpenSSL `sm4-ctr` compatible).
///
/// Encryption and decryption are the same operation. The keystream continues across
/// calls, so a file may be processed in chunks of any size.
pub struct Sm4Ctr {
    ks: Keystream,
    /// Keystream blocks still allowed before the counter would come back to its
    /// start (2^128, i.e. never in practice; kept so the limit is explicit).
    left: u128,
    partial: usize,
}

impl Sm4Ctr {
    /// Starts the keystream at counter block `iv`.
    pub fn new(key: &Sm4Key, iv: &[u8; SM4_BLOCK_LEN]) -> Self {
        Self {
            ks: Keystream::new(round_keys(key), *iv, Increment::Whole128, 0),
            left: u128::MAX,
            partial: 0,
        }
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
    /// Errors (leaving `buf` untouched) only if the 128-bit counter would wrap back
    /// to where it started.
    pub fn apply_keystream(&mut self, buf: &mut [u8]) -> Result<()> {
        let total = self.partial as u128 + buf.len() as u128;
        let blocks = total / 16;
        if blocks > self.left {
            return Err(CryptoError::MessageTooLong("SM4-CTR"));
        }
        self.left -= blocks;
        self.partial = (total % 16) as usize;
        self.ks.apply(buf);
        Ok(())
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
    fn low32_keystream_wraps_within_the_low_word_across_batches() {
        let key = Sm4Key::new([5; 16]);
        let blk = Sm4Block::new(&key);
        let mut start = [0xabu8; 16];
        start[12..].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        let mut ks = Keystream::new(round_keys(&key), start, Increment::Low32, 0);
        let mut got = vec![0u8; 16 * 40];
        for piece in got.chunks_mut(23) {
            ks.apply(piece);
        }
        for (i, chunk) in got.chunks(16).enumerate() {
            let mut c = start;
            c[12..].copy_from_slice(&0xffff_fff0u32.wrapping_add(i as u32).to_be_bytes());
            blk.encrypt_block(&mut c);
            assert_eq!(chunk, &c[..], "block {i}");
        }
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
