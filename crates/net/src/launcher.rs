//! Brings a whole network up on this machine: one `qkdnet node` process per
//! node, on loopback ports, with a fresh PKI (`qkdnet net up`, `net down`,
//! `net status`, and `qkdnet demo`).
//!
//! State directory layout (everything a later `net down`/`net status` or an
//! application needs):
//!
//! ```text
//! STATE/net.json                 nodes, ports, process IDs
//! STATE/connect.json             for ETSI 014 clients: {"saes": [{id, node, kme_url, cert, key, ca}]}
//! STATE/pki/                     the network's CA (ca.pem, ca.key) and SAE certificates
//! STATE/links/LINK.key           bootstrap authentication secret of each link (0600)
//! STATE/nodes/NODE/node.toml     the node's configuration
//! STATE/nodes/NODE/keys.sqlite   its KME's durable key store (material encrypted)
//! STATE/nodes/NODE/master.key    the node master key the store is encrypted under (0600)
//! STATE/nodes/NODE/node.log      its output
//! ```
//!
//! Running `net up` again on the same directory keeps the PKI, the link
//! secrets and the key stores (a restart), and allocates ports anew.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qkdnet_kms::config::{KmeConfig, PeerConfig, SaeConfig, SyncMode, TlsPaths};
use qkdnet_kms::connect::{ConnectFile, SaeEntry};
use qkdnet_kms::etsi::Limits;
use qkdnet_kms::identity::Identity;
use qkdnet_kms::pki::Ca;
use qkdnet_kms::tls::KeyExchange;
use serde::{Deserialize, Serialize};

use crate::NetError;
use crate::node::{NodeConfig, NodeLink, NodeSection, NodeStatus, Role};
use crate::topology::ValidTopology;

/// Bytes of each link's bootstrap secret.
const BOOTSTRAP_BYTES: usize = 4096;

/// One node in `net.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node ID.
    pub id: String,
    /// Process ID (0 before it started).
    pub pid: u32,
    /// Management address.
    pub mgmt: SocketAddr,
    /// KME URL.
    pub kme_url: String,
    /// Link port.
    pub link_port: SocketAddr,
    /// Configuration file.
    pub config: PathBuf,
    /// Log file.
    pub log: PathBuf,
}

/// `STATE/net.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetRecord {
    /// Network name.
    pub name: String,
    /// Nodes.
    pub nodes: Vec<NodeRecord>,
}

impl NetRecord {
    /// Reads `DIR/net.json`.
    pub fn load(dir: &Path) -> Result<NetRecord, NetError> {
        let p = dir.join("net.json");
        let text = std::fs::read_to_string(&p).map_err(|e| {
            NetError::Config(format!(
                "no network state in {} ({}: {e}); start one with `qkdnet net up`",
                dir.display(),
                p.display()
            ))
        })?;
        serde_json::from_str(&text).map_err(|e| NetError::Config(format!("{}: {e}", p.display())))
    }

    fn save(&self, dir: &Path) -> Result<(), NetError> {
        let p = dir.join("net.json");
        let tmp = dir.join("net.json.tmp");
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| NetError::Config(format!("net.json: {e}")))?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &p)?;
        Ok(())
    }

    /// Nodes whose process is still alive.
    pub fn running(&self) -> Vec<&NodeRecord> {
        self.nodes.iter().filter(|n| alive(n.pid)).collect()
    }
}

/// Whether `pid` is a live `qkdnet` process. A process counts as alive until
/// every thread has exited: after SIGKILL the main thread can be a zombie while
/// another still finishes a system call and holds the sockets.
pub fn alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "qkdnet" {
        return false;
    }
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|t| {
        std::fs::read_to_string(t.path().join("stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.chars().next())
            })
            .is_some_and(|state| state != 'Z' && state != 'X')
    })
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// Ports of one node.
#[derive(Debug, Clone, Copy)]
struct Ports {
    kme: u16,
    link: u16,
    mgmt: u16,
}

