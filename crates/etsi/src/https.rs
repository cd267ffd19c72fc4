//! The one HTTPS client transport of qkdnet, shared by the SAE-side ETSI GS QKD
//! 014 client ([`crate::client`]) and the KME-to-KME client (`qkdnet_kms::peer`).
//!
//! Both talk JSON over HTTP/1.1 with mutual TLS to a base URL, and both must treat
//! the other end as untrusted: every call is bounded in time (connect, TLS, request
//! and the whole answer under one timeout) and every answer in size. What a status
//! code *means* differs between the two protocols, so this layer stops at "status
//! and body bytes" and leaves the interpretation to its callers.

use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::ClientConfig;

use crate::error::EtsiError;

/// A pooled HTTPS/1.1 client bound to one base URL.
#[derive(Clone)]
pub struct HttpsClient {
    base: String,
    timeout: Duration,
    max_answer_bytes: usize,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// The call did not produce an answer (connection, TLS, timeout, oversized or
/// unreadable answer). The text is for humans and never holds key material.
#[derive(Debug)]
pub struct TransportError(pub String);

impl HttpsClient {
    /// A client for `base_url` (`https://host:port`, anything else refused) with
    /// the TLS configuration `cfg`. `what` names the other end in error messages.
    pub fn new(
        what: &str,
        base_url: &str,
        cfg: ClientConfig,
        timeout: Duration,
        max_answer_bytes: usize,
    ) -> Result<Self, EtsiError> {
        if !base_url.starts_with("https://") {
            return Err(EtsiError::Config(format!(
                "{what}: URL must start with https:// (got {base_url:?})"
            )));
        }
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(cfg)
            .https_only()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Self {
            base: base_url.trim_end_matches('/').to_owned(),
            timeout,
            max_answer_bytes,
            client,
        })
    }

    /// Sends `body` (JSON, if any) to `path` and returns the status and the whole
    /// answer body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), TransportError> {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        let payload = match body {
            Some(bytes) => {
                b = b.header(hyper::header::CONTENT_TYPE, "application/json");
                Bytes::from(bytes)
            }
            None => Bytes::new(),
        };
        let req = b
            .body(Full::new(payload))
            .map_err(|e| TransportError(format!("request: {e}")))?;
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| TransportError(error_chain(&e)))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), self.max_answer_bytes)
                .collect()
                .await
                .map_err(|e| TransportError(format!("answer: {e}")))?
                .to_bytes();
            Ok::<_, TransportError>((status, body))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| TransportError(format!("timeout after {:?}", self.timeout)))?
    }
}

/// An error and its sources, `outer: inner: …` (hyper's own message alone is
/// often just "client error (Connect)").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
