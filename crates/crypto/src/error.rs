//! One error type for the whole crate.
//!
//! Cryptographic failures are deliberately coarse: an authentication failure says
//! *that* a tag or signature did not verify, never *why*, so that an error message
//! cannot become an oracle. Misuse by the caller (a key of the wrong length, a
//! nonce counter that would wrap) is kept apart from "the data or the peer is bad"
//! (a tag or signature that fails), so callers can log the first as a bug and
//! treat the second as an attack or corruption.

use thiserror::Error;

/// Errors from the crypto layer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CryptoError {
    // ---- the caller misused the API ----
    /// A key, nonce or IV had the wrong length.
    #[error("{what} must be {expected} bytes, got {got}")]
    InvalidLength {
        /// Which input was wrong ("SM4 key", "GCM nonce", ...).
        what: &'static str,
        /// The required length in bytes.
        expected: usize,
        /// The length that was supplied.
        got: usize,
    },
    /// A secret input is shorter than the minimum the operation accepts.
    #[error("{what} must be at least {min} bytes, got {got}")]
    KeyTooShort {
        /// Which input was short.
        what: &'static str,
        /// The minimum length in bytes.
        min: usize,
        /// The length that was supplied.
        got: usize,
    },
    /// One-time pad key and data lengths differ (the pad must be exactly as long as the data).
    #[error("one-time pad key is {key} bytes but the data is {data} bytes")]
    PadLengthMismatch {
        /// Key length in bytes.
        key: usize,
        /// Data length in bytes.
        data: usize,
    },
    /// A KDF was asked for more output than it can produce.
    #[error("KDF output of {requested} bytes exceeds the maximum of {max}")]
    KdfOutputTooLong {
        /// Requested length in bytes.
        requested: usize,
        /// Maximum length in bytes.
        max: usize,
    },
    /// A message exceeds what the mode can protect under one key and nonce
    /// (GCM: 2^36 - 32 bytes of plaintext; CTR: the 2^128-block counter; chunk
    /// streams: 2^32 chunks).
    #[error("message or stream too long for {0}")]
    MessageTooLong(&'static str),
    /// An SM2 distinguishing identifier is longer than 8191 bytes (its bit length must fit in 16 bits).
    #[error("SM2 distinguishing identifier is too long")]
    InvalidDistId,
    /// A private key is out of range (zero or not below the group order).
    #[error("invalid private key")]
    InvalidPrivateKey,

    // ---- the data or the peer is bad ----
    /// An AEAD tag did not verify: the ciphertext, AAD, nonce or key is wrong.
    #[error("authentication failed")]
    AuthenticationFailed,
    /// A signature did not verify, or was malformed.
    #[error("signature verification failed")]
    InvalidSignature,
    /// A public key (SM2 point or ML-KEM encapsulation key) could not be decoded.
    #[error("invalid public key")]
    InvalidPublicKey,
    /// An ML-KEM ciphertext had the wrong length.
    #[error("invalid ML-KEM ciphertext")]
    InvalidCiphertext,
}

/// Shorthand for results of this crate.
pub type Result<T, E = CryptoError> = core::result::Result<T, E>;

/// Checks that `got` equals `expected`, naming the input in the error.
pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(CryptoError::InvalidLength {
            what,
            expected,
            got,
        })
    }
}
