//! The durable key store behind a trait.
//!
//! The store is the only place where the exactly-once rule is enforced, so every
//! operation here is one state transition, done as one transaction, and the
//! callers above never hold key state that the store does not also hold. A unit of
//! key material moves through:
//!
//! ```text
//!  ingest ──► available ──reserve──► reserved (master side, pending peer ack) ──confirm──► deleted
//!                │   ▲                     │ release (after the peer voided)   │
//!                │   └─────────────────────┘                         stock ─► stocked ──take_stock──► deleted
//!                └──accept (peer's reservation)──► reserved for slave SAE ──take──► deleted
//!                                                      │ void (peer asks) ──► available
//! ```
//!
//! Requests are remembered by ID (with a tombstone when voided), which makes
//! `accept` and `void` idempotent under retries and makes a late `accept` after a
//! `void` fail instead of resurrecting keys. The trait returns boxed futures so that
//! the server can hold an `Arc<dyn KeyStore>` and either implementation can slot in
//! without generics spreading through the crate: [`SqliteStore`] (embedded, the
//! default) or [`PostgresStore`] (a database server, for a KME whose keys should live
//! on one). Both make the same transitions (SQLite with a leaner schema tuned
//! for its single writer, see [`sqlite`]); the tests in
//! `tests/store.rs` run one body against each. Both keep every unit's key
//! material encrypted under the node master key when one is configured, see
//! [`cipher`].

use std::future::Future;
use std::pin::Pin;

use uuid::Uuid;
use zeroize::Zeroizing;

use crate::block::KeyUnit;
use crate::ids::{KmeId, SaeId};

pub mod cipher;
mod error;
pub mod pkcs11;
pub mod postgres;
pub mod sqlite;

pub use cipher::MasterKey;
pub use error::StoreError;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// The end-to-end relay request that a master-side request starts, and its
/// route: what a restarted origin KME needs to void a relay along every hop
/// (a void to the first hop alone would leave the keys stored at the far end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoidRoute {
    /// The relay's end-to-end request ID.
    pub request_id: Uuid,
    /// KMEs from this one (the origin) to the slave's.
    pub route: Vec<KmeId>,
}

impl VoidRoute {
    /// The stored form: `UUID KME,KME,…` (KME IDs contain no comma or space).
    pub fn encode(&self) -> String {
        let route: Vec<&str> = self.route.iter().map(KmeId::as_str).collect();
        format!("{} {}", self.request_id.hyphenated(), route.join(","))
    }

    /// Parses [`VoidRoute::encode`]'s form.
    pub fn decode(s: &str) -> Result<Self, StoreError> {
        let bad = || StoreError::Backend("corrupt relay route in store".into());
        let (id, route) = s.split_once(' ').ok_or_else(bad)?;
        let request_id = Uuid::try_parse(id).map_err(|_| bad())?;
        let route = route
            .split(',')
            .map(|k| KmeId::new(k).map_err(|_| bad()))
            .collect::<Result<Vec<_>, _>>()?;
        if route.len() < 2 {
            return Err(bad());
        }
        Ok(VoidRoute { request_id, route })
    }
}

/// How long an answered request's keys are kept for a replay, counted from the
/// reservation (ms).
pub const REPLAY_WINDOW_MS: u64 = 10 * 60 * 1000;

/// A replay asked for by an SAE's retry.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    /// The replay key the requests were reserved under ([`Reservation::replay_key`]).
    pub replay_key: Uuid,
    /// Master SAE retrying.
    pub master: SaeId,
    /// Slave SAE it names.
    pub slave: SaeId,
    /// Key size it asks for.
    pub size_bits: u32,
    /// Number of keys it asks for.
    pub number: u32,
    /// Now (Unix ms).
    pub now_unix_ms: u64,
}

