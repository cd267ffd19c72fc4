//! Benchmark of the KME: enc_keys (and optionally dec_keys) over mutual TLS on
//! loopback, two KMEs in one process with SQLite stores, at several numbers of
//! concurrent SAEs. Prints one JSON object per concurrency level.
//!
//! Each SAE has its own certificate and TLS connection and loops on
//! `POST enc_keys {"number": N}` at KME A for its slave at KME B until the time or
//! request budget of the level is spent (closed loop: the throughput the KME can
//! sustain; by Little's law the latency is then concurrency / request rate). Each
//! request is the full path: reserve in A's store (fsync), reservation
//! acknowledged by B (fsync at B), confirm at A (fsync), answer. Bounded in time
//! and requests; loopback only.
//!
//! With `--rate KEYS_PER_S` the SAEs are open loop instead: each sends a request
//! every `SAEs · number / rate` seconds whether or not its previous one has been
//! answered (applications asking for keys on their own schedule): a backlog at
//! the KME shows up in the latencies instead of slowing the senders down. A
//! request's latency runs from its send; how late the sends were against their
//! schedule (timer granularity, a starved client) is reported apart
//! (`send_lag_*`). `--warmup S` runs the load S seconds before measuring (TLS
//! handshakes, first stock refills).
//!
//! ```sh
//! cargo run --release -p qkdnet-kms --example kme_bench -- --levels 1,16,64 --seconds 5 --number 64
//! cargo run --release -p qkdnet-kms --example kme_bench -- --levels 64 --seconds 5 --number 64 --rate 50000
//! ```
//!
//! `--store-url postgres://…` puts both KMEs' stores on a PostgreSQL server instead
//! (schemas `bench_<pid>_a` / `_b`, dropped at the end); `scripts/postgres.sh`
//! starts a throwaway server and prints its URL.
//!
//! Both stores keep key material encrypted under a node master key, as `qkdnet
//! net up` configures them; `--plaintext-store` leaves it in the clear, to
//! measure what the encryption costs.
#![allow(missing_docs)]

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use qkdnet_kms::config::{KmeConfig, PeerConfig, SaeConfig, SyncMode, TlsPaths, launch_with_tls};
use qkdnet_kms::etsi::Limits;
use qkdnet_kms::identity::Identity;
use qkdnet_kms::ids::{KmeId, SaeId};
use qkdnet_kms::pki::Ca;
use qkdnet_kms::store::postgres::{PostgresUrl, SchemaName};
use qkdnet_kms::testkeys::seeded_block;
use qkdnet_kms::tls::{KeyExchange, client_config};

struct Args {
    levels: Vec<usize>,
    seconds: f64,
    number: u32,
    max_requests: usize,
    sync: SyncMode,
    with_dec: bool,
    rate: Option<f64>,
    store_url: Option<String>,
    stock: u32,
    warmup: f64,
    plaintext_store: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        levels: vec![1, 16, 64],
        seconds: 5.0,
        number: 64,
        max_requests: 200_000,
        sync: SyncMode::Full,
        with_dec: false,
        rate: None,
        store_url: None,
        stock: qkdnet_kms::config::default_stock_keys(),
        warmup: 0.0,
        plaintext_store: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--levels" => {
                a.levels = val()?
                    .split(',')
                    .map(|s| s.trim().parse().map_err(|_| "bad --levels".to_string()))
                    .collect::<Result<_, _>>()?
            }
            "--seconds" => a.seconds = val()?.parse().map_err(|_| "bad --seconds")?,
            "--number" => a.number = val()?.parse().map_err(|_| "bad --number")?,
            "--max-requests" => {
                a.max_requests = val()?.parse().map_err(|_| "bad --max-requests")?
            }
            "--sync" => {
                a.sync = match val()?.as_str() {
                    "full" => SyncMode::Full,
                    "normal" => SyncMode::Normal,
                    _ => return Err("--sync full|normal".into()),
                }
            }
            "--with-dec" => a.with_dec = true,
            "--plaintext-store" => a.plaintext_store = true,
            "--store-url" => a.store_url = Some(val()?),
            "--stock" => a.stock = val()?.parse().map_err(|_| "bad --stock")?,
            "--warmup" => {
                a.warmup = val()?.parse().map_err(|_| "bad --warmup")?;
                if !(0.0..=60.0).contains(&a.warmup) {
                    return Err("--warmup must be 0 to 60 seconds".into());
                }
            }
            "--rate" => {
                let r: f64 = val()?.parse().map_err(|_| "bad --rate")?;
                if !(r.is_finite() && r > 0.0) {
                    return Err("--rate must be positive".into());
                }
                a.rate = Some(r);
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.levels.is_empty()
        || a.levels.iter().any(|&l| l == 0 || l > 256)
        || a.seconds <= 0.0
        || a.seconds > 120.0
    {
        return Err("levels in 1..=256, seconds in (0, 120]".into());
    }
    Ok(a)
}

