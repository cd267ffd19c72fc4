//! Issue #20: the medium in a PKCS#11 token, against a real SoftHSM2 token.
//! `scripts/softhsm.sh` makes the tokens and prints the variables these tests
//! read (`scripts/test.sh` exports them); without them the tests are skipped
//! on a developer's machine and fail in CI.
//!
//! Keys come out once, in order, equal to what was charged; nothing on the
//! token holds a key once it is taken; a wrong PIN is refused and consumes
//! nothing; what a crash leaves is repaired on open; a process killed
//! (SIGKILL) while taking or charging leaves a medium that opens and never
//! hands a key out twice. Keys are derived from their index (`key_for`), so
//! every key that comes out is checked against the one charged under its
//! number. Every test makes its own medium (a random ID) on the media token
//! and destroys it at the end.
//!
//! The tests run one at a time. SoftHSM2's file store does not keep two
//! processes that use one token at once from reading each other's
//! half-written files (its `fcntl` locks lapse whenever a thread of the
//! process closes any descriptor of the file), and a process that reads one
//! takes the object, or the whole token, for invalid until it changes again.
//! A crash child writing while another test of the parent reads would fail
//! for that reason, not for the medium's.
#![allow(missing_docs)]

mod common;

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use common::{charge, indices, key_for, keys, record};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::RawAuthPin;
use qkdnet_crypto::secret::SecretBytes;
use qkdnet_media::token::{APPLICATION, Label, Role};
use qkdnet_media::{MediaError, Medium, MediumSpec, Pkcs11Medium};
use uuid::Uuid;

/// The test tokens of `scripts/softhsm.sh`.
struct Hsm {
    module: PathBuf,
    /// Holds the media of every test but the one below.
    token: String,
    /// Logged in to by the wrong-PIN test only, and only through the crate:
    /// PKCS#11 log-in is per process, and a PIN is only checked (by the token,
    /// or by the crate for a log-in it made) when no other code of the
    /// process is logged in to the token.
    solo: String,
    pin: String,
}

const HOW: &str = "hsm_env=$(bash scripts/softhsm.sh) && while IFS= read -r l; do export \"$l\"; done <<<\"$hsm_env\"";

/// A variable of the test environment; `None` (skip) on a developer's machine,
/// a failure in CI.
fn test_env(var: &str, test: &str) -> Option<String> {
    use std::io::Write;
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Some(v),
        _ => {
            let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "false" | "0"));
            assert!(
                !ci,
                "{test}: {var} is not set and CI must not skip the tests of the PKCS#11 medium \
                 (SoftHSM2): run `{HOW}` first"
            );
            let _ = writeln!(
                std::io::stderr(),
                "{test}: skipped: {var} not set (run `{HOW}`)"
            );
            None
        }
    }
}

/// The test environment, and the turn of the calling test (see the top of
/// the file).
fn hsm(test: &str) -> Option<(Hsm, MutexGuard<'static, ()>)> {
    static TURN: Mutex<()> = Mutex::new(());
    let var = |v: &str| test_env(v, test);
    var("SOFTHSM2_CONF")?;
    let turn = TURN.lock().unwrap_or_else(PoisonError::into_inner);
    let hsm = Hsm {
        module: var("QKDNET_TEST_PKCS11_MODULE")?.into(),
        token: var("QKDNET_TEST_PKCS11_TOKEN_MEDIA")?,
        solo: var("QKDNET_TEST_PKCS11_TOKEN_SOLO")?,
        pin: var("QKDNET_TEST_PKCS11_PIN")?,
    };
    Some((hsm, turn))
}

impl Hsm {
    fn pin(&self) -> SecretBytes {
        SecretBytes::from_slice(self.pin.as_bytes())
    }

    fn create(&self, capacity: u64, charges: u32) -> (Cleanup<'_>, Pkcs11Medium) {
        self.create_on(&self.token, capacity, charges)
    }

