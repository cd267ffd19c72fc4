//! Live streams end to end: two KMEs in-process, alice streams to bob over TCP or
//! through an in-memory man in the middle that tampers with, replays, drops and
//! cuts frames.

#[path = "apps_common/mod.rs"]
mod common;

use std::io::Cursor;

use common::*;
use qkdnet_apps::stream::{
    Output, ReceiveOptions, SendOptions, SenderConfig, StreamReport, receive, send,
};
use qkdnet_apps::stream_wire::{FrameHeader, FrameKind, Handshake, decode_frame, decode_stream};
use qkdnet_apps::{AppError, Mode, StreamError};
use qkdnet_kms::client::ClientError;
use qkdnet_kms::ids::SaeId;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Small frames and epochs so that every stream crosses both boundaries.
fn small() -> SendOptions {
    SendOptions {
        sender: SenderConfig {
            rekey_bytes: 1000,
            frame_payload: 400,
            ..SenderConfig::default()
        },
        ..SendOptions::default()
    }
}

type Both = (
    Result<StreamReport, AppError>,
    Result<StreamReport, AppError>,
);

/// alice sends `plain` to bob over loopback TCP; bob writes `out`.
async fn over_tcp(net: &Net, plain: &[u8], opts: &SendOptions, out: &str) -> Both {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (alice, bob) = (net.client("alice"), net.client("bob"));
    let output = Output::File(net.path(out));
    let rx = async {
        let (conn, _) = listener.accept().await.expect("accept");
        receive(&bob, "bob", conn, &output, &ReceiveOptions::default()).await
    };
    let tx = async {
        let conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        send(
            &alice,
            "alice",
            "bob",
            Cursor::new(plain.to_vec()),
            conn,
            opts,
        )
        .await
    };
    let (s, r) = tokio::join!(tx, rx);
    (s, r)
}

#[tokio::test]
async fn empty_and_multi_rekey_streams_round_trip() {
    let net = Net::start().await;
    let (s, r) = over_tcp(&net, b"", &SendOptions::default(), "empty.out").await;
    let (s, r) = (s.expect("send"), r.expect("receive"));
    assert_eq!(s, r, "both ends report the same");
    assert_eq!((s.plaintext_bytes, s.frames, s.key_ids.len()), (0, 1, 1));
    assert_eq!(s.mode, Mode::Qkd);
    assert_eq!(std::fs::read(net.path("empty.out")).expect("out"), b"");

    let plain = data(10_500, 1);
    let (s, r) = over_tcp(&net, &plain, &small(), "multi.out").await;
    let (s, r) = (s.expect("send"), r.expect("receive"));
    assert_eq!(std::fs::read(net.path("multi.out")).expect("out"), plain);
    assert_eq!(s, r);
    // 11 epochs of at most 1000 bytes, each 3 data frames (400 400 200), one
    // rekey frame between epochs, one end frame.
    assert_eq!(s.key_ids.len(), 11);
    assert_eq!(s.key_bits_consumed, 11 * 256);
    assert_eq!(s.frames, 10 * 3 + 2 + 10 + 1);
    assert_eq!(s.wire_bytes, r.wire_bytes);
    assert_eq!((s.sender.as_str(), s.recipient.as_str()), ("alice", "bob"));
    // The keys were delivered to bob, once: nobody can fetch them again.
    let e = net
        .client("bob")
        .dec_keys("alice", &s.key_ids[..1])
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Api { status: 400, .. }), "{e}");
    // alice's pool lost exactly the keys of the two streams.
    let st = net.client("alice").status("bob").await.expect("status");
    assert_eq!(st.stored_key_count, BLOCKS * 32 - 12);
}

/// What the man in the middle does with frame `i` (counting from 0 after the
/// handshake).
enum Act {
    Forward,
    Replace(Vec<Vec<u8>>),
    /// Close both connections instead of forwarding it.
    Cut,
}

type Edit = Box<dyn FnMut(usize, FrameHeader, &[u8]) -> Act + Send>;

