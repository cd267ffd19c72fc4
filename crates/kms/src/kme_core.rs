//! What the neighbour protocol ([`crate::service`]) and the trusted-node relay
//! ([`crate::relay`]) both stand on: a KME's settings, store, peer clients and
//! counters, the background voids that settle requests a peer did not
//! acknowledge, and the key containers handed to SAEs.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::error::KmsError;
use crate::etsi::{KeyContainer, KeyEntry, Limits, format_key_id};
use crate::identity::Identity;
use crate::ids::{KmeId, SaeId};
use crate::kme_wire::RelayVoid;
use crate::peer::PeerClient;
use crate::store::{
    AcceptOutcome, Acceptance, DeliveredKey, KeyStore, PendingRequest, ReservedKey, StoreError,
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

/// The parts of a KME shared by its neighbour protocol and its relay.
pub struct KmeCore {
    pub(crate) settings: KmeSettings,
    pub(crate) store: Arc<dyn KeyStore>,
    pub(crate) peers: HashMap<KmeId, PeerClient>,
    background: Mutex<JoinSet<()>>,
    pub(crate) counters: KmeCounters,
}

/// How a void reaches the peer: the neighbour API or the relay API.
pub(crate) enum VoidCall {
    /// `ext_keys/void`.
    Ext,
    /// `relay/void` (travels on along the route).
    Relay(RelayVoid),
}

impl KmeCore {
    /// The core of a KME over `store`, reaching its peers through `peers`.
    pub(crate) fn new(
        settings: KmeSettings,
        store: Arc<dyn KeyStore>,
        peers: HashMap<KmeId, PeerClient>,
    ) -> Self {
        Self {
            settings,
            store,
            peers,
            background: Mutex::new(JoinSet::new()),
            counters: KmeCounters::default(),
        }
    }

    pub(crate) fn peer_caller(&self, caller: &Identity) -> Result<KmeId, KmsError> {
        match caller {
            Identity::Kme(k) if self.peers.contains_key(k) => Ok(k.clone()),
            _ => Err(KmsError::Unauthorized(
                "only a peer KME may call the KME-to-KME API",
            )),
        }
    }

    /// [`KeyStore::accept`], waiting a little for units not delivered yet.
    pub(crate) async fn accept_with_grace(
        &self,
        acceptance: Acceptance,
    ) -> Result<AcceptOutcome, StoreError> {
        with_grace(|| self.store.accept(acceptance.clone())).await
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

    /// Runs `task` in the background; [`KmeCore::settle`] waits for it.
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

    /// Waits (bounded by `timeout`) until no background task is outstanding.
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
pub(crate) async fn void_until_settled(
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

/// The ETSI 014 key container for keys just reserved (master side).
pub(crate) fn container(keys: Vec<ReservedKey>) -> KeyContainer {
    container_of(keys.iter().map(|k| (&k.layout.key_id, &k.material[..])))
}

/// The ETSI 014 key container for keys taken from the store (slave side, stock).
pub(crate) fn delivered_container(keys: Vec<DeliveredKey>) -> KeyContainer {
    container_of(keys.iter().map(|k| (&k.key_id, &k.material[..])))
}

fn container_of<'a>(keys: impl Iterator<Item = (&'a Uuid, &'a [u8])>) -> KeyContainer {
    let b64 = base64::engine::general_purpose::STANDARD;
    KeyContainer {
        keys: keys
            .map(|(id, material)| KeyEntry {
                key_ID: format_key_id(id),
                key_ID_extension: None,
                key: b64.encode(material),
                key_extension: None,
            })
            .collect(),
        key_container_extension: None,
    }
}
