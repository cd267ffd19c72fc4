//! A whole network as real processes: `qkdnet net up` brings up three nodes on
//! loopback, an ETSI 014 client moves keys between SAEs on neighbouring
//! nodes, a node is SIGKILLed and restarted and rejoins without any key being
//! delivered twice, and bad topologies are refused with messages that name
//! the problem.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use qkdnet_kms::client::{ClientError, EtsiClient};
use qkdnet_kms::connect::ConnectFile;
use qkdnet_net::launcher::{NetRecord, alive, http_get};
use qkdnet_net::node::NodeStatus;

const BIN: &str = env!("CARGO_BIN_EXE_qkdnet");

fn qkdnet(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run qkdnet")
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qkdnet-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

const CHAIN: &str = r#"
[network]
name = "e2e"

[[node]]
id = "alpha"
[[node]]
id = "beta"
[[node]]
id = "gamma"

[[sae]]
id = "sae-alpha"
node = "alpha"
[[sae]]
id = "sae-beta"
node = "beta"
[[sae]]
id = "sae-gamma"
node = "gamma"

[[link]]
a = "alpha"
b = "beta"
preset = "metro-1ghz"
distance_km = 10.0

[[link]]
a = "beta"
b = "gamma"
preset = "metro-1ghz"
distance_km = 15.0
"#;

/// Stops the network when the test ends, however it ends.
struct Net {
    dir: PathBuf,
    extra: Vec<Child>,
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = qkdnet(&["net", "down", "--dir", self.dir.to_str().expect("utf-8")]);
        for c in &mut self.extra {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn client(connect: &ConnectFile, sae: &str) -> EtsiClient {
    connect
        .client(sae, Duration::from_secs(10))
        .expect("client from connect.json")
}

fn wait_for_keys(rt: &tokio::runtime::Runtime, c: &EtsiClient, slave: &str, n: u64) {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = rt.block_on(c.status(slave)) {
            if s.stored_key_count >= n {
                return;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "no {n} keys for {slave} within 240 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn node_status(rec: &NetRecord, id: &str) -> NodeStatus {
    let n = rec.nodes.iter().find(|n| n.id == id).expect("node");
    let body = http_get(n.mgmt, "/status").expect("status");
    serde_json::from_str(&body).expect("status JSON")
}

#[test]
fn three_nodes_deliver_keys_and_a_killed_node_rejoins_without_double_delivery() {
    let dir = temp("chain");
    let topo = dir.join("chain.toml");
    std::fs::write(&topo, CHAIN).expect("write topology");
    let state = dir.join("state");
    let s = state.to_str().expect("utf-8");
    let out = qkdnet(&[
        "net",
        "up",
        topo.to_str().expect("utf-8"),
        "--dir",
        s,
        "--detach",
    ]);
    assert!(
        out.status.success(),
        "net up: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut net = Net {
        dir: state.clone(),
        extra: Vec::new(),
    };
    let rec = NetRecord::load(&state).expect("net.json");
    assert_eq!(rec.running().len(), 3);
    let connect = ConnectFile::load(&state.join("connect.json")).expect("connect.json");
    assert_eq!(connect.saes.len(), 3);
    let rt = rt();
    let (a, b) = (client(&connect, "sae-alpha"), client(&connect, "sae-beta"));

    // The key path: enc_keys at alpha's KME, the same keys by ID at beta's.
    wait_for_keys(&rt, &a, "sae-beta", 4);
    // Each link reports the time scale asked for and the one achieved.
    for l in node_status(&rec, "alpha").links {
        assert_eq!(l.time_scale, 1.0, "{}", l.id);
        assert!(
            l.time_scale_effective > 0.0 && l.time_scale_effective.is_finite(),
            "{}: {}",
            l.id,
            l.time_scale_effective
        );
    }
    let keys = rt
        .block_on(a.enc_keys("sae-beta", 2, Some(256)))
        .expect("enc_keys");
    let ids: Vec<_> = keys.iter().map(|k| k.id).collect();
    let theirs = rt
        .block_on(b.dec_keys("sae-alpha", &ids))
        .expect("dec_keys");
    for (x, y) in keys.iter().zip(&theirs) {
        assert_eq!(x.id, y.id);
        assert_eq!(&x.material[..], &y.material[..], "same key at both ends");
        assert_eq!(x.material.len(), 32);
    }
    // Delivered once, never again.
    match rt.block_on(b.dec_keys("sae-alpha", &ids)) {
        Err(ClientError::Api { status, .. }) => assert!((400..500).contains(&status)),
        other => panic!("second dec_keys: {other:?}"),
    }
    // Relay: alpha and gamma are two hops apart; beta is the trusted node.
    let g = client(&connect, "sae-gamma");
    wait_for_keys(&rt, &a, "sae-gamma", 2);
    let relayed = rt
        .block_on(a.enc_keys("sae-gamma", 2, Some(256)))
        .expect("relayed enc_keys");
    let relayed_ids: Vec<_> = relayed.iter().map(|k| k.id).collect();
    let at_gamma = rt
        .block_on(g.dec_keys("sae-alpha", &relayed_ids))
        .expect("relayed dec_keys at gamma");
    for (x, y) in relayed.iter().zip(&at_gamma) {
        assert_eq!(x.id, y.id);
        assert_eq!(
            &x.material[..],
            &y.material[..],
            "same relayed key at both ends"
        );
    }
    let beta_kme = node_status(&rec, "beta").kme;
    assert_eq!(beta_kme.relay_forwarded, 1);
    assert_eq!(beta_kme.relay_units_sent, 2, "one pad unit per relayed key");
    assert_eq!(node_status(&rec, "gamma").kme.relay_delivered, 1);
    // Metrics are served in the Prometheus format.
    let m = http_get(rec.nodes[0].mgmt, "/metrics").expect("metrics");
    assert!(m.contains("qkdnet_link_qber{"), "{m}");
    assert!(m.contains("qkdnet_kme_keys_delivered_total{"));

    // SIGKILL beta in the middle of everything, then restart it.
    let beta = rec.nodes.iter().find(|n| n.id == "beta").expect("beta");
    let before = node_status(&rec, "alpha").links[0].sessions;
    let killed = Command::new("kill")
        .args(["-KILL", &beta.pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let t0 = Instant::now();
    while alive(beta.pid) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(beta.pid), "beta is gone");
    // With the only trusted node between them down, a relay fails cleanly.
    match rt.block_on(a.enc_keys("sae-gamma", 1, Some(256))) {
        Err(ClientError::Api { status, .. }) => assert_eq!(status, 503),
        other => panic!("relay through a dead node: {other:?}"),
    }
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(&beta.log)
        .expect("log");
    let child = Command::new(BIN)
        .args(["node", "run", "--config"])
        .arg(&beta.config)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("restart beta");
    net.extra.push(child);
    let t0 = Instant::now();
    while http_get(beta.mgmt, "/health").is_err() {
        assert!(t0.elapsed() < Duration::from_secs(30), "beta back up");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The keys delivered before the crash stay delivered. (The client's pooled
    // connection died with the old process: the first call may report the KME
    // unavailable, as an application would see it; it retries.)
    let mut again = rt.block_on(b.dec_keys("sae-alpha", &ids));
    if matches!(again, Err(ClientError::Unavailable(_))) {
        again = rt.block_on(b.dec_keys("sae-alpha", &ids));
    }
    match again {
        Err(ClientError::Api { status, .. }) => assert!((400..500).contains(&status)),
        other => panic!("dec_keys after restart: {other:?}"),
    }
    // The link re-establishes and new keys flow; none has an old ID.
    let t0 = Instant::now();
    loop {
        let l = &node_status(&rec, "alpha").links[0];
        if l.sessions > before && l.up {
            // Current state, not history: the errors of the outage are gone (#27 item 7).
            assert!(
                l.last_error.is_empty(),
                "up with last_error {:?}",
                l.last_error
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "link alpha-beta back up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_for_keys(&rt, &a, "sae-beta", 2);
    let fresh = rt
        .block_on(a.enc_keys("sae-beta", 2, Some(256)))
        .expect("enc_keys after restart");
    let fresh_ids: Vec<_> = fresh.iter().map(|k| k.id).collect();
    assert!(fresh_ids.iter().all(|i| !ids.contains(i)));
    let got = rt
        .block_on(b.dec_keys("sae-alpha", &fresh_ids))
        .expect("dec_keys after restart");
    for (x, y) in fresh.iter().zip(&got) {
        assert_eq!(&x.material[..], &y.material[..]);
    }

    // net status answers; net down stops every process cleanly (SIGTERM, no SIGKILL needed).
    let st = qkdnet(&["net", "status", "--dir", s]);
    assert!(st.status.success());
    assert!(String::from_utf8_lossy(&st.stdout).contains("alpha-beta"));
    // The restarted beta is not in net.json's pid list: stop it like net down would.
    for c in &mut net.extra {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(status)) = c.try_wait() {
                assert!(status.success(), "beta exits cleanly on SIGTERM: {status}");
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            c.try_wait().ok().flatten().is_some(),
            "beta stopped within 5 s"
        );
    }
    let down = qkdnet(&["net", "down", "--dir", s]);
    let text = String::from_utf8_lossy(&down.stdout);
    assert!(down.status.success());
    assert!(!text.contains("had to kill"), "{text}");
    let record = NetRecord::load(&state).expect("net.json");
    assert!(record.running().is_empty());
    assert!(record.nodes.iter().all(|n| n.pid == 0), "dead PIDs dropped");
    // #27 item 6: status of a stopped network says so and fails.
    let st = qkdnet(&["net", "status", "--dir", s]);
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(
        !st.status.success(),
        "net status on a stopped network exited 0"
    );
    assert!(err.contains("not running"), "{err}");
}

#[test]
fn a_foreground_net_up_without_a_terminal_prints_progress_lines() {
    let dir = temp("plain");
    let topo = dir.join("chain.toml");
    std::fs::write(&topo, CHAIN).expect("write topology");
    let state = dir.join("state");
    let _net = Net {
        dir: state.clone(),
        extra: Vec::new(),
    };
    // stdout is a pipe here, as in CI or `net up … | tee log`.
    let out = qkdnet(&[
        "net",
        "up",
        topo.to_str().expect("utf-8"),
        "--dir",
        state.to_str().expect("utf-8"),
        "--for",
        "12",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A line per link at the start and again 10 s later, each with its time scale.
    for link in ["alpha-beta", "beta-gamma"] {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with('[') && l.contains(link))
            .collect();
        assert!(lines.len() >= 2, "{link}: {lines:?}\n{text}");
        assert!(lines.iter().any(|l| l.contains("time ×")), "{lines:?}");
    }
    assert!(
        text.contains("time ×"),
        "the final table shows the time scale"
    );
    assert!(text.contains("network stopped"), "{text}");
}

fn refused(dir: &Path, name: &str, topology: &str, extra: &[&str], expect: &str) {
    let f = dir.join(format!("{name}.toml"));
    std::fs::write(&f, topology).expect("write");
    let state = dir.join(format!("{name}-state"));
    let mut args = vec![
        "net",
        "up",
        f.to_str().expect("utf-8"),
        "--dir",
        state.to_str().expect("utf-8"),
        "--detach",
    ];
    args.extend_from_slice(extra);
    let out = qkdnet(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{name}: accepted");
    assert!(err.contains(expect), "{name}: {err}");
    assert!(
        !state.join("net.json").exists()
            || NetRecord::load(&state)
                .map(|r| r.running().is_empty())
                .unwrap_or(true),
        "{name}: nothing started"
    );
}

#[test]
fn bad_topologies_are_refused_with_messages_that_name_the_problem() {
    let dir = temp("bad");
    let two = |link: &str| {
        format!(
            "[network]\nname = \"t\"\n[[node]]\nid = \"a\"\n[[node]]\nid = \"b\"\n[[link]]\n{link}\n"
        )
    };
    refused(
        &dir,
        "unknown-node",
        &two("a = \"a\"\nb = \"nowhere\"\npreset = \"metro-1ghz\"\ndistance_km = 5"),
        &[],
        "unknown node 'nowhere'",
    );
    refused(
        &dir,
        "negative",
        &two("a = \"a\"\nb = \"b\"\npreset = \"metro-1ghz\"\ndistance_km = -5"),
        &[],
        "distance_km must be a length >= 0, got -5",
    );
    refused(
        &dir,
        "too-long",
        &two("a = \"a\"\nb = \"b\"\npreset = \"metro-1ghz\"\ndistance_km = 400"),
        &[],
        "cannot close 400 km",
    );
    refused(
        &dir,
        "no-preset",
        &two("a = \"a\"\nb = \"b\"\npreset = \"warp-drive\"\ndistance_km = 5"),
        &[],
        "warp-drive",
    );
    refused(
        &dir,
        "duplicate",
        "[network]\nname = \"t\"\n[[node]]\nid = \"a\"\n[[node]]\nid = \"a\"\n",
        &[],
        "duplicate node ID 'a'",
    );
    // A port that is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    refused(
        &dir,
        "port",
        &two("a = \"a\"\nb = \"b\"\npreset = \"metro-1ghz\"\ndistance_km = 5"),
        &["--base-port", &port],
        &format!("port {port} (KME of node a) is not available"),
    );
}
