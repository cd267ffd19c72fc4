//! A two-KME network in a temporary state directory, set up the way a launcher
//! would: a PKI directory, one TOML configuration per KME with seeded `[test_keys]`
//! (TEST MATERIAL), both KMEs launched in-process from those files, and a
//! `connect.json` for the applications. SAEs: alice at kme-a; bob and carol at kme-b.
#![allow(dead_code, missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use qkdnet_kms::client::EtsiClient;
use qkdnet_kms::config::{KmeConfig, RunningKme, launch};
use qkdnet_kms::connect::{ConnectFile, SaeEntry};
use qkdnet_kms::identity::Identity;
use qkdnet_kms::ids::{KmeId, SaeId};
use qkdnet_kms::pki::Ca;

/// Seeded test blocks per KME; each gives 32 keys of 256 bits per direction.
pub const BLOCKS: u64 = 16;

static COUNTER: AtomicU64 = AtomicU64::new(0);

pub struct Net {
    pub dir: PathBuf,
    pub connect: ConnectFile,
    pub a: RunningKme,
    pub b: RunningKme,
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn kme_toml(
    id: &str,
    port: u16,
    peer: &str,
    peer_port: u16,
    blocks: u64,
    block_bytes: usize,
) -> String {
    format!(
        r#"kme_id = "{id}"
listen = "127.0.0.1:{port}"
store = "{id}.sqlite"
peer_timeout_ms = 5000
key_id_secret = "pki/key-ids.secret"

[tls]
ca = "pki/ca.pem"
cert = "pki/kme-{id}.pem"
key = "pki/kme-{id}.key"

[[peer]]
kme_id = "{peer}"
url = "https://127.0.0.1:{peer_port}"

[[sae]]
id = "alice"
kme = "kme-a"
[[sae]]
id = "bob"
kme = "kme-b"
[[sae]]
id = "carol"
kme = "kme-b"

[test_keys]
seeded = 11
peer = "{peer}"
link = "a-b"
blocks = {blocks}
block_bytes = {block_bytes}
"#
    )
}

impl Net {
    pub async fn start() -> Net {
        Self::start_with(BLOCKS, 2048).await
    }

    /// With `blocks` seeded blocks of `block_bytes` each per KME.
    pub async fn start_with(blocks: u64, block_bytes: usize) -> Net {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("qkdnet-apps-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pki = dir.join("pki");
        let ca = Ca::init_dir(&pki, "qkdnet apps test CA").expect("CA");
        qkdnet_kms::key_id::create_secret(&pki.join("key-ids.secret")).expect("key-ID secret");
        for k in ["kme-a", "kme-b"] {
            let id = KmeId::new(k).expect("KME ID");
            ca.issue_to_dir(&pki, &Identity::Kme(id), &[])
                .expect("KME cert");
        }
        let la = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let lb = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (pa, pb) = (
            la.local_addr().expect("addr").port(),
            lb.local_addr().expect("addr").port(),
        );
        let mut running = Vec::new();
        for (id, port, peer, peer_port, l) in [
            ("kme-a", pa, "kme-b", pb, la),
            ("kme-b", pb, "kme-a", pa, lb),
        ] {
            let path = dir.join(format!("{id}.toml"));
            std::fs::write(
                &path,
                kme_toml(id, port, peer, peer_port, blocks, block_bytes),
            )
            .expect("config");
            let cfg = KmeConfig::from_file(&path).expect("valid config");
            running.push(launch(&cfg, Some(l)).await.expect("launch"));
        }
        let mut saes = Vec::new();
        for (name, node, port) in [("alice", "a", pa), ("bob", "b", pb), ("carol", "b", pb)] {
            let id = SaeId::new(name).expect("SAE ID");
            ca.issue_to_dir(&pki, &Identity::Sae(id), &[])
                .expect("SAE cert");
            saes.push(SaeEntry {
                id: name.into(),
                node: node.into(),
                kme: format!("kme-{node}"),
                kme_url: format!("https://127.0.0.1:{port}"),
                cert: format!("pki/sae-{name}.pem").into(),
                key: format!("pki/sae-{name}.key").into(),
                ca: "pki/ca.pem".into(),
            });
        }
        let path = dir.join("connect.json");
        ConnectFile { saes }.save(&path).expect("save connect.json");
        let connect = ConnectFile::load(&path).expect("load connect.json");
        let b = running.pop().expect("B");
        let a = running.pop().expect("A");
        Net { dir, connect, a, b }
    }

    pub fn client(&self, sae: &str) -> EtsiClient {
        self.connect
            .client(sae, Duration::from_secs(20))
            .expect("client")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes `data` to `name` in the state directory.
    pub fn file(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, data).expect("write");
        p
    }
}

/// Seeded test data (not random: reproducible failures).
pub fn data(len: usize, seed: u8) -> Vec<u8> {
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// No file named `name` and no temporary file of it in `dir`.
pub fn assert_no_output(dir: &Path, name: &str) {
    assert!(!dir.join(name).exists(), "{name} exists");
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
