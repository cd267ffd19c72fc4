//! Test harness: a CA, two KMEs (A and B) on 127.0.0.1 with SQLite stores in a
//! temporary directory, seeded test key blocks, and mTLS clients for SAEs.
#![allow(dead_code, missing_docs)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use qkdnet_kms::config::{
    KmeConfig, PeerConfig, RunningKme, SaeConfig, SyncMode, TlsPaths, launch_with_tls,
};
use qkdnet_kms::etsi::Limits;
use qkdnet_kms::identity::Identity;
use qkdnet_kms::ids::{KmeId, SaeId};
use qkdnet_kms::pki::Ca;
use qkdnet_kms::testkeys::seeded_block;
use qkdnet_kms::tls::{KeyExchange, TlsMaterial};
use serde_json::Value;

pub const SEED: u64 = 7;
pub const BLOCK_BYTES: usize = 32 * 64; // 64 units per block

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary directory (removed on drop).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("qkdnet-kms-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The PostgreSQL server for tests: `QKDNET_TEST_PG` (scripts/postgres.sh starts one
/// and prints the line to export); see [`test_env`].
pub fn test_pg_url(test: &str) -> Option<String> {
    test_env(
        "QKDNET_TEST_PG",
        test,
        "the PostgreSQL store",
        "export \"$(bash scripts/postgres.sh)\"",
    )
}

/// A real component's environment variable `var`, set by one of the scripts.
/// Unset, the caller's test (or variant) is skipped with a line on stderr
/// (written past the test harness's capture so that it shows), except in CI
/// (`CI` set and not `false`/`0`), where an unset variable fails the test: CI
/// must not skip `what` silently. `how` says how to set it.
pub fn test_env(var: &str, test: &str, what: &str, how: &str) -> Option<String> {
    use std::io::Write;
    match std::env::var(var) {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ => {
            let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "false" | "0"));
            assert!(
                !ci,
                "{test}: {var} is not set and CI must not skip the tests of {what}: \
                 run `{how}` first"
            );
            let _ = writeln!(
                std::io::stderr(),
                "{test}: skipped: {var} not set (run `{how}`)"
            );
            None
        }
    }
}

pub fn kme(s: &str) -> KmeId {
    KmeId::new(s).expect("valid KME ID")
}
pub fn sae(s: &str) -> SaeId {
    SaeId::new(s).expect("valid SAE ID")
}

/// Two KMEs, A (alice, eve) and B (bob, carol).
pub struct Net {
    pub dir: TempDir,
    pub ca: Ca,
    pub a: Option<RunningKme>,
    pub b: Option<RunningKme>,
    pub cfg_a: KmeConfig,
    pub cfg_b: KmeConfig,
    pub tls_a: TlsMaterial,
    pub tls_b: TlsMaterial,
}

fn config(
    id: &str,
    listen: std::net::SocketAddr,
    store: PathBuf,
    peer: (&str, std::net::SocketAddr),
    limits: Limits,
) -> KmeConfig {
    KmeConfig {
        kme_id: kme(id),
        listen,
        store,
        store_synchronous: SyncMode::Full,
        store_url: None,
        store_schema: None,
        tls: TlsPaths {
            ca: "unused".into(),
            cert: "unused".into(),
            key: "unused".into(),
            key_exchange: qkdnet_kms::tls::KeyExchange::default(),
        },
        limits,
        peer_timeout_ms: 3000,
        peer_attempts: 2,
        peers: vec![PeerConfig {
            kme_id: kme(peer.0),
            url: format!("https://127.0.0.1:{}", peer.1.port()),
        }],
        saes: vec![
            SaeConfig {
                id: sae("alice"),
                kme: kme("kme-a"),
            },
            SaeConfig {
                id: sae("eve"),
                kme: kme("kme-a"),
            },
            SaeConfig {
                id: sae("bob"),
                kme: kme("kme-b"),
            },
            SaeConfig {
                id: sae("carol"),
                kme: kme("kme-b"),
            },
        ],
        test_keys: None,
        links: Vec::new(),
        relay_attempts: 3,
        stock_keys: 0,
        link_state_interval_ms: 1000,
        connections: Default::default(),
        key_id_secret: None,
        store_key: None,
        store_key_pkcs11: None,
    }
}

impl Net {
    /// Starts A and B and ingests `blocks` seeded blocks into both.
    pub async fn start(blocks: u64) -> Net {
        Self::start_with(blocks, Limits::default()).await
    }

    pub async fn start_with(blocks: u64, limits: Limits) -> Net {
        Self::start_configured(blocks, limits, |_| {}).await
    }

    /// [`Net::start_with`], with each KME's configuration adjusted by `adjust`
    /// before launch (e.g. to put its store on PostgreSQL).
    pub async fn start_configured(
        blocks: u64,
        limits: Limits,
        adjust: impl Fn(&mut KmeConfig),
    ) -> Net {
        let dir = TempDir::new("net");
        let ca = Ca::generate("qkdnet test CA").expect("CA");
        let la = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let lb = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (aa, ab) = (
            la.local_addr().expect("addr"),
            lb.local_addr().expect("addr"),
        );
        let mut cfg_a = config("kme-a", aa, dir.0.join("a.sqlite"), ("kme-b", ab), limits);
        let mut cfg_b = config("kme-b", ab, dir.0.join("b.sqlite"), ("kme-a", aa), limits);
        // The network's key-ID secret: SAEs see opaque key IDs, as in `net up`.
        let secret = dir.0.join("key-ids.secret");
        qkdnet_kms::key_id::create_secret(&secret).expect("key-ID secret");
        cfg_a.key_id_secret = Some(secret.clone());
        cfg_b.key_id_secret = Some(secret);
        // Each node's master key: the stores keep key material encrypted.
        for (cfg, name) in [(&mut cfg_a, "a.key"), (&mut cfg_b, "b.key")] {
            let path = dir.0.join(name);
            qkdnet_kms::store::MasterKey::create_file(&path).expect("master key");
            cfg.store_key = Some(path);
        }
        adjust(&mut cfg_a);
        adjust(&mut cfg_b);
        let tls_a = ca
            .material(&Identity::Kme(kme("kme-a")), &[])
            .expect("cert");
        let tls_b = ca
            .material(&Identity::Kme(kme("kme-b")), &[])
            .expect("cert");
        let a = launch_with_tls(&cfg_a, tls_a.clone(), Some(la))
            .await
            .expect("launch A");
        let b = launch_with_tls(&cfg_b, tls_b.clone(), Some(lb))
            .await
            .expect("launch B");
        let net = Net {
            dir,
            ca,
            a: Some(a),
            b: Some(b),
            cfg_a,
            cfg_b,
            tls_a,
            tls_b,
        };
        net.ingest(0, blocks).await;
        net
    }

