//! The node daemon (`qkdnet node run --config NODE.toml`): one process per
//! trusted node, running its QKD links (as Alice or Bob), its KME, and a
//! management endpoint with health, status and Prometheus metrics.
//!
//! ```toml
//! [node]
//! id = "hub"
//! link_listen = "127.0.0.1:7101"   # Bob's link port (sessions of links where this node is Bob)
//! mgmt_listen = "127.0.0.1:7201"   # plain HTTP: /health, /status (JSON), /metrics (Prometheus)
//! time_scale = 1.0                 # link seconds per wall second
//!
//! [kme]                            # a KME configuration (see qkdnet_kms::config)
//! kme_id = "hub"
//! listen = "127.0.0.1:7001"
//! store = "/state/nodes/hub/keys.sqlite"
//! tls = { ca = "...", cert = "...", key = "..." }
//! peer = [{ kme_id = "north", url = "https://127.0.0.1:7002" }]
//! sae = [{ id = "sae-hub", kme = "hub" }, { id = "sae-north", kme = "north" }]
//!
//! [[link]]
//! id = "hub-north"
//! peer = "north"
//! role = "alice"                   # alice connects to the peer's link port and simulates the optics
//! peer_link_addr = "127.0.0.1:7102"
//! preset = "metro-1ghz"
//! distance_km = 12.0
//! block_gates = 134000000
//! # satellite links (a satellite preset, no distance_km): passes every
//! # pass_period_s seconds of link time, the first at pass_offset_s
//! bootstrap_file = "/state/links/hub-north.key"   # shared with the peer; 0600
//! ```
//!
//! Restart behaviour: the KME store is durable (keys kept, pending peer
//! requests voided at start-up); links reconnect every second until the peer
//! answers; a session that broke has dropped its unfinished blocks at both
//! ends, and new sessions use fresh block numbers (see [`crate::session`]).
//! SIGINT or SIGTERM stops the links and the KME and exits.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use qkdnet_crypto::secret::SecretBytes;
use qkdnet_kms::config::KmeConfig;
use qkdnet_kms::ids::KmeId;
use qkdnet_kms::{KeyBlock, Kme};
use qkdnet_link::block::ProtocolConfig;
use qkdnet_link::endpoint::Event;
use qkdnet_link::msg::Reconciler;
use qkdnet_optics::device::Eve;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::NetError;
use crate::server::{self, BobLink, EventSink};
use crate::session::{LinkParams, LinkStats, Pace, SessionEnd, Stop, alice_session};
use crate::topology::load_preset;

/// `[node]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Node ID (= KME ID).
    pub id: String,
    /// Bob's link port.
    pub link_listen: SocketAddr,
    /// Management HTTP port.
    pub mgmt_listen: SocketAddr,
    /// Link seconds per wall second.
    #[serde(default = "one")]
    pub time_scale: f64,
}

fn one() -> f64 {
    1.0
}

/// Which end of a link this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Source side: simulates the optics, connects out.
    Alice,
    /// Detector side: accepts sessions on the link port.
    Bob,
}

/// `[[link]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeLink {
    /// Link ID (same at both ends).
    pub id: String,
    /// The node at the other end.
    pub peer: KmeId,
    /// This node's role.
    pub role: Role,
    /// The peer's link port (Alice only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_link_addr: Option<SocketAddr>,
    /// Device preset name or path.
    pub preset: String,
    /// Fibre length, km (fibre links).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distance_km: Option<f64>,
    /// Satellite links: seconds between pass starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_period_s: Option<f64>,
    /// Satellite links: start of the first pass (link time from session start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_offset_s: Option<f64>,
    /// Eavesdropper.
    #[serde(default = "no_eve")]
    pub eve: String,
    /// Reconciler.
    #[serde(default = "cascade")]
    pub reconciler: String,
    /// Gates per block.
    pub block_gates: u64,
    /// Bootstrap authentication secret (file, raw bytes).
    pub bootstrap_file: PathBuf,
    /// The model's prediction for this link (reported next to the measurement).
    #[serde(default)]
    pub model_key_bps: f64,
}

fn no_eve() -> String {
    "none".into()
}
fn cascade() -> String {
    "cascade".into()
}