fn allocate_ports(ids: &[String], base: Option<u16>) -> Result<Vec<Ports>, NetError> {
    let mut held = Vec::new();
    let mut take = |port: u16, what: String| -> Result<u16, NetError> {
        let l = TcpListener::bind(("127.0.0.1", port)).map_err(|e| {
            NetError::Config(format!(
                "port {port} ({what}) is not available on 127.0.0.1: {e}"
            ))
        })?;
        let p = l.local_addr()?.port();
        held.push(l);
        Ok(p)
    };
    let mut out = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let at = |k: u16| -> Result<u16, NetError> {
            match base {
                None => Ok(0),
                Some(b) => u16::try_from(i)
                    .ok()
                    .and_then(|i| i.checked_mul(3))
                    .and_then(|o| b.checked_add(o))
                    .and_then(|p| p.checked_add(k))
                    .ok_or_else(|| {
                        NetError::Config(format!("--base-port {b}: not enough ports above it"))
                    }),
            }
        };
        out.push(Ports {
            kme: take(at(0)?, format!("KME of node {id}"))?,
            link: take(at(1)?, format!("link port of node {id}"))?,
            mgmt: take(at(2)?, format!("management port of node {id}"))?,
        });
    }
    Ok(out)
}

/// A network whose files are written and whose processes may be started.
pub struct Prepared {
    /// State directory.
    pub dir: PathBuf,
    /// `net.json` (pids 0 until [`start`]).
    pub record: NetRecord,
    /// The validated topology.
    pub topology: ValidTopology,
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), NetError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    Ok(())
}

/// How [`prepare`] lays out a network.
#[derive(Debug, Clone, Copy, Default)]
pub struct LaunchOptions {
    /// First port of a contiguous range (3 per node); `None`: free ports.
    pub base_port: Option<u16>,
    /// Key exchange the KMEs offer to SAEs (KME-to-KME is always hybrid).
    pub sae_key_exchange: KeyExchange,
}