/// Relays alice → bob frame by frame through `edit` (and the handshake through
/// `edit_handshake`), then bob's answer back. Returns what alice sent.
async fn mitm(
    mut alice: DuplexStream,
    mut bob: DuplexStream,
    edit_handshake: fn(Vec<u8>) -> Vec<u8>,
    mut edit: Edit,
) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = Vec::new();
    let hs_len = loop {
        if let Some((_, n)) = Handshake::decode(&buf).expect("handshake") {
            break n;
        }
        if !pull(&mut alice, &mut buf, &mut seen).await {
            return seen;
        }
    };
    let hs = edit_handshake(buf.drain(..hs_len).collect());
    if bob.write_all(&hs).await.is_err() {
        return seen;
    }
    let mut i = 0;
    'frames: loop {
        while let Some((h, f)) = decode_frame(&buf).expect("frame") {
            let f = f.to_vec();
            buf.drain(..f.len());
            let out = match edit(i, h, &f) {
                Act::Forward => vec![f],
                Act::Replace(v) => v,
                Act::Cut => return seen,
            };
            for o in out {
                if bob.write_all(&o).await.is_err() {
                    return seen;
                }
            }
            i += 1;
            if h.kind == FrameKind::End {
                break 'frames;
            }
        }
        if !pull(&mut alice, &mut buf, &mut seen).await {
            return seen;
        }
    }
    // bob's ack back to alice.
    let mut back = Vec::new();
    let _ = bob.read_to_end(&mut back).await;
    let _ = alice.write_all(&back).await;
    let _ = alice.shutdown().await;
    seen
}

/// Reads what alice sent next into `buf` (and the recording); false at the end.
async fn pull(alice: &mut DuplexStream, buf: &mut Vec<u8>, seen: &mut Vec<u8>) -> bool {
    let mut tmp = vec![0u8; 1 << 16];
    let n = alice.read(&mut tmp).await.unwrap_or(0);
    buf.extend_from_slice(&tmp[..n]);
    seen.extend_from_slice(&tmp[..n]);
    n > 0
}

fn keep(h: Vec<u8>) -> Vec<u8> {
    h
}

/// alice sends 5000 bytes with `small()` options to `receiver` (listening as
/// `as_sae`) through the man in the middle; returns both results and what alice sent.
async fn attacked(
    net: &Net,
    receiver: &str,
    as_sae: &str,
    out: &str,
    edit_handshake: fn(Vec<u8>) -> Vec<u8>,
    edit: Edit,
) -> (Both, Vec<u8>) {
    let (a, m1) = tokio::io::duplex(1 << 16);
    let (m2, b) = tokio::io::duplex(1 << 16);
    let (alice, rcv) = (net.client("alice"), net.client(receiver));
    let output = Output::File(net.path(out));
    let opts = small();
    let tx = send(&alice, "alice", "bob", Cursor::new(data(5000, 2)), a, &opts);
    let ropts = ReceiveOptions::default();
    let rx = receive(&rcv, as_sae, b, &output, &ropts);
    let (s, r, seen) = tokio::join!(tx, rx, mitm(m1, m2, edit_handshake, edit));
    assert_no_output(&net.dir, out);
    ((s, r), seen)
}

fn stream_err(r: &Result<StreamReport, AppError>) -> &StreamError {
    match r {
        Err(AppError::Stream(e)) => e,
        other => panic!("expected a stream error, got {other:?}"),
    }
}

fn unconfirmed(s: &Result<StreamReport, AppError>) {
    assert!(
        matches!(stream_err(s), StreamError::Unconfirmed(_)),
        "sender: {s:?}"
    );
}

