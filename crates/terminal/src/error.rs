//! What can go wrong on the terminal's side of the key service. None carries
//! key material.

use qkdnet_media::MediaError;
use qkdnet_media::proto::{ProtoError, RefuseReason};

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TerminalError {
    /// Bad configuration or arguments.
    #[error("{0}")]
    Config(String),
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

/// Result with [`TerminalError`].
pub type Result<T, E = TerminalError> = core::result::Result<T, E>;
