//! Wegman–Carter authentication of classical-channel messages: a polynomial
//! hash over GF(2^128) masked with a one-time pad.
//!
//! # Why this shape
//!
//! QKD's security proof needs the classical channel to be authenticated
//! *information-theoretically*; computational MACs (HMAC, GMAC with AES) would
//! reduce the whole link to the security of a cipher. Wegman–Carter gives that
//! with keys drawn from earlier QKD output: hash the message with an
//! ε-almost-XOR-universal (ε-AXU) family, then XOR a fresh one-time pad. We
//! use polynomial evaluation over GF(2^128) because it is the cheapest AXU
//! family with a short key (one field element), it is a known construction
//! (GHASH-like) with a simple, explicit bound, and the field multiply is a
//! carry-less multiply (the private `clmul` module). No crate is used because the
//! GHASH/POLYVAL crates fix the bit-reflected GCM conventions and expose no
//! way to plug in the length block and bound documented here; the code is
//! small and tested against a shift-and-add reference.
//!
//! # Exact construction (normative)
//!
//! * Field: GF(2)\[x\] / (x^128 + x^7 + x^2 + x + 1). A field element is a
//!   `u128` whose bit `i` is the coefficient of `x^i` (no bit reflection),
//!   serialised as 16 little-endian bytes.
//! * Message blocks: the message bytes are cut into 16-byte blocks
//!   `c_1 … c_L`, the last zero-padded, each read little-endian as a field
//!   element; then one length block `c_{L+1}` = the message length in
//!   **bytes** as a little-endian `u128`. `L = ceil(len / 16)` (0 for an
//!   empty message).
//! * Hash with key `k`: `H_k(M) = c_1·k^(L+1) + c_2·k^L + … + c_{L+1}·k`
//!   (Horner: `h ← (h + c_i)·k`).
//! * Tag: `H_k(M) ⊕ r`, with `r` a 128-bit one-time pad.
//!
//! # Security and key consumption
//!
//! For two distinct messages of at most `L` blocks each, their block vectors
//! (including the length block) differ, so `H_k(M) ⊕ H_k(M') ⊕ δ` is a
//! non-zero polynomial in `k` of degree at most `L + 1`; hence for every δ,
//! `Pr_k[H_k(M) ⊕ H_k(M') = δ] ≤ (L + 1) / 2^128` (ε-AXU). With a uniform
//! one-time pad the tag is then ε-almost strongly universal:
//! a forger who sees one (message, tag) pair succeeds with probability at
//! most **ε = (⌈len/16⌉ + 1) / 2^128** per attempt
//! ([`forgery_bound_log2`] gives `log2 ε`).
//!
//! Each tag consumes **128 bits of one-time pad**. The 128-bit hash key may be
//! reused across tags as long as every tag uses a fresh pad (the pad hides
//! the hash output; this is the standard Wegman–Carter key-recycling
//! argument), so a session costs 128 bits once plus 128 bits per tag.
//! [`AuthKey`] bundles both (256 bits) and is consumed by value, which is the
//! conservative "fresh everything per tag" mode; a protocol that recycles the
//! hash key builds a new `AuthKey` from the same [`HashKey`] and a new pad.
//!
//! # Transcripts
//!
//! [`TranscriptHash`] computes the same `H_k(M)` incrementally, for a message
//! `M` that arrives in pieces: each piece is zero-padded to a 16-byte
//! boundary, so `M = pad16(p_1) ‖ pad16(p_2) ‖ …` and the Horner steps of one
//! piece never straddle the next. Its tag equals [`AuthKey::tag`] of that
//! concatenation (tested), so the bound above holds with `len = |M|`. A
//! channel that authenticates a run of frames with one tag feeds each frame
//! (self-delimiting: it carries its own length) as one piece.

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::clmul::clmul64;

