//! The server side of qkdnet's mutual TLS (rustls, ring provider).
//!
//! A KME requires a client certificate chained to the network's CA (no
//! certificate, no handshake) with the ClientAuth usage, offers HTTP/1.1 (and 1.0), and
//! negotiates the hybrid X25519MLKEM768 key exchange ([`qkdnet_etsi::pq`]); with
//! [`KeyExchange::AllowClassical`] it also accepts classical-only clients. The
//! TLS material and the client side live in [`qkdnet_etsi::tls`], re-exported here.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;

pub use qkdnet_etsi::tls::{KeyExchange, TlsMaterial, client_config, provider, versions};

use crate::error::KmsError;

/// Server configuration: our certificate, client certificates required and
/// verified against the CA; HTTP/1.1 or 1.0; key exchange per `kx`.
pub fn server_config(m: &TlsMaterial, kx: KeyExchange) -> Result<Arc<ServerConfig>, KmsError> {
    let p = provider(kx);
    let verifier = WebPkiClientVerifier::builder_with_provider(m.roots()?, p.clone())
        .build()
        .map_err(|e| KmsError::Tls(format!("client verifier: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(p)
        .with_protocol_versions(versions(kx))
        .map_err(|e| KmsError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain()?, m.key()?)
        .map_err(|e| KmsError::Tls(format!("server certificate/key: {e}")))?;
    // HTTP/1.0 clients that say so in ALPN are served too (hyper answers them).
    cfg.alpn_protocols = vec![b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    Ok(Arc::new(cfg))
}
