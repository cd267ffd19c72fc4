//! The KME-to-KME wire: paths and JSON bodies of the peer API.
//!
//! Both sides of every KME-to-KME call use these types: the caller
//! ([`crate::peer::PeerClient`]), the server routes ([`crate::server`]), the
//! neighbour protocol ([`crate::service`], modelled on ETSI GS QKD 020 `ext_keys`)
//! and the trusted-node relay ([`crate::relay`]). Kept in one module so that none
//! of those has to import another for a message type. The server bounds every
//! body before decoding it; the fuzz target
//! `kme_peer_json` decodes each of them.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | POST | [`EXT_KEYS_PATH`] | [`ExtKeysReserve`] | [`ExtKeysAck`] |
//! | POST | [`EXT_KEYS_VOID_PATH`] | [`ExtKeysVoid`] | [`ExtKeysVoidReply`] |
//! | POST | [`RELAY_PATH`] | [`RelayForward`] | [`RelayAck`] |
//! | POST | [`RELAY_VOID_PATH`] | [`RelayVoid`] | [`ExtKeysVoidReply`] |
//! | GET | [`LSDB_PATH`] | — | `Vec<`[`LinkState`]`>` |

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{KmeId, SaeId};
use crate::store::KeyLayout;

/// Path of the reservation endpoint.
pub const EXT_KEYS_PATH: &str = "/api/v1/kme/ext_keys";
/// Path of the void endpoint.
pub const EXT_KEYS_VOID_PATH: &str = "/api/v1/kme/ext_keys/void";

/// Path of the relay endpoint.
pub const RELAY_PATH: &str = "/api/v1/kme/relay";
/// Path of the relay void endpoint.
pub const RELAY_VOID_PATH: &str = "/api/v1/kme/relay/void";
/// Path of the link-state endpoint.
pub const LSDB_PATH: &str = "/api/v1/kme/lsdb";
/// Longest route accepted (KMEs, both ends included).
pub const MAX_ROUTE_LEN: usize = 256;
/// One key of a reservation.
#[allow(non_snake_case)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExtKey {
    /// Key ID (= first unit ID).
    pub key_ID: Uuid,
    /// Size in bits.
    pub size: u32,
    /// Units forming the key, in order.
    pub unit_IDs: Vec<Uuid>,
}

/// A reservation: these keys go to `slave_SAE_ID`, reserved by `master_SAE_ID`.
#[allow(non_snake_case)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExtKeysReserve {
    /// Request ID chosen by the reserving KME.
    pub request_ID: Uuid,
    /// Master SAE (attached to the reserving KME).
    pub master_SAE_ID: SaeId,
    /// Slave SAE (attached to the receiving KME).
    pub slave_SAE_ID: SaeId,
    /// The keys.
    pub keys: Vec<ExtKey>,
}

/// Acknowledgement of a reservation.
#[allow(non_snake_case)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExtKeysAck {
    /// The request acknowledged.
    pub request_ID: Uuid,
    /// Always `"ack"`.
    pub status: String,
}

/// Void of a reservation.
#[allow(non_snake_case)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExtKeysVoid {
    /// The request to void.
    pub request_ID: Uuid,
}

/// Outcome of a void.
#[allow(non_snake_case)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExtKeysVoidReply {
    /// The request voided.
    pub request_ID: Uuid,
    /// Whether the receiver had accepted the reservation.
    pub was_accepted: bool,
    /// Keys returned to the pool; keys of an accepted reservation not listed here
    /// were already delivered to the slave SAE.
    pub voided_key_IDs: Vec<Uuid>,
}

impl From<&KeyLayout> for ExtKey {
    fn from(k: &KeyLayout) -> Self {
        ExtKey {
            key_ID: k.key_id,
            size: k.size_bits,
            unit_IDs: k.unit_ids.clone(),
        }
    }
}

impl From<ExtKey> for KeyLayout {
    fn from(k: ExtKey) -> Self {
        KeyLayout {
            key_id: k.key_ID,
            size_bits: k.size,
            unit_ids: k.unit_IDs,
        }
    }
}

/// One key of a relay message.
#[allow(non_snake_case)]
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayKey {
    /// The relayed key: its ID, size and the units of the first link that form
    /// it (the last KME stores it under the same IDs).
    pub key: ExtKey,
    /// This hop's key: units of the link between sender and receiver, owned by
    /// the sender. On the first hop it is the relayed key itself.
    pub hop_key: ExtKey,
    /// Base64 of key ⊕ hop key; absent on the first hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ciphertext: Option<String>,
}

impl std::fmt::Debug for RelayKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayKey")
            .field("key", &self.key.key_ID)
            .field("hop_key", &self.hop_key.key_ID)
            .finish_non_exhaustive()
    }
}

/// A relay hop: `route[hop - 1]` sends to `route[hop]`.
#[allow(non_snake_case)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayForward {
    /// End-to-end request ID chosen by the origin KME.
    pub request_ID: Uuid,
    /// KMEs from the master's to the slave's.
    pub route: Vec<KmeId>,
    /// Index in `route` of the receiver (≥ 1).
    pub hop: u32,
    /// Master SAE (attached to `route[0]`).
    pub master_SAE_ID: SaeId,
    /// Slave SAE (attached to the last KME of `route`).
    pub slave_SAE_ID: SaeId,
    /// The keys.
    pub keys: Vec<RelayKey>,
    /// Multipath, second share: the IDs (one per key, in order) of the first
    /// shares already waiting at the last KME, which stores the XOR of the two
    /// under these IDs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub combine_with: Option<Vec<Uuid>>,
}

/// Void of a relay hop (travels on to the end of the route).
#[allow(non_snake_case)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayVoid {
    /// End-to-end request ID.
    pub request_ID: Uuid,
    /// The route of the request.
    pub route: Vec<KmeId>,
    /// Index in `route` of the receiver (≥ 1).
    pub hop: u32,
}

/// Acknowledgement of a relay hop: the keys wait at the end of the route.
#[allow(non_snake_case)]
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayAck {
    /// The request.
    pub request_ID: Uuid,
    /// Always `"ack"`.
    pub status: String,
}

/// How many units one KME owns on one of its links.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinkAvail {
    /// The KME at the other end.
    pub peer: KmeId,
    /// Available units owned by the advertising KME.
    pub units: u64,
}

/// One KME's link-state advertisement.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LinkState {
    /// The advertising KME.
    pub kme: KmeId,
    /// Sequence number (the advertiser's clock, ms); newer replaces older.
    pub seq: u64,
    /// Its links.
    pub links: Vec<LinkAvail>,
}
