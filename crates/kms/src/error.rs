//! Domain errors of the KME.
//!
//! One enum for everything the KME logic can refuse, named after what went wrong
//! rather than after an HTTP status: the HTTP layer is only one of its callers (the
//! link layer calling [`crate::Kme::ingest`] is another). The mapping to ETSI GS QKD
//! 014 status codes and messages lives in exactly one place, [`crate::api_error`].
//! Variants separate the caller's misuse (bad request, not authorised) from a peer
//! that misbehaved and from local failures.

use crate::store::StoreError;

/// What the KME refused or failed to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KmsError {
    /// An SAE or KME identifier is malformed.
    #[error("invalid {what} identifier")]
    InvalidId {
        /// "SAE" or "KME".
        what: &'static str,
    },
    /// A key block from the link layer is malformed.
    #[error("invalid key block: {0}")]
    InvalidBlock(&'static str),
    /// A request is malformed or asks for something outside the advertised limits.
    #[error("{0}")]
    BadRequest(String),
    /// A key size that is not a whole number of bytes (ETSI 014's own message).
    #[error("size shall be a multiple of 8")]
    SizeNotMultipleOf8,
    /// The request carries an `extension_mandatory` entry this KME does not support.
    #[error("not all extension_mandatory parameters are supported")]
    UnsupportedMandatoryExtension,
    /// One or more key IDs of a dec_keys request are unknown here.
    #[error("one or more keys specified are not found on KME")]
    KeysNotFound,
    /// The caller may not do this (wrong SAE, not attached here, not the named slave).
    #[error("unauthorized: {0}")]
    Unauthorized(&'static str),
    /// The pool for the requested peer holds too few keys.
    #[error("not enough key material: {available} units available, {requested} needed")]
    Exhausted {
        /// Units available.
        available: u64,
        /// Units the request needs.
        requested: u64,
    },
    /// The peer KME could not be reached or did not answer in time.
    #[error("peer KME unavailable: {0}")]
    PeerUnavailable(String),
    /// The peer KME answered but refused or answered nonsense.
    #[error("peer KME refused: {0}")]
    PeerRejected(String),
    /// A relayed key could not cross a link of its route (the origin KME
    /// reroutes around `link`).
    #[error("key relay failed on link {}-{}: {reason}", .link.0, .link.1)]
    RelayFailed {
        /// The link (from, to) where the relay stopped.
        link: (crate::ids::KmeId, crate::ids::KmeId),
        /// Why.
        reason: String,
    },
    /// The request cannot be served now but may be on a retry (an earlier
    /// request with the same idempotency key is still in progress).
    #[error("{0}")]
    RetryLater(String),
    /// No route to the slave SAE's KME (links down or out of key).
    #[error("{0}")]
    NoRoute(String),
    /// The key store failed or refused.
    #[error("key store: {0}")]
    Store(#[from] StoreError),
    /// A configuration file or value is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// Certificates or keys could not be loaded, or TLS could not be set up.
    #[error("TLS: {0}")]
    Tls(String),
    /// A socket or file operation failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl From<qkdnet_etsi::EtsiError> for KmsError {
    fn from(e: qkdnet_etsi::EtsiError) -> Self {
        use qkdnet_etsi::EtsiError as E;
        match e {
            E::InvalidId { what } => Self::InvalidId { what },
            E::BadRequest(m) => Self::BadRequest(m),
            E::SizeNotMultipleOf8 => Self::SizeNotMultipleOf8,
            E::UnsupportedMandatoryExtension => Self::UnsupportedMandatoryExtension,
            E::Config(m) => Self::Config(m),
            E::Tls(m) => Self::Tls(m),
            E::Io(e) => Self::Io(e),
            other => Self::Config(other.to_string()),
        }
    }
}
