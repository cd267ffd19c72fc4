//! Keys at rest in the key service's store: each sealed with SM4-GCM.
//!
//! The store holds every subscriber's unused medium keys and the keys of open
//! sessions; a copy of the database must not give them away. Each is sealed on
//! its own under `K = HKDF-SM3(salt = the store's random salt, ikm = node master
//! key, info = "qkdnet/keyservice/store/v1")` with a random 96-bit nonce and the
//! key's place as associated data (medium ID and index, or session ID), so a
//! sealed key moved to another row does not open. 60 bytes a key: nonce 12,
//! ciphertext 32, tag 16. Unlike the KME's units (which keep their size and are
//! overwritten in place, hence a keystream), these rows are written once and
//! deleted, so an AEAD with random nonces fits and also detects tampering.
//!
//! A *check value* (HKDF-SM3 with another label) kept beside the salt lets the
//! store refuse, at open, a master key that is not the one it was written with.

use qkdnet_crypto::gcm::{GCM_NONCE_LEN, GCM_TAG_LEN, Sm4Gcm};
use qkdnet_crypto::secret::Sm4Key;
use qkdnet_kms::store::MasterKey;
use qkdnet_media::Key256;
use qkdnet_media::medium::KEY_LEN;
use zeroize::Zeroizing;

use crate::error::KsError;

/// Length of a sealed key.
pub const SEALED_LEN: usize = GCM_NONCE_LEN + KEY_LEN + GCM_TAG_LEN;

const LABEL_KEY: &[u8] = b"qkdnet/keyservice/store/v1";
const LABEL_CHECK: &[u8] = b"qkdnet/keyservice/store-check/v1";
const AAD_MEDIUM: &[u8] = b"qkdnet/keyservice/medium-key/v1";
const AAD_SESSION: &[u8] = b"qkdnet/keyservice/session-key/v1";

/// Seals and opens keys for one store.
pub struct Sealer {
    gcm: Sm4Gcm,
    check: [u8; 16],
}

impl Sealer {
    /// The sealer for a store with `salt`, under `master`.
    pub fn new(master: &MasterKey, salt: &[u8]) -> Self {
        let k = master.derive_sm4(salt, LABEL_KEY);
        let key = Sm4Key::from_slice(&k[..]).expect("invariant: 16 bytes");
        let check = *master.derive_sm4(salt, LABEL_CHECK);
        Self {
            gcm: Sm4Gcm::new(&key),
            check,
        }
    }

    /// The check value to keep beside the salt.
    pub fn check_value(&self) -> [u8; 16] {
        self.check
    }

    /// Refuses a store written under another master key.
    pub fn verify_check(&self, stored: &[u8]) -> Result<(), KsError> {
        use subtle::ConstantTimeEq;
        if stored.len() == self.check.len() && bool::from(self.check.ct_eq(stored)) {
            Ok(())
        } else {
            Err(KsError::Config(
                "the store was written under another master key (wrong --master-key file?)".into(),
            ))
        }
    }

    /// Seals medium `medium`'s key at `index`.
    pub fn seal_medium_key(&self, medium: &uuid::Uuid, index: u64, key: &Key256) -> Vec<u8> {
        self.seal(&medium_aad(medium, index), key)
    }

    /// Opens medium `medium`'s key at `index`.
    pub fn open_medium_key(
        &self,
        medium: &uuid::Uuid,
        index: u64,
        sealed: &[u8],
    ) -> Result<Key256, KsError> {
        self.open(&medium_aad(medium, index), sealed)
    }

    /// Seals a session key.
    pub fn seal_session_key(&self, session_id: &[u8], key: &Key256) -> Vec<u8> {
        self.seal(&[AAD_SESSION, session_id].concat(), key)
    }

    /// Opens a session key.
    pub fn open_session_key(&self, session_id: &[u8], sealed: &[u8]) -> Result<Key256, KsError> {
        self.open(&[AAD_SESSION, session_id].concat(), sealed)
    }

    fn seal(&self, aad: &[u8], key: &Key256) -> Vec<u8> {
        let mut nonce = [0u8; GCM_NONCE_LEN];
        crate::nonce::fill_public(&mut nonce);
        let mut buf = Zeroizing::new(*key.expose_secret());
        let tag = self
            .gcm
            .seal_in_place_detached(&nonce, aad, &mut buf[..])
            .expect("invariant: 32 bytes are far below the GCM limit");
        let mut out = Vec::with_capacity(SEALED_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf[..]);
        out.extend_from_slice(&tag);
        out
    }

    fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Key256, KsError> {
        let bad = || KsError::Store("a stored key does not open (tampered store?)".into());
        if sealed.len() != SEALED_LEN {
            return Err(bad());
        }
        let (nonce, rest) = sealed.split_at(GCM_NONCE_LEN);
        let (ct, tag) = rest.split_at(KEY_LEN);
        let nonce: [u8; GCM_NONCE_LEN] = nonce.try_into().map_err(|_| bad())?;
        let tag: [u8; GCM_TAG_LEN] = tag.try_into().map_err(|_| bad())?;
        let mut buf = Zeroizing::new([0u8; KEY_LEN]);
        buf.copy_from_slice(ct);
        self.gcm
            .open_in_place_detached(&nonce, aad, &mut buf[..], &tag)
            .map_err(|_| bad())?;
        Ok(Key256::new(*buf))
    }
}

fn medium_aad(medium: &uuid::Uuid, index: u64) -> Vec<u8> {
    [AAD_MEDIUM, medium.as_bytes(), &index.to_be_bytes()].concat()
}
