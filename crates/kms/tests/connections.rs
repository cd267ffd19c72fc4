//! Connection limits and timeouts (issue #18, finding 4): clients that trickle a
//! request body, idle on a connection, or open many connections must not hold the
//! KME. Each test reproduces the attack with raw TLS connections of an
//! authenticated SAE and checks the server's reaction. The limits are set small
//! in the KME's configuration so that the tests run quickly; the waits below are
//! safety bounds, not timing assertions.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use qkdnet_kms::identity::Identity;
use qkdnet_kms::tls::KeyExchange;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Long enough for any of the server's reactions on a loaded 2-core machine.
const SAFETY: Duration = Duration::from_secs(30);

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(net: &Net, who: &str, port: u16) -> std::io::Result<Tls> {
    connect_alpn(net, who, port, Vec::new()).await
}

async fn connect_alpn(net: &Net, who: &str, port: u16, alpn: Vec<Vec<u8>>) -> std::io::Result<Tls> {
    let m = net.ca.material(&Identity::Sae(sae(who)), &[]).expect("SAE");
    let cfg = rustls::ClientConfig::builder_with_provider(qkdnet_kms::tls::provider(
        KeyExchange::HybridOnly,
    ))
    .with_protocol_versions(qkdnet_kms::tls::versions(KeyExchange::HybridOnly))
    .expect("versions")
    .with_root_certificates(m.roots().expect("roots"))
    .with_client_auth_cert(m.chain().expect("chain"), m.key().expect("key"))
    .expect("config");
    let mut cfg = cfg;
    cfg.alpn_protocols = alpn;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
}

/// Reads until the server closes (or SAFETY passes); returns what it sent.
async fn read_to_close(s: &mut Tls) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let r = tokio::time::timeout(SAFETY, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    (out, r.is_ok())
}

async fn status_ok(s: &mut Tls, host: &str) -> bool {
    let req = format!("GET /api/v1/keys/bob/status HTTP/1.1\r\nhost: {host}\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(SAFETY, s.read(&mut buf)).await,
        Ok(Ok(n)) if n > 12 && buf.starts_with(b"HTTP/1.1 200")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_answered_400_and_the_connection_closed() {
    let net = Net::start_configured(1, Default::default(), |c| {
        c.connections.body_timeout_ms = 300;
    })
    .await;
    let port = net.cfg_a.listen.port();
    let mut s = connect(&net, "alice", port).await.expect("connect");
    s.write_all(
        b"POST /api/v1/keys/bob/enc_keys HTTP/1.1\r\nhost: localhost\r\n\
          content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"num",
    )
    .await
    .expect("write");
    // …and nothing more: the rest of the body never comes.
    let (answer, closed) = read_to_close(&mut s).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("not received within 300 ms"), "{text}");
    assert!(closed, "the server kept the connection open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed() {
    let net = Net::start_configured(1, Default::default(), |c| {
        c.connections.idle_timeout_ms = 300;
    })
    .await;
    let port = net.cfg_a.listen.port();
    let mut s = connect(&net, "alice", port).await.expect("connect");
    assert!(status_ok(&mut s, "localhost").await, "served while active");
    let (_, closed) = read_to_close(&mut s).await;
    assert!(closed, "an idle connection stayed open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sae_cannot_take_every_connection() {
    let net = Net::start_configured(1, Default::default(), |c| {
        c.connections.max_connections_per_sae = 2;
    })
    .await;
    let port = net.cfg_a.listen.port();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect(&net, "alice", port).await.expect("connect");
        assert!(status_ok(&mut s, "localhost").await);
        held.push(s);
    }
    // alice's third connection is answered 503 and closed, unserved…
    let mut third = connect(&net, "alice", port).await.expect("handshake");
    third
        .write_all(b"GET /api/v1/keys/bob/status HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .expect("write");
    let (answer, closed) = read_to_close(&mut third).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("too many connections"), "{text}");
    assert!(closed);
    // …while another SAE is still served.
    let mut eve = connect(&net, "eve", port).await.expect("connect");
    assert!(
        status_ok(&mut eve, "localhost").await,
        "others still served"
    );
    // A connection closed gives its place back.
    drop(held.pop());
    let mut again = None;
    for _ in 0..100 {
        let mut s = connect(&net, "alice", port).await.expect("connect");
        if status_ok(&mut s, "localhost").await {
            again = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "the freed place was not given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_cap_closes_excess_connections_at_once() {
    let mut net = Net::start_configured(1, Default::default(), |c| {
        c.connections.max_connections = 3;
    })
    .await;
    // B's link-state polls would take places at A: B goes away first.
    net.stop_b().await;
    let port = net.cfg_a.listen.port();
    let mut held = Vec::new();
    for who in ["alice", "eve", "alice"] {
        let mut s = connect(&net, who, port).await.expect("connect");
        assert!(status_ok(&mut s, "localhost").await);
        held.push(s);
    }
    match connect(&net, "eve", port).await {
        Err(_) => {}
        Ok(mut s) => assert!(!status_ok(&mut s, "localhost").await, "over the cap"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_client_naming_it_in_alpn_is_served() {
    let net = Net::start(1).await;
    let port = net.cfg_a.listen.port();
    let mut s = connect_alpn(&net, "alice", port, vec![b"http/1.0".to_vec()])
        .await
        .expect("ALPN http/1.0 is accepted");
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.0"[..]));
    s.write_all(b"GET /api/v1/keys/bob/status HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let (answer, closed) = read_to_close(&mut s).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    assert!(text.contains("stored_key_count"), "{text}");
    assert!(
        closed,
        "HTTP/1.0 without keep-alive: closed after the answer"
    );
}