/// What the store knows of the requests reserved under an SAE's replay key.
/// Requests that were voided (never delivered) do not count: a key whose every
/// request was voided is [`Replay::Unknown`]. In order: another request's
/// parameters → `Mismatch`; a request delivered already → `Spent`; answered
/// requests → `Keys` (requests still pending beside them are failed attempts
/// being voided); pending ones only → `InProgress`.
#[non_exhaustive]
pub enum Replay {
    /// Nothing delivered under this key: serve it as a new request.
    Unknown,
    /// Answered before: the same keys, now deleted here. One list per answered
    /// request, in reservation order: one for a key from a neighbour or relayed
    /// over one route, two for a multipath key (the caller XORs the second into
    /// the first, whose key IDs the SAE was given).
    Keys(Vec<Vec<DeliveredKey>>),
    /// A request under this key is reserved but not answered yet (in progress,
    /// or left by a crash until the background void settles it): retry later.
    InProgress,
    /// Replayed once already, or past the replay window.
    Spent,
    /// The ID was used for another SAE pair, key size or number of keys.
    Mismatch,
}

impl Replay {
    /// The outcome decided by the states of the (not voided) requests under a
    /// key, in the order [`Replay`] gives; `None`: replay the answered ones.
    pub(crate) fn unless_answered(spent: bool, pending: bool, answered: bool) -> Option<Replay> {
        match (spent, answered, pending) {
            (true, _, _) => Some(Replay::Spent),
            (false, true, _) => None,
            (false, false, true) => Some(Replay::InProgress),
            (false, false, false) => Some(Replay::Unknown),
        }
    }
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Replay::Unknown => f.write_str("Unknown"),
            Replay::Keys(shares) => {
                let n: Vec<usize> = shares.iter().map(Vec::len).collect();
                write!(f, "Keys({n:?} keys)")
            }
            Replay::InProgress => f.write_str("InProgress"),
            Replay::Spent => f.write_str("Spent"),
            Replay::Mismatch => f.write_str("Mismatch"),
        }
    }
}

/// A boxed future returned by [`KeyStore`] methods.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A block's units, ready to be stored.
pub struct IngestBatch {
    /// The peer KME of the link.
    pub peer: KmeId,
    /// The link ID.
    pub link_id: String,
    /// The block number.
    pub block_number: u64,
    /// ε_sec of the block (kept for audit).
    pub eps_sec: f64,
    /// ε_cor of the block (kept for audit).
    pub eps_cor: f64,
    /// When the block was produced (Unix ms).
    pub created_unix_ms: u64,
    /// The units.
    pub units: Vec<KeyUnit>,
    /// Capacity of this peer's pool in units; the block is refused beyond it.
    pub capacity_units: u64,
}

/// A master-side reservation request.
#[derive(Debug, Clone)]
pub struct Reservation {
    /// Request ID (shared with the peer KME).
    pub request_id: Uuid,
    /// The peer KME whose pool is used.
    pub peer: KmeId,
    /// Master SAE (the caller of enc_keys).
    pub master: SaeId,
    /// Slave SAE named in enc_keys.
    pub slave: SaeId,
    /// Number of keys.
    pub number: u32,
    /// Size of each key in bits (a multiple of 8).
    pub size_bits: u32,
    /// Now, Unix ms.
    pub now_unix_ms: u64,
    /// For the origin of a relayed key: how to void the request along its whole
    /// route if this KME restarts with it pending (kept with the request).
    pub void_route: Option<VoidRoute>,
    /// The SAE's idempotency key (derived from its `qkdnet_request_id`), kept with
    /// the request so that [`KeyStore::replay`] finds it. Several requests may
    /// share one: the attempts of a rerouted relay, the two shares of a
    /// multipath key. Only on stores that [`KeyStore::keeps_replies`].
    pub replay_key: Option<Uuid>,
}

/// Which units make up a key: what the reserving KME tells its peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    /// The key ID (equal to the first unit's ID).
    pub key_id: Uuid,
    /// Key size in bits.
    pub size_bits: u32,
    /// Unit IDs in order.
    pub unit_ids: Vec<Uuid>,
}

