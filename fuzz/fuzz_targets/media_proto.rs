//! Key-service protocol frames (`qkdnet_media::proto`), received from a network
//! nobody vouches for: any bytes give an error or a message, never a panic. A
//! message that decodes re-encodes to the same bytes; `frame_len` agrees with the
//! decoder; an authentication request verifies only if its tag is right, and a grant
//! opens only under the key it was sealed for (here: never, since the fuzzer does
//! not know it); a charge offer verifies only under its key.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_media::Key256;
use qkdnet_media::proto::{
    Challenge, GrantExpect, Identity, MAX_FRAME, Message, ProtoError, STRICT, frame_len,
    open_grant, verify_auth,
};

fuzz_target!(|data: &[u8]| {
    match frame_len(data) {
        Ok(Some(n)) => assert!(n <= MAX_FRAME),
        Ok(None) => assert!(data.len() < 8),
        Err(_) => {}
    }
    let Ok(msg) = Message::decode(data) else {
        return;
    };
    assert_eq!(msg.encode(), data);
    assert_eq!(frame_len(data), Ok(Some(data.len())));
    let key = Key256::new([0x42; 32]);
    let challenge = Challenge { challenge: [7; 32] };
    match msg {
        Message::AuthRequest(req) => {
            // At the expected index a random tag does not verify (u64::MAX is
            // never a valid index); one past it the request is a replay.
            let expected = req.key_index;
            match verify_auth(&challenge, &req, expected, STRICT, |_| Some(key.clone())) {
                Err(ProtoError::Replay { .. })
                | Err(ProtoError::OutOfOrder { .. })
                | Err(ProtoError::BadTag) => {}
                other => panic!("unexpected verification result {other:?}"),
            }
            if let Some(next) = req.key_index.checked_add(1) {
                let r = verify_auth(&challenge, &req, next, STRICT, |_| Some(key.clone()));
                assert!(matches!(r, Err(ProtoError::Replay { .. })));
            }
        }
        Message::SessionKeyGrant(grant) => {
            let me = grant.a_identity.clone();
            let other = Identity::new("fuzz").expect("valid identity");
            for who in [&me, &other] {
                let expect = GrantExpect {
                    medium_id: uuid::Uuid::nil(),
                    me: who,
                    session_id: grant.session_id,
                };
                assert!(open_grant(&grant, &expect, grant.wrap_index, &key).is_err());
            }
        }
        Message::ChargeOffer(offer) => {
            // A decoded offer re-signs to the same fields; a random tag does not
            // verify, and an acknowledgement made for it verifies only for it.
            assert!(offer.terms.key_ids.len() <= qkdnet_media::proto::MAX_CHARGE_KEYS);
            assert!(offer.verify(&challenge, &key).is_err());
            let ack = qkdnet_media::proto::ChargeAck::for_offer(&offer, &challenge, &key);
            assert!(ack.verify(&offer, &challenge, &key).is_ok());
        }
        _ => {}
    }
});
