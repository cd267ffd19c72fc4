//! Issue #18, finding 8's option: the node master key in a PKCS#11 token,
//! against a real SoftHSM2 token (`scripts/softhsm.sh` makes the tokens and
//! prints the variables these tests read; `scripts/test.sh` exports them).
//! Without them the tests are skipped on a developer's machine and fail in CI.
#![allow(missing_docs)]

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{Net, TempDir, key_ids_body, keys_of, kme};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{
    Attribute, AttributeInfo, AttributeType, KeyType, ObjectClass, ObjectHandle,
};
use cryptoki::session::{Session, UserType};
use cryptoki::types::RawAuthPin;
use hyper::StatusCode;
use qkdnet_kms::config::{KmeConfig, launch_with_tls};
use qkdnet_kms::etsi::Limits;
use qkdnet_kms::identity::Identity;
use qkdnet_kms::store::pkcs11::{self, Created, DERIVE_LABEL, Pkcs11KeyConfig};
use qkdnet_kms::store::sqlite::{Durability, SqliteStore};
use qkdnet_kms::store::{MasterKey, StoreError};
use qkdnet_kms::testkeys::seeded_block;
use serde_json::json;

/// The test tokens of `scripts/softhsm.sh`.
struct Hsm {
    module: PathBuf,
    /// Shared by the tests of this file.
    token: String,
    /// Logged in to by the wrong-PIN test only.
    solo: String,
    pin_file: PathBuf,
}

/// The variable that holds the user PIN too (for `pin_env`).
const PIN_VAR: &str = "QKDNET_TEST_PKCS11_PIN";

fn hsm(test: &str) -> Option<Hsm> {
    let how = "hsm_env=$(bash scripts/softhsm.sh) && while IFS= read -r l; do export \"$l\"; \
               done <<<\"$hsm_env\"";
    let var = |v: &str| common::test_env(v, test, "the PKCS#11 token (SoftHSM2)", how);
    var("SOFTHSM2_CONF")?;
    var(PIN_VAR)?;
    Some(Hsm {
        module: var("QKDNET_TEST_PKCS11_MODULE")?.into(),
        token: var("QKDNET_TEST_PKCS11_TOKEN")?,
        solo: var("QKDNET_TEST_PKCS11_TOKEN_SOLO")?,
        pin_file: var("QKDNET_TEST_PKCS11_PIN_FILE")?.into(),
    })
}

static LABELS: AtomicU64 = AtomicU64::new(0);

impl Hsm {
    /// A configuration for a key with a label no other test or run uses.
    fn key(&self, token: &str, tag: &str) -> Pkcs11KeyConfig {
        let n = LABELS.fetch_add(1, Ordering::SeqCst);
        Pkcs11KeyConfig {
            module: self.module.clone(),
            token_label: token.to_owned(),
            key_label: format!("qkdnet-test-{tag}-{}-{n}", std::process::id()),
            pin_file: Some(self.pin_file.clone()),
            pin_env: None,
        }
    }

    /// Runs `f` in a logged-in read-write session on `token`, opened with
    /// cryptoki directly (the way an operator's tool would look at the token).
    fn session<T>(&self, token: &str, f: impl FnOnce(&Session) -> T) -> T {
        let ctx = pkcs11::module(&self.module).expect("module");
        let slot = ctx
            .get_slots_with_token()
            .expect("slots")
            .into_iter()
            .find(|s| {
                ctx.get_token_info(*s)
                    .is_ok_and(|i| i.label().trim_end() == token)
            })
            .expect("the test token");
        let session = ctx.open_rw_session(slot).expect("session");
        let pin = std::fs::read(&self.pin_file).expect("PIN file");
        match session.login_with_raw(UserType::User, &RawAuthPin::new(Box::new(pin))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => panic!("log-in: {e}"),
        }
        f(&session)
    }

