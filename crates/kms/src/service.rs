//! The KME logic: status, enc_keys, dec_keys, and the peer side of reservations.
//!
//! This layer decides *who may do what* and *in which order things happen*; it
//! knows nothing of HTTP (the server calls it with an authenticated [`Identity`]
//! and validated requests) and keeps no key state of its own (the store does). The
//! order that makes enc_keys safe is: reserve in the store (durable) → the peer
//! acknowledges (durable there) → confirm in the store (durable: delivered) →
//! answer the SAE. A failure before the peer's ack leaves a pending request that a
//! background task voids at the peer until it gets an answer, then returns the
//! units to the pool; the same task runs at start-up for requests left pending by a
//! crash.
//!
//! # Key stock
//!
//! That order puts three durable commits at two KMEs and a KME-to-KME call on
//! the path of every enc_keys. With `stock_keys` > 0 (and a store that keeps
//! stock, SQLite), the first enc_keys of the default key size by a (master,
//! slave) pair takes that path and starts a background *refill*: the same
//! reserve → peer acknowledges steps for up to `stock_keys` keys (never more than
//! half of those available when the refill starts), after which the store marks
//! the request *stocked* instead of delivered. The
//! peer has then accepted those key IDs for exactly that master and slave, as for
//! any request, so the slave can fetch them by ID. Later enc_keys of the pair are
//! served from the stock in one local durable transition (oldest keys first; a
//! key is delivered to the master once, and durably before the answer), and a
//! refill starts whenever the stock falls below half. So a key is still handed to
//! an application only after the peer acknowledged it; the peer learns the
//! reservation before the master asks instead of during the call. Stock survives
//! restarts. It is keyed per pair: a pair's stock is not available to other pairs
//! (status counts it for its own pair only), which bounds it to `stock_keys` per
//! active pair.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::now_ms;

use uuid::Uuid;

use crate::block::{KeyBlock, units_for_bits};
use crate::error::KmsError;
use crate::etsi::REQUEST_ID_EXTENSION;
use crate::etsi::{KeyContainer, Limits, Status, ValidKeyIds, ValidKeyRequest, format_key_id};
use crate::identity::Identity;
use crate::ids::{KmeId, SaeId};
use crate::kme_core::{KmeCore, VoidCall, container, delivered_container, void_until_settled};
pub use crate::kme_core::{KmeCounters, KmeSettings};
use crate::kme_wire::{ExtKeysReserve, ExtKeysVoidReply, RelayVoid};
use crate::peer::{PeerCallError, PeerClient};
use crate::relay::Relay;
use crate::store::{
    AcceptOutcome, Acceptance, DeliveredKey, IngestBatch, KeyLayout, KeyStore, PendingRequest,
    Replay, ReplayRequest, Reservation, ReservedKey, StoreError,
};

/// A key management entity.
pub struct Kme {
    core: Arc<KmeCore>,
    relay: Arc<Relay>,
    /// SAE pairs (and key sizes) whose stock is being refilled now.
    refilling: Arc<Mutex<HashSet<StockKey>>>,
    /// Replay keys of the idempotent enc_keys being served now: a duplicate
    /// that arrives meanwhile is told to retry (the store would only see the
    /// first one's reservation once it is made).
    in_flight: Arc<Mutex<HashSet<Uuid>>>,
}

/// A stock: (master SAE, slave SAE, key size in bits).
type StockKey = (SaeId, SaeId, u32);

/// `key` held in a shared set while a task runs, removed again however the
/// task ends (even by a panic).
struct Claim<K: Eq + Hash>(Arc<Mutex<HashSet<K>>>, Option<K>);

impl<K: Eq + Hash + Clone> Claim<K> {
    /// Claims `key`, unless it is claimed already (or the set is poisoned).
    fn take(set: &Arc<Mutex<HashSet<K>>>, key: K) -> Option<Self> {
        let mut held = set.lock().ok()?;
        held.insert(key.clone())
            .then(|| Claim(set.clone(), Some(key)))
    }
}

impl<K: Eq + Hash> Drop for Claim<K> {
    fn drop(&mut self) {
        if let (Ok(mut set), Some(key)) = (self.0.lock(), self.1.take()) {
            set.remove(&key);
        }
    }
}

