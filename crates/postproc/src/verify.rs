//! Verification: a universal-hash comparison that bounds the probability
//! ε_cor that Alice's and Bob's keys differ after reconciliation.
//!
//! # Why this shape
//!
//! Reconciliation (Cascade, LDPC) can leave residual errors without noticing.
//! Comparing a short universal hash of both keys catches them: for a hash
//! drawn from an ε-almost-universal family *after* the keys are fixed,
//! different keys collide with probability at most ε. We reuse the GF(2^128)
//! polynomial hash of [`crate::auth`] (one code path, one reference test)
//! with a fresh key, applied to the packed key words, and truncate the output
//! to just as many bits as the target ε_cor needs, because every disclosed
//! hash bit is leakage that privacy amplification must remove.
//!
//! # Construction (normative)
//!
//! The key bits are read as 128-bit blocks: words `2i` (low) and `2i+1`
//! (high) of the [`BitVec`] layout form block `i`, the last one zero-padded;
//! the length block is the length in **bits**. With `L = ⌈len/128⌉` blocks
//! the full hash is `c_1·k^(L+1) + … + c_L·k^2 + len·k` over GF(2^128), and
//! the tag is its low `t` bits. Truncating the (L+1)/2^128-almost-universal
//! hash to `t` bits gives collision probability at most
//! **ε_cor = (L + 1) / 2^t** (at most `2^(128−t)` field values map to each
//! `t`-bit tag). [`tag_bits_for`] picks the smallest `t` meeting a target.
//!
//! The hash key need not be secret but must be chosen at random after Bob's
//! corrected key is fixed (e.g. Alice draws it and sends it with her tag);
//! the `t` tag bits count as leakage.

use rand::Rng;
use subtle::ConstantTimeEq;

use crate::auth::horner;
use crate::bits::BitVec;

/// Errors from verification; all are caller misuse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The requested ε_cor is not in (0, 1) or needs more than 128 tag bits
    /// for this key length.
    #[error("ε_cor = {eps_cor} is unattainable with a 128-bit hash for {len_bits} key bits")]
    Unattainable {
        /// Requested ε_cor.
        eps_cor: f64,
        /// Key length in bits.
        len_bits: usize,
    },
    /// Tag lengths must be 1..=128 bits.
    #[error("tag length {0} bits is outside 1..=128")]
    TagBits(u32),
}

/// A verification hash key (128 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyKey(u128);

impl VerifyKey {
    /// A fresh uniformly random key.
    pub fn random<R: Rng + ?Sized>(rng: &mut R) -> Self {
        Self((rng.next_u64() as u128) | ((rng.next_u64() as u128) << 64))
    }
    /// A key from 16 little-endian bytes (as received from the peer).
    pub fn from_bytes(b: [u8; 16]) -> Self {
        Self(u128::from_le_bytes(b))
    }
    /// The key as 16 little-endian bytes (to send to the peer).
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }
}

/// A truncated verification tag: the low `bits` bits of the hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyTag {
    bits: u32,
    value: u128,
}

impl VerifyTag {
    /// Rebuilds a tag received from the peer; bits above `bits` are cleared.
    pub fn new(bits: u32, value: u128) -> Result<Self, VerifyError> {
        if !(1..=128).contains(&bits) {
            return Err(VerifyError::TagBits(bits));
        }
        Ok(Self {
            bits,
            value: value & mask(bits),
        })
    }
    /// Tag length in bits (= leakage of disclosing it).
    pub fn bits(&self) -> u32 {
        self.bits
    }
    /// Tag value (low `bits()` bits).
    pub fn value(&self) -> u128 {
        self.value
    }
    /// Constant-time comparison; tags of different lengths never match.
    pub fn matches(&self, other: &VerifyTag) -> bool {
        self.bits == other.bits && bool::from(self.value.ct_eq(&other.value))
    }
}

fn mask(bits: u32) -> u128 {
    if bits >= 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    }
}

fn blocks(len_bits: usize) -> usize {
    len_bits.div_ceil(128)
}

