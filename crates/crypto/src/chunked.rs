//! Chunked authenticated encryption for large files and long-lived streams.
//!
//! Apps seal files chunk by chunk so that memory stays bounded and every chunk is
//! authenticated *before* its plaintext is released. Sealing chunks independently
//! with GCM is not enough on its own: an attacker could drop, reorder or truncate
//! chunks. This module therefore fixes the per-chunk nonce construction, following
//! the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár, "Online
//! authenticated-encryption and its nonce-reuse misuse-resistance", CRYPTO 2015):
//!
//! ```text
//! nonce = prefix (7 bytes, fresh per stream) || chunk index (u32, big-endian) || last flag (0x00 / 0x01)
//! ```
//!
//! The index rules out reordering and dropping, the last-chunk flag rules out
//! truncation (a stream that ends without a chunk that opened with the flag set is
//! incomplete), and the type system rules out sealing after the last chunk:
//! `seal_last`/`open_last` consume the sealer/opener. Each call works in place on
//! the caller's buffer with no allocation. The prefix must never repeat under one
//! key; with random prefixes, rotate keys well before 2^28 streams.

use crate::error::{CryptoError, Result};
use crate::gcm::{GcmNonce, GcmTag, Sm4Gcm};
use crate::secret::Sm4Key;

/// Length of the per-stream nonce prefix.
pub const NONCE_PREFIX_LEN: usize = 7;

/// The per-stream nonce prefix.
pub type NoncePrefix = [u8; NONCE_PREFIX_LEN];

fn chunk_nonce(prefix: &NoncePrefix, index: u32, last: bool) -> GcmNonce {
    let mut n = [0u8; 12];
    n[..NONCE_PREFIX_LEN].copy_from_slice(prefix);
    n[NONCE_PREFIX_LEN..11].copy_from_slice(&index.to_be_bytes());
    n[11] = u8::from(last);
    n
}

/// Shared counter logic: hands out each chunk index once, never wrapping.
#[derive(Clone, Debug)]
struct Counter(Option<u32>);

impl Counter {
    fn next(&mut self) -> Result<u32> {
        let i = self.0.ok_or(CryptoError::MessageTooLong("chunk stream"))?;
        self.0 = i.checked_add(1);
        Ok(i)
    }
}

/// Seals a stream chunk by chunk.
pub struct ChunkSealer {
    gcm: Sm4Gcm,
    prefix: NoncePrefix,
    counter: Counter,
}

impl ChunkSealer {
    /// Starts a stream. `prefix` must be unique per key (random is fine).
    pub fn new(key: &Sm4Key, prefix: NoncePrefix) -> Self {
        Self {
            gcm: Sm4Gcm::new(key),
            prefix,
            counter: Counter(Some(0)),
        }
    }

    /// Encrypts one non-final chunk in place and returns its tag.
    pub fn seal_chunk(&mut self, aad: &[u8], buf: &mut [u8]) -> Result<GcmTag> {
        let i = self.counter.next()?;
        self.gcm
            .seal_in_place_detached(&chunk_nonce(&self.prefix, i, false), aad, buf)
    }

    /// Encrypts the final chunk (possibly empty) and ends the stream.
    pub fn seal_last(mut self, aad: &[u8], buf: &mut [u8]) -> Result<GcmTag> {
        let i = self.counter.next()?;
        self.gcm
            .seal_in_place_detached(&chunk_nonce(&self.prefix, i, true), aad, buf)
    }
}

/// Opens a stream chunk by chunk, releasing each chunk only after it authenticates.
pub struct ChunkOpener {
    gcm: Sm4Gcm,
    prefix: NoncePrefix,
    counter: Counter,
}

impl ChunkOpener {
    /// Starts opening the stream sealed with `prefix`.
    pub fn new(key: &Sm4Key, prefix: NoncePrefix) -> Self {
        Self {
            gcm: Sm4Gcm::new(key),
            prefix,
            counter: Counter(Some(0)),
        }
    }

    /// Verifies and decrypts one non-final chunk in place. On failure the buffer is
    /// unchanged and the stream must be abandoned.
    pub fn open_chunk(&mut self, aad: &[u8], buf: &mut [u8], tag: &GcmTag) -> Result<()> {
        let i = self.counter.next()?;
        self.gcm
            .open_in_place_detached(&chunk_nonce(&self.prefix, i, false), aad, buf, tag)
    }

    /// Verifies and decrypts the final chunk, ending the stream. A stream whose final
    /// chunk never opens with this call is truncated.
    pub fn open_last(mut self, aad: &[u8], buf: &mut [u8], tag: &GcmTag) -> Result<()> {
        let i = self.counter.next()?;
        self.gcm
            .open_in_place_detached(&chunk_nonce(&self.prefix, i, true), aad, buf, tag)
    }
}

impl core::fmt::Debug for ChunkSealer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ChunkSealer")
            .field("next_index", &self.counter.0)
            .finish_non_exhaustive()
    }
}

impl core::fmt::Debug for ChunkOpener {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ChunkOpener")
            .field("next_index", &self.counter.0)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Vec<GcmTag>) {
        let key = Sm4Key::new([3; 16]);
        let mut s = ChunkSealer::new(&key, [5; 7]);
        let mut out = Vec::new();
        let mut tags = Vec::new();
        let (last, body) = chunks.split_last().expect("at least one chunk");
        for c in body {
            let mut b = c.to_vec();
            tags.push(s.seal_chunk(b"f", &mut b).expect("ok"));
            out.push(b);
        }
        let mut b = last.to_vec();
        tags.push(s.seal_last(b"f", &mut b).expect("ok"));
        out.push(b);
        (out, tags)
    }

    #[test]
    fn reorder_truncate_and_extend_are_detected() {
        let (ct, tags) = seal(&[b"one", b"two", b"three"]);
        let key = Sm4Key::new([3; 16]);

        // In order: fine.
        let mut o = ChunkOpener::new(&key, [5; 7]);
        let mut b0 = ct[0].clone();
        o.open_chunk(b"f", &mut b0, &tags[0]).expect("chunk 0");
        assert_eq!(b0, b"one");

        // Swapped chunks 0 and 1: fails.
        let mut o = ChunkOpener::new(&key, [5; 7]);
        let mut b1 = ct[1].clone();
        assert!(o.open_chunk(b"f", &mut b1, &tags[1]).is_err());

        // Truncation: treating chunk 1 as the last fails.
        let mut o = ChunkOpener::new(&key, [5; 7]);
        let mut b0 = ct[0].clone();
        o.open_chunk(b"f", &mut b0, &tags[0]).expect("chunk 0");
        let mut b1 = ct[1].clone();
        assert!(o.open_last(b"f", &mut b1, &tags[1]).is_err());

        // The real last chunk opened as non-final fails (no extension past the end).
        let mut o = ChunkOpener::new(&key, [5; 7]);
        for i in 0..2 {
            let mut b = ct[i].clone();
            o.open_chunk(b"f", &mut b, &tags[i]).expect("body");
        }
        let mut b2 = ct[2].clone();
        assert!(o.open_chunk(b"f", &mut b2, &tags[2]).is_err());
    }

    #[test]
    fn counter_refuses_to_wrap() {
        let mut c = Counter(Some(u32::MAX));
        assert_eq!(c.next(), Ok(u32::MAX));
        assert_eq!(c.next(), Err(CryptoError::MessageTooLong("chunk stream")));
    }
}
