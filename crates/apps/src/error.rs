//! Errors of the applications.
//!
//! The variants separate what the user should do about a failure: fix the command
//! (`InvalidInput`, `WrongRecipient`), fix the setup (`Setup`), retry later or ask the
//! KME's operator (`Client`), find out who else opened the file (`KeysUnavailable`),
//! or distrust the file (`Format`, `Integrity`). An
//! integrity failure never says more than where the file stopped making sense.
//!
//! Live streams have their own enum, [`StreamError`], because a connection fails in
//! ways a file does not (a frame replayed or dropped, the peer hanging up before
//! the end) and because the sans-IO core ([`crate::stream`]) must not depend on
//! what the adapter does (KME calls, files). Like the crypto layer it keeps "the
//! peer misbehaved" apart from "the caller misused the API".

use qkdnet_crypto::CryptoError;
use qkdnet_etsi::EtsiError;
use qkdnet_etsi::client::ClientError;

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
    Setup(#[from] EtsiError),
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
    /// The KME no longer has (some of) a sealed file's keys and the key cache has
    /// none either: the file was opened before, or another copy used its keys.
    #[error("{0}")]
    KeysUnavailable(String),
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
    /// A live stream failed (see [`StreamError`]).
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// A worker task failed.
    #[error("internal: {0}")]
    Internal(String),
}

/// Why a live stream (`qkdnet msg send`/`listen`) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    // ---- the peer (or the network) misbehaved ----
    /// The bytes are not the stream protocol (bad magic, version, length, field).
    #[error("not a valid qkdnet stream: {0}")]
    Malformed(String),
    /// The handshake names another recipient than the listening SAE.
    #[error("the stream is addressed to SAE {recipient}, not to {me}")]
    WrongRecipient {
        /// The recipient named in the handshake.
        recipient: String,
        /// The SAE listening.
        me: String,
    },
    /// The handshake names a sender the receiver does not accept streams from.
    #[error("SAE {sender} is not among the senders this receiver accepts")]
    SenderNotAllowed {
        /// The sender named in the handshake.
        sender: String,
    },
    /// A frame arrived out of sequence: replayed, reordered or frames dropped.
    #[error(
        "frame {got} arrived where frame {expected} was due (frames replayed, reordered or dropped)"
    )]
    Sequence {
        /// The sequence number due.
        expected: u64,
        /// The sequence number received.
        got: u64,
    },
    /// A frame does not authenticate: modified, or the keys do not match.
    #[error("frame {seq} does not authenticate (modified in transit, or keys that do not match)")]
    Authentication {
        /// Its sequence number.
        seq: u64,
    },
    /// The connection ended before the authenticated end of the stream.
    #[error("the stream was cut short: {0}")]
    Truncated(String),
    /// An authenticated frame that is not allowed here (a peer bug or an attack on
    /// the implementation, not on the channel).
    #[error("stream protocol violation: {0}")]
    Protocol(String),
    /// The receiver did not confirm the stream; it may not have accepted it.
    #[error("the receiver did not confirm the stream: {0}")]
    Unconfirmed(String),
    // ---- the caller misused the API ----
    /// Called in the wrong state or with bad arguments (a bug, not bad data).
    #[error("stream API misuse: {0}")]
    Misuse(String),
    /// Misuse of the crypto layer (a bug, not bad data).
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
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