    /// The one secret key labelled like `cfg`'s.
    fn handle(session: &Session, cfg: &Pkcs11KeyConfig) -> ObjectHandle {
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(cfg.key_label.as_bytes().to_vec()),
            ])
            .expect("find");
        assert_eq!(found.len(), 1, "one key labelled {}", cfg.key_label);
        found[0]
    }

    /// Imports a generic secret of known `value` under `cfg`'s label.
    fn import(&self, cfg: &Pkcs11KeyConfig, value: &[u8], extractable: bool) {
        self.session(&cfg.token_label, |s| {
            s.create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Value(value.to_vec()),
                Attribute::Label(cfg.key_label.as_bytes().to_vec()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(!extractable),
                Attribute::Extractable(extractable),
                Attribute::Sign(true),
            ])
            .expect("import a key")
        });
    }
}

/// Removes the test's keys from the token at the end (they are test data; the
/// token is reused across runs).
struct Cleanup<'a>(&'a Hsm, Vec<Pkcs11KeyConfig>);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for cfg in &self.1 {
            self.0.session(&cfg.token_label, |s| {
                if let Ok(found) =
                    s.find_objects(&[Attribute::Label(cfg.key_label.as_bytes().to_vec())])
                {
                    for k in found {
                        let _ = s.destroy_object(k);
                    }
                }
            });
        }
    }
}

/// Whether store `path` opens under `master` (the store's check value
/// compares master keys without exposing them).
fn opens_with(path: &std::path::Path, master: &MasterKey) -> Result<(), StoreError> {
    SqliteStore::open_keyed(path, Durability::Full, Some(master)).map(drop)
}

#[test]
fn the_node_master_key_is_made_non_extractable_in_the_token() {
    let Some(hsm) = hsm("the_node_master_key_is_made_non_extractable_in_the_token") else {
        return;
    };
    let cfg = hsm.key(&hsm.token, "create");
    let _cleanup = Cleanup(&hsm, vec![cfg.clone()]);
    assert_eq!(
        pkcs11::create_master_key(&cfg).expect("create"),
        Created::New
    );
    assert_eq!(
        pkcs11::create_master_key(&cfg).expect("again"),
        Created::AlreadyThere,
        "an existing key is never replaced"
    );
    hsm.session(&hsm.token, |s| {
        let key = Hsm::handle(s, &cfg);
        // The value cannot be read: the token answers CKR_ATTRIBUTE_SENSITIVE.
        let info = s
            .get_attribute_info(key, &[AttributeType::Value])
            .expect("attribute info");
        assert!(matches!(info[..], [AttributeInfo::Sensitive]), "{info:?}");
        let values = s.get_attributes(key, &[AttributeType::Value]).expect("get");
        assert!(values.is_empty(), "CKA_VALUE was returned: {values:?}");
        let attrs = s
            .get_attributes(
                key,
                &[
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Token,
                    AttributeType::Private,
                    AttributeType::Sensitive,
                    AttributeType::AlwaysSensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                    AttributeType::Sign,
                    AttributeType::Verify,
                    AttributeType::Encrypt,
                    AttributeType::Decrypt,
                    AttributeType::Wrap,
                    AttributeType::Unwrap,
                    AttributeType::Derive,
                ],
            )
            .expect("attributes");
        let expected = vec![
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::ValueLen(32u64.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::AlwaysSensitive(true),
            Attribute::Extractable(false),
            Attribute::NeverExtractable(true),
            Attribute::Sign(true),
            Attribute::Verify(false),
            Attribute::Encrypt(false),
            Attribute::Decrypt(false),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
        ];
        assert_eq!(attrs, expected);
        // Nor can it be made extractable afterwards.
        assert!(
            s.update_attributes(key, &[Attribute::Extractable(true)])
                .is_err()
        );
    });
    cfg.derive_master_key()
        .expect("the token derives the master key");
}

#[test]
fn the_master_key_is_the_tokens_hmac_of_the_label_the_same_on_every_open() {
    let Some(hsm) = hsm("the_master_key_is_the_tokens_hmac_of_the_label_the_same_on_every_open")
    else {
        return;
    };
    let known = hsm.key(&hsm.token, "known");
    let other = hsm.key(&hsm.token, "other");
    let _cleanup = Cleanup(&hsm, vec![known.clone(), other.clone()]);
    let value = [0x5a_u8; 32];
    hsm.import(&known, &value, false);
    pkcs11::create_master_key(&other).expect("create");

    let dir = TempDir::new("pkcs11-derive");
    let store = dir.0.join("s.sqlite");
    // The first open records the store's key check value.
    let first = known.derive_master_key().expect("derive");
    opens_with(&store, &first).expect("a new store");
    // Derived again (through the PIN variable this time): the same key.
    let by_env = Pkcs11KeyConfig {
        pin_file: None,
        pin_env: Some(PIN_VAR.into()),
        ..known.clone()
    };
    opens_with(&store, &by_env.derive_master_key().expect("derive")).expect("same key");
    // It is exactly HMAC-SHA256(token key, DERIVE_LABEL), as documented.
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &value),
        DERIVE_LABEL,
    );
    let reference = MasterKey::from_bytes(mac.as_ref().try_into().expect("32 bytes"));
    opens_with(&store, &reference).expect("HMAC-SHA256 of the label");
    // Another key of the token is another master key: the store refuses it.
    let e = opens_with(&store, &other.derive_master_key().expect("derive"))
        .expect_err("another key label");
    assert!(e.to_string().contains("different node master key"), "{e}");
}