    fn create_on(&self, token: &str, capacity: u64, charges: u32) -> (Cleanup<'_>, Pkcs11Medium) {
        let spec = MediumSpec {
            log_capacity: charges,
            ..MediumSpec::new("sip:alice@qkd.example", capacity)
        };
        let cleanup = Cleanup {
            hsm: self,
            token: token.to_owned(),
            id: spec.id,
        };
        let m = Pkcs11Medium::create(&self.module, token, &self.pin(), &spec).expect("create");
        (cleanup, m)
    }

    fn open(&self, id: Uuid) -> Pkcs11Medium {
        Pkcs11Medium::open(&self.module, &self.token, &self.pin(), Some(id)).expect("open")
    }

    /// Runs `f` in a logged-in session on the media token, opened with
    /// cryptoki directly (the way an operator's tool looks at the token).
    fn inspect<T>(&self, f: impl FnOnce(&Session) -> T) -> T {
        static CTX: OnceLock<Pkcs11> = OnceLock::new();
        let ctx = CTX.get_or_init(|| {
            let ctx = Pkcs11::new(&self.module).expect("module");
            match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
                Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
                Err(e) => panic!("initialise: {e}"),
            }
            ctx
        });
        let slot = ctx
            .get_slots_with_token()
            .expect("slots")
            .into_iter()
            .find(|s| {
                ctx.get_token_info(*s)
                    .is_ok_and(|i| i.label().trim_end() == self.token)
            })
            .expect("the media token");
        let session = ctx.open_rw_session(slot).expect("session");
        let pin = RawAuthPin::new(Box::new(self.pin.as_bytes().to_vec()));
        match session.login_with_raw(UserType::User, &pin) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => panic!("log-in: {e}"),
        }
        f(&session)
    }
}

/// Destroys the test's medium at the end (declared before the medium, so
/// that the medium is closed first).
struct Cleanup<'a> {
    hsm: &'a Hsm,
    token: String,
    id: Uuid,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let h = self.hsm;
        if let Ok(m) = Pkcs11Medium::open(&h.module, &self.token, &h.pin(), Some(self.id)) {
            let _ = m.destroy();
        }
    }
}

/// Takes keys until the medium is exhausted; every key must be there.
fn take_all(m: &mut Pkcs11Medium) -> Vec<u64> {
    indices(&common::take_all(m))
}

/// The medium's objects on the token: handle, label, value.
fn objects_of(s: &Session, id: Uuid) -> Vec<(ObjectHandle, Label, Vec<u8>)> {
    let found = s
        .find_objects(&[Attribute::Application(APPLICATION.to_vec())])
        .expect("find");
    let mut out = Vec::new();
    for h in found {
        // Another test may destroy its objects between the search and the read.
        let Ok(attrs) = s.get_attributes(h, &[AttributeType::Label, AttributeType::Value]) else {
            continue;
        };
        let (mut label, mut value) = (None, Vec::new());
        for a in attrs {
            match a {
                Attribute::Label(l) => label = Some(Label::decode(&l).expect("our label")),
                Attribute::Value(v) => value = v,
                _ => {}
            }
        }
        let label = label.expect("a label");
        if label.id == id {
            out.push((h, label, value));
        }
    }
    out
}

/// Whether any object of the token holds the bytes of key `index`.
fn on_token(s: &Session, id: Uuid, index: u64) -> bool {
    let key = key_for(index);
    objects_of(s, id)
        .iter()
        .any(|(_, _, v)| v.windows(32).any(|w| w == key.expose_secret()))
}

#[test]
fn charged_keys_come_out_once_in_order_and_survive_reopening() {
    let Some((hsm, _turn)) = hsm("charged_keys_come_out_once_in_order_and_survive_reopening")
    else {
        return;
    };
    let (_cleanup, m) = hsm.create(100, 8);
    let id = m.id();
    let mut m = common::keys_come_out_once_in_order_and_survive_reopening(m, || hsm.open(id));
    // The charges whose keys are all used are forgotten.
    assert!(m.status().expect("status").charges.is_empty());
    // Recharged after it ran dry, it carries on numbering.
    charge(&mut m, 2);
    assert_eq!(take_all(&mut m), vec![9, 10]);
}

