//! Which key the tunnel uses, and when it moves to the next (sans-IO).
//!
//! The initiator (master SAE) takes a new QKD key from its KME, installs the new
//! epoch's *inbound* SA, and offers the key ID to the responder (retransmitted
//! until acknowledged). The responder fetches that key by ID from its own KME,
//! checks the offer's MAC with it, installs the epoch in both directions at once
//! (the initiator already receives under it) and acknowledges. The initiator
//! switches its sending SA at the ack (or at the first authentic packet under
//! the new SPI, if the ack was lost). Each side keeps the previous inbound SA for
//! a grace period, for packets still in flight. So the new key is in place at
//! both ends before either sends under it, and a rekey loses no packet
//! (make-before-break).
//!
//! **Fail closed.** If a new key cannot be had (KME unreachable, no keys left) the
//! initiator retries with backoff and the current SA stays in use until its
//! lifetime ends; then the I/O layer drops traffic rather than send it unprotected,
//! and this module reports the expiry once. The next key that arrives opens the
//! tunnel again by itself.
//!
//! **Restarts.** A gateway that receives data under an SPI it has no key for
//! sends a rekey *request* (at most one per `request_interval`); the initiator
//! honours one at most that often, so a forged request costs at most one key per
//! interval.
//!
//! Time comes in as an [`Instant`], keys and randomness as arguments; the core
//! returns [`Action`]s for the I/O layer.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sa::{EpochKeys, Role};
use crate::wire::Control;

/// Rekeying and lifetime settings.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Move to a new key this long after the current one was installed.
    pub rekey_after: Duration,
    /// …or once this many bytes went through under it (both directions).
    pub rekey_bytes: u64,
    /// Hard lifetime of an SA: past it, traffic is dropped.
    pub lifetime: Duration,
    /// Offer retransmission interval.
    pub retransmit: Duration,
    /// An unanswered offer is abandoned after this long.
    pub offer_timeout: Duration,
    /// The previous inbound SA stays this long after a switch.
    pub grace: Duration,
    /// Rekey requests: sent and honoured at most once per this interval.
    pub request_interval: Duration,
    /// Longest wait between attempts to get a key.
    pub retry_max: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            rekey_after: Duration::from_secs(60),
            rekey_bytes: 1 << 30,
            lifetime: Duration::from_secs(180),
            retransmit: Duration::from_millis(250),
            offer_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(5),
            request_interval: Duration::from_secs(2),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// What the I/O layer must do.
#[derive(Debug)]
pub enum Action {
    /// Initiator: take one new key for the peer SAE (`enc_keys`), then call
    /// [`KeyCtl::on_new_key`].
    FetchNew,
    /// Responder: fetch the offered key by ID (`dec_keys`), then call
    /// [`KeyCtl::on_offered_key`] with these fields.
    FetchById {
        /// SPI of the offered epoch.
        spi: u32,
        /// Key ID.
        key_id: [u8; 16],
        /// The offer's MAC, checked once the key is here.
        mac: [u8; 32],
    },
    /// Send a control message to the peer.
    Send(Control),
    /// Install the epoch's inbound SA (and, if `switch`, send under it from now).
    Install {
        /// The epoch.
        keys: Arc<EpochKeys>,
        /// Also switch the outbound SA to it.
        switch: bool,
        /// End of the new SAs' life.
        expires: Instant,
    },
    /// Send under the installed epoch `spi` from now.
    Switch {
        /// The epoch.
        spi: u32,
        /// End of its life.
        expires: Instant,
    },
    /// Stop receiving under `spi` at `at` (an old epoch, or an abandoned offer).
    Retire {
        /// The epoch.
        spi: u32,
        /// When.
        at: Instant,
    },
    /// Something to log and count.
    Event(Event),
}

/// A key the KME did not deliver.
#[derive(Debug, Clone)]
pub struct FetchFailure {
    /// What went wrong.
    pub error: String,
    /// The KME answered that it will not give this key (asking again is useless).
    pub permanent: bool,
}