#[test]
fn an_extractable_or_absent_key_and_a_missing_module_or_token_are_clear_errors() {
    let Some(hsm) =
        hsm("an_extractable_or_absent_key_and_a_missing_module_or_token_are_clear_errors")
    else {
        return;
    };
    let loose = hsm.key(&hsm.token, "extractable");
    let _cleanup = Cleanup(&hsm, vec![loose.clone()]);
    hsm.import(&loose, &[7; 32], true);
    let cases = [
        (loose, "extractable or not sensitive"),
        (
            hsm.key(&hsm.token, "absent"),
            "no such secret key in the token",
        ),
        (
            Pkcs11KeyConfig {
                token_label: "no-such-token".into(),
                ..hsm.key(&hsm.token, "k")
            },
            "no token with this label",
        ),
        (
            Pkcs11KeyConfig {
                module: "/nonexistent/qkdnet/libpkcs11.so".into(),
                ..hsm.key(&hsm.token, "k")
            },
            "cannot use the PKCS#11 module: No such file or directory",
        ),
        (
            Pkcs11KeyConfig {
                pin_file: Some("/nonexistent/qkdnet/pin".into()),
                ..hsm.key(&hsm.token, "k")
            },
            "the PIN file /nonexistent/qkdnet/pin",
        ),
        (
            Pkcs11KeyConfig {
                pin_file: None,
                pin_env: Some("QKDNET_TEST_PKCS11_NO_SUCH_VARIABLE".into()),
                ..hsm.key(&hsm.token, "k")
            },
            "the PIN variable QKDNET_TEST_PKCS11_NO_SUCH_VARIABLE is not set",
        ),
    ];
    for (cfg, expected) in cases {
        let e = cfg.derive_master_key().expect_err(expected).to_string();
        assert!(e.contains(expected), "{e}");
        assert!(
            e.contains(&cfg.key_label) && e.contains(&cfg.token_label),
            "{e}"
        );
    }
}

