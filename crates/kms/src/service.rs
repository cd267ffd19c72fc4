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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::block::{KeyBlock, units_for_bits};
use crate::error::KmsError;
use crate::etsi::{
    KeyContainer, KeyEntry, Limits, Status, ValidKeyIds, ValidKeyRequest, format_key_id,
};
use crate::identity::Identity;
use crate::ids::{KmeId, SaeId};
use crate::peer::{ExtKeysReserve, ExtKeysVoidReply, PeerCallError, PeerClient};
use crate::store::{
    AcceptOutcome, Acceptance, DeliveredKey, IngestBatch, KeyLayout, KeyStore, PendingRequest,
    Reservation, ReservedKey, StoreError,
};

/// Static settings of a KME.
#[derive(Debug, Clone)]
pub struct KmeSettings {
    /// This KME's ID.
    pub id: KmeId,
    /// How key IDs cross the ETSI API ([`crate::key_id`]).
    pub key_ids: crate::key_id::KeyIdCodec,
    /// Limits advertised and enforced.
    pub limits: Limits,
    /// Every SAE of the network this KME serves or reserves for, and its KME.
    pub saes: HashMap<SaeId, KmeId>,
    /// Attempts to get a peer's acknowledgement before giving up on a request.
    pub peer_attempts: u32,
    /// Every KME-to-KME link of the network, for routing relayed keys (this
    /// KME's own links are always included).
    pub links: Vec<(KmeId, KmeId)>,
    /// Routes tried for one relayed request before giving up.
    pub relay_attempts: u32,
    /// Keys kept in stock per (master SAE, neighbour slave SAE, key size) once the
    /// pair has asked for keys; 0 turns key stock off (see the module docs).
    pub stock_keys: u32,
}

/// Now, Unix milliseconds (0 if the clock is before 1970).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long the slave side waits for units its link has not delivered yet.
const UNIT_ARRIVAL_GRACE: Duration = Duration::from_millis(2500);

/// Request counters of a KME (for the node's metrics endpoint).
#[derive(Debug, Default)]
pub struct KmeCounters {
    /// enc_keys calls.
    pub enc_requests: AtomicU64,
    /// dec_keys calls.
    pub dec_requests: AtomicU64,
    /// Keys handed to master SAEs.
    pub keys_delivered_master: AtomicU64,
    /// Keys handed to slave SAEs.
    pub keys_delivered_slave: AtomicU64,
    /// enc_keys and dec_keys calls that failed.
    pub errors: AtomicU64,
    /// enc_keys calls relayed over trusted nodes (this KME the origin).
    pub relay_requests: AtomicU64,
    /// Relayed requests that failed on every route tried.
    pub relay_failures: AtomicU64,
    /// Relays passed on by this KME as a trusted node.
    pub relay_forwarded: AtomicU64,
    /// Relays that ended here (keys stored for a local slave SAE).
    pub relay_delivered: AtomicU64,
    /// 256-bit units of link key this KME sent for relays (first-hop keys and
    /// one-time pads), on acknowledged hops.
    pub relay_units_sent: AtomicU64,
}

/// A key management entity.
pub struct Kme {
    pub(crate) settings: KmeSettings,
    pub(crate) store: Arc<dyn KeyStore>,
    pub(crate) peers: HashMap<KmeId, PeerClient>,
    background: Mutex<JoinSet<()>>,
    /// SAE pairs (and key sizes) whose stock is being refilled now.
    refilling: Arc<Mutex<std::collections::HashSet<StockKey>>>,
    pub(crate) counters: KmeCounters,
    pub(crate) lsdb: crate::relay::SharedLsdb,
}

/// A stock: (master SAE, slave SAE, key size in bits).
type StockKey = (SaeId, SaeId, u32);