/// Things worth a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Both ends use epoch `spi` (the `n`-th since start).
    Rekeyed {
        /// The epoch.
        spi: u32,
        /// Rekeys so far.
        n: u64,
    },
    /// No new key: why, and when the next attempt is.
    FetchFailed {
        /// The error.
        error: String,
        /// Seconds to the next attempt (initiator) or to the next offer.
        retry_in: Duration,
    },
    /// An offer went unanswered.
    OfferTimedOut {
        /// Its epoch.
        spi: u32,
    },
    /// An offer whose MAC did not verify under the key it named.
    BadOffer {
        /// Its epoch.
        spi: u32,
    },
    /// The current SA's lifetime ended with no successor: traffic is dropped.
    Expired {
        /// The epoch.
        spi: u32,
    },
    /// The peer asked for a new key (it had none for our traffic).
    Requested,
}

struct Current {
    spi: u32,
    since: Instant,
    expires: Instant,
}

struct Pending {
    keys: Arc<EpochKeys>,
    first_sent: Instant,
    last_sent: Instant,
}

/// The key controller of one end of a tunnel.
pub struct KeyCtl {
    role: Role,
    policy: Policy,
    initiator_sae: String,
    responder_sae: String,
    current: Option<Current>,
    /// Initiator: the offer waiting for its ack.
    pending: Option<Pending>,
    /// A key request is out (initiator: `FetchNew`; responder: the SPI fetched).
    fetching: Option<u32>,
    retry_at: Option<Instant>,
    backoff: Duration,
    force: bool,
    last_request: Option<Instant>,
    /// Responder: recent epochs, to answer a retransmitted offer again.
    recent: VecDeque<Arc<EpochKeys>>,
    /// Responder: offers whose key the KME will never give (not fetched again).
    refused: VecDeque<u32>,
    expired_reported: bool,
    rekeys: u64,
}

/// Marker for an initiator's outstanding `FetchNew`.
const FETCH_NEW: u32 = 0;

impl KeyCtl {
    /// A controller for `role`, with the SAE IDs of both ends.
    pub fn new(role: Role, policy: Policy, initiator_sae: &str, responder_sae: &str) -> Self {
        Self {
            role,
            policy,
            initiator_sae: initiator_sae.into(),
            responder_sae: responder_sae.into(),
            current: None,
            pending: None,
            fetching: None,
            retry_at: None,
            backoff: Duration::from_millis(250),
            force: false,
            last_request: None,
            recent: VecDeque::new(),
            refused: VecDeque::new(),
            expired_reported: false,
            rekeys: 0,
        }
    }

    /// Rekeys completed.
    pub fn rekeys(&self) -> u64 {
        self.rekeys
    }

    /// SPI of the epoch this end sends under, if any.
    pub fn current_spi(&self) -> Option<u32> {
        self.current.as_ref().map(|c| c.spi)
    }

    /// Whether the current SA is alive at `now`.
    pub fn is_up(&self, now: Instant) -> bool {
        self.current.as_ref().is_some_and(|c| now < c.expires)
    }

    /// Timers. `bytes` is the traffic (both directions) under the current epoch.
    pub fn poll(&mut self, now: Instant, bytes: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(c) = &self.current {
            if now >= c.expires && !self.expired_reported {
                self.expired_reported = true;
                out.push(Action::Event(Event::Expired { spi: c.spi }));
            }
        }
        if self.role == Role::Responder {
            return out;
        }
        if let Some(p) = &mut self.pending {
            if now.duration_since(p.first_sent) >= self.policy.offer_timeout {
                let spi = p.keys.spi;
                self.pending = None;
                // The responder may have switched to it after all: keep
                // receiving under it for the grace period.
                out.push(Action::Retire {
                    spi,
                    at: now + self.policy.grace,
                });
                out.push(Action::Event(Event::OfferTimedOut { spi }));
                self.retry_at = Some(now);
            } else if now.duration_since(p.last_sent) >= self.policy.retransmit {
                p.last_sent = now;
                out.push(Action::Send(offer(&p.keys)));
            }
            return out;
        }
        if self.fetching.is_some() || self.retry_at.is_some_and(|t| now < t) {
            return out;
        }
        let due = match &self.current {
            None => true,
            Some(c) => {
                self.force
                    || now.duration_since(c.since) >= self.policy.rekey_after
                    || bytes >= self.policy.rekey_bytes
            }
        };
        if due {
            self.force = false;
            self.fetching = Some(FETCH_NEW);
            out.push(Action::FetchNew);
        }
        out
    }