impl Kme {
    /// A KME over `store`, reaching its peers through `peers`.
    pub fn new(
        settings: KmeSettings,
        store: Arc<dyn KeyStore>,
        peers: Vec<PeerClient>,
    ) -> Result<Self, KmsError> {
        settings.limits.check()?;
        let peers: HashMap<_, _> = peers.into_iter().map(|p| (p.peer().clone(), p)).collect();
        if peers.contains_key(&settings.id) {
            return Err(KmsError::Config("a KME cannot be its own peer".into()));
        }
        let core = Arc::new(KmeCore::new(settings, store, peers));
        Ok(Self {
            relay: Arc::new(Relay::new(core.clone())),
            core,
            refilling: Arc::default(),
            in_flight: Arc::default(),
        })
    }

    /// Request counters.
    pub fn counters(&self) -> &KmeCounters {
        &self.core.counters
    }

    /// The trusted-node relay of this KME (its peer API and link-state database).
    pub fn relay(&self) -> &Arc<Relay> {
        &self.relay
    }

    /// Waits (bounded by `timeout`) until no background task is outstanding
    /// (voids, stock refills). For tests and orderly shutdown.
    pub async fn settle(&self, timeout: Duration) -> bool {
        self.core.settle(timeout).await
    }

    fn count(&self, r: &Result<KeyContainer, KmsError>, delivered: &AtomicU64) {
        match r {
            Ok(c) => {
                delivered.fetch_add(c.keys.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                self.core.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// This KME's ID.
    pub fn id(&self) -> &KmeId {
        &self.core.settings.id
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.core.settings.limits
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.core.store
    }

    fn capacity_units(&self) -> u64 {
        // Each peer's pool holds units of both owners; max_key_count counts keys of
        // default size that this KME's masters can draw.
        self.core
            .settings
            .limits
            .max_key_count
            .saturating_mul(u64::from(units_for_bits(
                self.core.settings.limits.key_size,
            )))
            .saturating_mul(2)
    }

    /// Takes a key block from the QKD link layer into the pool for its peer.
    /// Returns the number of 256-bit units stored. A block number seen before on
    /// the same link is refused.
    pub async fn ingest(&self, block: KeyBlock) -> Result<u64, KmsError> {
        if !self.core.peers.contains_key(&block.peer_kme) {
            return Err(KmsError::InvalidBlock("peer_kme is not a configured peer"));
        }
        let units = block.cut(&self.core.settings.id)?;
        let batch = IngestBatch {
            peer: block.peer_kme.clone(),
            link_id: block.link_id.clone(),
            block_number: block.block_number,
            eps_sec: block.eps_sec,
            eps_cor: block.eps_cor,
            created_unix_ms: block.created_unix_ms,
            units,
            capacity_units: self.capacity_units(),
        };
        Ok(self.core.store.ingest(batch).await?)
    }

    fn local_sae<'a>(&self, caller: &'a Identity) -> Result<&'a SaeId, KmsError> {
        match caller {
            Identity::Sae(s) if self.core.settings.saes.get(s) == Some(&self.core.settings.id) => {
                Ok(s)
            }
            Identity::Sae(_) => Err(KmsError::Unauthorized("SAE is not attached to this KME")),
            Identity::Kme(_) => Err(KmsError::Unauthorized(
                "a KME certificate cannot use the SAE API",
            )),
        }
    }

    /// The KME serving `slave` (which must be a remote SAE) and, if it is a
    /// neighbour, the client for it (else keys are relayed).
    fn slave_kme(&self, slave: &str) -> Result<(SaeId, KmeId, Option<&PeerClient>), KmsError> {
        let slave = SaeId::new(slave)?;
        let kme = self
            .core
            .settings
            .saes
            .get(&slave)
            .ok_or_else(|| KmsError::BadRequest("unknown slave_SAE_ID".into()))?;
        if kme == &self.core.settings.id {
            return Err(KmsError::BadRequest(
                "slave SAE is attached to this KME; keys are only shared across a QKD link".into(),
            ));
        }
        Ok((slave, kme.clone(), self.core.peers.get(kme)))
    }

    /// ETSI 014 Get status.
    pub async fn status(&self, caller: &Identity, slave: &str) -> Result<Status, KmsError> {
        let master = self.local_sae(caller)?;
        let (slave, target, peer) = self.slave_kme(slave)?;
        // A neighbour: this KME's own units of the link; further away: the
        // bottleneck of the route a relay would take now.
        let l = &self.core.settings.limits;
        let units = match peer {
            Some(p) => {
                let stock = if self.stocking() {
                    self.core
                        .store
                        .stock_count(master.clone(), slave.clone(), l.key_size)
                        .await?
                } else {
                    0
                };
                self.core
                    .store
                    .pool_counts(p.peer().clone())
                    .await?
                    .mine_available
                    .saturating_add(stock.saturating_mul(u64::from(units_for_bits(l.key_size))))
            }
            None => self.relay.relay_stored_units(&target).await?.1,
        };
        Ok(Status {
            source_KME_ID: self.core.settings.id.to_string(),
            target_KME_ID: target.to_string(),
            master_SAE_ID: master.to_string(),
            slave_SAE_ID: slave.to_string(),
            key_size: l.key_size,
            stored_key_count: units / u64::from(units_for_bits(l.key_size)),
            max_key_count: l.max_key_count,
            max_key_per_request: l.max_key_per_request,
            max_key_size: l.max_key_size,
            min_key_size: l.min_key_size,
            max_SAE_ID_count: 0,
            status_extension: None,
        })
    }

    /// ETSI 014 Get key (master side).
    pub async fn enc_keys(
        &self,
        caller: &Identity,
        slave: &str,
        req: ValidKeyRequest,
    ) -> Result<KeyContainer, KmsError> {
        self.core
            .counters
            .enc_requests
            .fetch_add(1, Ordering::Relaxed);
        let r = self
            .enc_keys_inner(caller, slave, req)
            .await
            .map(|c| self.external_ids(c));
        self.count(&r, &self.core.counters.keys_delivered_master);
        r
    }

    async fn enc_keys_inner(
        &self,
        caller: &Identity,
        slave: &str,
        req: ValidKeyRequest,
    ) -> Result<KeyContainer, KmsError> {
        let master = self.local_sae(caller)?.clone();
        let (slave, target, peer) = self.slave_kme(slave)?;
        let single = req.multipath == crate::etsi::Multipath::Single;
        // The idempotency extension, on a store that keeps answered requests;
        // otherwise refused when mandatory, else ignored.
        let idem = match req.request_id {
            Some(r) if self.core.store.keeps_replies() => Some(client_request_id(&master, r.id)),
            Some(r) if r.mandatory => return Err(KmsError::UnsupportedMandatoryExtension),
            _ => None,
        };
        let _claim = match idem {
            Some(key) => Some(Claim::take(&self.in_flight, key).ok_or_else(|| {
                KmsError::RetryLater(format!(
                    "a request with this {REQUEST_ID_EXTENSION} is being served; retry"
                ))
            })?),
            None => None,
        };
        if let Some(replay_key) = idem {
            let replay = self
                .core
                .store
                .replay(ReplayRequest {
                    replay_key,
                    master: master.clone(),
                    slave: slave.clone(),
                    size_bits: req.size_bits,
                    number: req.number,
                    now_unix_ms: now_ms(),
                })
                .await?;
            match replay {
                Replay::Unknown => {}
                Replay::Keys(shares) => return Ok(delivered_container(combine_shares(shares)?)),
                Replay::InProgress => {
                    return Err(KmsError::RetryLater(format!(
                        "an earlier request with this {REQUEST_ID_EXTENSION} is still in progress; retry"
                    )));
                }
                Replay::Spent => {
                    return Err(KmsError::BadRequest(format!(
                        "this {REQUEST_ID_EXTENSION} was answered and replayed already, or is past the replay window"
                    )));
                }
                Replay::Mismatch => {
                    return Err(KmsError::BadRequest(format!(
                        "this {REQUEST_ID_EXTENSION} names another request (SAE pair, size or number)"
                    )));
                }
            }
        }
        let peer = match peer {
            Some(p) if single => p,
            _ => return self.relay.relay_enc(master, slave, target, req, idem).await,
        };
        if let Some(replay_key) = idem {
            // Not from the stock: the store keeps this request's own keys for the replay.
            return self
                .reserve_at_peer(
                    peer,
                    master,
                    slave,
                    req.number,
                    req.size_bits,
                    Some(replay_key),
                )
                .await
                .map(container);
        }
        // Stock is kept for the default key size only, so a pair holds one stock
        // whatever sizes it asks for; a failed stock lookup falls back to the
        // direct path.
        if self.stocking() && req.size_bits == self.core.settings.limits.key_size {
            let taken = self
                .core
                .store
                .take_stock(
                    master.clone(),
                    slave.clone(),
                    req.size_bits,
                    req.number,
                    now_ms(),
                )
                .await;
            match taken {
                Ok((stocked, left)) => {
                    if left < u64::from(self.core.settings.stock_keys.div_ceil(2)) {
                        self.refill_stock(peer, &master, &slave, req.size_bits);
                    }
                    if let Some(keys) = stocked {
                        return Ok(delivered_container(keys));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "key stock unavailable; direct path"),
            }
        }
        self.reserve_at_peer(peer, master, slave, req.number, req.size_bits, None)
            .await
            .map(container)
    }

    /// Reserves `number` keys here, has `peer` accept them for `slave`, confirms
    /// them (durably delivered) and returns them. On failure the reservation is
    /// voided in the background.
    async fn reserve_at_peer(
        &self,
        peer: &PeerClient,
        master: SaeId,
        slave: SaeId,
        number: u32,
        size_bits: u32,
        replay_key: Option<Uuid>,
    ) -> Result<Vec<ReservedKey>, KmsError> {
        let parts = (master, slave, number, size_bits);
        let (request_id, reserved) = acknowledged_reservation(
            &self.core.store,
            peer,
            self.core.settings.peer_attempts,
            parts,
            replay_key,
        )
        .await
        .map_err(|(e, job)| {
            if let Some((p, discard)) = job {
                self.core
                    .spawn_void_call(peer.clone(), p, discard, VoidCall::Ext);
            }
            e
        })?;
        match replay_key {
            Some(_) => self.core.store.answer(vec![request_id]).await?,
            None => self.core.store.confirm(request_id).await?,
        }
        Ok(reserved)
    }

    /// Whether this KME keeps key stock (configured, and its store can).
    fn stocking(&self) -> bool {
        self.core.settings.stock_keys > 0 && self.core.store.keeps_stock()
    }

    /// Starts a background refill of the stock of (`master`, `slave`, `size_bits`)
    /// unless one is running.
    fn refill_stock(&self, peer: &PeerClient, master: &SaeId, slave: &SaeId, size_bits: u32) {
        let key = (master.clone(), slave.clone(), size_bits);
        let Some(claim) = Claim::take(&self.refilling, key) else {
            return;
        };
        let task = refill(
            self.core.store.clone(),
            peer.clone(),
            claim,
            self.core.settings.stock_keys,
            self.core.settings.limits.max_key_per_request,
            self.core.settings.peer_attempts,
        );
        self.core.spawn_background(task);
    }
}

/// A reservation the peer did not acknowledge, to be voided there (then
/// released here, discarding `.1`).
type VoidJob = (PendingRequest, Vec<Uuid>);

/// Reserve in `store` → `peer` acknowledges, retrying a call that got no answer
/// up to `attempts` times; the request is left pending for the caller to confirm
/// or stock. If the peer refused or never answered, the error comes with the
/// void the caller must run (in the background) for the pending reservation.
/// The replay key for an SAE's idempotency key: distinct per master SAE (two
/// SAEs choosing the same key never meet), the same on every retry.
fn client_request_id(master: &SaeId, id: Uuid) -> Uuid {
    let mut h = qkdnet_crypto::sm3::Sm3Hasher::new();
    h.update(b"qkdnet/kms/client-request/v1");
    h.update(&(master.as_str().len() as u64).to_be_bytes());
    h.update(master.as_str().as_bytes());
    h.update(id.as_bytes());
    crate::block::uuid_v8(&h.finalize())
}

/// The keys of a replayed request: the first share's key IDs, every later
/// share XORed in (a multipath key; one share otherwise).
fn combine_shares(shares: Vec<Vec<DeliveredKey>>) -> Result<Vec<DeliveredKey>, KmsError> {
    let mut shares = shares.into_iter();
    let Some(mut keys) = shares.next() else {
        return Err(KmsError::Store(StoreError::Backend(
            "a replay without keys".into(),
        )));
    };
    for share in shares {
        if share.len() != keys.len() {
            return Err(KmsError::Store(StoreError::Backend(
                "replayed shares differ in length".into(),
            )));
        }
        for (k, s) in keys.iter_mut().zip(&share) {
            crate::relay::otp(&mut k.material, &s.material)?;
        }
    }
    Ok(keys)
}

async fn acknowledged_reservation(
    store: &Arc<dyn KeyStore>,
    peer: &PeerClient,
    attempts: u32,
    (master, slave, number, size_bits): (SaeId, SaeId, u32, u32),
    replay_key: Option<Uuid>,
) -> Result<(Uuid, Vec<ReservedKey>), (KmsError, Option<VoidJob>)> {
    let request_id = Uuid::now_v7();
    let reserved = store
        .reserve(Reservation {
            request_id,
            peer: peer.peer().clone(),
            master: master.clone(),
            slave: slave.clone(),
            number,
            size_bits,
            now_unix_ms: now_ms(),
            void_route: None,
            replay_key,
        })
        .await
        .map_err(|e| {
            let e = match e {
                StoreError::Exhausted {
                    available,
                    requested,
                } => KmsError::Exhausted {
                    available,
                    requested,
                },
                e => KmsError::Store(e),
            };
            (e, None)
        })?;
    let msg = ExtKeysReserve {
        request_ID: request_id,
        master_SAE_ID: master,
        slave_SAE_ID: slave,
        keys: reserved.iter().map(|k| (&k.layout).into()).collect(),
    };
    let mut last = None;
    for _ in 0..attempts.max(1) {
        match peer.reserve(&msg).await {
            Ok(()) => return Ok((request_id, reserved)),
            Err(e @ PeerCallError::Unavailable(_)) => last = Some(e),
            Err(e @ (PeerCallError::Rejected { .. } | PeerCallError::Relay { .. })) => {
                last = Some(e);
                break;
            }
        }
    }
    let err = last.unwrap_or_else(|| PeerCallError::Unavailable("no attempt".into()));
    let discard = match &err {
        PeerCallError::Rejected {
            unavailable_units, ..
        } => unavailable_units.clone(),
        PeerCallError::Unavailable(_) | PeerCallError::Relay { .. } => Vec::new(),
    };
    tracing::warn!(peer = %peer.peer(), %request_id, error = ?err, "peer did not acknowledge; voiding");
    let keys: Vec<KeyLayout> = reserved.iter().map(|k| k.layout.clone()).collect();
    drop(reserved);
    let job = PendingRequest {
        request_id,
        peer: peer.peer().clone(),
        keys,
        void_route: None,
    };
    Err((err.into(), Some((job, discard))))
}

/// Keeps the stock of `key` between half and all of `target` keys: reserves
/// (in requests of at most `max_per_request` keys, and never more than half of
/// the keys available) and has the peer accept them, then stocks them. Stops
/// at the first failure (an exhausted pool, a peer that does not answer); the
/// next enc_keys of the pair starts it again.
async fn refill(
    store: Arc<dyn KeyStore>,
    peer: PeerClient,
    claim: Claim<StockKey>,
    target: u32,
    max_per_request: u32,
    attempts: u32,
) {
    // Whatever way this task ends (even a panic), the claim goes and the pair
    // may refill again.
    let Some((master, slave, size_bits)) = claim.1.clone() else {
        return;
    };
    let per_key = u64::from(units_for_bits(size_bits).max(1));
    let have = match store
        .stock_count(master.clone(), slave.clone(), size_bits)
        .await
    {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "stock count failed");
            return;
        }
    };
    let Ok(available) = store.pool_counts(peer.peer().clone()).await else {
        return;
    };
    // One budget for the whole refill: at most half of the keys available now.
    let mut budget =
        (u64::from(target).saturating_sub(have)).min(available.mine_available / per_key / 2);
    while budget > 0 {
        let Ok(number) = u32::try_from(budget.min(u64::from(max_per_request.max(1)))) else {
            return;
        };
        let parts = (master.clone(), slave.clone(), number, size_bits);
        match acknowledged_reservation(&store, &peer, attempts, parts, None).await {
            Ok((request_id, keys)) => {
                let layouts: Vec<KeyLayout> = keys.iter().map(|k| k.layout.clone()).collect();
                drop(keys);
                if let Err(e) = store.stock(request_id).await {
                    // Still pending: void it at the peer and take the units back.
                    tracing::warn!(%request_id, error = %e, "could not stock acknowledged keys; voiding");
                    let p = PendingRequest {
                        request_id,
                        peer: peer.peer().clone(),
                        keys: layouts,
                        void_route: None,
                    };
                    void_until_settled(store.clone(), peer.clone(), p, Vec::new(), VoidCall::Ext)
                        .await;
                    return;
                }
            }
            Err((e, job)) => {
                tracing::debug!(error = %e, "stock refill stopped");
                if let Some((p, discard)) = job {
                    void_until_settled(store.clone(), peer.clone(), p, discard, VoidCall::Ext)
                        .await;
                }
                return;
            }
        }
        budget -= u64::from(number);
    }
}

impl Kme {
    /// The container as SAEs see it: each key ID through the key-ID permutation.
    fn external_ids(&self, mut c: KeyContainer) -> KeyContainer {
        if matches!(
            self.core.settings.key_ids,
            crate::key_id::KeyIdCodec::Structured
        ) {
            return c;
        }
        for k in &mut c.keys {
            if let Ok(id) = crate::etsi::parse_key_id(&k.key_ID) {
                k.key_ID = format_key_id(&self.core.settings.key_ids.external(id));
            }
        }
        c
    }