/// A key reserved at the master side, with its bytes (held until the peer acks).
pub struct ReservedKey {
    /// Layout to send to the peer.
    pub layout: KeyLayout,
    /// The key bytes (`size_bits / 8` of them).
    pub material: Zeroizing<Vec<u8>>,
}

/// A peer's reservation as accepted at the slave side.
#[derive(Debug, Clone)]
pub struct Acceptance {
    /// Request ID chosen by the peer.
    pub request_id: Uuid,
    /// The peer KME (the authenticated caller).
    pub peer: KmeId,
    /// Master SAE.
    pub master: SaeId,
    /// Slave SAE (attached to this KME).
    pub slave: SaeId,
    /// The keys.
    pub keys: Vec<KeyLayout>,
    /// Now, Unix ms.
    pub now_unix_ms: u64,
}

/// Result of [`KeyStore::accept`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AcceptOutcome {
    /// Newly accepted.
    Accepted,
    /// The same request was accepted before (a retry).
    AlreadyAccepted,
}

/// Result of [`KeyStore::void`] at the slave side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoidOutcome {
    /// Whether the request had been accepted here before it was voided.
    pub was_accepted: bool,
    /// Keys of the request that were still undelivered and are now back in the
    /// pool. Keys of an accepted request missing from this list were delivered.
    pub voided_keys: Vec<Uuid>,
}

/// A master-side request still waiting for the peer (e.g. after a crash).
#[derive(Debug, Clone)]
pub struct PendingRequest {
    /// Request ID.
    pub request_id: Uuid,
    /// Peer KME.
    pub peer: KmeId,
    /// The keys.
    pub keys: Vec<KeyLayout>,
    /// The relay route to void it along (see [`Reservation::void_route`]).
    pub void_route: Option<VoidRoute>,
}

/// A key delivered to an SAE.
pub struct DeliveredKey {
    /// Key ID.
    pub key_id: Uuid,
    /// Key bytes.
    pub material: Zeroizing<Vec<u8>>,
}

/// Counts of one peer's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolCounts {
    /// Available units this KME owns (may reserve for its master SAEs).
    pub mine_available: u64,
    /// All units held for this peer (available or reserved, either owner).
    pub total_units: u64,
}