/// A node's configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// `[node]`.
    pub node: NodeSection,
    /// `[kme]`.
    pub kme: KmeConfig,
    /// `[[link]]`.
    #[serde(rename = "link", default)]
    pub links: Vec<NodeLink>,
}

impl NodeConfig {
    /// Reads a node configuration.
    pub fn from_file(path: &Path) -> Result<NodeConfig, NetError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NetError::Config(format!("cannot read {}: {e}", path.display())))?;
        // Without the quoted line: [kme] may hold a store URL with a password.
        let c: NodeConfig = toml::from_str(&text).map_err(|e| {
            NetError::Config(format!(
                "{}: {}",
                path.display(),
                qkdnet_kms::config::toml_error_message(&text, &e)
            ))
        })?;
        if c.node.id != c.kme.kme_id.as_str() {
            return Err(NetError::Config(format!(
                "{}: [node] id '{}' differs from [kme] kme_id '{}'",
                path.display(),
                c.node.id,
                c.kme.kme_id
            )));
        }
        Ok(c)
    }

    /// Writes the configuration as TOML.
    pub fn to_toml(&self) -> Result<String, NetError> {
        toml::to_string(self).map_err(|e| NetError::Config(format!("node config: {e}")))
    }
}

/// One running link as the management endpoint sees it.
struct LinkView {
    cfg: NodeLink,
    rep_rate_hz: f64,
    stats: Arc<LinkStats>,
}

struct NodeState {
    id: String,
    kme: Arc<Kme>,
    links: Vec<LinkView>,
    started: Instant,
    /// The configured link seconds per wall second.
    time_scale: f64,
}

