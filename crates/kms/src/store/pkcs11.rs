//! The node master key in a PKCS#11 token (an HSM), instead of a file.
//!
//! **Design.** The token holds the root: a 256-bit generic secret key
//! (`CKK_GENERIC_SECRET`) created inside it as *sensitive* and *non-extractable*,
//! usable for `CKM_SHA256_HMAC` signing and nothing else
//! ([`create_master_key`]; `qkdnet kme master-key --config FILE`). No PKCS#11
//! call returns its value, so no copy of it exists outside the token, on any
//! disk or in any backup of the node. When the KME starts it logs in and asks
//! the token for one HMAC-SHA256 of the fixed domain-separation label
//! [`DERIVE_LABEL`]; the 32-byte MAC is the [`MasterKey`] from which the stores
//! derive their unit cipher exactly as they do from a key file
//! ([`super::cipher`]). The stores do not know where the master key came from.
//!
//! **What this does and does not protect.** The derived key lives in the
//! KME's memory (zeroized when dropped) while the KME runs: that is the same
//! trade as any HSM-wrapped data-encryption key, and what lets the stores
//! decrypt tens of thousands of units a second without a token round trip per
//! unit. So the token protects key material *at rest*: a copy of the
//! database, of the node's disk or of its backups yields nothing without the
//! token and its PIN, and the node's secret cannot be copied off the machine
//! as a file can. It does not protect against an attacker who controls the
//! running KME process (who can read the derived key, or the units, from its
//! memory). The derivation is deterministic: the same token key gives the same
//! master key on every start, so the store opens again; another key label or
//! another token gives another master key, which the store's check value
//! refuses.
//!
//! **Backup.** A store's backups are useless without the token key. That key
//! cannot be exported, so it is backed up or replicated only by the HSM's own
//! means (cloning to a second HSM of the same make, a backup token or security
//! world, an HA group); if the token and all its replicas are lost, the store's
//! keys are unrecoverable, as with a lost key file.
//!
//! **The PIN** comes from a file (mode 0600, as for the key file; one trailing
//! newline is ignored) or from an environment variable, never from the
//! configuration itself. It is read into zeroized memory, handed to the token
//! once at log-in, and never appears in an error or a log line. A PIN in an
//! environment variable also stays in the process's environment block (which
//! the process's owner can read): prefer the file.
//!
//! **The module** is loaded from the configured absolute path (loading a
//! PKCS#11 module runs its code in the KME: the configuration must be writable
//! by the operator only, as it already must be). It is initialised once per
//! process (`C_Initialize` with OS locking) and kept for the process's life,
//! so several users in one process (a node's KME, tests) share it; one
//! consequence of PKCS#11's per-application log-in is that a second log-in to
//! a token another session of the same process is logged in to succeeds
//! without checking the PIN again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::RawAuthPin;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::cipher::{MASTER_KEY_LEN, MasterKey, read_private_file};
use crate::KmsError;

/// The data the token signs with `CKM_SHA256_HMAC` under the node's key: its
/// MAC is the node master key. Fixed: changing it changes every node's
/// master key.
pub const DERIVE_LABEL: &[u8] = b"qkdnet/kms/store/master-key/pkcs11-hmac-sha256/v1";

/// Length of a PKCS#11 token label (`CK_TOKEN_INFO.label`).
const TOKEN_LABEL_MAX: usize = 32;

/// Where a PKCS#11 token's user PIN comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file (mode 0600), one trailing newline ignored.
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

impl core::fmt::Debug for PinSource {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PinSource::File(p) => write!(f, "pin_file {}", p.display()),
            PinSource::Env(v) => write!(f, "pin_env {v}"),
        }
    }
}

impl PinSource {
    /// Reads the PIN into zeroized memory; errors name the source, never the PIN.
    pub fn read(&self) -> Result<Zeroizing<Vec<u8>>, String> {
        let mut pin = match self {
            PinSource::File(p) => {
                read_private_file(p).map_err(|e| format!("the PIN file {}: {e}", p.display()))?
            }
            PinSource::Env(v) => {
                let value = std::env::var_os(v)
                    .ok_or_else(|| format!("the PIN variable {v} is not set"))?;
                Zeroizing::new(os_bytes(value))
            }
        };
        for end in [b'\n', b'\r'] {
            if pin.last() == Some(&end) {
                pin.pop();
            }
        }
        if pin.is_empty() {
            return Err(format!("the PIN ({self:?}) is empty"));
        }
        Ok(pin)
    }
}

