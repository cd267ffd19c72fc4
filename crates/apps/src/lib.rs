//! Applications of qkdnet: what an SAE does with keys from its KME.
//!
//! The KME hands out keys (ETSI GS QKD 014, [`qkdnet_kms::client::EtsiClient`]);
//! this crate turns them into protection for something a user cares about. The
//! first application is the sealed file ([`seal`]): a file encrypted for one SAE
//! whose keys never travel with it. The crate composes, and does not implement,
//! cryptography: SM4-GCM chunk streams, the SM3-based key combiner and the one-time
//! pad all come from `qkdnet-crypto`; what lives here is the file format
//! ([`format`]), the order of operations that keeps key consumption and plaintext
//! release safe, and the file handling (temporary outputs, renamed on success).
//!
//! | module | what |
//! |---|---|
//! | [`format`] | the sealed-file header: layout, encoding, bounded parser |
//! | [`seal`] | [`seal::seal`] and [`seal::open`]: modes qkd, hybrid, otp |
//! | [`error`] | [`AppError`] |

#![warn(missing_docs)]

pub mod error;
pub mod format;
pub mod seal;

pub use error::AppError;
pub use format::Mode;
pub use seal::{OpenOptions, OpenReport, SealOptions, SealReport, open, open_with, seal};
