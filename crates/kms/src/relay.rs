//! Trusted-node key relay: keys for SAE pairs whose KMEs are not neighbours.
//!
//! A QKD link joins two neighbouring KMEs; an SAE pair further apart gets its
//! keys relayed hop by hop through trusted nodes (the pattern of ETSI GS QKD 014
//! Annex B), with the ack/void semantics of the KME-to-KME API ([`crate::peer`],
//! modelled on ETSI GS QKD 020). From the applications' side nothing changes:
//! `enc_keys` at the master's KME, `dec_keys` with the key IDs at the slave's.
//!
//! # Protocol
//!
//! The master's KME `n0` picks a route `n0, n1, …, nk` (the slave's KME) and
//! reserves the keys `K` from its own units of link `n0–n1`, exactly as for a
//! neighbour. Then, one synchronous call per hop (`POST /api/v1/kme/relay`,
//! [`RelayForward`]):
//!
//! 1. `n0 → n1`: the layout of `K` (its key IDs and unit IDs); `n1` holds the
//!    same units and so learns `K`.
//! 2. `n(i) → n(i+1)` for `i ≥ 1`: `n(i)` reserves a hop key `L` of the same size
//!    from its own units of link `n(i)–n(i+1)` and sends `K ⊕ L` with `L`'s
//!    layout; `n(i+1)` takes `L` from its store and recovers `K`. Every hop key is
//!    used once and deleted at both ends: a one-time pad.
//! 3. `nk` stores `K` under the key IDs chosen by `n0`, reserved for the (master,
//!    slave) pair, and acknowledges. Each KME acknowledges only after its
//!    successor did, so the ack reaching `n0` means the key waits at `nk`; only
//!    then does `n0` hand the keys to the master SAE.
//!
//! Each hop consumes exactly the key it must: `number × ceil(size/256)` units of
//! its link, counted in [`crate::service::KmeCounters`]. Trusted nodes see `K`
//! in memory while they re-encrypt it (that is what "trusted" means); it is
//! never stored or logged there.
//!
//! # Multipath
//!
//! With the ETSI 014 extension `{"qkdnet_multipath": 2}` (see
//! [`crate::etsi::MULTIPATH_EXTENSION`]) the origin relays two independent
//! shares `K1`, `K2` over two routes that share no trusted node (the second
//! computed with the first's nodes removed; between neighbours, the direct link
//! and a detour). The second share carries `combine_with` = the first share's
//! key IDs; the last KME replaces the first share by `K1 ⊕ K2` under those IDs.
//! A trusted node sees at most one share, which alone says nothing about the
//! key. Mandatory and no two disjoint routes: 503; optional: one route.
//!
//! # Failures
//!
//! A hop that cannot go on (no key on its next link, the next KME down or
//! refusing) answers with the failing link ([`PeerErrorBody::failed_link`]); each
//! KME upstream voids its own hop reservation at its successor in the background
//! (`POST /api/v1/kme/relay/void`, which also travels on to the end of the route)
//! and passes the failure back. The origin then routes around the failed link
//! and tries again, up to `relay_attempts` routes. Key units a hop has sent under
//! a one-time pad are discarded, never returned to a pool: a relay that failed
//! costs the key it had consumed so far. No key is delivered twice: the keys
//! reach the master SAE only after the whole route acknowledged, and the slave
//! can only ask for IDs the master was given.
//!
//! Trust: as in every trusted-node network, the KMEs of a route trust each
//! other. A KME checks that a hop comes from the previous KME of the route (its
//! authenticated neighbour) and that the SAEs belong to the route's ends, but the
//! last KME cannot check that the origin really started the relay; a dishonest
//! trusted node could also read or replace the key. Multipath limits what one
//! node learns.
//!
//! If the last KME stored the keys but the acknowledgement was lost on the way
//! back, the void removes them there when it reaches it. A relay left pending
//! by a crash of its origin is voided along its whole route at the restart
//! ([`crate::Kme::recover`]): the origin keeps the route with its first-hop
//! request ([`crate::store::VoidRoute`]).
//!
//! Idempotent enc_keys (the `qkdnet_request_id` extension): every first-hop
//! request of the origin is reserved under the SAE's replay key (each attempt of
//! a rerouted relay and both shares of a multipath key) and answered instead of
//! confirmed once the whole relay succeeded; failed attempts are voided and do
//! not count, so a retry gets the keys of the attempt that was delivered (the
//! shares XORed again), once. The origin answers only after every route
//! acknowledged, so a multipath key whose second share failed leaves no
//! answered share behind.
//!
//! # Routing
//!
//! Link-state: every KME keeps a small database ([`LinkState`]) of how many units
//! each KME of the network owns on each of its links, refreshed by polling its
//! neighbours every `link_state_interval_ms` (`GET /api/v1/kme/lsdb`, merged by
//! sequence number, entries older than [`crate::lsdb::STALE_AFTER`] ignored). A route is the
//! path with the fewest hops among links with enough key for the request, ties
//! broken by the largest bottleneck (widest shortest path). Links whose state is
//! unknown count as usable with an unknown (lowest) bottleneck; a neighbour that
//! did not answer the last poll, a KME whose state went stale, and links that
//! failed earlier in the same request are avoided.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use base64::Engine;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::block::{KeyUnit, UNIT_BYTES, units_for_bits};
use crate::clock::now_ms;
use crate::error::KmsError;
use crate::etsi::{KeyContainer, Multipath, ValidKeyRequest};
use crate::ids::{KmeId, SaeId};
use crate::kme_core::{KmeCore, VoidCall, container, with_grace};
use crate::kme_wire::{
    ExtKeysVoidReply, LSDB_PATH, LinkAvail, LinkState, MAX_ROUTE_LEN, RelayForward, RelayKey,
    RelayVoid,
};
use crate::lsdb::Lsdb;
use crate::peer::PeerCallError;
use crate::routing::{Graph, add_link, kme_route};
use crate::store::{
    Acceptance, IngestBatch, KeyLayout, PendingRequest, Reservation, ReservedKey, StoreError,
    VoidRoute,
};