/// Tag length in bytes.
pub const TAG_BYTES: usize = 16;
/// Key bits one tag consumes from the pool in the conservative mode (hash key
/// + pad).
pub const KEY_BITS_PER_TAG: usize = 256;
/// One-time-pad bits consumed per tag when the hash key is recycled.
pub const PAD_BITS_PER_TAG: usize = 128;

/// Authentication failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The tag does not match the message: the peer (or the channel) sent a
    /// message that is not authentic.
    #[error("authentication tag mismatch")]
    TagMismatch,
    /// A key was built from a slice of the wrong length (caller misuse).
    #[error("authentication key material has {got} bytes, expected {expected}")]
    KeyLength {
        /// Bytes required.
        expected: usize,
        /// Bytes provided.
        got: usize,
    },
}

impl AuthError {
    /// Whether the error is the peer's fault (as opposed to caller misuse).
    pub fn is_peer_fault(&self) -> bool {
        matches!(self, Self::TagMismatch)
    }
}

/// An element of GF(2^128) in the non-reflected convention of the module docs.
pub(crate) type Gf128 = u128;

/// Reduction of a 256-bit carry-less product (hi, lo) modulo
/// x^128 + x^7 + x^2 + x + 1.
#[inline]
fn reduce(hi: u128, lo: u128) -> Gf128 {
    // x^128 ≡ x^7 + x^2 + x + 1 =: R. hi·x^128 ≡ hi·R, and hi·R has up to
    // 135 bits; fold the 7 overflow bits once more.
    let fold = |v: u128| -> (u128, u128) {
        let l = v ^ (v << 1) ^ (v << 2) ^ (v << 7);
        let h = (v >> 127) ^ (v >> 126) ^ (v >> 121);
        (h, l)
    };
    let (h1, l1) = fold(hi);
    let (h2, l2) = fold(h1);
    debug_assert_eq!(h2, 0);
    lo ^ l1 ^ l2
}

/// Fast GF(2^128) multiply: three carry-less word products (Karatsuba) and a
/// reduction.
#[inline]
pub(crate) fn gf128_mul(a: Gf128, b: Gf128) -> Gf128 {
    let (a0, a1) = (a as u64, (a >> 64) as u64);
    let (b0, b1) = (b as u64, (b >> 64) as u64);
    let lo = clmul64(a0, b0);
    let hi = clmul64(a1, b1);
    let mid = clmul64(a0 ^ a1, b0 ^ b1);
    let lo = (lo.0 as u128) | ((lo.1 as u128) << 64);
    let hi = (hi.0 as u128) | ((hi.1 as u128) << 64);
    let mid = ((mid.0 as u128) | ((mid.1 as u128) << 64)) ^ lo ^ hi;
    let r_lo = lo ^ (mid << 64);
    let r_hi = hi ^ (mid >> 64);
    reduce(r_hi, r_lo)
}

/// Shift-and-add reference multiply, straight from the definition.
#[cfg(test)]
pub(crate) fn gf128_mul_reference(a: Gf128, b: Gf128) -> Gf128 {
    let mut acc: Gf128 = 0;
    let mut a = a;
    for i in 0..128 {
        if (b >> i) & 1 == 1 {
            acc ^= a;
        }
        // a <- a·x mod P
        let carry = a >> 127;
        a <<= 1;
        if carry == 1 {
            a ^= 0x87;
        }
    }
    acc
}

/// Horner evaluation `h ← (h + c)·k` over `blocks`, then over the final
/// length block.
pub(crate) fn horner(key: Gf128, blocks: impl Iterator<Item = Gf128>, len_block: Gf128) -> Gf128 {
    let mut h: Gf128 = 0;
    for c in blocks {
        h = gf128_mul(h ^ c, key);
    }
    gf128_mul(h ^ len_block, key)
}

/// The polynomial hash `H_k(M)` of the module docs.
pub(crate) fn poly_hash(key: Gf128, msg: &[u8]) -> Gf128 {
    let blocks = msg.chunks(16).map(|c| {
        let mut b = [0u8; 16];
        b[..c.len()].copy_from_slice(c);
        let v = u128::from_le_bytes(b);
        b.zeroize();
        v
    });
    horner(key, blocks, msg.len() as u128)
}

