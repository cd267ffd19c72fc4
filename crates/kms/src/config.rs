//! Configuration of a standalone KME (TOML) and start-up from it.
//!
//! A KME needs: its ID and listen address, its store, its TLS files, its limits,
//! its peer KMEs (ID and URL) and the directory of SAEs (which KME each SAE is
//! attached to — the only way a KME knows whether it may serve an SAE and which
//! peer to reserve keys with). Relative paths are relative to the configuration
//! file. `[test_keys]` injects seeded test material and exists only when written
//! explicitly. Example:
//!
//! The store is either an SQLite file (`store`, the embedded default) or a
//! PostgreSQL database (`store_url`), never both. With `store_url`, the KME's tables
//! live in the schema `store_schema` (default `kms_<kme_id>`), so several KMEs can
//! share one server and database. The connection to PostgreSQL has no TLS: put the
//! database on loopback or a trusted network. The URL may carry a password; the
//! configuration's `Debug` output never shows it, but the file itself should be
//! readable only by the KME.
//!
//! `store_key` names the node master key file (32 random bytes, mode 0600; the
//! KME refuses a file that group or others may read): every unit of key material
//! in the store is encrypted under a key derived from it, so a copy of the
//! database yields no keys ([`crate::store::cipher`]). A store written in the clear
//! is encrypted when first opened with a key; a store encrypted under another key,
//! or opened without one, is refused. Keep the key file apart from the store's
//! backups: whoever holds both holds the keys. Without `store_key` the KME warns at
//! start-up that key material is stored in the clear.
//!
//! `[store_key_pkcs11]`, instead of `store_key`, keeps the node master key in a
//! PKCS#11 token (an HSM): a non-extractable key there (created by `qkdnet kme
//! master-key --config FILE`) from which the token derives the store's master
//! key with HMAC-SHA256 at start-up ([`crate::store::pkcs11`]). The user PIN
//! comes from `pin_file` (mode 0600) or the environment variable `pin_env`, never
//! from this file. A wrong PIN, a missing module or key stops the KME before its
//! store is opened.
//!
//! ```toml
//! kme_id = "kme-a"
//! listen = "127.0.0.1:8443"
//! store = "kme-a.sqlite"          # SQLite, WAL, synchronous=FULL
//! key_id_secret = "pki/key-ids.secret" # 32 bytes shared by the network's KMEs: opaque key IDs
//! store_key = "master.key"        # node master key (32 bytes, mode 0600): keys encrypted at rest
//! # store_synchronous = "normal"  # only to compare; survives crashes, not power loss
//! # or, instead of `store_key`, the node master key in a PKCS#11 token (see below)
//! # or, instead of `store`:
//! # store_url = "postgres://qkdnet@127.0.0.1:5432/qkdnet"
//! # store_schema = "kms_kme-a"    # optional; this is the default
//!
//! # [store_key_pkcs11]
//! # module = "/usr/lib/softhsm/libsofthsm2.so"  # the token's PKCS#11 module, absolute path
//! # token_label = "qkdnet-kme-a"
//! # key_label = "qkdnet-master"    # created by `qkdnet kme master-key --config kme-a.toml`
//! # pin_file = "hsm-user.pin"      # user PIN, mode 0600; or pin_env = "VARIABLE"
//!
//! [tls]
//! ca = "pki/ca.pem"
//! cert = "pki/kme-kme-a.pem"
//! key = "pki/kme-kme-a.key"
//! # key_exchange = "allow-classical"  # default "hybrid-only": X25519MLKEM768, TLS 1.3
//!
//! [limits]                         # all optional; these are the defaults
//! key_size = 256
//! min_key_size = 8
//! max_key_size = 8192
//! max_key_per_request = 1024
//! max_key_count = 1000000
//! max_body_bytes = 262144
//!
//! [connections]                    # all optional; these are the defaults
//! max_connections = 4096           # all callers together
//! max_connections_per_sae = 64
//! max_connections_per_kme = 512
//! body_timeout_ms = 10000          # a request body must arrive within this
//! idle_timeout_ms = 120000         # silent connections are closed
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
use crate::server::{ServerHandle, serve_with};
use crate::service::{Kme, KmeSettings};
use crate::store::pkcs11::Pkcs11KeyConfig;
use crate::store::postgres::{PostgresOptions, PostgresStore, PostgresUrl, SchemaName};
use crate::store::sqlite::{Durability, SqliteStore};
use crate::store::{KeyStore, MasterKey, StoreError};
use crate::tls::{KeyExchange, TlsMaterial, server_config};

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
    /// Key exchange offered to SAEs: `hybrid-only` (X25519MLKEM768, TLS 1.3; the
    /// default) or `allow-classical` (also X25519/P-256, for SAEs whose TLS library
    /// has no ML-KEM, such as OpenSSL before 3.5). KME-to-KME connections are
    /// always hybrid-only.
    #[serde(default)]
    pub key_exchange: KeyExchange,
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