#[allow(unused_imports)] // for the doc link
use crate::api_error::PeerErrorBody;

/// A relay whose route acknowledged, not yet settled at its origin.
struct Relayed {
    /// The relay's request ID.
    request: Uuid,
    /// The origin's first-hop request (pending in its store).
    hop0: Uuid,
    /// The keys, with their bytes.
    keys: Vec<ReservedKey>,
}

/// Hop number that names the slave-side request of the last KME.
const FINAL_HOP: u32 = u32::MAX;

/// The request ID a hop uses in the stores of its two KMEs: distinct per hop so
/// that a KME's incoming and outgoing hops of one relay never collide.
pub fn hop_request_id(request: Uuid, hop: u32) -> Uuid {
    let mut h = qkdnet_crypto::sm3::Sm3Hasher::new();
    h.update(b"qkdnet/kms/relay-hop/v1");
    h.update(request.as_bytes());
    h.update(&hop.to_be_bytes());
    crate::block::uuid_v8(&h.finalize())
}

/// Checks a route and that this KME (`me`) is its `hop`-th, called by the one before.
pub fn check_route(route: &[KmeId], hop: u32, me: &KmeId, caller: &KmeId) -> Result<(), KmsError> {
    if route.len() < 2 || route.len() > MAX_ROUTE_LEN {
        return Err(KmsError::BadRequest(format!(
            "a route has 2 to {MAX_ROUTE_LEN} KMEs"
        )));
    }
    let distinct: BTreeSet<&KmeId> = route.iter().collect();
    if distinct.len() != route.len() {
        return Err(KmsError::BadRequest("a route visits a KME twice".into()));
    }
    let hop = hop as usize;
    if hop == 0 || hop >= route.len() || &route[hop] != me || &route[hop - 1] != caller {
        return Err(KmsError::BadRequest(
            "this KME is not the next hop of the route after the caller".into(),
        ));
    }
    Ok(())
}

/// The relay's route decision: the widest shortest path ([`crate::routing`])
/// from `me` to `target` over `usable` links with at least `need` units
/// (`avail(a, b)`: units `a` owns towards `b`; unknown counts as usable with
/// the lowest bottleneck), else over any usable link (its first short hop will
/// answer "exhausted"). Returns the route and its bottleneck (0 if some hop's
/// availability is unknown). Public so that the planner's agreement with the
/// relay can be tested.
pub fn choose_route(
    g: &Graph,
    me: &KmeId,
    target: &KmeId,
    need: u64,
    usable: impl Fn(&KmeId, &KmeId) -> bool,
    avail: impl Fn(&KmeId, &KmeId) -> Option<u64>,
) -> Option<(Vec<KmeId>, u64)> {
    let strict = kme_route(g, me, target, |a, b| {
        if !usable(a, b) {
            return None;
        }
        match avail(a, b) {
            Some(u) if u >= need => Some(u),
            Some(_) => None,
            None => Some(0),
        }
    });
    let path = strict.or_else(|| {
        kme_route(g, me, target, |a, b| {
            usable(a, b).then(|| avail(a, b).unwrap_or(0))
        })
    })?;
    let bottleneck = path
        .windows(2)
        .map(|w| avail(&w[0], &w[1]).unwrap_or(0))
        .min()
        .unwrap_or(0);
    Some((path, bottleneck))
}

/// A peer call's failure as the relay failure of link `from → to` (or the
/// link the peer named).
fn relay_failure(e: PeerCallError, from: &KmeId, to: &KmeId) -> KmsError {
    match e {
        e @ PeerCallError::Relay { .. } => e.into(),
        PeerCallError::Unavailable(m) => KmsError::RelayFailed {
            link: (from.clone(), to.clone()),
            reason: format!("KME {to} unavailable: {m}"),
        },
        PeerCallError::Rejected {
            status, message, ..
        } => KmsError::RelayFailed {
            link: (from.clone(), to.clone()),
            reason: format!("KME {to} refused ({status}): {message}"),
        },
    }
}

/// A store or check failure on link `from → to` as a relay failure.
fn on_link(from: &KmeId, to: &KmeId) -> impl Fn(KmsError) -> KmsError {
    let link = (from.clone(), to.clone());
    move |e| match e {
        e @ KmsError::RelayFailed { .. } => e,
        e => KmsError::RelayFailed {
            link: link.clone(),
            reason: e.to_string(),
        },
    }
}

