//! Key blocks from the QKD link layer, cut into 256-bit units with agreed IDs.
//!
//! Both ends of a QKD link push the same block (same link ID, block number and
//! bytes) to their KME. The KMEs must then agree on key IDs without exchanging a
//! message, so IDs are a pure function of (link ID, block number, index): a
//! UUIDv8 (RFC 9562) whose free bits hold a 32-bit tag of the link (from its SM3
//! hash), the 64-bit block number and the 26-bit index, in big-endian order (see
//! [`unit_id`]). IDs of one link therefore sort in the order
//! the key was produced, so the stores' indexes on them grow at one end instead of
//! being written at random pages (which made every unit cost several random B-tree
//! page writes; see BENCHMARKS.md, KME). Key IDs are not secrets; their structure
//! tells an observer no more than the order in which keys were made. The block is cut into units of [`UNIT_BYTES`] = 32 bytes (256 bits);
//! a trailing remainder shorter than a unit is discarded at both ends alike.
//!
//! A key of `s` bits (`s` a multiple of 8, up to the advertised maximum) consumes
//! `ceil(s / 256)` units: its bytes are the units' bytes concatenated in the order
//! the reserving KME lists them, truncated to `s / 8`; its key ID is the ID of its
//! first unit. Because the reserving KME tells its peer the exact unit list of each
//! key, the units of one key need not be adjacent, and both ends compute the same
//! bytes.
//!
//! Both KMEs of a link can act as master (either side's SAE may call `enc_keys`), so
//! each unit has exactly one *owner* allowed to reserve it ([`owned_by`]): units with
//! an even index belong to the KME whose ID sorts first, odd ones to the other. The
//! non-owner only ever uses a unit when the owner reserves it for a slave SAE, so
//! the same unit can never be reserved twice, once at each end.

use qkdnet_crypto::secret::SecretBytes;
use qkdnet_crypto::sm3::Sm3Hasher;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::KmsError;
use crate::ids::KmeId;

/// Bytes of one store unit (256 bits).
pub const UNIT_BYTES: usize = 32;

/// Bits of one store unit.
pub const UNIT_BITS: u32 = (UNIT_BYTES * 8) as u32;

/// Longest accepted link ID, in bytes.
pub const MAX_LINK_ID_LEN: usize = 128;

/// Domain separation for key-ID derivation (changing it changes every key ID).
const KEY_ID_DOMAIN: &[u8] = b"qkdnet/kms/key-id/v2";

/// A block of secret key from a QKD link, as both ends hand it to their KME.
///
/// `key` is zeroized when the block is dropped; the block has no `Debug` output of
/// its bytes.
pub struct KeyBlock {
    /// Identifier of the QKD link (same string at both ends).
    pub link_id: String,
    /// The KME at the other end of the link.
    pub peer_kme: KmeId,
    /// Sequence number of the block on this link (same at both ends).
    pub block_number: u64,
    /// The secret key bytes.
    pub key: SecretBytes,
    /// Secrecy parameter ε_sec of the block.
    pub eps_sec: f64,
    /// Correctness parameter ε_cor of the block.
    pub eps_cor: f64,
    /// When the block was produced, Unix time in milliseconds.
    pub created_unix_ms: u64,
}

impl core::fmt::Debug for KeyBlock {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("KeyBlock")
            .field("link_id", &self.link_id)
            .field("peer_kme", &self.peer_kme)
            .field("block_number", &self.block_number)
            .field("key_len", &self.key.len())
            .field("eps_sec", &self.eps_sec)
            .field("eps_cor", &self.eps_cor)
            .field("created_unix_ms", &self.created_unix_ms)
            .finish()
    }
}

/// One 256-bit unit cut from a block, ready for the store.
pub struct KeyUnit {
    /// Agreed unit ID (also the key ID of a key that starts with this unit).
    pub id: Uuid,
    /// Whether this KME may reserve the unit for its own master SAEs.
    pub mine: bool,
    /// The unit's bytes.
    pub material: Zeroizing<[u8; UNIT_BYTES]>,
}

/// Largest unit index a block may have (blocks are cut into at most 2^26 units,
/// 2 GiB of key).
pub const MAX_UNIT_INDEX: u64 = (1 << 26) - 1;