#[test]
fn capacity_empty_charges_and_the_charge_limit_are_refused() {
    let Some((hsm, _turn)) = hsm("capacity_empty_charges_and_the_charge_limit_are_refused") else {
        return;
    };
    let (_cleanup, mut m) = hsm.create(4, 2);
    common::a_charge_too_large_or_empty_is_refused(&mut m);
    charge(&mut m, 1);
    // Two charges with unused keys: a third must wait until one is used up.
    assert_eq!(m.take_next().expect("key").0, 0);
    let e = m
        .charge(&keys(4, 1), record(4))
        .expect_err("two live charges");
    assert!(matches!(e, MediaError::ChargeLogFull { records: 2 }), "{e}");
    assert_eq!(m.take_next().expect("key").0, 1);
    assert_eq!(m.take_next().expect("key").0, 2);
    charge(&mut m, 3);
    let st = m.status().expect("status");
    assert_eq!((st.remaining, st.free), (4, 0));
    let firsts: Vec<u64> = st.charges.iter().map(|c| c.first).collect();
    assert_eq!(firsts, vec![3, 4]);
    // Refused charges left nothing behind.
    let id = m.id();
    drop(m);
    let mut m = hsm.open(id);
    assert_eq!(take_all(&mut m), vec![3, 4, 5, 6]);
}

#[test]
fn a_wrong_pin_is_refused_and_consumes_nothing() {
    let Some((hsm, _turn)) = hsm("a_wrong_pin_is_refused_and_consumes_nothing") else {
        return;
    };
    let wrong = SecretBytes::from_slice(b"000000-not-the-pin");
    let open = |pin: &SecretBytes, id| Pkcs11Medium::open(&hsm.module, &hsm.solo, pin, id);
    // Nothing of this process is logged in to the solo token yet: the token
    // checks the PIN.
    let e = open(&wrong, None).expect_err("wrong PIN");
    assert!(matches!(e, MediaError::PinIncorrect), "{e}");
    let (_cleanup, mut m) = hsm.create_on(&hsm.solo, 10, 2);
    let id = m.id();
    charge(&mut m, 3);
    // Logged in now (this session): the crate checks the PIN against the one
    // the token accepted.
    for pin in [&wrong, &SecretBytes::from_slice(b"x")] {
        let e = open(pin, Some(id)).expect_err("wrong PIN while logged in");
        assert!(matches!(e, MediaError::PinIncorrect), "{e}");
        let text = format!("{e} {e:?}");
        assert!(
            !text.contains("not-the-pin") && !text.contains(&hsm.pin),
            "{text}"
        );
    }
    let e = open(&SecretBytes::from_slice(b""), Some(id)).expect_err("empty PIN");
    assert!(matches!(e, MediaError::EmptyPin), "{e}");
    drop(m);
    let e = open(&wrong, Some(id)).expect_err("wrong PIN");
    assert!(matches!(e, MediaError::PinIncorrect), "{e}");
    let mut m = open(&hsm.pin(), Some(id)).expect("the right PIN");
    assert_eq!(m.status().expect("status").used, 0, "nothing was consumed");
    assert_eq!(take_all(&mut m), vec![0, 1, 2]);

    // A missing module or token is a clear error too.
    let e = Pkcs11Medium::open(
        std::path::Path::new("/nonexistent/qkdnet/libpkcs11.so"),
        &hsm.solo,
        &hsm.pin(),
        None,
    )
    .expect_err("no module");
    assert!(matches!(e, MediaError::Pkcs11Module { .. }), "{e}");
    let e =
        Pkcs11Medium::open(&hsm.module, "no-such-token", &hsm.pin(), None).expect_err("no token");
    assert!(
        matches!(e, MediaError::TokenUnavailable { .. }) && e.to_string().contains("no token"),
        "{e}"
    );
}

