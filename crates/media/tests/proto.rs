//! The key-service protocol core against its promises: every message survives a
//! round trip; a terminal that authenticates gets a session key its peer unwraps
//! too; replays, tags over another challenge, indices ahead, tampered grants and
//! grants for someone else are refused; decoders never panic on any bytes.
//!
//! Medium keys are derived from (medium, index) (`key_for`), as if both the
//! terminal's medium and the service's store had been charged with them. Nonces,
//! challenges and session keys are fixed bytes: the core takes randomness as input.

use proptest::prelude::*;
use qkdnet_crypto::sm3::sm3;
use qkdnet_media::Key256;
use qkdnet_media::proto::{
    AuthRequest, Authenticated, Challenge, ChargeAck, ChargeOffer, ChargeTerms, GrantExpect,
    Identity, KeySource, MAX_CHARGE_KEYS, MAX_FRAME, Message, ProtoError, RefuseReason, Request,
    STRICT, Session, SessionKeyGrant, frame_len, open_grant, verify_auth,
};
use uuid::Uuid;

const MEDIUM_A: Uuid = Uuid::from_u128(0xa11c_e000_0000_0000_0000_0000_0000_0001);
const MEDIUM_B: Uuid = Uuid::from_u128(0xb0b0_0000_0000_0000_0000_0000_0000_0002);
const SESSION: [u8; 16] = *b"call-0001-abcdef";

/// The key charged under `index` on `medium` (the same on both sides).
fn key_for(medium: &Uuid, index: u64) -> Key256 {
    let mut input = medium.as_bytes().to_vec();
    input.extend_from_slice(&index.to_be_bytes());
    Key256::new(sm3(&input))
}

fn alice() -> Identity {
    Identity::new("sip:alice@qkd.example").expect("valid")
}

fn bob() -> Identity {
    Identity::new("sip:bob@qkd.example").expect("valid")
}

fn challenge(n: u8) -> Challenge {
    Challenge { challenge: [n; 32] }
}

fn request() -> Request {
    Request::SessionKey {
        session_id: SESSION,
        peer: bob(),
    }
}

fn session_key() -> Key256 {
    Key256::new([0x5a; 32])
}

/// Terminal A signs with `index` in answer to `ch`.
fn signed(index: u64, ch: &Challenge) -> AuthRequest {
    AuthRequest::sign(MEDIUM_A, index, &key_for(&MEDIUM_A, index), ch, request())
}

/// The service's check against medium A's keys.
fn verify(
    ch: &Challenge,
    req: &AuthRequest,
    expected: u64,
    max_skip: u64,
) -> Result<Authenticated, ProtoError> {
    verify_auth(ch, req, expected, max_skip, |i| {
        Some(key_for(&req.medium_id, i))
    })
}

/// B's join of the session, signed with B's key `index`.
fn joined(index: u64, ch: &Challenge) -> AuthRequest {
    AuthRequest::sign(
        MEDIUM_B,
        index,
        &key_for(&MEDIUM_B, index),
        ch,
        Request::JoinSession {
            session_id: SESSION,
        },
    )
}