/// `data ^= pad` with `qkdnet-crypto`'s one-time pad: a pad of another length is
/// an error, never a silent truncation.
pub(crate) fn otp(data: &mut [u8], pad: &[u8]) -> Result<(), KmsError> {
    qkdnet_crypto::otp::one_time_pad(qkdnet_crypto::SecretBytes::from_slice(pad), data)
        .map_err(|e| KmsError::BadRequest(format!("one-time pad: {e}")))
}

/// The trusted-node relay of one KME: routes, relay hops (origin, trusted node,
/// last KME) and the link-state database.
pub struct Relay {
    core: Arc<KmeCore>,
    lsdb: Mutex<Lsdb>,
    /// Test hook: the next relays this KME starts stop, as if the process
    /// died, after the route acknowledged and before the keys are confirmed
    /// here; their key IDs are kept for the test.
    #[cfg(feature = "test-util")]
    crash: Mutex<Option<Vec<Uuid>>>,
}

impl Relay {
    /// The relay over a KME's core (one per KME, held by [`crate::Kme`]).
    pub(crate) fn new(core: Arc<KmeCore>) -> Relay {
        Relay {
            core,
            lsdb: Mutex::new(Lsdb::default()),
            #[cfg(feature = "test-util")]
            crash: Mutex::new(None),
        }
    }

    /// Test hook (feature `test-util`): from now on, relays this KME starts
    /// stop after the whole route acknowledged and before the confirm, as if
    /// the process died there (nothing voided, nothing confirmed).
    #[cfg(feature = "test-util")]
    pub fn crash_before_confirm(&self) {
        if let Ok(mut c) = self.crash.lock() {
            *c = Some(Vec::new());
        }
    }

    /// Test hook: the key IDs (internal) of the relays stopped by
    /// [`Relay::crash_before_confirm`].
    #[cfg(feature = "test-util")]
    pub fn crashed_key_ids(&self) -> Vec<Uuid> {
        self.crash
            .lock()
            .ok()
            .and_then(|c| c.clone())
            .unwrap_or_default()
    }

    /// The network graph: the configured links plus this KME's own.
    fn graph(&self) -> Graph {
        let mut g = Graph::new();
        for (a, b) in &self.core.settings.links {
            add_link(&mut g, a, b);
        }
        for p in self.core.peers.keys() {
            add_link(&mut g, &self.core.settings.id, p);
        }
        g
    }

    /// The route for `need` units to `target` avoiding `excluded`, with its
    /// bottleneck in units (0 if some hop's availability is unknown).
    pub(crate) async fn route_to(
        &self,
        target: &KmeId,
        need: u64,
        excluded: &BTreeSet<(KmeId, KmeId)>,
        avoid: &BTreeSet<KmeId>,
    ) -> Result<Option<(Vec<KmeId>, u64)>, KmsError> {
        let me = self.core.settings.id.clone();
        let mut own = HashMap::new();
        for p in self.core.peers.keys() {
            own.insert(
                p.clone(),
                self.core.store.pool_counts(p.clone()).await?.mine_available,
            );
        }
        let g = self.graph();
        let lsdb = self
            .lsdb
            .lock()
            .map_err(|_| KmsError::Config("link-state lock".into()))?;
        let now = Instant::now();
        let usable = |a: &KmeId, b: &KmeId| {
            let blocked = excluded.contains(&(a.clone(), b.clone()))
                || avoid.contains(b)
                || (a == &me && lsdb.down.contains(b));
            let reachable = b == target || b == &me || !lsdb.presumed_down(b, now);
            !blocked && reachable
        };
        let avail = |a: &KmeId, b: &KmeId| {
            if a == &me {
                own.get(b).copied()
            } else {
                lsdb.avail(a, b, now)
            }
        };
        Ok(choose_route(&g, &me, target, need, usable, avail))
    }

