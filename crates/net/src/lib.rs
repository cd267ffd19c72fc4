//! qkdnet's network layer: QKD links between node processes, the node daemon
//! that runs a node's links and its KME, network topologies, and the launcher
//! that brings a whole network up on one machine.
//!
//! | module | what |
//! |---|---|
//! | [`quantum`] | the emulated fibre: Bob's detections from Alice's simulator, framed over TCP |
//! | [`session`] | one link session: hello, per-session authentication keys, Alice's and Bob's drivers |
//! | [`server`] | Bob's link port: accepts sessions for all of a node's links |
//! | [`topology`] | topology files and their validation |
//! | [`plan`] | the network planner: a day of key generation, relaying and demand in simulated time |
//! | [`node`] | the node daemon: links + KME + management endpoint (health, status, metrics) |
//! | [`launcher`] | `net up/down/status`: state directory, PKI, ports, one process per node |
//! | [`local`] | both ends of one link in one process over loopback (`qkdnet link run`, tests) |
//!
//! What is simulated: photons, channel and detectors (in Alice's node, see
//! [`quantum`]). What is real: everything else — TCP between processes, the
//! authenticated post-processing, the KMEs, TLS.

pub mod launcher;
pub mod local;
pub mod node;
pub mod plan;
pub mod quantum;
pub mod server;
pub mod session;
pub mod topology;

/// Errors of the network layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// A configuration or topology is invalid.
    #[error("{0}")]
    Config(String),
    /// The peer sent something malformed or unexpected.
    #[error("peer: {0}")]
    Peer(String),
    /// The caller used the API wrongly (a bug, not the peer's fault).
    #[error("{0}")]
    Usage(String),
    /// A bug in this process: a thread panicked or a lock was poisoned.
    #[error("internal error: {0}")]
    Internal(String),
    /// The link protocol failed; the link layer's error says whose fault it was.
    #[error("link: {0}")]
    Link(#[from] qkdnet_link::LinkError),
    /// A key derivation refused its parameters.
    #[error("key derivation: {0}")]
    Crypto(#[from] qkdnet_crypto::CryptoError),
    /// The optics refused a parameter.
    #[error("optics: {0}")]
    Optics(#[from] qkdnet_optics::OpticsError),
    /// The KME failed.
    #[error("KME: {0}")]
    Kms(#[from] qkdnet_kms::KmsError),
    /// Socket or file I/O.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}
