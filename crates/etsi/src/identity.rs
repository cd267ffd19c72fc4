//! Who is calling: SAE or KME identity from a verified client certificate.
//!
//! ETSI GS QKD 014 requires the KME to identify the calling SAE from its client
//! certificate, not from anything in the request. qkdnet puts the identity in a
//! subjectAltName URI: `sae:ID` for an SAE, `kme:ID` for a KME (`qkdnet pki issue`
//! writes it). A URI SAN is explicit, cannot be confused with a host name, and
//! keeps the common name free for humans. A certificate must carry exactly one
//! such URI; anything else is no identity at all, and the connection is dropped.
//! The certificate has already been verified against the CA by rustls when this
//! runs; this module only reads it, and never panics on what it reads.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::EtsiError;
use crate::ids::{KmeId, SaeId};

/// URI SAN prefix of an SAE certificate.
pub const SAE_URI_PREFIX: &str = "sae:";
/// URI SAN prefix of a KME certificate.
pub const KME_URI_PREFIX: &str = "kme:";

/// The authenticated identity of a TLS peer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A secure application entity.
    Sae(SaeId),
    /// A key management entity.
    Kme(KmeId),
}

/// Reads the identity from a DER certificate's `sae:`/`kme:` URI SAN.
pub fn identity_from_cert(der: &[u8]) -> Result<Identity, EtsiError> {
    let bad = |m: &str| EtsiError::Tls(format!("client certificate: {m}"));
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|_| bad("not a valid X.509 certificate"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| bad("invalid subjectAltName"))?
        .ok_or_else(|| bad("no subjectAltName"))?;
    let mut found = None;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            let id = if let Some(s) = uri.strip_prefix(SAE_URI_PREFIX) {
                Identity::Sae(SaeId::new(s)?)
            } else if let Some(k) = uri.strip_prefix(KME_URI_PREFIX) {
                Identity::Kme(KmeId::new(k)?)
            } else {
                continue;
            };
            if found.replace(id).is_some() {
                return Err(bad("more than one sae:/kme: URI"));
            }
        }
    }
    found.ok_or_else(|| bad("no sae:ID or kme:ID URI in subjectAltName"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_an_identity() {
        assert!(identity_from_cert(b"").is_err());
        assert!(identity_from_cert(&[0x30, 0x82, 0xff, 0xff]).is_err());
    }
}
