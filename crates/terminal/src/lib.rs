//! The terminal's side of the key service of quantum security media, apart
//! from the service itself so that a terminal (a call edge, a phone's key
//! module, an IoT device) links only the protocol, its medium and a socket —
//! not the service's stores.
//!
//! | module | what |
//! |---|---|
//! | [`client`] | the terminal ([`client::Terminal`]: open or join a session) and the charging point ([`client::Charger`]) |
//! | [`wire`] | frames over a byte stream (shared with the service's front end) |
//! | [`error`] | [`TerminalError`] |
//!
//! The protocol itself (frames, tags, grants) is [`qkdnet_media::proto`]; the
//! service is `qkdnet-keyservice`.

#![warn(missing_docs)]

pub mod client;
pub mod error;
pub mod wire;

pub use error::{Result, TerminalError};