    /// Initiator: the result of [`Action::FetchNew`]. `spi` is a fresh random
    /// non-zero number from the I/O layer.
    pub fn on_new_key(
        &mut self,
        now: Instant,
        result: Result<([u8; 16], &[u8]), String>,
        spi: u32,
    ) -> Vec<Action> {
        self.fetching = None;
        let (key_id, material) = match result {
            Ok(k) => k,
            Err(error) => return self.failed(now, error),
        };
        self.backoff = Duration::from_millis(250);
        self.retry_at = None;
        let spi = if spi == 0 || Some(spi) == self.current_spi() {
            spi.wrapping_add(1).max(1)
        } else {
            spi
        };
        let keys = self.epoch(material, spi, key_id);
        let send = offer(&keys);
        self.pending = Some(Pending {
            keys: keys.clone(),
            first_sent: now,
            last_sent: now,
        });
        vec![
            Action::Install {
                keys,
                switch: false,
                expires: now + self.policy.lifetime,
            },
            Action::Send(send),
        ]
    }

    fn epoch(&self, material: &[u8], spi: u32, key_id: [u8; 16]) -> Arc<EpochKeys> {
        Arc::new(EpochKeys::derive(
            material,
            spi,
            key_id,
            &self.initiator_sae,
            &self.responder_sae,
        ))
    }

    /// Rate limit of rekey requests (sent or honoured): true at most once per
    /// `request_interval`.
    fn request_allowed(&mut self, now: Instant) -> bool {
        if self
            .last_request
            .is_some_and(|t| now.duration_since(t) < self.policy.request_interval)
        {
            return false;
        }
        self.last_request = Some(now);
        true
    }

    fn failed(&mut self, now: Instant, error: String) -> Vec<Action> {
        let retry_in = self.backoff;
        self.retry_at = Some(now + retry_in);
        self.backoff = (self.backoff * 2).min(self.policy.retry_max);
        vec![Action::Event(Event::FetchFailed { error, retry_in })]
    }

    /// Responder: the result of [`Action::FetchById`].
    ///
    /// A *permanent* failure (the KME answered that it does not have the key:
    /// another SAE's, already delivered — say its answer to an earlier attempt
    /// was lost — or never made) will not heal by asking again: the offer is
    /// refused for good and the initiator asked for another key. A transient one
    /// (KME unreachable) is retried at the next retransmission of the offer.
    pub fn on_offered_key(
        &mut self,
        now: Instant,
        spi: u32,
        key_id: [u8; 16],
        mac: [u8; 32],
        result: Result<&[u8], FetchFailure>,
    ) -> Vec<Action> {
        if self.fetching == Some(spi) {
            self.fetching = None;
        }
        let material = match result {
            Ok(m) => m,
            Err(FetchFailure { error, permanent }) => {
                let mut out = vec![Action::Event(Event::FetchFailed {
                    error,
                    retry_in: self.policy.retransmit,
                })];
                if permanent {
                    self.refused.push_back(spi);
                    if self.refused.len() > 8 {
                        self.refused.pop_front();
                    }
                    if self.request_allowed(now) {
                        out.push(Action::Send(Control::Request { spi }));
                    }
                }
                return out;
            }
        };
        let keys = self.epoch(material, spi, key_id);
        if !keys.verify_control(1, &mac) {
            return vec![Action::Event(Event::BadOffer { spi })];
        }
        let mut out = Vec::new();
        let expires = now + self.policy.lifetime;
        out.push(Action::Install {
            keys: keys.clone(),
            switch: true,
            expires,
        });
        out.extend(self.switched(now, spi, expires));
        out.push(Action::Send(Control::Ack {
            spi,
            mac: keys.control_mac(2),
        }));
        self.recent.push_back(keys);
        if self.recent.len() > 4 {
            self.recent.pop_front();
        }
        out
    }

    /// Bookkeeping common to both roles when this end starts sending under `spi`.
    fn switched(&mut self, now: Instant, spi: u32, expires: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(old) = self.current.replace(Current {
            spi,
            since: now,
            expires,
        }) {
            out.push(Action::Retire {
                spi: old.spi,
                at: now + self.policy.grace,
            });
        }
        self.expired_reported = false;
        self.rekeys += 1;
        out.push(Action::Event(Event::Rekeyed {
            spi,
            n: self.rekeys,
        }));
        out
    }

