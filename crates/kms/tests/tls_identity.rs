//! Fake KMEs and classical-only peers (issue #18, findings 1 and 7).
//!
//! The attack: an insider holding any credential of the network's PKI (another
//! SAE's certificate, another node's KME certificate) runs a TLS server and gets a
//! client to talk to it instead of its KME; a KME that accepts it hands out keys
//! the attacker chose. Each fake below is a *working* KME (the real KME A or B
//! behind a server presenting the wrong certificate), so if a client accepted it
//! the call would succeed: the tests fail on any regression of the identity check,
//! not on some unrelated error. The same server with the right certificate is the
//! control.
//!
//! Covered clients: the SAE's [`EtsiClient`] (SAE → KME) and the KME's peer client
//! (KME → KME; the relay uses the same peer clients, so its hops are covered by
//! the same check).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use qkdnet_kms::client::{ClientError, EtsiClient};
use qkdnet_kms::identity::Identity;
use qkdnet_kms::server::{ServerHandle, serve};
use qkdnet_kms::tls::{KeyExchange, TlsMaterial, server_config};
use qkdnet_kms::{Kme, KmsError};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `kme` on a fresh loopback port with the certificate of `tls`.
async fn fake(kme: &Arc<Kme>, tls: &TlsMaterial) -> (ServerHandle, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("https://127.0.0.1:{}", l.local_addr().expect("addr").port());
    let cfg = server_config(tls, KeyExchange::HybridOnly).expect("server config");
    (serve(kme.clone(), cfg, l).expect("serve"), url)
}

/// An SAE certificate as `qkdnet pki` issued them before the fix: ServerAuth and
/// ClientAuth, localhost host names. The client must refuse it as a server all
/// the same (it names an SAE, not the expected KME).
fn legacy_sae_cert(net: &Net, who: &str) -> TlsMaterial {
    let ca_key = KeyPair::from_pem(&net.ca.key_pem()).expect("CA key");
    let issuer = Issuer::from_ca_cert_pem(net.ca.cert_pem(), &ca_key).expect("issuer");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("sae:{who}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.subject_alt_names = vec![
        SanType::URI(format!("sae:{who}").as_str().try_into().expect("uri")),
        SanType::DnsName("localhost".try_into().expect("dns")),
        SanType::IpAddress("127.0.0.1".parse().expect("ip")),
    ];
    let key = KeyPair::generate().expect("key");
    let cert = p.signed_by(&key, &issuer).expect("sign");
    TlsMaterial {
        ca_pem: net.ca.cert_pem().to_owned(),
        cert_pem: cert.pem(),
        key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
    }
}