#[tokio::test]
async fn an_untouched_relay_delivers() {
    let net = Net::start().await;
    let (a, m1) = tokio::io::duplex(1 << 16);
    let (m2, b) = tokio::io::duplex(1 << 16);
    let (alice, bob) = (net.client("alice"), net.client("bob"));
    let output = Output::File(net.path("relay.out"));
    let plain = data(5000, 2);
    let (opts, ropts) = (small(), ReceiveOptions::default());
    let (s, r, seen) = tokio::join!(
        send(&alice, "alice", "bob", Cursor::new(plain.clone()), a, &opts),
        receive(&bob, "bob", b, &output, &ropts),
        mitm(m1, m2, keep, Box::new(|_, _, _| Act::Forward)),
    );
    assert_eq!(s.expect("send"), r.expect("receive"));
    assert_eq!(std::fs::read(net.path("relay.out")).expect("out"), plain);
    // The recording decodes as the documented layout: 5 epochs of 400 400 200,
    // 4 rekey frames, the end frame.
    let d = decode_stream(&seen).expect("decodes");
    let h = d.handshake.expect("handshake");
    assert_eq!((h.sender.as_str(), h.recipient.as_str()), ("alice", "bob"));
    assert_eq!(d.frames.len(), 5 * 3 + 4 + 1);
    assert_eq!(d.frames[3].kind, FrameKind::Rekey);
    assert!(d.frames.iter().enumerate().all(|(i, f)| f.seq == i as u64));
    assert_eq!(d.trailing, 0);

    // Replaying the whole recording to bob later: his KME has delivered those
    // keys already and refuses them; nothing is written.
    let e = bob_receives_bytes(&net, &seen, "replay.out").await;
    assert!(
        matches!(e, AppError::Client(ClientError::Api { status: 400, .. })),
        "{e}"
    );
}

/// bob receives `wire` (then the end of the connection) into `out`: it must
/// fail without output.
async fn bob_receives_bytes(net: &Net, wire: &[u8], out: &str) -> AppError {
    let (mut a, b) = tokio::io::duplex(wire.len().max(1));
    a.write_all(wire).await.expect("write");
    drop(a);
    let output = Output::File(net.path(out));
    let e = receive(
        &net.client("bob"),
        "bob",
        b,
        &output,
        &ReceiveOptions::default(),
    )
    .await
    .expect_err("must fail");
    assert_no_output(&net.dir, out);
    e
}

#[tokio::test]
async fn a_tampered_frame_is_refused() {
    let net = Net::start().await;
    let edit: Edit = Box::new(|i, _, f| {
        if i == 1 {
            let mut f = f.to_vec();
            f[100] ^= 0x04;
            Act::Replace(vec![f])
        } else {
            Act::Forward
        }
    });
    let ((s, r), _) = attacked(&net, "bob", "bob", "t.out", keep, edit).await;
    assert_eq!(stream_err(&r), &StreamError::Authentication { seq: 1 });
    unconfirmed(&s);
}

#[tokio::test]
async fn a_replayed_frame_is_refused() {
    let net = Net::start().await;
    let edit: Edit = Box::new(|i, _, f| {
        if i == 1 {
            Act::Replace(vec![f.to_vec(), f.to_vec()])
        } else {
            Act::Forward
        }
    });
    let ((s, r), _) = attacked(&net, "bob", "bob", "r.out", keep, edit).await;
    assert_eq!(
        stream_err(&r),
        &StreamError::Sequence {
            expected: 2,
            got: 1
        }
    );
    unconfirmed(&s);
}

#[tokio::test]
async fn a_dropped_frame_is_refused() {
    let net = Net::start().await;
    // Frame 3 is the first rekey frame: dropping it is a gap like any other.
    for (n, drop_at) in [(1, 1usize), (2, 3)] {
        let edit: Edit = Box::new(move |i, _, _| {
            if i == drop_at {
                Act::Replace(vec![])
            } else {
                Act::Forward
            }
        });
        let out = format!("d{n}.out");
        let ((s, r), _) = attacked(&net, "bob", "bob", &out, keep, edit).await;
        assert_eq!(
            stream_err(&r),
            &StreamError::Sequence {
                expected: drop_at as u64,
                got: drop_at as u64 + 1
            }
        );
        unconfirmed(&s);
    }
}

#[tokio::test]
async fn a_stream_cut_before_its_end_frame_is_refused() {
    let net = Net::start().await;
    let edit: Edit = Box::new(|_, h, _| {
        if h.kind == FrameKind::End {
            Act::Cut
        } else {
            Act::Forward
        }
    });
    let ((s, r), _) = attacked(&net, "bob", "bob", "cut.out", keep, edit).await;
    assert!(
        matches!(stream_err(&r), StreamError::Truncated(m) if m.contains("5000 bytes")),
        "{r:?}"
    );
    unconfirmed(&s);
}