    /// A control message from the peer.
    pub fn on_control(&mut self, now: Instant, msg: &Control) -> Vec<Action> {
        match (self.role, msg) {
            (Role::Initiator, Control::Ack { spi, mac }) => {
                let ok = self
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.keys.spi == *spi && p.keys.verify_control(2, mac));
                if ok { self.confirm(now) } else { Vec::new() }
            }
            (Role::Responder, Control::Offer { spi, key_id, mac }) => {
                if let Some(k) = self.recent.iter().find(|k| k.spi == *spi) {
                    // A retransmission (our ack was lost): answer again.
                    if k.key_id == *key_id && k.verify_control(1, mac) {
                        return vec![Action::Send(Control::Ack {
                            spi: *spi,
                            mac: k.control_mac(2),
                        })];
                    }
                    return Vec::new();
                }
                if self.fetching.is_some() || self.refused.contains(spi) {
                    return Vec::new();
                }
                self.fetching = Some(*spi);
                vec![Action::FetchById {
                    spi: *spi,
                    key_id: *key_id,
                    mac: *mac,
                }]
            }
            (Role::Initiator, Control::Request { spi }) => self.requested(now, *spi),
            _ => Vec::new(),
        }
    }

    fn confirm(&mut self, now: Instant) -> Vec<Action> {
        let Some(p) = self.pending.take() else {
            return Vec::new();
        };
        let expires = now + self.policy.lifetime;
        let mut out = vec![Action::Switch {
            spi: p.keys.spi,
            expires,
        }];
        out.extend(self.switched(now, p.keys.spi, expires));
        out
    }

    /// The peer asked for a new key (it cannot open `spi`: it has no key for
    /// it, or could not fetch the key offered under it, which is then given up).
    fn requested(&mut self, now: Instant, spi: u32) -> Vec<Action> {
        if !self.request_allowed(now) {
            return Vec::new();
        }
        let mut out = Vec::new();
        if self.pending.as_ref().is_some_and(|p| p.keys.spi == spi) {
            // A request is not authenticated: if it was forged and the
            // responder did switch, its packets under the epoch must still open
            // for the grace period.
            self.pending = None;
            out.push(Action::Retire {
                spi,
                at: now + self.policy.grace,
            });
        }
        self.force = true;
        // A request does not cut short a backoff (the KME may be the problem).
        out.push(Action::Event(Event::Requested));
        out
    }

    /// The I/O layer authenticated a packet under `spi` (reported once per SPI).
    /// For the initiator, a packet under the pending epoch means the responder
    /// has it: the same as an ack.
    pub fn on_authentic(&mut self, now: Instant, spi: u32) -> Vec<Action> {
        if self.role == Role::Initiator && self.pending.as_ref().is_some_and(|p| p.keys.spi == spi)
        {
            return self.confirm(now);
        }
        Vec::new()
    }

    /// The I/O layer got data under an SPI it has no SA for.
    pub fn on_unknown_spi(&mut self, now: Instant, spi: u32) -> Vec<Action> {
        match self.role {
            Role::Initiator => self.requested(now, spi),
            Role::Responder => {
                if self.request_allowed(now) {
                    vec![Action::Send(Control::Request { spi })]
                } else {
                    Vec::new()
                }
            }
        }
    }
}