    pub async fn ingest(&self, from: u64, to: u64) {
        for n in from..to {
            let ka = &self.a.as_ref().expect("A running").kme;
            let kb = &self.b.as_ref().expect("B running").kme;
            ka.ingest(seeded_block(SEED, "ab", kme("kme-b"), n, BLOCK_BYTES))
                .await
                .expect("ingest A");
            kb.ingest(seeded_block(SEED, "ab", kme("kme-a"), n, BLOCK_BYTES))
                .await
                .expect("ingest B");
        }
    }

    pub fn url_a(&self) -> String {
        format!("https://127.0.0.1:{}", self.cfg_a.listen.port())
    }
    pub fn url_b(&self) -> String {
        format!("https://127.0.0.1:{}", self.cfg_b.listen.port())
    }

    /// Stops A abruptly (no settle), then starts it again on the same port and store.
    pub async fn restart_a(&mut self) {
        let old = self.a.take().expect("A running");
        drop(old);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let l = bind_again(self.cfg_a.listen).await;
        self.a = Some(
            launch_with_tls(&self.cfg_a, self.tls_a.clone(), Some(l))
                .await
                .expect("relaunch A"),
        );
    }

    pub async fn stop_b(&mut self) {
        if let Some(b) = self.b.take() {
            b.server.shutdown().await;
            drop(b.kme);
        }
    }

    pub async fn start_b(&mut self) {
        let l = bind_again(self.cfg_b.listen).await;
        self.b = Some(
            launch_with_tls(&self.cfg_b, self.tls_b.clone(), Some(l))
                .await
                .expect("relaunch B"),
        );
    }

    pub fn client(&self, who: &Identity) -> Client {
        Client::new(&self.ca.material(who, &[]).expect("cert"))
    }

    pub fn sae_client(&self, name: &str) -> Client {
        self.client(&Identity::Sae(sae(name)))
    }
}

async fn bind_again(addr: std::net::SocketAddr) -> tokio::net::TcpListener {
    for _ in 0..100 {
        if let Ok(l) = tokio::net::TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not rebind {addr}");
}

/// An HTTPS client with a client certificate (or none).
#[derive(Clone)]
pub struct Client {
    inner: HClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Client {
    /// A raw client that accepts any server certificate of the CA (these tests
    /// call several KMEs with one client and probe the servers' answers; the
    /// production clients pin the expected KME, see `tls_identity.rs`).
    pub fn new(m: &TlsMaterial) -> Self {
        let p = qkdnet_kms::tls::provider(KeyExchange::HybridOnly);
        let cfg = rustls::ClientConfig::builder_with_provider(p)
            .with_protocol_versions(qkdnet_kms::tls::versions(KeyExchange::HybridOnly))
            .expect("versions")
            .with_root_certificates(m.roots().expect("roots"))
            .with_client_auth_cert(m.chain().expect("chain"), m.key().expect("key"))
            .expect("client config");
        Self::from_config(cfg)
    }

    pub fn from_config(cfg: rustls::ClientConfig) -> Self {
        let conn = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(cfg)
            .https_only()
            .enable_http1()
            .build();
        Client {
            inner: HClient::builder(TokioExecutor::new()).build(conn),
        }
    }

    pub async fn raw(
        &self,
        method: Method,
        url: &str,
        ct: Option<&str>,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), String> {
        let mut b = Request::builder().method(method).uri(url);
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        let req = b
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let fut = async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let st = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((st, body))
        };
        tokio::time::timeout(Duration::from_secs(20), fut)
            .await
            .map_err(|_| "timeout".to_string())?
    }

    pub async fn get(&self, url: &str) -> (StatusCode, Value) {
        let (s, b) = self
            .raw(Method::GET, url, None, Vec::new())
            .await
            .expect("request");
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    pub async fn post(&self, url: &str, body: &Value) -> (StatusCode, Value) {
        let (s, b) = self
            .raw(
                Method::POST,
                url,
                Some("application/json"),
                serde_json::to_vec(body).expect("json"),
            )
            .await
            .expect("request");
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }
}

/// (key_ID, key) pairs of a key container.
pub fn keys_of(v: &Value) -> Vec<(String, String)> {
    v["keys"]
        .as_array()
        .expect("keys array")
        .iter()
        .map(|k| {
            (
                k["key_ID"].as_str().expect("key_ID").to_owned(),
                k["key"].as_str().expect("key").to_owned(),
            )
        })
        .collect()
}

pub fn key_ids_body(ids: &[String]) -> Value {
    serde_json::json!({ "key_IDs": ids.iter().map(|i| serde_json::json!({"key_ID": i})).collect::<Vec<_>>() })
}