#[test]
fn a_medium_is_held_by_one_handle_and_found_by_its_id() {
    let Some((hsm, _turn)) = hsm("a_medium_is_held_by_one_handle_and_found_by_its_id") else {
        return;
    };
    let (_cleanup, m) = hsm.create(4, 2);
    let id = m.id();
    let e = Pkcs11Medium::open(&hsm.module, &hsm.token, &hsm.pin(), Some(id)).expect_err("held");
    assert!(matches!(e, MediaError::Busy), "{e}");
    drop(m);
    let spec = MediumSpec {
        id,
        ..MediumSpec::new("sip:bob@qkd.example", 4)
    };
    let e = Pkcs11Medium::create(&hsm.module, &hsm.token, &hsm.pin(), &spec).expect_err("exists");
    assert!(matches!(e, MediaError::MediumExists(x) if x == id), "{e}");
    assert_eq!(hsm.open(id).owner(), "sip:alice@qkd.example");
    let unknown = Uuid::new_v4();
    let e = Pkcs11Medium::open(&hsm.module, &hsm.token, &hsm.pin(), Some(unknown))
        .expect_err("unknown");
    assert!(
        matches!(e, MediaError::NoMedium { id: Some(x) } if x == unknown),
        "{e}"
    );
    // The media token holds the other tests' media too: no ID, no choice.
    let (_c2, other) = hsm.create(4, 2);
    let e = Pkcs11Medium::open(&hsm.module, &hsm.token, &hsm.pin(), None).expect_err("several");
    match e {
        MediaError::SeveralMedia { ids } => assert!(ids.contains(&id) && ids.contains(&other.id())),
        e => panic!("{e}"),
    }
}

#[test]
fn the_token_holds_private_data_objects_and_no_used_key() {
    let Some((hsm, _turn)) = hsm("the_token_holds_private_data_objects_and_no_used_key") else {
        return;
    };
    let (_cleanup, mut m) = hsm.create(2000, 8);
    let id = m.id();
    charge(&mut m, 1030);
    charge(&mut m, 5);
    hsm.inspect(|s| {
        let objs = objects_of(s, id);
        let mut labels: Vec<String> = objs
            .iter()
            .map(|(_, l, _)| String::from_utf8(l.encode()).expect("utf-8"))
            .collect();
        labels.sort();
        let id = id.hyphenated();
        assert_eq!(
            labels,
            vec![
                format!("{id} charge epoch=1 first=0 count=1030 at=1750000000 by=charger-sae-1"),
                format!("{id} charge epoch=2 first=1030 count=5 at=1750001030 by=charger-sae-1"),
                format!("{id} keys epoch=1 first=0 count=1024"),
                format!("{id} keys epoch=1 first=1024 count=6"),
                format!("{id} keys epoch=2 first=1030 count=5"),
                format!("{id} medium capacity=2000 charges=8 owner=sip:alice@qkd.example"),
                format!("{id} state seq=2 next=0 end=1030 epoch=1"),
                format!("{id} state seq=3 next=0 end=1035 epoch=2"),
            ]
        );
        for (h, label, value) in &objs {
            let attrs = s
                .get_attributes(
                    *h,
                    &[
                        AttributeType::Class,
                        AttributeType::Token,
                        AttributeType::Private,
                        AttributeType::Modifiable,
                    ],
                )
                .expect("attributes");
            let state = matches!(label.role, Role::State(_));
            assert_eq!(
                attrs,
                vec![
                    Attribute::Class(ObjectClass::DATA),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Modifiable(state),
                ]
            );
            match label.role {
                Role::Keys(g) => {
                    let want: Vec<u8> = keys(g.first, g.count)
                        .iter()
                        .flat_map(|k| *k.expose_secret())
                        .collect();
                    assert!(*value == want, "group {g:?} holds its keys in order");
                }
                _ => assert!(value.is_empty()),
            }
        }
    });
    for i in 0..3 {
        assert_eq!(m.take_next().expect("key").0, i);
    }
    hsm.inspect(|s| {
        for i in 0..3 {
            assert!(!on_token(s, id, i), "used key {i} is still on the token");
        }
        assert!(on_token(s, id, 3) && on_token(s, id, 1034));
        let firsts: Vec<u64> = objects_of(s, id)
            .iter()
            .filter_map(|(_, l, _)| match l.role {
                Role::Keys(g) => Some(g.first),
                _ => None,
            })
            .collect();
        assert_eq!(firsts.iter().min(), Some(&3));
    });
}