fn link_params(l: &NodeLink) -> Result<LinkParams, NetError> {
    let what = |e: String| NetError::Config(format!("link {}: {e}", l.id));
    let base = load_preset(&l.preset).map_err(|e| what(e.to_string()))?;
    let (link, pass) = match &base.channel {
        qkdnet_optics::device::Channel::Satellite(_) => {
            let plan = crate::session::PassPlan::from_link(
                &base,
                l.pass_period_s.unwrap_or(86_400.0),
                l.pass_offset_s.unwrap_or(0.0),
            )
            .map_err(|e| what(e.to_string()))?;
            (base, Some(plan))
        }
        _ => {
            let km = l
                .distance_km
                .ok_or_else(|| what("a fibre link needs distance_km".into()))?;
            (base.at_distance(km).map_err(|e| what(e.to_string()))?, None)
        }
    };
    let eve = Eve::parse(&l.eve).map_err(|e| what(e.to_string()))?;
    let reconciler = Reconciler::parse(&l.reconciler).map_err(|e| what(e.to_string()))?;
    let bootstrap = std::fs::read(&l.bootstrap_file).map_err(|e| {
        what(format!(
            "cannot read bootstrap secret {}: {e}",
            l.bootstrap_file.display()
        ))
    })?;
    if bootstrap.len() < crate::session::MIN_BOOTSTRAP_BYTES {
        return Err(what(format!(
            "bootstrap secret {} is shorter than {} bytes",
            l.bootstrap_file.display(),
            crate::session::MIN_BOOTSTRAP_BYTES
        )));
    }
    let rep = link.source.rep_rate_hz();
    let proto = ProtocolConfig {
        reconciler,
        eps_sec: link.postproc.eps_sec.get(),
        eps_cor: link.postproc.eps_cor.get(),
        classes: link.source.classes().iter().map(|c| (c.1, c.2)).collect(),
        ..Default::default()
    };
    Ok(LinkParams {
        link_id: l.id.clone(),
        link,
        eve,
        proto,
        block_gates: match &pass {
            // One block per pass; rates count the whole period.
            Some(plan) => (plan.period_s * rep).round() as u64,
            None => l.block_gates.max(1000),
        },
        window: 4,
        bootstrap: Arc::new(Zeroizing::new(bootstrap)),
        seed: None,
        pass,
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The sink that hands a link's distilled blocks to the KME.
fn kme_sink(
    kme: Arc<Kme>,
    rt: tokio::runtime::Handle,
    link: &NodeLink,
    p: &LinkParams,
    stats: Arc<LinkStats>,
) -> EventSink {
    let (link_id, peer) = (link.id.clone(), link.peer.clone());
    let (eps_sec, eps_cor) = (p.proto.eps_sec, p.proto.eps_cor);
    Arc::new(move |e: Event| {
        let Event::Key { key, report, .. } = e else {
            return;
        };
        let block = KeyBlock {
            link_id: link_id.clone(),
            peer_kme: peer.clone(),
            block_number: report.block,
            key: SecretBytes::from_slice(key.expose()),
            eps_sec,
            eps_cor,
            created_unix_ms: now_ms(),
        };
        drop(key);
        if let Err(e) = rt.block_on(kme.ingest(block)) {
            tracing::warn!(link = %link_id, block = report.block, error = %e, "KME refused a block");
            if let Ok(mut g) = stats.last_error.lock() {
                *g = format!("KME refused block {}: {e}", report.block);
            }
        }
    })
}

/// Binds a listening socket with SO_REUSEADDR, so a node restarted at once
/// (after a crash) gets its ports back while old connections sit in TIME_WAIT.
fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    // A previous instance killed a moment ago may still be closing its sockets.
    let mut tries = 0;
    loop {
        let s = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        s.set_reuseaddr(true)?;
        match s.bind(addr).and_then(|()| s.listen(1024)) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 20 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            r => return r,
        }
    }
}

/// Runs a node until SIGINT/SIGTERM (or `shutdown` resolves).
pub async fn run(
    cfg: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NetError> {
    let params: Vec<LinkParams> = cfg
        .links
        .iter()
        .map(link_params)
        .collect::<Result<_, _>>()?;
    let mgmt = bind(cfg.node.mgmt_listen)
        .map_err(|e| NetError::Config(format!("management port {}: {e}", cfg.node.mgmt_listen)))?;
    let kme_listener = bind(cfg.kme.listen)
        .map_err(|e| NetError::Config(format!("KME port {}: {e}", cfg.kme.listen)))?;
    let link_listener = if cfg.links.iter().any(|l| l.role == Role::Bob) {
        Some(
            bind(cfg.node.link_listen)
                .and_then(|l| l.into_std())
                .map_err(|e| {
                    NetError::Config(format!("link port {}: {e}", cfg.node.link_listen))
                })?,
        )
    } else {
        None
    };
    let running = qkdnet_kms::config::launch(&cfg.kme, Some(kme_listener)).await?;
    let kme = running.kme.clone();
    let rt = tokio::runtime::Handle::current();
    let stop = Stop::new();
    let mut views = Vec::new();
    let mut bob_links = Vec::new();
    let mut threads = Vec::new();
    for (l, p) in cfg.links.iter().zip(params) {
        let stats = Arc::new(LinkStats::default());
        let sink = kme_sink(kme.clone(), rt.clone(), l, &p, stats.clone());
        views.push(LinkView {
            cfg: l.clone(),
            rep_rate_hz: p.link.source.rep_rate_hz(),
            stats: stats.clone(),
        });
        match l.role {
            Role::Bob => bob_links.push(BobLink {
                params: p,
                stats,
                sink,
            }),
            Role::Alice => {
                let addr = l.peer_link_addr.ok_or_else(|| {
                    NetError::Config(format!("link {}: Alice needs peer_link_addr", l.id))
                })?;
                let stop = stop.clone();
                let pace = Pace::RealTime {
                    scale: cfg.node.time_scale,
                };
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("link {}", l.id))
                        .spawn(move || alice_loop(&p, addr, pace, &stop, &stats, &sink))?,
                );
            }
        }
    }
    let server_thread = match link_listener {
        Some(l) => Some(server::start(l, bob_links, stop.clone())?),
        None => None,
    };
    let state = Arc::new(NodeState {
        id: cfg.node.id.clone(),
        kme: kme.clone(),
        links: views,
        started: Instant::now(),
        time_scale: cfg.node.time_scale,
    });
    let app = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/status", get(status_handler))
        .route("/metrics", get(metrics_handler))
        .with_state(state);
    let (mgmt_tx, mgmt_rx) = tokio::sync::oneshot::channel::<()>();
    let mgmt_task = tokio::spawn(async move {
        let _ = axum::serve(mgmt, app)
            .with_graceful_shutdown(async {
                let _ = mgmt_rx.await;
            })
            .await;
    });
    tracing::info!(node = %cfg.node.id, "node up");
    shutdown.await;
    tracing::info!(node = %cfg.node.id, "shutting down");
    stop.fire();
    let _ = mgmt_tx.send(());
    running.server.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), mgmt_task).await;
    // Link threads notice the stop within a block; do not wait on a slow one.
    let deadline = Instant::now() + Duration::from_secs(2);
    for t in threads.into_iter().chain(server_thread) {
        while !t.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

fn alice_loop(
    p: &LinkParams,
    addr: SocketAddr,
    pace: Pace,
    stop: &Arc<Stop>,
    stats: &Arc<LinkStats>,
    sink: &EventSink,
) {
    // A session that ends once (the peer restarted or is shutting down) is
    // normal operation: logged at info. A link that stays down is what an
    // operator acts on: a warning once it failed WARN_AFTER times in a row,
    // and again whenever the reason changes.
    const WARN_AFTER: u32 = 3;
    let mut logged = String::new();
    let mut failures = 0u32;
    while !stop.fired() {
        let session_stop = stop.child();
        let sessions_before = stats.sessions.load(std::sync::atomic::Ordering::Relaxed);
        match alice_session(p, addr, pace, None, &session_stop, stats, &mut |e| sink(e)) {
            Ok(SessionEnd::Stopped) => break,
            Ok(SessionEnd::Finished) => failures = 0,
            Err(_) if stop.fired() => break, // this node is stopping
            Err(e) => {
                let msg = e.to_string();
                if stats.sessions.load(std::sync::atomic::Ordering::Relaxed) != sessions_before {
                    failures = 0; // the session was up before it ended
                    logged.clear();
                }
                failures += 1;
                if failures < WARN_AFTER {
                    tracing::info!(link = %p.link_id, error = %msg, "link session ended; reconnecting");
                } else if msg != logged {
                    tracing::warn!(link = %p.link_id, error = %msg, failures, "link down; retrying");
                    logged = msg.clone();
                }
                if let Ok(mut g) = stats.last_error.lock() {
                    *g = msg;
                }
            }
        }
        if stop.sleep(Duration::from_secs(1)) {
            break;
        }
    }
}

/// One link in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkStatus {
    /// Link ID.
    pub id: String,
    /// Peer node.
    pub peer: String,
    /// This node's role.
    pub role: Role,
    /// Session up.
    pub up: bool,
    /// Sessions started.
    pub sessions: u64,
    /// QBER of the last block.
    pub qber: f64,
    /// QBER over all blocks.
    pub qber_mean: f64,
    /// Sifted key bits.
    pub sifted_bits: u64,
    /// Secret key bits distilled.
    pub secret_bits: u64,
    /// Blocks distilled.
    pub blocks_ok: u64,
    /// Blocks aborted.
    pub blocks_aborted: u64,
    /// Link seconds simulated or received.
    pub link_seconds: f64,
    /// Link seconds per wall second the topology asks for (`time_scale`).
    #[serde(default)]
    pub time_scale: f64,
    /// Link seconds per wall second this link achieved since the node
    /// started: below `time_scale` when the machine cannot keep up.
    #[serde(default)]
    pub time_scale_effective: f64,
    /// Secret bits per link second of the blocks that ended.
    pub key_rate_bps: f64,
    /// Secret bits per wall second since the node started.
    pub key_rate_wall_bps: f64,
    /// The model's prediction, bits per link second.
    pub model_key_bps: f64,
    /// Authentication key bits spent.
    pub auth_bits: u64,
    /// 256-bit units in the KME pool shared with the peer.
    pub pool_units: u64,
    /// Units this KME may hand to its own master SAEs.
    pub pool_units_mine: u64,
    /// Last error.
    pub last_error: String,
}