/// `log2` of the forgery probability bound `ε = (⌈len/16⌉ + 1) / 2^128` for a
/// message of `msg_len` bytes.
pub fn forgery_bound_log2(msg_len: usize) -> f64 {
    ((msg_len.div_ceil(16) + 1) as f64).log2() - 128.0
}

/// `H_k` of a message fed in pieces, each zero-padded to a 16-byte boundary
/// (see "Transcripts" in the module docs). Holds the hash key and the running
/// value, both secret: zeroed on drop, no `Debug` output.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct TranscriptHash {
    key: Gf128,
    acc: Gf128,
    len: u128,
}

impl core::fmt::Debug for TranscriptHash {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("TranscriptHash(..)")
    }
}

impl TranscriptHash {
    /// An empty transcript under `key`.
    pub fn new(key: &HashKey) -> Self {
        Self {
            key: key.element(),
            acc: 0,
            len: 0,
        }
    }

    /// Appends `piece`, zero-padded to a multiple of 16 bytes.
    pub fn absorb_padded(&mut self, piece: &[u8]) {
        for c in piece.chunks(16) {
            let mut b = [0u8; 16];
            b[..c.len()].copy_from_slice(c);
            self.acc = gf128_mul(self.acc ^ u128::from_le_bytes(b), self.key);
            b.zeroize();
        }
        self.len += piece.len().div_ceil(16) as u128 * 16;
    }

    /// Bytes of the padded message so far.
    pub fn len_bytes(&self) -> u128 {
        self.len
    }

    /// Empties the transcript (same key), for the next run.
    pub fn reset(&mut self) {
        self.acc = 0;
        self.len = 0;
    }

    fn compute(&self, pad: &[u8; 16]) -> Tag {
        let h = gf128_mul(self.acc ^ self.len, self.key) ^ u128::from_le_bytes(*pad);
        Tag(h.to_le_bytes())
    }

    /// The Wegman–Carter tag of the transcript with one-time pad `pad`.
    pub fn tag(&self, pad: &[u8; 16]) -> Tag {
        self.compute(pad)
    }

    /// Checks `tag` in constant time.
    pub fn verify(&self, pad: &[u8; 16], tag: &Tag) -> Result<(), AuthError> {
        if bool::from(self.compute(pad).ct_eq(tag)) {
            Ok(())
        } else {
            Err(AuthError::TagMismatch)
        }
    }
}

/// The 128-bit polynomial-hash key. Secret; zeroed on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct HashKey([u8; 16]);

impl HashKey {
    /// Wraps 16 bytes of key-pool material.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }
    fn element(&self) -> Gf128 {
        u128::from_le_bytes(self.0)
    }
}

/// A Wegman–Carter key for one tag: hash key + 128-bit one-time pad (256 key
/// bits). Consumed by [`AuthKey::tag`] / [`AuthKey::verify`] so that a pad
/// cannot be used twice by accident. Secret; zeroed on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct AuthKey {
    hash_key: HashKey,
    pad: [u8; 16],
}

impl core::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("AuthKey(..)")
    }
}

impl core::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("HashKey(..)")
    }
}

/// An authentication tag (not secret once sent).
#[derive(Clone, Copy, Debug)]
pub struct Tag(pub [u8; TAG_BYTES]);

impl ConstantTimeEq for Tag {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

impl AuthKey {
    /// Builds a key from a hash key and a fresh pad.
    pub fn new(hash_key: HashKey, pad: [u8; 16]) -> Self {
        Self { hash_key, pad }
    }

