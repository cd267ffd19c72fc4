//! The one-time pad, as used for hop-by-hop key relay between trusted nodes.
//!
//! Information-theoretic security holds only if each pad byte is used once and the
//! pad is exactly as long as the data. Both rules are enforced by the signature:
//! the pad is taken by value (it is consumed, and zeroized when this function
//! returns), and a length mismatch is an error rather than a silent truncation or
//! a cycled key.
//!
//! [`wegman_carter_tag`] is the information-theoretic MAC that goes with the pad
//! (Wegman and Carter 1981): GHASH, an ε-almost-XOR-universal hash keyed with a
//! secret 128-bit `H`, over the additional data, the ciphertext and their lengths
//! exactly as in GCM (NIST SP 800-38D §6.4), XORed with a fresh 16-byte mask. `H`
//! may serve many messages as long as every mask is one-time pad used once: a
//! forgery then succeeds with probability at most `(⌈len/16⌉ + 1) / 2^128` per try
//! whatever the attacker's computing power. GCM's tag is this construction with
//! `H = E_K(0)` and mask `E_K(J0)`, which the tests use as a differential check.

use ghash::GHash;
use ghash::universal_hash::UniversalHash;
use zeroize::Zeroize;

use crate::error::{CryptoError, Result};
use crate::secret::SecretBytes;

/// Length of a Wegman–Carter tag, its hash key and its mask.
pub const WC_TAG_LEN: usize = 16;

/// The Wegman–Carter tag of (`aad`, `data`): GHASH under `hash_key` over both
/// (each zero-padded to 16 bytes) and the block of their bit lengths, XOR
/// `mask`. `mask` must be pad never used for anything else; `hash_key` must be
/// secret pad too (it may be reused). Compare tags in constant time.
pub fn wegman_carter_tag(
    hash_key: &[u8; WC_TAG_LEN],
    mask: &[u8; WC_TAG_LEN],
    aad: &[u8],
    data: &[u8],
) -> [u8; WC_TAG_LEN] {
    let mut g = GHash::new(hash_key.into());
    g.update_padded(aad);
    g.update_padded(data);
    let mut lens = [0u8; 16];
    lens[..8].copy_from_slice(&((aad.len() as u64) * 8).to_be_bytes());
    lens[8..].copy_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    g.update_padded(&lens);
    let mut s: [u8; WC_TAG_LEN] = g.finalize().into();
    let mut tag = [0u8; WC_TAG_LEN];
    for (t, (a, b)) in tag.iter_mut().zip(s.iter().zip(mask)) {
        *t = a ^ b;
    }
    s.zeroize();
    tag
}

/// XORs `pad` into `data` in place, consuming (and zeroizing) the pad.
///
/// Errors, leaving `data` untouched, unless `pad.len() == data.len()`.
/// The same call decrypts.
pub fn one_time_pad(pad: SecretBytes, data: &mut [u8]) -> Result<()> {
    if pad.len() != data.len() {
        return Err(CryptoError::PadLengthMismatch {
            key: pad.len(),
            data: data.len(),
        });
    }
    for (d, k) in data.iter_mut().zip(pad.expose_secret()) {
        *d ^= k;
    }
    Ok(())
    // `pad` is dropped here and zeroized.
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gcm::Sm4Gcm;
    use crate::secret::Sm4Key;
    use crate::sm4::Sm4Block;

    #[test]
    fn wegman_carter_with_gcm_hash_key_and_mask_is_the_gcm_tag() {
        // GCM = Wegman-Carter with H = E_K(0^128) and mask E_K(nonce || 1).
        let key = [0x2bu8; 16];
        let nonce = [7u8; 12];
        for (aad, len) in [
            (&b""[..], 0usize),
            (b"header", 1),
            (b"rtp header 12", 160),
            (b"x", 33),
        ] {
            let mut buf: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let tag = Sm4Gcm::new(&Sm4Key::new(key))
                .seal_in_place_detached(&nonce, aad, &mut buf)
                .expect("seal");
            let sm4 = Sm4Block::new(&Sm4Key::new(key));
            let mut h = [0u8; 16];
            sm4.encrypt_block(&mut h);
            let mut j0 = [0u8; 16];
            j0[..12].copy_from_slice(&nonce);
            j0[15] = 1;
            sm4.encrypt_block(&mut j0);
            assert_eq!(wegman_carter_tag(&h, &j0, aad, &buf), tag, "len {len}");
            // (With nothing to hash, GHASH of the zero length block is 0: the
            // tag is the mask whatever H.)
            if !aad.is_empty() || !buf.is_empty() {
                let mut other = h;
                other[0] ^= 1;
                assert_ne!(wegman_carter_tag(&other, &j0, aad, &buf), tag);
            }
            if !buf.is_empty() {
                buf[0] ^= 1;
                assert_ne!(wegman_carter_tag(&h, &j0, aad, &buf), tag);
            }
        }
    }

    #[test]
    fn pads_and_unpads() {
        let pad = SecretBytes::from_slice(&[0xFF, 0x0F, 0x00]);
        let mut data = [0x12, 0x34, 0x56];
        one_time_pad(pad.clone(), &mut data).expect("same length");
        assert_eq!(data, [0xED, 0x3B, 0x56]);
        one_time_pad(pad, &mut data).expect("same length");
        assert_eq!(data, [0x12, 0x34, 0x56]);
    }

    #[test]
    fn length_mismatch_is_an_error_and_leaves_data() {
        let mut data = [1u8, 2, 3];
        let e = one_time_pad(SecretBytes::from_slice(&[9; 4]), &mut data).expect_err("longer pad");
        assert_eq!(e, CryptoError::PadLengthMismatch { key: 4, data: 3 });
        assert!(one_time_pad(SecretBytes::from_slice(&[9; 2]), &mut data).is_err());
        assert_eq!(data, [1, 2, 3]);
    }
}
