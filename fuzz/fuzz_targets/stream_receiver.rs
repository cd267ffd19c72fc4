//! The sans-IO stream receiver (`qkdnet_apps::stream::Receiver`) as SAE "bob",
//! fed attacker-chosen bytes: never a panic, whatever the input and however it
//! is cut. The first input byte picks the piece size (0: as much as fits, else
//! that many bytes), always at most `read_capacity()`; every `NeedKey` is
//! answered with the same fixed 256-bit key, so seeds sealed with it
//! (fuzz/corpus_seed/stream_receiver) reach the authenticated frames.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_apps::stream::{Event, Receiver};
use qkdnet_apps::stream_wire::decode_stream;
use qkdnet_kms::client::Key;
use qkdnet_kms::ids::SaeId;

/// The key material supplied for every key ID the stream names.
const KEY: [u8; 32] = [0x42; 32];

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, mut rest)) = data.split_first() else {
        return;
    };
    let me = SaeId::new("bob").expect("valid ID");
    let mut rx = Receiver::new(me.clone());
    let mut delivered = 0u64;
    loop {
        match rx.poll_event() {
            Err(_) => return,
            Ok(Some(Event::Handshake(h))) => assert_eq!(h.recipient, me),
            Ok(Some(Event::NeedKey(id))) => {
                let key = Key {
                    id,
                    material: KEY.to_vec().into(),
                };
                if rx.supply_key(key).is_err() {
                    return; // e.g. a handshake asking for another key size
                }
            }
            Ok(Some(Event::Data(d))) => {
                assert!(!d.is_empty());
                delivered += d.len() as u64;
            }
            Ok(Some(Event::End)) => {
                assert_eq!(rx.summary().plaintext_bytes, delivered);
                let mut out = Vec::new();
                rx.ack(&mut out).expect("an ack after the end frame");
                let ack = decode_stream(&out).expect("our ack decodes");
                assert_eq!((ack.frames.len(), ack.trailing), (1, 0));
                // Anything more is an error, never a panic.
                let n = rest.len().min(rx.read_capacity());
                assert_eq!(rx.handle_bytes(&rest[..n]).is_err(), n > 0);
                return;
            }
            Ok(None) => {
                if rest.is_empty() {
                    let _ = rx.handle_eof();
                    return;
                }
                let piece = if ctl == 0 {
                    usize::MAX
                } else {
                    usize::from(ctl)
                };
                let n = piece.min(rx.read_capacity()).min(rest.len());
                if rx.handle_bytes(&rest[..n]).is_err() {
                    return;
                }
                rest = &rest[n..];
            }
        }
        assert_eq!(rx.summary().plaintext_bytes, delivered);
    }
});