    /// Builds a key from 32 bytes of pool material: bytes 0..16 are the hash
    /// key, 16..32 the pad.
    pub fn from_pool_bytes(bytes: &[u8]) -> Result<Self, AuthError> {
        if bytes.len() != KEY_BITS_PER_TAG / 8 {
            return Err(AuthError::KeyLength {
                expected: KEY_BITS_PER_TAG / 8,
                got: bytes.len(),
            });
        }
        let mut k = [0u8; 16];
        let mut p = [0u8; 16];
        k.copy_from_slice(&bytes[..16]);
        p.copy_from_slice(&bytes[16..]);
        let key = Self::new(HashKey(k), p);
        k.zeroize();
        p.zeroize();
        Ok(key)
    }

    fn compute(&self, msg: &[u8]) -> Tag {
        let h = poly_hash(self.hash_key.element(), msg) ^ u128::from_le_bytes(self.pad);
        Tag(h.to_le_bytes())
    }

    /// Tags `msg`, consuming the key.
    pub fn tag(self, msg: &[u8]) -> Tag {
        self.compute(msg)
    }

    /// Checks `tag` on `msg` in constant time, consuming the key.
    pub fn verify(self, msg: &[u8], tag: &Tag) -> Result<(), AuthError> {
        if bool::from(self.compute(msg).ct_eq(tag)) {
            Ok(())
        } else {
            Err(AuthError::TagMismatch)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_xoshiro::Xoshiro256PlusPlus;

    fn rand128(rng: &mut impl Rng) -> u128 {
        (rng.next_u64() as u128) | ((rng.next_u64() as u128) << 64)
    }

    fn key(rng: &mut impl Rng) -> ([u8; 16], [u8; 16]) {
        let mut k = [0u8; 16];
        let mut p = [0u8; 16];
        rng.fill_bytes(&mut k);
        rng.fill_bytes(&mut p);
        (k, p)
    }

    #[test]
    fn reference_multiply_known_values() {
        // x^127 · x = x^128 ≡ x^7 + x^2 + x + 1.
        assert_eq!(gf128_mul_reference(1 << 127, 2), 0x87);
        assert_eq!(gf128_mul_reference(5, 1), 5);
        // (x+1)^2 = x^2 + 1.
        assert_eq!(gf128_mul_reference(3, 3), 5);
    }

    #[test]
    fn fast_multiply_matches_reference() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(20);
        for _ in 0..5000 {
            let (a, b) = (rand128(&mut rng), rand128(&mut rng));
            assert_eq!(gf128_mul(a, b), gf128_mul_reference(a, b));
        }
        for (a, b) in [
            (0, 0),
            (u128::MAX, u128::MAX),
            (1 << 127, 1 << 127),
            (1, u128::MAX),
        ] {
            assert_eq!(gf128_mul(a, b), gf128_mul_reference(a, b));
        }
    }

    #[test]
    fn field_laws() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(21);
        for _ in 0..200 {
            let (a, b, c) = (rand128(&mut rng), rand128(&mut rng), rand128(&mut rng));
            assert_eq!(gf128_mul(a, b), gf128_mul(b, a));
            assert_eq!(gf128_mul(gf128_mul(a, b), c), gf128_mul(a, gf128_mul(b, c)));
            assert_eq!(gf128_mul(a, b ^ c), gf128_mul(a, b) ^ gf128_mul(a, c));
        }
    }

    #[test]
    fn transcript_tag_equals_the_tag_of_the_padded_concatenation() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(23);
        for trial in 0..50 {
            let (k, p) = key(&mut rng);
            let mut t = TranscriptHash::new(&HashKey::from_bytes(k));
            let mut whole = Vec::new();
            for _ in 0..trial % 7 {
                let n = (rng.next_u64() % 70) as usize;
                let piece: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                t.absorb_padded(&piece);
                whole.extend_from_slice(&piece);
                whole.resize(whole.len().div_ceil(16) * 16, 0);
            }
            assert_eq!(t.len_bytes(), whole.len() as u128);
            let expect = AuthKey::new(HashKey::from_bytes(k), p).tag(&whole);
            assert_eq!(t.tag(&p).0, expect.0, "trial {trial}");
            assert!(t.verify(&p, &expect).is_ok());
            let mut bad = expect;
            bad.0[3] ^= 1;
            assert_eq!(t.verify(&p, &bad), Err(AuthError::TagMismatch));
            t.reset();
            assert_eq!(
                t.tag(&p).0,
                AuthKey::new(HashKey::from_bytes(k), p).tag(&[]).0
            );
        }
    }

