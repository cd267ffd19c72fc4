//! rustls configurations for mutual TLS, with the ring provider.
//!
//! Both directions authenticate: the server requires a client certificate chained
//! to the network's CA (no certificate, no handshake), and a KME calling a peer
//! checks, beyond the usual chain and host-name checks, that the server certificate
//! carries the `kme:ID` it expects — a certificate of another KME of the same CA is
//! not good enough. The ring provider is chosen explicitly (not the process default)
//! so that the crate builds no C/assembly toolchain beyond ring's and never depends
//! on global state.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::error::KmsError;
use crate::identity::{Identity, identity_from_cert};
use crate::ids::KmeId;

/// PEM material of one TLS identity: the CA to trust, our chain and our key.
#[derive(Clone)]
pub struct TlsMaterial {
    /// CA certificate(s), PEM.
    pub ca_pem: String,
    /// Our certificate chain, PEM.
    pub cert_pem: String,
    /// Our private key, PEM (zeroized on drop).
    pub key_pem: zeroize::Zeroizing<String>,
}

impl core::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("TlsMaterial { .. }")
    }
}

impl TlsMaterial {
    /// Reads the three PEM files.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, KmsError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| KmsError::Tls(format!("cannot read {}: {e}", p.display())))
        };
        Ok(Self {
            ca_pem: read(ca)?,
            cert_pem: read(cert)?,
            key_pem: zeroize::Zeroizing::new(read(key)?),
        })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, KmsError> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let c = c.map_err(|e| KmsError::Tls(format!("CA PEM: {e}")))?;
            roots
                .add(c)
                .map_err(|e| KmsError::Tls(format!("CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(KmsError::Tls("no CA certificate in CA PEM".into()));
        }
        Ok(Arc::new(roots))
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, KmsError> {
        let chain: Vec<_> = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| KmsError::Tls(format!("certificate PEM: {e}")))?;
        if chain.is_empty() {
            return Err(KmsError::Tls("no certificate in certificate PEM".into()));
        }
        Ok(chain)
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, KmsError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|_| KmsError::Tls("private key PEM".into()))
    }

    /// The identity in our own certificate.
    pub fn own_identity(&self) -> Result<Identity, KmsError> {
        let chain = self.chain()?;
        identity_from_cert(&chain[0])
    }
}

/// The crypto provider used everywhere in this crate.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server configuration: our certificate, client certificates required and
/// verified against the CA; HTTP/1.1 only.
pub fn server_config(m: &TlsMaterial) -> Result<Arc<ServerConfig>, KmsError> {
    let p = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(m.roots()?, p.clone())
        .build()
        .map_err(|e| KmsError::Tls(format!("client verifier: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(|e| KmsError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain()?, m.key()?)
        .map_err(|e| KmsError::Tls(format!("server certificate/key: {e}")))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client configuration presenting our certificate. With `expect_kme`, the server
/// must also prove to be that KME (`kme:ID` URI SAN).
pub fn client_config(m: &TlsMaterial, expect_kme: Option<KmeId>) -> Result<ClientConfig, KmsError> {
    let p = provider();
    let webpki = WebPkiServerVerifier::builder_with_provider(m.roots()?, p.clone())
        .build()
        .map_err(|e| KmsError::Tls(format!("server verifier: {e}")))?;
    let builder = ClientConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(|e| KmsError::Tls(e.to_string()))?;
    let builder = match expect_kme {
        Some(kme) => builder
            .dangerous() // not dangerous: the WebPKI verifier still runs first, we only add a check
            .with_custom_certificate_verifier(Arc::new(PeerKmeVerifier {
                inner: webpki,
                expected: kme,
            })),
        None => builder.with_webpki_verifier(webpki),
    };
    let cfg = builder
        .with_client_auth_cert(m.chain()?, m.key()?)
        .map_err(|e| KmsError::Tls(format!("client certificate/key: {e}")))?;
    // No ALPN here: hyper-rustls sets it from the HTTP versions it enables.
    Ok(cfg)
}

/// WebPKI verification plus "this server is KME `expected`".
#[derive(Debug)]
struct PeerKmeVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected: KmeId,
}

impl ServerCertVerifier for PeerKmeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match identity_from_cert(end_entity) {
            Ok(Identity::Kme(k)) if k == self.expected => Ok(ok),
            _ => Err(rustls::Error::General(format!(
                "server is not KME {}",
                self.expected
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
