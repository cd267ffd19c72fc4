//! Trusted-node relay end to end: KMEs in-process on loopback (mutual TLS, SQLite
//! stores, seeded test blocks on every link), SAEs calling ETSI 014 over HTTPS.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use qkdnet_kms::config::{
    KmeConfig, PeerConfig, RunningKme, SaeConfig, SyncMode, TlsPaths, launch_with_tls,
};
use qkdnet_kms::etsi::Limits;
use qkdnet_kms::identity::Identity;
use qkdnet_kms::pki::Ca;
use qkdnet_kms::testkeys::seeded_block;
use qkdnet_kms::tls::TlsMaterial;
use serde_json::json;

/// Units per test block (BLOCK_BYTES / 32).
const UNITS_PER_BLOCK: u64 = (BLOCK_BYTES / 32) as u64;

/// KMEs `k0…k(n-1)` joined by `edges`, each with SAE `sae-kN`, plus `spy-k(n-1)`
/// on the last KME.
struct Mesh {
    _dir: TempDir,
    ca: Ca,
    cfgs: Vec<KmeConfig>,
    tls: Vec<TlsMaterial>,
    kmes: Vec<Option<RunningKme>>,
    edges: Vec<(usize, usize)>,
}

fn name(i: usize) -> String {
    format!("k{i}")
}

