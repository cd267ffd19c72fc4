//! Interoperability with PyPI ETSI GS QKD 014 clients, against two
//! `qkdnet kme serve` processes with certificates from `qkdnet pki`:
//! - `etsi-qkd-014-client` gets keys at KME A (enc_keys, GET and POST forms) and
//!   the same keys by ID at KME B (dec_keys);
//! - `qkdsec doctor` probes KME A as the master SAE, the slave being on KME B;
//! - `schemathesis` (`st run`) drives KME A from its served OpenAPI document and
//!   finds no request the document and the server disagree on.
//!
//! Skips (printing `SKIPPED:`) only when pip cannot reach PyPI. The KMEs allow
//! classical key exchange for these clients (OpenSSL 3.0 has no X25519MLKEM768);
//! `classical_only_clients_are_refused_by_default` checks the default refuses them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_qkdnet");

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn qkdnet(args: &[&str]) {
    let out = Command::new(BIN).args(args).output().expect("run qkdnet");
    assert!(
        out.status.success(),
        "qkdnet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn config(dir: &Path, me: &str, port: u16, peer: (&str, u16), blocks: (u32, u32)) -> PathBuf {
    let (blocks, block_bytes) = blocks;
    let (peer, peer_port) = peer;
    let text = format!(
        r#"kme_id = "{me}"
listen = "127.0.0.1:{port}"
store = "{me}.sqlite"
[tls]
ca = "pki/ca.pem"
cert = "pki/kme-{me}.pem"
key = "pki/kme-{me}.key"
# The PyPI clients run on Python's ssl, i.e. OpenSSL 3.0 here: no ML-KEM yet.
key_exchange = "allow-classical"
[[peer]]
kme_id = "{peer}"
url = "https://127.0.0.1:{peer_port}"
[[sae]]
id = "alice"
kme = "kme-a"
[[sae]]
id = "bob"
kme = "kme-b"
# TEST MATERIAL ONLY
[test_keys]
seeded = 2024
peer = "{peer}"
link = "a-b"
blocks = {blocks}
block_bytes = {block_bytes}
"#
    );
    let p = dir.join(format!("{me}.toml"));
    std::fs::write(&p, text).expect("write config");
    p
}

/// Starts `qkdnet kme serve` and waits for its ready line.
fn serve(cfg: &Path) -> Kill {
    let mut child = Command::new(BIN)
        .args(["kme", "serve", "--config"])
        .arg(cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn KME");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let kill = Kill(child);
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("KME ready line");
    let v: serde_json::Value = serde_json::from_str(&line).expect("ready line is JSON");
    assert!(v["listen"].is_string(), "{line}");
    kill
}

const SCRIPT: &str = r#"
import json, sys
from etsi_qkd_014_client.client import QKD014Client
pki, host_a, host_b = sys.argv[1], sys.argv[2], sys.argv[3]
alice = QKD014Client(host_a, f"{pki}/sae-alice.pem", f"{pki}/sae-alice.key", f"{pki}/ca.pem")
bob = QKD014Client(host_b, f"{pki}/sae-bob.pem", f"{pki}/sae-bob.key", f"{pki}/ca.pem")
out = {}
code, st = alice.get_status("bob")
out["status"] = [code, st.source_kme_id if code == 200 else None, st.stored_key_count if code == 200 else None]
code, c1 = alice.get_key("bob")
code2, c2 = alice.get_key("bob", number=3, size=512)
out["enc"] = [code, code2]
keys = [(k.key_id, k.key) for k in c1.keys + c2.keys]
code, d = bob.get_key_with_key_IDs("alice", [k for k, _ in keys])
out["dec"] = code
out["same"] = code == 200 and [(k.key_id, k.key) for k in d.keys] == keys
out["n"] = len(keys)
code, e = alice.get_key_with_key_IDs("alice", [keys[0][0]])
out["master_at_own_kme"] = code
code, e = bob.get_key_with_key_IDs("alice", [keys[0][0]])
out["again"] = [code, getattr(e, "message", None)]
print(json.dumps(out))
"#;

/// Creates `.venv/` with the PyPI clients (scripts/python-env.sh), once per
/// test process so that concurrent tests never run pip side by side.
/// `Err(reason)` when pip cannot reach PyPI: the caller skips.
fn python_env() -> Result<(), String> {
    static ENV: OnceLock<Result<(), String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let env = Command::new("bash")
            .arg(root().join("scripts/python-env.sh"))
            .output()
            .expect("run python-env.sh");
        if env.status.code() == Some(3) {
            return Err(String::from_utf8_lossy(&env.stderr).trim().to_owned());
        }
        assert!(
            env.status.success(),
            "python-env.sh: {}",
            String::from_utf8_lossy(&env.stderr)
        );
        Ok(())
    })
    .clone()
}

/// KME A (SAE alice) and KME B (SAE bob) sharing seeded test keys, each with a
/// fresh store, in a temporary directory of their own.
struct Network {
    dir: PathBuf,
    pki: String,
    port_a: u16,
    port_b: u16,
    kmes: Vec<Kill>,
}