#[test]
fn status_and_debug_never_show_key_bytes() {
    let Some((hsm, _turn)) = hsm("status_and_debug_never_show_key_bytes") else {
        return;
    };
    let (_cleanup, m) = hsm.create(8, 2);
    common::status_and_debug_never_show_key_bytes(
        m,
        |m| {
            Pkcs11Medium::open(&hsm.module, &hsm.token, &hsm.pin(), Some(m.id())).expect_err("busy")
        },
        &[hsm.pin.as_str()],
    );
}

/// Builds, with cryptoki alone, what crashes leave behind, and opens the
/// medium: every leftover is destroyed or repaired before a key comes out.
#[test]
fn what_crashes_leave_is_repaired_on_open() {
    let Some((hsm, _turn)) = hsm("what_crashes_leave_is_repaired_on_open") else {
        return;
    };
    let (_cleanup, mut m) = hsm.create(100, 8);
    let id = m.id();
    charge(&mut m, 10); // epoch 1, keys 0..10
    assert_eq!(m.take_next().expect("key").0, 0);
    assert_eq!(m.take_next().expect("key").0, 1);
    drop(m);
    hsm.inspect(|s| {
        let objs = objects_of(s, id);
        let create = |role: Role, value: Vec<u8>| {
            let mut t = vec![
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Application(APPLICATION.to_vec()),
                Attribute::Label(Label { id, role }.encode()),
            ];
            if !value.is_empty() {
                t.push(Attribute::Value(value));
            }
            s.create_object(&t).expect("create");
        };
        let bytes = |first, count| -> Vec<u8> {
            keys(first, count)
                .iter()
                .flat_map(|k| *k.expose_secret())
                .collect()
        };
        let label = |text: String| Label::decode(text.as_bytes()).expect("label").role;
        let id_text = id.hyphenated();
        // A shrink cut short: the old group is still there next to its copy.
        create(
            label(format!("{id_text} keys epoch=1 first=0 count=10")),
            bytes(0, 10),
        );
        // A charge that never committed (epoch 2).
        create(
            label(format!("{id_text} keys epoch=2 first=10 count=5")),
            bytes(10, 5),
        );
        create(
            label(format!(
                "{id_text} charge epoch=2 first=10 count=5 at=1 by=crashed"
            )),
            Vec::new(),
        );
        // The counter moved past key 2 but its erasure never happened (its
        // group still starts at 2); and the other state object was torn.
        let mut states: Vec<_> = objs
            .iter()
            .filter_map(|(h, l, _)| match l.role {
                Role::State(st) => Some((*h, st)),
                _ => None,
            })
            .collect();
        states.sort_by_key(|(_, st)| st.seq);
        let (older, _) = states[0];
        let (newest, mut st) = states[1];
        st.next = 3;
        s.update_attributes(
            newest,
            &[Attribute::Label(
                Label {
                    id,
                    role: Role::State(st),
                }
                .encode(),
            )],
        )
        .expect("advance the counter");
        s.destroy_object(older).expect("tear");
    });

    let mut m = hsm.open(id);
    let st = m.status().expect("status");
    assert_eq!((st.charged, st.used, st.charges.len()), (10, 3, 1));
    hsm.inspect(|s| {
        for i in 0..3 {
            assert!(!on_token(s, id, i), "used key {i} is still on the token");
        }
        let mut roles: Vec<String> = objects_of(s, id)
            .iter()
            .map(|(_, l, _)| match &l.role {
                Role::Header(_) => "medium".to_owned(),
                Role::State(_) => "state".to_owned(),
                Role::Charge(c) => format!("charge {}", c.epoch),
                Role::Keys(g) => format!("keys {}..{}", g.first, g.end()),
            })
            .collect();
        roles.sort();
        assert_eq!(
            roles,
            ["charge 1", "keys 3..10", "medium", "state", "state"]
        );
    });
    assert_eq!(take_all(&mut m), (3..10).collect::<Vec<_>>());
    // The next charge reuses epoch 2 and indices 10.. without confusion.
    charge(&mut m, 2);
    assert_eq!(take_all(&mut m), vec![10, 11]);
}

