//! The key service of quantum security media: terminals that carry charged
//! keys (a SIM, a card, a file) obtain session keys from it over an untrusted
//! network; charging points fill media with keys from the QKD network and hand
//! the service the same keys by ID.
//!
//! | module | what |
//! |---|---|
//! | [`core`] | the rules, sans-IO: who gets a key, what is written ([`core::decide_grant`], [`core::decide_charge`]) |
//! | [`sqlite`] | the durable store (SQLite, WAL, `synchronous=FULL`), keys sealed at rest ([`seal`]) |
//! | [`postgres`] | the store in PostgreSQL, shared by several front ends (row locks per medium) |
//! | [`records`] | what stores and server exchange: the request, session-key source, listings |
//! | [`store`] | the server's handle: SQLite's writer thread (group commit, answers after the commit) or PostgreSQL |
//! | [`server`] | TCP front end: challenge, request, answer; charging; metrics |
//! | [`qkd`] | session keys from the QKD network (ETSI 014), CSPRNG when there is none |
//! | [`client`] | the terminal and the charging point (re-exported from `qkdnet-terminal`, which a terminal links alone) |
//! | [`wire`] | frames over a byte stream (from `qkdnet-terminal`) |
//!
//! The protocol itself (frames, tags, grants) is [`qkdnet_media::proto`].

#![warn(missing_docs)]

pub mod core;
pub mod error;
pub mod nonce;
pub mod postgres;
pub mod qkd;
pub mod records;
pub mod seal;
pub mod server;
pub mod sqlite;
pub mod store;

pub use error::{KsError, Result};
pub use qkdnet_terminal::{TerminalError, client, wire};