/// Writes the state directory for `topo`: PKI, link secrets, node configs,
/// `connect.json` and `net.json`. Refuses a directory whose network is running.
pub fn prepare(
    topo: &ValidTopology,
    dir: &Path,
    opts: LaunchOptions,
) -> Result<Prepared, NetError> {
    let base_port = opts.base_port;
    std::fs::create_dir_all(dir)
        .map_err(|e| NetError::Config(format!("cannot create {}: {e}", dir.display())))?;
    let dir = dir.canonicalize()?;
    if let Ok(old) = NetRecord::load(&dir) {
        let running = old.running();
        if !running.is_empty() {
            return Err(NetError::Config(format!(
                "a network is already running in {} (node {} has pid {}); stop it with `qkdnet net down --dir {}`",
                dir.display(),
                running[0].id,
                running[0].pid,
                dir.display()
            )));
        }
    }
    let ids: Vec<String> = topo.nodes.iter().map(ToString::to_string).collect();
    let ports = allocate_ports(&ids, base_port)?;

    let pki = dir.join("pki");
    let ca = if pki.join("ca.pem").exists() {
        Ca::load_dir(&pki)?
    } else {
        std::fs::create_dir_all(&pki)?;
        Ca::init_dir(&pki, &format!("qkdnet {} CA", topo.meta.name))?
    };
    let ca_pem = pki.join("ca.pem");
    let sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    // The network's key-ID secret: every KME maps key IDs through it, so that
    // SAEs see IDs nobody outside the KMEs can predict.
    let key_id_secret = pki.join("key-ids.secret");
    if !key_id_secret.exists() {
        qkdnet_kms::key_id::create_secret(&key_id_secret)?;
    }

    let links_dir = dir.join("links");
    std::fs::create_dir_all(&links_dir)?;
    for l in &topo.links {
        let p = links_dir.join(format!("{}.key", l.id));
        if !p.exists() {
            let mut secret = zeroize::Zeroizing::new(vec![0u8; BOOTSTRAP_BYTES]);
            getrandom::fill(&mut secret)
                .map_err(|e| NetError::Io(std::io::Error::other(e.to_string())))?;
            write_secret(&p, &secret)?;
        }
    }

    let kme_url = |i: usize| format!("https://127.0.0.1:{}", ports[i].kme);
    let index = |id: &qkdnet_kms::ids::KmeId| topo.nodes.iter().position(|n| n == id);
    let all_saes: Vec<SaeConfig> = topo
        .saes
        .iter()
        .map(|(s, k)| SaeConfig {
            id: s.clone(),
            kme: k.clone(),
        })
        .collect();
    // Every link of the network: each KME routes relayed keys over them.
    let all_links: Vec<[qkdnet_kms::ids::KmeId; 2]> = topo
        .links
        .iter()
        .map(|l| [l.a.clone(), l.b.clone()])
        .collect();
    let mut records = Vec::new();
    for (i, id) in topo.nodes.iter().enumerate() {
        let nd = dir.join("nodes").join(id.as_str());
        std::fs::create_dir_all(&nd)?;
        // The node master key: its KME's store keeps key material encrypted
        // under it (kept on a restart, as the store is).
        let master_key = nd.join("master.key");
        if !master_key.exists() {
            qkdnet_kms::store::MasterKey::create_file(&master_key)?;
        }
        let (cert, key) = (nd.join("kme.pem"), nd.join("kme.key"));
        if !cert.exists() {
            let issued = ca.issue(&Identity::Kme(id.clone()), &sans)?;
            std::fs::write(&cert, &issued.cert_pem)?;
            write_secret(&key, issued.key_pem.as_bytes())?;
        }
        let mut peers = Vec::new();
        let mut links = Vec::new();
        for l in &topo.links {
            let (role, peer) = if &l.a == id {
                (Role::Alice, &l.b)
            } else if &l.b == id {
                (Role::Bob, &l.a)
            } else {
                continue;
            };
            let j = index(peer).ok_or_else(|| NetError::Config(format!("unknown node {peer}")))?;
            peers.push(PeerConfig {
                kme_id: peer.clone(),
                url: kme_url(j),
            });
            links.push(NodeLink {
                id: l.id.clone(),
                peer: peer.clone(),
                role,
                peer_link_addr: (role == Role::Alice)
                    .then(|| SocketAddr::from(([127, 0, 0, 1], ports[j].link))),
                preset: l.preset.clone(),
                distance_km: l.pass.is_none().then_some(l.distance_km),
                pass_period_s: l.pass.as_ref().map(|p| p.period_s),
                pass_offset_s: l.pass.as_ref().map(|p| p.offset_s),
                eve: l.eve.clone(),
                reconciler: l.reconciler.clone(),
                block_gates: l.block_gates,
                bootstrap_file: links_dir.join(format!("{}.key", l.id)),
                model_key_bps: l.model_key_bps,
            });
        }
        let cfg = NodeConfig {
            node: NodeSection {
                id: id.to_string(),
                link_listen: SocketAddr::from(([127, 0, 0, 1], ports[i].link)),
                mgmt_listen: SocketAddr::from(([127, 0, 0, 1], ports[i].mgmt)),
                time_scale: topo.meta.time_scale,
            },
            kme: KmeConfig {
                kme_id: id.clone(),
                listen: SocketAddr::from(([127, 0, 0, 1], ports[i].kme)),
                store: nd.join("keys.sqlite"),
                store_synchronous: SyncMode::Full,
                store_url: None,
                store_schema: None,
                tls: TlsPaths {
                    ca: ca_pem.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                    key_exchange: opts.sae_key_exchange,
                },
                limits: Limits::default(),
                peer_timeout_ms: 5000,
                peer_attempts: 2,
                peers,
                saes: all_saes.clone(),
                test_keys: None,
                links: all_links.clone(),
                relay_attempts: 3,
                stock_keys: qkdnet_kms::config::default_stock_keys(),
                link_state_interval_ms: 1000,
                connections: Default::default(),
                key_id_secret: Some(key_id_secret.clone()),
                store_key: Some(master_key),
                store_key_pkcs11: None,
            },
            links,
        };
        let config = nd.join("node.toml");
        std::fs::write(&config, cfg.to_toml()?)?;
        records.push(NodeRecord {
            id: id.to_string(),
            pid: 0,
            mgmt: cfg.node.mgmt_listen,
            kme_url: kme_url(i),
            link_port: cfg.node.link_listen,
            config,
            log: nd.join("node.log"),
        });
    }

    let sae_dir = pki.join("saes");
    std::fs::create_dir_all(&sae_dir)?;
    let mut connect = ConnectFile::default();
    for (s, k) in &topo.saes {
        let (cert, key) = (
            sae_dir.join(format!("{s}.pem")),
            sae_dir.join(format!("{s}.key")),
        );
        if !cert.exists() {
            let issued = ca.issue(&Identity::Sae(s.clone()), &[])?;
            std::fs::write(&cert, &issued.cert_pem)?;
            write_secret(&key, issued.key_pem.as_bytes())?;
        }
        let i = index(k).ok_or_else(|| NetError::Config(format!("unknown node {k}")))?;
        connect.saes.push(SaeEntry {
            id: s.to_string(),
            node: k.to_string(),
            kme: k.to_string(),
            kme_url: kme_url(i),
            cert,
            key,
            ca: ca_pem.clone(),
        });
    }
    connect
        .save(&dir.join("connect.json"))
        .map_err(qkdnet_kms::KmsError::from)?;
    let record = NetRecord {
        name: topo.meta.name.clone(),
        nodes: records,
    };
    record.save(&dir)?;
    Ok(Prepared {
        dir,
        record,
        topology: topo.clone(),
    })
}

