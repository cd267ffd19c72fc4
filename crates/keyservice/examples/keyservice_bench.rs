//! Benchmark of the key service: authenticated session setups per second and
//! their latency with many terminals at once, on the SQLite store.
//!
//! The service runs in this process as `qkdnet keyservice serve` runs it (TCP
//! on loopback, the writer thread, group commit, `synchronous=FULL`); so do
//! the terminals (the real client: challenge, two keys, HMAC-SM3 tag, grant
//! opened with SM4-GCM), sharing the machine's cores with it. Terminals come in
//! pairs: one opens a session naming the other, which then joins it; a *session
//! setup* is both requests. Media are charged straight into the store (no QKD
//! network here) and the terminals hold the same keys in memory. Session keys
//! come from a pool refilled in memory with `--qkd-fraction` of the demand (as
//! if the node's link supplied that much), the rest from the CSPRNG; the
//! figure reports the fraction granted from QKD. Prints one JSON object.
//!
//! ```sh
//! cargo run --release -p qkdnet-keyservice --example keyservice_bench -- --terminals 64 --setups 200
//! # PostgreSQL (a fresh schema on the server in QKDNET_TEST_PG):
//! eval "export $(bash scripts/postgres.sh)"
//! cargo run --release -p qkdnet-keyservice --example keyservice_bench -- --terminals 64 --setups 200 --postgres
//! # the SQLite store alone (no network, no terminals), requests committed in groups of N:
//! cargo run --release -p qkdnet-keyservice --example keyservice_bench -- --store-only 1 --group N
//! ```
#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use qkdnet_crypto::sm3::sm3;
use qkdnet_keyservice::client::{Connection, Terminal};
use qkdnet_keyservice::postgres::PgStore;
use qkdnet_keyservice::qkd::KeyPool;
use qkdnet_keyservice::server::{Metrics, ServerConfig, Service, serve};
use qkdnet_keyservice::sqlite::SqliteStore;
use qkdnet_keyservice::store::{Durability, Store, direct_offer};
use qkdnet_kms::store::MasterKey;
use qkdnet_kms::store::postgres::{PostgresUrl, SchemaName};
use qkdnet_media::proto::{Challenge, Identity};
use qkdnet_media::{ChargeRecord, Key256, Medium, MemoryMedium};
use uuid::Uuid;

fn arg(name: &str, default: u64) -> Result<u64, String> {
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == name {
            return it
                .next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number"));
        }
    }
    Ok(default)
}

fn key_for(medium: &Uuid, index: u64) -> Key256 {
    Key256::new(sm3(&[&medium.as_bytes()[..], &index.to_be_bytes()].concat()))
}

