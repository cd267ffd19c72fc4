//! The key manager: [`KeyCtl`] driven by a clock, control messages and the KME.
//!
//! Shared by the tunnel ([`crate::run`]: new epochs become SAs for its packet
//! threads) and the WireGuard agent ([`crate::wg`]: new epochs become the
//! peer's preshared key). It asks the KME for keys over ETSI GS QKD 014 (one
//! 256-bit key per epoch; `enc_keys` with an idempotency key and one retry at
//! the initiator, `dec_keys` by ID at the responder), sends control messages
//! through the caller's function, and hands every installation and event to an
//! [`Installer`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use qkdnet_etsi::client::{ClientError, EtsiClient};
use tokio::sync::mpsc as amp;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::keyctl::{Action, Event, FetchFailure, KeyCtl, Policy};
use crate::sa::{EpochKeys, Role};
use crate::wire::Control;

/// Bits of a QKD key asked of the KME.
pub const KEY_BITS: u64 = 256;

/// What puts an epoch's keys to use.
pub trait Installer {
    /// A new epoch: receive under it from now; if `switch`, also send under it.
    fn install(&mut self, keys: &Arc<EpochKeys>, switch: bool, expires: Instant);
    /// Send under an installed epoch from now.
    fn switch(&mut self, keys: &Arc<EpochKeys>, expires: Instant);
    /// Stop receiving under `spi` at `at`.
    fn retire(&mut self, spi: u32, at: Instant);
    /// Count or act on an event (it has been logged already).
    fn event(&mut self, e: &Event);
    /// Bytes carried so far (both directions), for rekeying by volume.
    fn traffic(&self) -> u64;
    /// Called every tick with whether a live key exists.
    fn tick(&mut self, _now: Instant, _up: bool) {}
}

/// What the data path reports to the manager.
pub enum ToManager {
    /// A control message from the peer.
    Control(Control),
    /// Data under an SPI with no SA.
    UnknownSpi(u32),
    /// The first authentic packet under an SPI.
    Authentic(u32),
}

enum Fetched {
    New(Result<([u8; 16], Zeroizing<Vec<u8>>), String>),
    ById {
        spi: u32,
        key_id: [u8; 16],
        mac: [u8; 32],
        result: Result<Zeroizing<Vec<u8>>, FetchFailure>,
    },
}

/// Settings of a key manager.
pub struct KeyManager {
    /// This end's role.
    pub role: Role,
    /// Rekeying.
    pub policy: Policy,
    /// This end's SAE ID.
    pub sae: String,
    /// The other end's SAE ID.
    pub peer_sae: String,
}

