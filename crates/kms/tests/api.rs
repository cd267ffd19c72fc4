//! ETSI GS QKD 014 API over mutual TLS, end to end through two KMEs: every status
//! code path, restarts, concurrency, peer failure.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hyper::{Method, StatusCode};
use qkdnet_kms::etsi::Limits;
use qkdnet_kms::identity::Identity;
use serde_json::json;

#[tokio::test]
async fn enc_keys_then_dec_keys_gives_the_same_keys_once() {
    let net = Net::start(4).await;
    let (alice, bob) = (net.sae_client("alice"), net.sae_client("bob"));
    let (s, v) = alice
        .post(
            &format!("{}/api/v1/keys/bob/enc_keys", net.url_a()),
            &json!({"number": 3, "size": 512}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let got = keys_of(&v);
    assert_eq!(got.len(), 3);
    for (_, k) in &got {
        assert_eq!(k.len(), 88); // 64 bytes in base64 with padding
    }
    let ids: Vec<String> = got.iter().map(|(i, _)| i.clone()).collect();
    let (s, v) = bob
        .post(
            &format!("{}/api/v1/keys/alice/dec_keys", net.url_b()),
            &key_ids_body(&ids),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(keys_of(&v), got);
    // Delivered once: a second dec_keys finds nothing.
    let (s, v) = bob
        .post(
            &format!("{}/api/v1/keys/alice/dec_keys", net.url_b()),
            &key_ids_body(&ids),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        v["message"],
        "one or more keys specified are not found on KME"
    );
}

#[tokio::test]
async fn get_forms_and_defaults() {
    let net = Net::start(2).await;
    let (alice, bob) = (net.sae_client("alice"), net.sae_client("bob"));
    let (s, v) = alice
        .get(&format!("{}/api/v1/keys/bob/enc_keys", net.url_a()))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let one = keys_of(&v);
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].1.len(), 44); // default 256 bits
    let (s, v) = alice
        .get(&format!(
            "{}/api/v1/keys/bob/enc_keys?number=2&size=128",
            net.url_a()
        ))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let two = keys_of(&v);
    assert_eq!(two.len(), 2);
    assert_eq!(two[0].1.len(), 24);
    for (id, key) in one.iter().chain(&two) {
        let (s, v) = bob
            .get(&format!(
                "{}/api/v1/keys/alice/dec_keys?key_ID={id}",
                net.url_b()
            ))
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(&keys_of(&v)[0], &(id.clone(), key.clone()));
    }
}

#[tokio::test]
async fn status_reports_the_specs_fields() {
    let net = Net::start(2).await;
    let alice = net.sae_client("alice");
    let (s, v) = alice
        .get(&format!("{}/api/v1/keys/bob/status", net.url_a()))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["source_KME_ID"], "kme-a");
    assert_eq!(v["target_KME_ID"], "kme-b");
    assert_eq!(v["master_SAE_ID"], "alice");
    assert_eq!(v["slave_SAE_ID"], "bob");
    assert_eq!(v["key_size"], 256);
    assert_eq!(v["max_SAE_ID_count"], 0);
    // 2 blocks of 64 units, half owned by A.
    assert_eq!(v["stored_key_count"], 64);
    for f in [
        "max_key_count",
        "max_key_per_request",
        "max_key_size",
        "min_key_size",
    ] {
        assert!(v[f].is_u64(), "{f}");
    }
    alice
        .post(
            &format!("{}/api/v1/keys/bob/enc_keys", net.url_a()),
            &json!({"number": 4}),
        )
        .await;
    let (_, v) = alice
        .get(&format!("{}/api/v1/keys/bob/status", net.url_a()))
        .await;
    assert_eq!(v["stored_key_count"], 60);
}