/// Smallest tag length `t` with `(⌈len_bits/128⌉ + 1) / 2^t ≤ eps_cor`.
pub fn tag_bits_for(eps_cor: f64, len_bits: usize) -> Result<u32, VerifyError> {
    let bad = VerifyError::Unattainable { eps_cor, len_bits };
    if !(eps_cor > 0.0 && eps_cor < 1.0) {
        return Err(bad);
    }
    let need = ((blocks(len_bits) + 1) as f64 / eps_cor).log2().ceil();
    if need > 128.0 {
        return Err(bad);
    }
    Ok((need as u32).max(1))
}

/// The collision bound `(⌈len_bits/128⌉ + 1) / 2^tag_bits` actually achieved.
pub fn eps_cor(len_bits: usize, tag_bits: u32) -> f64 {
    (blocks(len_bits) + 1) as f64 / 2f64.powi(tag_bits as i32)
}

/// The `tag_bits`-bit verification tag of `key_bits` under `key`.
pub fn verify_tag(
    key: VerifyKey,
    key_bits: &BitVec,
    tag_bits: u32,
) -> Result<VerifyTag, VerifyError> {
    if !(1..=128).contains(&tag_bits) {
        return Err(VerifyError::TagBits(tag_bits));
    }
    let w = key_bits.as_words();
    let it = w
        .chunks(2)
        .map(|c| (c[0] as u128) | ((c.get(1).copied().unwrap_or(0) as u128) << 64));
    let h = horner(key.0, it, key_bits.len() as u128);
    VerifyTag::new(tag_bits, h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_xoshiro::Xoshiro256PlusPlus;

    #[test]
    fn tag_length_from_eps() {
        // 10^5 bits -> 782 blocks -> (783)/2^t <= 1e-15 -> t = 60.
        let t = tag_bits_for(1e-15, 100_000).expect("attainable");
        assert_eq!(t, 60);
        assert!(eps_cor(100_000, t) <= 1e-15);
        assert!(eps_cor(100_000, t - 1) > 1e-15);
        assert!(tag_bits_for(1e-40, 100_000).is_err());
        assert!(tag_bits_for(0.0, 10).is_err());
        assert!(tag_bits_for(f64::NAN, 10).is_err());
    }

    #[test]
    fn equal_keys_match_different_keys_do_not() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(30);
        for len in [1usize, 64, 127, 128, 129, 10_000] {
            let a = BitVec::random(len, &mut rng);
            let k = VerifyKey::random(&mut rng);
            let t = tag_bits_for(1e-12, len).expect("attainable");
            let ta = verify_tag(k, &a, t).expect("ok");
            assert!(ta.matches(&verify_tag(k, &a.clone(), t).expect("ok")));
            // Every single-bit error is caught (a nonzero degree-<=L+1 poly
            // can vanish at k only with tiny probability; seeded, so exact).
            for i in (0..len).step_by((len / 37).max(1)) {
                let mut b = a.clone();
                b.flip(i);
                assert!(
                    !ta.matches(&verify_tag(k, &b, t).expect("ok")),
                    "len {len} bit {i}"
                );
            }
        }
    }

    #[test]
    fn tag_roundtrip_and_bounds() {
        let k = VerifyKey::from_bytes([9; 16]);
        assert_eq!(VerifyKey::from_bytes(k.to_bytes()), k);
        let t = VerifyTag::new(8, 0x1ff).expect("valid");
        assert_eq!(t.value(), 0xff);
        assert!(!t.matches(&VerifyTag::new(9, 0xff).expect("valid")));
        assert_eq!(VerifyTag::new(0, 1), Err(VerifyError::TagBits(0)));
        assert!(verify_tag(k, &BitVec::zeros(5), 129).is_err());
    }

    #[test]
    fn collision_rate_small_tags() {
        // With 8-bit tags and 2-block inputs, collisions happen at rate about
        // 2^-8 (bound 3/2^8): measure over seeded random keys.
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(31);
        let mut coll = 0;
        let trials = 20_000;
        for _ in 0..trials {
            let a = BitVec::random(200, &mut rng);
            let b = BitVec::random(200, &mut rng);
            let k = VerifyKey::random(&mut rng);
            if verify_tag(k, &a, 8)
                .expect("ok")
                .matches(&verify_tag(k, &b, 8).expect("ok"))
            {
                coll += 1;
            }
        }
        let rate = coll as f64 / trials as f64;
        assert!(rate <= eps_cor(200, 8), "collision rate {rate}");
    }
}
