//! In-process KME networks for tests and benchmarks: `n` KMEs on loopback
//! (mutual TLS, SQLite stores in a temporary directory), joined by links that
//! carry seeded **test** key blocks ([`crate::testkeys`]: not secret).
//!
//! KME `i` is `k{i}` with SAE `sae-k{i}`; more SAEs can be attached. Every KME
//! knows every link (for relay routing) and peers with its neighbours. The
//! relay tests (`tests/relay.rs`) and the relay latency benchmark
//! (`examples/relay_bench.rs`) share this one harness.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::client::EtsiClient;
use crate::config::{
    KmeConfig, PeerConfig, RunningKme, SaeConfig, SyncMode, TlsPaths, launch_with_tls,
};
use crate::error::KmsError;
use crate::etsi::Limits;
use crate::identity::Identity;
use crate::ids::{KmeId, SaeId};
use crate::pki::Ca;
use crate::service::Kme;
use crate::testkeys::seeded_block;
use crate::tls::TlsMaterial;

/// Seed of the test blocks.
pub const MESH_SEED: u64 = 7;

/// Settings of a mesh.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// SQLite durability of every store.
    pub sync: SyncMode,
    /// Link-state poll interval, ms.
    pub link_state_interval_ms: u64,
    /// Timeout of one KME-to-KME call, ms.
    pub peer_timeout_ms: u64,
    /// Bytes per test block (a multiple of 32).
    pub block_bytes: usize,
    /// Extra SAEs: (ID, index of its KME).
    pub extra_saes: Vec<(String, usize)>,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            sync: SyncMode::Normal,
            link_state_interval_ms: 100,
            peer_timeout_ms: 3000,
            block_bytes: 32 * 64,
            extra_saes: Vec::new(),
        }
    }
}

/// A running mesh of KMEs. The temporary directory is removed on drop.
pub struct Mesh {
    dir: PathBuf,
    /// The CA of every certificate.
    pub ca: Ca,
    /// Configuration of each KME.
    pub cfgs: Vec<KmeConfig>,
    /// TLS material of each KME.
    pub tls: Vec<TlsMaterial>,
    /// The KMEs (`None` once stopped).
    pub kmes: Vec<Option<RunningKme>>,
    /// The links, as KME indices.
    pub edges: Vec<(usize, usize)>,
}

/// ID of KME `i`.
pub fn kme_name(i: usize) -> String {
    format!("k{i}")
}

/// ID of the SAE attached to KME `i`.
pub fn sae_name(i: usize) -> String {
    format!("sae-k{i}")
}

fn kme_id(i: usize) -> Result<KmeId, KmsError> {
    Ok(KmeId::new(&kme_name(i))?)
}

static DIRS: AtomicU64 = AtomicU64::new(0);