impl Network {
    /// Issues the certificates and starts both KMEs; `name` keeps the
    /// directories of concurrent tests apart.
    fn start(name: &str) -> Self {
        Self::start_with(name, (4, 4096))
    }

    /// [`Network::start`] with (count, bytes) test blocks per KME.
    fn start_with(name: &str, blocks: (u32, u32)) -> Self {
        let dir = std::env::temp_dir().join(format!("qkdnet-kme-py-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let pki = dir.join("pki").to_str().expect("utf-8 path").to_owned();
        qkdnet(&["pki", "init", &pki]);
        for (flag, id) in [
            ("--kme", "kme-a"),
            ("--kme", "kme-b"),
            ("--sae", "alice"),
            ("--sae", "bob"),
        ] {
            qkdnet(&["pki", "issue", "--dir", &pki, flag, id]);
        }
        let (port_a, port_b) = (free_port(), free_port());
        let a = serve(&config(&dir, "kme-a", port_a, ("kme-b", port_b), blocks));
        let b = serve(&config(&dir, "kme-b", port_b, ("kme-a", port_a), blocks));
        Network {
            dir,
            pki,
            port_a,
            port_b,
            kmes: vec![a, b],
        }
    }

    /// A file of the PKI directory (`ca.pem`, `sae-alice.pem`, ...).
    fn pki_file(&self, name: &str) -> String {
        format!("{}/{name}", self.pki)
    }

    /// Stops the KMEs and removes the directory (left in place when a test fails).
    fn remove(mut self) {
        self.kmes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn etsi_qkd_014_client_round_trip() {
    if let Err(why) = python_env() {
        println!("SKIPPED: pip could not reach PyPI: {why}");
        return;
    }
    let net = Network::start("client");
    let out = Command::new(root().join(".venv/bin/python"))
        .args([
            "-c",
            SCRIPT,
            &net.pki,
            &format!("127.0.0.1:{}", net.port_a),
            &format!("127.0.0.1:{}", net.port_b),
        ])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON result");
    println!("etsi-qkd-014-client: {v}");
    assert_eq!(v["status"][0], 200);
    assert_eq!(v["status"][1], "kme-a");
    assert_eq!(v["status"][2], 256); // 4 blocks x 4096 bytes = 512 units, 256 owned by A, 1 unit per key
    assert_eq!(v["enc"], serde_json::json!([200, 200]));
    assert_eq!(v["dec"], 200);
    assert_eq!(v["same"], true);
    assert_eq!(v["n"], 4);
    // A delivered it to alice as master; only bob, at B, may take it. Anyone else
    // gets the answer for an unknown ID (no existence oracle).
    assert_eq!(v["master_at_own_kme"], 400);
    assert_eq!(v["again"][0], 400);
    assert_eq!(
        v["again"][1],
        "one or more keys specified are not found on KME"
    );
    net.remove();
}

/// `qkdsec doctor --format json` at KME A with alice's certificate (master SAE),
/// slave SAE bob (on KME B). Every probe must pass except two whose
/// expectations depart from ETSI GS QKD 014 V1.1.1; for those the test pins the
/// status codes our KME sends, so that any change on our side shows here.
#[test]
fn qkdsec_doctor_probes() {
    if let Err(why) = python_env() {
        println!("SKIPPED: pip could not reach PyPI: {why}");
        return;
    }
    let net = Network::start("doctor");
    let out = Command::new(root().join(".venv/bin/qkdsec"))
        .args([
            "doctor",
            &format!("https://127.0.0.1:{}", net.port_a),
            "-s",
            "bob",
            "--cert",
            &net.pki_file("sae-alice.pem"),
            "--key",
            &net.pki_file("sae-alice.key"),
            "--ca-cert",
            &net.pki_file("ca.pem"),
            "--format",
            "json",
        ])
        .output()
        .expect("run qkdsec doctor");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qkdsec doctor JSON ({e}): {}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    println!("qkdsec doctor: {report}");
    // The doctor exits 1 when any probe fails (dec_keys_roundtrip, below).
    assert_eq!(out.status.code(), Some(1), "qkdsec doctor: {stderr}");
    assert_eq!(report["slave_sae_id"], "bob");

    let mut probes = BTreeMap::new();
    for r in report["results"].as_array().expect("results array") {
        let name = r["name"].as_str().expect("probe name").to_owned();
        assert!(probes.insert(name, r).is_none(), "probe twice: {r}");
    }
    // Departures of qkdsec from ETSI GS QKD 014 V1.1.1, not of our KME:
    let departures = ["dec_keys_roundtrip", "error_contract_404"];
    for name in [
        "reachability",
        "status_fields",
        "enc_keys_get",
        "enc_keys_post",
        "enc_keys_caps",
        "extensions_accepted",
        "error_contract_400",
        "latency",
    ]
    .iter()
    .chain(&departures)
    {
        assert!(probes.contains_key(*name), "qkdsec ran no {name} probe");
    }
    for (name, r) in &probes {
        if !departures.contains(&name.as_str()) {
            assert_eq!(r["status"], "pass", "probe {name}: {r}");
        }
    }

    // dec_keys_roundtrip: qkdsec calls dec_keys at KME A with alice's (the
    // master's) certificate. In V1.1.1 "Get key with key IDs" (§5.4,
    // POST/GET /api/v1/keys/{master_SAE_ID}/dec_keys) is called by the slave SAE
    // at its own KME, and a key handed out by enc_keys goes to the slave SAE(s)
    // named in that request and to nobody else. V1.1.1 would answer 401
    // Unauthorized to any other caller; our KME answers exactly as for an
    // unknown key ID (400), so that the answer does not reveal which IDs exist.
    let r = probes["dec_keys_roundtrip"];
    assert_eq!(r["status"], "fail", "{r}");
    let summary = r["summary"].as_str().expect("summary");
    assert!(
        summary.contains("HTTP 400: one or more keys specified are not found on KME"),
        "{r}"
    );

    // error_contract_404: qkdsec expects 404 for an unknown key_ID at dec_keys.
    // V1.1.1 defines only 200, 400 (Bad request), 401 (Unauthorized) and 503
    // (Error of server side) for "Get key with key IDs" (§5.4), and reports
    // unknown keys as 400 with the message "one or more keys specified are not
    // found on KME". Our KME sends that 400.
    let r = probes["error_contract_404"];
    assert_eq!(r["status"], "warn", "{r}");
    assert_eq!(r["details"]["http_status"], 400, "{r}");

    assert_eq!(report["counts"]["fail"], 1, "{report}");
    assert_eq!(report["counts"]["warn"], 1, "{report}");
    assert_eq!(report["passed"], false);
    net.remove();
}

/// Fetches KME A's served OpenAPI document and writes two copies: as served, and
/// with the path IDs narrowed to the one pair whose keys exist (`bob`) and no
/// mandatory multipath, so that every schema-valid status and enc_keys request is
/// one the KME must accept.
const FETCH_SCHEMA: &str = r#"
import json, sys, requests
pki, url, out = sys.argv[1], sys.argv[2], sys.argv[3]
doc = requests.get(f"{url}/api/v1/openapi.json", cert=(f"{pki}/sae-alice.pem", f"{pki}/sae-alice.key"),
                   verify=f"{pki}/ca.pem", timeout=30).json()
json.dump(doc, open(f"{out}/served.json", "w"))
for path, ops in doc["paths"].items():
    for op in ops.values():
        for p in op.get("parameters", []):
            if p["in"] == "path":
                p["schema"] = {"type": "string", "enum": ["bob"]}
# Two KMEs have no two node-disjoint routes: a *mandatory* multipath request is
# rightly answered 503 here, so this run asks for it only optionally.
kr = doc["components"]["schemas"]["KeyRequest"]["properties"]
kr["extension_mandatory"]["items"]["properties"]["qkdnet_multipath"]["enum"] = [1]
json.dump(doc, open(f"{out}/pair.json", "w"))
"#;

/// `st run` against KME A as alice, bounded in examples; returns its output.
fn schemathesis(net: &Network, schema: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(root().join(".venv/bin/st"))
        .arg("run")
        .arg(schema)
        .args([
            "--url",
            &format!("https://localhost:{}", net.port_a),
            "--request-cert",
            &net.pki_file("sae-alice.pem"),
            "--request-cert-key",
            &net.pki_file("sae-alice.key"),
            "--tls-verify",
            &net.pki_file("ca.pem"),
            "--max-examples",
            "40",
            "--checks",
            "all",
            "--generation-deterministic",
            "--workers",
            "1",
            "--no-color",
        ])
        .args(extra)
        .output()
        .expect("run st");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Issue #18 finding 6: the served document is exactly as strict as the server.
/// Two runs: (1) every operation, every check but "schema-valid data is
/// accepted" (whether an SAE or a key ID *exists* is not a property of the
/// schema); (2) status and enc_keys for the pair that has keys, with that check
/// too, so a document looser than the server (the old `number` minimum 0, no
/// size bounds) fails here.
#[test]
fn schemathesis_finds_no_disagreement_between_the_document_and_the_server() {
    if let Err(why) = python_env() {
        println!("SKIPPED: pip could not reach PyPI: {why}");
        return;
    }
    // Enough test key that no generated request runs the pool dry (a 503).
    let net = Network::start_with("schemathesis", (64, 1 << 17));
    let out = Command::new(root().join(".venv/bin/python"))
        .args([
            "-c",
            FETCH_SCHEMA,
            &net.pki,
            &format!("https://localhost:{}", net.port_a),
            net.dir.to_str().expect("utf-8"),
        ])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "fetching the document: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, text) = schemathesis(
        &net,
        &net.dir.join("served.json"),
        &["--exclude-checks", "positive_data_acceptance"],
    );
    println!(
        "{}",
        text.lines().rev().take(6).collect::<Vec<_>>().join("\n")
    );
    assert!(ok, "schemathesis (all operations):\n{text}");
    let (ok, text) = schemathesis(
        &net,
        &net.dir.join("pair.json"),
        &["--include-path-regex", "(status|enc_keys)$"],
    );
    assert!(
        ok,
        "schemathesis (status, enc_keys, schema-valid accepted):\n{text}"
    );
    net.remove();
}