/// The session A opens with B.
fn with_session<T>(f: impl FnOnce(&Session<'_>) -> T) -> T {
    let (a, b, key) = (alice(), bob(), session_key());
    f(&Session {
        session_id: SESSION,
        a: &a,
        b: &b,
        source: KeySource::Qkd,
        key: &key,
    })
}

/// The grant for the medium of `auth` (whose bound identity is `me`), wrapped
/// under its key at `auth.wrap_index()`.
fn grant(auth: &Authenticated, me: &Identity, nonce: u8) -> SessionKeyGrant {
    let wrap = key_for(&auth.medium_id(), auth.wrap_index());
    with_session(|s| auth.grant(s, me, &wrap, [nonce; 12])).expect("parties match the request")
}

/// A's grant (A authenticated with key 0, wrapped under key 1).
fn grants(auth: &Authenticated) -> SessionKeyGrant {
    grant(auth, &alice(), 1)
}

fn roundtrip(m: Message) {
    let bytes = m.encode();
    assert!(bytes.len() <= MAX_FRAME);
    assert_eq!(frame_len(&bytes), Ok(Some(bytes.len())));
    assert_eq!(Message::decode(&bytes), Ok(m));
}

#[test]
fn every_message_round_trips() {
    roundtrip(Message::Challenge(challenge(7)));
    roundtrip(Message::AuthRequest(signed(3, &challenge(7))));
    let auth = verify(&challenge(7), &signed(0, &challenge(7)), 0, STRICT).expect("valid");
    roundtrip(Message::SessionKeyGrant(grants(&auth)));
    roundtrip(Message::AuthRequest(joined(4, &challenge(7))));
    for reason in RefuseReason::ALL {
        roundtrip(Message::Refused(*reason));
    }
    let offer = charge_offer(&challenge(7), 3);
    roundtrip(Message::ChargeAck(ChargeAck::for_offer(
        &offer,
        &challenge(7),
        &charge_auth_key(),
    )));
    roundtrip(Message::ChargeOffer(offer));
    // The largest offer fits a frame.
    roundtrip(Message::ChargeOffer(charge_offer(
        &challenge(7),
        MAX_CHARGE_KEYS,
    )));
    // The largest identities still fit a frame.
    let long = Identity::new("x".repeat(256)).expect("256 bytes is the limit");
    let g = SessionKeyGrant {
        session_id: SESSION,
        a_identity: long.clone(),
        b_identity: long,
        source: KeySource::Csprng,
        wrap_index: u64::MAX,
        nonce: [9; 12],
        ciphertext: [8; 48],
    };
    roundtrip(Message::SessionKeyGrant(g));
}

#[test]
fn exhausted_refusal_says_recharge() {
    assert!(
        RefuseReason::Exhausted
            .to_string()
            .contains("recharge at a charging point")
    );
    assert_eq!(
        ProtoError::Exhausted.refusal(),
        Some(RefuseReason::Exhausted)
    );
}

#[test]
fn identities_are_checked() {
    assert!(Identity::new("").is_err());
    assert!(Identity::new("x".repeat(257)).is_err());
    assert!(Identity::new("sip:a\n@b").is_err());
    assert!(Identity::new("device-42").is_ok());
}

/// Terminal A authenticates with key 0 and opens the session; the service wraps
/// the session key under A's key 1. B joins with its key 0 and gets it under its
/// key 1. Both unwrap the same key, each sees the other.
#[test]
fn full_exchange() {
    // Service → A: challenge. A → service: request signed with K_A[0], over the wire.
    let ch = challenge(0xc4);
    let wire = Message::Challenge(ch).encode();
    let Ok(Message::Challenge(got)) = Message::decode(&wire) else {
        panic!("challenge decodes");
    };
    let wire = Message::AuthRequest(signed(0, &got)).encode();
    let Ok(Message::AuthRequest(req)) = Message::decode(&wire) else {
        panic!("request decodes");
    };

    // Service: checks against the expected index 0, consumes key 0.
    let auth = verify(&ch, &req, 0, STRICT).expect("authenticates");
    assert_eq!(auth.medium_id(), MEDIUM_A);
    assert_eq!(auth.consumed(), 0..=1);
    assert_eq!(auth.next_expected(), 2);
    let ga = grants(&auth);
    // B joins on another connection, with its own challenge.
    let ch_b = challenge(0xb4);
    let join = verify(&ch_b, &joined(0, &ch_b), 0, STRICT).expect("B authenticates");
    let gb = grant(&join, &bob(), 2);
    assert_eq!((ga.wrap_index, gb.wrap_index), (1, 1));

    let me_a = alice();
    let me_b = bob();
    let wire_a = Message::SessionKeyGrant(ga).encode();
    let wire_b = Message::SessionKeyGrant(gb).encode();
    let Ok(Message::SessionKeyGrant(ga)) = Message::decode(&wire_a) else {
        panic!("grant decodes");
    };
    let Ok(Message::SessionKeyGrant(gb)) = Message::decode(&wire_b) else {
        panic!("grant decodes");
    };
    let sa = open_grant(
        &ga,
        &GrantExpect {
            medium_id: MEDIUM_A,
            me: &me_a,
            session_id: SESSION,
        },
        1,
        &key_for(&MEDIUM_A, 1),
    )
    .expect("A unwraps");
    let sb = open_grant(
        &gb,
        &GrantExpect {
            medium_id: MEDIUM_B,
            me: &me_b,
            session_id: SESSION,
        },
        1,
        &key_for(&MEDIUM_B, 1),
    )
    .expect("B unwraps");
    assert_eq!(sa.key, sb.key);
    assert_eq!(sa.key, session_key());
    assert_eq!((sa.source, sb.source), (KeySource::Qkd, KeySource::Qkd));
    assert_eq!(sa.peer, bob());
    assert_eq!(sb.peer, alice());
    // No key bytes in Debug.
    let shown = format!("{sa:?}");
    assert!(shown.contains("REDACTED"));
    assert!(!shown.contains("90, 90"));
}

#[test]
fn replayed_request_is_refused() {
    let ch = challenge(1);
    let req = signed(0, &ch);
    let auth = verify(&ch, &req, 0, STRICT).expect("first use");
    // The store moved on; the same request (even with the same challenge) is a replay.
    let err = verify(&ch, &req, auth.next_expected(), STRICT).expect_err("replay");
    assert_eq!(
        err,
        ProtoError::Replay {
            index: 0,
            expected: 2
        }
    );
    assert_eq!(err.refusal(), Some(RefuseReason::Replay));
    assert!(err.to_string().contains("key already used"));
    // Refused before any key is looked up (a used key is gone).
    let err =
        verify_auth(&ch, &req, 1, 5, |_| panic!("no lookup for a replay")).expect_err("replay");
    assert!(matches!(err, ProtoError::Replay { .. }));
}

#[test]
fn tag_over_another_challenge_is_refused() {
    let req = signed(0, &challenge(1));
    let err = verify(&challenge(2), &req, 0, STRICT).expect_err("other challenge");
    assert_eq!(err, ProtoError::BadTag);
    assert_eq!(err.refusal(), Some(RefuseReason::BadTag));
}

#[test]
fn changed_request_or_medium_is_refused() {
    let ch = challenge(1);
    let mut req = signed(0, &ch);
    req.request = Request::SessionKey {
        session_id: SESSION,
        peer: Identity::new("sip:mallory@qkd.example").expect("valid"),
    };
    assert_eq!(
        verify(&ch, &req, 0, STRICT).expect_err("changed"),
        ProtoError::BadTag
    );
    let mut req = signed(0, &ch);
    req.medium_id = MEDIUM_B;
    assert_eq!(
        verify(&ch, &req, 0, STRICT).expect_err("moved"),
        ProtoError::BadTag
    );
    let mut req = signed(0, &ch);
    req.tag[31] ^= 1;
    assert_eq!(
        verify(&ch, &req, 0, STRICT).expect_err("flipped"),
        ProtoError::BadTag
    );
}

#[test]
fn key_index_ahead_is_refused() {
    let ch = challenge(1);
    let req = signed(2, &ch);
    let err =
        verify_auth(&ch, &req, 0, STRICT, |_| panic!("no lookup out of order")).expect_err("ahead");
    assert_eq!(
        err,
        ProtoError::OutOfOrder {
            index: 2,
            expected: 0
        }
    );
    assert_eq!(err.refusal(), Some(RefuseReason::OutOfOrder));
    // With a skip window the service resynchronises, consuming the skipped keys...
    let auth = verify(&ch, &req, 0, 2).expect("within the window");
    assert_eq!(auth.consumed(), 0..=3);
    assert_eq!(auth.next_expected(), 4);
    // ...but only past a valid tag, and never beyond the window.
    assert_eq!(
        verify(&ch, &req, 0, 1).expect_err("beyond"),
        ProtoError::OutOfOrder {
            index: 2,
            expected: 0
        }
    );
    let mut bad = req.clone();
    bad.tag[0] ^= 1;
    assert_eq!(
        verify(&ch, &bad, 0, 2).expect_err("bad tag"),
        ProtoError::BadTag
    );
    // The two top indices are never accepted (a request spends two keys, and
    // the index after them could not be named).
    for top in [u64::MAX, u64::MAX - 1] {
        let far = signed(top, &ch);
        assert!(matches!(
            verify(&ch, &far, top, u64::MAX),
            Err(ProtoError::OutOfOrder { .. })
        ));
    }
    let near = signed(u64::MAX - 2, &ch);
    let auth = verify(&ch, &near, u64::MAX - 2, STRICT).expect("last valid index");
    assert_eq!(auth.next_expected(), u64::MAX);
}

#[test]
fn missing_key_is_exhausted() {
    let ch = challenge(1);
    let req = signed(0, &ch);
    let err = verify_auth(&ch, &req, 0, STRICT, |_| None).expect_err("no key");
    assert_eq!(err, ProtoError::Exhausted);
}

#[test]
fn grant_parties_must_match_the_request() {
    let ch = challenge(1);
    let open = verify(&ch, &signed(0, &ch), 0, STRICT).expect("valid");
    let join = verify(&ch, &joined(0, &ch), 0, STRICT).expect("valid");
    let k = key_for(&MEDIUM_A, 1);
    let (a, b, carol, key) = (
        alice(),
        bob(),
        Identity::new("sip:carol@qkd.example").expect("valid"),
        session_key(),
    );
    let session = |session_id, a, b| Session {
        session_id,
        a,
        b,
        source: KeySource::Qkd,
        key: &key,
    };
    for (why, auth, s, me) in [
        ("the opener is not A", &open, session(SESSION, &a, &b), &b),
        (
            "B is not the peer asked for",
            &open,
            session(SESSION, &a, &carol),
            &a,
        ),
        ("another session", &open, session([7; 16], &a, &b), &a),
        ("one identity for both", &open, session(SESSION, &a, &a), &a),
        ("the joiner is not B", &join, session(SESSION, &a, &b), &a),
        (
            "the joiner is a stranger",
            &join,
            session(SESSION, &a, &b),
            &carol,
        ),
    ] {
        let err = auth.grant(&s, me, &k, [0; 12]).expect_err(why);
        assert!(matches!(err, ProtoError::PartyMismatch(_)), "{why}");
        assert_eq!(err.refusal(), None);
    }
}

fn grant_for_a() -> SessionKeyGrant {
    let ch = challenge(1);
    let auth = verify(&ch, &signed(0, &ch), 0, STRICT).expect("valid");
    grants(&auth)
}

fn open_as_a(bytes: &[u8]) -> Result<qkdnet_media::proto::SessionKey, ProtoError> {
    let me = alice();
    match Message::decode(bytes)? {
        Message::SessionKeyGrant(g) => open_grant(
            &g,
            &GrantExpect {
                medium_id: MEDIUM_A,
                me: &me,
                session_id: SESSION,
            },
            1,
            &key_for(&MEDIUM_A, 1),
        ),
        _ => Err(ProtoError::InvalidField("not a grant")),
    }
}

#[test]
fn grant_tampered_in_any_byte_is_refused() {
    let wire = Message::SessionKeyGrant(grant_for_a()).encode();
    assert!(open_as_a(&wire).is_ok());
    for pos in 0..wire.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut t = wire.clone();
            t[pos] ^= flip;
            assert!(open_as_a(&t).is_err(), "byte {pos} ^ {flip:#x} accepted");
        }
    }
}