/// The configuration of KME `name` whose master key is `key` in the token,
/// read from TOML as an operator writes it (a PIN file is copied next to it
/// and named relative to it).
fn toml_config(dir: &std::path::Path, name: &str, key: &Pkcs11KeyConfig) -> KmeConfig {
    let pin = match (&key.pin_file, &key.pin_env) {
        (Some(from), _) => {
            let to = dir.join(format!("{name}.pin"));
            if !to.exists() {
                std::fs::copy(from, &to).expect("copy the PIN file");
            }
            format!("pin_file = \"{name}.pin\"")
        }
        (None, Some(var)) => format!("pin_env = \"{var}\""),
        (None, None) => String::new(),
    };
    let text = format!(
        r#"
kme_id = "{name}"
listen = "127.0.0.1:1"
store = "{name}.sqlite"
[store_key_pkcs11]
module = "{}"
token_label = "{}"
key_label = "{}"
{pin}
[tls]
ca = "unused"
cert = "unused"
key = "unused"
"#,
        key.module.display(),
        key.token_label,
        key.key_label
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write config");
    KmeConfig::from_file(&path).expect("a valid configuration")
}

/// Net's KMEs with their master keys in `token` (keys `a` and `b`, created
/// here), configured through TOML.
async fn net_on_token(hsm: &Hsm, token: &str, blocks: u64) -> (Net, Vec<Pkcs11KeyConfig>, TempDir) {
    let keys = vec![hsm.key(token, "kme-a"), hsm.key(token, "kme-b")];
    for k in &keys {
        assert_eq!(pkcs11::create_master_key(k).expect("create"), Created::New);
    }
    let conf = TempDir::new("pkcs11-conf");
    let from_toml = [
        toml_config(&conf.0, "kme-a", &keys[0]).store_key_pkcs11,
        toml_config(&conf.0, "kme-b", &keys[1]).store_key_pkcs11,
    ];
    assert_eq!(
        from_toml[0].as_ref().and_then(|p| p.pin_file.as_ref()),
        Some(&conf.0.join("kme-a.pin")),
        "the PIN file is relative to the configuration"
    );
    let net = Net::start_configured(blocks, Limits::default(), |cfg| {
        cfg.store_key = None;
        cfg.store_key_pkcs11 = from_toml[usize::from(cfg.kme_id.as_str() == "kme-b")].clone();
    })
    .await;
    (net, keys, conf)
}

/// Units of the seeded blocks of KME `me` found (16 bytes or more) in `raw`.
fn units_visible_in(raw: &[u8], me: &str, peer: &str, blocks: u64) -> usize {
    let windows: std::collections::HashSet<&[u8]> = raw.windows(16).collect();
    (0..blocks)
        .flat_map(|n| {
            seeded_block(common::SEED, "ab", kme(peer), n, common::BLOCK_BYTES)
                .cut(&kme(me))
                .expect("valid block")
        })
        .filter(|u| u.material.windows(16).any(|w| windows.contains(w)))
        .count()
}

fn file_and_wal(path: &std::path::Path) -> Vec<u8> {
    let mut raw = std::fs::read(path).expect("store file");
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    raw.extend(std::fs::read(PathBuf::from(wal)).unwrap_or_default());
    raw
}

async fn enc_keys(net: &Net, number: u32) -> Vec<(String, String)> {
    let (s, v) = net
        .sae_client("alice")
        .post(
            &format!("{}/api/v1/keys/bob/enc_keys", net.url_a()),
            &json!({ "number": number }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    keys_of(&v)
}

async fn dec_keys(net: &Net, keys: &[(String, String)]) -> (StatusCode, serde_json::Value) {
    let ids: Vec<String> = keys.iter().map(|(i, _)| i.clone()).collect();
    net.sae_client("bob")
        .post(
            &format!("{}/api/v1/keys/alice/dec_keys", net.url_b()),
            &key_ids_body(&ids),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kmes_with_their_master_keys_in_the_token_encrypt_restart_and_read_back() {
    let Some(hsm) = hsm("kmes_with_their_master_keys_in_the_token_encrypt_restart_and_read_back")
    else {
        return;
    };
    const BLOCKS: u64 = 4;
    let (mut net, keys, _conf) = net_on_token(&hsm, &hsm.token, BLOCKS).await;
    let _cleanup = Cleanup(&hsm, keys);
    let got = enc_keys(&net, 4).await;
    // The stores hold only ciphertext.
    for (me, peer, file) in [
        ("kme-a", "kme-b", "a.sqlite"),
        ("kme-b", "kme-a", "b.sqlite"),
    ] {
        let raw = file_and_wal(&net.dir.0.join(file));
        assert_eq!(units_visible_in(&raw, me, peer, BLOCKS), 0, "{file}");
    }
    // Both KMEs restart: each derives its master key in the token again, and
    // the keys delivered before and after are the right ones.
    net.restart_a().await;
    net.stop_b().await;
    net.start_b().await;
    let (s, v) = dec_keys(&net, &got).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(keys_of(&v), got);
    let more = enc_keys(&net, 2).await;
    let (s, v) = dec_keys(&net, &more).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(keys_of(&v), more);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_stops_the_kme_before_its_store_is_touched() {
    let Some(hsm) = hsm("a_wrong_pin_stops_the_kme_before_its_store_is_touched") else {
        return;
    };
    // The solo token: no other session of this process is logged in to it, so
    // the token checks the PIN (PKCS#11 log-in is per process and token).
    let (mut net, keys, conf) = net_on_token(&hsm, &hsm.solo, 4).await;
    let _cleanup = Cleanup(&hsm, keys);
    let got = enc_keys(&net, 3).await;
    net.stop_b().await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let store = net.dir.0.join("b.sqlite");
    let before = file_and_wal(&store);

    let right = std::fs::read_to_string(&hsm.pin_file).expect("PIN");
    let wrong_pin = "000000-not-the-pin";
    let wrong = conf.0.join("wrong.pin");
    std::fs::write(&wrong, format!("{wrong_pin}\n")).expect("write");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let mut cfg = net.cfg_b.clone();
    if let Some(p) = cfg.store_key_pkcs11.as_mut() {
        p.pin_file = Some(wrong);
    }
    let Err(e) = launch_with_tls(&cfg, net.tls_b.clone(), None).await else {
        panic!("a KME started with a wrong PIN")
    };
    let (shown, debug) = (e.to_string(), format!("{e:?}"));
    assert!(
        shown.contains("the user PIN is incorrect (CKR_PIN_INCORRECT)"),
        "{shown}"
    );
    for text in [&shown, &debug] {
        assert!(
            !text.contains(wrong_pin) && !text.contains(right.trim()),
            "{text}"
        );
    }
    assert!(file_and_wal(&store) == before, "the store was touched");

    // With the right PIN, nothing is lost.
    net.start_b().await;
    let (s, v) = dec_keys(&net, &got).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(keys_of(&v), got);
}

#[tokio::test]
async fn a_missing_module_stops_the_kme_before_its_store_is_made() {
    // No token needed: the module path itself is wrong.
    let dir = TempDir::new("pkcs11-no-module");
    let key = Pkcs11KeyConfig {
        module: "/nonexistent/qkdnet/libsofthsm2.so".into(),
        token_label: "t".into(),
        key_label: "k".into(),
        pin_file: None,
        pin_env: Some(PIN_VAR.into()),
    };
    let mut cfg = toml_config(&dir.0, "kme-a", &key);
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    let ca = qkdnet_kms::pki::Ca::generate("test CA").expect("CA");
    let tls = ca
        .material(&Identity::Kme(kme("kme-a")), &[])
        .expect("cert");
    let Err(e) = launch_with_tls(&cfg, tls, None).await else {
        panic!("a KME started without its PKCS#11 module")
    };
    let e = e.to_string();
    assert!(
        e.contains("/nonexistent/qkdnet/libsofthsm2.so")
            && e.contains("cannot use the PKCS#11 module: No such file or directory"),
        "{e}"
    );
    assert!(!dir.0.join("kme-a.sqlite").exists(), "a store was created");
}
