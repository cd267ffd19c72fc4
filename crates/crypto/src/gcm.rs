//! SM4-GCM (RFC 8998 / GB/T 36624): one-shot in place, and streaming.
//!
//! Two shapes for two kinds of caller, one implementation underneath. Packets and
//! file chunks are small and fit in memory, so [`Sm4Gcm`] seals and opens a
//! caller-owned buffer in place; the round keys and the GHASH key are computed once
//! and the hot path does not allocate. A whole file sealed as *one* GCM message
//! (what `qkdnet crypto sm4 --mode gcm` writes, for interoperability with other
//! SM4-GCM tools) streams through [`Sm4GcmEncryptor`]/[`Sm4GcmDecryptor`] in
//! constant memory. Both are GCM from its parts per NIST SP 800-38D with a 96-bit
//! IV: the keystream from qkdnet's SM4 kernel ([`crate::sm4`], up to 64 blocks a pass; a short
//! message's tag mask and keystream come from one kernel pass) and the tag from the
//! RustCrypto `ghash` crate (carry-less multiply where the CPU has it). Tests check
//! both shapes against RFC 8998's vector and against RustCrypto's
//! `AesGcm<sm4::Sm4, U12>`. The streaming decryptor releases plaintext *before* the
//! tag is checked: callers must treat it as untrusted until
//! [`Sm4GcmDecryptor::finish`] succeeds (the CLI writes to a temporary file and
//! renames it only then). For new formats prefer [`crate::chunked`], which
//! authenticates every chunk before releasing it.

use ghash::GHash;
use ghash::universal_hash::UniversalHash;
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use crate::error::{CryptoError, Result, check_len};
use crate::secret::Sm4Key;
use crate::sm4::{Increment, Keystream, RoundKeys, Sm4Kernel, round_keys};

/// GCM nonce length (RFC 8998 fixes 12 bytes).
pub const GCM_NONCE_LEN: usize = 12;

/// GCM tag length (RFC 8998 fixes 16 bytes).
pub const GCM_TAG_LEN: usize = 16;

/// Longest plaintext GCM allows under one nonce: 2^36 - 32 bytes (SP 800-38D § 5.2.1.1).
pub const GCM_MAX_PLAINTEXT: u64 = (1 << 36) - 32;

/// A 12-byte GCM nonce. Never reuse one under the same key.
pub type GcmNonce = [u8; GCM_NONCE_LEN];

/// A 16-byte GCM tag.
pub type GcmTag = [u8; GCM_TAG_LEN];

/// SM4-GCM with a fixed key, for sealing and opening buffers in place.
#[derive(Clone)]
pub struct Sm4Gcm {
    rk: RoundKeys,
    /// GHASH keyed with H = E_K(0^128).
    ghash: GHash,
}

impl Sm4Gcm {
    /// Expands the key (once; reuse the value for many messages).
    pub fn new(key: &Sm4Key) -> Self {
        Self::from_round_keys(round_keys(key))
    }

    /// Like [`Sm4Gcm::new`] on a chosen SM4 kernel (differential tests and
    /// benchmarks); one the CPU lacks falls back to [`Sm4Kernel::Soft`].
    pub fn with_kernel(key: &Sm4Key, kernel: Sm4Kernel) -> Self {
        Self::from_round_keys(RoundKeys::with_kernel(key.expose_secret(), kernel))
    }

    fn from_round_keys(rk: RoundKeys) -> Self {
        let ghash = ghash_for(&rk);
        Self { rk, ghash }
    }

    /// The SM4 kernel this value runs on.
    pub fn kernel(&self) -> Sm4Kernel {
        self.rk.kernel()
    }

    fn stream(&self, nonce: &GcmNonce, aad: &[u8], len: usize) -> Result<GcmStream> {
        let mut s = GcmStream::from_parts(self.rk.clone(), self.ghash.clone(), nonce, aad, len);
        s.reserve(len)?;
        Ok(s)
    }