/// The KME part of `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KmeStatus {
    /// enc_keys calls.
    pub enc_requests: u64,
    /// dec_keys calls.
    pub dec_requests: u64,
    /// Keys delivered (master + slave).
    pub keys_delivered: u64,
    /// Failed calls.
    pub errors: u64,
    /// Relayed requests this KME originated.
    #[serde(default)]
    pub relay_requests: u64,
    /// Relayed requests that failed on every route.
    #[serde(default)]
    pub relay_failures: u64,
    /// Relays passed on as a trusted node.
    #[serde(default)]
    pub relay_forwarded: u64,
    /// Relays that ended here.
    #[serde(default)]
    pub relay_delivered: u64,
    /// Units of link key sent for relays.
    #[serde(default)]
    pub relay_units_sent: u64,
}

/// `/status` of a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node ID.
    pub node: String,
    /// Seconds since start.
    pub uptime_s: f64,
    /// Links.
    pub links: Vec<LinkStatus>,
    /// KME counters.
    pub kme: KmeStatus,
}

async fn collect(s: &NodeState) -> NodeStatus {
    let up = s.started.elapsed().as_secs_f64();
    let mut links = Vec::new();
    for v in &s.links {
        let st = &v.stats;
        let pool = s
            .kme
            .store()
            .pool_counts(v.cfg.peer.clone())
            .await
            .unwrap_or_default();
        let link_seconds = st.gates.load(Relaxed) as f64 / v.rep_rate_hz;
        let done_seconds = st.gates_done.load(Relaxed) as f64 / v.rep_rate_hz;
        let secret = st.secret_bits.load(Relaxed);
        links.push(LinkStatus {
            id: v.cfg.id.clone(),
            peer: v.cfg.peer.to_string(),
            role: v.cfg.role,
            up: st.up.load(Relaxed) == 1,
            sessions: st.sessions.load(Relaxed),
            qber: st.qber(),
            qber_mean: st.mean_qber(),
            sifted_bits: st.sifted_bits.load(Relaxed),
            secret_bits: secret,
            blocks_ok: st.blocks_ok.load(Relaxed),
            blocks_aborted: st.blocks_aborted.load(Relaxed),
            link_seconds,
            time_scale: s.time_scale,
            time_scale_effective: link_seconds / up.max(1e-9),
            key_rate_bps: if done_seconds > 0.0 {
                secret as f64 / done_seconds
            } else {
                0.0
            },
            key_rate_wall_bps: secret as f64 / up.max(1e-9),
            model_key_bps: v.cfg.model_key_bps,
            auth_bits: st.auth_bits.load(Relaxed),
            pool_units: pool.total_units,
            pool_units_mine: pool.mine_available,
            last_error: st.last_error.lock().map(|g| g.clone()).unwrap_or_default(),
        });
    }
    let c = s.kme.counters();
    NodeStatus {
        node: s.id.clone(),
        uptime_s: up,
        links,
        kme: KmeStatus {
            enc_requests: c.enc_requests.load(Relaxed),
            dec_requests: c.dec_requests.load(Relaxed),
            keys_delivered: c.keys_delivered_master.load(Relaxed)
                + c.keys_delivered_slave.load(Relaxed),
            errors: c.errors.load(Relaxed),
            relay_requests: c.relay_requests.load(Relaxed),
            relay_failures: c.relay_failures.load(Relaxed),
            relay_forwarded: c.relay_forwarded.load(Relaxed),
            relay_delivered: c.relay_delivered.load(Relaxed),
            relay_units_sent: c.relay_units_sent.load(Relaxed),
        },
    }
}

