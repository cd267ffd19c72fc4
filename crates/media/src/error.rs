//! One error type for the media crate.
//!
//! A medium is read from a place an attacker or a failing disk may have changed, so
//! most of these errors describe bad bytes, and each says *which part* of the medium
//! is bad (header, counter record, charge log, one key slot) without revealing
//! anything secret. They fall in three groups, kept apart so a caller can act on
//! them: the caller misused the API (a charge too large for the medium, an empty
//! PIN), the medium's bytes are bad (truncated, corrupt, wrong PIN), and the
//! environment failed (I/O, another process holds the medium). A wrong PIN and a
//! header that belongs to another medium are one error on purpose: the medium key
//! simply does not unwrap, and nothing tells the two apart.
//!
//! A medium in a PKCS#11 token adds a fourth group: the token refused or failed
//! (no such module or token, a PIN the token refused, a call that returned an
//! error). Those errors name the `CKR_…` code the token gave, never a PIN or a
//! key byte.

use thiserror::Error;

/// Errors from media.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MediaError {
    // ---- the caller misused the API ----
    /// The owner string is empty, too long or contains control characters.
    #[error("invalid medium owner: {0}")]
    InvalidOwner(&'static str),
    /// The charger's SAE ID is empty, too long or contains control characters.
    #[error("invalid charger ID: {0}")]
    InvalidCharger(&'static str),
    /// The PIN is empty.
    #[error("the PIN must not be empty")]
    EmptyPin,
    /// Argon2id parameters outside what this format accepts.
    #[error("invalid Argon2id parameters: {0}")]
    InvalidKdfParams(&'static str),
    /// A capacity of zero or above the format's maximum.
    #[error("a medium holds between 1 and {max} unused keys, {got} were asked for")]
    InvalidCapacity {
        /// The capacity asked for.
        got: u64,
        /// The largest capacity the format allows.
        max: u64,
    },
    /// A charge-log capacity of zero or above the format's maximum.
    #[error("a charge log holds between 1 and {max} records, {got} were asked for")]
    InvalidLogCapacity {
        /// The capacity asked for.
        got: u64,
        /// The largest capacity the format allows.
        max: u64,
    },
    /// A charge with no keys.
    #[error("a charge needs at least one key")]
    EmptyCharge,
    /// The keys offered do not fit next to the unused keys already on the medium.
    #[error("the medium has room for {free} more keys, {requested} were offered")]
    CapacityExceeded {
        /// Keys offered.
        requested: u64,
        /// Keys the medium can still take.
        free: u64,
    },
    /// The charge log is full and its oldest record still has unused keys.
    #[error(
        "the charge log is full ({records} records) and its oldest charge still has unused keys"
    )]
    ChargeLogFull {
        /// The log's capacity in records.
        records: u32,
    },
    /// Every charged key has been used.
    #[error("no unused key left on the medium")]
    Exhausted,

    // ---- the medium's bytes are bad ----
    /// The file does not start with the medium magic.
    #[error("not a qkdnet medium (bad magic)")]
    NotAMedium,
    /// The medium was written in a format version this build does not read.
    #[error("medium format version {0} is not supported (this build reads version 1)")]
    UnsupportedVersion(u16),
    /// The file ends before a part the medium needs.
    #[error("the medium is truncated: {what} needs {needed} bytes, there are {got}")]
    Truncated {
        /// The part that is cut off.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        got: u64,
    },
    /// The header's checksum or one of its fields is wrong.
    #[error("the medium header is corrupt: {0}")]
    CorruptHeader(&'static str),
    /// The medium key did not unwrap under the key derived from the PIN.
    #[error("wrong PIN, or not the medium its header claims (the medium key did not unwrap)")]
    WrongPin,
    /// Neither copy of the counter record verifies.
    #[error("neither copy of the medium's counter record verifies: the medium is corrupt")]
    CorruptState,
    /// A charge record that the counter record says is live does not verify.
    #[error("charge record {record} of the medium is corrupt")]
    CorruptLog {
        /// The record's number.
        record: u32,
    },
    /// Records that verify but contradict each other (a bug, or a forger holding the key).
    #[error("the medium's records are inconsistent: {0}")]
    Inconsistent(&'static str),
    /// A key slot failed its integrity check. The key is discarded: the counter has
    /// moved past it and the slot is erased.
    #[error("key {index} failed its integrity check and was discarded")]
    CorruptSlot {
        /// The key's index.
        index: u64,
    },
    /// A key slot is erased although the counter says it is unused: the counter was
    /// rolled back (its newest copy lost). The counter has moved past it.
    #[error("key {index} was already used (its slot is erased): the counter had rolled back")]
    ErasedSlot {
        /// The key's index.
        index: u64,
    },
    /// A token object's label is not in the form this version writes.
    #[error("a token object of the medium has a malformed label: {0}")]
    BadLabel(&'static str),
    /// No key group on the token holds a key the counter says is unused: it was
    /// erased and the counter then rolled back, or it was lost with a charge
    /// that failed after it committed. The counter has moved past it.
    #[error(
        "key {index} is not on the token (erased before the counter rolled back, or lost): \
         the counter has moved past it"
    )]
    KeyMissing {
        /// The key's index.
        index: u64,
    },

    // ---- the PKCS#11 token ----
    /// The PKCS#11 module could not be loaded or initialised.
    #[error("PKCS#11 module {module}: {reason}")]
    Pkcs11Module {
        /// The module's path.
        module: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The token is not there, or there are several with its label.
    #[error("PKCS#11 token '{label}': {reason}")]
    TokenUnavailable {
        /// The token's label.
        label: String,
        /// What went wrong.
        reason: String,
    },
    /// The token refused the user PIN.
    #[error("the token refused the PIN (CKR_PIN_INCORRECT): nothing was read or changed")]
    PinIncorrect,
    /// The token's user PIN is locked.
    #[error("the token's user PIN is locked (CKR_PIN_LOCKED): unlock it with its security officer")]
    PinLocked,
    /// A PKCS#11 call failed.
    #[error("{op}: {rv}")]
    Pkcs11 {
        /// What was being done.
        op: &'static str,
        /// The call and the `CKR_…` code it returned.
        rv: String,
    },
    /// The token holds no medium (with the ID asked for).
    #[error(
        "the token holds no medium{}",
        .id.map(|id| format!(" {id}")).unwrap_or_default()
    )]
    NoMedium {
        /// The ID asked for, if any.
        id: Option<uuid::Uuid>,
    },
    /// The token holds several media and none was chosen.
    #[error("the token holds {} media: choose one by its ID", .ids.len())]
    SeveralMedia {
        /// Their IDs.
        ids: Vec<uuid::Uuid>,
    },
    /// The token holds a medium with this ID already.
    #[error("the token already holds a medium {0}")]
    MediumExists(uuid::Uuid),

    // ---- the environment ----
    /// Another process has the medium open.
    #[error("the medium is in use by another process")]
    Busy,
    /// Reading or writing the medium failed.
    #[error("{op}: {error}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The operating system's error (in the message, so not also a
        /// `source`: a chain printer would show it twice).
        error: std::io::Error,
    },
    /// The operating system's random number generator failed.
    #[error("no randomness from the operating system: {0}")]
    Randomness(String),
}

impl MediaError {
    /// Wraps an I/O error with what was being done.
    pub(crate) fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |error| Self::Io { op, error }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = MediaError> = core::result::Result<T, E>;