impl Mesh {
    /// Starts `n` KMEs joined by `edges`; link (a, b) gets `blocks(a, b)` test blocks.
    pub async fn start(
        n: usize,
        edges: &[(usize, usize)],
        blocks: impl Fn(usize, usize) -> u64,
        opts: &MeshOptions,
    ) -> Result<Mesh, KmsError> {
        let dir = std::env::temp_dir().join(format!(
            "qkdnet-mesh-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let ca = Ca::generate("qkdnet mesh test CA")?;
        let key_id_secret = dir.join("key-ids.secret");
        crate::key_id::create_secret(&key_id_secret)?;
        // One master key file for every KME of the mesh (each store draws its
        // own salt, so their ciphers differ anyway).
        let master_key = dir.join("master.key");
        crate::store::MasterKey::create_file(&master_key)?;
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
        }
        let addrs = listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<Result<Vec<_>, _>>()?;
        let mut saes = Vec::new();
        for i in 0..n {
            saes.push(SaeConfig {
                id: SaeId::new(&sae_name(i))?,
                kme: kme_id(i)?,
            });
        }
        for (s, i) in &opts.extra_saes {
            saes.push(SaeConfig {
                id: SaeId::new(s)?,
                kme: kme_id(*i)?,
            });
        }
        let links = edges
            .iter()
            .map(|&(a, b)| Ok([kme_id(a)?, kme_id(b)?]))
            .collect::<Result<Vec<_>, KmsError>>()?;
        let mut cfgs = Vec::new();
        let mut tls = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let mut peers = Vec::new();
            for &(a, b) in edges {
                let j = match (a == i, b == i) {
                    (true, _) => b,
                    (_, true) => a,
                    _ => continue,
                };
                peers.push(PeerConfig {
                    kme_id: kme_id(j)?,
                    url: format!("https://127.0.0.1:{}", addrs[j].port()),
                });
            }
            cfgs.push(KmeConfig {
                kme_id: kme_id(i)?,
                listen: *addr,
                store: dir.join(format!("{}.sqlite", kme_name(i))),
                store_synchronous: opts.sync,
                store_url: None,
                store_schema: None,
                tls: TlsPaths {
                    ca: "unused".into(),
                    cert: "unused".into(),
                    key: "unused".into(),
                    key_exchange: crate::tls::KeyExchange::default(),
                },
                limits: Limits::default(),
                peer_timeout_ms: opts.peer_timeout_ms,
                peer_attempts: 2,
                peers,
                saes: saes.clone(),
                test_keys: None,
                links: links.clone(),
                relay_attempts: 3,
                stock_keys: 0,
                link_state_interval_ms: opts.link_state_interval_ms,
                key_id_secret: Some(key_id_secret.clone()),
                store_key: Some(master_key.clone()),
                store_key_pkcs11: None,
                connections: Default::default(),
            });
            tls.push(ca.material(&Identity::Kme(kme_id(i)?), &[])?);
        }
        let mut kmes = Vec::new();
        for (i, l) in listeners.into_iter().enumerate() {
            kmes.push(Some(
                launch_with_tls(&cfgs[i], tls[i].clone(), Some(l)).await?,
            ));
        }
        let mesh = Mesh {
            dir,
            ca,
            cfgs,
            tls,
            kmes,
            edges: edges.to_vec(),
        };
        for &(a, b) in edges {
            let link = format!("{}{}", kme_name(a), kme_name(b));
            for blk in 0..blocks(a, b) {
                for (me, peer) in [(a, b), (b, a)] {
                    mesh.kme(me)?
                        .ingest(seeded_block(
                            MESH_SEED,
                            &link,
                            kme_id(peer)?,
                            blk,
                            opts.block_bytes,
                        ))
                        .await?;
                }
            }
        }
        Ok(mesh)
    }

    /// KME `i`, if running.
    pub fn kme(&self, i: usize) -> Result<&Arc<Kme>, KmsError> {
        self.kmes
            .get(i)
            .and_then(Option::as_ref)
            .map(|k| &k.kme)
            .ok_or_else(|| KmsError::Config(format!("KME {} is not running", kme_name(i))))
    }

    /// Base URL of KME `i`.
    pub fn url(&self, i: usize) -> String {
        format!("https://127.0.0.1:{}", self.cfgs[i].listen.port())
    }

    /// TLS material for an SAE.
    pub fn sae_tls(&self, sae: &str) -> Result<TlsMaterial, KmsError> {
        self.ca.material(&Identity::Sae(SaeId::new(sae)?), &[])
    }

    /// An ETSI 014 client for `sae` at KME `at`.
    pub fn client(&self, sae: &str, at: usize, timeout: Duration) -> Result<EtsiClient, KmsError> {
        Ok(EtsiClient::new(
            &self.url(at),
            &kme_id(at)?,
            &self.sae_tls(sae)?,
            timeout,
        )?)
    }

    /// Stops KME `i` (its store stays).
    pub async fn stop(&mut self, i: usize) {
        if let Some(k) = self.kmes.get_mut(i).and_then(Option::take) {
            k.server.shutdown().await;
        }
    }

    /// Starts KME `i` again on its port and store.
    pub async fn restart(&mut self, i: usize) -> Result<(), KmsError> {
        let mut listener = None;
        for _ in 0..100 {
            if let Ok(l) = tokio::net::TcpListener::bind(self.cfgs[i].listen).await {
                listener = Some(l);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kmes[i] = Some(launch_with_tls(&self.cfgs[i], self.tls[i].clone(), listener).await?);
        Ok(())
    }

    /// Units held at each end of every link between running KMEs: (a's pool
    /// for b, b's pool for a).
    pub async fn pools(&self) -> Result<BTreeMap<(usize, usize), (u64, u64)>, KmsError> {
        let mut m = BTreeMap::new();
        for &(a, b) in &self.edges {
            let (Ok(ka), Ok(kb)) = (self.kme(a), self.kme(b)) else {
                continue;
            };
            let pa = ka.store().pool_counts(kme_id(b)?).await?;
            let pb = kb.store().pool_counts(kme_id(a)?).await?;
            m.insert((a, b), (pa.total_units, pb.total_units));
        }
        Ok(m)
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
