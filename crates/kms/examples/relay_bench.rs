//! Benchmark of trusted-node relay: end-to-end `enc_keys` latency between SAEs
//! 1, 8 and 32 hops apart on a chain of KMEs in one process (loopback, mutual
//! TLS, SQLite stores with `synchronous=FULL` unless `--sync normal`).
//!
//! One hop is the neighbour path (reserve, peer ack, confirm); more hops are
//! relayed: every trusted node takes its hop key, re-pads the key with the next
//! link's key and waits for the rest of the route to acknowledge. Each request
//! asks for one 256-bit key; every relayed key is checked at the far end with
//! `dec_keys` (not timed). Prints one JSON object per hop count.
//!
//! ```sh
//! cargo run --release -p qkdnet-kms --example relay_bench -- --hops 1,8,32 --requests 50
//! ```
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use qkdnet_kms::config::SyncMode;
use qkdnet_kms::mesh::{Mesh, MeshOptions, sae_name};

struct Args {
    hops: Vec<usize>,
    requests: usize,
    sync: SyncMode,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        hops: vec![1, 8, 32],
        requests: 50,
        sync: SyncMode::Full,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--hops" => {
                a.hops = val()?
                    .split(',')
                    .map(|s| s.trim().parse().map_err(|_| "bad --hops".to_string()))
                    .collect::<Result<_, _>>()?
            }
            "--requests" => a.requests = val()?.parse().map_err(|_| "bad --requests")?,
            "--sync" => {
                a.sync = match val()?.as_str() {
                    "full" => SyncMode::Full,
                    "normal" => SyncMode::Normal,
                    _ => return Err("--sync full|normal".into()),
                }
            }
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if a.hops.iter().any(|&h| h == 0 || h > 200) || a.requests == 0 {
        return Err("--hops between 1 and 200, --requests at least 1".into());
    }
    Ok(a)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("relay_bench: {e}");
            std::process::exit(2);
        }
    };
    let n = args.hops.iter().max().copied().unwrap_or(1) + 1;
    let edges: Vec<(usize, usize)> = (0..n - 1).map(|i| (i, i + 1)).collect();
    // Enough units on every link for all levels (each KME owns half of a block).
    let per_link = (args.requests + 5) * args.hops.len();
    let block_bytes = 32 * (2 * per_link + 64);
    let opts = MeshOptions {
        sync: args.sync,
        block_bytes,
        // The production default (the test harness polls ten times faster).
        link_state_interval_ms: 1000,
        ..MeshOptions::default()
    };
    let mesh = match Mesh::start(n, &edges, |_, _| 1, &opts).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("relay_bench: could not start the KMEs: {e}");
            std::process::exit(1);
        }
    };
    let timeout = Duration::from_secs(30);
    let master = mesh.client(&sae_name(0), 0, timeout).expect("client");
    for &h in &args.hops {
        let slave = mesh.client(&sae_name(h), h, timeout).expect("client");
        let mut lat = Vec::with_capacity(args.requests);
        for i in 0..args.requests + 5 {
            let t0 = Instant::now();
            let keys = match master.enc_keys(&sae_name(h), 1, Some(256)).await {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("relay_bench: enc_keys over {h} hops failed: {e}");
                    std::process::exit(1);
                }
            };
            let dt = t0.elapsed().as_secs_f64() * 1e3;
            if i >= 5 {
                lat.push(dt); // the first five warm up connections
            }
            let ids: Vec<_> = keys.iter().map(|k| k.id).collect();
            let got = slave
                .dec_keys(&sae_name(0), &ids)
                .await
                .expect("dec_keys at the far end");
            assert!(
                keys.iter()
                    .zip(&got)
                    .all(|(a, b)| a.material[..] == b.material[..]),
                "the far end got another key"
            );
        }
        lat.sort_by(f64::total_cmp);
        let mean = lat.iter().sum::<f64>() / lat.len() as f64;
        println!(
            "{}",
            serde_json::json!({
                "bench": "relay_enc_keys_latency",
                "hops": h,
                "requests": lat.len(),
                "key_bits": 256,
                "sync": match args.sync { SyncMode::Full => "full", _ => "normal" },
                "p50_ms": percentile(&lat, 0.5),
                "p99_ms": percentile(&lat, 0.99),
                "mean_ms": mean,
            })
        );
    }
}
