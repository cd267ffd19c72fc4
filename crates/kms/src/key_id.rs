//! Opaque key IDs: what SAEs see instead of the KMEs' structured unit IDs.
//!
//! Inside the KMEs a key's ID is its first unit's ID ([`crate::block::unit_id`]):
//! link tag ‖ block number ‖ index, so that the two ends of a link agree on it
//! without a message and the stores' indexes grow at one end. Handed out as is,
//! that structure makes the *next* key ID predictable, and an attacker who can
//! name a key ID can make an application spend the key behind it (a forged
//! stream handshake, a sealed file rewritten to carry another file's ID: issue
//! #18, finding 3). So every ID crosses the ETSI GS QKD 014 API through a keyed
//! permutation: `enc_keys` answers `external(id)`, `dec_keys` looks up
//! `internal(id)`. Without the network's key-ID secret the IDs of a pair look
//! like independent random UUIDs (version 4); every KME of the network holds
//! the secret, so the slave's KME, however many trusted nodes away, maps the ID
//! back.
//!
//! The permutation is an 8-round Feistel network on the 122 free bits of the
//! UUID (61-bit halves), each round function the first 61 bits of
//! `SM4_K(round ‖ half)`; with a pseudorandom round function four rounds already
//! give a strong pseudorandom permutation (Luby–Rackoff), eight leave margin.
//! This is format-preserving encryption built by hand because no well-kept crate
//! offers a 122-bit block permutation (FF1/FF3 crates work on decimal or
//! byte-aligned domains), and SM4 keeps it in the national suite. `K` is derived
//! from the 32-byte secret with SM3's KDF, so the secret file never keys SM4
//! directly.
//!
//! A KME configured without a secret ([`KeyIdCodec::Structured`]) shows the
//! structured IDs, as before; it warns at start-up.

use qkdnet_crypto::secret::Sm4Key;
use qkdnet_crypto::sm4::Sm4Block;
use uuid::Uuid;

/// Length of the key-ID secret file's content.
pub const KEY_ID_SECRET_LEN: usize = 32;

const ROUNDS: u8 = 8;
const HALF: u32 = 61;
const HALF_MASK: u64 = (1 << HALF) - 1;

/// How key IDs cross the ETSI API.
#[derive(Clone)]
pub enum KeyIdCodec {
    /// Unit IDs as they are (no secret configured).
    Structured,
    /// Through the keyed permutation.
    Opaque(Box<Sm4Block>),
}

impl core::fmt::Debug for KeyIdCodec {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Structured => "KeyIdCodec::Structured",
            Self::Opaque(_) => "KeyIdCodec::Opaque(..)",
        })
    }
}

/// The 122 free bits of a UUID (version and variant bits removed), in order.
fn payload(u: Uuid) -> u128 {
    let v = u.as_u128();
    let a = v >> 80; // 48 bits before the version nibble
    let b = (v >> 64) & 0xfff; // 12 bits after it
    let c = v & ((1 << 62) - 1); // 62 bits after the variant
    (a << 74) | (b << 62) | c
}

/// A UUID with `version` and the RFC 9562 variant around 122 payload bits.
fn with_payload(p: u128, version: u8) -> Uuid {
    let a = (p >> 74) & ((1 << 48) - 1);
    let b = (p >> 62) & 0xfff;
    let c = p & ((1 << 62) - 1);
    Uuid::from_u128((a << 80) | (u128::from(version) << 76) | (b << 64) | (0b10 << 62) | c)
}

impl KeyIdCodec {
    /// The codec for a network's key-ID secret.
    pub fn opaque(secret: &[u8; KEY_ID_SECRET_LEN]) -> Self {
        let mut k = zeroize::Zeroizing::new([0u8; 16]);
        qkdnet_crypto::kdf::sm2_kdf_with_info(secret, b"qkdnet/kms/key-id-permutation/v1", &mut *k)
            .expect("invariant: 16 bytes is within the KDF's range");
        let key = Sm4Key::from_slice(&k[..]).expect("invariant: 16 bytes");
        Self::Opaque(Box::new(Sm4Block::new(&key)))
    }

