//! A small certificate authority for qkdnet networks (rcgen, ECDSA P-256).
//!
//! Mutual TLS needs a CA, one certificate per KME and one per SAE, with the
//! identity in a `sae:ID` / `kme:ID` URI SAN ([`crate::identity`]) and the addresses
//! the KMEs listen on (by default `localhost`, `127.0.0.1`, `::1`) as DNS/IP SANs so
//! that host-name verification works on loopback test networks. The same functions
//! serve `qkdnet pki …` (files in a directory, private keys written with mode 0600
//! and never overwritten) and the tests (everything in memory). An operator with a
//! real CA only needs to issue certificates with the same SANs.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use zeroize::Zeroizing;

use crate::error::KmsError;
use crate::identity::{Identity, KME_URI_PREFIX, SAE_URI_PREFIX};
use crate::tls::TlsMaterial;

/// File name of the CA certificate in a PKI directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key in a PKI directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// SANs added to every issued certificate unless the caller gives its own.
pub const DEFAULT_SANS: &[&str] = &["localhost", "127.0.0.1", "::1"];

fn pki_err(e: rcgen::Error) -> KmsError {
    KmsError::Tls(format!("certificate generation: {e}"))
}

/// A CA: its certificate (PEM) and signing key.
pub struct Ca {
    cert_pem: String,
    key: KeyPair,
}

/// A freshly issued certificate and its private key.
pub struct Issued {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: Zeroizing<String>,
}

impl Ca {
    /// Generates a new CA named `name`.
    pub fn generate(name: &str) -> Result<Self, KmsError> {
        let key = KeyPair::generate().map_err(pki_err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(pki_err)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PEM (zeroized on drop).
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.key.serialize_pem())
    }

    /// Loads a CA from PEM text.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, KmsError> {
        let key = KeyPair::from_pem(key_pem).map_err(pki_err)?;
        // Check that the certificate parses as a CA we can sign with.
        Issuer::from_ca_cert_pem(cert_pem, &key).map_err(pki_err)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key,
        })
    }

    /// Creates a CA in `dir` (`ca.pem`, `ca.key`). Refuses to overwrite one.
    pub fn init_dir(dir: &Path, name: &str) -> Result<Self, KmsError> {
        std::fs::create_dir_all(dir)?;
        let ca = Self::generate(name)?;
        write_new(
            &dir.join(CA_KEY_FILE),
            ca.key.serialize_pem().as_bytes(),
            true,
        )?;
        write_new(&dir.join(CA_CERT_FILE), ca.cert_pem.as_bytes(), false)?;
        Ok(ca)
    }

    /// Loads the CA of `dir`.
    pub fn load_dir(dir: &Path) -> Result<Self, KmsError> {
        let key = Zeroizing::new(std::fs::read_to_string(dir.join(CA_KEY_FILE))?);
        let cert = std::fs::read_to_string(dir.join(CA_CERT_FILE))?;
        Self::from_pem(&cert, &key)
    }

    /// Issues a certificate for an SAE or a KME.
    ///
    /// Each carries what its role needs and no more. An SAE certificate is a client
    /// certificate only (extended key usage ClientAuth, the `sae:ID` URI and no host
    /// names), so no client of the network accepts it from a server: an
    /// application cannot pose as a KME. A KME certificate has ServerAuth (it
    /// serves SAEs and peers) and ClientAuth (it calls its peers), the `kme:ID` URI
    /// and the host names or addresses it serves on: `sans`, or [`DEFAULT_SANS`]
    /// when empty. `sans` must be empty for an SAE.
    pub fn issue(&self, subject: &Identity, sans: &[String]) -> Result<Issued, KmsError> {
        let uri = match subject {
            Identity::Sae(id) => format!("{SAE_URI_PREFIX}{id}"),
            Identity::Kme(id) => format!("{KME_URI_PREFIX}{id}"),
        };
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, uri.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params
            .subject_alt_names
            .push(SanType::URI(uri.as_str().try_into().map_err(pki_err)?));
        match subject {
            Identity::Sae(id) => {
                if !sans.is_empty() {
                    return Err(KmsError::Config(format!(
                        "SAE {id}: an SAE certificate carries no host names (it never serves)"
                    )));
                }
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            Identity::Kme(_) => {
                params.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
                let defaults: Vec<String> = DEFAULT_SANS.iter().map(|s| (*s).to_owned()).collect();
                for s in if sans.is_empty() { &defaults[..] } else { sans } {
                    params.subject_alt_names.push(match s.parse::<IpAddr>() {
                        Ok(ip) => SanType::IpAddress(ip),
                        Err(_) => SanType::DnsName(s.as_str().try_into().map_err(pki_err)?),
                    });
                }
            }
        }
        let key = KeyPair::generate().map_err(pki_err)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(pki_err)?;
        let cert = params.signed_by(&key, &issuer).map_err(pki_err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }

    /// Issues a certificate and returns it as TLS material trusting this CA.
    pub fn material(&self, subject: &Identity, sans: &[String]) -> Result<TlsMaterial, KmsError> {
        let i = self.issue(subject, sans)?;
        Ok(TlsMaterial {
            ca_pem: self.cert_pem.clone(),
            cert_pem: i.cert_pem,
            key_pem: i.key_pem,
        })
    }

    /// Issues a certificate into `dir` as `sae-ID.pem`/`sae-ID.key` (or `kme-…`).
    /// Refuses to overwrite existing files. Returns (certificate, key) paths.
    pub fn issue_to_dir(
        &self,
        dir: &Path,
        subject: &Identity,
        sans: &[String],
    ) -> Result<(PathBuf, PathBuf), KmsError> {
        let stem = match subject {
            Identity::Sae(id) => format!("sae-{id}"),
            Identity::Kme(id) => format!("kme-{id}"),
        };
        let i = self.issue(subject, sans)?;
        let (cert, key) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        write_new(&key, i.key_pem.as_bytes(), true)?;
        write_new(&cert, i.cert_pem.as_bytes(), false)?;
        Ok((cert, key))
    }
}

/// Writes a file that must not exist yet; private files get mode 0600.
pub(crate) fn write_new(path: &Path, data: &[u8], private: bool) -> Result<(), KmsError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(path).map_err(|e| {
        KmsError::Io(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        ))
    })?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// Creates a secret file of `N` bytes from the operating system's CSPRNG, mode