    /// ETSI 014 Get key with key IDs (slave side).
    pub async fn dec_keys(
        &self,
        caller: &Identity,
        master: &str,
        ids: ValidKeyIds,
    ) -> Result<KeyContainer, KmsError> {
        self.core
            .counters
            .dec_requests
            .fetch_add(1, Ordering::Relaxed);
        let r = async {
            let slave = self.local_sae(caller)?.clone();
            let master = SaeId::new(master)?;
            // An ID no KME of this network issued is simply not found.
            let ids = ids
                .0
                .iter()
                .map(|&id| self.core.settings.key_ids.internal(id))
                .collect::<Option<Vec<_>>>()
                .ok_or(KmsError::KeysNotFound)?;
            let keys = self.core.store.take(slave, master, ids).await?;
            Ok(self.external_ids(delivered_container(keys)))
        }
        .await;
        self.count(&r, &self.core.counters.keys_delivered_slave);
        r
    }

    /// Peer side of a reservation: accept the keys for the named slave SAE.
    pub async fn peer_reserve(
        &self,
        caller: &Identity,
        msg: ExtKeysReserve,
    ) -> Result<AcceptOutcome, KmsError> {
        let peer = self.core.peer_caller(caller)?;
        if self.core.settings.saes.get(&msg.slave_SAE_ID) != Some(&self.core.settings.id) {
            return Err(KmsError::BadRequest(
                "slave_SAE_ID is not attached to this KME".into(),
            ));
        }
        if self.core.settings.saes.get(&msg.master_SAE_ID) != Some(&peer) {
            return Err(KmsError::BadRequest(
                "master_SAE_ID is not attached to the calling KME".into(),
            ));
        }
        if msg.keys.len() > self.core.settings.limits.max_key_per_request as usize {
            return Err(KmsError::BadRequest(
                "more keys than max_key_per_request".into(),
            ));
        }
        let acceptance = Acceptance {
            request_id: msg.request_ID,
            peer,
            master: msg.master_SAE_ID,
            slave: msg.slave_SAE_ID,
            keys: msg.keys.into_iter().map(Into::into).collect(),
            now_unix_ms: now_ms(),
        };
        Ok(self.core.accept_with_grace(acceptance).await?)
    }

