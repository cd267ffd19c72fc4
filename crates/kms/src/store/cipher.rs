//! Key material at rest: every unit encrypted under the node master key.
//!
//! Both stores keep key material in place and delete it by overwriting it
//! (SQLite: 2 KiB chunk rows of 64 units, a unit's 32 bytes zeroed when it is
//! delivered; PostgreSQL: one row per unit), and a unit released by a voided
//! request goes back to the pool with the same bytes. So the cipher works per
//! unit and keeps its size: a unit's 32 bytes are XORed with 32 bytes of SM4-CTR
//! keystream, `SM4_K(group ‖ index ‖ j)` for `j` = 0, 1, where (`group`, `index`)
//! is the unit's fixed place in the store: (block row ID, unit index) in SQLite,
//! (unit `seq`, 0) in PostgreSQL. Neither is ever reused inside a store (SQLite
//! never deletes a `blocks` row, so its row IDs only grow; PostgreSQL's `seq` is an
//! identity column), and every store draws a random 32-byte salt when it is first
//! encrypted, so two stores under one master key (a store moved away and a new one
//! refilled) use unrelated keys: no keystream ever covers two different units.
//! Encryption and decryption happen in memory around the stores' existing batched
//! reads and writes: no extra statement on the hot path, two SM4 block operations
//! per 32-byte unit.
//!
//! `K` (16 bytes) and a 32-byte *key check value* come from HKDF-SM3 (extract with
//! the store's salt, expand with two distinct labels) of the 32-byte node master
//! key. The salt and the check value are kept in the store's metadata; opening a
//! store compares the check value (in constant time) and refuses a store that was
//! encrypted under another master key, or any encrypted store when no key is
//! configured, instead of handing out garbage keys. An unencrypted store (written
//! before this existed, or by a KME without `store_key`) opened with a key is
//! encrypted in place in one transaction at open.
//!
//! **What a copy of the database gives an attacker:** the stores' bookkeeping in
//! the clear (links, block numbers, which units are free, held or delivered, SAE
//! IDs of requests, unit IDs), but no key material: every unit is SM4-CTR
//! ciphertext under a key that exists only where the master key file (or token)
//! is. **Integrity is not protected**, on purpose: an attacker who can *write* the
//! database could garble or swap ciphertexts, but the same attacker can already
//! rewrite who owns which unit in the plain bookkeeping tables, and a MAC over the
//! material alone would not stop that; authenticating the whole state would cost a
//! MAC update on every transition. Tampered material decrypts to wrong keys, which
//! the applications' own authentication (the two ends' keys disagree) detects.
//! The threat addressed is a copied file or backup (issue #18, item 8).
//!
//! The master key comes from a file ([`MasterKey::read_file`]) or from a PKCS#11
//! token, which derives it from a key that never leaves the token
//! ([`super::pkcs11`]); the stores see a [`MasterKey`] either way.

use std::path::Path;

use qkdnet_crypto::kdf::{hkdf_sm3_expand, hkdf_sm3_extract};
use qkdnet_crypto::secret::Sm4Key;
use qkdnet_crypto::sm4::Sm4Block;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use super::StoreError;
use crate::block::UNIT_BYTES;

/// Length of the node master key (and of its file's content).
pub const MASTER_KEY_LEN: usize = 32;

/// Length of a store's salt and of its key check value.
pub(crate) const SALT_LEN: usize = 32;

/// Name of the cipher as recorded in a store's metadata.
pub(crate) const CIPHER_NAME: &str = "sm4-ctr-unit/hkdf-sm3/v1";

const LABEL_KEY: &[u8] = b"qkdnet/kms/store/unit-cipher/v1";
const LABEL_CHECK: &[u8] = b"qkdnet/kms/store/key-check/v1";

/// The node master key: 32 secret bytes, zeroized on drop, never printed.
#[derive(Clone)]
pub struct MasterKey(Zeroizing<[u8; MASTER_KEY_LEN]>);