/// How a void reaches the peer: the neighbour API or the relay API.
pub(crate) enum VoidCall {
    /// `ext_keys/void`.
    Ext,
    /// `relay/void` (travels on along the route).
    Relay(crate::relay::RelayVoid),
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
        Ok(Self {
            settings,
            store,
            peers,
            background: Mutex::new(JoinSet::new()),
            refilling: Arc::default(),
            counters: KmeCounters::default(),
            lsdb: Default::default(),
        })
    }

    /// Request counters.
    pub fn counters(&self) -> &KmeCounters {
        &self.counters
    }

    fn count(&self, r: &Result<KeyContainer, KmsError>, delivered: &AtomicU64) {
        match r {
            Ok(c) => {
                delivered.fetch_add(c.keys.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// This KME's ID.
    pub fn id(&self) -> &KmeId {
        &self.settings.id
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.settings.limits
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    fn capacity_units(&self) -> u64 {
        // Each peer's pool holds units of both owners; max_key_count counts keys of
        // default size that this KME's masters can draw.
        self.settings
            .limits
            .max_key_count
            .saturating_mul(u64::from(units_for_bits(self.settings.limits.key_size)))
            .saturating_mul(2)
    }

    /// Takes a key block from the QKD link layer into the pool for its peer.
    /// Returns the number of 256-bit units stored. A block number seen before on
    /// the same link is refused.
    pub async fn ingest(&self, block: KeyBlock) -> Result<u64, KmsError> {
        if !self.peers.contains_key(&block.peer_kme) {
            return Err(KmsError::InvalidBlock("peer_kme is not a configured peer"));
        }
        let units = block.cut(&self.settings.id)?;
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
        Ok(self.store.ingest(batch).await?)
    }

    fn local_sae<'a>(&self, caller: &'a Identity) -> Result<&'a SaeId, KmsError> {
        match caller {
            Identity::Sae(s) if self.settings.saes.get(s) == Some(&self.settings.id) => Ok(s),
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
            .settings
            .saes
            .get(&slave)
            .ok_or_else(|| KmsError::BadRequest("unknown slave_SAE_ID".into()))?;
        if kme == &self.settings.id {
            return Err(KmsError::BadRequest(
                "slave SAE is attached to this KME; keys are only shared across a QKD link".into(),
            ));
        }
        Ok((slave, kme.clone(), self.peers.get(kme)))
    }

    /// ETSI 014 Get status.
    pub async fn status(&self, caller: &Identity, slave: &str) -> Result<Status, KmsError> {
        let master = self.local_sae(caller)?;
        let (slave, target, peer) = self.slave_kme(slave)?;
        // A neighbour: this KME's own units of the link; further away: the
        // bottleneck of the route a relay would take now.
        let l = &self.settings.limits;
        let units = match peer {
            Some(p) => {
                let stock = if self.stocking() {
                    self.store
                        .stock_count(master.clone(), slave.clone(), l.key_size)
                        .await?
                } else {
                    0
                };
                self.store
                    .pool_counts(p.peer().clone())
                    .await?
                    .mine_available
                    .saturating_add(stock.saturating_mul(u64::from(units_for_bits(l.key_size))))
            }
            None => self.relay_stored_units(&target).await?.1,
        };
        Ok(Status {
            source_KME_ID: self.settings.id.to_string(),
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
        self.counters.enc_requests.fetch_add(1, Ordering::Relaxed);
        let r = self
            .enc_keys_inner(caller, slave, req)
            .await
            .map(|c| self.external_ids(c));
        self.count(&r, &self.counters.keys_delivered_master);
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
        let peer = match peer {
            Some(p) if req.multipath == crate::etsi::Multipath::Single => p,
            _ => return self.relay_enc(master, slave, target, req).await,
        };
        // Stock is kept for the default key size only, so a pair holds one stock
        // whatever sizes it asks for; a failed stock lookup falls back to the
        // direct path.
        if self.stocking() && req.size_bits == self.settings.limits.key_size {
            let taken = self
                .store
                .take_stock(master.clone(), slave.clone(), req.size_bits, req.number)
                .await;
            match taken {
                Ok((stocked, left)) => {
                    if left < u64::from(self.settings.stock_keys.div_ceil(2)) {
                        self.refill_stock(peer, &master, &slave, req.size_bits);
                    }
                    if let Some(keys) = stocked {
                        return Ok(delivered_container(keys));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "key stock unavailable; direct path"),
            }
        }
        self.reserve_at_peer(peer, master, slave, req.number, req.size_bits)
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
    ) -> Result<Vec<ReservedKey>, KmsError> {
        let parts = (master, slave, number, size_bits);
        let (request_id, reserved) =
            acknowledged_reservation(&self.store, peer, self.settings.peer_attempts, parts)
                .await
                .map_err(|(e, job)| {
                    if let Some((p, discard)) = job {
                        self.spawn_void_call(peer.clone(), p, discard, VoidCall::Ext);
                    }
                    e
                })?;
        self.store.confirm(request_id).await?;
        Ok(reserved)
    }

    /// Whether this KME keeps key stock (configured, and its store can).
    fn stocking(&self) -> bool {
        self.settings.stock_keys > 0 && self.store.keeps_stock()
    }

    /// Starts a background refill of the stock of (`master`, `slave`, `size_bits`)
    /// unless one is running.
    fn refill_stock(&self, peer: &PeerClient, master: &SaeId, slave: &SaeId, size_bits: u32) {
        let key = (master.clone(), slave.clone(), size_bits);
        match self.refilling.lock() {
            Ok(mut set) => {
                if !set.insert(key.clone()) {
                    return;
                }
            }
            Err(_) => return,
        }
        let task = refill(
            self.store.clone(),
            peer.clone(),
            self.refilling.clone(),
            key,
            self.settings.stock_keys,
            self.settings.limits.max_key_per_request,
            self.settings.peer_attempts,
        );
        self.spawn_background(task);
    }
}

/// A reservation the peer did not acknowledge, to be voided there (then
/// released here, discarding `.1`).
type VoidJob = (PendingRequest, Vec<Uuid>);

/// Reserve in `store` → `peer` acknowledges, retrying a call that got no answer
/// up to `attempts` times; the request is left pending for the caller to confirm
/// or stock. If the peer refused or never answered, the error comes with the
/// void the caller must run (in the background) for the pending reservation.
async fn acknowledged_reservation(
    store: &Arc<dyn KeyStore>,
    peer: &PeerClient,
    attempts: u32,
    (master, slave, number, size_bits): (SaeId, SaeId, u32, u32),
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
    refilling: Arc<Mutex<std::collections::HashSet<StockKey>>>,
    key: StockKey,
    target: u32,
    max_per_request: u32,
    attempts: u32,
) {
    // Whatever way this task ends (even a panic), the pair may refill again.
    struct Done(Arc<Mutex<std::collections::HashSet<StockKey>>>, StockKey);
    impl Drop for Done {
        fn drop(&mut self) {
            if let Ok(mut set) = self.0.lock() {
                set.remove(&self.1);
            }
        }
    }
    let _done = Done(refilling, key.clone());
    let (master, slave, size_bits) = key;
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
        match acknowledged_reservation(&store, &peer, attempts, parts).await {
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
        if matches!(self.settings.key_ids, crate::key_id::KeyIdCodec::Structured) {
            return c;
        }
        for k in &mut c.keys {
            if let Ok(id) = crate::etsi::parse_key_id(&k.key_ID) {
                k.key_ID = format_key_id(&self.settings.key_ids.external(id));
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
        self.counters.dec_requests.fetch_add(1, Ordering::Relaxed);
        let r = async {
            let slave = self.local_sae(caller)?.clone();
            let master = SaeId::new(master)?;
            // An ID no KME of this network issued is simply not found.
            let ids = ids
                .0
                .iter()
                .map(|&id| self.settings.key_ids.internal(id))
                .collect::<Option<Vec<_>>>()
                .ok_or(KmsError::KeysNotFound)?;
            let keys = self.store.take(slave, master, ids).await?;
            Ok(self.external_ids(delivered_container(keys)))
        }
        .await;
        self.count(&r, &self.counters.keys_delivered_slave);
        r
    }

    pub(crate) fn peer_caller(&self, caller: &Identity) -> Result<KmeId, KmsError> {
        match caller {
            Identity::Kme(k) if self.peers.contains_key(k) => Ok(k.clone()),
            _ => Err(KmsError::Unauthorized(
                "only a peer KME may call the KME-to-KME API",
            )),
        }
    }

    /// Peer side of a reservation: accept the keys for the named slave SAE.
    pub async fn peer_reserve(
        &self,
        caller: &Identity,
        msg: ExtKeysReserve,
    ) -> Result<AcceptOutcome, KmsError> {
        let peer = self.peer_caller(caller)?;
        if self.settings.saes.get(&msg.slave_SAE_ID) != Some(&self.settings.id) {
            return Err(KmsError::BadRequest(
                "slave_SAE_ID is not attached to this KME".into(),
            ));
        }
        if self.settings.saes.get(&msg.master_SAE_ID) != Some(&peer) {
            return Err(KmsError::BadRequest(
                "master_SAE_ID is not attached to the calling KME".into(),
            ));
        }
        if msg.keys.len() > self.settings.limits.max_key_per_request as usize {
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
        Ok(self.accept_with_grace(acceptance).await?)
    }

    /// [`KeyStore::accept`], waiting a little for units not delivered yet.
    pub(crate) async fn accept_with_grace(
        &self,
        acceptance: Acceptance,
    ) -> Result<AcceptOutcome, StoreError> {
        with_grace(|| self.store.accept(acceptance.clone())).await
    }

    /// Peer side of a void.
    pub async fn peer_void(
        &self,
        caller: &Identity,
        request_id: Uuid,
    ) -> Result<ExtKeysVoidReply, KmsError> {
        let peer = self.peer_caller(caller)?;
        let out = self.store.void(peer, request_id).await?;
        Ok(ExtKeysVoidReply {
            request_ID: request_id,
            was_accepted: out.was_accepted,
            voided_key_IDs: out.voided_keys,
        })
    }

    /// Voids, at their peers, the requests a previous run left pending. Call once at
    /// start-up; runs in the background until every peer has answered.
    pub async fn recover(&self) -> Result<usize, KmsError> {
        let pending = self.store.pending().await?;
        let n = pending.len();
        for p in pending {
            match self.peers.get(&p.peer) {
                Some(client) => self.spawn_void_call(client.clone(), p, Vec::new(), VoidCall::Ext),
                None => {
                    tracing::warn!(peer = %p.peer, request_id = %p.request_id, "pending request for an unconfigured peer")
                }
            }
        }
        Ok(n)
    }

    pub(crate) fn spawn_void_call(
        &self,
        peer: PeerClient,
        p: PendingRequest,
        extra_discard: Vec<Uuid>,
        call: VoidCall,
    ) {
        let store = self.store.clone();
        self.spawn_background(void_until_settled(store, peer, p, extra_discard, call));
    }

    /// Runs `task` in the background; [`Kme::settle`] waits for it.
    pub(crate) fn spawn_background(
        &self,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        match self.background.lock() {
            Ok(mut set) => {
                // Reap finished tasks so the set does not grow without bound.
                while set.try_join_next().is_some() {}
                set.spawn(task);
            }
            Err(poisoned) => {
                poisoned.into_inner().spawn(task);
            }
        }
    }

    /// Waits (bounded by `timeout`) until no background void is outstanding.
    /// For tests and orderly shutdown.
    pub async fn settle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let busy = match self.background.lock() {
                Ok(mut set) => {
                    while set.try_join_next().is_some() {}
                    !set.is_empty()
                }
                Err(_) => false,
            };
            if !busy {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Runs a store operation that names a peer's units, retrying a little while
/// they have not arrived yet: the two ends of a QKD link hand a block to their
/// KMEs a moment apart (the last protocol message is in flight), so units the
/// peer already has may not be here yet, and refusing would make the peer
/// discard them.
pub(crate) async fn with_grace<'a, T, F>(mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> crate::store::StoreFuture<'a, T>,
{
    let mut delay = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    loop {
        match op().await {
            Err(StoreError::UnitsUnavailable(_)) if waited < UNIT_ARRIVAL_GRACE => {
                tokio::time::sleep(delay).await;
                waited += delay;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            r => return r,
        }
    }
}

/// Voids `p` at the peer until it answers, then releases the units: keys the peer
/// delivered (or never held) are discarded, the rest return to the pool.
async fn void_until_settled(
    store: Arc<dyn KeyStore>,
    peer: PeerClient,
    p: PendingRequest,
    extra_discard: Vec<Uuid>,
    call: VoidCall,
) {
    let mut backoff = Duration::from_millis(100);
    let reply = loop {
        let r = match &call {
            VoidCall::Ext => peer.void(p.request_id).await,
            VoidCall::Relay(v) => peer.relay_void(v).await,
        };
        match r {
            Ok(r) => break r,
            Err(e) => {
                tracing::debug!(request_id = %p.request_id, error = ?e, "void not answered yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    let mut discard = extra_discard;
    if reply.was_accepted {
        for k in &p.keys {
            if !reply.voided_key_IDs.contains(&k.key_id) {
                discard.extend(k.unit_ids.iter().copied());
            }
        }
    }
    if p.keys.is_empty() {
        return; // a void passed on along a relay route, with nothing held here
    }
    if let Err(e) = store.release(p.request_id, discard).await {
        tracing::warn!(request_id = %p.request_id, error = %e, "could not release voided request");
    }
}

pub(crate) fn container(keys: Vec<ReservedKey>) -> KeyContainer {
    let b64 = base64::engine::general_purpose::STANDARD;
    KeyContainer {
        keys: keys
            .iter()
            .map(|k| KeyEntry {
                key_ID: format_key_id(&k.layout.key_id),
                key_ID_extension: None,
                key: b64.encode(&k.material[..]),
                key_extension: None,
            })
            .collect(),
        key_container_extension: None,
    }
}

fn delivered_container(keys: Vec<DeliveredKey>) -> KeyContainer {
    let b64 = base64::engine::general_purpose::STANDARD;
    KeyContainer {
        keys: keys
            .iter()
            .map(|k| KeyEntry {
                key_ID: format_key_id(&k.key_id),
                key_ID_extension: None,
                key: b64.encode(&k.material[..]),
                key_extension: None,
            })
            .collect(),
        key_container_extension: None,
    }
}
