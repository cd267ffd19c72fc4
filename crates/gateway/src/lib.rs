//! The quantum security gateway: an IP tunnel between two sites whose keys come
//! from the QKD network.
//!
//! Each gateway is an SAE of the network. The *initiator* takes a 256-bit key
//! from its KME over ETSI GS QKD 014 (`enc_keys`) and offers its ID on the tunnel;
//! the *responder* fetches the same key by ID from its own KME (`dec_keys`), which
//! only hands it to the named slave SAE. Each key keys one epoch of SM4-GCM
//! security associations (ESP-like packets over UDP, anti-replay window),
//! replaced by time and by bytes, make-before-break, and the tunnel fails closed
//! when keys stop coming. IP packets travel through a TUN device.
//!
//! | module | what |
//! |---|---|
//! | [`wire`] | data and control datagrams on the wan (sans-IO, fuzzed) |
//! | [`sa`] | epoch keys from a QKD key; sealing and opening packets (sans-IO) |
//! | [`keyctl`] | rekeying, fail-closed lifetime, restart recovery (sans-IO) |
//! | [`keymgr`] | the key manager: keyctl with a clock, the KME and an installer |
//! | [`config`] | the TOML configuration |
//! | [`run`] | the running gateway: TUN, UDP, KME, metrics |
//! | [`wg`] | the WireGuard agent: QKD preshared keys for a wireguard-go peer |
//!
//! What is real and what is not: the tunnel, its cryptography, the KME protocol
//! and the traffic are real; the QKD keys come from whatever network the KMEs
//! belong to (in qkdnet, links simulated from physical parameters). No ML-KEM
//! hybrid yet.

#![warn(missing_docs)]

pub mod config;
pub mod keyctl;
pub mod keymgr;
pub mod run;
pub mod sa;
pub mod wg;
pub mod wire;
