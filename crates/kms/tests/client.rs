//! The SAE-side ETSI GS QKD 014 client ([`qkdnet_kms::client::EtsiClient`]) and
//! `connect.json` against two real KMEs in-process (the harness of `api.rs`).

mod common;

use std::time::Duration;

use common::*;
use qkdnet_kms::client::{ClientError, EtsiClient};
use qkdnet_kms::connect::{ConnectFile, SaeEntry};
use qkdnet_kms::identity::Identity;
use qkdnet_kms::pki::Ca;

const TIMEOUT: Duration = Duration::from_secs(10);

/// SAE `name`'s client to the KME at `url`, which must prove to be `kme-a`
/// (URL of KME A) or `kme-b` (any other URL).
fn sae_at(net: &Net, name: &str, url: &str) -> EtsiClient {
    let tls = net
        .ca
        .material(&Identity::Sae(sae(name)), &[])
        .expect("SAE certificate");
    let expected = if url == net.url_a() { "kme-a" } else { "kme-b" };
    EtsiClient::new(url, &kme(expected), &tls, TIMEOUT).expect("client")
}

#[tokio::test]
async fn status_enc_keys_dec_keys_round_trip() {
    let net = Net::start(4).await;
    let alice = sae_at(&net, "alice", &net.url_a());
    let bob = sae_at(&net, "bob", &net.url_b());

    let st = alice.status("bob").await.expect("status");
    assert_eq!(st.source_KME_ID, "kme-a");
    assert_eq!(st.target_KME_ID, "kme-b");
    assert_eq!(st.master_SAE_ID, "alice");
    assert_eq!(st.slave_SAE_ID, "bob");
    assert_eq!(st.key_size, 256);
    assert_eq!(st.stored_key_count, 128); // 4 blocks of 64 units, half owned by A

    let sent = alice.enc_keys("bob", 3, Some(512)).await.expect("enc_keys");
    assert_eq!(sent.len(), 3);
    assert!(sent.iter().all(|k| k.material.len() == 64));
    let default = alice.enc_keys("bob", 1, None).await.expect("enc_keys");
    assert_eq!(default[0].material.len(), 32);

    // dec_keys in another order than enc_keys: answered in the order asked.
    let ids: Vec<_> = sent.iter().rev().map(|k| k.id).collect();
    let got = bob.dec_keys("alice", &ids).await.expect("dec_keys");
    assert_eq!(got.len(), 3);
    for (g, s) in got.iter().zip(sent.iter().rev()) {
        assert_eq!(g.id, s.id);
        assert!(g.material == s.material, "same key bytes at both ends");
    }

    // Delivered once.
    match bob.dec_keys("alice", &ids).await {
        Err(ClientError::Api {
            status: 400,
            message,
        }) => {
            assert_eq!(message, "one or more keys specified are not found on KME")
        }
        other => panic!("expected 400, got {other:?}"),
    }
}

#[tokio::test]
async fn an_sae_not_named_as_slave_is_told_the_keys_are_not_found() {
    let net = Net::start(2).await;
    let alice = sae_at(&net, "alice", &net.url_a());
    let carol = sae_at(&net, "carol", &net.url_b());
    let bob = sae_at(&net, "bob", &net.url_b());
    let keys = alice.enc_keys("bob", 1, None).await.expect("enc_keys");
    let ids = [keys[0].id];
    match carol.dec_keys("alice", &ids).await {
        Err(ClientError::Api {
            status: 400,
            message,
        }) => assert_eq!(message, "one or more keys specified are not found on KME"),
        other => panic!("expected 400, got {other:?}"),
    }
    // The refusal did not consume the key.
    let got = bob.dec_keys("alice", &ids).await.expect("dec_keys");
    assert!(got[0].material == keys[0].material);
}

#[tokio::test]
async fn errors_are_typed() {
    let net = Net::start(0).await;
    let alice = sae_at(&net, "alice", &net.url_a());
    // Empty pool: the KME's 503 comes back as an API error with its message.
    match alice.enc_keys("bob", 1, None).await {
        Err(ClientError::Api {
            status: 503,
            message,
        }) => assert!(!message.is_empty()),
        other => panic!("expected 503, got {other:?}"),
    }
    // Caller mistakes never reach the network.
    for r in [
        alice.enc_keys("bob/../x", 1, None).await,
        alice.enc_keys("bob", 0, None).await,
        alice.enc_keys("bob", 1, Some(12)).await,
        alice.dec_keys("bob", &[]).await,
    ] {
        assert!(
            matches!(r, Err(ClientError::InvalidRequest(_))),
            "{:?}",
            r.map(|_| ())
        );
    }
}