#[test]
fn grant_for_someone_else_is_refused() {
    let g = grant_for_a();
    let key = key_for(&MEDIUM_A, 1);
    let me = alice();
    let carol = Identity::new("sip:carol@qkd.example").expect("valid");
    let expect = |me, session_id| GrantExpect {
        medium_id: MEDIUM_A,
        me,
        session_id,
    };
    // Another session.
    assert_eq!(
        open_grant(&g, &expect(&me, [0; 16]), 1, &key).expect_err("session"),
        ProtoError::WrongSession
    );
    // Another identity.
    assert_eq!(
        open_grant(&g, &expect(&carol, SESSION), 1, &key).expect_err("identity"),
        ProtoError::NotAParty
    );
    // Another medium (same identity claimed).
    let other = GrantExpect {
        medium_id: MEDIUM_B,
        me: &me,
        session_id: SESSION,
    };
    assert_eq!(
        open_grant(&g, &other, 1, &key_for(&MEDIUM_B, 1)).expect_err("medium"),
        ProtoError::GrantRejected
    );
    // The wrong key under the right index (a key from another charge).
    assert_eq!(
        open_grant(&g, &expect(&me, SESSION), 1, &key_for(&MEDIUM_A, 9)).expect_err("key"),
        ProtoError::GrantRejected
    );
    // The grant names another index than the terminal's next key.
    assert!(matches!(
        open_grant(&g, &expect(&me, SESSION), 0, &key).expect_err("ahead"),
        ProtoError::OutOfOrder { .. }
    ));
    assert!(matches!(
        open_grant(&g, &expect(&me, SESSION), 2, &key).expect_err("used"),
        ProtoError::Replay { .. }
    ));
    // Parties swapped (A's grant presented as if A were B) do not open: the AAD binds the order.
    let mut swapped = g.clone();
    core::mem::swap(&mut swapped.a_identity, &mut swapped.b_identity);
    assert_eq!(
        open_grant(&swapped, &expect(&me, SESSION), 1, &key).expect_err("swap"),
        ProtoError::GrantRejected
    );
    // B's grant is not A's.
    let ch = challenge(1);
    let join = verify(&ch, &joined(0, &ch), 0, STRICT).expect("valid");
    let gb = grant(&join, &bob(), 3);
    assert_eq!(
        open_grant(&gb, &expect(&me, SESSION), 1, &key).expect_err("B's"),
        ProtoError::GrantRejected
    );
}

