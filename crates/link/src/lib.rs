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
///
/// Three kinds, kept apart so that a caller can tell who is at fault: the
/// caller ([`LinkError::Usage`]), the peer or the channel (`Authentication`,
/// `AuthKeyExhausted`, `Malformed`, `Protocol`, `PeerCascade`, `PeerTag`),
/// and this side's own computation, where a post-processing or estimation
/// kernel refused this side's data or parameters (`Estimation`, `Cascade`,
/// `Ldpc`, `LdpcFrame`, `Verification`, `Amplification`, `Bits`); those keep
/// the kernel's error as their source. In a block, every error ends the block
/// (its text becomes the abort reason, see [`block`]).
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
    /// Cascade refused the peer's parity request (at Alice) or parity answer
    /// (at Bob): the peer sent something inconsistent.
    #[error("protocol error: Cascade: {0}")]
    PeerCascade(#[source] qkdnet_postproc::cascade::CascadeError),
    /// The peer's verification tag cannot be one (its length is out of range).
    #[error("protocol error: {0}")]
    PeerTag(#[source] qkdnet_postproc::verify::VerifyError),
    /// Parameter estimation refused this side's counts or settings (the
    /// finite-key bound of `qkdnet_optics::keyrate::finite`).
    #[error("estimation: {0}")]
    Estimation(#[from] qkdnet_optics::OpticsError),
    /// Cascade could not be set up or finished on this side's key.
    #[error("Cascade: {0}")]
    Cascade(#[from] qkdnet_postproc::cascade::CascadeError),
    /// No LDPC code fits this block's error rate and frame length.
    #[error("LDPC: {0}")]
    Ldpc(#[from] qkdnet_postproc::ldpc::LdpcError),
    /// An LDPC frame did not decode where that ends the block (offline mode):
    /// more errors than the code corrects, or a syndrome not of this code.
    #[error("LDPC frame {frame} did not decode: {source}")]
    LdpcFrame {
        /// Index of the frame in the block.
        frame: usize,
        /// The decoder's error.
        source: qkdnet_postproc::ldpc::LdpcError,
    },
    /// No verification tag reaches ε_cor for this key.
    #[error("verification: {0}")]
    Verification(#[from] qkdnet_postproc::verify::VerifyError),
    /// Privacy amplification refused its input (empty key, seed length).
    #[error("privacy amplification: {0}")]
    Amplification(#[from] qkdnet_postproc::pa::PaError),
    /// A bit-vector operation on this side's key was out of range.
    #[error("bits: {0}")]
    Bits(#[from] qkdnet_postproc::bits::BitsError),
    /// Socket I/O.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}
