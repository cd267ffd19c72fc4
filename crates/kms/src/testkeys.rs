//! Seeded *test* key blocks, for running KMEs without a QKD link.
//!
//! A KME normally receives keys only from the link layer. To exercise the API
//! without one, two KMEs can be configured (explicitly, `[test_keys]` in the
//! configuration; never by default) with the same seed and link ID: each then
//! generates the same blocks, exactly as a link would push them to both ends. The
//! bytes are SM3 in counter mode over the seed — anyone who knows the seed knows
//! every key, so this is **test material, not secret**. Link IDs always start with
//! `TEST-` so that such keys are recognisable in every store and log.

use qkdnet_crypto::secret::SecretBytes;
use qkdnet_crypto::sm3::Sm3Hasher;

use crate::block::KeyBlock;
use crate::ids::KmeId;

/// Prefix of every test link ID.
pub const TEST_LINK_PREFIX: &str = "TEST-";

const DOMAIN: &[u8] = b"qkdnet TEST key material - NOT SECRET";

/// The test link ID for `name` (prefixed with `TEST-` if it is not already).
pub fn test_link_id(name: &str) -> String {
    if name.starts_with(TEST_LINK_PREFIX) {
        name.to_owned()
    } else {
        format!("{TEST_LINK_PREFIX}{name}")
    }
}

/// Block `block_number` of the seeded test link `link` (both ends get the same bytes).
pub fn seeded_block(
    seed: u64,
    link: &str,
    peer: KmeId,
    block_number: u64,
    block_bytes: usize,
) -> KeyBlock {
    let link_id = test_link_id(link);
    let mut key = SecretBytes::zeroed(block_bytes);
    for (i, chunk) in key.expose_secret_mut().chunks_mut(32).enumerate() {
        let mut h = Sm3Hasher::new();
        h.update(DOMAIN);
        h.update(&seed.to_be_bytes());
        h.update(&(link_id.len() as u64).to_be_bytes());
        h.update(link_id.as_bytes());
        h.update(&block_number.to_be_bytes());
        h.update(&(i as u64).to_be_bytes());
        let mut d = h.finalize();
        chunk.copy_from_slice(&d[..chunk.len()]);
        zeroize::Zeroize::zeroize(&mut d);
    }
    KeyBlock {
        link_id,
        peer_kme: peer,
        block_number,
        key,
        eps_sec: 0.0,
        eps_cor: 0.0,
        created_unix_ms: 0,
    }
}