    /// enc_keys by relay: for a slave SAE on a KME that is not a neighbour, or
    /// over two node-disjoint routes when the request asks for multipath.
    /// Reroutes around failed links.
    pub(crate) async fn relay_enc(
        &self,
        master: SaeId,
        slave: SaeId,
        target: KmeId,
        req: ValidKeyRequest,
        replay_key: Option<Uuid>,
    ) -> Result<KeyContainer, KmsError> {
        self.core
            .counters
            .relay_requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let need = u64::from(units_for_bits(req.size_bits)) * u64::from(req.number);
        let mut excluded = BTreeSet::new();
        let mut last = None;
        for _ in 0..self.core.settings.relay_attempts.max(1) {
            let attempt = match req.multipath {
                Multipath::Disjoint { mandatory } => {
                    match self.disjoint_routes(&target, need, &excluded).await? {
                        Some((r1, r2)) => Some(
                            self.relay_two(&r1, &r2, &master, &slave, &req, replay_key)
                                .await,
                        ),
                        None if mandatory => {
                            last = Some(KmsError::NoRoute(format!(
                                "no two node-disjoint routes with key from KME {} to KME {target}",
                                self.core.settings.id
                            )));
                            break;
                        }
                        None => None,
                    }
                }
                Multipath::Single => None,
            };
            let attempt = match attempt {
                Some(a) => a,
                None => {
                    let no_avoid = BTreeSet::new();
                    let Some((route, _)) =
                        self.route_to(&target, need, &excluded, &no_avoid).await?
                    else {
                        break;
                    };
                    match self
                        .relay_once(&route, &master, &slave, &req, None, replay_key)
                        .await
                    {
                        Ok(done) => self
                            .settle(&[&done], replay_key)
                            .await
                            .map(|()| container(done.keys)),
                        Err(e) => Err(e),
                    }
                }
            };
            match attempt {
                Ok(c) => return Ok(c),
                Err(KmsError::RelayFailed { link, reason }) => {
                    tracing::info!(from = %link.0, to = %link.1, %reason, "relay failed on a link; rerouting");
                    excluded.insert(link.clone());
                    last = Some(KmsError::RelayFailed { link, reason });
                }
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        self.core
            .counters
            .relay_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Err(last.unwrap_or_else(|| {
            KmsError::NoRoute(format!(
                "no route from KME {} to KME {target} (links down or out of key)",
                self.core.settings.id
            ))
        }))
    }

    /// Two routes to `target` sharing no KME but the ends (and not the direct
    /// link twice): the best route, then the best one avoiding its nodes.
    async fn disjoint_routes(
        &self,
        target: &KmeId,
        need: u64,
        excluded: &BTreeSet<(KmeId, KmeId)>,
    ) -> Result<Option<(Vec<KmeId>, Vec<KmeId>)>, KmsError> {
        let none = BTreeSet::new();
        let Some((r1, _)) = self.route_to(target, need, excluded, &none).await? else {
            return Ok(None);
        };
        let avoid: BTreeSet<KmeId> = r1[1..r1.len() - 1].iter().cloned().collect();
        let mut excluded2 = excluded.clone();
        if r1.len() == 2 {
            excluded2.insert((r1[0].clone(), r1[1].clone()));
        }
        Ok(self
            .route_to(target, need, &excluded2, &avoid)
            .await?
            .map(|(r2, _)| (r1, r2)))
    }

    /// Multipath: a random share over each route; the last KME keeps their XOR
    /// under the first share's IDs. No trusted node sees both shares.
    async fn relay_two(
        &self,
        r1: &[KmeId],
        r2: &[KmeId],
        master: &SaeId,
        slave: &SaeId,
        req: &ValidKeyRequest,
        replay_key: Option<Uuid>,
    ) -> Result<KeyContainer, KmsError> {
        let first = self
            .relay_once(r1, master, slave, req, None, replay_key)
            .await?;
        let ids: Vec<Uuid> = first.keys.iter().map(|k| k.layout.key_id).collect();
        match self
            .relay_once(r2, master, slave, req, Some(ids), replay_key)
            .await
        {
            Ok(second) => {
                self.settle(&[&first, &second], replay_key).await?;
                let keys = first
                    .keys
                    .into_iter()
                    .zip(&second.keys)
                    .map(|(mut a, b)| {
                        otp(&mut a.material, &b.material)?;
                        Ok(a)
                    })
                    .collect::<Result<_, KmsError>>()?;
                Ok(container(keys))
            }
            Err(e) => {
                // Withdraw the first share from the far end, then drop it here
                // (its units are spent: the route learned them).
                if let Some(peer) = self.core.peers.get(&r1[1]) {
                    let keys: Vec<KeyLayout> =
                        first.keys.iter().map(|k| k.layout.clone()).collect();
                    let units = keys.iter().flat_map(|k| k.unit_ids.clone()).collect();
                    self.core.spawn_void_call(
                        peer.clone(),
                        PendingRequest {
                            request_id: first.hop0,
                            peer: r1[1].clone(),
                            keys,
                            void_route: None,
                        },
                        units,
                        VoidCall::Relay(RelayVoid {
                            request_ID: first.request,
                            route: r1.to_vec(),
                            hop: 1,
                        }),
                    );
                }
                Err(e)
            }
        }
    }

    /// The route(s) of a relay acknowledged: its first-hop requests here are
    /// confirmed (or answered, kept for one replay, under a replay key) and
    /// the keys go to the master SAE.
    async fn settle(&self, relays: &[&Relayed], replay_key: Option<Uuid>) -> Result<(), KmsError> {
        #[cfg(feature = "test-util")]
        if let Ok(mut c) = self.crash.lock()
            && let Some(ids) = c.as_mut()
        {
            for r in relays {
                ids.extend(r.keys.iter().map(|k| k.layout.key_id));
            }
            return Err(KmsError::PeerUnavailable(
                "simulated crash before confirm".into(),
            ));
        }
        match replay_key {
            // The shares of a multipath key are answered together or not at all.
            Some(_) => {
                let hops = relays.iter().map(|r| r.hop0).collect();
                self.core.store.answer(hops).await?;
            }
            None => {
                for r in relays {
                    self.core.store.confirm(r.hop0).await?;
                }
            }
        }
        for r in relays {
            self.count_relay_units(&r.keys.iter().map(|k| &k.layout).collect::<Vec<_>>());
        }
        Ok(())
    }

    /// One relay along `route`: the keys (with their bytes) once the whole
    /// route acknowledged, their first-hop request still pending here for
    /// [`Relay::settle`].
    async fn relay_once(
        &self,
        route: &[KmeId],
        master: &SaeId,
        slave: &SaeId,
        req: &ValidKeyRequest,
        combine_with: Option<Vec<Uuid>>,
        replay_key: Option<Uuid>,
    ) -> Result<Relayed, KmsError> {
        let me = &self.core.settings.id;
        let first = &route[1];
        let fail = on_link(me, first);
        let peer = self
            .core
            .peers
            .get(first)
            .ok_or_else(|| fail(KmsError::BadRequest("not a neighbour".into())))?;
        let request = Uuid::now_v7();
        let r0 = hop_request_id(request, 0);
        let reserved = self
            .core
            .store
            .reserve(Reservation {
                request_id: r0,
                peer: first.clone(),
                master: master.clone(),
                slave: slave.clone(),
                number: req.number,
                size_bits: req.size_bits,
                now_unix_ms: now_ms(),
                void_route: Some(VoidRoute {
                    request_id: request,
                    route: route.to_vec(),
                }),
                replay_key,
            })
            .await
            .map_err(|e| fail(e.into()))?;
        let msg = RelayForward {
            request_ID: request,
            route: route.to_vec(),
            hop: 1,
            master_SAE_ID: master.clone(),
            slave_SAE_ID: slave.clone(),
            keys: reserved
                .iter()
                .map(|k| RelayKey {
                    key: (&k.layout).into(),
                    hop_key: (&k.layout).into(),
                    ciphertext: None,
                })
                .collect(),
            combine_with,
        };
        match peer.relay(&msg).await {
            Ok(()) => Ok(Relayed {
                request,
                hop0: r0,
                keys: reserved,
            }),
            Err(e) => {
                let keys = reserved.iter().map(|k| k.layout.clone()).collect();
                drop(reserved);
                self.core.spawn_void_call(
                    peer.clone(),
                    PendingRequest {
                        request_id: r0,
                        peer: first.clone(),
                        keys,
                        void_route: None,
                    },
                    Vec::new(),
                    VoidCall::Relay(RelayVoid {
                        request_ID: request,
                        route: route.to_vec(),
                        hop: 1,
                    }),
                );
                Err(relay_failure(e, me, first))
            }
        }
    }

    fn count_relay_units(&self, keys: &[&KeyLayout]) {
        let units: u64 = keys.iter().map(|k| k.unit_ids.len() as u64).sum();
        self.core
            .counters
            .relay_units_sent
            .fetch_add(units, std::sync::atomic::Ordering::Relaxed);
    }

    /// A relay hop arriving from a neighbour: recover the keys, then store them
    /// (last KME) or pass them on under the next link's one-time pad.
    pub async fn peer_relay(
        &self,
        caller: &crate::identity::Identity,
        msg: RelayForward,
    ) -> Result<(), KmsError> {
        let prev = self.core.peer_caller(caller)?;
        let me = self.core.settings.id.clone();
        check_route(&msg.route, msg.hop, &me, &prev)?;
        let hop = msg.hop as usize;
        let (master, slave) = (msg.master_SAE_ID.clone(), msg.slave_SAE_ID.clone());
        let origin = &msg.route[0];
        let last = msg.route.last().unwrap_or(&me);
        if self.core.settings.saes.get(&master) != Some(origin)
            || self.core.settings.saes.get(&slave) != Some(last)
        {
            return Err(KmsError::BadRequest(
                "the SAEs are not attached to the ends of the route".into(),
            ));
        }
        let size = self.check_relay_keys(&msg)?;
        let fail_in = on_link(&prev, &me);
        // Take this hop's key: accept the sender's reservation and deliver it
        // here, in one transaction.
        let acceptance = Acceptance {
            request_id: hop_request_id(msg.request_ID, msg.hop - 1),
            peer: prev.clone(),
            master: master.clone(),
            slave: slave.clone(),
            keys: msg.keys.iter().map(|k| k.hop_key.clone().into()).collect(),
            now_unix_ms: now_ms(),
        };
        let hop_keys = with_grace(|| self.core.store.accept_take(acceptance.clone()))
            .await
            .map_err(|e| fail_in(e.into()))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut keys: Vec<(KeyLayout, Zeroizing<Vec<u8>>)> = Vec::with_capacity(msg.keys.len());
        for (k, hk) in msg.keys.iter().zip(hop_keys) {
            let mut material = hk.material;
            if let Some(ct) = &k.ciphertext {
                let ct = Zeroizing::new(b64.decode(ct).map_err(|_| {
                    fail_in(KmsError::BadRequest("ciphertext is not base64".into()))
                })?);
                if ct.len() != material.len() {
                    return Err(fail_in(KmsError::BadRequest(
                        "ciphertext length differs from the key size".into(),
                    )));
                }
                otp(&mut material, &ct).map_err(&fail_in)?;
            }
            keys.push((k.key.clone().into(), material));
        }
        if hop + 1 == msg.route.len() {
            let keys = match &msg.combine_with {
                None => keys,
                Some(ids) => self
                    .combine_shares(&master, &slave, ids, keys)
                    .await
                    .map_err(&fail_in)?,
            };
            self.store_relayed(msg.request_ID, origin, &master, &slave, keys)
                .await
                .map_err(fail_in)?;
            self.core
                .counters
                .relay_delivered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(());
        }
        // Pass on under the next link's key.
        let next = &msg.route[hop + 1];
        let fail_out = on_link(&me, next);
        let peer =
            self.core.peers.get(next).ok_or_else(|| {
                fail_out(KmsError::BadRequest("next hop is not a neighbour".into()))
            })?;
        let out_req = hop_request_id(msg.request_ID, msg.hop);
        let pads = self
            .core
            .store
            .reserve(Reservation {
                request_id: out_req,
                peer: next.clone(),
                master: master.clone(),
                slave: slave.clone(),
                number: keys.len() as u32,
                size_bits: size,
                now_unix_ms: now_ms(),
                void_route: None,
                replay_key: None,
            })
            .await
            .map_err(|e| fail_out(e.into()))?;
        let fwd = RelayForward {
            request_ID: msg.request_ID,
            route: msg.route.clone(),
            hop: msg.hop + 1,
            master_SAE_ID: master,
            slave_SAE_ID: slave,
            combine_with: msg.combine_with.clone(),
            keys: keys
                .iter()
                .zip(&pads)
                .map(|((layout, k), pad)| {
                    let mut ct = Zeroizing::new(k.to_vec());
                    otp(&mut ct, &pad.material).map_err(&fail_out)?;
                    Ok(RelayKey {
                        key: layout.into(),
                        hop_key: (&pad.layout).into(),
                        ciphertext: Some(b64.encode(&ct[..])),
                    })
                })
                .collect::<Result<_, KmsError>>()?,
        };
        drop(keys);
        match peer.relay(&fwd).await {
            Ok(()) => {
                // Off the critical path: the pads are spent either way. Should
                // this KME stop before the confirm lands, the restart voids the
                // request at the next KME, which answers "delivered", and the
                // pads are discarded then.
                let store = self.core.store.clone();
                self.core.spawn_background(async move {
                    if let Err(e) = store.confirm(out_req).await {
                        tracing::warn!(request_id = %out_req, error = %e, "could not confirm a relay hop");
                    }
                });
                self.count_relay_units(&pads.iter().map(|k| &k.layout).collect::<Vec<_>>());
                self.core
                    .counters
                    .relay_forwarded
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                // The pads went out under a one-time pad: never reuse them.
                let keys: Vec<KeyLayout> = pads.iter().map(|k| k.layout.clone()).collect();
                let discard = keys
                    .iter()
                    .flat_map(|k| k.unit_ids.iter().copied())
                    .collect();
                drop(pads);
                self.core.spawn_void_call(
                    peer.clone(),
                    PendingRequest {
                        request_id: out_req,
                        peer: next.clone(),
                        keys,
                        void_route: None,
                    },
                    discard,
                    VoidCall::Relay(RelayVoid {
                        request_ID: msg.request_ID,
                        route: msg.route.clone(),
                        hop: msg.hop + 1,
                    }),
                );
                Err(relay_failure(e, &me, next))
            }
        }
    }

    /// Checks the keys of a relay message; returns their (common) size in bits.
    fn check_relay_keys(&self, msg: &RelayForward) -> Result<u32, KmsError> {
        let l = &self.core.settings.limits;
        let Some(first) = msg.keys.first() else {
            return Err(KmsError::BadRequest("no keys".into()));
        };
        if msg.keys.len() > l.max_key_per_request as usize {
            return Err(KmsError::BadRequest(
                "more keys than max_key_per_request".into(),
            ));
        }
        let size = first.key.size;
        if size % 8 != 0 || size < l.min_key_size || size > l.max_key_size {
            return Err(KmsError::BadRequest("key size outside the limits".into()));
        }
        for k in &msg.keys {
            let units = units_for_bits(size) as usize;
            if k.key.size != size
                || k.hop_key.size != size
                || k.key.unit_IDs.len() != units
                || k.hop_key.unit_IDs.len() != units
                || k.key.unit_IDs.first() != Some(&k.key.key_ID)
            {
                return Err(KmsError::BadRequest("inconsistent key layout".into()));
            }
            if (msg.hop == 1) != k.ciphertext.is_none() || (msg.hop == 1 && k.key != k.hop_key) {
                return Err(KmsError::BadRequest(
                    "the first hop carries the key's own layout, later hops a ciphertext".into(),
                ));
            }
        }
        Ok(size)
    }

    /// Last KME, second share of a multipath relay: takes the first shares
    /// (`ids`) and returns the XOR of both under the first shares' key IDs.
    async fn combine_shares(
        &self,
        master: &SaeId,
        slave: &SaeId,
        ids: &[Uuid],
        second: Vec<(KeyLayout, Zeroizing<Vec<u8>>)>,
    ) -> Result<Vec<(KeyLayout, Zeroizing<Vec<u8>>)>, KmsError> {
        if ids.len() != second.len() {
            return Err(KmsError::BadRequest(
                "combine_with names another number of keys".into(),
            ));
        }
        let firsts = self
            .core
            .store
            .take(slave.clone(), master.clone(), ids.to_vec())
            .await?;
        let mut out = Vec::with_capacity(firsts.len());
        for (a, (layout, b)) in firsts.into_iter().zip(second) {
            if a.material.len() != b.len() {
                return Err(KmsError::BadRequest("the two shares differ in size".into()));
            }
            let mut m = a.material;
            otp(&mut m, &b)?;
            // The combined key keeps the first share's ID; its other units get
            // IDs derived from it (the first share's units are gone).
            let unit_ids = (0..layout.unit_ids.len() as u32)
                .map(|i| {
                    if i == 0 {
                        a.key_id
                    } else {
                        hop_request_id(a.key_id, i)
                    }
                })
                .collect();
            out.push((
                KeyLayout {
                    key_id: a.key_id,
                    size_bits: layout.size_bits,
                    unit_ids,
                },
                m,
            ));
        }
        Ok(out)
    }

    /// Last KME: keeps the relayed keys for the slave SAE under their IDs.
    async fn store_relayed(
        &self,
        request: Uuid,
        origin: &KmeId,
        master: &SaeId,
        slave: &SaeId,
        keys: Vec<(KeyLayout, Zeroizing<Vec<u8>>)>,
    ) -> Result<(), KmsError> {
        let mut units = Vec::new();
        for (layout, material) in &keys {
            for (i, id) in layout.unit_ids.iter().enumerate() {
                let mut m = Zeroizing::new([0u8; UNIT_BYTES]);
                let chunk = material.get(i * UNIT_BYTES..).unwrap_or(&[]);
                let n = chunk.len().min(UNIT_BYTES);
                m[..n].copy_from_slice(&chunk[..n]);
                units.push(KeyUnit {
                    id: *id,
                    mine: false,
                    material: m,
                });
            }
        }
        self.core
            .store
            .ingest(IngestBatch {
                peer: origin.clone(),
                link_id: format!("relay/{request}"),
                block_number: 0,
                eps_sec: 0.0,
                eps_cor: 0.0,
                created_unix_ms: now_ms(),
                units,
                capacity_units: u64::MAX,
            })
            .await?;
        self.core
            .store
            .accept(Acceptance {
                request_id: hop_request_id(request, FINAL_HOP),
                peer: origin.clone(),
                master: master.clone(),
                slave: slave.clone(),
                keys: keys.into_iter().map(|(l, _)| l).collect(),
                now_unix_ms: now_ms(),
            })
            .await?;
        Ok(())
    }

    /// Void of a relay hop: void this KME's incoming hop and send the void on.
    pub async fn peer_relay_void(
        &self,
        caller: &crate::identity::Identity,
        msg: RelayVoid,
    ) -> Result<ExtKeysVoidReply, KmsError> {
        let prev = self.core.peer_caller(caller)?;
        let me = self.core.settings.id.clone();
        check_route(&msg.route, msg.hop, &me, &prev)?;
        let out = self
            .core
            .store
            .void(prev, hop_request_id(msg.request_ID, msg.hop - 1), now_ms())
            .await?;
        let hop = msg.hop as usize;
        if hop + 1 == msg.route.len() {
            match self
                .core
                .store
                .void(
                    msg.route[0].clone(),
                    hop_request_id(msg.request_ID, FINAL_HOP),
                    now_ms(),
                )
                .await
            {
                Ok(_) | Err(StoreError::RequestConflict) => {}
                Err(e) => return Err(e.into()),
            }
        } else if let Some(peer) = self.core.peers.get(&msg.route[hop + 1]) {
            let out_req = hop_request_id(msg.request_ID, msg.hop);
            let pending = self
                .core
                .store
                .pending()
                .await?
                .into_iter()
                .find(|p| p.request_id == out_req);
            let discard = pending
                .iter()
                .flat_map(|p| p.keys.iter().flat_map(|k| k.unit_ids.iter().copied()))
                .collect();
            self.core.spawn_void_call(
                peer.clone(),
                pending.unwrap_or(PendingRequest {
                    request_id: out_req,
                    peer: peer.peer().clone(),
                    keys: Vec::new(),
                    void_route: None,
                }),
                discard,
                VoidCall::Relay(RelayVoid {
                    request_ID: msg.request_ID,
                    route: msg.route.clone(),
                    hop: msg.hop + 1,
                }),
            );
        }
        Ok(ExtKeysVoidReply {
            request_ID: msg.request_ID,
            was_accepted: out.was_accepted,
            voided_key_IDs: out.voided_keys,
        })
    }

    /// This KME's link-state database, its own entry refreshed (for a peer's poll).
    pub async fn link_state(
        &self,
        caller: &crate::identity::Identity,
    ) -> Result<Vec<LinkState>, KmsError> {
        self.core.peer_caller(caller)?;
        let own = self.own_link_state().await?;
        let mut v = self
            .lsdb
            .lock()
            .map_err(|_| KmsError::Config("link-state lock".into()))?
            .snapshot(Instant::now());
        v.push(own);
        Ok(v)
    }

    async fn own_link_state(&self) -> Result<LinkState, KmsError> {
        let mut links = Vec::new();
        for p in self.core.peers.keys() {
            links.push(LinkAvail {
                peer: p.clone(),
                units: self.core.store.pool_counts(p.clone()).await?.mine_available,
            });
        }
        links.sort_by(|a, b| a.peer.cmp(&b.peer));
        Ok(LinkState {
            kme: self.core.settings.id.clone(),
            seq: now_ms(),
            links,
        })
    }

    /// Polls every neighbour's link-state database once and merges it.
    pub async fn poll_link_state(&self) {
        let mut set = tokio::task::JoinSet::new();
        for p in self.core.peers.values() {
            let p = p.clone();
            set.spawn(async move {
                let r: Result<Vec<LinkState>, PeerCallError> = p.get(LSDB_PATH).await;
                (p.peer().clone(), r)
            });
        }
        while let Some(Ok((peer, r))) = set.join_next().await {
            let Ok(mut db) = self.lsdb.lock() else { return };
            match r {
                Ok(states) => {
                    db.down.remove(&peer);
                    db.merge(states, &self.core.settings.id, Instant::now());
                }
                Err(e) => {
                    tracing::debug!(%peer, error = ?e, "link-state poll failed");
                    db.down.insert(peer);
                }
            }
        }
    }

    /// ETSI status towards a KME that is not a neighbour: the route's bottleneck.
    pub(crate) async fn relay_stored_units(
        &self,
        target: &KmeId,
    ) -> Result<(KmeId, u64), KmsError> {
        let route = self
            .route_to(target, 1, &BTreeSet::new(), &BTreeSet::new())
            .await?;
        Ok((target.clone(), route.map_or(0, |(_, b)| b)))
    }
}

/// Polls the neighbours' link state every `every` until the relay (its KME) is dropped.
pub fn spawn_link_state(relay: &Arc<Relay>, every: Duration) -> tokio::task::JoinHandle<()> {
    let weak: Weak<Relay> = Arc::downgrade(relay);
    tokio::spawn(async move {
        loop {
            match weak.upgrade() {
                Some(k) => k.poll_link_state().await,
                None => return,
            }
            tokio::time::sleep(every).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> KmeId {
        KmeId::new(s).expect("id")
    }

    fn ring() -> Graph {
        // a - b - c - d, and a - e - f - d (two routes of three hops), plus a - g - d.
        let mut g = Graph::new();
        for (x, y) in [
            ("a", "b"),
            ("b", "c"),
            ("c", "d"),
            ("a", "e"),
            ("e", "f"),
            ("f", "d"),
            ("a", "g"),
            ("g", "d"),
        ] {
            add_link(&mut g, &k(x), &k(y));
        }
        g
    }

    fn names(p: Option<Vec<KmeId>>) -> Vec<String> {
        p.unwrap_or_default()
            .iter()
            .map(|x| x.as_str().to_owned())
            .collect()
    }

    #[test]
    fn fewest_hops_first_then_widest() {
        let g = ring();
        let all = |_: &KmeId, _: &KmeId| Some(100);
        assert_eq!(names(kme_route(&g, &k("a"), &k("d"), all)), ["a", "g", "d"]);
        // Without g, two 3-hop routes: the one with the larger bottleneck wins.
        let no_g = |x: &KmeId, y: &KmeId| {
            if x.as_str() == "g" || y.as_str() == "g" {
                None
            } else if x.as_str() == "c" {
                Some(5)
            } else {
                Some(100)
            }
        };
        assert_eq!(
            names(kme_route(&g, &k("a"), &k("d"), no_g)),
            ["a", "e", "f", "d"]
        );
        // Everything cut: no route.
        assert!(kme_route(&g, &k("a"), &k("d"), |_, _| None).is_none());
        assert!(kme_route(&g, &k("a"), &k("a"), all).is_none());
    }

    #[test]
    fn routes_are_checked() {
        let r: Vec<KmeId> = ["a", "b", "c"].iter().map(|s| k(s)).collect();
        assert!(check_route(&r, 1, &k("b"), &k("a")).is_ok());
        assert!(check_route(&r, 2, &k("c"), &k("b")).is_ok());
        assert!(check_route(&r, 1, &k("b"), &k("c")).is_err()); // wrong caller
        assert!(check_route(&r, 0, &k("a"), &k("a")).is_err());
        assert!(check_route(&r, 3, &k("c"), &k("b")).is_err());
        let looped: Vec<KmeId> = ["a", "b", "a"].iter().map(|s| k(s)).collect();
        assert!(check_route(&looped, 1, &k("b"), &k("a")).is_err());
    }

    #[test]
    fn hop_ids_differ_per_hop_and_request() {
        let r = Uuid::from_u128(42);
        let ids: BTreeSet<Uuid> = (0..64)
            .chain([FINAL_HOP])
            .map(|h| hop_request_id(r, h))
            .collect();
        assert_eq!(ids.len(), 65);
        assert_ne!(hop_request_id(r, 0), hop_request_id(Uuid::from_u128(43), 0));
        assert_eq!(hop_request_id(r, 5), hop_request_id(r, 5));
    }
}