impl core::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A master key from its bytes.
    pub fn from_bytes(bytes: [u8; MASTER_KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// A master key from a slice of exactly [`MASTER_KEY_LEN`] bytes, copied
    /// straight into zeroized memory.
    pub(crate) fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut key = Zeroizing::new([0u8; MASTER_KEY_LEN]);
        if bytes.len() != MASTER_KEY_LEN {
            return None;
        }
        key.copy_from_slice(bytes);
        Some(Self(key))
    }

    /// Reads a master key file: exactly [`MASTER_KEY_LEN`] bytes, and (on Unix)
    /// readable and writable by its owner only.
    pub fn read_file(path: &Path) -> Result<Self, crate::KmsError> {
        let err =
            |m: String| crate::KmsError::Config(format!("node master key {}: {m}", path.display()));
        let bytes = read_private_file(path).map_err(err)?;
        Self::from_slice(&bytes)
            .ok_or_else(|| err(format!("must hold exactly {MASTER_KEY_LEN} bytes")))
    }

    /// Derives a 16-byte key for another store of the node (the key service's)
    /// with HKDF-SM3: extract with `salt`, expand with `label`. The master key's
    /// bytes never leave this type.
    pub fn derive_sm4(&self, salt: &[u8], label: &[u8]) -> Zeroizing<[u8; 16]> {
        let prk = hkdf_sm3_extract(salt, &[&self.0[..]]);
        let mut k = Zeroizing::new([0u8; 16]);
        hkdf_sm3_expand(&prk, &[label], &mut k[..]).expect("invariant: 16 bytes");
        k
    }

    /// Creates a master key file: 32 bytes from the operating system's CSPRNG,
    /// mode 0600, never overwriting an existing file.
    pub fn create_file(path: &Path) -> Result<(), crate::KmsError> {
        crate::pki::create_random_secret::<MASTER_KEY_LEN>(path)
    }
}

/// Reads a secret file (a master key, a token's PIN) that must be (on Unix)
/// accessible to its owner only; the error says why, without the content.
pub(crate) fn read_private_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| e.to_string())?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "the file is accessible to group or others (mode {:04o}); it must be \
                 readable by the KME's user only: chmod 600 {}",
                mode & 0o7777,
                path.display()
            ));
        }
    }
    Ok(Zeroizing::new(
        std::fs::read(path).map_err(|e| e.to_string())?,
    ))
}

/// The per-unit cipher of one store (master key and that store's salt).
pub(crate) struct UnitCipher(Sm4Block);

impl UnitCipher {
    /// The cipher and the key check value for `salt`.
    pub(crate) fn derive(master: &MasterKey, salt: &[u8]) -> (Self, Zeroizing<[u8; SALT_LEN]>) {
        let prk = hkdf_sm3_extract(salt, &[&master.0[..]]);
        let mut k = Zeroizing::new([0u8; 16]);
        let mut check = Zeroizing::new([0u8; SALT_LEN]);
        // Both lengths are far below HKDF's limit of 255 blocks.
        hkdf_sm3_expand(&prk, &[LABEL_KEY], &mut k[..]).expect("invariant: 16 bytes");
        hkdf_sm3_expand(&prk, &[LABEL_CHECK], &mut check[..]).expect("invariant: 32 bytes");
        let key = Sm4Key::new(*k);
        (Self(Sm4Block::new(&key)), check)
    }

    /// Encrypts or decrypts (the same operation) the unit at (`group`, `index`).
    /// `unit` is one unit's bytes (at most [`UNIT_BYTES`]); `index` < 2^48.
    pub(crate) fn apply(&self, group: u64, index: u64, unit: &mut [u8]) {
        debug_assert!(unit.len() <= UNIT_BYTES);
        let mut ks = [0u8; 16];
        for (j, part) in unit.chunks_mut(16).enumerate() {
            ks[..8].copy_from_slice(&group.to_be_bytes());
            ks[8..14].copy_from_slice(&index.to_be_bytes()[2..]);
            ks[14..].copy_from_slice(&(j as u16).to_be_bytes());
            self.0.encrypt_block(&mut ks);
            for (b, k) in part.iter_mut().zip(ks.iter()) {
                *b ^= k;
            }
        }
        ks.zeroize();
    }
}

/// What a store records about its encryption: salt and key check value.
pub(crate) struct KeyRecord {
    pub salt: Vec<u8>,
    pub check: Vec<u8>,
}