    /// Encrypts `buf` in place and returns the tag. `aad` is authenticated, not encrypted.
    pub fn seal_in_place_detached(
        &self,
        nonce: &GcmNonce,
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<GcmTag> {
        let mut s = self.stream(nonce, aad, buf.len())?;
        s.ks.apply(buf);
        s.absorb_ciphertext(buf);
        Ok(s.tag())
    }

    /// Verifies `tag` and, only if it is valid, decrypts `buf` in place.
    ///
    /// On failure `buf` still holds the ciphertext; no plaintext is released.
    pub fn open_in_place_detached(
        &self,
        nonce: &GcmNonce,
        aad: &[u8],
        buf: &mut [u8],
        tag: &GcmTag,
    ) -> Result<()> {
        let mut s = self
            .stream(nonce, aad, buf.len())
            .map_err(|_| CryptoError::AuthenticationFailed)?;
        s.absorb_ciphertext(buf);
        let want = s.tag();
        if !bool::from(want.ct_eq(tag)) {
            return Err(CryptoError::AuthenticationFailed);
        }
        s.ks.apply(buf);
        Ok(())
    }

    /// Encrypts `buf` in place and appends the tag (`ciphertext || tag`). Allocates
    /// only if `buf` lacks 16 bytes of spare capacity.
    pub fn seal_in_place(&self, nonce: &GcmNonce, aad: &[u8], buf: &mut Vec<u8>) -> Result<()> {
        let tag = self.seal_in_place_detached(nonce, aad, buf)?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Opens `ciphertext || tag` in place, truncating `buf` to the plaintext on success.
    /// On failure `buf` is left unchanged.
    pub fn open_in_place(&self, nonce: &GcmNonce, aad: &[u8], buf: &mut Vec<u8>) -> Result<()> {
        let ct_len = buf
            .len()
            .checked_sub(GCM_TAG_LEN)
            .ok_or(CryptoError::AuthenticationFailed)?;
        let (ct, tag) = buf.split_at_mut(ct_len);
        let tag: &GcmTag = (&*tag)
            .try_into()
            .expect("invariant: split leaves exactly GCM_TAG_LEN bytes");
        self.open_in_place_detached(nonce, aad, ct, tag)?;
        buf.truncate(ct_len);
        Ok(())
    }
}

impl core::fmt::Debug for Sm4Gcm {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Sm4Gcm { .. }")
    }
}

/// Parses a nonce from user input.
pub fn nonce_from_slice(nonce: &[u8]) -> Result<GcmNonce> {
    check_len("SM4-GCM nonce", GCM_NONCE_LEN, nonce.len())?;
    Ok(nonce.try_into().expect("invariant: length checked"))
}

/// GHASH keyed with H = E_K(0^128).
fn ghash_for(rk: &RoundKeys) -> GHash {
    let mut h = [[0u8; 16]];
    rk.encrypt_blocks(&mut h);
    let ghash = GHash::new((&h[0]).into());
    h.zeroize();
    ghash
}

/// State shared by the one-shot and streaming code: keystream, GHASH over the
/// ciphertext, and a partial block carried between calls.
struct GcmStream {
    ks: Keystream,
    ghash: GHash,
    /// E_K(J0), XORed into the GHASH output to form the tag.
    tag_mask: [u8; 16],
    /// Ciphertext bytes not yet forming a whole GHASH block.
    pending: [u8; 16],
    pending_len: usize,
    aad_len: u64,
    ct_len: u64,
}

impl GcmStream {
    fn new(key: &Sm4Key, nonce: &GcmNonce, aad: &[u8]) -> Self {
        let rk = round_keys(key);
        let ghash = ghash_for(&rk);
        // A stream's length is unknown: size keystream batches for a long message.
        Self::from_parts(rk, ghash, nonce, aad, usize::MAX)
    }

    /// `expect` is the message length if known: the tag mask E_K(J0) and the first
    /// keystream blocks then come from one kernel pass.
    fn from_parts(
        rk: RoundKeys,
        mut ghash: GHash,
        nonce: &GcmNonce,
        aad: &[u8],
        expect: usize,
    ) -> Self {
        // AAD limit (2^61 - 1 bytes) cannot be reached by a slice on 64-bit targets.
        let mut j0 = [0u8; 16];
        j0[..12].copy_from_slice(nonce);
        j0[15] = 1;
        let mut ks = Keystream::new(rk, j0, Increment::Low32, (expect as u64).saturating_add(16));
        // The first keystream block is E_K(J0); the payload's starts at inc32(J0).
        let mut tag_mask = [0u8; 16];
        ks.apply(&mut tag_mask);
        ghash.update_padded(aad);
        Self {
            ks,
            ghash,
            tag_mask,
            pending: [0u8; 16],
            pending_len: 0,
            aad_len: aad.len() as u64,
            ct_len: 0,
        }
    }