    #[test]
    fn hash_matches_definition() {
        // H_k(M) for a 20-byte message: c1·k^3 + c2·k^2 + len·k.
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(22);
        let k = rand128(&mut rng);
        let msg: Vec<u8> = (0u8..20).collect();
        let mut b1 = [0u8; 16];
        b1.copy_from_slice(&msg[..16]);
        let mut b2 = [0u8; 16];
        b2[..4].copy_from_slice(&msg[16..]);
        let (c1, c2) = (u128::from_le_bytes(b1), u128::from_le_bytes(b2));
        let m = gf128_mul_reference;
        let k2 = m(k, k);
        let k3 = m(k2, k);
        let expect = m(c1, k3) ^ m(c2, k2) ^ m(20, k);
        assert_eq!(poly_hash(k, &msg), expect);
        // Padding alone does not collide thanks to the length block.
        assert_ne!(poly_hash(k, &[1, 0]), poly_hash(k, &[1]));
    }

    #[test]
    fn tag_verifies_and_rejects_bit_flips() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(23);
        for len in [0usize, 1, 15, 16, 17, 100] {
            let mut msg = vec![0u8; len];
            rng.fill_bytes(&mut msg);
            let (k, p) = key(&mut rng);
            let mk = || AuthKey::new(HashKey::from_bytes(k), p);
            let tag = mk().tag(&msg);
            assert_eq!(mk().verify(&msg, &tag), Ok(()));
            for bit in 0..len * 8 {
                let mut m2 = msg.clone();
                m2[bit / 8] ^= 1 << (bit % 8);
                assert_eq!(mk().verify(&m2, &tag), Err(AuthError::TagMismatch));
            }
            for bit in 0..128 {
                let mut t2 = tag;
                t2.0[bit / 8] ^= 1 << (bit % 8);
                assert_eq!(mk().verify(&msg, &t2), Err(AuthError::TagMismatch));
            }
            // Appending a zero byte (same padded blocks) must be rejected.
            let mut m3 = msg.clone();
            m3.push(0);
            assert_eq!(mk().verify(&m3, &tag), Err(AuthError::TagMismatch));
        }
    }

    #[test]
    fn different_keys_give_different_tags() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(24);
        let msg = b"sifting: bases 0110...";
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            let (k, p) = key(&mut rng);
            assert!(seen.insert(AuthKey::new(HashKey::from_bytes(k), p).tag(msg).0));
        }
        // Same pad, different hash keys: tags differ.
        let (k1, p) = key(&mut rng);
        let (k2, _) = key(&mut rng);
        let t1 = AuthKey::new(HashKey::from_bytes(k1), p).tag(msg);
        let t2 = AuthKey::new(HashKey::from_bytes(k2), p).tag(msg);
        assert_ne!(t1.0, t2.0);
    }

    #[test]
    fn pool_bytes_and_bound() {
        assert_eq!(
            AuthKey::from_pool_bytes(&[0u8; 31]).map(|_| ()),
            Err(AuthError::KeyLength {
                expected: 32,
                got: 31
            })
        );
        let k = AuthKey::from_pool_bytes(&[7u8; 32]).expect("32 bytes");
        assert_eq!(format!("{k:?}"), "AuthKey(..)");
        assert!((forgery_bound_log2(0) - (-128.0)).abs() < 1e-12);
        assert!((forgery_bound_log2(16 * 1023) - (-118.0)).abs() < 1e-12);
    }
}