#[cfg(unix)]
fn os_bytes(s: std::ffi::OsString) -> Vec<u8> {
    use std::os::unix::ffi::OsStringExt;
    s.into_vec()
}

#[cfg(not(unix))]
fn os_bytes(s: std::ffi::OsString) -> Vec<u8> {
    s.into_string().unwrap_or_default().into_bytes()
}

/// `[store_key_pkcs11]` of a KME configuration: the node master key is a
/// non-extractable key in a PKCS#11 token (see the [module](self) documentation).
///
/// ```toml
/// [store_key_pkcs11]
/// module = "/usr/lib/softhsm/libsofthsm2.so"   # absolute path of the PKCS#11 module
/// token_label = "qkdnet-kme-a"                  # the token (CKA_LABEL of its slot's token)
/// key_label = "qkdnet-master"                   # the key (CKA_LABEL), made by `qkdnet kme master-key`
/// pin_file = "hsm-user.pin"                     # the user PIN, mode 0600; or:
/// # pin_env = "QKDNET_HSM_PIN"                  # an environment variable holding it
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11KeyConfig {
    /// The PKCS#11 module (shared library), an absolute path.
    pub module: PathBuf,
    /// Label of the token that holds the key.
    pub token_label: String,
    /// Label (`CKA_LABEL`) of the node master key in the token.
    pub key_label: String,
    /// File holding the token's user PIN (mode 0600); relative to the
    /// configuration file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_file: Option<PathBuf>,
    /// Environment variable holding the token's user PIN (instead of `pin_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_env: Option<String>,
}

impl Pkcs11KeyConfig {
    /// Checks the settings without touching the token: an absolute module
    /// path, labels of the right length, exactly one PIN source.
    pub fn check(&self) -> Result<(), KmsError> {
        let err = |m: &str| KmsError::Config(format!("store_key_pkcs11: {m}"));
        if !self.module.is_absolute() {
            return Err(err(
                "module must be an absolute path (the PKCS#11 module is loaded as code)",
            ));
        }
        if self.token_label.is_empty() || self.token_label.len() > TOKEN_LABEL_MAX {
            return Err(err("token_label must have 1 to 32 bytes"));
        }
        if self.key_label.is_empty() {
            return Err(err("key_label must not be empty"));
        }
        self.pin_source().map(|_| ())
    }

    /// Where the PIN comes from (exactly one of `pin_file` and `pin_env`).
    pub fn pin_source(&self) -> Result<PinSource, KmsError> {
        match (&self.pin_file, &self.pin_env) {
            (Some(f), None) => Ok(PinSource::File(f.clone())),
            (None, Some(v)) if !v.is_empty() => Ok(PinSource::Env(v.clone())),
            (None, None) | (None, Some(_)) => Err(KmsError::Config(
                "store_key_pkcs11: set pin_file (a file holding the user PIN) or pin_env \
                 (an environment variable holding it)"
                    .into(),
            )),
            (Some(_), Some(_)) => Err(KmsError::Config(
                "store_key_pkcs11: set pin_file or pin_env, not both".into(),
            )),
        }
    }

    fn error(&self, m: impl core::fmt::Display) -> KmsError {
        KmsError::Config(format!(
            "node master key '{}' in PKCS#11 token '{}' ({}): {m}",
            self.key_label,
            self.token_label,
            self.module.display()
        ))
    }