    fn reserve(&mut self, n: usize) -> Result<()> {
        let total = self.ct_len.saturating_add(n as u64);
        if total > GCM_MAX_PLAINTEXT {
            return Err(CryptoError::MessageTooLong("SM4-GCM"));
        }
        self.ct_len = total;
        Ok(())
    }

    fn absorb_ciphertext(&mut self, mut data: &[u8]) {
        if self.pending_len > 0 {
            let take = (16 - self.pending_len).min(data.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&data[..take]);
            self.pending_len += take;
            data = &data[take..];
            if self.pending_len < 16 {
                return;
            }
            self.ghash.update_padded(&self.pending);
            self.pending_len = 0;
        }
        let whole = data.len() - data.len() % 16;
        // A multiple of the block size: `update_padded` adds no padding here.
        self.ghash.update_padded(&data[..whole]);
        let rest = &data[whole..];
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    fn apply_keystream(&mut self, buf: &mut [u8]) {
        // Within the 32-bit counter space: `reserve` caps a message at 2^36 - 32 bytes.
        self.ks.apply(buf);
    }

    fn tag(&mut self) -> GcmTag {
        if self.pending_len > 0 {
            self.ghash.update_padded(&self.pending[..self.pending_len]);
        }
        let mut lens = [0u8; 16];
        lens[..8].copy_from_slice(&(self.aad_len * 8).to_be_bytes());
        lens[8..].copy_from_slice(&(self.ct_len * 8).to_be_bytes());
        self.ghash.update_padded(&lens);
        let s = self.ghash.clone().finalize();
        let mut tag = [0u8; 16];
        for (t, (a, b)) in tag.iter_mut().zip(s.iter().zip(self.tag_mask.iter())) {
            *t = a ^ b;
        }
        tag
    }
}

impl Drop for GcmStream {
    fn drop(&mut self) {
        self.tag_mask.zeroize();
    }
}

/// Streaming SM4-GCM encryption of one message of any length in constant memory.
pub struct Sm4GcmEncryptor(GcmStream);

impl Sm4GcmEncryptor {
    /// Starts a message. The whole AAD is given up front.
    pub fn new(key: &Sm4Key, nonce: &GcmNonce, aad: &[u8]) -> Result<Self> {
        Ok(Self(GcmStream::new(key, nonce, aad)))
    }

    /// Encrypts the next piece of plaintext in place (any length).
    pub fn update(&mut self, buf: &mut [u8]) -> Result<()> {
        self.0.reserve(buf.len())?;
        self.0.apply_keystream(buf);
        self.0.absorb_ciphertext(buf);
        Ok(())
    }

    /// Ends the message and returns the tag.
    pub fn finish(mut self) -> GcmTag {
        self.0.tag()
    }
}

/// Streaming SM4-GCM decryption. Plaintext from [`Sm4GcmDecryptor::update`] is
/// **unauthenticated** until [`Sm4GcmDecryptor::finish`] returns `Ok`.
pub struct Sm4GcmDecryptor(GcmStream);

impl Sm4GcmDecryptor {
    /// Starts a message. The whole AAD is given up front.
    pub fn new(key: &Sm4Key, nonce: &GcmNonce, aad: &[u8]) -> Result<Self> {
        Ok(Self(GcmStream::new(key, nonce, aad)))
    }

    /// Decrypts the next piece of ciphertext in place (any length).
    pub fn update(&mut self, buf: &mut [u8]) -> Result<()> {
        self.0.reserve(buf.len())?;
        self.0.absorb_ciphertext(buf);
        self.0.apply_keystream(buf);
        Ok(())
    }

    /// Checks the tag in constant time. Only after `Ok` may the plaintext be used.
    pub fn finish(mut self, tag: &GcmTag) -> Result<()> {
        let want = self.0.tag();
        if bool::from(want.ct_eq(tag)) {
            Ok(())
        } else {
            Err(CryptoError::AuthenticationFailed)
        }
    }
}

impl core::fmt::Debug for Sm4GcmEncryptor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Sm4GcmEncryptor { .. }")
    }
}

