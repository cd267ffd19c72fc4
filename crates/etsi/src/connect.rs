//! `connect.json`: how an application finds its KME and its TLS identity.
//!
//! A network launcher starts KMEs, issues one certificate per SAE and writes this
//! file into its state directory; applications (`qkdnet msg …`) read it and pick
//! their SAE by ID, so that nobody has to pass a URL and three PEM paths on every
//! command line. The file is plain JSON:
//!
//! ```json
//! {"saes": [{"id": "alice", "node": "a", "kme": "a", "kme_url": "https://127.0.0.1:8443",
//!            "cert": "pki/sae-alice.pem", "key": "pki/sae-alice.key", "ca": "pki/ca.pem"}]}
//! ```
//!
//! Relative certificate paths are relative to the directory of the JSON file (the
//! state directory can be moved as a whole); [`ConnectFile::load`] resolves them,
//! so every [`SaeEntry`] of a loaded file holds usable paths. Loading checks what
//! can be checked without touching the network (valid, distinct SAE IDs, `https://`
//! URLs), and [`ConnectFile::client`] checks that the certificate really is that
//! SAE's before it builds an [`EtsiClient`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client::EtsiClient;
use crate::error::EtsiError;
use crate::identity::Identity;
use crate::ids::{KmeId, SaeId};
use crate::tls::TlsMaterial;

/// One SAE of the network: where its KME is and where its TLS identity lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaeEntry {
    /// SAE ID (as in its `sae:ID` certificate).
    pub id: String,
    /// Name of the network node whose KME the SAE is attached to.
    pub node: String,
    /// KME ID of that KME: the identity (`kme:ID`) its server certificate must
    /// carry. Files written before this field existed omit it; it then defaults to
    /// `node` (`qkdnet net up` names each node's KME after the node).
    #[serde(default)]
    pub kme: String,
    /// Base URL of that KME (`https://host:port`).
    pub kme_url: String,
    /// SAE certificate (PEM).
    pub cert: PathBuf,
    /// SAE private key (PEM).
    pub key: PathBuf,
    /// CA certificate (PEM) to verify the KME against.
    pub ca: PathBuf,
}

/// The contents of `connect.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectFile {
    /// Every SAE of the network.
    pub saes: Vec<SaeEntry>,
}

impl ConnectFile {
    /// Reads `path`, checks it and resolves relative paths against its directory.
    pub fn load(path: &Path) -> Result<Self, EtsiError> {
        let err = |m: String| EtsiError::Config(format!("{}: {m}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let mut f = Self::parse(&text).map_err(err)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for s in &mut f.saes {
            if s.kme.is_empty() {
                s.kme.clone_from(&s.node);
            }
            for p in [&mut s.cert, &mut s.key, &mut s.ca] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        Ok(f)
    }

    /// Parses and checks the JSON text of a connect file (paths left as written).
    pub fn parse(text: &str) -> Result<Self, String> {
        let f: ConnectFile =
            serde_json::from_str(text).map_err(|e| format!("invalid connect file: {e}"))?;
        f.check()?;
        Ok(f)
    }

    fn check(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for s in &self.saes {
            SaeId::new(&s.id).map_err(|_| format!("{:?} is not a valid SAE ID", s.id))?;
            let kme = if s.kme.is_empty() { &s.node } else { &s.kme };
            KmeId::new(kme).map_err(|_| format!("SAE {}: {kme:?} is not a valid KME ID", s.id))?;
            if !seen.insert(s.id.as_str()) {
                return Err(format!("SAE {} listed twice", s.id));
            }
            if !s.kme_url.starts_with("https://") {
                return Err(format!(
                    "SAE {}: kme_url must start with https:// (got {:?})",
                    s.id, s.kme_url
                ));
            }
        }
        Ok(())
    }

    /// Writes the file (pretty JSON) atomically: a temporary file in the same
    /// directory, renamed over `path`. Paths are written as they are held.
    pub fn save(&self, path: &Path) -> Result<(), EtsiError> {
        let err = |m: String| EtsiError::Config(format!("{}: {m}", path.display()));
        self.check().map_err(err)?;
        let mut text = serde_json::to_string_pretty(self).map_err(|e| err(e.to_string()))?;
        text.push('\n');
        let name = path
            .file_name()
            .ok_or_else(|| err("not a file path".into()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        std::fs::write(&tmp, text).map_err(|e| err(format!("cannot write: {e}")))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(format!("cannot write: {e}"))
        })
    }

    /// The entry of SAE `id`; the error lists the SAEs the file knows.
    pub fn sae(&self, id: &str) -> Result<&SaeEntry, EtsiError> {
        self.saes.iter().find(|s| s.id == id).ok_or_else(|| {
            let known: Vec<&str> = self.saes.iter().map(|s| s.id.as_str()).collect();
            EtsiError::Config(format!(
                "no SAE {id:?} in the connect file (known: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ))
        })
    }

    /// An ETSI client for SAE `sae_id`: loads its certificate, key and CA, checks
    /// that the certificate is that SAE's, and targets its KME, which must prove
    /// to be KME `kme` in the TLS handshake.
    pub fn client(&self, sae_id: &str, timeout: Duration) -> Result<EtsiClient, EtsiError> {
        let s = self.sae(sae_id)?;
        let tls = TlsMaterial::from_files(&s.ca, &s.cert, &s.key)?;
        match tls.own_identity()? {
            Identity::Sae(id) if id.as_str() == s.id => {}
            other => {
                return Err(EtsiError::Config(format!(
                    "certificate {} is not SAE {}'s (it names {other:?})",
                    s.cert.display(),
                    s.id
                )));
            }
        }
        let kme = KmeId::new(if s.kme.is_empty() { &s.node } else { &s.kme })?;
        EtsiClient::new(&s.kme_url, &kme, &tls, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_sae_lists_the_known_ones() {
        let f: ConnectFile = serde_json::from_str(
            r#"{"saes":[{"id":"alice","node":"a","kme_url":"https://127.0.0.1:1",
                "cert":"c","key":"k","ca":"ca"}]}"#,
        )
        .expect("json");
        let e = f.sae("bob").unwrap_err().to_string();
        assert!(e.contains("\"bob\"") && e.contains("alice"), "{e}");
    }

    #[test]
    fn check_refuses_bad_entries() {
        let entry = |id: &str, url: &str| SaeEntry {
            id: id.into(),
            node: "n".into(),
            kme: String::new(),
            kme_url: url.into(),
            cert: "c".into(),
            key: "k".into(),
            ca: "ca".into(),
        };
        let f = |v: Vec<SaeEntry>| ConnectFile { saes: v }.check();
        assert!(f(vec![entry("a", "https://x:1")]).is_ok());
        assert!(f(vec![entry("a b", "https://x:1")]).is_err());
        assert!(f(vec![entry("a", "http://x:1")]).is_err());
        assert!(f(vec![entry("a", "https://x:1"), entry("a", "https://y:1")]).is_err());
    }
}