async fn status_handler(State(s): State<Arc<NodeState>>) -> impl IntoResponse {
    axum::Json(collect(&s).await)
}

async fn metrics_handler(State(s): State<Arc<NodeState>>) -> impl IntoResponse {
    let st = collect(&s).await;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render_metrics(&st),
    )
}

/// Samples of one metric family: (labels, value).
type Rows = Vec<(String, f64)>;

/// Renders a node's status in the Prometheus text exposition format.
pub fn render_metrics(st: &NodeStatus) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    };
    let node = &st.node;
    let per_link = |f: &dyn Fn(&LinkStatus) -> f64| -> Vec<(String, f64)> {
        st.links
            .iter()
            .map(|l| {
                (
                    format!(
                        "node=\"{node}\",link=\"{}\",peer=\"{}\",role=\"{}\"",
                        l.id,
                        l.peer,
                        match l.role {
                            Role::Alice => "alice",
                            Role::Bob => "bob",
                        }
                    ),
                    f(l),
                )
            })
            .collect()
    };
    let link_rows: BTreeMap<&str, (&str, &str, Rows)> = [
        (
            "qkdnet_link_up",
            (
                "gauge",
                "1 while a link session is up",
                per_link(&|l| f64::from(u8::from(l.up))),
            ),
        ),
        (
            "qkdnet_link_sessions_total",
            (
                "counter",
                "link sessions started",
                per_link(&|l| l.sessions as f64),
            ),
        ),
        (
            "qkdnet_link_qber",
            ("gauge", "QBER of the last block", per_link(&|l| l.qber)),
        ),
        (
            "qkdnet_link_qber_mean",
            ("gauge", "QBER over all blocks", per_link(&|l| l.qber_mean)),
        ),
        (
            "qkdnet_link_sifted_bits_total",
            (
                "counter",
                "sifted key bits entering reconciliation",
                per_link(&|l| l.sifted_bits as f64),
            ),
        ),
        (
            "qkdnet_link_secret_bits_total",
            (
                "counter",
                "secret key bits distilled",
                per_link(&|l| l.secret_bits as f64),
            ),
        ),
        (
            "qkdnet_link_blocks_ok_total",
            (
                "counter",
                "blocks distilled",
                per_link(&|l| l.blocks_ok as f64),
            ),
        ),
        (
            "qkdnet_link_aborts_total",
            (
                "counter",
                "blocks aborted (QBER, no positive key, verification)",
                per_link(&|l| l.blocks_aborted as f64),
            ),
        ),
        (
            "qkdnet_link_seconds_total",
            (
                "counter",
                "link time simulated (seconds of the source clock)",
                per_link(&|l| l.link_seconds),
            ),
        ),
        (
            "qkdnet_link_secret_key_rate_bps",
            (
                "gauge",
                "secret bits per second of link time",
                per_link(&|l| l.key_rate_bps),
            ),
        ),
        (
            "qkdnet_link_model_key_rate_bps",
            (
                "gauge",
                "finite-key model prediction, bits per second of link time",
                per_link(&|l| l.model_key_bps),
            ),
        ),
        (
            "qkdnet_link_auth_bits_total",
            (
                "counter",
                "authentication key bits spent",
                per_link(&|l| l.auth_bits as f64),
            ),
        ),
        (
            "qkdnet_pool_units",
            (
                "gauge",
                "256-bit key units in the KME pool shared with the peer",
                per_link(&|l| l.pool_units as f64),
            ),
        ),
    ]
    .into_iter()
    .collect();
    for (name, (kind, help, rows)) in link_rows {
        family(name, kind, help, rows);
    }
    let k = &st.kme;
    let n = |extra: &str| format!("node=\"{node}\"{extra}");
    let kme_rows: [(&str, &str, Rows); 5] = [
        (
            "qkdnet_kme_requests_total",
            "ETSI 014 key requests",
            vec![
                (n(",api=\"enc_keys\""), k.enc_requests as f64),
                (n(",api=\"dec_keys\""), k.dec_requests as f64),
            ],
        ),
        (
            "qkdnet_kme_keys_delivered_total",
            "keys delivered to SAEs",
            vec![(n(""), k.keys_delivered as f64)],
        ),
        (
            "qkdnet_kme_errors_total",
            "ETSI 014 key requests that failed",
            vec![(n(""), k.errors as f64)],
        ),
        (
            "qkdnet_kme_relays_total",
            "relayed key requests: originated here, failed on every route, passed on as a trusted node, ended here",
            vec![
                (n(",kind=\"originated\""), k.relay_requests as f64),
                (n(",kind=\"failed\""), k.relay_failures as f64),
                (n(",kind=\"forwarded\""), k.relay_forwarded as f64),
                (n(",kind=\"delivered\""), k.relay_delivered as f64),
            ],
        ),
        (
            "qkdnet_kme_relay_units_sent_total",
            "256-bit units of link key sent for relays (keys and one-time pads)",
            vec![(n(""), k.relay_units_sent as f64)],
        ),
    ];
    for (name, help, rows) in kme_rows {
        family(name, "counter", help, rows);
    }
    out
}
