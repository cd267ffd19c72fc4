//! TLS material and the client side of qkdnet's mutual TLS, with the ring provider.
//!
//! Both directions authenticate. Every client of a KME (an SAE, or a KME calling a
//! peer) checks, beyond the usual chain, host-name and usage checks, that the
//! server certificate carries the `kme:ID` it expects: a certificate of another
//! SAE or of another KME of the same CA is not good enough, so an insider cannot
//! pose as a KME and hand out keys of its choosing. Key exchange is the hybrid
//! X25519MLKEM768 group ([`KeyExchange`]). The ring provider is chosen explicitly (not the process default)
//! so that the crate builds no C/assembly toolchain beyond ring's and never depends
//! on global state.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::EtsiError;
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
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, EtsiError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| EtsiError::Tls(format!("cannot read {}: {e}", p.display())))
        };
        Ok(Self {
            ca_pem: read(ca)?,
            cert_pem: read(cert)?,
            key_pem: zeroize::Zeroizing::new(read(key)?),
        })
    }

    /// The CA certificates as a root store.
    pub fn roots(&self) -> Result<Arc<RootCertStore>, EtsiError> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let c = c.map_err(|e| EtsiError::Tls(format!("CA PEM: {e}")))?;
            roots
                .add(c)
                .map_err(|e| EtsiError::Tls(format!("CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(EtsiError::Tls("no CA certificate in CA PEM".into()));
        }
        Ok(Arc::new(roots))
    }

    /// Our certificate chain.
    pub fn chain(&self) -> Result<Vec<CertificateDer<'static>>, EtsiError> {
        let chain: Vec<_> = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| EtsiError::Tls(format!("certificate PEM: {e}")))?;
        if chain.is_empty() {
            return Err(EtsiError::Tls("no certificate in certificate PEM".into()));
        }
        Ok(chain)
    }

    /// Our private key.
    pub fn key(&self) -> Result<PrivateKeyDer<'static>, EtsiError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|_| EtsiError::Tls("private key PEM".into()))
    }

    /// The identity in our own certificate.
    pub fn own_identity(&self) -> Result<Identity, EtsiError> {
        let chain = self.chain()?;
        identity_from_cert(&chain[0])
    }
}

/// Which TLS key exchanges an endpoint accepts.
///
/// Keys cross these connections, so a recorded handshake broken later by a quantum
/// computer would expose them ("harvest now, decrypt later"). Every qkdnet endpoint
/// therefore offers the hybrid X25519MLKEM768 group ([`crate::pq`]) first, and by
/// default nothing else: a peer that cannot do it fails the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyExchange {
    /// X25519MLKEM768 only, TLS 1.3 only (the default).
    #[default]
    HybridOnly,
    /// X25519MLKEM768 preferred; classical X25519 / P-256 (and TLS 1.2) still
    /// accepted, for clients whose TLS library has no ML-KEM yet (OpenSSL < 3.5,
    /// hence Debian 12's curl and Python). Their keys are then only as safe as ECDHE.
    AllowClassical,
}

/// The crypto provider for a key-exchange policy: ring's ciphers and signatures,
/// key exchange per `kx`.
pub fn provider(kx: KeyExchange) -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups = match kx {
        KeyExchange::HybridOnly => vec![crate::pq::X25519MLKEM768],
        KeyExchange::AllowClassical => {
            let mut groups = vec![crate::pq::X25519MLKEM768];
            groups.extend(p.kx_groups.iter().copied());
            groups
        }
    };
    Arc::new(p)
}

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The protocol versions a policy allows (the hybrid group exists in TLS 1.3 only).
pub fn versions(kx: KeyExchange) -> &'static [&'static rustls::SupportedProtocolVersion] {
    match kx {
        KeyExchange::HybridOnly => TLS13_ONLY,
        KeyExchange::AllowClassical => rustls::DEFAULT_VERSIONS,
    }
}

/// Client configuration presenting our certificate. The server must chain to the
/// CA, match the URL's host name, carry the ServerAuth usage *and* prove to be KME
/// `expected` (`kme:ID` URI SAN): any other certificate of the same CA (another
/// SAE's, another node's KME) is refused. Key exchange per `kx`.
pub fn client_config(
    m: &TlsMaterial,
    expected: KmeId,
    kx: KeyExchange,
) -> Result<ClientConfig, EtsiError> {
    let p = provider(kx);
    let webpki = WebPkiServerVerifier::builder_with_provider(m.roots()?, p.clone())
        .build()
        .map_err(|e| EtsiError::Tls(format!("server verifier: {e}")))?;
    let cfg = ClientConfig::builder_with_provider(p)
        .with_protocol_versions(versions(kx))
        .map_err(|e| EtsiError::Tls(e.to_string()))?
        .dangerous() // not dangerous: the WebPKI verifier still runs first, we only add a check
        .with_custom_certificate_verifier(Arc::new(KmeVerifier {
            inner: webpki,
            expected,
        }))
        .with_client_auth_cert(m.chain()?, m.key()?)
        .map_err(|e| EtsiError::Tls(format!("client certificate/key: {e}")))?;
    // No ALPN here: hyper-rustls sets it from the HTTP versions it enables.
    Ok(cfg)
}

/// WebPKI verification plus "this server is KME `expected`".
#[derive(Debug)]
struct KmeVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected: KmeId,
}

impl ServerCertVerifier for KmeVerifier {
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
            Ok(Identity::Kme(k)) => Err(rustls::Error::General(format!(
                "server is KME {k}, not the expected KME {}",
                self.expected
            ))),
            Ok(Identity::Sae(s)) => Err(rustls::Error::General(format!(
                "server presents SAE {s}'s certificate, not KME {}'s",
                self.expected
            ))),
            Err(_) => Err(rustls::Error::General(format!(
                "server certificate names no KME (expected KME {})",
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