    /// Peer side of a void.
    pub async fn peer_void(
        &self,
        caller: &Identity,
        request_id: Uuid,
    ) -> Result<ExtKeysVoidReply, KmsError> {
        let peer = self.core.peer_caller(caller)?;
        let out = self.core.store.void(peer, request_id, now_ms()).await?;
        Ok(ExtKeysVoidReply {
            request_ID: request_id,
            was_accepted: out.was_accepted,
            voided_key_IDs: out.voided_keys,
        })
    }

    /// Voids, at their peers, the requests a previous run left pending. Call once at
    /// start-up; runs in the background until every peer has answered.
    pub async fn recover(&self) -> Result<usize, KmsError> {
        let pending = self.core.store.pending().await?;
        let n = pending.len();
        for p in pending {
            // A relay this KME started travels its whole route when voided, so
            // that the far end does not keep keys nobody was given.
            let call = match &p.void_route {
                Some(v) => VoidCall::Relay(RelayVoid {
                    request_ID: v.request_id,
                    route: v.route.clone(),
                    hop: 1,
                }),
                None => VoidCall::Ext,
            };
            match self.core.peers.get(&p.peer) {
                Some(client) => self
                    .core
                    .spawn_void_call(client.clone(), p, Vec::new(), call),
                None => {
                    tracing::warn!(peer = %p.peer, request_id = %p.request_id, "pending request for an unconfigured peer")
                }
            }
        }
        Ok(n)
    }
}