#[test]
fn a_key_missing_from_the_token_is_reported_and_passed_over() {
    let Some((hsm, _turn)) = hsm("a_key_missing_from_the_token_is_reported_and_passed_over") else {
        return;
    };
    let (_cleanup, mut m) = hsm.create(100, 8);
    let id = m.id();
    charge(&mut m, 3);
    charge(&mut m, 2);
    drop(m);
    // The first charge's keys are lost (their group destroyed from outside).
    hsm.inspect(|s| {
        for (h, l, _) in objects_of(s, id) {
            if matches!(l.role, Role::Keys(g) if g.first == 0) {
                s.destroy_object(h).expect("destroy");
            }
        }
    });
    let mut m = hsm.open(id);
    for i in 0..3 {
        let e = m.take_next().expect_err("missing");
        assert!(
            matches!(e, MediaError::KeyMissing { index } if index == i),
            "{e}"
        );
    }
    assert_eq!(take_all(&mut m), vec![3, 4]);
}

// ---- SIGKILL ----

/// Child side of the SIGKILL tests (does nothing unless the parent set
/// `QKDNET_MEDIA_CRASH_CHILD` to `take:<id>` or `charge:<id>`): see
/// `common::crash_child_loop`.
#[test]
fn crash_child() {
    let Some((mode, id)) = common::crash_child_spec() else {
        return;
    };
    let (hsm, _turn) = hsm("crash_child").expect("the parent's environment");
    common::crash_child_loop(&mode, &mut hsm.open(id.parse().expect("medium ID")));
}

/// The key groups of medium `id` on the token.
fn groups_on_token(hsm: &Hsm, id: Uuid) -> Vec<qkdnet_media::token::Group> {
    hsm.inspect(|s| {
        objects_of(s, id)
            .into_iter()
            .filter_map(|(_, l, _)| match l.role {
                Role::Keys(g) => Some(g),
                _ => None,
            })
            .collect()
    })
}

/// A take costs a few milliseconds on SoftHSM2 (a label write, an object
/// created, one destroyed) and a charge of 20 keys about as much: the delays
/// spread the kills over all of it.
fn rounds(kill_after: &[usize], delays_us: &[u64]) -> Vec<(usize, Duration)> {
    kill_after
        .iter()
        .zip(delays_us)
        .map(|(&k, &d)| (k, Duration::from_micros(d)))
        .collect()
}

#[test]
fn sigkill_while_taking_never_hands_a_key_out_twice() {
    let Some((hsm, _turn)) = hsm("sigkill_while_taking_never_hands_a_key_out_twice") else {
        return;
    };
    let (_cleanup, mut m) = hsm.create(2000, 4);
    let id = m.id();
    charge(&mut m, 1500);
    drop(m);
    let rounds = rounds(
        &[1, 7, 40, 3, 90, 25, 2, 13],
        &[0, 1300, 2900, 4700, 400, 6100, 3600, 8300],
    );
    common::sigkill_while_taking(
        &id.to_string(),
        || hsm.open(id),
        &rounds,
        |next| {
            // Opening finished the erasure: no used key is left on the token.
            for g in groups_on_token(&hsm, id) {
                assert!(g.first >= next, "{g:?} below next {next}");
            }
        },
    );
}

#[test]
fn sigkill_while_charging_loses_no_committed_charge() {
    let Some((hsm, _turn)) = hsm("sigkill_while_charging_loses_no_committed_charge") else {
        return;
    };
    let (_cleanup, m) = hsm.create(100_000, 1024);
    let id = m.id();
    drop(m);
    let rounds = rounds(
        &[1, 4, 2, 9, 3, 1, 5, 2],
        &[0, 2100, 4300, 6700, 1100, 8900, 3200, 5500],
    );
    let m = common::sigkill_while_charging(
        &id.to_string(),
        || hsm.open(id),
        &rounds,
        |charged| {
            // Nothing of an uncommitted charge is left on the token.
            for g in groups_on_token(&hsm, id) {
                assert!(g.end() <= charged, "{g:?} beyond {charged}");
            }
        },
    );
    // Charges whose keys are all used are forgotten.
    assert!(m.status().expect("status").charges.is_empty());
}
