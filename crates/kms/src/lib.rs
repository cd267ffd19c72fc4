//! Key management entity (KME) of qkdnet: key pools per peer, a durable key store,
//! the ETSI GS QKD 014 V1.1.1 key delivery API over mutual TLS, and KME-to-KME
//! synchronisation.
//!
//! The crate is shaped around one rule: a key leaves a KME at most once, and the two
//! KMEs of a link always agree on which keys exist and who may have them. Everything
//! that must survive a crash goes through one durable [`store::KeyStore`], whose
//! state transitions (available → reserved for a master/slave SAE pair → delivered)
//! are transactions; everything else (HTTP, TLS, retries) is a thin adapter that can
//! fail at any moment without breaking that rule.
//!
//! One key's path through the crate:
//!
//! 1. The QKD link layer hands a [`block::KeyBlock`] to [`service::Kme::ingest`]. The
//!    block is cut into 256-bit units whose UUIDs are derived identically at both
//!    ends from (link ID, block number, index) ([`block::unit_id`]), and each unit is
//!    owned (may be handed to a master SAE) by exactly one of the two KMEs.
//! 2. A master SAE calls `enc_keys` ([`server`], [`etsi`]). The KME reserves units
//!    in its store, tells the peer KME which unit IDs form which key for which SAE
//!    pair ([`peer`]), and releases the keys to the SAE only once the peer has
//!    acknowledged.
//! 3. The slave SAE calls `dec_keys` at its own KME with the key IDs and gets the same
//!    bytes; anyone else gets 401. Delivered keys are deleted from the store.
//!
//! | module | what |
//! |---|---|
//! | [`block`] | key blocks from the link layer, unit IDs, unit ownership |
//! | [`ids`] | SAE and KME identifiers (validated newtypes, from `qkdnet-etsi`) |
//! | [`store`] | the [`store::KeyStore`] trait and its SQLite and PostgreSQL implementations |
//! | [`etsi`] | ETSI GS QKD 014 JSON objects and their decoders (from `qkdnet-etsi`) |
//! | [`error`] | domain errors |
//! | [`key_id`] | opaque key IDs at the ETSI API (a keyed permutation of unit IDs) |
//! | [`api_error`] | the one mapping from domain errors to ETSI status codes and bodies |
//! | [`clock`] | the wall clock, read in one place (store and link-state database get time passed in) |
//! | [`kme_wire`] | KME-to-KME paths and JSON bodies (ext_keys, relay, void, link state) |
//! | [`kme_core`] | what the neighbour protocol and the relay share: settings, store, peers, counters, background voids |
//! | [`service`] | the KME ([`Kme`]): status, enc_keys, dec_keys, peer reservation and void, key stock |
//! | [`peer`] | the KME-to-KME client (modelled on ETSI GS QKD 020 `ext_keys`) |
//! | [`routing`] | the one widest-shortest-path search (relay and `qkdnet plan`) |
//! | [`lsdb`] | the link-state database (pure; time passed in) |
//! | [`relay`] | [`relay::Relay`]: keys for SAEs on distant KMEs, hop-by-hop one-time-pad relay |
//! | [`identity`] | SAE/KME identity from client certificates (from `qkdnet-etsi`) |
//! | [`tls`] | the rustls server configuration (mutual TLS, X25519MLKEM768) |
//! | [`server`] | the HTTPS server: routes, connection handling, OpenAPI document |
//! | [`config`] | the TOML configuration of a standalone KME |
//! | [`client`], [`connect`] | the SAE side of ETSI GS QKD 014 and `connect.json` (from `qkdnet-etsi`) |
//! | [`pki`] | a small CA for test networks (rcgen) |
//! | `mesh` | in-process KME networks with test keys, for tests and benchmarks (feature `test-util`) |
//! | `testkeys` | seeded *test* key blocks, only when explicitly configured (public with feature `test-util`) |

#![warn(missing_docs)]

pub mod api_error;
pub mod block;
pub mod clock;
pub mod config;
pub mod error;
pub mod key_id;
pub mod kme_core;
pub mod kme_wire;
pub mod lsdb;
#[cfg(feature = "test-util")]
pub mod mesh;
pub mod peer;
pub mod pki;
pub mod relay;
pub mod routing;
pub mod server;
pub mod service;
pub mod store;
#[cfg(feature = "test-util")]
pub mod testkeys;
#[cfg(not(feature = "test-util"))]
mod testkeys;
pub mod tls;

// The client side lives in `qkdnet-etsi`; these paths keep their old names.
pub use qkdnet_etsi::wire as etsi;
pub use qkdnet_etsi::{client, connect, identity, ids};

pub use block::KeyBlock;
pub use error::KmsError;
pub use service::Kme;
pub use store::{KeyStore, StoreError};