impl TestKeysConfig {
    /// The link ID the test blocks carry (always `TEST-…`).
    pub fn link_id(&self) -> String {
        crate::testkeys::test_link_id(&self.link)
    }
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
/// A TOML error as "line L, column C: message", without the quote of the offending
/// line that the error's `Display` adds: that line could be the store URL with its
/// password.
fn toml_error(text: &str, e: &toml::de::Error) -> KmsError {
    KmsError::Config(toml_error_message(text, e))
}

/// The message of the KME's own TOML errors, for other configuration files that embed a
/// [`KmeConfig`] (the node's): "line L, column C: message", no quoted line.
pub fn toml_error_message(text: &str, e: &toml::de::Error) -> String {
    let at = e.span().and_then(|span| {
        let before = text.get(..span.start)?;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Some((
            before.matches('\n').count() + 1,
            before[line_start..].chars().count() + 1,
        ))
    });
    match at {
        Some((line, column)) => format!("line {line}, column {column}: {}", e.message()),
        None => e.message().to_owned(),
    }
}

fn path_is_empty(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

/// The store a [`KmeConfig`] selects.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum StoreChoice<'a> {
    /// An SQLite file.
    Sqlite {
        /// Its path.
        path: &'a Path,
        /// Its durability.
        durability: Durability,
    },
    /// A PostgreSQL database.
    Postgres {
        /// The connection URL.
        url: &'a PostgresUrl,
        /// The schema of this KME's tables.
        schema: SchemaName,
    },
}

impl StoreChoice<'_> {
    /// Opens the store, its key material encrypted under `master` if given (see
    /// [`crate::store::cipher`]).
    pub async fn open(&self, master: Option<MasterKey>) -> Result<Arc<dyn KeyStore>, StoreError> {
        Ok(match self {
            StoreChoice::Sqlite { path, durability } => {
                Arc::new(SqliteStore::open_keyed(path, *durability, master.as_ref())?)
            }
            StoreChoice::Postgres { url, schema } => {
                let options = PostgresOptions {
                    master_key: master,
                    ..Default::default()
                };
                Arc::new(PostgresStore::open(url, schema, options).await?)
            }
        })
    }
}

/// Where the node master key comes from ([`KmeConfig::master_key_source`]).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum MasterKeySource {
    /// A file of 32 bytes, mode 0600 (`store_key`).
    File(PathBuf),
    /// A non-extractable key in a PKCS#11 token (`[store_key_pkcs11]`).
    Pkcs11(Pkcs11KeyConfig),
}

impl MasterKeySource {
    /// Reads the key file, or has the token derive the master key (blocking:
    /// a network HSM may take a while).
    pub fn load(&self) -> Result<MasterKey, KmsError> {
        match self {
            MasterKeySource::File(path) => MasterKey::read_file(path),
            MasterKeySource::Pkcs11(p) => {
                let key = p.derive_master_key()?;
                tracing::info!(
                    token = %p.token_label,
                    key = %p.key_label,
                    "node master key derived in the PKCS#11 token"
                );
                Ok(key)
            }
        }
    }

    /// Creates the key this source names: a new key file, or a
    /// non-extractable key in the token. An existing one is never replaced,
    /// only checked (a file's mode and length; a token key's attributes and a
    /// derivation). Returns what was done, in words.
    pub fn create(&self) -> Result<String, KmsError> {
        match self {
            MasterKeySource::File(path) if path.exists() => {
                MasterKey::read_file(path)?; // usable as it is?
                Ok(format!(
                    "kept the existing node master key file {}",
                    path.display()
                ))
            }
            MasterKeySource::File(path) => {
                MasterKey::create_file(path)?;
                Ok(format!(
                    "created the node master key file {}",
                    path.display()
                ))
            }
            MasterKeySource::Pkcs11(p) => {
                let what = match crate::store::pkcs11::create_master_key(p)? {
                    crate::store::pkcs11::Created::New => "created",
                    crate::store::pkcs11::Created::AlreadyThere => {
                        p.derive_master_key()?; // usable as it is?
                        "kept the existing"
                    }
                };
                Ok(format!(
                    "{what} node master key '{}' in PKCS#11 token '{}' (non-extractable, \
                     sensitive, HMAC signing only)",
                    p.key_label, p.token_label
                ))
            }
        }
    }
}

