//! Errors of the client side: identifiers, request decoding, TLS set-up, files.
//!
//! The variants mirror the KME's own domain errors of the same name
//! (`qkdnet_kms::KmsError` converts each one to its namesake), so a request that a
//! decoder here refuses gets the same ETSI status whichever side refused it.

/// What the client side refused or failed to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtsiError {
    /// An SAE or KME identifier is malformed.
    #[error("invalid {what} identifier")]
    InvalidId {
        /// "SAE" or "KME".
        what: &'static str,
    },
    /// A request is malformed or asks for something outside the advertised limits.
    #[error("{0}")]
    BadRequest(String),
    /// A key size that is not a whole number of bytes (ETSI 014's own message).
    #[error("size shall be a multiple of 8")]
    SizeNotMultipleOf8,
    /// The request carries an `extension_mandatory` entry this KME does not support.
    #[error("not all extension_mandatory parameters are supported")]
    UnsupportedMandatoryExtension,
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