impl Mesh {
    /// Starts the mesh; `blocks(edge)` seeded blocks go into each link.
    async fn start(
        n: usize,
        edges: &[(usize, usize)],
        blocks: impl Fn(usize, usize) -> u64,
    ) -> Mesh {
        let dir = TempDir::new("relay");
        let ca = Ca::generate("qkdnet relay test CA").expect("CA");
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(
                tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind"),
            );
        }
        let addrs: Vec<_> = listeners
            .iter()
            .map(|l| l.local_addr().expect("addr"))
            .collect();
        let mut saes: Vec<SaeConfig> = (0..n)
            .map(|i| SaeConfig {
                id: sae(&format!("sae-{}", name(i))),
                kme: kme(&name(i)),
            })
            .collect();
        saes.push(SaeConfig {
            id: sae(&format!("spy-{}", name(n - 1))),
            kme: kme(&name(n - 1)),
        });
        let links: Vec<[qkdnet_kms::ids::KmeId; 2]> = edges
            .iter()
            .map(|&(a, b)| [kme(&name(a)), kme(&name(b))])
            .collect();
        let mut cfgs = Vec::new();
        let mut tls = Vec::new();
        for i in 0..n {
            let peers = edges
                .iter()
                .filter_map(|&(a, b)| match (a == i, b == i) {
                    (true, _) => Some(b),
                    (_, true) => Some(a),
                    _ => None,
                })
                .map(|j| PeerConfig {
                    kme_id: kme(&name(j)),
                    url: format!("https://127.0.0.1:{}", addrs[j].port()),
                })
                .collect();
            cfgs.push(KmeConfig {
                kme_id: kme(&name(i)),
                listen: addrs[i],
                store: dir.0.join(format!("{}.sqlite", name(i))),
                store_synchronous: SyncMode::Normal,
                store_url: None,
                store_schema: None,
                tls: TlsPaths {
                    ca: "unused".into(),
                    cert: "unused".into(),
                    key: "unused".into(),
                },
                limits: Limits::default(),
                peer_timeout_ms: 3000,
                peer_attempts: 2,
                peers,
                saes: saes.clone(),
                test_keys: None,
                links: links.clone(),
                relay_attempts: 3,
                link_state_interval_ms: 100,
            });
            tls.push(
                ca.material(&Identity::Kme(kme(&name(i))), &[])
                    .expect("cert"),
            );
        }
        let mut kmes = Vec::new();
        for (i, l) in listeners.into_iter().enumerate() {
            kmes.push(Some(
                launch_with_tls(&cfgs[i], tls[i].clone(), Some(l))
                    .await
                    .expect("launch"),
            ));
        }
        let mesh = Mesh {
            _dir: dir,
            ca,
            cfgs,
            tls,
            kmes,
            edges: edges.to_vec(),
        };
        for &(a, b) in edges {
            let link = format!("{}{}", name(a), name(b));
            for blk in 0..blocks(a, b) {
                mesh.kme(a)
                    .ingest(seeded_block(SEED, &link, kme(&name(b)), blk, BLOCK_BYTES))
                    .await
                    .expect("ingest");
                mesh.kme(b)
                    .ingest(seeded_block(SEED, &link, kme(&name(a)), blk, BLOCK_BYTES))
                    .await
                    .expect("ingest");
            }
        }
        mesh
    }

    fn kme(&self, i: usize) -> &std::sync::Arc<qkdnet_kms::Kme> {
        &self.kmes[i].as_ref().expect("running").kme
    }

    fn url(&self, i: usize) -> String {
        format!("https://127.0.0.1:{}", self.cfgs[i].listen.port())
    }

    fn sae(&self, who: &str) -> Client {
        Client::new(
            &self
                .ca
                .material(&Identity::Sae(sae(who)), &[])
                .expect("cert"),
        )
    }

    async fn kill(&mut self, i: usize) {
        if let Some(k) = self.kmes[i].take() {
            k.server.shutdown().await;
        }
    }

    async fn restart(&mut self, i: usize) {
        let mut listener = None;
        for _ in 0..100 {
            if let Ok(l) = tokio::net::TcpListener::bind(self.cfgs[i].listen).await {
                listener = Some(l);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kmes[i] = Some(
            launch_with_tls(&self.cfgs[i], self.tls[i].clone(), listener)
                .await
                .expect("relaunch"),
        );
    }

    /// Units held at each end of every link: (a's pool for b, b's pool for a).
    async fn pools(&self) -> BTreeMap<(usize, usize), (u64, u64)> {
        let mut m = BTreeMap::new();
        for &(a, b) in &self.edges {
            let (Some(ka), Some(kb)) = (&self.kmes[a], &self.kmes[b]) else {
                continue;
            };
            let pa = ka
                .kme
                .store()
                .pool_counts(kme(&name(b)))
                .await
                .expect("pool");
            let pb = kb
                .kme
                .store()
                .pool_counts(kme(&name(a)))
                .await
                .expect("pool");
            m.insert((a, b), (pa.total_units, pb.total_units));
        }
        m
    }

    async fn enc(&self, from: usize, to: &str, number: u32, size: u32) -> (u16, serde_json::Value) {
        let c = self.sae(&format!("sae-{}", name(from)));
        let (st, v) = c
            .post(
                &format!("{}/api/v1/keys/{to}/enc_keys", self.url(from)),
                &json!({"number": number, "size": size}),
            )
            .await;
        (st.as_u16(), v)
    }

    async fn dec(
        &self,
        at: usize,
        who: &str,
        master: &str,
        ids: &[String],
    ) -> (u16, serde_json::Value) {
        let c = self.sae(who);
        let (st, v) = c
            .post(
                &format!("{}/api/v1/keys/{master}/dec_keys", self.url(at)),
                &key_ids_body(ids),
            )
            .await;
        (st.as_u16(), v)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_relays_identical_keys_and_each_hop_spends_exactly_its_share() {
    // k0 - k1 - k2 - k3: three hops.
    let edges = [(0, 1), (1, 2), (2, 3)];
    let mesh = Mesh::start(4, &edges, |_, _| 2).await;
    let before = mesh.pools().await;
    let (st, v) = mesh.enc(0, "sae-k3", 3, 512).await;
    assert_eq!(st, 200, "{v}");
    let keys = keys_of(&v);
    assert_eq!(keys.len(), 3);
    let ids: Vec<String> = keys.iter().map(|k| k.0.clone()).collect();
    // Nobody but the slave gets them, and not at another KME.
    assert_eq!(mesh.dec(3, "spy-k3", "sae-k0", &ids).await.0, 401);
    assert_eq!(mesh.dec(2, "sae-k2", "sae-k0", &ids).await.0, 400); // not held there
    let (st, got) = mesh.dec(3, "sae-k3", "sae-k0", &ids).await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(keys_of(&got), keys, "the slave gets the master's keys");
    // Once only.
    assert_eq!(mesh.dec(3, "sae-k3", "sae-k0", &ids).await.0, 400);
    // Each link spent exactly 3 keys × 2 units, at both ends.
    let after = mesh.pools().await;
    for e in edges {
        let (b, a) = (before[&e], after[&e]);
        assert_eq!((b.0 - a.0, b.1 - a.1), (6, 6), "link {e:?}: {b:?} -> {a:?}");
    }
    for (i, sent) in [(0, 6), (1, 6), (2, 6), (3, 0)] {
        let c = mesh.kme(i).counters();
        assert_eq!(c.relay_units_sent.load(Ordering::Relaxed), sent, "k{i}");
    }
    assert_eq!(
        mesh.kme(0)
            .counters()
            .relay_requests
            .load(Ordering::Relaxed),
        1
    );
    assert_eq!(
        mesh.kme(1)
            .counters()
            .relay_forwarded
            .load(Ordering::Relaxed),
        1
    );
    assert_eq!(
        mesh.kme(3)
            .counters()
            .relay_delivered
            .load(Ordering::Relaxed),
        1
    );
    // Status towards a distant SAE names its KME and, once link state has
    // spread, the route's bottleneck in keys.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let c = mesh.sae("sae-k0");
    let (st, s) = c
        .get(&format!("{}/api/v1/keys/sae-k3/status", mesh.url(0)))
        .await;
    assert_eq!(st.as_u16(), 200, "{s}");
    assert_eq!(s["target_KME_ID"], "k3");
    // Each KME owns half the units of its links, less what it spent.
    let stored = s["stored_key_count"].as_u64().expect("count");
    assert!(stored > 0 && stored <= UNITS_PER_BLOCK, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_goes_around_a_dead_node_and_an_empty_link() {
    // k0 - k1 - k4 (two hops) and k0 - k2 - k3 - k4 (three hops).
    let edges = [(0, 1), (1, 4), (0, 2), (2, 3), (3, 4)];
    // The short route's second link is empty.
    let mut mesh = Mesh::start(5, &edges, |a, b| if (a, b) == (1, 4) { 0 } else { 2 }).await;
    let (st, v) = mesh.enc(0, "sae-k4", 2, 256).await;
    assert_eq!(st, 200, "empty link not avoided: {v}");
    let ids: Vec<String> = keys_of(&v).into_iter().map(|k| k.0).collect();
    let (st, got) = mesh.dec(4, "sae-k4", "sae-k0", &ids).await;
    assert_eq!(st, 200, "{got}");
    assert_eq!(keys_of(&got), keys_of(&v));
    // Now the long route's k2 goes too: no route has key.
    mesh.kill(2).await;
    let (st, v) = mesh.enc(0, "sae-k4", 1, 256).await;
    assert_eq!(st, 503, "{v}");
    assert!(v["message"].as_str().is_some(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_node_killed_during_requests_never_makes_a_key_appear_twice() {
    // Two equal routes k0 - k1 - k3 and k0 - k2 - k3; k1 dies while requests run.
    let edges = [(0, 1), (1, 3), (0, 2), (2, 3)];
    let mut mesh = Mesh::start(4, &edges, |_, _| 4).await;
    let mut delivered: Vec<(String, String)> = Vec::new();
    let mut failures = 0;
    for round in 0..16 {
        // In round 5, k1 stops while the request is under way.
        let victim = if round == 5 {
            mesh.kmes[1].take()
        } else {
            None
        };
        let ((st, v), ()) = tokio::join!(mesh.enc(0, "sae-k3", 2, 256), async {
            if let Some(k) = victim {
                tokio::time::sleep(Duration::from_millis(3)).await;
                k.server.shutdown().await;
            }
        });
        match st {
            200 => {
                let keys = keys_of(&v);
                let ids: Vec<String> = keys.iter().map(|k| k.0.clone()).collect();
                let (st, got) = mesh.dec(3, "sae-k3", "sae-k0", &ids).await;
                assert_eq!(st, 200, "round {round}: {got}");
                assert_eq!(keys_of(&got), keys, "round {round}: ends disagree");
                delivered.extend(keys);
            }
            503 => failures += 1,
            other => panic!("round {round}: status {other}: {v}"),
        }
    }
    // Rerouted: after the kill at most the first request fails.
    assert!(failures <= 1, "{failures} failures");
    let ids: BTreeSet<&String> = delivered.iter().map(|k| &k.0).collect();
    let bytes: BTreeSet<&String> = delivered.iter().map(|k| &k.1).collect();
    assert_eq!(ids.len(), delivered.len(), "a key ID delivered twice");
    assert_eq!(bytes.len(), delivered.len(), "key material delivered twice");
    // k1 comes back: the voids for it settle, nothing stays pending at the
    // origin, and both ends of every link agree on the units they hold.
    mesh.restart(1).await;
    assert!(mesh.kme(0).settle(Duration::from_secs(20)).await);
    assert!(
        mesh.kme(0)
            .store()
            .pending()
            .await
            .expect("pending")
            .is_empty()
    );
    for (e, (a, b)) in mesh.pools().await {
        assert_eq!(a, b, "link {e:?}: the two ends disagree");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_messages_from_strangers_and_bad_routes_are_refused() {
    let edges = [(0, 1), (1, 2)];
    let mesh = Mesh::start(3, &edges, |_, _| 1).await;
    // An SAE cannot use the KME-to-KME relay API.
    let c = mesh.sae("sae-k0");
    let body = json!({
        "request_ID": "00000000-0000-4000-8000-000000000001",
        "route": ["k0", "k1", "k2"], "hop": 1,
        "master_SAE_ID": "sae-k0", "slave_SAE_ID": "sae-k2", "keys": []
    });
    let (st, _) = c
        .post(&format!("{}/api/v1/kme/relay", mesh.url(1)), &body)
        .await;
    assert_eq!(st.as_u16(), 401);
    // A peer KME naming a route where the receiver is not next: 400.
    let k0 = Client::new(&mesh.tls[0]);
    let mut bad = body.clone();
    bad["route"] = json!(["k0", "k2", "k1"]);
    let (st, v) = k0
        .post(&format!("{}/api/v1/kme/relay", mesh.url(1)), &bad)
        .await;
    assert_eq!(st.as_u16(), 400, "{v}");
    // No keys: 400; malformed: 400.
    let (st, _) = k0
        .post(&format!("{}/api/v1/kme/relay", mesh.url(1)), &body)
        .await;
    assert_eq!(st.as_u16(), 400);
    let (st, _) = k0
        .raw(
            hyper::Method::POST,
            &format!("{}/api/v1/kme/relay", mesh.url(1)),
            Some("application/json"),
            b"{\"route\": 5".to_vec(),
        )
        .await
        .expect("request");
    assert_eq!(st.as_u16(), 400);
    // Link state is for peers only.
    let (st, _) = c.get(&format!("{}/api/v1/kme/lsdb", mesh.url(1))).await;
    assert_eq!(st.as_u16(), 401);
    let (st, v) = k0.get(&format!("{}/api/v1/kme/lsdb", mesh.url(1))).await;
    assert_eq!(st.as_u16(), 200);
    assert!(
        v.as_array()
            .is_some_and(|a| a.iter().any(|s| s["kme"] == "k1")),
        "{v}"
    );
}