fn alice_to(net: &Net, url: &str) -> EtsiClient {
    let tls = net
        .ca
        .material(&Identity::Sae(sae("alice")), &[])
        .expect("SAE certificate");
    EtsiClient::new(url, &kme("kme-a"), &tls, TIMEOUT).expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sae_refuses_every_other_credential_posing_as_its_kme() {
    let net = Net::start(4).await;
    let kme_a = net.a.as_ref().expect("A").kme.clone();

    // Control: KME A's own certificate on the same kind of server works.
    let (h, url) = fake(&kme_a, &net.tls_a).await;
    let keys = alice_to(&net, &url)
        .enc_keys("bob", 1, None)
        .await
        .expect("the real KME identity is accepted");
    assert_eq!(keys.len(), 1);
    h.shutdown().await;

    let fakes = [
        (
            "another SAE's certificate",
            net.ca
                .material(&Identity::Sae(sae("eve")), &[])
                .expect("SAE"),
            "SAE",
        ),
        (
            "an SAE certificate of the old kind (ServerAuth, localhost)",
            legacy_sae_cert(&net, "eve"),
            "SAE eve",
        ),
        (
            "another node's KME certificate",
            net.tls_b.clone(),
            "KME kme-b, not the expected KME kme-a",
        ),
    ];
    for (what, tls, says) in fakes {
        let (h, url) = fake(&kme_a, &tls).await;
        match alice_to(&net, &url).enc_keys("bob", 1, None).await {
            Err(ClientError::Unavailable(m)) => {
                // New-style SAE certificates already fail WebPKI's usage check.
                assert!(
                    m.contains(says) || m.contains("Extended") || m.contains("usage"),
                    "{what}: {m}"
                );
            }
            other => panic!("{what}: the fake KME was accepted: {other:?}"),
        }
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kme_refuses_a_fake_peer() {
    // KME A's peer URL for B points at a server we control; it serves the real
    // KME B (so acceptance would complete the reservation) under each credential.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    let mut net = Net::start_configured(4, Default::default(), move |c| {
        if c.kme_id.as_str() == "kme-a" {
            c.peers[0].url = format!("https://127.0.0.1:{port}");
        }
    })
    .await;
    let kme_b = net.b.as_ref().expect("B").kme.clone();
    let alice = net.sae_client("alice");
    let url = format!("{}/api/v1/keys/bob/enc_keys", net.url_a());
    let mut listener = Some(l);
    let creds = [
        ("KME B's own certificate (control)", net.tls_b.clone(), true),
        (
            "an SAE certificate",
            net.ca
                .material(&Identity::Sae(sae("bob")), &[])
                .expect("SAE"),
            false,
        ),
        (
            "an SAE certificate of the old kind",
            legacy_sae_cert(&net, "bob"),
            false,
        ),
        ("KME A's certificate", net.tls_a.clone(), false),
    ];
    for (what, tls, ok) in creds {
        let l = match listener.take() {
            Some(l) => l,
            None => bind_port(port).await,
        };
        let cfg = server_config(&tls, KeyExchange::HybridOnly).expect("config");
        let h = serve(kme_b.clone(), cfg, l).expect("serve");
        let (st, v) = alice.post(&url, &serde_json::json!({"number": 1})).await;
        if ok {
            assert_eq!(st, 200, "{what}: {v}");
        } else {
            assert_eq!(st, 503, "{what}: the fake peer was accepted: {v}");
        }
        h.shutdown().await;
    }
    net.stop_b().await;
}

async fn bind_port(port: u16) -> tokio::net::TcpListener {
    for _ in 0..100 {
        if let Ok(l) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not rebind {port}");
}

/// Opens a raw TLS connection to `url`'s port as SAE alice with `provider`'s
/// key exchanges; returns the negotiated group, or the handshake error.
async fn handshake(
    net: &Net,
    url: &str,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<rustls::NamedGroup, String> {
    let m = net
        .ca
        .material(&Identity::Sae(sae("alice")), &[])
        .expect("SAE");
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(m.roots().expect("roots"))
        .with_client_auth_cert(m.chain().expect("chain"), m.key().expect("key"))
        .expect("config");
    let port: u16 = url.rsplit(':').next().expect("port").parse().expect("port");
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let group = tls
        .get_ref()
        .1
        .negotiated_key_exchange_group()
        .map(|g| g.name())
        .ok_or("no group")?;
    Ok(group)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_exchange_is_post_quantum_hybrid_and_classical_clients_are_refused() {
    let net = Net::start(1).await;
    let hybrid = qkdnet_kms::tls::provider(KeyExchange::HybridOnly);
    let classical = Arc::new(rustls::crypto::ring::default_provider());
    assert_eq!(
        handshake(&net, &net.url_a(), hybrid.clone()).await,
        Ok(rustls::NamedGroup::X25519MLKEM768)
    );
    // A client without ML-KEM (X25519 / P-256 / P-384 only, TLS 1.2 or 1.3).
    let e = handshake(&net, &net.url_a(), classical.clone())
        .await
        .expect_err("a classical-only client must be refused");
    assert!(!e.is_empty());

    // Configured to allow classical clients: they get in, hybrid ones still
    // negotiate the hybrid group.
    let kme_a = net.a.as_ref().expect("A").kme.clone();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("https://127.0.0.1:{}", l.local_addr().expect("addr").port());
    let cfg = server_config(&net.tls_a, KeyExchange::AllowClassical).expect("config");
    let h = serve(kme_a, cfg, l).expect("serve");
    assert_eq!(
        handshake(&net, &url, hybrid).await,
        Ok(rustls::NamedGroup::X25519MLKEM768)
    );
    assert_eq!(
        handshake(&net, &url, classical).await,
        Ok(rustls::NamedGroup::X25519)
    );
    h.shutdown().await;
}

#[test]
fn sae_certificates_cannot_carry_host_names() {
    let ca = qkdnet_kms::pki::Ca::generate("t").expect("CA");
    let e = ca
        .issue(&Identity::Sae(sae("a")), &["localhost".into()])
        .err()
        .map(|e: KmsError| e.to_string())
        .expect("refused");
    assert!(e.contains("no host names"), "{e}");
}