/// Configuration of a standalone KME.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct KmeConfig {
    /// This KME's ID.
    pub kme_id: KmeId,
    /// Listen address.
    pub listen: SocketAddr,
    /// SQLite store path (empty when `store_url` is used instead).
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub store: PathBuf,
    /// SQLite synchronous mode.
    #[serde(default)]
    pub store_synchronous: SyncMode,
    /// PostgreSQL store, instead of `store`: a connection URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_url: Option<PostgresUrl>,
    /// PostgreSQL schema of this KME's tables (default `kms_<kme_id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_schema: Option<SchemaName>,
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
    /// Every KME-to-KME link of the network, `[["a", "b"], …]`, so that keys for
    /// SAEs on distant KMEs can be relayed (this KME's own peers are always
    /// links). Empty: only neighbours' SAEs are reachable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<[KmeId; 2]>,
    /// Routes tried for one relayed request before giving up.
    #[serde(default = "default_relay_attempts")]
    pub relay_attempts: u32,
    /// Keys kept in stock per pair of SAEs (master here, slave at a neighbour) and
    /// key size, agreed with the neighbour ahead of the pair's next enc_keys; 0
    /// turns key stock off. PostgreSQL stores keep no stock.
    #[serde(default = "default_stock_keys")]
    pub stock_keys: u32,
    /// How often the neighbours' link state (key available per link) is polled, ms.
    #[serde(default = "default_link_state_ms")]
    pub link_state_interval_ms: u64,
    /// File holding the network's key-ID secret (32 bytes, shared by every KME of
    /// the network): key IDs cross the ETSI API as opaque IDs
    /// ([`crate::key_id`]). Without it SAEs see the structured unit IDs (and the
    /// KME warns at start-up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id_secret: Option<PathBuf>,
    /// File holding this node's master key (32 bytes, mode 0600): key material
    /// in the store is encrypted under it ([`crate::store::cipher`]). Without it
    /// the store keeps key material in the clear (and the KME warns at start-up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_key: Option<PathBuf>,
    /// The node master key in a PKCS#11 token instead of a file
    /// (`[store_key_pkcs11]`, [`crate::store::pkcs11`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_key_pkcs11: Option<Pkcs11KeyConfig>,
    /// Connection limits and timeouts (`[connections]`).
    #[serde(default)]
    pub connections: crate::server::ConnectionLimits,
}

fn default_relay_attempts() -> u32 {
    3
}
/// Default [`KmeConfig::stock_keys`].
pub fn default_stock_keys() -> u32 {
    512
}
fn default_link_state_ms() -> u64 {
    1000
}

impl KmeConfig {
    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, KmsError> {
        let c: Self = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        c.limits.check()?;
        c.store_choice()?;
        c.master_key_source()?;
        Ok(c)
    }

    /// Where the node master key comes from: `store_key` (a file) or
    /// `[store_key_pkcs11]` (a token), at most one of them; `None`: no key
    /// (material in the clear).
    pub fn master_key_source(&self) -> Result<Option<MasterKeySource>, KmsError> {
        match (&self.store_key, &self.store_key_pkcs11) {
            (None, None) => Ok(None),
            (Some(f), None) => Ok(Some(MasterKeySource::File(f.clone()))),
            (None, Some(p)) => {
                p.check()?;
                Ok(Some(MasterKeySource::Pkcs11(p.clone())))
            }
            (Some(_), Some(_)) => Err(KmsError::Config(
                "set either store_key (a master key file) or [store_key_pkcs11] (a key in a \
                 PKCS#11 token), not both"
                    .into(),
            )),
        }
    }