/// The 32-bit tag of a link in its unit IDs:
/// `SM3("qkdnet/kms/key-id/v2" ‖ u32be(len(link_id)) ‖ link_id)[0..4]`.
pub fn link_tag(link_id: &str) -> [u8; 4] {
    let mut h = Sm3Hasher::new();
    h.update(KEY_ID_DOMAIN);
    // Link IDs are at most MAX_LINK_ID_LEN bytes, so the length fits in u32; saturate anyway.
    h.update(
        &u32::try_from(link_id.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    h.update(link_id.as_bytes());
    let d = h.finalize();
    let mut t = [0u8; 4];
    t.copy_from_slice(&d[..4]);
    t
}

/// Derives the ID of unit `index` of block `block_number` on link `link_id`.
///
/// A UUIDv8 (RFC 9562) whose 122 free bits (`custom_a` ‖ `custom_b` ‖
/// `custom_c`, in that order) hold, big-endian, [`link_tag`] (32 bits), the
/// whole block number (64 bits) and `index` (26 bits), so IDs of one link sort
/// by (block, index). `index` must not exceed [`MAX_UNIT_INDEX`]
/// ([`KeyBlock::cut`] refuses larger blocks).
pub fn unit_id(link_id: &str, block_number: u64, index: u64) -> Uuid {
    unit_id_tagged(&link_tag(link_id), block_number, index)
}

/// [`unit_id`] with the link tag computed once (for cutting a whole block).
pub fn unit_id_tagged(tag: &[u8; 4], block_number: u64, index: u64) -> Uuid {
    let p: u128 = (u128::from(u32::from_be_bytes(*tag)) << 90)
        | (u128::from(block_number) << 26)
        | u128::from(index & MAX_UNIT_INDEX);
    let v = ((p >> 74) << 80)
        | (0x8 << 76)
        | (((p >> 62) & 0xfff) << 64)
        | (0b10 << 62)
        | (p & ((1 << 62) - 1));
    Uuid::from_u128(v)
}

/// The inverse of [`unit_id_tagged`]: (link tag, block number, index) if `id` has
/// exactly the layout `unit_id_tagged` produces, `None` for any other UUID.
pub fn decode_unit_id(id: &Uuid) -> Option<([u8; 4], u64, u64)> {
    let v = id.as_u128();
    let p: u128 = ((v >> 80) << 74) | (((v >> 64) & 0xfff) << 62) | (v & ((1 << 62) - 1));
    let tag = u32::try_from(p >> 90).ok()?.to_be_bytes();
    let block = u64::try_from((p >> 26) & u128::from(u64::MAX)).ok()?;
    let index = u64::try_from(p & u128::from(MAX_UNIT_INDEX)).ok()?;
    (unit_id_tagged(&tag, block, index) == *id).then_some((tag, block, index))
}

/// A UUIDv8 (RFC 9562) from the first 16 bytes of an SM3 digest: version
/// nibble 8, variant bits `10`.
pub(crate) fn uuid_v8(digest: &[u8; 32]) -> Uuid {
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    Uuid::from_bytes(b)
}

/// Whether KME `me` owns unit `index` of a block shared with `peer` (may reserve it
/// for its own master SAEs). Exactly one of the two ends owns each unit.
pub fn owned_by(me: &KmeId, peer: &KmeId, index: u64) -> bool {
    let even = index.is_multiple_of(2);
    let me_first = me.as_str() < peer.as_str();
    even == me_first
}

/// Number of units a key of `size_bits` bits consumes.
pub fn units_for_bits(size_bits: u32) -> u32 {
    size_bits.div_ceil(UNIT_BITS)
}

impl KeyBlock {
    /// Checks the block's fields (not its bytes) and cuts it into units for KME `me`.
    pub fn cut(&self, me: &KmeId) -> Result<Vec<KeyUnit>, KmsError> {
        if self.link_id.is_empty() || self.link_id.len() > MAX_LINK_ID_LEN {
            return Err(KmsError::InvalidBlock("link_id must be 1 to 128 bytes"));
        }
        if &self.peer_kme == me {
            return Err(KmsError::InvalidBlock("peer_kme is this KME"));
        }
        for (name, eps) in [("eps_sec", self.eps_sec), ("eps_cor", self.eps_cor)] {
            if !(eps.is_finite() && (0.0..=1.0).contains(&eps)) {
                return Err(KmsError::InvalidBlock(if name == "eps_sec" {
                    "eps_sec must be in [0, 1]"
                } else {
                    "eps_cor must be in [0, 1]"
                }));
            }
        }
        let bytes = self.key.expose_secret();
        if bytes.len() < UNIT_BYTES {
            return Err(KmsError::InvalidBlock(
                "block shorter than one 256-bit unit",
            ));
        }
        if (bytes.len() / UNIT_BYTES) as u64 > MAX_UNIT_INDEX {
            return Err(KmsError::InvalidBlock("block longer than 2^26 units"));
        }
        let tag = link_tag(&self.link_id);
        let mut units = Vec::with_capacity(bytes.len() / UNIT_BYTES);
        for (i, chunk) in bytes.chunks_exact(UNIT_BYTES).enumerate() {
            let index = i as u64;
            let mut material = Zeroizing::new([0u8; UNIT_BYTES]);
            material.copy_from_slice(chunk);
            units.push(KeyUnit {
                id: unit_id_tagged(&tag, self.block_number, index),
                mine: owned_by(me, &self.peer_kme, index),
                material,
            });
        }
        Ok(units)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kme(s: &str) -> KmeId {
        KmeId::new(s).expect("invariant: valid test ID")
    }

    #[test]
    fn decode_inverts_unit_id_and_rejects_other_uuids() {
        let tag = link_tag("link-ab");
        for (block, index) in [
            (0, 0),
            (1, 1),
            (u64::MAX, MAX_UNIT_INDEX),
            (1_764_000_000_000_000_000, 12_345),
        ] {
            let id = unit_id_tagged(&tag, block, index);
            assert_eq!(decode_unit_id(&id), Some((tag, block, index)));
        }
        assert_eq!(decode_unit_id(&Uuid::nil()), None);
        assert_eq!(
            decode_unit_id(&Uuid::from_u128(0x0123_4567_89ab_4def_8123_4567_89ab_cdef)),
            None
        );
    }

    #[test]
    fn unit_ids_are_uuidv8_and_distinct() {
        let a = unit_id("link", 7, 0);
        assert_eq!(a.get_version_num(), 8);
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(a, unit_id("link", 7, 0));
        assert_ne!(a, unit_id("link", 7, 1));
        assert_ne!(a, unit_id("link", 8, 0));
        assert_ne!(a, unit_id("lin", 7, 0));
        // Length prefix: ("ab", ...) and ("a", ...) with shifted bytes differ.
        assert_ne!(unit_id("ab", 1, 1), unit_id("a", 1, 1));
    }

    #[test]
    fn unit_id_is_stable() {
        // Pinned so that a change of derivation (which would break agreement between
        // KMEs of different versions) is a deliberate, visible change. Values checked
        // independently with Python's hashlib ("sm3", OpenSSL) and the uuid module.
        let id = unit_id("link-ab", 1, 0).hyphenated().to_string();
        assert_eq!(id, "61c444a4-0000-8000-8000-000004000000");
        let id = unit_id("link-ab", 5, 3).hyphenated().to_string();
        assert_eq!(id, "61c444a4-0000-8000-8000-000014000003");
    }

    #[test]
    fn unit_ids_of_a_link_sort_by_block_then_index() {
        let pts = [
            (0u64, 0u64),
            (0, 1),
            (0, MAX_UNIT_INDEX),
            (1, 0),
            (255, 7),
            (1 << 20, 0),
            (1 << 42, 5),
            // `net` sessions number blocks from the Unix time in ms × 10^6.
            (1_764_000_000_000 * 1_000_000, 0),
            (1_764_000_000_000 * 1_000_000 + 1, 3),
            (u64::MAX, MAX_UNIT_INDEX),
        ];
        let ids: Vec<Uuid> = pts.iter().map(|&(b, i)| unit_id("l", b, i)).collect();
        for w in ids.windows(2) {
            assert!(w[0].as_bytes() < w[1].as_bytes(), "{} !< {}", w[0], w[1]);
        }
        for id in &ids {
            assert_eq!(id.get_version_num(), 8);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        }
    }

    #[test]
    fn exactly_one_owner_per_unit() {
        let (a, b) = (kme("kme-a"), kme("kme-b"));
        for i in 0..10 {
            assert_ne!(owned_by(&a, &b, i), owned_by(&b, &a, i));
        }
    }

    #[test]
    fn both_ends_cut_the_same_ids() {
        let (a, b) = (kme("kme-a"), kme("kme-b"));
        let mk = |peer: &KmeId| KeyBlock {
            link_id: "l".into(),
            peer_kme: peer.clone(),
            block_number: 3,
            key: SecretBytes::new((0..100u8).collect()),
            eps_sec: 1e-10,
            eps_cor: 1e-15,
            created_unix_ms: 0,
        };
        let ua = mk(&b).cut(&a).expect("valid block");
        let ub = mk(&a).cut(&b).expect("valid block");
        assert_eq!(ua.len(), 3); // 100 bytes -> 3 units, 4 bytes discarded
        for (x, y) in ua.iter().zip(&ub) {
            assert_eq!(x.id, y.id);
            assert_eq!(*x.material, *y.material);
            assert_ne!(x.mine, y.mine);
        }
    }

    #[test]
    fn bad_blocks_are_refused() {
        let a = kme("kme-a");
        let mut blk = KeyBlock {
            link_id: String::new(),
            peer_kme: kme("kme-b"),
            block_number: 0,
            key: SecretBytes::new(vec![0; 64]),
            eps_sec: 0.0,
            eps_cor: 0.0,
            created_unix_ms: 0,
        };
        assert!(blk.cut(&a).is_err());
        blk.link_id = "l".into();
        assert!(blk.cut(&a).is_ok());
        blk.eps_sec = f64::NAN;
        assert!(blk.cut(&a).is_err());
        blk.eps_sec = 0.0;
        blk.key = SecretBytes::new(vec![0; 31]);
        assert!(blk.cut(&a).is_err());
        blk.key = SecretBytes::new(vec![0; 64]);
        blk.peer_kme = a.clone();
        assert!(blk.cut(&a).is_err());
    }
}