/// What opening a store does about encryption.
pub(crate) enum Plan {
    /// The store and the configuration have no key: material stays in the clear.
    Plain,
    /// The store is encrypted under the configured key.
    Use(UnitCipher),
    /// The store is in the clear and a key is configured: encrypt it now and
    /// record `record`.
    Encrypt(UnitCipher, KeyRecord),
}

/// Decides [`Plan`] from the store's record and the configured key. `what`
/// names the store in errors.
pub(crate) fn plan(
    what: &str,
    record: Option<KeyRecord>,
    master: Option<&MasterKey>,
) -> Result<Plan, StoreError> {
    match (record, master) {
        (None, None) => Ok(Plan::Plain),
        (Some(_), None) => Err(StoreError::MasterKey(format!(
            "{what} is encrypted under a node master key, and none is configured \
             (set store_key to the node's master key file)"
        ))),
        (Some(r), Some(m)) => {
            let (cipher, check) = UnitCipher::derive(m, &r.salt);
            if r.check.len() != SALT_LEN || !bool::from(check[..].ct_eq(&r.check[..])) {
                return Err(StoreError::MasterKey(format!(
                    "{what}: this store was encrypted under a different node master key; \
                     configure the key it was written with (store_key), or move the store \
                     away and let the links refill a new one"
                )));
            }
            Ok(Plan::Use(cipher))
        }
        (None, Some(m)) => {
            let mut salt = vec![0u8; SALT_LEN];
            getrandom::fill(&mut salt)
                .map_err(|e| StoreError::Backend(format!("no randomness: {e}")))?;
            let (cipher, check) = UnitCipher::derive(m, &salt);
            Ok(Plan::Encrypt(
                cipher,
                KeyRecord {
                    salt,
                    check: check.to_vec(),
                },
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: SM4-CTR over the whole unit with the counter block
    /// group ‖ index ‖ 0, incremented as a 128-bit big-endian number.
    #[test]
    fn unit_keystream_is_sm4_ctr_from_the_unit_position() {
        let master = MasterKey::from_bytes([9; 32]);
        let (c, _) = UnitCipher::derive(&master, &[1; 32]);
        let prk = hkdf_sm3_extract(&[1; 32], &[&[9u8; 32][..]]);
        let mut k = [0u8; 16];
        hkdf_sm3_expand(&prk, &[LABEL_KEY], &mut k).expect("hkdf");
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&7u64.to_be_bytes());
        iv[8..14].copy_from_slice(&5u64.to_be_bytes()[2..]);
        let mut reference = [0u8; 32];
        qkdnet_crypto::sm4::Sm4Ctr::new(&Sm4Key::new(k), &iv)
            .apply_keystream(&mut reference)
            .expect("ctr");
        let mut unit = [0u8; 32];
        c.apply(7, 5, &mut unit);
        assert_eq!(unit, reference);
        // Another position, another salt: other keystreams.
        let mut other = [0u8; 32];
        c.apply(7, 6, &mut other);
        assert_ne!(other, unit);
        let (c2, _) = UnitCipher::derive(&master, &[2; 32]);
        let mut other = [0u8; 32];
        c2.apply(7, 5, &mut other);
        assert_ne!(other, unit);
    }

    #[test]
    fn the_check_value_tells_keys_apart() {
        let a = MasterKey::from_bytes([1; 32]);
        let b = MasterKey::from_bytes([2; 32]);
        let Ok(Plan::Encrypt(_, rec)) = plan("s", None, Some(&a)) else {
            panic!("a plain store with a key is encrypted")
        };
        let again = KeyRecord {
            salt: rec.salt.clone(),
            check: rec.check.clone(),
        };
        assert!(matches!(plan("s", Some(again), Some(&a)), Ok(Plan::Use(_))));
        let again = KeyRecord {
            salt: rec.salt.clone(),
            check: rec.check.clone(),
        };
        let Err(e) = plan("s", Some(again), Some(&b)) else {
            panic!("another key accepted")
        };
        assert!(e.to_string().contains("different node master key"), "{e}");
        let Err(e) = plan("s", Some(rec), None) else {
            panic!("no key accepted")
        };
        assert!(e.to_string().contains("none is configured"), "{e}");
        assert!(matches!(plan("s", None, None), Ok(Plan::Plain)));
    }
}