fn offer(keys: &EpochKeys) -> Control {
    Control::Offer {
        spi: keys.spi,
        key_id: keys.key_id,
        mac: keys.control_mac(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            rekey_after: Duration::from_secs(10),
            rekey_bytes: 1000,
            lifetime: Duration::from_secs(30),
            ..Policy::default()
        }
    }

    /// Runs both controllers against a shared in-memory "KME" and a lossless
    /// control channel; returns the SPIs each side sends under.
    struct Pair {
        i: KeyCtl,
        r: KeyCtl,
        keys: Vec<([u8; 16], [u8; 32])>,
        next_key: u8,
        kme_up: bool,
        i_out: Option<u32>,
        r_out: Option<u32>,
        i_in: Vec<u32>,
        r_in: Vec<u32>,
        events: Vec<Event>,
        drop_acks: bool,
    }

    impl Pair {
        fn new() -> Self {
            Self {
                i: KeyCtl::new(Role::Initiator, policy(), "gw-a", "gw-b"),
                r: KeyCtl::new(Role::Responder, policy(), "gw-a", "gw-b"),
                keys: Vec::new(),
                next_key: 1,
                kme_up: true,
                i_out: None,
                r_out: None,
                i_in: Vec::new(),
                r_in: Vec::new(),
                events: Vec::new(),
                drop_acks: false,
            }
        }

        fn run(&mut self, now: Instant, actions: Vec<Action>, initiator: bool) {
            for a in actions {
                match a {
                    Action::FetchNew => {
                        let r = if self.kme_up {
                            let id = [self.next_key; 16];
                            let m = [self.next_key ^ 0x5a; 32];
                            self.next_key += 1;
                            self.keys.push((id, m));
                            Ok((id, m))
                        } else {
                            Err("KME unreachable".to_string())
                        };
                        let spi = 0x1000 + u32::from(self.next_key);
                        let acts = match &r {
                            Ok((id, m)) => self.i.on_new_key(now, Ok((*id, &m[..])), spi),
                            Err(e) => self.i.on_new_key(now, Err(e.clone()), spi),
                        };
                        self.run(now, acts, true);
                    }
                    Action::FetchById { spi, key_id, mac } => {
                        let found = self.keys.iter().find(|k| k.0 == key_id).map(|k| k.1);
                        let acts = match found {
                            Some(m) if self.kme_up => {
                                self.r.on_offered_key(now, spi, key_id, mac, Ok(&m[..]))
                            }
                            _ => self.r.on_offered_key(
                                now,
                                spi,
                                key_id,
                                mac,
                                Err(FetchFailure {
                                    error: "unreachable".into(),
                                    permanent: false,
                                }),
                            ),
                        };
                        self.run(now, acts, false);
                    }
                    Action::Send(c) => {
                        if initiator {
                            let acts = self.r.on_control(now, &c);
                            self.run(now, acts, false);
                        } else if !(self.drop_acks && matches!(c, Control::Ack { .. })) {
                            let acts = self.i.on_control(now, &c);
                            self.run(now, acts, true);
                        }
                    }
                    Action::Install { keys, switch, .. } => {
                        let (inb, out) = if initiator {
                            (&mut self.i_in, &mut self.i_out)
                        } else {
                            (&mut self.r_in, &mut self.r_out)
                        };
                        inb.push(keys.spi);
                        if switch {
                            *out = Some(keys.spi);
                        }
                    }
                    Action::Switch { spi, .. } => {
                        // Make-before-break: the peer must receive under it already.
                        assert!(self.r_in.contains(&spi), "switch before peer installed");
                        self.i_out = Some(spi);
                    }
                    Action::Retire { .. } => {}
                    Action::Event(e) => self.events.push(e),
                }
            }
        }

        fn tick(&mut self, now: Instant) {
            let a = self.i.poll(now, 0);
            self.run(now, a, true);
            let a = self.r.poll(now, 0);
            self.run(now, a, false);
        }
    }

    #[test]
    fn first_key_and_periodic_rekeys_switch_both_ends_make_before_break() {
        let t0 = Instant::now();
        let mut p = Pair::new();
        for s in 0..=45u64 {
            p.tick(t0 + Duration::from_secs(s));
            // The responder always sends under an SPI the initiator receives.
            if let Some(r) = p.r_out {
                assert!(p.i_in.contains(&r));
            }
        }
        assert_eq!(p.i_out, p.r_out);
        // Keys at 0, 10, 20, 30, 40 s.
        assert_eq!(p.i.rekeys(), 5);
        assert_eq!(p.r.rekeys(), 5);
        assert!(!p.events.iter().any(|e| matches!(e, Event::Expired { .. })));
    }

    #[test]
    fn byte_limit_triggers_a_rekey() {
        let t0 = Instant::now();
        let mut p = Pair::new();
        p.tick(t0);
        let a = p.i.poll(t0 + Duration::from_secs(1), 5000);
        assert!(matches!(a[..], [Action::FetchNew]));
    }

    #[test]
    fn lost_ack_is_replaced_by_the_first_authentic_packet() {
        let t0 = Instant::now();
        let mut p = Pair::new();
        p.drop_acks = true;
        p.tick(t0);
        assert_eq!(p.i_out, None);
        let spi = p.r_out.expect("responder switched at once");
        // The responder's first packet under the new SPI confirms it.
        let a = p.i.on_authentic(t0, spi);
        p.run(t0, a, true);
        assert_eq!(p.i_out, Some(spi));
    }

    #[test]
    fn retransmitted_offer_is_answered_again_without_a_second_fetch() {
        let t0 = Instant::now();
        let mut p = Pair::new();
        p.drop_acks = true;
        p.tick(t0);
        p.drop_acks = false;
        // The offer goes out again after `retransmit`; the responder re-acks
        // from the epoch it keeps instead of asking its KME again.
        p.tick(t0 + Duration::from_millis(300));
        assert_eq!(p.i_out, p.r_out);
        assert!(p.i_out.is_some());
        assert_eq!(p.keys.len(), 1);
    }

    #[test]
    fn kme_outage_keeps_current_key_until_lifetime_then_reports_and_recovers() {
        let t0 = Instant::now();
        let mut p = Pair::new();
        p.tick(t0);
        let first = p.i_out.expect("up");
        p.kme_up = false;
        let mut s = 1;
        while s <= 31 {
            p.tick(t0 + Duration::from_secs(s));
            s += 1;
        }
        assert_eq!(p.i_out, Some(first));
        assert!(!p.i.is_up(t0 + Duration::from_secs(31)));
        let expired = p
            .events
            .iter()
            .filter(|e| matches!(e, Event::Expired { .. }))
            .count();
        assert_eq!(expired, 2, "once per end: {:?}", p.events);
        assert!(
            p.events
                .iter()
                .any(|e| matches!(e, Event::FetchFailed { .. }))
        );
        p.kme_up = true;
        for s in 32..40 {
            p.tick(t0 + Duration::from_secs(s));
        }
        assert_ne!(p.i_out, Some(first));
        assert!(p.i.is_up(t0 + Duration::from_secs(40)));
        assert_eq!(p.i_out, p.r_out);
    }

    #[test]
    fn a_key_the_responder_can_never_fetch_is_given_up_at_once() {
        let t0 = Instant::now();
        let mut p = Pair::new();
        p.tick(t0);
        let first = p.i_out.expect("up");
        // The next offer's key: the KME answers "not found" (its answer to an
        // earlier attempt was lost, say).
        let a = p.i.poll(t0 + Duration::from_secs(11), 0);
        assert!(matches!(a[..], [Action::FetchNew]));
        let a =
            p.i.on_new_key(t0 + Duration::from_secs(11), Ok(([42; 16], &[1; 32])), 77);
        let offer_spi = match &a[1] {
            Action::Send(Control::Offer { spi, .. }) => *spi,
            other => panic!("{other:?}"),
        };
        let t = t0 + Duration::from_secs(11);
        let r = p.r.on_offered_key(
            t,
            offer_spi,
            [42; 16],
            [0; 32],
            Err(FetchFailure {
                error: "KME answered 400".into(),
                permanent: true,
            }),
        );
        let Some(Action::Send(req @ Control::Request { .. })) = r.last() else {
            panic!("no request: {r:?}");
        };
        // The retransmitted offer is not fetched again…
        assert!(
            p.r.on_control(
                t,
                &offer(&EpochKeys::derive(
                    &[1; 32], offer_spi, [42; 16], "gw-a", "gw-b"
                ))
            )
            .is_empty()
        );
        // …and the initiator drops it and takes another key at once.
        let a = p.i.on_control(t, req);
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::Retire { spi, .. } if *spi == offer_spi))
        );
        let a = p.i.poll(t, 0);
        assert!(matches!(a[..], [Action::FetchNew]), "{a:?}");
        assert_eq!(p.i_out, Some(first));
    }

    #[test]
    fn forged_offer_ack_and_request_flood_do_little() {
        let t0 = Instant::now();
        let mut p = Pair::new();
        p.tick(t0);
        let spi = p.i_out.expect("up");
        // Forged ack: ignored.
        let a = p.i.on_control(
            t0,
            &Control::Ack {
                spi: 99,
                mac: [0; 32],
            },
        );
        assert!(a.is_empty());
        // Offer naming a real key with a bad MAC: fetched, then refused.
        let (id, m) = p.keys[0];
        let a = p.r.on_offered_key(t0, 77, id, [0; 32], Ok(&m[..]));
        assert!(matches!(
            a[..],
            [Action::Event(Event::BadOffer { spi: 77 })]
        ));
        assert_eq!(p.r_out, Some(spi));
        // Requests: one honoured per interval.
        let honoured = (0..100)
            .filter(|_| !p.i.on_control(t0, &Control::Request { spi: 5 }).is_empty())
            .count();
        assert_eq!(honoured, 1);
    }
}
