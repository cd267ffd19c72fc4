//! `qkdnet demo`: the main job. Brings up the embedded demo network
//! (topologies/demo.toml) as real processes on loopback, shows keys growing,
//! runs an application round trip through ETSI GS QKD 014 with SM4-GCM, prints
//! a report and stops every process it started.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use qkdnet_crypto::gcm::Sm4Gcm;
use qkdnet_crypto::secret::Sm4Key;
use qkdnet_kms::connect::ConnectFile;
use qkdnet_net::launcher;
use qkdnet_net::topology::Topology;

/// The embedded default topology.
pub const DEMO_TOPOLOGY: &str = include_str!("../../topologies/demo.toml");

/// Arguments of `qkdnet demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// State directory (default: qkdnet-demo under the system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Use this topology instead of the embedded demo network.
    #[arg(long)]
    topology: Option<PathBuf>,
    /// Longest wait for the first keys, in seconds.
    #[arg(long, default_value_t = 90.0)]
    timeout: f64,
}

/// One application round trip: `master` takes keys for `slave` at its KME,
/// `slave` fetches them by ID at its own, and a message sealed with SM4-GCM
/// under the first key is opened at the other end.
async fn round_trip(connect: &ConnectFile, master: &str, slave: &str) -> anyhow::Result<String> {
    let t = Duration::from_secs(10);
    let a = connect.client(master, t)?;
    let b = connect.client(slave, t)?;
    let t0 = Instant::now();
    let keys = a
        .enc_keys(slave, 2, Some(256))
        .await
        .with_context(|| format!("{master}: enc_keys for {slave}"))?;
    let ids: Vec<_> = keys.iter().map(|k| k.id).collect();
    let theirs = b
        .dec_keys(master, &ids)
        .await
        .with_context(|| format!("{slave}: dec_keys from {master}"))?;
    let latency = t0.elapsed();
    if keys.len() != theirs.len()
        || keys
            .iter()
            .zip(&theirs)
            .any(|(x, y)| x.id != y.id || x.material[..] != y.material[..])
    {
        bail!("{master} and {slave} got different keys for the same IDs");
    }
    let message = format!("quantum keys + national commercial cryptography: {master} -> {slave}");
    let mut nonce = [0u8; 12];
    getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("nonce: {e}"))?;
    let aad = ids[0].to_string();
    let k_a = Sm4Key::from_slice(&keys[0].material[..16])?;
    let mut sealed = message.as_bytes().to_vec();
    Sm4Gcm::new(&k_a).seal_in_place(&nonce, aad.as_bytes(), &mut sealed)?;
    let k_b = Sm4Key::from_slice(&theirs[0].material[..16])?;
    let mut opened = sealed.clone();
    Sm4Gcm::new(&k_b)
        .open_in_place(&nonce, aad.as_bytes(), &mut opened)
        .context("SM4-GCM open at the slave")?;
    if opened != message.as_bytes() {
        bail!("the opened message differs");
    }
    Ok(format!(
        "{master} -> {slave}: 2 keys of 256 bits (first ID {}), identical at both KMEs in {:.1} ms; {}-byte message sealed with SM4-GCM and opened: \"{message}\"",
        ids[0],
        latency.as_secs_f64() * 1e3,
        sealed.len()
    ))
}

/// Runs the demo.
pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let topo = match &a.topology {
        Some(p) => Topology::from_file(p)?,
        None => Topology::from_toml(DEMO_TOPOLOGY)?,
    }
    .validate()?;
    let dir = a
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("qkdnet-demo"));
    // A fresh demo each time: forget a previous demo's state unless it is running.
    if a.dir.is_none() && dir.join("net.json").exists() {
        if let Ok(r) = launcher::NetRecord::load(&dir) {
            if r.running().is_empty() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("clearing {}", dir.display()))?;
            }
        }
    }
    println!("qkdnet demo — simulated optics, real classical stack\n");
    super::net::describe(&topo);
    let (prepared, mut children) = super::net::launch(&topo, &dir, Default::default())?;
    let result = drive(&a, &topo, &prepared);
    let killed = launcher::stop_all(&prepared.record, &mut children, Duration::from_secs(5));
    match &result {
        Ok(()) => println!(
            "\nall {} node processes stopped{}; state kept in {} (keys, logs, PKI, connect.json)",
            prepared.record.nodes.len(),
            if killed.is_empty() {
                String::new()
            } else {
                format!(" (killed: {})", killed.join(", "))
            },
            prepared.dir.display()
        ),
        Err(_) => eprintln!("node logs: {}/nodes/*/node.log", prepared.dir.display()),
    }
    result
}