#[tokio::test]
async fn another_pairs_keys_are_answered_like_unknown_ones() {
    let net = Net::start(2).await;
    let (alice, carol, eve) = (
        net.sae_client("alice"),
        net.sae_client("carol"),
        net.sae_client("eve"),
    );
    let (_, v) = alice
        .post(
            &format!("{}/api/v1/keys/bob/enc_keys", net.url_a()),
            &json!({}),
        )
        .await;
    let ids: Vec<String> = keys_of(&v).into_iter().map(|(i, _)| i).collect();
    // carol is attached to B but is not the slave named by alice.
    let (s, v) = carol
        .post(
            &format!("{}/api/v1/keys/alice/dec_keys", net.url_b()),
            &key_ids_body(&ids),
        )
        .await;
    // Same status and body as an unknown ID: a 401 here would tell any SAE
    // which key IDs exist (#18 finding 6).
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        v["message"],
        "one or more keys specified are not found on KME"
    );
    // The master's own certificate at the slave's KME (what qkdsec's round trip does).
    let (s, v) = alice
        .post(
            &format!("{}/api/v1/keys/alice/dec_keys", net.url_b()),
            &key_ids_body(&ids),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}"); // alice is not attached to B at all
    // qkdsec's round trip: the master asks its own KME for the key it was given
    // (with the slave's ID in the path, as in the specification's §6.4 example).
    let (s, v) = alice
        .post(
            &format!("{}/api/v1/keys/bob/dec_keys", net.url_a()),
            &key_ids_body(&ids),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, _) = eve
        .get(&format!(
            "{}/api/v1/keys/alice/dec_keys?key_ID={}",
            net.url_a(),
            ids[0]
        ))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // eve (at A) cannot use B at all, nor claim the keys via a wrong master ID.
    let (s, _) = eve
        .get(&format!("{}/api/v1/keys/alice/status", net.url_b()))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let bob = net.sae_client("bob");
    let (s, _) = bob
        .post(
            &format!("{}/api/v1/keys/eve/dec_keys", net.url_b()),
            &key_ids_body(&ids),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST); // bob, with the wrong master: not found
    // A KME certificate cannot use the SAE API.
    let kb = net.client(&Identity::Kme(kme("kme-b")));
    let (s, v) = kb
        .get(&format!("{}/api/v1/keys/bob/status", net.url_a()))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["message"].is_string());
    // An SAE cannot use the KME-to-KME API.
    let (s, _) = alice
        .post(
            &format!("{}/api/v1/kme/ext_keys/void", net.url_b()),
            &json!({"request_ID": ids[0]}),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // bob still gets his key after all that.
    let (s, _) = bob
        .post(
            &format!("{}/api/v1/keys/alice/dec_keys", net.url_b()),
            &key_ids_body(&ids),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn bad_requests_get_400_with_the_specs_messages() {
    let net = Net::start(1).await;
    let (alice, bob) = (net.sae_client("alice"), net.sae_client("bob"));
    let enc = format!("{}/api/v1/keys/bob/enc_keys", net.url_a());
    let cases = [
        (json!({"size": 100}), "size shall be a multiple of 8"),
        (
            json!({"extension_mandatory": [{"abc_route_type": "direct"}]}),
            "not all extension_mandatory parameters are supported",
        ),
    ];
    for (body, msg) in cases {
        let (s, v) = alice.post(&enc, &body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(v["message"], msg);
    }
    for body in [
        json!({"number": Limits::default().max_key_per_request + 1}),
        json!({"number": 0}),
        json!({"size": 0}),
        json!({"size": Limits::default().max_key_size + 8}),
        json!({"additional_slave_SAE_IDs": ["carol"]}),
        json!({"number": "one"}),
    ] {
        let (s, v) = alice.post(&enc, &body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        assert!(v["message"].is_string());
    }
    // GET with a size that is not a multiple of 8.
    let (s, v) = alice.get(&format!("{enc}?size=12")).await;
    assert_eq!(
        (s, v["message"].as_str()),
        (
            StatusCode::BAD_REQUEST,
            Some("size shall be a multiple of 8")
        )
    );
    // Malformed JSON and wrong content type.
    for (ct, body) in [
        ("application/json", &b"{\"number\": "[..]),
        ("application/json", b"[1,2]"),
        ("text/plain", b"{}"),
    ] {
        let (s, b) = alice
            .raw(Method::POST, &enc, Some(ct), body.to_vec())
            .await
            .expect("request");
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let v: serde_json::Value = serde_json::from_slice(&b).expect("JSON error body");
        assert!(v["message"].is_string());
    }
    // Unknown slave, invalid SAE ID.
    let (s, _) = alice
        .post(
            &format!("{}/api/v1/keys/nobody/enc_keys", net.url_a()),
            &json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = alice
        .post(
            &format!("{}/api/v1/keys/b%20b/enc_keys", net.url_a()),
            &json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Unknown and malformed key IDs.
    let dec = format!("{}/api/v1/keys/alice/dec_keys", net.url_b());
    let (s, v) = bob
        .post(
            &dec,
            &key_ids_body(&["00000000-0000-8000-8000-000000000000".into()]),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        v["message"],
        "one or more keys specified are not found on KME"
    );
    let (s, _) = bob.post(&dec, &key_ids_body(&["not-a-uuid".into()])).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = bob.post(&dec, &json!({"key_IDs": []})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = bob
        .get(&format!(
            "{dec}?key_ID=00000000-0000-8000-8000-000000000000"
        ))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Unknown route and wrong method: JSON bodies too.
    let (s, v) = alice.get(&format!("{}/api/v1/nothing", net.url_a())).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(v["message"].is_string());
    let (s, b) = alice
        .raw(Method::DELETE, &enc, None, Vec::new())
        .await
        .expect("request");
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert!(serde_json::from_slice::<serde_json::Value>(&b).is_ok());
}

#[tokio::test]
async fn oversized_body_is_refused() {
    let net = Net::start(1).await;
    let alice = net.sae_client("alice");
    let big = vec![b' '; Limits::default().max_body_bytes + 1];
    let r = alice
        .raw(
            Method::POST,
            &format!("{}/api/v1/keys/bob/enc_keys", net.url_a()),
            Some("application/json"),
            big,
        )
        .await;
    match r {
        Ok((s, _)) => assert_eq!(s, StatusCode::BAD_REQUEST),
        Err(e) => panic!("expected a 400 answer, got {e}"),
    }
}

#[tokio::test]
async fn empty_pool_gives_503() {
    let net = Net::start(0).await;
    let alice = net.sae_client("alice");
    let (s, v) = alice
        .post(
            &format!("{}/api/v1/keys/bob/enc_keys", net.url_a()),
            &json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(v["message"].is_string());
    // Asking for more than there is is 503 too, and takes nothing.
    net.ingest(0, 1).await;
    let (s, _) = alice
        .post(
            &format!("{}/api/v1/keys/bob/enc_keys", net.url_a()),
            &json!({"number": 33}),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    let (s, v) = alice
        .post(
            &format!("{}/api/v1/keys/bob/enc_keys", net.url_a()),
            &json!({"number": 32}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn no_or_foreign_client_certificate_fails_the_handshake() {
    let net = Net::start(1).await;
    let url = format!("{}/api/v1/keys/bob/status", net.url_a());
    // No client certificate.
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(net.ca.cert_pem().as_bytes()) {
            r.add(c.expect("pem")).expect("root");
        }
        r
    };
    let cfg = rustls::ClientConfig::builder_with_provider(qkdnet_kms::tls::provider(
        qkdnet_kms::tls::KeyExchange::HybridOnly,
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let anon = Client::from_config(cfg);
    assert!(anon.raw(Method::GET, &url, None, Vec::new()).await.is_err());
    // A certificate from another CA, claiming to be alice.
    let other = qkdnet_kms::pki::Ca::generate("rogue CA").expect("CA");
    let mut m = other
        .material(&Identity::Sae(sae("alice")), &[])
        .expect("cert");
    m.ca_pem = net.ca.cert_pem().to_owned(); // trusts the real server
    assert!(
        Client::new(&m)
            .raw(Method::GET, &url, None, Vec::new())
            .await
            .is_err()
    );
}

use rustls::pki_types::pem::PemObject;

#[tokio::test]
async fn keys_survive_a_restart_of_either_kme() {
    let mut net = Net::start(2).await;
    let (alice, bob) = (net.sae_client("alice"), net.sae_client("bob"));
    let (s, v) = alice
        .post(
            &format!("{}/api/v1/keys/bob/enc_keys", net.url_a()),
            &json!({"number": 5}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let first = keys_of(&v);
    net.stop_b().await;
    net.start_b().await;
    net.restart_a().await;
    let (s, v) = alice
        .post(
            &format!("{}/api/v1/keys/bob/enc_keys", net.url_a()),
            &json!({"number": 5}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let second = keys_of(&v);
    let ids: HashSet<_> = first
        .iter()
        .chain(&second)
        .map(|(i, _)| i.clone())
        .collect();
    assert_eq!(ids.len(), 10, "a restart must not hand out a key twice");
    net.stop_b().await;
    net.start_b().await;
    let bob = {
        let _ = bob;
        net.sae_client("bob")
    };
    let all: Vec<String> = first
        .iter()
        .chain(&second)
        .map(|(i, _)| i.clone())
        .collect();
    let (s, v) = bob
        .post(
            &format!("{}/api/v1/keys/alice/dec_keys", net.url_b()),
            &key_ids_body(&all),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let got = keys_of(&v);
    let want: Vec<_> = first.into_iter().chain(second).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn peer_down_gives_503_and_the_keys_return_to_the_pool() {
    let mut net = Net::start(1).await;
    let alice = net.sae_client("alice");
    let status = format!("{}/api/v1/keys/bob/status", net.url_a());
    let (_, v) = alice.get(&status).await;
    let before = v["stored_key_count"].as_u64().expect("count");
    net.stop_b().await;
    let (s, v) = alice
        .post(
            &format!("{}/api/v1/keys/bob/enc_keys", net.url_a()),
            &json!({"number": 2}),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    let (_, v) = alice.get(&status).await;
    assert_eq!(
        v["stored_key_count"].as_u64(),
        Some(before - 2),
        "reserved until the peer answers the void"
    );
    net.start_b().await;
    let a = net.a.as_ref().expect("A").kme.clone();
    assert!(a.settle(Duration::from_secs(60)).await, "void settled");
    let (_, v) = alice.get(&status).await;
    assert_eq!(v["stored_key_count"].as_u64(), Some(before));
    // And the pool is consistent: the next request works end to end.
    let (s, v) = alice
        .post(
            &format!("{}/api/v1/keys/bob/enc_keys", net.url_a()),
            &json!({"number": 2}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ids: Vec<String> = keys_of(&v).into_iter().map(|(i, _)| i).collect();
    let (s, v2) = net
        .sae_client("bob")
        .post(
            &format!("{}/api/v1/keys/alice/dec_keys", net.url_b()),
            &key_ids_body(&ids),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v2}");
    assert_eq!(keys_of(&v2), keys_of(&v));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_share_a_key() {
    let net = Net::start(16).await; // 512 units owned by A
    let alice = net.sae_client("alice");
    let url = Arc::new(format!("{}/api/v1/keys/bob/enc_keys", net.url_a()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..48 {
        let (c, url) = (alice.clone(), url.clone());
        tasks.spawn(async move {
            let mut mine = Vec::new();
            for _ in 0..4 {
                let (s, v) = c.post(&url, &json!({"number": 2, "size": 256})).await;
                if s == StatusCode::OK {
                    mine.extend(keys_of(&v));
                }
            }
            mine
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.expect("task"));
    }
    assert_eq!(
        all.len(),
        48 * 4 * 2,
        "pool was large enough for every request"
    );
    let ids: HashSet<_> = all.iter().map(|(i, _)| i.clone()).collect();
    let keys: HashSet<_> = all.iter().map(|(_, k)| k.clone()).collect();
    assert_eq!(ids.len(), all.len(), "a key ID was handed out twice");
    assert_eq!(keys.len(), all.len(), "key material was handed out twice");
    // bob gets exactly these keys.
    let bob = net.sae_client("bob");
    for chunk in all.chunks(100) {
        let ids: Vec<String> = chunk.iter().map(|(i, _)| i.clone()).collect();
        let (s, v) = bob
            .post(
                &format!("{}/api/v1/keys/alice/dec_keys", net.url_b()),
                &key_ids_body(&ids),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(keys_of(&v), chunk.to_vec());
    }
}

#[tokio::test]
async fn openapi_document_is_served() {
    let net = Net::start(0).await;
    let (s, v) = net
        .sae_client("alice")
        .get(&format!("{}/api/v1/openapi.json", net.url_a()))
        .await;
    assert_eq!(s, StatusCode::OK);
    for p in [
        "/api/v1/keys/{slave_SAE_ID}/status",
        "/api/v1/keys/{slave_SAE_ID}/enc_keys",
        "/api/v1/keys/{master_SAE_ID}/dec_keys",
    ] {
        assert!(v["paths"][p].is_object(), "{p}");
    }
    assert!(v["paths"]["/api/v1/keys/{slave_SAE_ID}/enc_keys"]["post"].is_object());
    assert!(v["components"]["schemas"]["Status"]["properties"]["max_SAE_ID_count"].is_object());
    // The document is as strict as the server (#18 finding 6): this KME's limits,
    // UUID key IDs, at least one key ID, the ID alphabet in paths.
    let s = &v["components"]["schemas"];
    let l = qkdnet_kms::etsi::Limits::default();
    assert_eq!(s["KeyRequest"]["properties"]["number"]["minimum"], 1);
    assert_eq!(
        s["KeyRequest"]["properties"]["number"]["maximum"],
        l.max_key_per_request
    );
    assert_eq!(
        s["KeyRequest"]["properties"]["size"]["minimum"],
        l.min_key_size
    );
    assert_eq!(
        s["KeyRequest"]["properties"]["size"]["maximum"],
        l.max_key_size
    );
    assert_eq!(s["KeyRequest"]["properties"]["size"]["multipleOf"], 8);
    assert_eq!(s["KeyIds"]["properties"]["key_IDs"]["minItems"], 1);
    assert_eq!(s["KeyIdEntry"]["properties"]["key_ID"]["format"], "uuid");
    let get = &v["paths"]["/api/v1/keys/{master_SAE_ID}/dec_keys"]["get"]["parameters"];
    assert_eq!(get[0]["schema"]["pattern"], "^[A-Za-z0-9._-]{1,64}$");
    assert_eq!(get[1]["schema"]["format"], "uuid");
}

#[tokio::test]
async fn units_the_peer_lacks_are_discarded_not_reused() {
    let net = Net::start(0).await;
    // Block 0 reaches A only (the link layer pushed it to one end).
    let a = net.a.as_ref().expect("A").kme.clone();
    a.ingest(qkdnet_kms::testkeys::seeded_block(
        SEED,
        "ab",
        kme("kme-b"),
        0,
        BLOCK_BYTES,
    ))
    .await
    .expect("ingest");
    let alice = net.sae_client("alice");
    let status = format!("{}/api/v1/keys/bob/status", net.url_a());
    let (_, v) = alice.get(&status).await;
    assert_eq!(v["stored_key_count"], 32);
    let (s, v) = alice
        .post(
            &format!("{}/api/v1/keys/bob/enc_keys", net.url_a()),
            &json!({"number": 2}),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(a.settle(Duration::from_secs(30)).await);
    let (_, v) = alice.get(&status).await;
    assert_eq!(
        v["stored_key_count"], 30,
        "the two units B lacks are discarded, not offered again"
    );
}

/// Key stock: after a pair's first enc_keys its KME agrees a stock of keys with
/// the peer; later enc_keys are served from it (no peer call on the way), every
/// key reaches the slave exactly once, the stock survives a restart, status
/// counts it for its own pair only, and no other pair draws on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stocked_keys_are_served_once_and_survive_a_restart() {
    const STOCK: u32 = 16;
    let mut net = Net::start_configured(2, Limits::default(), |c| c.stock_keys = STOCK).await;
    let (alice, eve) = (net.sae_client("alice"), net.sae_client("eve"));
    // Restarts keep the addresses.
    let (url_a, url_b) = (net.url_a(), net.url_b());
    let enc = |who: &Client, n: u32| {
        let url = format!("{url_a}/api/v1/keys/bob/enc_keys");
        let who = who.clone();
        async move {
            let (s, v) = who.post(&url, &json!({"number": n})).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            keys_of(&v)
        }
    };
    let status = |who: &Client| {
        let url = format!("{url_a}/api/v1/keys/bob/status");
        let who = who.clone();
        async move {
            who.get(&url).await.1["stored_key_count"]
                .as_u64()
                .expect("count")
        }
    };
    let settle = |net: &Net| {
        let kme = net.a.as_ref().expect("A runs").kme.clone();
        async move {
            assert!(
                kme.settle(Duration::from_secs(10)).await,
                "stock refill settles"
            )
        }
    };
    let before = status(&alice).await;
    let mut got = enc(&alice, 3).await;
    settle(&net).await;
    // The stock was taken from the pool: alice still sees it, eve does not.
    assert_eq!(status(&alice).await, before - 3);
    assert_eq!(status(&eve).await, before - 3 - u64::from(STOCK));
    // Served from the stock (even with B down), refilled behind.
    net.stop_b().await;
    got.extend(enc(&alice, 5).await);
    got.extend(enc(&alice, 4).await);
    net.start_b().await;
    net.restart_a().await;
    let alice = net.sae_client("alice");
    got.extend(enc(&alice, 6).await);
    settle(&net).await;
    let eve_keys = enc(&net.sae_client("eve"), 2).await;
    let ids: HashSet<&String> = got.iter().chain(&eve_keys).map(|(i, _)| i).collect();
    assert_eq!(
        ids.len(),
        got.len() + eve_keys.len(),
        "a key was handed out twice"
    );
    // The master's KME knows them as delivered to alice: not for anyone here.
    let (s, _) = alice
        .post(
            &format!("{url_a}/api/v1/keys/alice/dec_keys"),
            &key_ids_body(&[got[0].0.clone()]),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // bob gets each of alice's keys, once, with the same bytes; eve's stay eve's.
    let bob = net.sae_client("bob");
    let dec = |master: &str, keys: &[(String, String)]| {
        let url = format!("{url_b}/api/v1/keys/{master}/dec_keys");
        let ids: Vec<String> = keys.iter().map(|(i, _)| i.clone()).collect();
        let bob = bob.clone();
        async move { bob.post(&url, &key_ids_body(&ids)).await }
    };
    let (s, v) = dec("alice", &got).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(keys_of(&v), got);
    let (s, _) = dec("alice", &got[..1]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "delivered twice");
    let (s, _) = dec("alice", &eve_keys).await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "eve's keys under alice's name: not found"
    );
    let (s, v) = dec("eve", &eve_keys).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(keys_of(&v), eve_keys);
}

/// Finding 5 of issue #18: ETSI 014 has no delivery acknowledgement, so an
/// answer lost after the KME's durable commit (connection cut, KME killed)
/// used to lose the keys. With the `qkdnet_request_id` extension the SAE's
/// retry gets the same keys — even after a restart of its KME — and only once.
#[tokio::test]
async fn a_retry_with_the_same_request_id_gets_the_same_keys_once() {
    let mut net = Net::start(4).await;
    let url = format!("{}/api/v1/keys/bob/enc_keys", net.url_a());
    let rid = "0192f3a4-5b6c-7d8e-9fa0-b1c2d3e4f506";
    let body = json!({"number": 2, "extension_mandatory": [{"qkdnet_request_id": rid}]});
    let (s, v) = net.sae_client("alice").post(&url, &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let first = keys_of(&v);
    assert_eq!(first.len(), 2);
    // The answer is lost and KME A restarts before the SAE retries.
    net.restart_a().await;
    let alice = net.sae_client("alice");
    let (s, v) = alice.post(&url, &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(keys_of(&v), first, "the retry gets the same keys");
    // Once: a third try is refused and draws nothing.
    let (s, v) = alice.post(&url, &body).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("replayed already")),
        "{v}"
    );
    // The same ID for another request: refused.
    let other = json!({"number": 3, "extension_optional": [{"qkdnet_request_id": rid}]});
    let (s, v) = alice.post(&url, &other).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // Another ID: new keys. Without the extension: new keys too.
    let fresh = json!({"number": 2, "extension_optional": [{"qkdnet_request_id": "0192f3a4-5b6c-7d8e-9fa0-b1c2d3e4f507"}]});
    let (s, v) = alice.post(&url, &fresh).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let second = keys_of(&v);
    let ids: HashSet<_> = first
        .iter()
        .chain(&second)
        .map(|(i, _)| i.clone())
        .collect();
    assert_eq!(ids.len(), 4);
    // The slave gets each key once, as always.
    let all: Vec<String> = first
        .iter()
        .chain(&second)
        .map(|(i, _)| i.clone())
        .collect();
    let bob = net.sae_client("bob");
    let dec = format!("{}/api/v1/keys/alice/dec_keys", net.url_b());
    let (s, v) = bob.post(&dec, &key_ids_body(&all)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        keys_of(&v),
        first.into_iter().chain(second).collect::<Vec<_>>()
    );
    let (s, _) = bob.post(&dec, &key_ids_body(&all)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // A malformed ID is a bad request.
    let bad = json!({"extension_optional": [{"qkdnet_request_id": "nope"}]});
    let (s, _) = alice.post(&url, &bad).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_of_one_request_id_never_get_two_different_key_sets() {
    let net = Net::start(4).await;
    let url = format!("{}/api/v1/keys/bob/enc_keys", net.url_a());
    let rid = "0192f3a4-5b6c-7d8e-9fa0-b1c2d3e4f520";
    let body = json!({"number": 2, "extension_mandatory": [{"qkdnet_request_id": rid}]});
    let alice = net.sae_client("alice");
    let answers = tokio::join!(
        alice.post(&url, &body),
        alice.post(&url, &body),
        alice.post(&url, &body),
        alice.post(&url, &body),
    );
    let answers = [answers.0, answers.1, answers.2, answers.3];
    let mut sets = HashSet::new();
    for (s, v) in &answers {
        match *s {
            StatusCode::OK => {
                sets.insert(keys_of(v));
            }
            // Told to wait for the first, or the replay was used up.
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_REQUEST => {}
            other => panic!("{other}: {v}"),
        }
    }
    assert_eq!(sets.len(), 1, "one key set for one request ID: {answers:?}");
    let oks = answers.iter().filter(|a| a.0 == StatusCode::OK).count();
    assert!(oks <= 2, "the keys and at most one replay: {answers:?}");
    let keys = sets.into_iter().next().expect("one set");
    let ids: Vec<String> = keys.iter().map(|(i, _)| i.clone()).collect();
    let dec = format!("{}/api/v1/keys/alice/dec_keys", net.url_b());
    let (s, v) = net.sae_client("bob").post(&dec, &key_ids_body(&ids)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(keys_of(&v), keys);
}