/// A durable, transactional key store. Every method is one atomic transition.
pub trait KeyStore: Send + Sync + 'static {
    /// Stores a block's units (all or nothing). Refuses a block seen before.
    fn ingest(&self, batch: IngestBatch) -> StoreFuture<'_, u64>;
    /// Counts of the pool shared with `peer`.
    fn pool_counts(&self, peer: KmeId) -> StoreFuture<'_, PoolCounts>;
    /// Master side: reserves `number` keys of `size_bits` from units this KME owns,
    /// pending the peer's acknowledgement.
    fn reserve(&self, r: Reservation) -> StoreFuture<'_, Vec<ReservedKey>>;
    /// Master side: the peer acknowledged; the keys are delivered and deleted.
    fn confirm(&self, request_id: Uuid) -> StoreFuture<'_, ()>;
    /// Master side: the peer voided; units in `discard` are deleted, the others of
    /// the request return to the pool.
    fn release(&self, request_id: Uuid, discard: Vec<Uuid>) -> StoreFuture<'_, ()>;
    /// Master side: requests still pending (to void after a restart).
    fn pending(&self) -> StoreFuture<'_, Vec<PendingRequest>>;
    /// Slave side: accepts a peer's reservation (idempotent for the same request).
    fn accept(&self, a: Acceptance) -> StoreFuture<'_, AcceptOutcome>;
    /// Relay hops: [`KeyStore::accept`] then [`KeyStore::take`] of all its keys
    /// for its slave and master, as one transaction (the hop key is spent on
    /// arrival; one commit instead of two on the relay's critical path).
    fn accept_take(&self, a: Acceptance) -> StoreFuture<'_, Vec<DeliveredKey>>;
    /// Slave side: voids a peer's request (idempotent; leaves a tombstone).
    fn void(&self, peer: KmeId, request_id: Uuid, now_unix_ms: u64)
    -> StoreFuture<'_, VoidOutcome>;
    /// Slave side: delivers keys to `caller`, who must be the slave of each key,
    /// whose master must be `master`. All or nothing.
    fn take(
        &self,
        caller: SaeId,
        master: SaeId,
        key_ids: Vec<Uuid>,
    ) -> StoreFuture<'_, Vec<DeliveredKey>>;

    /// Whether this store keeps key stock ([`KeyStore::stock`]); the default
    /// methods below are those of a store that does not.
    fn keeps_stock(&self) -> bool {
        false
    }

    /// Whether this store keeps answered requests for one replay (the ETSI
    /// extension `qkdnet_request_id`: a retry after a lost answer gets the same
    /// keys, once). SQLite and PostgreSQL do.
    fn keeps_replies(&self) -> bool {
        false
    }

    /// Master side, instead of [`KeyStore::confirm`]: the peers acknowledged
    /// the pending `request_ids` (one, or the shares of a multipath key: all or
    /// none, in one transaction) and their keys go to the master SAE now; keep
    /// them (encrypted at rest like every unit) for one [`KeyStore::replay`]
    /// until [`REPLAY_WINDOW_MS`] after the reservation, then delete them.
    fn answer(&self, request_ids: Vec<Uuid>) -> StoreFuture<'_, ()> {
        let _ = request_ids;
        Box::pin(async { Err(StoreError::Backend("this store keeps no replies".into())) })
    }

    /// The keys of the answered master-side requests reserved under
    /// `replay_key`, once, if `master` reserved them for `slave` with that key
    /// size and number; see [`Replay`].
    fn replay(&self, r: ReplayRequest) -> StoreFuture<'_, Replay> {
        let _ = r;
        Box::pin(async { Err(StoreError::Backend("this store keeps no replies".into())) })
    }
    /// Master side: the peer acknowledged the pending request, whose keys are
    /// kept as *stock* for later enc_keys of the same SAE pair and key size
    /// instead of being delivered now (see [`crate::service`]).
    fn stock(&self, request_id: Uuid) -> StoreFuture<'_, ()> {
        let _ = request_id;
        Box::pin(async { Err(StoreError::Backend("this store keeps no key stock".into())) })
    }
    /// Master side: delivers `number` keys of `size_bits` from the stock of
    /// (`master`, `slave`), oldest first, all or nothing: `None` (nothing
    /// changed) if the stock holds fewer. Also returns the keys left in stock.
    fn take_stock(
        &self,
        master: SaeId,
        slave: SaeId,
        size_bits: u32,
        number: u32,
        now_unix_ms: u64,
    ) -> StoreFuture<'_, (Option<Vec<DeliveredKey>>, u64)> {
        let _ = (master, slave, size_bits, number, now_unix_ms);
        Box::pin(async { Ok((None, 0)) })
    }
    /// Master side: keys of `size_bits` in the stock of (`master`, `slave`).
    fn stock_count(&self, master: SaeId, slave: SaeId, size_bits: u32) -> StoreFuture<'_, u64> {
        let _ = (master, slave, size_bits);
        Box::pin(async { Ok(0) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn void_routes_round_trip_and_corrupt_ones_are_refused() {
        let k = |s: &str| KmeId::new(s).expect("valid");
        let v = VoidRoute {
            request_id: Uuid::from_u128(7),
            route: vec![k("a"), k("b.2"), k("c-3")],
        };
        assert_eq!(VoidRoute::decode(&v.encode()).expect("decodes"), v);
        for bad in [
            "",
            "x",
            "00000000-0000-0000-0000-000000000007",
            "nope a,b",
            "00000000-0000-0000-0000-000000000007 a",
            "00000000-0000-0000-0000-000000000007 a,,b",
            "00000000-0000-0000-0000-000000000007 a,b c",
        ] {
            assert!(VoidRoute::decode(bad).is_err(), "{bad:?}");
        }
    }
}
