//! Applications of qkdnet: what an SAE does with keys from its KME.
//!
//! The KME hands out keys (ETSI GS QKD 014, [`qkdnet_etsi::client::EtsiClient`]);
//! this crate turns them into protection for something a user cares about. The
//! first application is the sealed file ([`mod@seal`]): a file encrypted for one SAE
//! whose keys never travel with it; the second is the live stream ([`stream`]): a
//! TCP connection between two SAEs, rekeyed from the QKD network as it runs. The
//! crate composes, and does not implement, cryptography: SM4-GCM, the SM3-based
//! key combiner and the one-time pad all come from `qkdnet-crypto`; what lives
//! here is the file format ([`mod@format`]) and the stream protocol ([`stream_wire`]),
//! the order of operations that keeps key consumption and plaintext release safe,
//! and the file handling (temporary outputs, renamed on success).
//!
//! | module | what |
//! |---|---|
//! | [`mod@format`] | the sealed-file header: layout, encoding, bounded parser |
//! | [`mod@seal`] | [`seal::seal`] and [`seal::open`]: modes qkd, hybrid, otp |
//! | [`keycache`] | the recipient's encrypted cache of fetched keys: re-opening, and no key lost to a damaged copy |
//! | [`stream`] | [`stream::send`] and [`stream::receive`]: live TCP streams, sans-IO core and tokio adapter |
//! | [`stream_wire`] | the stream handshake and frames: layout, encoding, bounded decoders |
//! | [`error`] | [`AppError`], [`StreamError`] |
//!
//! Both applications spend keys the same way (private module `keys`: `status`,
//! then `enc_keys`/`dec_keys` in batches, SM3-based derivation bound to what the
//! sender announced) and write outputs the same way (private module `files`: a
//! temporary file renamed into place only on success).

#![warn(missing_docs)]

pub mod error;
mod files;
pub mod format;
pub mod keycache;
mod keys;
pub mod seal;
pub mod stream;
pub mod stream_wire;

pub use error::{AppError, StreamError};
pub use format::Mode;
pub use keycache::KeyCache;
pub use seal::{OpenOptions, OpenReport, SealOptions, SealReport, open, open_with, seal};