/// The handshake with its recipient replaced by carol.
fn to_carol(h: Vec<u8>) -> Vec<u8> {
    let (mut hs, _) = Handshake::decode(&h).expect("valid").expect("complete");
    hs.recipient = SaeId::new("carol").expect("valid");
    hs.encode().expect("encodes")
}

#[tokio::test]
async fn a_third_sae_cannot_decrypt() {
    let net = Net::start().await;
    // carol listening gets alice's stream for bob: refused before any KME call.
    let fwd = || -> Edit { Box::new(|_, _, _| Act::Forward) };
    let ((s, r), _) = attacked(&net, "carol", "carol", "c1.out", keep, fwd()).await;
    assert_eq!(
        stream_err(&r),
        &StreamError::WrongRecipient {
            recipient: "bob".into(),
            me: "carol".into()
        }
    );
    unconfirmed(&s);
    // The handshake rewritten to name carol: her KME refuses bob's keys (as
    // unknown keys, 400: no existence oracle).
    let ((s, r), _) = attacked(&net, "carol", "carol", "c2.out", to_carol, fwd()).await;
    assert!(
        matches!(
            r,
            Err(AppError::Client(ClientError::Api { status: 400, .. }))
        ),
        "{r:?}"
    );
    unconfirmed(&s);
    // carol's certificate claiming to be bob.
    let ((s, r), _) = attacked(&net, "carol", "bob", "c3.out", keep, fwd()).await;
    assert!(
        matches!(&r, Err(AppError::InvalidInput(m)) if m.contains("carol")),
        "{r:?}"
    );
    unconfirmed(&s);
    // bob accepting streams from carol only: refused before any KME call.
    let (a, b) = tokio::io::duplex(1 << 16);
    let (alice, bob) = (net.client("alice"), net.client("bob"));
    let only_carol = ReceiveOptions {
        senders: vec![SaeId::new("carol").expect("valid")],
        ..ReceiveOptions::default()
    };
    let output = Output::File(net.path("c4.out"));
    let opts = small();
    let (s, r) = tokio::join!(
        send(&alice, "alice", "bob", Cursor::new(data(10, 4)), a, &opts),
        receive(&bob, "bob", b, &output, &only_carol),
    );
    assert_eq!(
        stream_err(&r),
        &StreamError::SenderNotAllowed {
            sender: "alice".into()
        }
    );
    unconfirmed(&s);
    assert_no_output(&net.dir, "c4.out");
    // bob still can.
    let (s, r) = over_tcp(&net, &data(3000, 3), &small(), "bob.out").await;
    assert_eq!(s.expect("send"), r.expect("receive"));
}

#[tokio::test]
async fn usage_errors_are_caught_before_keys_are_taken() {
    let net = Net::start().await;
    let alice = net.client("alice");
    for (from, to, opts) in [
        ("alice", "alice", SendOptions::default()),
        ("bob", "carol", SendOptions::default()),
        (
            "alice",
            "bob",
            SendOptions {
                mode: Mode::Hybrid,
                ..SendOptions::default()
            },
        ),
        (
            "alice",
            "bob",
            SendOptions {
                sender: SenderConfig {
                    rekey_bytes: 0,
                    ..SenderConfig::default()
                },
                ..SendOptions::default()
            },
        ),
    ] {
        let (a, _b) = tokio::io::duplex(1024);
        let e = send(&alice, from, to, Cursor::new(vec![1]), a, &opts)
            .await
            .unwrap_err();
        assert!(matches!(e, AppError::InvalidInput(_)), "{from}->{to}: {e}");
    }
    let st = alice.status("bob").await.expect("status");
    assert_eq!(st.stored_key_count, BLOCKS * 32);
    // A receiver that gets garbage, or nothing, writes nothing.
    let e = bob_receives_bytes(&net, b"GET / HTTP/1.1\r\n\r\n", "g.out").await;
    assert!(
        matches!(e, AppError::Stream(StreamError::Malformed(_))),
        "{e}"
    );
    let e = bob_receives_bytes(&net, b"", "g.out").await;
    assert!(
        matches!(e, AppError::Stream(StreamError::Truncated(_))),
        "{e}"
    );
}

