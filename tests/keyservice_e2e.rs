//! Quantum security media end to end on a running network (`qkdnet net up`,
//! real node processes, simulated optics): the key service runs as its own
//! process at node alpha; two media are charged at charging points on the two
//! other nodes (one of them two trusted nodes away, so the charged keys are
//! relayed); terminals open and join a session and get the same key from the
//! QKD network; then the failure cases a user meets: a wrong PIN, an owner who
//! is not enrolled, the key service SIGKILLed between the two sides of a
//! session, a terminal SIGKILLed after taking its keys, a tampered medium, an
//! exhausted medium, a revoked one.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_qkdnet");
const PIN: &str = "482916";

const TOPOLOGY: &str = r#"
[network]
name = "media-e2e"

[[node]]
id = "alpha"
[[node]]
id = "beta"
[[node]]
id = "gamma"

[[sae]]
id = "keyservice"
node = "alpha"
[[sae]]
id = "charger-beta"
node = "beta"
[[sae]]
id = "charger-gamma"
node = "gamma"
[[sae]]
id = "ks-peer"
node = "beta"

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

fn qkdnet(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("QKDNET_MEDIA_PIN", PIN)
        .output()
        .expect("run qkdnet")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = qkdnet(dir, args);
    assert!(
        out.status.success(),
        "qkdnet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let out = qkdnet(dir, args);
    assert!(!out.status.success(), "qkdnet {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Stops the network and the key service however the test ends.
struct Net {
    dir: PathBuf,
    service: Option<Child>,
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(c) = &mut self.service {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = qkdnet(&self.dir, &["net", "down", "--dir", "state"]);
    }
}

const STORE: [&str; 4] = ["--store", "ks.db", "--master-key", "ks.key"];

impl Net {
    /// Starts `keyservice serve` on `addr` (port 0: any) and returns the address
    /// it listens on.
    fn start_service(&mut self, addr: &str) -> String {
        let mut child = Command::new(BIN)
            .current_dir(&self.dir)
            .args(["keyservice", "serve"])
            .args(STORE)
            .args(["--listen", addr, "--connect", "state/connect.json"])
            .args(["--as", "keyservice", "--qkd-peer", "ks-peer"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the key service");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = lines
            .next()
            .expect("a line from the key service")
            .expect("utf-8");
        // Keep draining stdout so the service never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        let addr = line
            .strip_prefix("key service listening on ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        self.service = Some(child);
        addr
    }

    fn kill_service(&mut self) {
        if let Some(mut c) = self.service.take() {
            // SIGKILL: no shutdown path runs.
            c.kill().expect("kill");
            c.wait().expect("wait");
        }
    }
}

/// The arguments of `qkdnet media session --medium MEDIUM --service SERVICE …`.
fn session_args<'a>(medium: &'a str, service: &'a str, tail: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["media", "session", "--medium", medium, "--service", service];
    v.extend_from_slice(tail);
    v
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("{e}: {s}"))
}

fn remaining(dir: &Path, medium: &str) -> u64 {
    json(&ok(dir, &["media", "status", "--medium", medium, "--json"]))["remaining"]
        .as_u64()
        .expect("remaining")
}

fn service_media(dir: &Path) -> serde_json::Value {
    let mut args = vec!["keyservice", "media", "--json"];
    args.extend(STORE);
    json(&ok(dir, &args))
}

#[test]
fn media_charged_at_two_nodes_share_a_session_key_from_the_qkd_network() {
    let dir = std::env::temp_dir().join(format!("qkdnet-media-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("topology.toml"), TOPOLOGY).expect("topology");
    let d = dir.as_path();
    ok(
        d,
        &["net", "up", "topology.toml", "--dir", "state", "--detach"],
    );
    let mut net = Net {
        dir: dir.clone(),
        service: None,
    };

    // The operator: a store, two subscribers.
    let mut init = vec!["keyservice", "init"];
    init.extend(STORE);
    ok(d, &init);
    for who in [
        "sip:alice@qkd.example",
        "sip:bob@qkd.example",
        "sip:tess@qkd.example",
    ] {
        let mut a = vec!["keyservice", "enrol", who];
        a.extend(STORE);
        ok(d, &a);
    }
    let addr = net.start_service("127.0.0.1:0");

    // Three media; carol is not a subscriber.
    for (file, owner) in [
        ("alice.medium", "sip:alice@qkd.example"),
        ("bob.medium", "sip:bob@qkd.example"),
        ("carol.medium", "sip:carol@qkd.example"),
    ] {
        ok(
            d,
            &[
                "media",
                "init",
                "--medium",
                file,
                "--owner",
                owner,
                "--capacity",
                "64",
            ],
        );
    }
    let charge = |medium: &str, charger: &str, keys: &str| {
        qkdnet(
            d,
            &[
                "media",
                "charge",
                "--connect",
                "state/connect.json",
                "--as",
                charger,
                "--medium",
                medium,
                "--keys",
                keys,
                "--service",
                &addr,
                "--service-sae",
                "keyservice",
                "--batch",
                "4",
                "--wait",
                "240",
                "--json",
            ],
        )
    };
    // Alice at beta (one hop from the service's node), Bob at gamma (two hops:
    // the keys are relayed through beta).
    let out = charge("alice.medium", "charger-beta", "20");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rep = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(rep["charged"], 20);
    assert!(rep["keys_per_second"].as_f64().expect("rate") > 0.0);
    let out = charge("bob.medium", "charger-gamma", "6");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(remaining(d, "alice.medium"), 20);
    assert_eq!(remaining(d, "bob.medium"), 6);
    let media = service_media(d);
    assert_eq!(media.as_array().expect("list").len(), 2);
    assert!(
        media
            .as_array()
            .expect("list")
            .iter()
            .all(|m| m["charged"] == m["remaining"])
    );

    // Carol's owner is not enrolled: refused, nothing charged into her medium.
    let out = charge("carol.medium", "charger-beta", "2");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an enrolled subscriber"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(remaining(d, "carol.medium"), 0);

    // A wrong PIN: a clear error, no key used.
    let out = Command::new(BIN)
        .current_dir(d)
        .env("QKDNET_MEDIA_PIN", "000000")
        .args(session_args(
            "alice.medium",
            &addr,
            &["--peer", "sip:bob@qkd.example"],
        ))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("pin"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(remaining(d, "alice.medium"), 20);

    // Session keys come from the QKD network once the service's pool has key.
    let t0 = Instant::now();
    let (open, sid) = loop {
        let open = json(&ok(
            d,
            &session_args(
                "alice.medium",
                &addr,
                &["--peer", "sip:bob@qkd.example", "--json"],
            ),
        ));
        if open["source"] == "qkd" {
            let sid = open["session"].as_str().expect("session").to_owned();
            break (open, sid);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no session key from the QKD network within 120 s"
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    assert_eq!(open["peer"], "sip:bob@qkd.example");

    // The service is SIGKILLed between the two sides; the session survives it.
    net.kill_service();
    let addr = net.start_service(&addr);
    let join = json(&ok(
        d,
        &session_args("bob.medium", &addr, &["--join", &sid, "--json"]),
    ));
    assert_eq!(join["peer"], "sip:alice@qkd.example");
    assert_eq!(join["source"], "qkd");
    assert_eq!(
        join["fingerprint"], open["fingerprint"],
        "both sides hold one key"
    );
    assert_eq!(remaining(d, "bob.medium"), 4);
    // A retry of the join (say its answer was lost) gets the same key again,
    // under two fresh keys.
    let again = json(&ok(
        d,
        &session_args("bob.medium", &addr, &["--join", &sid, "--json"]),
    ));
    assert_eq!(again["fingerprint"], open["fingerprint"]);

    // A terminal SIGKILLed during session setup: it has taken its two keys
    // (durably gone from the medium) and sent its request, which this
    // "service" reads and never answers. The real service then accepts the
    // terminal's next request, two keys further on.
    let stall = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let stall_addr = stall.local_addr().expect("addr").to_string();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let hold = std::thread::spawn(move || {
        let (mut s, _) = stall.accept().expect("accept");
        let ch = qkdnet_media::proto::Message::Challenge(qkdnet_media::proto::Challenge {
            challenge: [5; 32],
        });
        std::io::Write::write_all(&mut s, &ch.encode()).expect("challenge");
        let mut head = [0u8; 8];
        std::io::Read::read_exact(&mut s, &mut head).expect("the request's first bytes");
        sent_tx.send(()).expect("signal");
        // Hold the connection until the terminal is gone.
        let _ = std::io::Read::read_to_end(&mut s, &mut Vec::new());
    });
    let before = remaining(d, "alice.medium");
    let mut term = Command::new(BIN)
        .current_dir(d)
        .env("QKDNET_MEDIA_PIN", PIN)
        .args(session_args(
            "alice.medium",
            &stall_addr,
            &["--peer", "sip:bob@qkd.example"],
        ))
        .spawn()
        .expect("terminal");
    sent_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the terminal sent its request");
    term.kill().expect("SIGKILL the terminal");
    term.wait().expect("reap");
    hold.join().expect("stall thread");
    assert_eq!(
        remaining(d, "alice.medium"),
        before - 2,
        "two keys gone, none handed out twice"
    );
    let after = json(&ok(
        d,
        &session_args(
            "alice.medium",
            &addr,
            &["--peer", "sip:bob@qkd.example", "--json"],
        ),
    ));
    assert_eq!(after["peer"], "sip:bob@qkd.example");

    // A medium in a PKCS#11 token (SoftHSM2, from scripts/softhsm.sh) works the
    // same: charged at a charging point, it opens a session Alice joins.
    token_medium_opens_a_session(d, &addr);

    // Bob has two keys left: one more request, then "recharge".
    ok(d, &session_args("bob.medium", &addr, &["--join", &sid]));
    let err = fails(d, &session_args("bob.medium", &addr, &["--join", &sid]));
    assert!(err.contains("recharge at a charging point"), "{err}");

    // A tampered medium file: a clear error, and the service's record of it
    // does not move (no key used).
    let before = service_media(d);
    let path = dir.join("alice.medium");
    let mut bytes = std::fs::read(&path).expect("read medium");
    let good = bytes.clone();
    bytes[100] ^= 0x40;
    std::fs::write(&path, &bytes).expect("tamper");
    let err = fails(
        d,
        &session_args("alice.medium", &addr, &["--peer", "sip:bob@qkd.example"]),
    );
    assert!(err.contains("alice.medium"), "{err}");
    assert_eq!(service_media(d), before);
    std::fs::write(&path, &good).expect("restore");

    // Alice's medium is reported lost: revoked at the service, refused at once.
    let alice_id = before
        .as_array()
        .expect("list")
        .iter()
        .find(|m| m["identity"] == "sip:alice@qkd.example")
        .and_then(|m| m["id"].as_str())
        .expect("alice's medium")
        .to_owned();
    let mut revoke = vec!["media", "revoke", "--medium", &alice_id, "--reason", "lost"];
    revoke.extend(STORE);
    let out = ok(d, &revoke);
    assert!(out.contains("revoked"), "{out}");
    let err = fails(
        d,
        &session_args("alice.medium", &addr, &["--peer", "sip:bob@qkd.example"]),
    );
    assert!(err.contains("revoked"), "{err}");

    // The audit trail has every step and never a key.
    let mut audit = vec!["keyservice", "audit", "--limit", "100"];
    audit.extend(STORE);
    let trail = ok(d, &audit);
    for event in ["enrol", "bind", "charge", "open", "join", "revoke"] {
        assert!(
            trail.contains(&format!("  {event} ")),
            "no {event} in\n{trail}"
        );
    }
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The SoftHSM2 token of scripts/softhsm.sh, or `None` (skip) outside CI.
fn softhsm() -> Option<(String, String, String)> {
    let get = |k: &str| std::env::var(k).ok();
    match (
        get("QKDNET_TEST_PKCS11_MODULE"),
        get("QKDNET_TEST_PKCS11_TOKEN_MEDIA"),
        get("QKDNET_TEST_PKCS11_PIN"),
    ) {
        (Some(m), Some(t), Some(p)) => Some((m, t, p)),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "SoftHSM2 environment missing in CI: scripts/test.sh runs scripts/softhsm.sh"
            );
            eprintln!("token medium skipped: run with the environment of scripts/softhsm.sh");
            None
        }
    }
}

fn token_medium_opens_a_session(d: &Path, addr: &str) {
    let Some((module, token, pin)) = softhsm() else {
        return;
    };
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .current_dir(d)
            .env("QKDNET_TEST_PKCS11_PIN", &pin)
            .args(args)
            .args([
                "--token",
                &token,
                "--module",
                &module,
                "--pin-env",
                "QKDNET_TEST_PKCS11_PIN",
            ])
            .output()
            .expect("run qkdnet");
        assert!(
            out.status.success(),
            "qkdnet {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let made = run(&[
        "media",
        "init",
        "--owner",
        "sip:tess@qkd.example",
        "--capacity",
        "16",
    ]);
    let id = made
        .split_whitespace()
        .nth(1)
        .expect("medium ID in the init line")
        .to_owned();
    let charged = run(&[
        "media",
        "charge",
        "--connect",
        "state/connect.json",
        "--as",
        "charger-beta",
        "--keys",
        "4",
        "--service",
        addr,
        "--service-sae",
        "keyservice",
        "--wait",
        "240",
        "--json",
        "--medium-id",
        &id,
    ]);
    assert_eq!(json(&charged)["charged"], 4);
    let open = json(&run(&[
        "media",
        "session",
        "--service",
        addr,
        "--peer",
        "sip:alice@qkd.example",
        "--json",
        "--medium-id",
        &id,
    ]));
    let sid = open["session"].as_str().expect("session").to_owned();
    let join = json(&ok(
        d,
        &session_args("alice.medium", &addr, &["--join", &sid, "--json"]),
    ));
    assert_eq!(join["fingerprint"], open["fingerprint"]);
    assert_eq!(join["peer"], "sip:tess@qkd.example");
}
