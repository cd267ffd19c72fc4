//! The fake-KME attack of issue #18 (finding 1) against the real binary.
//!
//! An insider with any credential of the network's PKI runs a TLS server and
//! points `msg seal` at it (a rewritten `connect.json`, a poisoned DNS entry…).
//! Before the fix the SAE client checked only that the server chained to the
//! network's CA, so the fake chose the "QKD key" and later read the file. Here each
//! fake is a *working* KME (KME A itself behind a server presenting the wrong
//! certificate): had the client accepted it, sealing would have succeeded. The
//! same server with KME A's own certificate is the control.

#[path = "apps_common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Net, data};
use qkdnet_kms::connect::ConnectFile;
use qkdnet_kms::server::serve;
use qkdnet_kms::tls::{KeyExchange, TlsMaterial, server_config};

const BIN: &str = env!("CARGO_BIN_EXE_qkdnet");

fn seal(connect: &Path, input: &Path, out: &Path) -> Output {
    Command::new(BIN)
        .args(["msg", "seal", "--connect"])
        .arg(connect)
        .args(["--from", "alice", "--to", "bob", "--in"])
        .arg(input)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run qkdnet msg seal")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msg_seal_refuses_a_fake_kme_holding_another_credential() {
    let net = Net::start().await;
    let pki = net.path("pki");
    let material = |cert: &str, key: &str| {
        TlsMaterial::from_files(&pki.join("ca.pem"), &pki.join(cert), &pki.join(key))
            .expect("TLS files")
    };
    let input = net.file("plain.txt", &data(1000, 3));
    let cases = [
        (
            "KME A's own certificate (control)",
            material("kme-kme-a.pem", "kme-kme-a.key"),
            None,
        ),
        (
            "SAE bob's certificate",
            material("sae-bob.pem", "sae-bob.key"),
            Some("certificate"),
        ),
        (
            "KME B's certificate",
            material("kme-kme-b.pem", "kme-kme-b.key"),
            Some("server is KME kme-b, not the expected KME kme-a"),
        ),
    ];
    for (i, (what, tls, refused)) in cases.into_iter().enumerate() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("https://127.0.0.1:{}", l.local_addr().expect("addr").port());
        let cfg = server_config(&tls, KeyExchange::HybridOnly).expect("server config");
        let server = serve(net.a.kme.clone(), cfg, l).expect("serve");
        // alice's connect file now sends her to the fake.
        let mut connect: ConnectFile = net.connect.clone();
        for s in &mut connect.saes {
            if s.id == "alice" {
                s.kme_url.clone_from(&url);
            }
        }
        let path = net.path(&format!("fake-{i}.json"));
        connect.save(&path).expect("save");
        let out_file = net.path(&format!("sealed-{i}"));
        let (p, inp, o) = (path.clone(), input.clone(), out_file.clone());
        let out = tokio::task::spawn_blocking(move || seal(&p, &inp, &o))
            .await
            .expect("seal task");
        let stderr = String::from_utf8_lossy(&out.stderr);
        match refused {
            None => assert!(out.status.success(), "{what}: {stderr}"),
            Some(says) => {
                assert!(!out.status.success(), "{what}: the fake KME was accepted");
                assert!(stderr.contains(says), "{what}: {stderr}");
                assert!(!out_file.exists(), "{what}: a sealed file was written");
            }
        }
        server.shutdown().await;
    }
}