    fn round(sm4: &Sm4Block, i: u8, half: u64) -> u64 {
        let mut b = [0u8; 16];
        b[0] = i;
        b[8..].copy_from_slice(&half.to_be_bytes());
        sm4.encrypt_block(&mut b);
        let mut o = [0u8; 8];
        o.copy_from_slice(&b[..8]);
        u64::from_be_bytes(o) & HALF_MASK
    }

    /// The ID an SAE sees for unit ID `internal`.
    pub fn external(&self, internal: Uuid) -> Uuid {
        let Self::Opaque(sm4) = self else {
            return internal;
        };
        let p = payload(internal);
        let (mut l, mut r) = ((p >> HALF) as u64 & HALF_MASK, p as u64 & HALF_MASK);
        for i in 0..ROUNDS {
            (l, r) = (r, l ^ Self::round(sm4, i, r));
        }
        with_payload((u128::from(l) << HALF) | u128::from(r), 4)
    }

    /// The unit ID behind an ID an SAE presents; `None` if no KME of this
    /// network can have issued it (it is then simply not found).
    pub fn internal(&self, external: Uuid) -> Option<Uuid> {
        let Self::Opaque(sm4) = self else {
            return Some(external);
        };
        if external.get_version_num() != 4 {
            return None;
        }
        let p = payload(external);
        let (mut l, mut r) = ((p >> HALF) as u64 & HALF_MASK, p as u64 & HALF_MASK);
        for i in (0..ROUNDS).rev() {
            (l, r) = (r ^ Self::round(sm4, i, l), l);
        }
        let id = with_payload((u128::from(l) << HALF) | u128::from(r), 8);
        Some(id)
    }
}

/// Reads a key-ID secret file (exactly [`KEY_ID_SECRET_LEN`] bytes).
pub fn read_secret(path: &std::path::Path) -> Result<[u8; KEY_ID_SECRET_LEN], crate::KmsError> {
    let bytes =
        zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| {
            crate::KmsError::Config(format!("key-ID secret {}: {e}", path.display()))
        })?);
    <[u8; KEY_ID_SECRET_LEN]>::try_from(&bytes[..]).map_err(|_| {
        crate::KmsError::Config(format!(
            "key-ID secret {}: must hold exactly {KEY_ID_SECRET_LEN} bytes",
            path.display()
        ))
    })
}

/// Creates a key-ID secret file: 32 bytes from the operating system's CSPRNG,
/// mode 0600, never overwriting an existing file.
pub fn create_secret(path: &std::path::Path) -> Result<(), crate::KmsError> {
    crate::pki::create_random_secret::<KEY_ID_SECRET_LEN>(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::unit_id;

    #[test]
    fn payload_round_trips_and_keeps_the_structure_bits() {
        let u = unit_id("a-b", 1_733_000_000_000_000_000, 12_345);
        assert_eq!(u.get_version_num(), 8);
        assert_eq!(with_payload(payload(u), 8), u);
    }

    #[test]
    fn opaque_ids_invert_and_hide_the_sequence() {
        let c = KeyIdCodec::opaque(&[7; 32]);
        let other = KeyIdCodec::opaque(&[8; 32]);
        let mut seen = std::collections::HashSet::new();
        for i in 0..2000u64 {
            let u = unit_id("core-north", 42, i);
            let e = c.external(u);
            assert_eq!(e.get_version_num(), 4);
            assert_eq!(e.get_variant(), uuid::Variant::RFC4122);
            assert_eq!(c.internal(e), Some(u), "round trip");
            assert_ne!(other.internal(e), Some(u), "another secret maps elsewhere");
            assert!(seen.insert(e), "a permutation never collides");
        }
        // Consecutive units: external IDs share no long prefix (the structured
        // ones share 12 of 16 bytes).
        let a = c.external(unit_id("l", 9, 100)).as_u128();
        let b = c.external(unit_id("l", 9, 101)).as_u128();
        assert!((a ^ b).leading_zeros() < 32, "{a:x} {b:x}");
        // What no KME issued is not found.
        assert_eq!(c.internal(unit_id("l", 9, 100)), None);
    }

    #[test]
    fn structured_is_the_identity() {
        let u = unit_id("l", 1, 2);
        assert_eq!(KeyIdCodec::Structured.external(u), u);
        assert_eq!(KeyIdCodec::Structured.internal(u), Some(u));
    }
}