/// A medium in memory charged with the same keys as the store: the bench
/// measures the service, not a disk.
fn charged(id: Uuid, owner: &Identity, n: u64) -> MemoryMedium {
    let mut m = MemoryMedium::new(id, owner.as_str(), n);
    let keys: Vec<Key256> = (0..n).map(|j| key_for(&id, j)).collect();
    m.charge(&keys, ChargeRecord::new("direct", 0).expect("valid"))
        .expect("fits");
    m
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let terminals = (arg("--terminals", 64)?.max(2) / 2 * 2) as usize;
    let setups = arg("--setups", 200)?.max(1);
    let qkd_percent = arg("--qkd-percent", 100)?.min(100);
    // `--synchronous-normal 1`: answers after the commit, before it is on disk.
    let durability = if arg("--synchronous-normal", 0)? == 1 {
        Durability::Normal
    } else {
        Durability::Full
    };
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("ks.db");
    let master = MasterKey::from_bytes([7; 32]);
    // `--postgres`: the store is the PostgreSQL server in QKDNET_TEST_PG (a fresh schema).
    let pg = if std::env::args().any(|a| a == "--postgres") {
        let url: PostgresUrl = std::env::var("QKDNET_TEST_PG")
            .map_err(
                |_| "--postgres needs QKDNET_TEST_PG (eval \"export $(bash scripts/postgres.sh)\")",
            )?
            .parse()?;
        let schema = SchemaName::new(&format!("ks_bench_{}", std::process::id()))?;
        Some((url, schema))
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    // Subscribers and their media, charged straight into the store.
    let keys_per_medium = 2 * setups + 4;
    let mut media = Vec::new();
    let t = Instant::now();
    {
        let mut lite = match &pg {
            None => Some(SqliteStore::open(&db, &master)?),
            Some(_) => None,
        };
        let pgs = match &pg {
            Some((url, schema)) => Some(rt.block_on(PgStore::open(url, schema, &master, 1))?),
            None => None,
        };
        for i in 0..terminals {
            let identity = Identity::new(format!("sip:user{i}@bench.example"))?;
            let id = Uuid::new_v4();
            let mut first = 0;
            match (&mut lite, &pgs) {
                (Some(s), _) => s.enrol(&identity, "", 0)?,
                (None, Some(s)) => rt.block_on(s.enrol(&identity, "", 0))?,
                _ => unreachable!("one store"),
            }
            while first < keys_per_medium {
                let n = (keys_per_medium - first).min(256);
                let keys: Vec<Key256> = (first..first + n).map(|j| key_for(&id, j)).collect();
                let offer = direct_offer(id, &identity, first, n as usize)?;
                match (&mut lite, &pgs) {
                    (Some(s), _) => s.charge(&offer, &keys, 0)?,
                    (None, Some(s)) => rt.block_on(s.charge(&offer, &keys, 0))?,
                    _ => unreachable!("one store"),
                }
                .map_err(|r| format!("seeding refused: {r}"))?;
                first += n;
            }
            media.push((id, identity));
        }
        if let Some(s) = &pgs {
            rt.block_on(s.analyze())?;
        }
    }
    let seed_s = t.elapsed().as_secs_f64();

    if arg("--store-only", 0)? == 1 {
        // The store alone, no network: requests signed here, decided and
        // committed in groups of `--group`, as the writer thread does.
        let group = arg("--group", 32)?.max(1) as usize;
        let mut s = SqliteStore::open(&db, &master)?;
        let mut pool = KeyPool::new();
        let mut ops = Vec::new();
        let mut next = vec![0u64; media.len()];
        let total = setups as usize * media.len();
        let ch = Challenge { challenge: [3; 32] };
        let t = Instant::now();
        let mut done = 0usize;
        let mut sid_n = 0u64;
        while done < total {
            ops.clear();
            for _ in 0..group.min(total - done) {
                let m = done % media.len();
                let (id, _) = &media[m];
                let (_, peer) = &media[(m + 1) % media.len()];
                let i = next[m];
                next[m] += 2;
                sid_n += 1;
                let mut sid = [0u8; 16];
                sid[..8].copy_from_slice(&sid_n.to_be_bytes());
                let req = qkdnet_media::proto::AuthRequest::sign(
                    *id,
                    i,
                    &key_for(id, i),
                    &ch,
                    qkdnet_media::proto::Request::SessionKey {
                        session_id: sid,
                        peer: peer.clone(),
                    },
                );
                ops.push(qkdnet_keyservice::store::GrantOp {
                    challenge: ch,
                    req,
                    nonce: [0; 12],
                    max_skip: 64,
                    session_ttl: 300,
                });
                done += 1;
            }
            let plans = s.grant_batch(&ops, &mut pool, 1)?;
            assert!(
                plans
                    .iter()
                    .all(|p| p.as_ref().is_ok_and(|p| p.answer.is_ok()))
            );
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({"bench": "keyservice-store", "requests": total, "group": group,
            "requests_per_second": total as f64 / secs, "us_per_request": secs * 1e6 / total as f64})
        );
        return Ok(());
    }

    let store_name = if pg.is_some() { "postgres" } else { "sqlite" };
    let report = rt.block_on(async move {
        let pool = KeyPool::new();
        let store = match &pg {
            Some((url, schema)) => {
                Store::postgres(url, schema, &master, pool.drawer(), 300, 16).await?
            }
            None => Store::sqlite(&db, &master, pool.drawer(), 300, durability)?,
        };
        let service = Arc::new(Service {
            store,
            config: ServerConfig::default(),
            kme: None,
            metrics: Metrics::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        tokio::spawn(serve(listener, service.clone()));
        // The "link": QKD keys for qkd_percent of the sessions, topped up as used.
        let feeder = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut given = 0u64;
                loop {
                    let used = pool.stats.qkd.load(Ordering::Relaxed)
                        + pool.stats.csprng.load(Ordering::Relaxed);
                    let due = (used + 64) * qkd_percent / 100;
                    if due > given && pool.level() < 64 {
                        let n = due - given;
                        let mut k = [0u8; 32];
                        pool.extend((0..n).map(|j| {
                            k[..8].copy_from_slice(&(given + j).to_be_bytes());
                            Key256::new(sm3(&k))
                        }));
                        given += n;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };

        let start = Instant::now();
        let mut tasks = Vec::new();
        for pair in media.chunks(2) {
            let (a_id, a) = pair[0].clone();
            let (b_id, b) = pair[1].clone();
            let b_identity = b.clone();
            let addr = addr.clone();
            tasks.push(tokio::spawn(async move {
                // The opener and the joiner run side by side (the joiner one
                // session behind), so every terminal has a request in flight.
                let (tx, mut rx) = tokio::sync::mpsc::channel::<([u8; 16], Key256, Instant)>(4);
                let opener = {
                    let addr = addr.clone();
                    tokio::spawn(async move {
                        let mut ma = charged(a_id, &a, keys_per_medium);
                        let mut ca = Connection::connect(&addr, Duration::from_secs(30)).await?;
                        let mut lat = Vec::with_capacity(setups as usize);
                        for n in 0..setups {
                            let mut sid = [0u8; 16];
                            sid[..8].copy_from_slice(&n.to_be_bytes());
                            sid[8..].copy_from_slice(&a_id.as_bytes()[..8]);
                            let t0 = Instant::now();
                            let ka = Terminal::new(&mut ma)?.open(&mut ca, &b, sid).await?;
                            lat.push(t0.elapsed().as_secs_f64() * 1e3);
                            if tx.send((sid, ka.key, t0)).await.is_err() {
                                break;
                            }
                        }
                        Ok::<_, qkdnet_keyservice::TerminalError>(lat)
                    })
                };
                let mut mb = charged(b_id, &b_identity, keys_per_medium);
                let mut cb = Connection::connect(&addr, Duration::from_secs(30)).await?;
                let mut lat = Vec::with_capacity(2 * setups as usize);
                let mut setup_lat = Vec::with_capacity(setups as usize);
                while let Some((sid, key, t0)) = rx.recv().await {
                    let t1 = Instant::now();
                    let kb = Terminal::new(&mut mb)?.join(&mut cb, sid).await?;
                    lat.push(t1.elapsed().as_secs_f64() * 1e3);
                    setup_lat.push(t0.elapsed().as_secs_f64() * 1e3);
                    assert_eq!(key, kb.key, "both sides hold one key");
                }
                lat.extend(
                    opener
                        .await
                        .map_err(|e| qkdnet_keyservice::TerminalError::Net(e.to_string()))??,
                );
                Ok::<_, qkdnet_keyservice::TerminalError>((lat, setup_lat))
            }));
        }
        let mut lat = Vec::new();
        let mut setup_lat = Vec::new();
        for t in tasks {
            let (l, s) = t.await.map_err(|e| e.to_string())??;
            lat.extend(l);
            setup_lat.extend(s);
        }
        let secs = start.elapsed().as_secs_f64();
        feeder.abort();
        lat.sort_by(f64::total_cmp);
        setup_lat.sort_by(f64::total_cmp);
        let requests = lat.len() as f64;
        let qkd = pool.stats.qkd.load(Ordering::Relaxed) as f64;
        let csprng = pool.stats.csprng.load(Ordering::Relaxed) as f64;
        Ok::<_, Box<dyn std::error::Error>>(serde_json::json!({
            "bench": "keyservice",
            "store": store_name,
            "terminals": terminals,
            "session_setups": setup_lat.len(),
            "seconds": secs,
            "requests_per_second": requests / secs,
            "session_setups_per_second": setup_lat.len() as f64 / secs,
            "request_p50_ms": percentile(&lat, 0.50),
            "request_p99_ms": percentile(&lat, 0.99),
            "setup_p50_ms": percentile(&setup_lat, 0.50),
            "setup_p99_ms": percentile(&setup_lat, 0.99),
            "fraction_from_qkd": qkd / (qkd + csprng).max(1.0),
            "grants": service.metrics.grants.load(Ordering::Relaxed),
        }))
    })?;
    let mut report = report;
    report["seed_seconds"] = serde_json::json!(seed_s);
    println!("{report}");
    Ok(())
}