/// 0600, never overwriting an existing file (key-ID secret, node master key).
pub(crate) fn create_random_secret<const N: usize>(path: &Path) -> Result<(), KmsError> {
    let mut secret = Zeroizing::new([0u8; N]);
    getrandom::fill(&mut secret[..])
        .map_err(|e| KmsError::Config(format!("no randomness: {e}")))?;
    write_new(path, &secret[..], true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::identity_from_cert;
    use crate::ids::SaeId;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn issued_certificate_carries_the_identity() {
        let ca = Ca::generate("test CA").expect("CA");
        let who = Identity::Sae(SaeId::new("alice").expect("valid"));
        let i = ca.issue(&who, &[]).expect("issue");
        let der = CertificateDer::from_pem_slice(i.cert_pem.as_bytes()).expect("PEM");
        assert_eq!(identity_from_cert(&der).expect("identity"), who);
        let ca2 = Ca::from_pem(ca.cert_pem(), &ca.key.serialize_pem()).expect("reload");
        let kme = Identity::Kme(crate::ids::KmeId::new("a").expect("valid"));
        assert!(ca2.issue(&kme, &["example.test".into()]).is_ok());
        assert!(
            ca2.issue(&who, &["example.test".into()]).is_err(),
            "SAEs name no hosts"
        );
    }

    #[test]
    fn usages_follow_the_role() {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let ca = Ca::generate("test CA").expect("CA");
        let eku = |who: &Identity| {
            let i = ca.issue(who, &[]).expect("issue");
            let der = CertificateDer::from_pem_slice(i.cert_pem.as_bytes()).expect("PEM");
            let (_, c) = X509Certificate::from_der(&der).expect("X.509");
            let e = c
                .extended_key_usage()
                .expect("EKU")
                .expect("present")
                .value
                .clone();
            let hosts = c
                .subject_alternative_name()
                .expect("SAN")
                .expect("present")
                .value
                .general_names
                .len()
                - 1;
            (e.server_auth, e.client_auth, hosts)
        };
        let sae = Identity::Sae(SaeId::new("alice").expect("valid"));
        let kme = Identity::Kme(crate::ids::KmeId::new("a").expect("valid"));
        assert_eq!(eku(&sae), (false, true, 0));
        assert_eq!(eku(&kme), (true, true, DEFAULT_SANS.len()));
    }
}
