//! Errors of the applications.
//!
//! The variants separate what the user should do about a failure: fix the command
//! (`InvalidInput`, `WrongRecipient`), fix the setup (`Kms`), retry later or ask the
//! KME's operator (`Client`), or distrust the file (`Format`, `Integrity`). An
//! integrity failure never says more than where the file stopped making sense.

use qkdnet_crypto::CryptoError;
use qkdnet_kms::KmsError;
use qkdnet_kms::client::ClientError;

/// Why sealing or opening failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    /// The caller asked for something impossible (bad options, identity mismatch,
    /// a message too long for the mode).
    #[error("{0}")]
    InvalidInput(String),
    /// Configuration or TLS set-up failed (connect file, certificates).
    #[error(transparent)]
    Kms(#[from] KmsError),
    /// The KME could not be reached or refused.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The input is not a sealed file this build can read.
    #[error("not a valid sealed file: {0}")]
    Format(String),
    /// The sealed file was modified, truncated, reordered or extended, or the keys
    /// do not match it. No plaintext was released.
    #[error("integrity check failed: {0}")]
    Integrity(String),
    /// The file is sealed for another SAE.
    #[error("the file is sealed for SAE {sealed_for}, not for {as_sae}")]
    WrongRecipient {
        /// The recipient named in the header.
        sealed_for: String,
        /// The SAE that tried to open it.
        as_sae: String,
    },
    /// Misuse of the crypto layer (a bug, not bad data).
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A worker task failed.
    #[error("internal: {0}")]
    Internal(String),
}

impl AppError {
    /// An I/O error with context.
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        AppError::Io {
            what: what.into(),
            source,
        }
    }
}