#[tokio::test]
async fn unreachable_or_untrusted_kme_is_unavailable() {
    let net = Net::start(1).await;
    // A port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let c = sae_at(&net, "alice", &format!("https://127.0.0.1:{port}"));
    match c.status("bob").await {
        Err(ClientError::Unavailable(m)) => assert!(m.contains("127.0.0.1"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // A certificate and CA from another network: the handshake fails.
    let other = Ca::generate("another CA").expect("CA");
    let tls = other
        .material(&Identity::Sae(sae("alice")), &[])
        .expect("cert");
    let c = EtsiClient::new(&net.url_a(), &kme("kme-a"), &tls, TIMEOUT).expect("client");
    assert!(matches!(
        c.status("bob").await,
        Err(ClientError::Unavailable(_))
    ));
    // Not https.
    let tls = net
        .ca
        .material(&Identity::Sae(sae("alice")), &[])
        .expect("cert");
    assert!(
        EtsiClient::new(
            &format!("http://127.0.0.1:{}", net.cfg_a.listen.port()),
            &kme("kme-a"),
            &tls,
            TIMEOUT
        )
        .is_err()
    );
}

#[tokio::test]
async fn connect_file_round_trip() {
    let net = Net::start(2).await;
    let dir = &net.dir.0;
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).expect("pki dir");
    std::fs::write(pki.join("ca.pem"), net.ca.cert_pem()).expect("CA file");
    let mut saes = Vec::new();
    for (name, node, url) in [
        ("alice", "kme-a", net.url_a()),
        ("bob", "kme-b", net.url_b()),
    ] {
        net.ca
            .issue_to_dir(&pki, &Identity::Sae(sae(name)), &[])
            .expect("issue");
        saes.push(SaeEntry {
            id: name.into(),
            node: node.into(),
            kme: String::new(), // defaults to the node's name
            kme_url: url,
            cert: format!("pki/sae-{name}.pem").into(),
            key: format!("pki/sae-{name}.key").into(),
            ca: "pki/ca.pem".into(),
        });
    }
    let file = ConnectFile { saes };
    let path = dir.join("connect.json");
    file.save(&path).expect("save");
    let loaded = ConnectFile::load(&path).expect("load");
    assert_eq!(loaded.saes.len(), 2);
    assert_eq!(loaded.sae("bob").expect("bob").node, "kme-b");
    assert_eq!(loaded.sae("bob").expect("bob").kme, "kme-b");
    assert!(loaded.sae("alice").expect("alice").cert.is_absolute());
    // Saved relative, loaded resolved: the state directory can move.
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(text.contains("\"pki/ca.pem\""), "{text}");

    let alice = loaded.client("alice", TIMEOUT).expect("alice client");
    let bob = loaded.client("bob", TIMEOUT).expect("bob client");
    let keys = alice.enc_keys("bob", 2, Some(128)).await.expect("enc_keys");
    let ids: Vec<_> = keys.iter().map(|k| k.id).collect();
    let got = bob.dec_keys("alice", &ids).await.expect("dec_keys");
    assert!(got.iter().zip(&keys).all(|(g, k)| g.material == k.material));

    let e = loaded.client("carol", TIMEOUT).unwrap_err().to_string();
    assert!(e.contains("carol") && e.contains("alice, bob"), "{e}");

    // An entry whose certificate is another SAE's is refused before any call.
    let mut swapped = loaded.clone();
    swapped.saes[0].cert = loaded.saes[1].cert.clone();
    swapped.saes[0].key = loaded.saes[1].key.clone();
    let e = swapped.client("alice", TIMEOUT).unwrap_err().to_string();
    assert!(e.contains("not SAE alice"), "{e}");

    // Clear errors naming the file.
    let bad = dir.join("bad.json");
    std::fs::write(&bad, "{\"saes\": 3}").expect("write");
    let e = ConnectFile::load(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.json"), "{e}");
    let e = ConnectFile::load(&dir.join("missing.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.json"), "{e}");
}

/// `enc_keys_retrying` names its request (the `qkdnet_request_id` extension),
/// gets keys like `enc_keys`, and gives up after its attempts when the KME keeps
/// answering 503 (here: its peer is down, so nothing can be confirmed).
#[tokio::test]
async fn enc_keys_retrying_gets_keys_and_gives_up_on_a_lasting_failure() {
    let mut net = Net::start(4).await;
    let alice = sae_at(&net, "alice", &net.url_a());
    let bob = sae_at(&net, "bob", &net.url_b());
    let keys = alice
        .enc_keys_retrying("bob", 2, Some(256), 3)
        .await
        .expect("enc_keys");
    let ids: Vec<_> = keys.iter().map(|k| k.id).collect();
    let got = bob.dec_keys("alice", &ids).await.expect("dec_keys");
    assert!(got.iter().zip(&keys).all(|(g, k)| g.material == k.material));
    let before = alice.status("bob").await.expect("status").stored_key_count;
    net.stop_b().await;
    match alice.enc_keys_retrying("bob", 1, None, 2).await {
        Err(ClientError::Api { status: 503, .. }) => {}
        other => panic!("expected 503 after the retries, got {other:?}"),
    }
    net.start_b().await;
    // The voids settle in the background; no key was handed out.
    let alice = sae_at(&net, "alice", &net.url_a());
    let mut after = 0;
    for _ in 0..100 {
        after = alice.status("bob").await.expect("status").stored_key_count;
        if after == before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        after, before,
        "the failed attempts' keys return to the pool"
    );
}