impl KeyManager {
    /// Runs until the input channel closes.
    pub async fn run(
        self,
        client: EtsiClient,
        send: impl Fn(&[u8]),
        mut inputs: amp::UnboundedReceiver<ToManager>,
        installer: &mut impl Installer,
    ) {
        let client = Arc::new(client);
        let (initiator, responder) = match self.role {
            Role::Initiator => (self.sae.as_str(), self.peer_sae.as_str()),
            Role::Responder => (self.peer_sae.as_str(), self.sae.as_str()),
        };
        let mut ctl = KeyCtl::new(self.role, self.policy.clone(), initiator, responder);
        let (fetch_tx, mut fetched) = amp::unbounded_channel::<Fetched>();
        let mut installed: Vec<Arc<EpochKeys>> = Vec::new();
        let mut bytes_at_switch = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            let actions = tokio::select! {
                _ = tick.tick() => {
                    let now = Instant::now();
                    installer.tick(now, ctl.is_up(now));
                    ctl.poll(now, installer.traffic().saturating_sub(bytes_at_switch))
                }
                m = inputs.recv() => {
                    let now = Instant::now();
                    match m {
                        None => return,
                        Some(ToManager::Control(c)) => ctl.on_control(now, &c),
                        Some(ToManager::UnknownSpi(spi)) => ctl.on_unknown_spi(now, spi),
                        Some(ToManager::Authentic(spi)) => ctl.on_authentic(now, spi),
                    }
                }
                Some(f) = fetched.recv() => {
                    let now = Instant::now();
                    match f {
                        Fetched::New(r) => {
                            let spi = random_spi();
                            match &r {
                                Ok((id, m)) => ctl.on_new_key(now, Ok((*id, &m[..])), spi),
                                Err(e) => ctl.on_new_key(now, Err(e.clone()), spi),
                            }
                        }
                        Fetched::ById { spi, key_id, mac, result } => match &result {
                            Ok(m) => ctl.on_offered_key(now, spi, key_id, mac, Ok(&m[..])),
                            Err(e) => ctl.on_offered_key(now, spi, key_id, mac, Err(e.clone())),
                        },
                    }
                }
            };
            for a in actions {
                match a {
                    Action::FetchNew => {
                        let (c, peer, tx) =
                            (client.clone(), self.peer_sae.clone(), fetch_tx.clone());
                        tokio::spawn(async move {
                            let r = c
                                .enc_keys_retrying(&peer, 1, Some(KEY_BITS), 2)
                                .await
                                .map_err(|e| e.to_string())
                                .and_then(|mut keys| {
                                    keys.pop().ok_or_else(|| "KME sent no key".into())
                                })
                                .map(|k| (*k.id.as_bytes(), k.material.clone()));
                            let _ = tx.send(Fetched::New(r));
                        });
                    }
                    Action::FetchById { spi, key_id, mac } => {
                        let (c, peer, tx) =
                            (client.clone(), self.peer_sae.clone(), fetch_tx.clone());
                        tokio::spawn(async move {
                            let result = fetch_by_id(&c, &peer, key_id).await;
                            let _ = tx.send(Fetched::ById {
                                spi,
                                key_id,
                                mac,
                                result,
                            });
                        });
                    }
                    Action::Send(c) => send(&c.encode()),
                    Action::Install {
                        keys,
                        switch,
                        expires,
                    } => {
                        installer.install(&keys, switch, expires);
                        installed.push(keys);
                        if installed.len() > 4 {
                            installed.remove(0);
                        }
                    }
                    Action::Switch { spi, expires } => {
                        if let Some(k) = installed.iter().find(|k| k.spi == spi) {
                            installer.switch(k, expires);
                        }
                    }
                    Action::Retire { spi, at } => installer.retire(spi, at),
                    Action::Event(e) => {
                        log_event(&e);
                        if matches!(e, Event::Rekeyed { .. }) {
                            bytes_at_switch = installer.traffic();
                        }
                        installer.event(&e);
                    }
                }
            }
        }
    }
}

/// `dec_keys` of one key; a 4xx answer or a malformed one is permanent (the
/// KME will not give this key), anything else may heal.
async fn fetch_by_id(
    c: &EtsiClient,
    master: &str,
    key_id: [u8; 16],
) -> Result<Zeroizing<Vec<u8>>, FetchFailure> {
    match c.dec_keys(master, &[Uuid::from_bytes(key_id)]).await {
        Ok(mut keys) => keys.pop().map(|k| k.material.clone()).ok_or(FetchFailure {
            error: "KME sent no key".into(),
            permanent: true,
        }),
        Err(e) => Err(FetchFailure {
            permanent: matches!(
                e,
                ClientError::Api {
                    status: 400..=499,
                    ..
                } | ClientError::Malformed(_)
            ),
            error: e.to_string(),
        }),
    }
}

fn log_event(e: &Event) {
    match e {
        Event::Rekeyed { spi, n } => tracing::info!("key {n} in use (SPI {spi:#010x})"),
        Event::FetchFailed { error, retry_in } => {
            tracing::warn!(
                "no new key: {error}; retrying in {:.1} s",
                retry_in.as_secs_f64()
            )
        }
        Event::OfferTimedOut { spi } => {
            tracing::warn!("peer did not take key offer SPI {spi:#010x}; taking another key")
        }
        Event::BadOffer { spi } => tracing::warn!(
            "refused key offer SPI {spi:#010x}: MAC does not verify under the key it names"
        ),
        Event::Expired { spi } => tracing::error!(
            "key SPI {spi:#010x} reached its lifetime with no successor: tunnel closed, traffic dropped (fail closed) until a new key arrives"
        ),
        Event::Requested => tracing::info!("peer asked for a new key"),
    }
}

fn random_spi() -> u32 {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        // The SPI only names an epoch; uniqueness, not secrecy, matters.
        b = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos())
            .to_be_bytes();
    }
    u32::from_be_bytes(b).max(1)
}
