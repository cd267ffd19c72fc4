//! Configuration of a standalone KME (TOML) and start-up from it.
//!
//! A KME needs: its ID and listen address, its store, its TLS files, its limits,
//! its peer KMEs (ID and URL) and the directory of SAEs (which KME each SAE is
//! attached to — the only way a KME knows whether it may serve an SAE and which
//! peer to reserve keys with). Relative paths are relative to the configuration
//! file. `[test_keys]` injects seeded test material and exists only when written
//! explicitly. Example:
//!
//! ```toml
//! kme_id = "kme-a"
//! listen = "127.0.0.1:8443"
//! store = "kme-a.sqlite"          # SQLite, WAL, synchronous=FULL
//! # store_synchronous = "normal"  # only to compare; survives crashes, not power loss
//!
//! [tls]
//! ca = "pki/ca.pem"
//! cert = "pki/kme-kme-a.pem"
//! key = "pki/kme-kme-a.key"
//!
//! [limits]                         # all optional; these are the defaults
//! key_size = 256
//! min_key_size = 8
//! max_key_size = 8192
//! max_key_per_request = 1024
//! max_key_count = 1000000
//! max_body_bytes = 262144
//!
//! [[peer]]
//! kme_id = "kme-b"
//! url = "https://127.0.0.1:8444"
//!
//! [[sae]]
//! id = "alice"
//! kme = "kme-a"
//! [[sae]]
//! id = "bob"
//! kme = "kme-b"
//!
//! # TEST MATERIAL ONLY: both KMEs of the link derive the same blocks from the seed.
//! # [test_keys]
//! # seeded = 42
//! # peer = "kme-b"
//! # link = "a-b"
//! # blocks = 64
//! # block_bytes = 65536
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::error::KmsError;
use crate::etsi::Limits;
use crate::ids::{KmeId, SaeId};
use crate::peer::PeerClient;
use crate::server::{ServerHandle, serve};
use crate::service::{Kme, KmeSettings};
use crate::store::StoreError;
use crate::store::sqlite::{Durability, SqliteStore};
use crate::tls::{TlsMaterial, server_config};

/// Synchronous mode of the SQLite store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// `synchronous=FULL` (default).
    #[default]
    Full,
    /// `synchronous=NORMAL`.
    Normal,
}

/// TLS file paths.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// This KME's certificate (PEM).
    pub cert: PathBuf,
    /// This KME's private key (PEM).
    pub key: PathBuf,
}

/// A peer KME.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its ID.
    pub kme_id: KmeId,
    /// Its base URL, `https://host:port`.
    pub url: String,
}

/// An SAE of the network and the KME it is attached to.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SaeConfig {
    /// SAE ID.
    pub id: SaeId,
    /// Its KME.
    pub kme: KmeId,
}

/// Seeded test key blocks (TEST MATERIAL, NOT SECRET).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TestKeysConfig {
    /// The seed (both ends must use the same).
    pub seeded: u64,
    /// The peer KME of the test link.
    pub peer: KmeId,
    /// Link name (prefixed with `TEST-`).
    #[serde(default = "default_test_link")]
    pub link: String,
    /// Number of blocks.
    #[serde(default = "default_test_blocks")]
    pub blocks: u64,
    /// Bytes per block.
    #[serde(default = "default_test_block_bytes")]
    pub block_bytes: usize,
}

fn default_test_link() -> String {
    "link".into()
}
fn default_test_blocks() -> u64 {
    16
}
fn default_test_block_bytes() -> usize {
    65536
}
fn default_peer_timeout_ms() -> u64 {
    5000
}
fn default_peer_attempts() -> u32 {
    2
}

/// Configuration of a standalone KME.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct KmeConfig {
    /// This KME's ID.
    pub kme_id: KmeId,
    /// Listen address.
    pub listen: SocketAddr,
    /// SQLite store path.
    pub store: PathBuf,
    /// SQLite synchronous mode.
    #[serde(default)]
    pub store_synchronous: SyncMode,
    /// TLS files.
    pub tls: TlsPaths,
    /// Limits.
    #[serde(default)]
    pub limits: Limits,
    /// Timeout of one call to a peer KME, ms.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
    /// Attempts to get a peer's acknowledgement.
    #[serde(default = "default_peer_attempts")]
    pub peer_attempts: u32,
    /// Peer KMEs.
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerConfig>,
    /// SAEs of the network.
    #[serde(default, rename = "sae")]
    pub saes: Vec<SaeConfig>,
    /// Seeded test key blocks — TEST MATERIAL, only when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_keys: Option<TestKeysConfig>,
}

