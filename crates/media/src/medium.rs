//! What every medium offers, whatever holds the keys.
//!
//! A medium is charged with keys at a charging point and later spends them one at a
//! time in the terminal, in index order, each exactly once. The trait is the
//! contract a backend keeps; it is shaped so that a PKCS#11 token (or a SIM applet)
//! can implement it as well as a file: no method exposes a storage layout, keys go
//! in as a batch and come out one by one, and the only secret that ever crosses the
//! interface is the key handed out by [`Medium::take_next`]. Opening (a path and a
//! PIN, or a token slot and a PIN) is backend-specific and is not part of it.
//!
//! The rule that makes a medium safe is the order inside `take_next`: the
//! consumption counter is advanced *durably* before the key is returned, so a crash
//! (or a pulled card) can lose a key but never hand the same key out twice. Status
//! is bookkeeping only: counts, indices, who charged when; never key bytes.

use uuid::Uuid;

use crate::error::{MediaError, Result};
use qkdnet_crypto::secret::SecretKey;

/// A 256-bit quantum key as charged into and taken from a medium.
pub type Key256 = SecretKey<32>;

/// Length of a [`Key256`] in bytes.
pub const KEY_LEN: usize = 32;

/// Longest owner string, in bytes (UTF-8).
pub const MAX_OWNER_LEN: usize = 256;

/// Longest charger SAE ID, in bytes (UTF-8).
pub const MAX_CHARGER_LEN: usize = 64;

/// Who charged keys and when: what the charging point records with each batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeRecord {
    charger: String,
    charged_at: u64,
}

impl ChargeRecord {
    /// A record for a charge by the charging point's SAE `charger` at `charged_at`
    /// (seconds since the Unix epoch, passed in: the medium reads no clock).
    /// `charger` must be 1..=64 bytes without control characters.
    pub fn new(charger: impl Into<String>, charged_at: u64) -> Result<Self> {
        let charger = charger.into();
        check_text(&charger, MAX_CHARGER_LEN).map_err(MediaError::InvalidCharger)?;
        Ok(Self {
            charger,
            charged_at,
        })
    }

    /// The charging point's SAE ID.
    pub fn charger(&self) -> &str {
        &self.charger
    }

    /// When the charge happened (seconds since the Unix epoch).
    pub fn charged_at(&self) -> u64 {
        self.charged_at
    }
}

/// One charge as the medium remembers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeEntry {
    /// Who charged and when.
    pub record: ChargeRecord,
    /// Number of keys charged.
    pub count: u64,
    /// Index of the first key of the charge.
    pub first: u64,
    /// Index of the last key of the charge.
    pub last: u64,
}

/// What a medium says about itself. Holds no key material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediumStatus {
    /// The medium's ID.
    pub id: Uuid,
    /// The medium's owner (e.g. a SIP URI).
    pub owner: String,
    /// Most unused keys the medium can hold at once.
    pub capacity: u64,
    /// Keys charged over the medium's life (the next charge's first index).
    pub charged: u64,
    /// Keys used (the next key's index).
    pub used: u64,
    /// Unused keys: `charged - used`.
    pub remaining: u64,
    /// Keys the medium can still take: `capacity - remaining`.
    pub free: u64,
    /// The charges the medium still remembers, oldest first. A backend may forget
    /// charges whose keys are all used.
    pub charges: Vec<ChargeEntry>,
}

/// A security medium: charged with numbered keys, each taken once, in order.
pub trait Medium {
    /// The medium's ID.
    fn id(&self) -> Uuid;

    /// The medium's owner (e.g. the SIP URI of the terminal's user).
    fn owner(&self) -> &str;

    /// Most unused keys the medium can hold at once.
    fn capacity(&self) -> u64;

    /// Counts and charge history; never key bytes.
    fn status(&self) -> Result<MediumStatus>;

    /// Appends `keys` with consecutive indices after the last charged key, all or
    /// nothing, and records the charge. Fails with
    /// [`MediaError::CapacityExceeded`] if they do not fit next to the unused keys.
    fn charge(&mut self, keys: &[Key256], record: ChargeRecord) -> Result<ChargeEntry>;

    /// Hands out the next unused key and its index. The medium has advanced its
    /// counter durably before this returns, so the key is never handed out again,
    /// even after a crash. [`MediaError::Exhausted`] when no key is left.
    fn take_next(&mut self) -> Result<(u64, Key256)>;
}

/// Checks that a charge of `count` keys is not empty and fits next to the
/// `unused` keys of a medium that holds `capacity`; returns the count.
pub(crate) fn check_charge(count: usize, capacity: u64, unused: u64) -> Result<u64> {
    if count == 0 {
        return Err(MediaError::EmptyCharge);
    }
    let free = capacity - unused;
    let requested = count as u64;
    if requested > free {
        return Err(MediaError::CapacityExceeded { requested, free });
    }
    Ok(requested)
}

/// Checks a text field: 1..=`max` bytes, no control characters.
pub(crate) fn check_text(s: &str, max: usize) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("empty");
    }
    if s.len() > max {
        return Err("too long");
    }
    if s.chars().any(char::is_control) {
        return Err("contains control characters");
    }
    Ok(())
}
