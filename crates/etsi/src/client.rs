//! The SAE side of ETSI GS QKD 014: one application's client to its own KME.
//!
//! An application (SAE) only ever talks to the KME it is attached to, over mutual
//! TLS with its own `sae:ID` certificate; the KME learns who is calling from that
//! certificate, never from the request. The client therefore holds one TLS
//! identity and one base URL, and offers the three calls of the specification:
//! [`EtsiClient::status`], [`EtsiClient::enc_keys`] (as master SAE) and
//! [`EtsiClient::dec_keys`] (as slave SAE).
//!
//! Everything the KME answers is untrusted input: answers are bounded in size and
//! time, key IDs are parsed with [`crate::wire::parse_key_id`], keys are decoded
//! from base64 straight into zeroizing buffers, and the client checks that the KME
//! gave what was asked for (the number of keys, their size, the requested IDs)
//! before returning anything. Keys come back as [`Key`], whose `Debug` prints the
//! ID and the length only. The KME's certificate is verified against the
//! network's CA and the host name of the URL, and must be the certificate of the
//! KME the client expects (`kme:ID`): a fake KME holding any other certificate of
//! the network (another SAE's, another node's KME) fails the handshake.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hyper::{Method, StatusCode};
use serde::de::DeserializeOwned;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::EtsiError;
use crate::https::HttpsClient;
use crate::ids::{KmeId, SaeId};
use crate::tls::{KeyExchange, TlsMaterial, client_config};
use crate::wire::{
    ErrorBody, KeyContainer, KeyIdEntry, KeyIds, KeyRequest, REQUEST_ID_EXTENSION, Status,
    format_key_id, parse_key_id,
};

/// Largest KME answer read, in bytes (1024 keys of 8192 bits in base64 fit with
/// room to spare).
const MAX_ANSWER_BYTES: usize = 4 << 20;

/// Base path of the ETSI GS QKD 014 key API.
const KEYS_PATH: &str = "/api/v1/keys";

/// One key delivered by the KME. No `Clone`, no `Display`; `Debug` prints the ID
/// and the length, never the material, which is zeroized on drop.
pub struct Key {
    /// Key ID.
    pub id: Uuid,
    /// Key material.
    pub material: Zeroizing<Vec<u8>>,
}

impl core::fmt::Debug for Key {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("len", &self.material.len())
            .finish_non_exhaustive()
    }
}

/// Why a call to the KME failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No answer: connection refused, TLS failure, timeout, oversized answer. The
    /// outcome of an enc_keys call is then unknown.
    #[error("KME unavailable: {0}")]
    Unavailable(String),
    /// The KME answered with an error status and (normally) an ETSI error body.
    #[error("KME answered {status}: {message}")]
    Api {
        /// HTTP status (400, 401, 503, …).
        status: u16,
        /// The `message` of the ETSI error body.
        message: String,
    },
    /// The KME answered 200 with something that is not what was asked for: bad
    /// JSON, bad base64, a bad or unexpected key ID, a wrong number or size of keys.
    #[error("malformed KME answer: {0}")]
    Malformed(String),
    /// The caller asked for something that cannot be sent (invalid SAE ID, zero
    /// keys, no key IDs, duplicate key IDs); nothing was sent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

/// One SAE's client to its own KME.
#[derive(Clone)]
pub struct EtsiClient {
    url: String,
    kme: KmeId,
    http: HttpsClient,
}

impl core::fmt::Debug for EtsiClient {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("EtsiClient")
            .field("kme_url", &self.url)
            .field("kme", &self.kme)
            .finish_non_exhaustive()
    }
}

fn sae_path(id: &str, what: &str) -> Result<String, ClientError> {
    let id = SaeId::new(id)
        .map_err(|_| ClientError::InvalidRequest(format!("{id:?} is not a valid SAE ID")))?;
    Ok(format!("{KEYS_PATH}/{id}/{what}"))
}

impl EtsiClient {
    /// A client to KME `kme` at `kme_url` (`https://host:port`), presenting the SAE
    /// certificate of `tls` and trusting the CA of `tls`. The server must prove to
    /// be KME `kme` ([`crate::tls::client_config`]) and negotiate the hybrid
    /// post-quantum key exchange. Every call (connect, TLS, request, answer) must
    /// complete within `timeout`.
    pub fn new(
        kme_url: &str,
        kme: &KmeId,
        tls: &TlsMaterial,
        timeout: Duration,
    ) -> Result<Self, EtsiError> {
        Self::with_key_exchange(kme_url, kme, tls, timeout, KeyExchange::default())
    }

    /// As [`EtsiClient::new`] with an explicit key-exchange policy.
    pub fn with_key_exchange(
        kme_url: &str,
        kme: &KmeId,
        tls: &TlsMaterial,
        timeout: Duration,
        kx: KeyExchange,
    ) -> Result<Self, EtsiError> {
        let cfg = client_config(tls, kme.clone(), kx)?;
        let http = HttpsClient::new("KME", kme_url, cfg, timeout, MAX_ANSWER_BYTES)?;
        Ok(Self {
            url: kme_url.trim_end_matches('/').to_owned(),
            kme: kme.clone(),
            http,
        })
    }