impl KmeConfig {
    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, KmsError> {
        let c: Self = toml::from_str(text).map_err(|e| KmsError::Config(e.to_string()))?;
        c.limits.check()?;
        Ok(c)
    }

    /// Reads a file; relative paths in it are made relative to its directory.
    pub fn from_file(path: &Path) -> Result<Self, KmsError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| KmsError::Config(format!("cannot read {}: {e}", path.display())))?;
        let mut c = Self::from_toml(&text)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.store, &mut c.tls.ca, &mut c.tls.cert, &mut c.tls.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(c)
    }

    /// The SAE directory as a map (duplicates refused).
    pub fn sae_map(&self) -> Result<HashMap<SaeId, KmeId>, KmsError> {
        let mut m = HashMap::new();
        for s in &self.saes {
            if m.insert(s.id.clone(), s.kme.clone()).is_some() {
                return Err(KmsError::Config(format!("SAE {} listed twice", s.id)));
            }
        }
        Ok(m)
    }
}

/// A running KME: the service and its server.
pub struct RunningKme {
    /// The KME.
    pub kme: Arc<Kme>,
    /// The HTTPS server.
    pub server: ServerHandle,
    /// Test blocks ingested at start-up (0 without `[test_keys]`).
    pub test_blocks_ingested: u64,
}

/// Starts a KME from its configuration, on `listener` if given (tests bind port 0
/// first) or on `cfg.listen`. Opens the store, voids requests a previous run left
/// pending, injects configured test blocks, and serves.
pub async fn launch(
    cfg: &KmeConfig,
    listener: Option<tokio::net::TcpListener>,
) -> Result<RunningKme, KmsError> {
    let tls = TlsMaterial::from_files(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
    launch_with_tls(cfg, tls, listener).await
}

/// [`launch`] with TLS material already in memory.
pub async fn launch_with_tls(
    cfg: &KmeConfig,
    tls: TlsMaterial,
    listener: Option<tokio::net::TcpListener>,
) -> Result<RunningKme, KmsError> {
    match tls.own_identity()? {
        crate::identity::Identity::Kme(k) if k == cfg.kme_id => {}
        _ => {
            return Err(KmsError::Config(format!(
                "the TLS certificate is not that of KME {}",
                cfg.kme_id
            )));
        }
    }
    let durability = match cfg.store_synchronous {
        SyncMode::Full => Durability::Full,
        SyncMode::Normal => Durability::Normal,
    };
    let store = Arc::new(SqliteStore::open_with(&cfg.store, durability)?);
    let timeout = Duration::from_millis(cfg.peer_timeout_ms.max(1));
    let peers = cfg
        .peers
        .iter()
        .map(|p| PeerClient::new(p.kme_id.clone(), &p.url, &tls, timeout))
        .collect::<Result<Vec<_>, _>>()?;
    let settings = KmeSettings {
        id: cfg.kme_id.clone(),
        limits: cfg.limits,
        saes: cfg.sae_map()?,
        peer_attempts: cfg.peer_attempts,
    };
    let kme = Arc::new(Kme::new(settings, store, peers)?);
    kme.recover().await?;
    let mut test_blocks_ingested = 0;
    if let Some(t) = &cfg.test_keys {
        tracing::warn!(link = %crate::testkeys::test_link_id(&t.link), "injecting seeded TEST key material (not secret)");
        for n in 0..t.blocks {
            let b =
                crate::testkeys::seeded_block(t.seeded, &t.link, t.peer.clone(), n, t.block_bytes);
            match kme.ingest(b).await {
                Ok(_) => test_blocks_ingested += 1,
                Err(KmsError::Store(StoreError::DuplicateBlock)) => {} // ingested by a previous run
                Err(e) => return Err(e),
            }
        }
    }
    let listener = match listener {
        Some(l) => l,
        None => tokio::net::TcpListener::bind(cfg.listen).await?,
    };
    let server = serve(kme.clone(), server_config(&tls)?, listener)?;
    Ok(RunningKme {
        kme,
        server,
        test_blocks_ingested,
    })
}
