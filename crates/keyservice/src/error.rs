//! Errors of the key service. None carries key material.

use qkdnet_media::proto::ProtoError;
use qkdnet_media::{MediaError, proto::RefuseReason};

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KsError {
    /// Bad configuration or arguments.
    #[error("{0}")]
    Config(String),
    /// The store failed (I/O, SQL, a row that does not decode).
    #[error("key service store: {0}")]
    Store(String),
    /// The service refused the request.
    #[error("the key service refused: {0}")]
    Refused(RefuseReason),
    /// A peer sent bytes that are not the protocol.
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    /// The medium failed.
    #[error(transparent)]
    Medium(#[from] MediaError),
    /// Network trouble (connect, read, write, timeout).
    #[error("network: {0}")]
    Net(String),
    /// The QKD network (the KME, over ETSI 014) failed.
    #[error("QKD network: {0}")]
    Kme(String),
}

impl From<qkdnet_terminal::TerminalError> for KsError {
    fn from(e: qkdnet_terminal::TerminalError) -> Self {
        use qkdnet_terminal::TerminalError as T;
        match e {
            T::Config(s) => Self::Config(s),
            T::Refused(r) => Self::Refused(r),
            T::Proto(p) => Self::Proto(p),
            T::Medium(m) => Self::Medium(m),
            T::Net(s) => Self::Net(s),
            T::Kme(s) => Self::Kme(s),
            other => Self::Net(other.to_string()),
        }
    }
}

impl From<rusqlite::Error> for KsError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Store(e.to_string())
    }
}

/// Result with [`KsError`].
pub type Result<T, E = KsError> = core::result::Result<T, E>;