/// Starts one `EXE node run --config …` per node and waits until every
/// management endpoint answers (or a node dies, whose log tail is reported).
pub fn start(p: &mut Prepared, exe: &Path, timeout: Duration) -> Result<Vec<Child>, NetError> {
    let mut children = Vec::new();
    for n in &mut p.record.nodes {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)?;
        let child = Command::new(exe)
            .args(["node", "run", "--config"])
            .arg(&n.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| NetError::Config(format!("cannot start {}: {e}", exe.display())))?;
        n.pid = child.id();
        children.push(child);
    }
    p.record.save(&p.dir)?;
    let deadline = Instant::now() + timeout;
    for i in 0..children.len() {
        let n = &p.record.nodes[i];
        loop {
            if http_get(n.mgmt, "/health").is_ok() {
                break;
            }
            let failure = match children[i].try_wait() {
                Ok(Some(status)) => Some(format!(
                    "node {} exited during start-up ({status}); its log says:\n{}",
                    n.id,
                    log_tail(&n.log, 5)
                )),
                _ if Instant::now() > deadline => Some(format!(
                    "node {} did not answer on {} within {timeout:?}; see {}",
                    n.id,
                    n.mgmt,
                    n.log.display()
                )),
                _ => None,
            };
            if let Some(msg) = failure {
                stop_all(&p.record, &mut children, Duration::from_secs(3));
                return Err(NetError::Config(msg));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(children)
}

/// The last `n` lines of a log file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Stops every node of `record`: SIGTERM, then SIGKILL after `grace`. Reaps
/// `children` if this process started them. Returns the nodes that had to be killed.
pub fn stop_all(record: &NetRecord, children: &mut [Child], grace: Duration) -> Vec<String> {
    use rustix::process::Signal;
    for n in record.running() {
        signal(n.pid, Signal::TERM);
    }
    let deadline = Instant::now() + grace;
    let mut killed = Vec::new();
    loop {
        for c in children.iter_mut() {
            let _ = c.try_wait();
        }
        let left = record.running();
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            for n in left {
                signal(n.pid, Signal::KILL);
                killed.push(n.id.clone());
            }
            for c in children.iter_mut() {
                let _ = c.wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    killed
}

/// `qkdnet net down`: stops the network in `dir`.
pub fn down(dir: &Path) -> Result<(usize, Vec<String>), NetError> {
    let mut record = NetRecord::load(dir)?;
    let n = record.running().len();
    let killed = stop_all(&record, &mut [], Duration::from_secs(5));
    for node in &mut record.nodes {
        node.pid = 0;
    }
    record.save(dir)?;
    Ok((n, killed))
}

/// A minimal HTTP/1.0 GET to a node's management port (loopback, plain HTTP).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, NetError> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = Vec::new();
    s.take(16 << 20).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| NetError::Peer(format!("{addr}: malformed HTTP answer")))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(NetError::Peer(format!(
            "{addr}{path}: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(body.to_string())
}

/// `/status` of every running node of `record` (an error string for a node that does not answer).
pub fn status(record: &NetRecord) -> Vec<(String, Result<NodeStatus, String>)> {
    record
        .nodes
        .iter()
        .map(|n| {
            let r = http_get(n.mgmt, "/status")
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_str(&b).map_err(|e| e.to_string()));
            (n.id.clone(), r)
        })
        .collect()
}