    /// Opens a logged-in user session on the token (read-write if `rw`).
    fn session(&self, rw: bool) -> Result<Session, KmsError> {
        self.check()?;
        let mut pin = self.pin_source()?.read().map_err(|e| self.error(e))?;
        // The Vec moves into the box as it is (no copy); the box zeroizes it.
        let pin = RawAuthPin::new(Box::new(core::mem::take(&mut *pin)));
        let ctx = module(&self.module).map_err(|e| self.error(e))?;
        let slot = find_token(&ctx, &self.token_label).map_err(|e| self.error(e))?;
        let session = if rw {
            ctx.open_rw_session(slot)
        } else {
            ctx.open_ro_session(slot)
        }
        .map_err(|e| self.error(format!("cannot open a session: {}", describe(&e))))?;
        match session.login_with_raw(UserType::User, &pin) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => Err(self.error(
                "log-in refused: the user PIN is incorrect (CKR_PIN_INCORRECT); \
                 nothing was read or changed",
            )),
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(self.error(
                "log-in refused: the user PIN is locked (CKR_PIN_LOCKED); unlock it with \
                 the token's security officer",
            )),
            Err(e) => Err(self.error(format!("log-in failed: {}", describe(&e)))),
        }
    }

    /// The handles of the secret keys labelled `key_label`.
    fn find_keys(&self, session: &Session) -> Result<Vec<ObjectHandle>, KmsError> {
        session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(self.key_label.as_bytes().to_vec()),
            ])
            .map_err(|e| self.error(format!("cannot search the token: {}", describe(&e))))
    }

    /// Derives the node master key inside the token: HMAC-SHA256 of
    /// [`DERIVE_LABEL`] under the token key (which must be a sensitive,
    /// non-extractable generic secret). The same key gives the same master key
    /// on every call.
    pub fn derive_master_key(&self) -> Result<MasterKey, KmsError> {
        let session = self.session(false)?;
        let key = match self.find_keys(&session)?[..] {
            [k] => k,
            [] => {
                return Err(self.error(
                    "no such secret key in the token; create it with \
                     `qkdnet kme master-key --config FILE`",
                ));
            }
            _ => return Err(self.error("several secret keys carry this label")),
        };
        self.check_key(&session, key)?;
        let mac = Zeroizing::new(
            session
                .sign(&Mechanism::Sha256Hmac, key, DERIVE_LABEL)
                .map_err(|e| {
                    self.error(format!("CKM_SHA256_HMAC in the token: {}", describe(&e)))
                })?,
        );
        MasterKey::from_slice(&mac).ok_or_else(|| {
            self.error(format!(
                "the token's HMAC-SHA256 has {} bytes, not {MASTER_KEY_LEN}",
                mac.len()
            ))
        })
    }

    /// Refuses a key that is not a sensitive, non-extractable generic secret:
    /// the node master key must never leave the token.
    fn check_key(&self, session: &Session, key: ObjectHandle) -> Result<(), KmsError> {
        let attrs = session
            .get_attributes(
                key,
                &[
                    AttributeType::KeyType,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                ],
            )
            .map_err(|e| {
                self.error(format!(
                    "cannot read the key's attributes: {}",
                    describe(&e)
                ))
            })?;
        let (mut generic, mut sensitive, mut extractable) = (false, false, true);
        for a in attrs {
            match a {
                Attribute::KeyType(t) => generic = t == KeyType::GENERIC_SECRET,
                Attribute::Sensitive(s) => sensitive = s,
                Attribute::Extractable(x) => extractable = x,
                _ => {}
            }
        }
        if !generic {
            return Err(self.error("the key is not a generic secret (CKK_GENERIC_SECRET)"));
        }
        if !sensitive || extractable {
            return Err(self.error(
                "the key is extractable or not sensitive: its value could leave the token; \
                 create a non-extractable key with `qkdnet kme master-key`",
            ));
        }
        Ok(())
    }
}

/// What [`create_master_key`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// A new key was generated in the token.
    New,
    /// A key with that label was already there; nothing was changed.
    AlreadyThere,
}