    /// The KME this client talks to.
    pub fn kme_id(&self) -> &KmeId {
        &self.kme
    }

    /// The KME's base URL.
    pub fn kme_url(&self) -> &str {
        &self.url
    }

    async fn call<R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<R, ClientError> {
        let (status, answer) = self
            .http
            .call(method, path, body)
            .await
            .map_err(|e| ClientError::Unavailable(format!("{}: {}", self.url, e.0)))?;
        // The answer may hold keys in base64: keep it in a buffer zeroized on drop.
        let answer = Zeroizing::new(Vec::from(answer));
        if status != StatusCode::OK {
            let message = match serde_json::from_slice::<ErrorBody>(&answer) {
                Ok(b) => b.message,
                Err(_) => "(no ETSI error body)".to_owned(),
            };
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&answer).map_err(|e| ClientError::Malformed(e.to_string()))
    }

    /// Get status (ETSI GS QKD 014 §5.1) for keys shared with `slave_sae`.
    pub async fn status(&self, slave_sae: &str) -> Result<Status, ClientError> {
        let path = sae_path(slave_sae, "status")?;
        self.call(Method::GET, &path, None).await
    }

    /// Get key (§5.2): `number` new keys shared with `slave_sae`, of `size_bits`
    /// bits each (the KME's default size if `None`). This SAE is the master.
    pub async fn enc_keys(
        &self,
        slave_sae: &str,
        number: u64,
        size_bits: Option<u64>,
    ) -> Result<Vec<Key>, ClientError> {
        self.enc_keys_as(slave_sae, number, size_bits, None).await
    }

    /// [`EtsiClient::enc_keys`] that survives a lost answer: the request carries
    /// a fresh idempotency key (the `qkdnet_request_id` extension, optional) and
    /// is retried, up to `attempts` times in all, when no answer came or the KME
    /// said to retry (503). A qkdnet KME answers a retry with the keys of the
    /// first attempt if it delivered them, once; other KMEs ignore the extension
    /// (the keys of an unanswered attempt are then lost, as without it).
    pub async fn enc_keys_retrying(
        &self,
        slave_sae: &str,
        number: u64,
        size_bits: Option<u64>,
        attempts: u32,
    ) -> Result<Vec<Key>, ClientError> {
        self.enc_keys_idempotent(slave_sae, number, size_bits, Uuid::new_v4(), attempts)
            .await
    }