type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// One enc_keys call; the key IDs (as dec_keys entries) on success.
async fn enc_call(cm: &HttpsClient, uri: &str, body: Bytes) -> Option<Vec<serde_json::Value>> {
    let req = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("invariant: static request is valid");
    let resp = cm.request(req).await.ok()?;
    let ok = resp.status().is_success();
    let b = resp.into_body().collect().await.ok()?;
    if !ok {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&b.to_bytes()).ok()?;
    Some(
        v["keys"]
            .as_array()?
            .iter()
            .map(|k| serde_json::json!({"key_ID": k["key_ID"]}))
            .collect(),
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let max_level = *args
        .levels
        .iter()
        .max()
        .expect("invariant: levels not empty");
    let dir = std::env::temp_dir().join(format!("qkdnet-kme-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let ca = Ca::generate("bench CA")?;
    let master_key = (!args.plaintext_store).then(|| dir.join("master.key"));
    if let Some(p) = &master_key {
        qkdnet_kms::store::MasterKey::create_file(p)?;
    }
    let pg: Option<PostgresUrl> = match &args.store_url {
        Some(u) => Some(u.parse().map_err(|e| format!("--store-url: {e}"))?),
        None => None,
    };
    let (ka, kb) = (KmeId::new("kme-a")?, KmeId::new("kme-b")?);
    let la = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (aa, ab) = (la.local_addr()?, lb.local_addr()?);
    let mut saes = Vec::new();
    for i in 0..max_level {
        saes.push(SaeConfig {
            id: SaeId::new(&format!("m{i}"))?,
            kme: ka.clone(),
        });
        saes.push(SaeConfig {
            id: SaeId::new(&format!("s{i}"))?,
            kme: kb.clone(),
        });
    }
    let limits = Limits {
        max_key_count: 100_000_000,
        ..Limits::default()
    };
    let mk = |id: &KmeId, listen, store: &str, peer: &KmeId, peer_addr: std::net::SocketAddr| {
        KmeConfig {
            kme_id: id.clone(),
            listen,
            store: if pg.is_some() {
                PathBuf::new()
            } else {
                dir.join(store)
            },
            store_synchronous: args.sync,
            store_url: pg.clone(),
            store_schema: pg.as_ref().map(|_| {
                SchemaName::new(&format!("bench_{}_{}", std::process::id(), &store[..1]))
                    .expect("invariant: valid schema name")
            }),
            tls: TlsPaths {
                ca: "-".into(),
                cert: "-".into(),
                key: "-".into(),
                key_exchange: KeyExchange::HybridOnly,
            },
            limits,
            peer_timeout_ms: 10_000,
            peer_attempts: 2,
            peers: vec![PeerConfig {
                kme_id: peer.clone(),
                url: format!("https://127.0.0.1:{}", peer_addr.port()),
            }],
            saes: saes.clone(),
            test_keys: None,
            links: Vec::new(),
            relay_attempts: 3,
            stock_keys: args.stock,
            link_state_interval_ms: 1000,
            connections: Default::default(),
            key_id_secret: None,
            store_key: master_key.clone(),
            store_key_pkcs11: None,
        }
    };
    let a = launch_with_tls(
        &mk(&ka, aa, "a.sqlite", &kb, ab),
        ca.material(&Identity::Kme(ka.clone()), &[])?,
        Some(la),
    )
    .await?;
    let b = launch_with_tls(
        &mk(&kb, ab, "b.sqlite", &ka, aa),
        ca.material(&Identity::Kme(kb.clone()), &[])?,
        Some(lb),
    )
    .await?;

    // Enough units for the whole run (bounded by max_requests), TEST material.
    // Plus what the stocks can hold: one per SAE pair (every SAE is a master).
    let keys_needed = (args.max_requests as u64 * u64::from(args.number)).min(3_000_000)
        + max_level as u64 * u64::from(args.stock);
    let block_bytes = 1 << 20; // 32768 units, half owned by A
    let blocks = (keys_needed * 2).div_ceil(32768).max(1);
    let t0 = Instant::now();
    for n in 0..blocks {
        a.kme
            .ingest(seeded_block(1, "bench", kb.clone(), n, block_bytes))
            .await?;
        b.kme
            .ingest(seeded_block(1, "bench", ka.clone(), n, block_bytes))
            .await?;
    }
    eprintln!(
        "ingested {blocks} blocks of 1 MiB into each store in {:.1} s (TEST material)",
        t0.elapsed().as_secs_f64()
    );
    if let Some(url) = &args.store_url {
        // A server that has just taken hundreds of MiB of inserts is still
        // checkpointing and has no statistics on the new tables; a KME's server
        // in service has long done both. Measure that state, not the settling.
        let t0 = Instant::now();
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        for k in ["a", "b"] {
            for t in ["units", "pools"] {
                client
                    .batch_execute(&format!(
                        "VACUUM ANALYZE \"bench_{}_{k}\".{t}",
                        std::process::id()
                    ))
                    .await?;
            }
        }
        if let Err(e) = client.batch_execute("CHECKPOINT").await {
            eprintln!("CHECKPOINT refused ({e}); measuring without it");
        }
        eprintln!(
            "vacuumed and analysed in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    } else {
        // Likewise the fill's WAL (hundreds of MiB at once, where a KME in service
        // gets a block at a time) goes into the database before measuring.
        let t0 = Instant::now();
        for f in ["a.sqlite", "b.sqlite"] {
            rusqlite::Connection::open(dir.join(f))?.query_row(
                "PRAGMA wal_checkpoint(TRUNCATE)",
                [],
                |_| Ok(()),
            )?;
        }
        eprintln!("checkpointed in {:.1} s", t0.elapsed().as_secs_f64());
    }

    let mut budget = args.max_requests;
    for &level in &args.levels {
        // Requests of the warm-up (TLS handshakes, first stock refills) run but
        // are not counted.
        let measured = Instant::now() + Duration::from_secs_f64(args.warmup);
        let deadline = measured + Duration::from_secs_f64(args.seconds);
        let per_worker = (budget / level).max(1);
        let mut tasks = tokio::task::JoinSet::new();
        let start = Instant::now();
        for i in 0..level {
            let m = ca.material(&Identity::Sae(SaeId::new(&format!("m{i}"))?), &[])?;
            let s = ca.material(&Identity::Sae(SaeId::new(&format!("s{i}"))?), &[])?;
            let conn = |cfg| {
                hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(cfg)
                    .https_only()
                    .enable_http1()
                    .build()
            };
            let cm: HttpsClient = Client::builder(TokioExecutor::new()).build(conn(client_config(
                &m,
                ka.clone(),
                KeyExchange::HybridOnly,
            )?));
            let cs: HttpsClient = Client::builder(TokioExecutor::new()).build(conn(client_config(
                &s,
                kb.clone(),
                KeyExchange::HybridOnly,
            )?));
            let enc = Arc::new(format!(
                "https://127.0.0.1:{}/api/v1/keys/s{i}/enc_keys",
                aa.port()
            ));
            let dec = Arc::new(format!(
                "https://127.0.0.1:{}/api/v1/keys/m{i}/dec_keys",
                ab.port()
            ));
            let body = Bytes::from(format!("{{\"number\":{}}}", args.number));
            let with_dec = args.with_dec;
            if let Some(rate) = args.rate {
                let period = Duration::from_secs_f64(level as f64 * f64::from(args.number) / rate);
                tasks.spawn(async move {
                    let mut inflight = tokio::task::JoinSet::new();
                    // Stagger the SAEs evenly over one period.
                    let mut due = start + period.mul_f64(i as f64 / level as f64);
                    let mut sent = 0;
                    while due < deadline && sent < per_worker {
                        tokio::time::sleep_until(due.into()).await;
                        let (cm, enc, body) = (cm.clone(), enc.clone(), body.clone());
                        inflight.spawn(async move {
                            // Latency from the send; how late the send was (timer
                            // granularity, a starved sender) is reported apart.
                            let sent = Instant::now();
                            let lag = (sent - due).as_secs_f64() * 1e3;
                            let n = enc_call(&cm, &enc, body).await.map(|ids| ids.len());
                            (due >= measured, sent.elapsed().as_secs_f64() * 1e3, lag, n)
                        });
                        due += period;
                        sent += 1;
                    }
                    let (mut lat, mut lags, mut errors, mut keys) =
                        (Vec::new(), Vec::new(), 0usize, 0u64);
                    while let Some(r) = inflight.join_next().await {
                        match r {
                            Ok((false, ..)) => {}
                            Ok((true, ms, lag, Some(n))) => {
                                lat.push(ms);
                                lags.push(lag);
                                keys += n as u64;
                            }
                            _ => errors += 1,
                        }
                    }
                    (lat, lags, errors, keys)
                });
                continue;
            }
            tasks.spawn(async move {
                let (mut lat, mut dec_lat, mut errors, mut keys) =
                    (Vec::new(), Vec::new(), 0usize, 0u64);
                for _ in 0..per_worker {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let t = Instant::now();
                    let Some(ids) = enc_call(&cm, &enc, body.clone()).await else {
                        errors += 1;
                        continue;
                    };
                    if t < measured {
                        continue;
                    }
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                    keys += ids.len() as u64;
                    if with_dec {
                        let t = Instant::now();
                        let body = serde_json::to_vec(&serde_json::json!({"key_IDs": ids}))
                            .unwrap_or_default();
                        let req = Request::builder()
                            .method(Method::POST)
                            .uri(dec.as_str())
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body)))
                            .expect("invariant: request is valid");
                        match cs.request(req).await {
                            Ok(r) if r.status().is_success() => {
                                let _ = r.into_body().collect().await;
                                dec_lat.push(t.elapsed().as_secs_f64() * 1e3);
                            }
                            _ => errors += 1,
                        }
                    }
                }
                (lat, dec_lat, errors, keys)
            });
        }
        let (mut lat, mut dec_lat, mut errors, mut keys) = (Vec::new(), Vec::new(), 0, 0u64);
        while let Some(r) = tasks.join_next().await {
            let (l, d, e, k) = r?;
            lat.extend(l);
            dec_lat.extend(d);
            errors += e;
            keys += k;
        }
        let secs = measured.elapsed().as_secs_f64();
        budget = budget.saturating_sub(lat.len()).max(level);
        lat.sort_by(f64::total_cmp);
        dec_lat.sort_by(f64::total_cmp);
        let mut out = serde_json::json!({
            "bench": if pg.is_some() { "kme_enc_keys_mtls_postgres" } else { "kme_enc_keys_mtls_sqlite" },
            "concurrent_saes": level,
            "keys_per_request": args.number,
            "key_bits": 256,
            "store": if pg.is_some() { "postgresql" } else { "sqlite" },
            "sqlite_synchronous": format!("{:?}", args.sync).to_lowercase(),
            "stock_keys": args.stock,
            "store_encrypted": !args.plaintext_store,
            "warmup_seconds": args.warmup,
            "mode": if args.rate.is_some() { "open_loop" } else { "closed_loop" },
            "offered_keys_per_s": args.rate,
            "requests": lat.len(),
            "errors": errors,
            "keys": keys,
            "seconds": secs,
            "keys_per_s": keys as f64 / secs,
            "requests_per_s": lat.len() as f64 / secs,
            "enc_p50_ms": percentile(&lat, 0.50),
            "enc_p99_ms": percentile(&lat, 0.99),
        });
        if args.rate.is_some() {
            // Open loop: the second list holds how late each send was.
            out["send_lag_p50_ms"] = percentile(&dec_lat, 0.50).into();
            out["send_lag_p99_ms"] = percentile(&dec_lat, 0.99).into();
        } else if args.with_dec {
            out["dec_p50_ms"] = percentile(&dec_lat, 0.50).into();
            out["dec_p99_ms"] = percentile(&dec_lat, 0.99).into();
        }
        println!("{out}");
    }
    a.server.shutdown().await;
    b.server.shutdown().await;
    drop((a.kme, b.kme));
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(url) = &args.store_url {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        for k in ["a", "b"] {
            client
                .batch_execute(&format!(
                    "DROP SCHEMA IF EXISTS \"bench_{}_{k}\" CASCADE",
                    std::process::id()
                ))
                .await?;
        }
    }
    Ok(())
}
