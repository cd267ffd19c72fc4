//! QKD keys for the applications: asking the SAE's KME, and turning a key into SM4 keys.
//!
//! Sealed files ([`crate::seal`]) and live streams ([`crate::stream`]) spend keys
//! the same way, so the steps live here once. Before the first key is taken,
//! `status` proves that the TLS certificate in use is the SAE's the caller says it
//! is (the KME names the caller) and that the key size is one the KME serves;
//! `enc_keys`/`dec_keys` are then called in batches the KME accepts, and keys
//! arriving for a `dec_keys` call are checked to be the announced size. The key
//! derivation binds every SM4 key to an application label, the SM3 digest of what
//! the sender announced in clear (file header, stream handshake), an index (segment,
//! epoch) and, for streams, a direction; the HKDF-SM3 combiner itself is
//! `qkdnet_crypto::hybrid`.

use qkdnet_crypto::hybrid::{KeyMaterial, combine_to_sm4_key};
use qkdnet_crypto::sm3::{SM3_LEN, Sm3Digest};
use qkdnet_crypto::{SecretBytes, Sm4Key};
use qkdnet_etsi::client::{EtsiClient, Key};
use qkdnet_etsi::ids::SaeId;
use uuid::Uuid;

use crate::error::AppError;

/// Most keys asked for in one enc_keys/dec_keys call (the KME may allow fewer).
const MAX_KEYS_PER_CALL: u64 = 256;

/// Parses an SAE ID given by the user (`what`: "sender", "recipient", …).
pub(crate) fn sae_id(s: &str, what: &str) -> Result<SaeId, AppError> {
    SaeId::new(s).map_err(|_| AppError::InvalidInput(format!("{s:?} is not a valid {what} SAE ID")))
}

/// Checks with `status` that the client's certificate is `me`'s (the KME says
/// who called) and, when taking keys (`need > 0`), that enough keys are there.
/// Returns how many keys to ask for per call.
pub(crate) async fn check_identity_and_pool(
    client: &EtsiClient,
    me: &SaeId,
    other: &SaeId,
    need: u64,
    key_bits: u16,
) -> Result<u64, AppError> {
    let st = client.status(other.as_str()).await?;
    if st.master_SAE_ID != me.as_str() {
        return Err(AppError::InvalidInput(format!(
            "the TLS certificate in use is SAE {}'s, not {me}'s",
            st.master_SAE_ID
        )));
    }
    let bits = u32::from(key_bits);
    if bits < st.min_key_size || bits > st.max_key_size {
        return Err(AppError::InvalidInput(format!(
            "the KME serves keys of {} to {} bits, not {bits}",
            st.min_key_size, st.max_key_size
        )));
    }
    if need > 0 && st.key_size == bits && st.stored_key_count < need {
        return Err(AppError::InvalidInput(format!(
            "this needs {need} keys of {bits} bits but the KME has {} for {me} -> {other}; \
             wait for the QKD link or use a larger rekey interval",
            st.stored_key_count
        )));
    }
    Ok(u64::from(st.max_key_per_request).clamp(1, MAX_KEYS_PER_CALL))
}

/// Attempts per enc_keys call: a call whose answer was lost is retried under
/// the same idempotency key, and the KME hands over the same keys (once).
const ENC_KEYS_ATTEMPTS: u32 = 3;

/// `n` new keys of `key_bits` bits shared with `recipient` (this SAE is the
/// master), in calls of at most `batch` keys.
pub(crate) async fn enc_keys(
    client: &EtsiClient,
    recipient: &SaeId,
    n: u64,
    key_bits: u16,
    batch: u64,
) -> Result<Vec<Key>, AppError> {
    let mut keys = Vec::new();
    while (keys.len() as u64) < n {
        let k = (n - keys.len() as u64).min(batch.max(1));
        keys.extend(
            client
                .enc_keys_retrying(
                    recipient.as_str(),
                    k,
                    Some(u64::from(key_bits)),
                    ENC_KEYS_ATTEMPTS,
                )
                .await?,
        );
    }
    Ok(keys)
}

/// The keys `ids` that `sender` (the master) obtained for this SAE, in calls of at
/// most `batch` IDs, each checked to be `key_bits` long as the sender announced.
pub(crate) async fn dec_keys(
    client: &EtsiClient,
    sender: &SaeId,
    ids: &[Uuid],
    key_bits: u16,
    batch: u64,
) -> Result<Vec<Key>, AppError> {
    let mut keys = Vec::with_capacity(ids.len());
    // `batch` is at most MAX_KEYS_PER_CALL, so it fits usize.
    for part in ids.chunks(batch.max(1) as usize) {
        keys.extend(client.dec_keys(sender.as_str(), part).await?);
    }
    let key_bytes = usize::from(key_bits / 8);
    if keys.iter().any(|k| k.material.len() != key_bytes) {
        return Err(AppError::Integrity(format!(
            "the KME's keys are not {key_bits} bits long as the sender announced"
        )));
    }
    Ok(keys)
}

/// Moves a delivered key's material into a [`SecretBytes`] (no copy left behind).
pub(crate) fn qkd_secret(mut key: Key) -> SecretBytes {
    SecretBytes::new(std::mem::take(&mut *key.material))
}

/// An SM4 key from `material`, with the derivation context
/// `label || h || index (u64 BE) || tail`.
pub(crate) fn derive_sm4_key(
    material: &KeyMaterial<'_>,
    label: &[u8],
    h: &Sm3Digest,
    index: u64,
    tail: &[u8],
) -> qkdnet_crypto::Result<Sm4Key> {
    let mut ctx = Vec::with_capacity(label.len() + SM3_LEN + 8 + tail.len());
    ctx.extend_from_slice(label);
    ctx.extend_from_slice(h);
    ctx.extend_from_slice(&index.to_be_bytes());
    ctx.extend_from_slice(tail);
    combine_to_sm4_key(material, &ctx)
}

/// `N` bytes from the operating system's random generator (nonce prefixes,
/// stream IDs, temporary file names).
pub(crate) fn random_array<const N: usize>() -> Result<[u8; N], AppError> {
    let mut a = [0u8; N];
    getrandom::fill(&mut a)
        .map_err(|e| AppError::Internal(format!("operating system random generator: {e}")))?;
    Ok(a)
}