    /// [`EtsiClient::enc_keys_retrying`] under an idempotency key the caller
    /// chose (and may keep, to ask for the same answer again within the KME's
    /// replay window; only this SAE can, over its own mutual TLS).
    pub async fn enc_keys_idempotent(
        &self,
        slave_sae: &str,
        number: u64,
        size_bits: Option<u64>,
        id: Uuid,
        attempts: u32,
    ) -> Result<Vec<Key>, ClientError> {
        let mut delay = Duration::from_millis(200);
        let mut left = attempts.max(1);
        loop {
            left -= 1;
            match self
                .enc_keys_as(slave_sae, number, size_bits, Some(id))
                .await
            {
                Err(ClientError::Unavailable(_) | ClientError::Api { status: 503, .. })
                    if left > 0 =>
                {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                r => return r,
            }
        }
    }

    async fn enc_keys_as(
        &self,
        slave_sae: &str,
        number: u64,
        size_bits: Option<u64>,
        request_id: Option<Uuid>,
    ) -> Result<Vec<Key>, ClientError> {
        let path = sae_path(slave_sae, "enc_keys")?;
        if number == 0 {
            return Err(ClientError::InvalidRequest(
                "number of keys must be at least 1".into(),
            ));
        }
        if size_bits.is_some_and(|s| s == 0 || !s.is_multiple_of(8)) {
            return Err(ClientError::InvalidRequest(
                "key size must be a positive multiple of 8 bits".into(),
            ));
        }
        let req = KeyRequest {
            number: Some(number),
            size: size_bits,
            extension_optional: request_id.map(|id| {
                let mut ext = serde_json::Map::new();
                ext.insert(
                    REQUEST_ID_EXTENSION.into(),
                    serde_json::Value::String(format_key_id(&id)),
                );
                vec![ext]
            }),
            ..KeyRequest::default()
        };
        let body = serde_json::to_vec(&req)
            .map_err(|e| ClientError::InvalidRequest(format!("encode: {e}")))?;
        let container: KeyContainer = self.call(Method::POST, &path, Some(body)).await?;
        let keys = decode_keys(&container)?;
        if keys.len() as u64 != number {
            return Err(ClientError::Malformed(format!(
                "asked for {number} keys, got {}",
                keys.len()
            )));
        }
        if let Some(bits) = size_bits {
            check_size(&keys, bits)?;
        }
        Ok(keys)
    }

    /// Get key with key IDs (§5.3): the keys `key_ids` that `master_sae` obtained
    /// with enc_keys naming this SAE as slave, in the order of `key_ids`.
    pub async fn dec_keys(
        &self,
        master_sae: &str,
        key_ids: &[Uuid],
    ) -> Result<Vec<Key>, ClientError> {
        let path = sae_path(master_sae, "dec_keys")?;
        if key_ids.is_empty() {
            return Err(ClientError::InvalidRequest("no key IDs given".into()));
        }
        let wanted: HashSet<Uuid> = key_ids.iter().copied().collect();
        if wanted.len() != key_ids.len() {
            return Err(ClientError::InvalidRequest("duplicate key IDs".into()));
        }
        let req = KeyIds {
            key_IDs: key_ids
                .iter()
                .map(|id| KeyIdEntry {
                    key_ID: format_key_id(id),
                    key_ID_extension: None,
                })
                .collect(),
            key_IDs_extension: None,
        };
        let body = serde_json::to_vec(&req)
            .map_err(|e| ClientError::InvalidRequest(format!("encode: {e}")))?;
        let container: KeyContainer = self.call(Method::POST, &path, Some(body)).await?;
        let mut keys: Vec<Option<Key>> = key_ids.iter().map(|_| None).collect();
        for k in decode_keys(&container)? {
            let slot = key_ids
                .iter()
                .position(|id| *id == k.id)
                .ok_or_else(|| ClientError::Malformed(format!("unrequested key ID {}", k.id)))?;
            if keys[slot].replace(k).is_some() {
                return Err(ClientError::Malformed("a key ID appears twice".into()));
            }
        }
        keys.into_iter()
            .zip(key_ids)
            .map(|(k, id)| k.ok_or_else(|| ClientError::Malformed(format!("key {id} missing"))))
            .collect()
    }
}

/// Decodes every entry of a key container: canonical UUID, padded base64, every
/// ID distinct (what enc_keys and dec_keys check before anything else).
pub fn decode_keys(c: &KeyContainer) -> Result<Vec<Key>, ClientError> {
    let mut seen = HashSet::new();
    c.keys
        .iter()
        .map(|e| {
            let id = parse_key_id(&e.key_ID)
                .map_err(|_| ClientError::Malformed("key_ID is not a UUID".into()))?;
            if !seen.insert(id) {
                return Err(ClientError::Malformed(format!("key ID {id} twice")));
            }
            let mut material = Zeroizing::new(Vec::with_capacity(base64::decoded_len_estimate(
                e.key.len(),
            )));
            STANDARD
                .decode_vec(e.key.as_bytes(), &mut material)
                .map_err(|_| ClientError::Malformed(format!("key {id}: invalid base64")))?;
            if material.is_empty() {
                return Err(ClientError::Malformed(format!("key {id} is empty")));
            }
            Ok(Key { id, material })
        })
        .collect()
}

fn check_size(keys: &[Key], bits: u64) -> Result<(), ClientError> {
    match keys.iter().find(|k| k.material.len() as u64 * 8 != bits) {
        Some(k) => Err(ClientError::Malformed(format!(
            "key {} has {} bits, asked for {bits}",
            k.id,
            k.material.len() * 8
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::KeyEntry;

    fn container(entries: &[(&str, &str)]) -> KeyContainer {
        KeyContainer {
            keys: entries
                .iter()
                .map(|(id, key)| KeyEntry {
                    key_ID: (*id).to_owned(),
                    key_ID_extension: None,
                    key: (*key).to_owned(),
                    key_extension: None,
                })
                .collect(),
            key_container_extension: None,
        }
    }

    const ID: &str = "550e8400-e29b-41d4-a716-446655440000";

    #[test]
    fn decodes_padded_base64_and_canonical_ids() {
        let keys = decode_keys(&container(&[(ID, "AAECAw==")])).expect("valid");
        assert_eq!(keys[0].material.as_slice(), &[0, 1, 2, 3]);
        assert_eq!(keys[0].id.to_string(), ID);
        let dbg = format!("{:?}", keys[0]);
        assert!(dbg.contains("len: 4") && !dbg.contains("[0, 1"), "{dbg}");
    }

    #[test]
    fn refuses_malformed_entries() {
        for (id, key) in [
            ("not-a-uuid", "AAECAw=="),
            ("550e8400e29b41d4a716446655440000", "AAECAw=="), // not hyphenated
            (ID, "AAECAw"),                                   // unpadded
            (ID, "AA*CAw=="),
            (ID, ""),
        ] {
            assert!(
                matches!(
                    decode_keys(&container(&[(id, key)])),
                    Err(ClientError::Malformed(_))
                ),
                "{id} {key}"
            );
        }
        assert!(decode_keys(&container(&[(ID, "AAECAw=="), (ID, "AAECAw==")])).is_err());
    }
}
