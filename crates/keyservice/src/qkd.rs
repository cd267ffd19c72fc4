//! Session keys from the QKD network, with the CSPRNG as the fallback.
//!
//! The service's node has a KME; the service is one of its SAEs. A background
//! task keeps a pool of 256-bit keys obtained over ETSI GS QKD 014 (`enc_keys`
//! with a configured peer SAE at another node as slave: ETSI 014 only hands out
//! keys shared with a remote SAE) and a session draws one from the pool. When
//! the pool is empty (the node is short of key, the KME is unreachable) the
//! session key comes from the operating system's CSPRNG instead; every grant
//! says which ([`KeySource`], authenticated in the grant) and the counters here
//! feed the metrics and the benchmark's "fraction from QKD".
//!
//! **What the peer can see.** The peer SAE's KME holds the same keys until they
//! expire there; in the trusted-node model every node on the path is trusted
//! with the keys it relays, so this is the same trust as any relayed key. Pick
//! as peer an SAE of the operator's own (a second key-service site), not a
//! subscriber's.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qkdnet_etsi::client::EtsiClient;
use qkdnet_media::Key256;
use qkdnet_media::proto::KeySource;

use crate::records::SessionKeys;

/// Counters of where session keys came from.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Session keys drawn from QKD keys.
    pub qkd: AtomicU64,
    /// Session keys drawn from the CSPRNG.
    pub csprng: AtomicU64,
    /// QKD keys obtained from the KME.
    pub fetched: AtomicU64,
    /// Failed refills.
    pub refill_errors: AtomicU64,
}

/// The pool of QKD keys and its counters.
#[derive(Clone, Debug, Default)]
pub struct KeyPool {
    keys: Arc<Mutex<VecDeque<Key256>>>,
    /// Counters.
    pub stats: Arc<SourceStats>,
}

impl KeyPool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// QKD keys waiting.
    pub fn level(&self) -> usize {
        self.keys.lock().map_or(0, |k| k.len())
    }

    /// Adds keys.
    pub fn extend(&self, keys: impl IntoIterator<Item = Key256>) {
        if let Ok(mut k) = self.keys.lock() {
            let before = k.len();
            k.extend(keys);
            self.stats
                .fetched
                .fetch_add((k.len() - before) as u64, Ordering::Relaxed);
        }
    }

    /// Keeps the pool between `target / 2` and `target` keys from `client`
    /// (`enc_keys` toward `peer_sae`, batches of at most 256), for ever.
    pub fn spawn_refill(
        &self,
        client: EtsiClient,
        peer_sae: String,
        target: usize,
    ) -> tokio::task::JoinHandle<()> {
        let pool = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                let level = pool.level();
                if level >= target / 2 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                let want = (target - level).clamp(1, 256) as u64;
                match client.enc_keys(&peer_sae, want, Some(256)).await {
                    Ok(keys) => {
                        delay = Duration::from_millis(200);
                        pool.extend(
                            keys.into_iter()
                                .filter_map(|k| Key256::from_slice(&k.material).ok()),
                        );
                    }
                    Err(e) => {
                        pool.stats.refill_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            "session keys from the QKD network: {e}; the CSPRNG stands in until the KME has key"
                        );
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        })
    }

    /// The drawer the store uses.
    pub fn drawer(&self) -> Box<dyn SessionKeys> {
        Box::new(self.clone())
    }
}

impl SessionKeys for KeyPool {
    fn draw(&mut self) -> (Key256, KeySource) {
        if let Some(k) = self.keys.lock().ok().and_then(|mut k| k.pop_front()) {
            self.stats.qkd.fetch_add(1, Ordering::Relaxed);
            return (k, KeySource::Qkd);
        }
        self.stats.csprng.fetch_add(1, Ordering::Relaxed);
        let mut b = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut b[..]).expect("invariant: the OS CSPRNG works");
        (Key256::new(*b), KeySource::Csprng)
    }
}