fn drive(
    a: &DemoArgs,
    topo: &qkdnet_net::topology::ValidTopology,
    prepared: &launcher::Prepared,
) -> anyhow::Result<()> {
    println!(
        "\n{} node processes up; state in {}",
        prepared.record.nodes.len(),
        prepared.dir.display()
    );
    let connect = ConnectFile::load(&prepared.dir.join("connect.json"))?;
    // The application pairs: for each link, an SAE on each end (neighbours).
    let sae_on = |node: &qkdnet_kms::ids::KmeId| {
        topo.saes
            .iter()
            .find(|(_, n)| *n == node)
            .map(|(s, _)| s.to_string())
    };
    let pairs: Vec<(String, String, String)> = topo
        .links
        .iter()
        .filter_map(|l| Some((l.id.clone(), sae_on(&l.b)?, sae_on(&l.a)?)))
        .collect();
    if pairs.is_empty() {
        bail!("the topology has no link with an SAE at both ends");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!("\nkeys growing (waiting until every link has key for its SAEs):");
    let progress = super::net::Progress::new(topo);
    let t0 = Instant::now();
    let mut ready = vec![false; pairs.len()];
    while ready.iter().any(|r| !r) {
        if t0.elapsed().as_secs_f64() > a.timeout {
            progress.finish();
            super::net::print_status(&launcher::status(&prepared.record));
            bail!(
                "not every link produced key within {} s (the machine may be busy; try --timeout)",
                a.timeout
            );
        }
        progress.update(&launcher::status(&prepared.record));
        for (i, (_, master, slave)) in pairs.iter().enumerate() {
            if !ready[i] {
                let c = connect.client(master, Duration::from_secs(5))?;
                ready[i] = rt
                    .block_on(c.status(slave))
                    .map(|s| s.stored_key_count >= 4)
                    .unwrap_or(false);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    progress.finish();
    println!(
        "every link has key after {:.1} s\n\napplication round trips (ETSI GS QKD 014 over mutual TLS, SM4-GCM):",
        t0.elapsed().as_secs_f64()
    );
    for (link, master, slave) in &pairs {
        let line = rt.block_on(round_trip(&connect, master, slave))?;
        println!("  [{link}] {line}");
    }
    if let Some((route, master, slave)) = farthest_pair(topo) {
        // Keys for SAEs that are not neighbours are relayed by the trusted
        // nodes in between, one-time-padded with each link's key.
        let c = connect.client(&master, Duration::from_secs(5))?;
        let t1 = Instant::now();
        while !rt
            .block_on(c.status(&slave))
            .is_ok_and(|s| s.stored_key_count >= 2)
        {
            if t1.elapsed() > Duration::from_secs(30) {
                bail!("no route with key from {master} to {slave} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let line = rt.block_on(round_trip(&connect, &master, &slave))?;
        println!("  [relay {}] {line}", route.join(" -> "));
    }
    println!("\nreport (per link, as Alice's node measured it; rates per second of link time):");
    let st = launcher::status(&prepared.record);
    super::net::print_status(&st);
    let delivered: u64 = st
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok())
        .map(|s| s.kme.keys_delivered)
        .sum();
    println!("keys delivered by the KMEs: {delivered}");
    Ok(())
}

/// The two SAEs the most hops apart (at least two), with the route between
/// their nodes, for a relayed round trip.
fn farthest_pair(
    topo: &qkdnet_net::topology::ValidTopology,
) -> Option<(Vec<String>, String, String)> {
    use qkdnet_kms::routing::{Graph, add_link, kme_route};
    let mut g = Graph::new();
    for l in &topo.links {
        add_link(&mut g, &l.a, &l.b);
    }
    let mut best: Option<(Vec<String>, String, String)> = None;
    for (sa, na) in &topo.saes {
        for (sb, nb) in &topo.saes {
            let Some(route) = kme_route(&g, na, nb, |_, _| Some(1)) else {
                continue;
            };
            if route.len() > 2 && best.as_ref().is_none_or(|b| route.len() > b.0.len()) {
                let route = route.iter().map(ToString::to_string).collect();
                best = Some((route, sa.to_string(), sb.to_string()));
            }
        }
    }
    best
}