#[test]
fn truncated_frames_are_errors() {
    let ch = challenge(1);
    let auth = verify(&ch, &signed(0, &ch), 0, STRICT).expect("valid");
    let ga = grants(&auth);
    let offer = charge_offer(&ch, 3);
    for m in [
        Message::Challenge(ch),
        Message::AuthRequest(signed(0, &ch)),
        Message::AuthRequest(joined(0, &ch)),
        Message::SessionKeyGrant(ga),
        Message::Refused(RefuseReason::Revoked),
        Message::ChargeAck(ChargeAck::for_offer(&offer, &ch, &charge_auth_key())),
        Message::ChargeOffer(offer),
    ] {
        let wire = m.encode();
        for n in 0..wire.len() {
            assert!(Message::decode(&wire[..n]).is_err(), "{n} bytes decoded");
            assert!(matches!(frame_len(&wire[..n]), Ok(None) | Ok(Some(_))));
        }
        let mut long = wire.clone();
        long.push(0);
        assert_eq!(Message::decode(&long), Err(ProtoError::Trailing(1)));
    }
}

#[test]
fn header_errors_are_typed() {
    let wire = Message::Refused(RefuseReason::Replay).encode();
    let mut t = wire.clone();
    t[0] = b'X';
    assert_eq!(Message::decode(&t), Err(ProtoError::BadMagic));
    assert_eq!(frame_len(b"QKX"), Err(ProtoError::BadMagic));
    let mut t = wire.clone();
    t[4] = 2;
    assert_eq!(Message::decode(&t), Err(ProtoError::UnsupportedVersion(2)));
    let mut t = wire.clone();
    t[5] = 9;
    assert_eq!(Message::decode(&t), Err(ProtoError::UnknownType(9)));
    t[5] = 7;
    assert_eq!(Message::decode(&t), Err(ProtoError::UnknownType(7)));
    let mut t = wire.clone();
    t[6] = 0xff;
    assert!(matches!(Message::decode(&t), Err(ProtoError::TooLong(_))));
    let mut t = wire;
    t[8] = 0;
    assert_eq!(
        Message::decode(&t),
        Err(ProtoError::InvalidField("refusal reason"))
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any bytes: an error or a message that re-encodes to the same bytes.
    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
        let _ = frame_len(&bytes);
        if let Ok(m) = Message::decode(&bytes) {
            prop_assert_eq!(m.encode(), bytes);
        }
    }

    /// Valid headers with random bodies reach the body decoders.
    #[test]
    fn bodies_never_panic(ty in 0u8..6, body in proptest::collection::vec(any::<u8>(), 0..700)) {
        let mut bytes = b"QKMS\x01".to_vec();
        bytes.push(ty);
        bytes.extend_from_slice(&u16::try_from(body.len()).expect("small").to_be_bytes());
        bytes.extend_from_slice(&body);
        if let Ok(m) = Message::decode(&bytes) {
            prop_assert_eq!(m.encode(), bytes);
        }
    }

    /// Random grants never open under A's key, whatever they claim.
    #[test]
    fn random_grants_do_not_open(body in proptest::collection::vec(any::<u8>(), 100..200)) {
        let mut bytes = b"QKMS\x01\x03".to_vec();
        bytes.extend_from_slice(&u16::try_from(body.len()).expect("small").to_be_bytes());
        bytes.extend_from_slice(&body);
        prop_assert!(open_as_a(&bytes).is_err());
    }

    /// Valid frames with random bytes overwritten: an error or a message that
    /// re-encodes to the same bytes; a mutated grant opens only if unchanged.
    #[test]
    fn mutated_frames_never_panic(
        which in 0usize..3,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let ch = challenge(1);
        let wire = match which {
            0 => Message::AuthRequest(signed(0, &ch)).encode(),
            1 => Message::SessionKeyGrant(grant_for_a()).encode(),
            _ => Message::Challenge(ch).encode(),
        };
        let mut t = wire.clone();
        for (at, b) in edits {
            let i = at % t.len();
            t[i] = b;
        }
        t.truncate(t.len() - cut % 4);
        if let Ok(m) = Message::decode(&t) {
            prop_assert_eq!(m.encode(), t.clone());
        }
        if which == 1 && open_as_a(&t).is_ok() {
            prop_assert_eq!(&t, &wire);
        }
    }
}