/// The futures can run on a multi-threaded runtime (`tokio::spawn`).
#[allow(dead_code)]
fn futures_are_send(
    c: &qkdnet_kms::client::EtsiClient,
    s1: tokio::net::TcpStream,
    s2: tokio::net::TcpStream,
    o: &Output,
) {
    fn is_send<T: Send>(_: T) {}
    is_send(send(
        c,
        "a",
        "b",
        Cursor::new(vec![]),
        s1,
        &SendOptions::default(),
    ));
    is_send(receive(c, "b", s2, o, &ReceiveOptions::default()));
}

/// alice's whole stream of `plain` (`small()` options) as bytes, recorded by a
/// sink that never acknowledges (so alice's own send fails unconfirmed).
async fn recorded_stream(net: &Net, plain: &[u8]) -> Vec<u8> {
    let (a, mut m) = tokio::io::duplex(1 << 16);
    let alice = net.client("alice");
    let opts = small();
    let tx = send(
        &alice,
        "alice",
        "bob",
        Cursor::new(plain.to_vec()),
        a,
        &opts,
    );
    let rec = async move {
        let (mut buf, mut seen) = (Vec::new(), Vec::new());
        loop {
            if !pull(&mut m, &mut buf, &mut seen).await {
                return seen;
            }
            let done = decode_stream(&seen)
                .ok()
                .is_some_and(|d| d.frames.last().is_some_and(|f| f.kind == FrameKind::End));
            if done {
                return seen; // dropping `m` ends alice's wait for the ack
            }
        }
    };
    let (s, seen) = tokio::join!(tx, rec);
    assert!(s.is_err(), "nobody acknowledged");
    seen
}

/// Issue #18 finding 3 (rest): the stream handshake is cleartext, so anyone on
/// the path can copy it to the listener first. That connection never
/// authenticates, but it made the receiver fetch (and so spend) the key, and the
/// genuine stream then failed. With the key cache of `msg listen`, the key
/// waits for the genuine stream, which is delivered; a control run without the
/// cache shows the attack.
#[tokio::test]
async fn a_copied_handshake_does_not_burn_the_genuine_streams_key() {
    let net = Net::start().await;
    let plain = data(3000, 7);
    let bob = net.client("bob");
    let cache = std::sync::Arc::new(
        qkdnet_apps::keycache::KeyCache::new(
            net.path("bob-cache"),
            "bob",
            b"bob's TLS private key bytes",
            std::time::Duration::from_secs(3600),
        )
        .expect("cache"),
    );
    let with_cache = ReceiveOptions {
        key_cache: Some(cache.clone()),
        ..ReceiveOptions::default()
    };
    for (cached, ropts) in [(true, with_cache), (false, ReceiveOptions::default())] {
        let wire = recorded_stream(&net, &plain).await;
        let hs_len = Handshake::decode(&wire).expect("decodes").expect("whole").1;
        // The copy: the real handshake, then garbage instead of frames.
        let mut copy = wire[..hs_len].to_vec();
        copy.extend_from_slice(&[0x5a; 200]);
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(&copy).await.expect("write");
        drop(a);
        let out = Output::File(net.path("copy.out"));
        assert!(receive(&bob, "bob", b, &out, &ropts).await.is_err());
        assert_no_output(&net.dir, "copy.out");
        // The genuine stream, after the copy.
        let (mut a, b) = tokio::io::duplex(1 << 16);
        a.write_all(&wire).await.expect("write");
        let out = Output::File(net.path("genuine.out"));
        let r = receive(&bob, "bob", b, &out, &ropts).await;
        drop(a);
        if cached {
            let rep = r.expect("the genuine stream is delivered");
            assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
            assert_eq!(std::fs::read(net.path("genuine.out")).expect("out"), plain);
            // Its keys left the cache with it.
            let left = std::fs::read_dir(net.path("bob-cache"))
                .map(|d| {
                    d.flat_map(|e| e.ok())
                        .filter(|e| e.path().is_file())
                        .count()
                })
                .unwrap_or(0);
            assert_eq!(left, 0, "spent keys deleted from the cache");
            std::fs::remove_file(net.path("genuine.out")).expect("rm");
        } else {
            assert!(
                matches!(
                    r,
                    Err(AppError::Client(ClientError::Api { status: 400, .. }))
                ),
                "without the cache the copy burnt the key: {r:?}"
            );
        }
    }
}