/// Generates the node master key in the token: 256 bits from the token's own
/// generator (`CKM_GENERIC_SECRET_KEY_GEN`), a persistent private object that
/// is sensitive, non-extractable and usable only to sign (HMAC). Never
/// replaces a key that carries the label already.
pub fn create_master_key(cfg: &Pkcs11KeyConfig) -> Result<Created, KmsError> {
    let session = cfg.session(true)?;
    if !cfg.find_keys(&session)?.is_empty() {
        return Ok(Created::AlreadyThere);
    }
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen((MASTER_KEY_LEN as u64).into()),
        Attribute::Label(cfg.key_label.as_bytes().to_vec()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Verify(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ];
    session
        .generate_key(&Mechanism::GenericSecretKeyGen, &template)
        .map_err(|e| cfg.error(format!("cannot generate the key: {}", describe(&e))))?;
    Ok(Created::New)
}

/// The process-wide context of the PKCS#11 module at `path`: loaded and
/// initialised on first use, then kept (never finalised) so that every user in
/// the process shares it. Tests use it to inspect a token.
pub fn module(path: &Path) -> Result<Pkcs11, String> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(ctx) = modules.get(path) {
        return Ok(ctx.clone());
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err("the PKCS#11 module path is not a file".into()),
        Err(e) => return Err(format!("cannot use the PKCS#11 module: {e}")),
    }
    let ctx = Pkcs11::new(path)
        .map_err(|e| format!("cannot load the PKCS#11 module: {}", describe(&e)))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(format!(
                "cannot initialise the PKCS#11 module: {}",
                describe(&e)
            ));
        }
    }
    modules.insert(path.to_owned(), ctx.clone());
    Ok(ctx)
}

/// The slot whose token carries `label` (exactly one).
fn find_token(ctx: &Pkcs11, label: &str) -> Result<cryptoki::slot::Slot, String> {
    let slots = ctx
        .get_slots_with_initialized_token()
        .map_err(|e| format!("cannot list the module's tokens: {}", describe(&e)))?;
    let mut found = Vec::new();
    let mut labels = Vec::new();
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| format!("cannot read a token's information: {}", describe(&e)))?;
        let l = info.label().trim_end_matches([' ', '\0']);
        if l == label {
            found.push((slot, info.user_pin_locked()));
        }
        labels.push(format!("'{l}'"));
    }
    match found[..] {
        [(slot, false)] => Ok(slot),
        [(_, true)] => Err("the token's user PIN is locked".into()),
        [] if labels.is_empty() => Err("the module has no initialised token".into()),
        [] => Err(format!(
            "no token with this label (the module has {})",
            labels.join(", ")
        )),
        _ => Err("several tokens carry this label".into()),
    }
}

/// A PKCS#11 error in a sentence: the `CKR_…` name where there is one.
fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("C_{function:?} returned {rv:?}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Pkcs11KeyConfig {
        Pkcs11KeyConfig {
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token_label: "t".into(),
            key_label: "k".into(),
            pin_file: Some("pin".into()),
            pin_env: None,
        }
    }

    #[test]
    fn settings_are_checked_before_any_module_is_loaded() {
        assert!(cfg().check().is_ok());
        let bad = [
            Pkcs11KeyConfig {
                module: "libsofthsm2.so".into(),
                ..cfg()
            },
            Pkcs11KeyConfig {
                token_label: String::new(),
                ..cfg()
            },
            Pkcs11KeyConfig {
                token_label: "x".repeat(33),
                ..cfg()
            },
            Pkcs11KeyConfig {
                key_label: String::new(),
                ..cfg()
            },
            Pkcs11KeyConfig {
                pin_file: None,
                ..cfg()
            },
            Pkcs11KeyConfig {
                pin_env: Some("V".into()),
                ..cfg()
            },
            Pkcs11KeyConfig {
                pin_file: None,
                pin_env: Some(String::new()),
                ..cfg()
            },
        ];
        for c in bad {
            assert!(c.check().is_err(), "accepted: {c:?}");
        }
    }

    #[test]
    fn a_pin_file_loses_its_newline_and_is_refused_when_others_may_read_it() {
        let dir = std::env::temp_dir().join(format!("qkdnet-kms-pin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("pin");
        let _ = std::fs::remove_file(&f);
        crate::pki::write_new(&f, b"1234\r\n", true).expect("write");
        let pin = PinSource::File(f.clone()).read().expect("read");
        assert_eq!(pin.as_slice(), b"1234");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).expect("chmod");
            let e = PinSource::File(f.clone()).read().expect_err("mode 0640");
            assert!(e.contains("group or others"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