fn charge_auth_key() -> Key256 {
    Key256::new([0x42; 32])
}

fn charge_offer(ch: &Challenge, n: usize) -> ChargeOffer {
    ChargeOffer::sign(
        ChargeTerms {
            medium_id: MEDIUM_A,
            owner: alice(),
            charger: "charger-north".into(),
            first_index: 100,
            auth_key_id: Uuid::from_u128(1),
            key_ids: (0..n).map(|i| Uuid::from_u128(1000 + i as u128)).collect(),
        },
        ch,
        &charge_auth_key(),
    )
    .expect("valid terms")
}

#[test]
fn a_charge_offer_verifies_only_under_its_key_challenge_and_bytes() {
    let ch = challenge(3);
    let offer = charge_offer(&ch, 5);
    offer.verify(&ch, &charge_auth_key()).expect("verifies");
    assert_eq!(
        offer.verify(&challenge(4), &charge_auth_key()),
        Err(ProtoError::BadTag),
        "an offer replayed to another connection"
    );
    assert_eq!(
        offer.verify(&ch, &Key256::new([0x43; 32])),
        Err(ProtoError::BadTag)
    );
    // Any changed byte of the offer on the wire: refused by the decoder or the tag.
    let wire = Message::ChargeOffer(offer.clone()).encode();
    for pos in 8..wire.len() {
        let mut t = wire.clone();
        t[pos] ^= 0x01;
        if let Ok(Message::ChargeOffer(o)) = Message::decode(&t) {
            assert!(
                o.verify(&ch, &charge_auth_key()).is_err(),
                "byte {pos} flipped and still verifies"
            );
        }
    }
    // The acknowledgement binds the same offer.
    let ack = ChargeAck::for_offer(&offer, &ch, &charge_auth_key());
    ack.verify(&offer, &ch, &charge_auth_key())
        .expect("ack verifies");
    let other = charge_offer(&ch, 6);
    assert!(ack.verify(&other, &ch, &charge_auth_key()).is_err());
    let mut forged = ack.clone();
    forged.count = 4;
    assert!(forged.verify(&offer, &ch, &charge_auth_key()).is_err());
}

