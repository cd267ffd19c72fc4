//! qkdnet's QKD link layer: the classical post-processing protocol between
//! Alice and Bob, from detection records (or sifted strings) to identical
//! secret keys, over a channel where every message is authenticated.
//!
//! The protocol core ([`auth`], [`msg`], [`block`], [`endpoint`]) is sans-IO:
//! explicit states, frames in and out, randomness from a seeded generator,
//! no clock. [`tcp`] is the thin adapter that runs an endpoint over a socket.
//! The numerics (Cascade, LDPC, Toeplitz hashing, Wegman–Carter tags) come from
//! `qkdnet-postproc`; the decoy-state bounds from `qkdnet-optics`.

pub mod auth;
pub mod block;
pub mod endpoint;
pub mod msg;
pub mod sifted;
pub mod tcp;

/// Errors of the link layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The caller used the API wrongly (a bug or a bad option, not the peer's fault).
    #[error("{0}")]
    Usage(String),
    /// A frame failed authentication, or arrived out of sequence: the channel is compromised.
    #[error("authentication failed: {0}")]
    Authentication(String),
    /// The authentication key pool is empty.
    #[error("authentication key exhausted: the link needs fresh pre-shared key")]
    AuthKeyExhausted,
    /// A message could not be decoded.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The peer sent something inconsistent with the protocol state.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Socket I/O.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}