    /// The store this configuration selects: `store` (SQLite) or `store_url`
    /// (PostgreSQL), exactly one of them.
    pub fn store_choice(&self) -> Result<StoreChoice<'_>, KmsError> {
        match (&self.store_url, path_is_empty(&self.store)) {
            (None, false) => {
                if self.store_schema.is_some() {
                    return Err(KmsError::Config(
                        "store_schema applies to a PostgreSQL store (store_url) only".into(),
                    ));
                }
                Ok(StoreChoice::Sqlite {
                    path: &self.store,
                    durability: match self.store_synchronous {
                        SyncMode::Full => Durability::Full,
                        SyncMode::Normal => Durability::Normal,
                    },
                })
            }
            (Some(url), true) => {
                if self.store_synchronous != SyncMode::Full {
                    return Err(KmsError::Config(
                        "store_synchronous applies to an SQLite store (store) only".into(),
                    ));
                }
                let schema = match &self.store_schema {
                    Some(s) => s.clone(),
                    None => SchemaName::for_kme(&self.kme_id).map_err(|e| {
                        KmsError::Config(format!("{e}; set store_schema explicitly"))
                    })?,
                };
                Ok(StoreChoice::Postgres { url, schema })
            }
            (Some(_), false) => Err(KmsError::Config(
                "set either store (SQLite file) or store_url (PostgreSQL), not both".into(),
            )),
            (None, true) => Err(KmsError::Config(
                "no key store: set store (SQLite file) or store_url (PostgreSQL)".into(),
            )),
        }
    }

    /// Reads a file; relative paths in it are made relative to its directory.
    pub fn from_file(path: &Path) -> Result<Self, KmsError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| KmsError::Config(format!("cannot read {}: {e}", path.display())))?;
        let mut c = Self::from_toml(&text)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let pin_file = c
            .store_key_pkcs11
            .as_mut()
            .and_then(|p| p.pin_file.as_mut());
        let secret = c
            .key_id_secret
            .iter_mut()
            .chain(c.store_key.iter_mut())
            .chain(pin_file);
        for p in [&mut c.store, &mut c.tls.ca, &mut c.tls.cert, &mut c.tls.key]
            .into_iter()
            .chain(secret)
        {
            // An empty `store` means "PostgreSQL instead" and stays empty.
            if p.is_relative() && !path_is_empty(p) {
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
    /// The link-state poller (stops with the KME).
    _link_state: AbortOnDrop,
}

/// A background task that ends when its owner is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
    // Before the store is touched: a wrong PIN or a missing key stops here.
    let master = match cfg.master_key_source()? {
        Some(source) => Some(
            tokio::task::spawn_blocking(move || source.load())
                .await
                .map_err(|e| KmsError::Config(format!("reading the node master key: {e}")))??,
        ),
        None => None,
    };
    let store = cfg.store_choice()?.open(master).await?;
    let timeout = Duration::from_millis(cfg.peer_timeout_ms.max(1));
    let peers = cfg
        .peers
        .iter()
        .map(|p| PeerClient::new(p.kme_id.clone(), &p.url, &tls, timeout))
        .collect::<Result<Vec<_>, _>>()?;
    let key_ids = match &cfg.key_id_secret {
        Some(p) => crate::key_id::KeyIdCodec::opaque(&zeroize::Zeroizing::new(
            crate::key_id::read_secret(p)?,
        )),
        None => {
            tracing::warn!(
                "no key_id_secret configured: SAEs see structured (predictable) key IDs"
            );
            crate::key_id::KeyIdCodec::Structured
        }
    };
    let settings = KmeSettings {
        key_ids,
        id: cfg.kme_id.clone(),
        limits: cfg.limits,
        saes: cfg.sae_map()?,
        peer_attempts: cfg.peer_attempts,
        links: cfg
            .links
            .iter()
            .map(|[a, b]| (a.clone(), b.clone()))
            .collect(),
        relay_attempts: cfg.relay_attempts,
        stock_keys: cfg.stock_keys,
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
    let server = serve_with(
        kme.clone(),
        server_config(&tls, cfg.tls.key_exchange)?,
        listener,
        cfg.connections,
    )?;
    let link_state = crate::relay::spawn_link_state(
        kme.relay(),
        Duration::from_millis(cfg.link_state_interval_ms.max(50)),
    );
    Ok(RunningKme {
        kme,
        server,
        test_blocks_ingested,
        _link_state: AbortOnDrop(link_state),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
kme_id = "kme-a"
listen = "127.0.0.1:8443"
[tls]
ca = "ca.pem"
cert = "kme.pem"
key = "kme.key"
"#;

    fn parse(store: &str) -> Result<KmeConfig, KmsError> {
        let (head, tail) = BASE.split_at(BASE.find("[tls]").expect("table"));
        KmeConfig::from_toml(&format!("{head}{store}\n{tail}"))
    }

    #[test]
    fn the_store_is_sqlite_or_postgres_never_both() {
        let c = parse(r#"store = "a.sqlite""#).expect("SQLite");
        assert!(matches!(c.store_choice(), Ok(StoreChoice::Sqlite { .. })));
        let c = parse(r#"store_url = "postgres://kms:pw@127.0.0.1:5432/qkd""#).expect("PostgreSQL");
        match c.store_choice() {
            Ok(StoreChoice::Postgres { schema, .. }) => assert_eq!(schema.as_str(), "kms_kme-a"),
            other => panic!("{other:?}"),
        }
        let c = parse("store_url = \"postgres://127.0.0.1/qkd\"\nstore_schema = \"shared_a\"")
            .expect("explicit schema");
        match c.store_choice() {
            Ok(StoreChoice::Postgres { schema, .. }) => assert_eq!(schema.as_str(), "shared_a"),
            other => panic!("{other:?}"),
        }
        for bad in [
            "",
            "store = \"a.sqlite\"\nstore_url = \"postgres://127.0.0.1/qkd\"",
            "store = \"a.sqlite\"\nstore_schema = \"x\"",
            "store_url = \"postgres://127.0.0.1/qkd\"\nstore_synchronous = \"normal\"",
            "store_url = \"postgres://127.0.0.1/qkd\"\nstore_schema = \"pg_catalog\"",
            "store_url = \"postgres://127.0.0.1:port/qkd\"",
        ] {
            assert!(parse(bad).is_err(), "accepted: {bad}");
        }
    }

    #[test]
    fn the_store_password_stays_out_of_debug_and_errors_but_round_trips() {
        let c = parse(r#"store_url = "postgres://kms:hunter2pw@127.0.0.1:5432/qkd""#)
            .expect("PostgreSQL");
        assert!(!format!("{c:?}").contains("hunter2pw"));
        let e = parse(r#"store_url = "postgres://kms:hunter2pw@127.0.0.1:x/qkd""#)
            .expect_err("bad port");
        assert!(!e.to_string().contains("hunter2pw"), "{e}");
        // Serialized (as the launcher writes node files) and read back unchanged.
        let text = toml::to_string(&c).expect("serialize");
        assert!(!text.contains("store ="), "no empty SQLite path: {text}");
        let back = KmeConfig::from_toml(&text).expect("reparse");
        assert_eq!(
            back.store_url.as_ref().map(PostgresUrl::as_str),
            Some("postgres://kms:hunter2pw@127.0.0.1:5432/qkd")
        );
        let c = parse(r#"store = "a.sqlite""#).expect("SQLite");
        let text = toml::to_string(&c).expect("serialize");
        assert!(!text.contains("store_url"), "{text}");
        assert!(KmeConfig::from_toml(&text).is_ok());
    }

    #[test]
    fn the_master_key_is_a_file_or_a_token_key_never_both() {
        let token = "[store_key_pkcs11]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\n\
                     token_label = \"t\"\nkey_label = \"k\"\n";
        let with = |extra: &str| {
            let (head, tail) = BASE.split_at(BASE.find("[tls]").expect("table"));
            KmeConfig::from_toml(&format!("{head}store = \"a.sqlite\"\n{extra}\n{tail}"))
        };
        let c = with(&format!("{token}pin_file = \"pin\"")).expect("token key");
        assert!(matches!(
            c.master_key_source(),
            Ok(Some(MasterKeySource::Pkcs11(_)))
        ));
        let text = toml::to_string(&c).expect("serialize");
        assert_eq!(
            KmeConfig::from_toml(&text)
                .expect("reparse")
                .store_key_pkcs11,
            c.store_key_pkcs11
        );
        let c = with("store_key = \"m.key\"").expect("file key");
        assert!(matches!(
            c.master_key_source(),
            Ok(Some(MasterKeySource::File(_)))
        ));
        assert!(matches!(
            with("").map(|c| c.master_key_source()),
            Ok(Ok(None))
        ));
        for bad in [
            format!("store_key = \"m.key\"\n{token}pin_file = \"pin\""),
            token.to_owned(),
            format!("{token}pin_file = \"pin\"\npin_env = \"V\""),
            format!("{token}pin = \"1234\""),
            token.replace("/usr/lib/softhsm/", "") + "pin_env = \"V\"",
        ] {
            assert!(with(&bad).is_err(), "accepted: {bad}");
        }
    }

    #[test]
    fn relative_store_paths_follow_the_file_and_an_absent_one_stays_absent() {
        let dir = std::env::temp_dir().join(format!("qkdnet-kms-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("kme.toml");
        let (head, tail) = BASE.split_at(BASE.find("[tls]").expect("table"));
        std::fs::write(
            &f,
            format!("{head}store_url = \"postgres://127.0.0.1/q\"\n{tail}"),
        )
        .expect("write");
        let c = KmeConfig::from_file(&f).expect("read");
        assert!(c.store.as_os_str().is_empty());
        assert!(matches!(c.store_choice(), Ok(StoreChoice::Postgres { .. })));
        std::fs::write(&f, format!("{head}store = \"a.sqlite\"\n{tail}")).expect("write");
        let c = KmeConfig::from_file(&f).expect("read");
        assert_eq!(c.store, dir.join("a.sqlite"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
