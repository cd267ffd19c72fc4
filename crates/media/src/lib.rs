//! Quantum security media: a SIM, a secure card or a file charged with quantum keys.
//!
//! A terminal that cannot reach a KME when it needs a key (a phone placing a call,
//! a meter waking up) carries its keys with it. At a *charging point* the medium is
//! filled with a batch of keys from the QKD network, each numbered; the peer side
//! (the KME or the service the terminal talks to) keeps the same keys under the
//! same numbers. Later the terminal spends them one at a time, in order, to
//! authenticate or to unwrap session keys. A key is used once and destroyed.
//!
//! The crate is shaped around that one rule. [`Medium`] is the contract every
//! backend keeps (a file, or a PKCS#11 token): keys go in as batches with
//! a [`ChargeRecord`] and come out one by one from [`Medium::take_next`], which
//! makes the consumption counter durable *before* it returns the key, so a crash
//! can lose a key but never hand it out twice. The file backend keeps its bytes in
//! a versioned format described in [`mod@format`], which is pure (bytes in, values
//! out, no I/O) so it can be fuzzed and tested without a disk; [`mod@file`] is the
//! thin layer that reads, writes and syncs in a crash-safe order. The token
//! backend is split the same way: [`mod@token`] says what each token object
//! holds and decides, without a token, what a crash left behind;
//! [`mod@pkcs11`] makes the PKCS#11 calls in a crash-safe order. Keys are
//! [`Key256`] (zeroized on drop, never printed); status reports counts and charge
//! history, never key bytes. A medium's errors are one typed enum, [`MediaError`],
//! that says which part of a medium is bad; the key-service protocol has its
//! own, [`ProtoError`], which maps to the refusal a terminal is sent.
//!
//! | module | what |
//! |---|---|
//! | [`medium`] | the [`Medium`] trait, keys, charge records, status |
//! | [`mod@format`] | file format v1: layout table, encoders, bounded decoders, charge planning |
//! | [`mod@file`] | [`FileMedium`]: the medium in one file, write-ahead counter, `flock` |
//! | [`memory`] | [`MemoryMedium`]: in memory, for tests and benchmarks (not durable) |
//! | [`mod@token`] | the token's objects v1: labels, recovery rules, charge planning |
//! | [`mod@pkcs11`] | [`Pkcs11Medium`]: the medium in a PKCS#11 token (SoftHSM2 in the tests), keys in groups, counter in two labels |
//! | [`proto`] | the key-service protocol core (sans-IO): challenge, authenticated request, session key grants |
//! | [`error`] | [`MediaError`] |
//!
//! Both backends are for Unix (they use `flock`; the file backend `pread`/`pwrite`).

#![warn(missing_docs)]

pub mod error;
pub mod file;
pub mod format;
pub mod medium;
pub mod memory;
pub mod pkcs11;
pub mod proto;
pub mod token;

pub use error::{MediaError, Result};
pub use file::FileMedium;
pub use format::{KdfParams, MediumSpec};
pub use medium::{ChargeEntry, ChargeRecord, Key256, Medium, MediumStatus};
pub use memory::MemoryMedium;
pub use pkcs11::Pkcs11Medium;
pub use proto::{Message, ProtoError};