#[test]
fn charge_offers_with_bad_fields_are_refused_before_signing() {
    let ch = challenge(3);
    let terms = |charger: &str, ids: Vec<Uuid>, first: u64| ChargeTerms {
        medium_id: MEDIUM_A,
        owner: alice(),
        charger: charger.into(),
        first_index: first,
        auth_key_id: Uuid::from_u128(1),
        key_ids: ids,
    };
    let k = charge_auth_key();
    let one = || vec![Uuid::from_u128(2)];
    for (why, t) in [
        ("no keys", terms("c", vec![], 0)),
        (
            "too many keys",
            terms(
                "c",
                (0..=MAX_CHARGE_KEYS as u128)
                    .map(|i| Uuid::from_u128(10 + i))
                    .collect(),
                0,
            ),
        ),
        (
            "duplicate IDs",
            terms("c", vec![Uuid::from_u128(2), Uuid::from_u128(2)], 0),
        ),
        ("auth key charged", terms("c", vec![Uuid::from_u128(1)], 0)),
        ("empty charger", terms("", one(), 0)),
        ("long charger", terms(&"c".repeat(65), one(), 0)),
        ("indices overflow", terms("c", one(), u64::MAX - 1)),
    ] {
        assert!(ChargeOffer::sign(t, &ch, &k).is_err(), "{why}");
    }
}