impl core::fmt::Debug for Sm4GcmDecryptor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Sm4GcmDecryptor { .. }")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Differential test against RustCrypto's generic GCM over the table-based
    /// `sm4` crate, on every kernel, for every length up to 300 bytes and every
    /// seventh up to 2,100 (past the 64-block keystream batch, where a message
    /// takes two kernel passes) with several AAD lengths.
    #[test]
    fn one_shot_matches_rustcrypto_aes_gcm_generic_on_every_kernel() {
        use aes_gcm::aead::consts::U12;
        use aes_gcm::{AeadInOut, AesGcm, KeyInit};
        let key = [0x3cu8; 16];
        let reference: AesGcm<sm4::Sm4, U12> = AesGcm::new((&key).into());
        for kernel in [Sm4Kernel::Soft, Sm4Kernel::Avx512Gfni] {
            let gcm = Sm4Gcm::with_kernel(&Sm4Key::new(key), kernel);
            for len in (0..=300usize).chain((301..=2100).step_by(7)) {
                let aad: Vec<u8> = (0..(len % 37)).map(|i| i as u8 ^ 0xa5).collect();
                let nonce = [len as u8; 12];
                let pt: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
                let mut want = pt.clone();
                let want_tag = reference
                    .encrypt_inout_detached((&nonce).into(), &aad, want.as_mut_slice().into())
                    .expect("reference");
                let mut got = pt.clone();
                let tag = gcm
                    .seal_in_place_detached(&nonce, &aad, &mut got)
                    .expect("seal");
                assert_eq!(got, want, "{} len {len}", kernel.name());
                assert_eq!(&tag[..], &want_tag[..], "{} len {len}", kernel.name());
                gcm.open_in_place_detached(&nonce, &aad, &mut got, &tag)
                    .expect("open");
                assert_eq!(got, pt);
            }
        }
    }

    #[test]
    fn open_in_place_rejects_short_input_and_leaves_buffer() {
        let gcm = Sm4Gcm::new(&Sm4Key::new([7; 16]));
        let mut buf = vec![1u8; 15];
        assert_eq!(
            gcm.open_in_place(&[0; 12], b"", &mut buf),
            Err(CryptoError::AuthenticationFailed)
        );
        assert_eq!(buf, vec![1u8; 15]);
    }

    #[test]
    fn failed_open_releases_no_plaintext() {
        let gcm = Sm4Gcm::new(&Sm4Key::new([7; 16]));
        let mut buf = b"attack at dawn".to_vec();
        gcm.seal_in_place(&[1; 12], b"hdr", &mut buf)
            .expect("short");
        let sealed = buf.clone();
        assert!(gcm.open_in_place(&[1; 12], b"HDR", &mut buf).is_err());
        assert_eq!(buf, sealed);
        gcm.open_in_place(&[1; 12], b"hdr", &mut buf)
            .expect("right aad");
        assert_eq!(buf, b"attack at dawn");
    }

    #[test]
    fn streaming_matches_one_shot_on_edge_lengths() {
        let key = Sm4Key::new([0x42; 16]);
        let gcm = Sm4Gcm::new(&key);
        let nonce = [9u8; 12];
        for len in [0usize, 1, 15, 16, 17, 31, 32, 33, 100] {
            for split in [1usize, 5, 16, 64] {
                let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let mut want = pt.clone();
                let want_tag = gcm
                    .seal_in_place_detached(&nonce, b"aad", &mut want)
                    .expect("ok");
                let mut got = pt.clone();
                let mut enc = Sm4GcmEncryptor::new(&key, &nonce, b"aad").expect("ok");
                for piece in got.chunks_mut(split) {
                    enc.update(piece).expect("ok");
                }
                assert_eq!(got, want, "len {len} split {split}");
                assert_eq!(enc.finish(), want_tag, "len {len} split {split}");

                let mut dec = Sm4GcmDecryptor::new(&key, &nonce, b"aad").expect("ok");
                for piece in got.chunks_mut(split) {
                    dec.update(piece).expect("ok");
                }
                assert_eq!(got, pt);
                dec.finish(&want_tag).expect("valid tag");
            }
        }
    }
}
