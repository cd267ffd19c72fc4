//! The client side of ETSI GS QKD 014 for qkdnet: everything an application (SAE)
//! needs to take keys from its KME, and nothing of the KME itself.
//!
//! Every service of the network (sealed files, streams, calls, gateways, the key
//! service) is an SAE. They depend on this crate, never on the KME's server crate
//! (`qkdnet-kms`), so an application does not pull in key stores, database drivers
//! or the HTTP server. The KME depends on this crate too: the wire types, the
//! identifiers and the identity model are one definition shared by both ends.
//!
//! | module | what |
//! |---|---|
//! | [`ids`] | SAE and KME identifiers (validated newtypes) |
//! | [`wire`] | ETSI GS QKD 014 JSON objects, their bounded decoders and request validation |
//! | [`identity`] | SAE/KME identity from a certificate's `sae:ID` / `kme:ID` URI SAN |
//! | [`tls`] | TLS material, the client configuration (the server must prove to be the expected KME) |
//! | [`pq`] | the X25519MLKEM768 hybrid key exchange every TLS connection of qkdnet negotiates |
//! | [`https`] | the one HTTPS client transport, bounded in time and size |
//! | [`client`] | the SAE's client: [`client::EtsiClient`] |
//! | [`connect`] | `connect.json`: each SAE's KME, its expected identity and TLS files |
//! | [`error`] | the crate's error type |

#![warn(missing_docs)]

pub mod client;
pub mod connect;
pub mod error;
pub mod https;
pub mod identity;
pub mod ids;
pub mod pq;
pub mod tls;
pub mod wire;

pub use client::{ClientError, EtsiClient, Key};
pub use connect::ConnectFile;
pub use error::EtsiError;
pub use ids::{KmeId, SaeId};
