//! `sm4` media mode (`qkdnet_call::media`): RTP and RTCP under SM4-GCM between
//! two edges; what passes, what is dropped and why, and that the sender never
//! seals two packets under one nonce.

use proptest::prelude::*;
use qkdnet_call::media::{
    Counters, Direction, Drop, MAX_SSRCS, Protect, Unprotect, WINDOW, is_rtcp,
};
use qkdnet_media::Key256;

const TAG: usize = 16;

fn key() -> Key256 {
    Key256::new([0x5a; 32])
}

fn pair() -> (Protect, Unprotect) {
    let k = key();
    (
        Protect::new(&k, Direction::CallerToCallee),
        Unprotect::new(&k, Direction::CallerToCallee),
    )
}

/// A plain RTP packet: V=2, PT 0, no CSRC, no extension.
fn rtp(seq: u16, ssrc: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, 0x00];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// An RTP packet with `csrcs` CSRCs and, if `ext_words` is some, a header
/// extension of that many 32-bit words; marker set, PT 8.
fn rtp_full(seq: u16, ssrc: u32, csrcs: u8, ext_words: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let x = if ext_words.is_some() { 0x10 } else { 0 };
    let mut p = vec![0x80 | x | csrcs, 0x80 | 8];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    for i in 0..u32::from(csrcs) {
        p.extend_from_slice(&(0xc5c0_0000 + i).to_be_bytes());
    }
    if let Some(w) = ext_words {
        p.extend_from_slice(&[0xbe, 0xde]);
        p.extend_from_slice(&w.to_be_bytes());
        for i in 0..u32::from(w) * 4 {
            p.push(0xe0 ^ i as u8);
        }
    }
    p.extend_from_slice(payload);
    p
}

fn header_len(csrcs: u8, ext_words: Option<u16>) -> usize {
    12 + 4 * usize::from(csrcs) + ext_words.map_or(0, |w| 4 + 4 * usize::from(w))
}

/// A plain RTCP sender report (PT 200) from `ssrc`, 28 bytes.
fn rtcp_sr(ssrc: u32) -> Vec<u8> {
    let mut p = vec![0x80, 200, 0x00, 0x06];
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&[0x11; 20]);
    p
}

/// A compound RTCP packet: SR then SDES with a CNAME.
fn rtcp_compound(ssrc: u32) -> Vec<u8> {
    let mut p = rtcp_sr(ssrc);
    let cname = b"alice@127.0.0.1";
    let mut sdes = vec![0x81, 202, 0, 0];
    sdes.extend_from_slice(&ssrc.to_be_bytes());
    sdes.push(1);
    sdes.push(cname.len() as u8);
    sdes.extend_from_slice(cname);
    while sdes.len() % 4 != 0 {
        sdes.push(0);
    }
    let words = (sdes.len() / 4 - 1) as u16;
    sdes[2..4].copy_from_slice(&words.to_be_bytes());
    p.extend_from_slice(&sdes);
    p
}

fn sealed(tx: &mut Protect, plain: &[u8]) -> Vec<u8> {
    let mut p = plain.to_vec();
    tx.rtp(&mut p).expect("protects");
    p
}

fn sealed_rtcp(tx: &mut Protect, plain: &[u8]) -> Vec<u8> {
    let mut p = plain.to_vec();
    tx.rtcp(&mut p).expect("protects");
    p
}

fn open(rx: &mut Unprotect, p: &[u8]) -> Result<Vec<u8>, Drop> {
    let mut p = p.to_vec();
    rx.open(&mut p).map(|()| p)
}

#[test]
fn rtp_round_trip_header_clear_payload_encrypted() {
    let (mut tx, mut rx) = pair();
    let payload: Vec<u8> = (0..160u16).map(|i| (i * 7) as u8).collect();
    for (seq, csrcs, ext) in [
        (1u16, 0u8, None),
        (2, 2, None),
        (3, 0, Some(1u16)),
        (4, 15, Some(3)),
        (5, 3, Some(0)),
    ] {
        let plain = rtp_full(seq, 0xdead_beef, csrcs, ext, &payload);
        let hl = header_len(csrcs, ext);
        let p = sealed(&mut tx, &plain);
        assert_eq!(p.len(), plain.len() + TAG);
        assert_eq!(p[..hl], plain[..hl], "the header stays in the clear");
        assert_ne!(p[hl..plain.len()], plain[hl..], "the payload is encrypted");
        assert!(!is_rtcp(&p));
        assert_eq!(open(&mut rx, &p), Ok(plain), "seq {seq}");
    }
    assert_eq!(rx.passed, 5);
    assert_eq!(rx.dropped, Counters::default());
}

#[test]
fn rtp_empty_payload_round_trips() {
    let (mut tx, mut rx) = pair();
    let plain = rtp(9, 1, &[]);
    let p = sealed(&mut tx, &plain);
    assert_eq!(p.len(), 12 + TAG);
    assert_eq!(open(&mut rx, &p), Ok(plain));
}

#[test]
fn same_payload_different_ciphertext_per_packet_and_direction() {
    let k = key();
    let mut a = Protect::new(&k, Direction::CallerToCallee);
    let mut b = Protect::new(&k, Direction::CalleeToCaller);
    let payload = [0u8; 40];
    let p1 = sealed(&mut a, &rtp(1, 7, &payload));
    let p2 = sealed(&mut a, &rtp(2, 7, &payload));
    let q1 = sealed(&mut b, &rtp(1, 7, &payload));
    assert_ne!(p1[12..52], p2[12..52], "a new nonce per sequence number");
    assert_ne!(p1[12..], q1[12..], "each direction has its own key");
    let other = sealed(
        &mut Protect::new(&k, Direction::CallerToCallee),
        &rtp(1, 8, &payload),
    );
    assert_ne!(p1[12..], other[12..], "the SSRC is in the nonce");
}

#[test]
fn rtcp_round_trip() {
    let (mut tx, mut rx) = pair();
    for (i, plain) in [
        rtcp_sr(0x0102_0304),
        rtcp_compound(0x0102_0304),
        rtcp_sr(77),
    ]
    .into_iter()
    .enumerate()
    {
        assert!(is_rtcp(&plain));
        let p = sealed_rtcp(&mut tx, &plain);
        assert_eq!(p.len(), plain.len() + TAG + 4);
        assert_eq!(p[..8], plain[..8], "header and sender SSRC in the clear");
        assert_ne!(p[8..plain.len()], plain[8..], "the rest is encrypted");
        let index = u32::from_be_bytes(p[p.len() - 4..].try_into().unwrap());
        assert_eq!(index, 0x8000_0000 | i as u32, "E bit and the running index");
        assert!(is_rtcp(&p));
        assert_eq!(open(&mut rx, &p), Ok(plain));
    }
    assert_eq!(rx.passed, 3);
    assert_eq!(rx.dropped, Counters::default());
}

#[test]
fn rtp_and_rtcp_interleave() {
    let (mut tx, mut rx) = pair();
    for seq in 0..20u16 {
        let p = sealed(&mut tx, &rtp(seq, 42, b"voice"));
        assert!(open(&mut rx, &p).is_ok());
        if seq % 5 == 0 {
            let c = sealed_rtcp(&mut tx, &rtcp_sr(42));
            assert!(open(&mut rx, &c).is_ok());
        }
    }
    assert_eq!(rx.passed, 24);
}

/// Flips, one at a time, every byte of `p` with several masks; each must be
/// dropped as Auth or Malformed, and counted; nothing passes.
fn every_flip_is_dropped(p: &[u8]) {
    let k = key();
    let mut rx = Unprotect::new(&k, Direction::CallerToCallee);
    let mut flips = 0u64;
    for i in 0..p.len() {
        for mask in [0x01u8, 0x02, 0x10, 0x40, 0x80, 0xff] {
            let mut bad = p.to_vec();
            bad[i] ^= mask;
            match open(&mut rx, &bad) {
                Err(Drop::Auth | Drop::Malformed) => {}
                other => panic!("byte {i} ^ {mask:#04x}: {other:?}"),
            }
            flips += 1;
        }
    }
    assert_eq!(rx.passed, 0, "nothing tampered passes");
    assert_eq!(rx.dropped.auth + rx.dropped.malformed, flips);
    assert_eq!(rx.dropped.replay, 0);
    assert_eq!(rx.dropped.ssrcs, 0);
    assert!(rx.dropped.auth > 0);
    // The untouched packet still opens: nothing above moved the window.
    assert!(open(&mut rx, p).is_ok());
    assert_eq!(rx.passed, 1);
}

#[test]
fn every_single_byte_flip_of_rtp_is_dropped() {
    let (mut tx, _) = pair();
    every_flip_is_dropped(&sealed(&mut tx, &rtp(100, 0xabcd_ef01, &[0x55; 33])));
    every_flip_is_dropped(&sealed(
        &mut tx,
        &rtp_full(101, 0xabcd_ef01, 2, Some(1), &[0x66; 20]),
    ));
}

#[test]
fn every_single_byte_flip_of_rtcp_is_dropped() {
    let (mut tx, _) = pair();
    every_flip_is_dropped(&sealed_rtcp(&mut tx, &rtcp_compound(0x1111_2222)));
}

#[test]
fn truncated_or_extended_packets_are_dropped() {
    let (mut tx, mut rx) = pair();
    let p = sealed(&mut tx, &rtp(1, 5, &[1, 2, 3, 4]));
    for n in 0..p.len() {
        assert!(matches!(
            open(&mut rx, &p[..n]),
            Err(Drop::Auth | Drop::Malformed)
        ));
    }
    let mut longer = p.clone();
    longer.push(0);
    assert_eq!(open(&mut rx, &longer), Err(Drop::Auth));
    // Too short to hold a tag: malformed, without trying the cipher.
    assert_eq!(open(&mut rx, &p[..12 + TAG - 1]), Err(Drop::Malformed));
    assert_eq!(open(&mut rx, &[]), Err(Drop::Malformed));
    assert_eq!(
        open(&mut rx, &[0x40; 40]),
        Err(Drop::Malformed),
        "version 1"
    );

    let c = sealed_rtcp(&mut tx, &rtcp_sr(5));
    for n in 0..c.len() {
        assert!(matches!(
            open(&mut rx, &c[..n]),
            Err(Drop::Auth | Drop::Malformed)
        ));
    }
    // The E bit cleared: malformed.
    let mut no_e = c.clone();
    let n = no_e.len();
    no_e[n - 4] &= 0x7f;
    assert_eq!(open(&mut rx, &no_e), Err(Drop::Malformed));

    assert_eq!(rx.passed, 0);
    assert_eq!(
        rx.dropped.auth + rx.dropped.malformed,
        (p.len() + 4 + c.len() + 1) as u64
    );
    assert!(open(&mut rx, &p).is_ok());
    assert!(open(&mut rx, &c).is_ok());
}

#[test]
fn replayed_packets_are_dropped() {
    let (mut tx, mut rx) = pair();
    let p = sealed(&mut tx, &rtp(500, 9, b"hello"));
    assert!(open(&mut rx, &p).is_ok());
    assert_eq!(open(&mut rx, &p), Err(Drop::Replay));
    assert_eq!(open(&mut rx, &p), Err(Drop::Replay));
    let c = sealed_rtcp(&mut tx, &rtcp_sr(9));
    assert!(open(&mut rx, &c).is_ok());
    assert_eq!(open(&mut rx, &c), Err(Drop::Replay));
    assert_eq!(rx.passed, 2);
    assert_eq!(
        rx.dropped,
        Counters {
            replay: 3,
            ..Counters::default()
        }
    );
}

#[test]
fn reordering_within_the_window_passes_older_is_dropped() {
    let (mut tx, mut rx) = pair();
    let first = 1000u16;
    let packets: Vec<Vec<u8>> = (0..=100u16)
        .map(|i| sealed(&mut tx, &rtp(first + i, 3, &[i as u8; 8])))
        .collect();
    // The newest arrives first.
    assert!(open(&mut rx, &packets[100]).is_ok());
    // 63 behind: inside the window.
    let edge = 100 - (WINDOW as usize - 1);
    assert!(open(&mut rx, &packets[edge]).is_ok());
    // 64 and more behind: too old, even though never seen.
    assert_eq!(open(&mut rx, &packets[edge - 1]), Err(Drop::Replay));
    assert_eq!(open(&mut rx, &packets[0]), Err(Drop::Replay));
    // Shuffled arrivals inside the window all pass, once.
    for i in [70, 68, 90, 69, 99, 98, 50] {
        assert!(open(&mut rx, &packets[i]).is_ok(), "packet {i}");
    }
    for i in [70, 99, 37] {
        assert_eq!(open(&mut rx, &packets[i]), Err(Drop::Replay), "packet {i}");
    }
    assert_eq!(rx.passed, 9);
    assert_eq!(rx.dropped.replay, 5);

    // A jump forward moves the window: what was inside is now too old.
    let mut late = Vec::new();
    for i in 101..=300u16 {
        let p = sealed(&mut tx, &rtp(first + i, 3, b"x"));
        if i == 290 {
            late = p.clone();
        }
        if i == 300 {
            assert!(open(&mut rx, &p).is_ok());
        }
    }
    assert!(open(&mut rx, &late).is_ok(), "10 behind the new highest");
    assert_eq!(open(&mut rx, &packets[98]), Err(Drop::Replay));
}

#[test]
fn rtcp_reordering_and_window() {
    let (mut tx, mut rx) = pair();
    let c: Vec<Vec<u8>> = (0..80)
        .map(|_| sealed_rtcp(&mut tx, &rtcp_sr(11)))
        .collect();
    assert!(open(&mut rx, &c[79]).is_ok());
    assert!(open(&mut rx, &c[16]).is_ok(), "63 behind");
    assert_eq!(open(&mut rx, &c[15]), Err(Drop::Replay), "64 behind");
    assert!(open(&mut rx, &c[40]).is_ok());
    assert_eq!(open(&mut rx, &c[40]), Err(Drop::Replay));
}

#[test]
fn sequence_wrap_keeps_passing() {
    let (mut tx, mut rx) = pair();
    let seqs: Vec<u16> = (65_500..=65_535).chain(0..20).collect();
    let mut sealed_all = Vec::new();
    for &s in &seqs {
        let plain = rtp(s, 0x5eed, &s.to_be_bytes());
        let p = sealed(&mut tx, &plain);
        assert_eq!(open(&mut rx, &p), Ok(plain), "seq {s}");
        sealed_all.push((s, p));
    }
    assert_eq!(rx.passed, seqs.len() as u64);
    // After the wrap, a late copy of a packet from before it is still placed
    // right: a replay (it was seen), not a forgery.
    let (_, before_wrap) = sealed_all.iter().find(|(s, _)| *s == 65_535).unwrap();
    assert_eq!(open(&mut rx, before_wrap), Err(Drop::Replay));
    let (_, after_wrap) = sealed_all.iter().find(|(s, _)| *s == 3).unwrap();
    assert_eq!(open(&mut rx, after_wrap), Err(Drop::Replay));
    assert_eq!(rx.dropped.auth, 0);

    // Reordered across the wrap: 65534, 1, 65535, 0, 2.
    let (mut tx, mut rx) = pair();
    let mk = |tx: &mut Protect, s: u16| sealed(tx, &rtp(s, 1, b"w"));
    let warm: Vec<_> = (65_500..=65_533).map(|s| mk(&mut tx, s)).collect();
    for p in &warm {
        assert!(open(&mut rx, p).is_ok());
    }
    let batch: Vec<(u16, Vec<u8>)> = [65_534u16, 65_535, 0, 1, 2]
        .into_iter()
        .map(|s| (s, mk(&mut tx, s)))
        .collect();
    for at in [0, 3, 1, 2, 4] {
        let (s, p) = &batch[at];
        assert!(open(&mut rx, p).is_ok(), "seq {s}");
    }

    // The roll-over counter is in the nonce: a packet sealed after the wrap
    // does not open at a receiver that never saw the wrap.
    let mut fresh = Unprotect::new(&key(), Direction::CallerToCallee);
    let (_, p) = &batch[4];
    assert_eq!(open(&mut fresh, p), Err(Drop::Auth));
}

#[test]
fn several_wraps() {
    // Steps of 97 sequence numbers: the 48-bit index keeps up through three
    // wraps of the 16-bit sequence number.
    let (mut tx, mut rx) = pair();
    let mut s = 60_000u16;
    let n = 3 * 65_536 / 97 + 10;
    for _ in 0..n {
        s = s.wrapping_add(97);
        let p = sealed(&mut tx, &rtp(s, 2, b"z"));
        assert!(open(&mut rx, &p).is_ok(), "seq {s}");
    }
    assert_eq!(rx.passed, n as u64);
    assert_eq!(rx.dropped, Counters::default());
    // The receiver is now at roll-over counter 3: a packet sealed at the same
    // sequence number but roll-over counter 0 does not open.
    let mut early = Protect::new(&key(), Direction::CallerToCallee);
    let p = sealed(&mut early, &rtp(s.wrapping_add(1), 2, b"z"));
    assert_eq!(open(&mut rx, &p), Err(Drop::Auth));
}

#[test]
fn another_key_or_direction_fails_auth() {
    let k = key();
    let mut tx = Protect::new(&k, Direction::CallerToCallee);
    let p = sealed(&mut tx, &rtp(1, 1, b"secret words"));
    let c = sealed_rtcp(&mut tx, &rtcp_sr(1));

    let mut other_key = Unprotect::new(&Key256::new([0xa5; 32]), Direction::CallerToCallee);
    let mut other_dir = Unprotect::new(&k, Direction::CalleeToCaller);
    for rx in [&mut other_key, &mut other_dir] {
        assert_eq!(open(rx, &p), Err(Drop::Auth));
        assert_eq!(open(rx, &c), Err(Drop::Auth));
        assert_eq!(rx.dropped.auth, 2);
        assert_eq!(rx.passed, 0);
    }
    // The right receiver opens both.
    let mut rx = Unprotect::new(&k, Direction::CallerToCallee);
    assert!(open(&mut rx, &p).is_ok());
    assert!(open(&mut rx, &c).is_ok());

    // The callee's own direction works with its pair.
    let mut back = Protect::new(&k, Direction::CalleeToCaller);
    let q = sealed(&mut back, &rtp(1, 1, b"reply"));
    assert!(open(&mut other_dir, &q).is_ok());
    let mut wrong = Unprotect::new(&k, Direction::CallerToCallee);
    assert_eq!(open(&mut wrong, &q), Err(Drop::Auth));
}

#[test]
fn too_many_ssrcs() {
    let k = key();
    let mut tx = Protect::new(&k, Direction::CallerToCallee);
    let mut rx = Unprotect::new(&k, Direction::CallerToCallee);
    let max = MAX_SSRCS as u32;
    for ssrc in 0..max {
        let p = sealed(&mut tx, &rtp(1, ssrc, b"a"));
        assert!(open(&mut rx, &p).is_ok());
    }
    // The sender refuses a further SSRC, and leaves the packet as it was.
    let plain = rtp(1, max, b"a");
    let mut p = plain.clone();
    assert_eq!(tx.rtp(&mut p), Err(Drop::TooManySsrcs));
    assert_eq!(p, plain);
    // Known SSRCs keep going.
    let p = sealed(&mut tx, &rtp(2, 0, b"b"));
    assert!(open(&mut rx, &p).is_ok());

    // The receiver refuses one too (sealed by a second sender here).
    let mut tx2 = Protect::new(&k, Direction::CallerToCallee);
    let p = sealed(&mut tx2, &rtp(1, max, b"a"));
    assert_eq!(open(&mut rx, &p), Err(Drop::TooManySsrcs));
    assert_eq!(rx.dropped.ssrcs, 1);
    assert_eq!(rx.passed, u64::from(max) + 1);

    // RTCP: the receiver's limit is per kind.
    for ssrc in 0..max {
        let c = sealed_rtcp(&mut tx, &rtcp_sr(ssrc));
        assert!(open(&mut rx, &c).is_ok());
    }
    let c = sealed_rtcp(&mut tx, &rtcp_sr(max));
    assert_eq!(open(&mut rx, &c), Err(Drop::TooManySsrcs));
    assert_eq!(rx.dropped.ssrcs, 2);
}

#[test]
fn forged_packets_do_not_take_ssrc_slots() {
    let k = key();
    let mut rx = Unprotect::new(&k, Direction::CallerToCallee);
    // Without the key, packets from many SSRCs fail and take no slot.
    for ssrc in 0..100u32 {
        let mut junk = rtp(1, 1000 + ssrc, &[0u8; 40]);
        junk.extend_from_slice(&[0u8; TAG]);
        assert_eq!(open(&mut rx, &junk), Err(Drop::Auth));
        let mut junk = rtcp_sr(1000 + ssrc);
        junk.extend_from_slice(&[0u8; TAG]);
        junk.extend_from_slice(&0x8000_0000u32.to_be_bytes());
        assert_eq!(open(&mut rx, &junk), Err(Drop::Auth));
    }
    let mut tx = Protect::new(&k, Direction::CallerToCallee);
    for ssrc in 0..MAX_SSRCS as u32 {
        assert!(open(&mut rx, &sealed(&mut tx, &rtp(1, ssrc, b"ok"))).is_ok());
        assert!(open(&mut rx, &sealed_rtcp(&mut tx, &rtcp_sr(ssrc))).is_ok());
    }
    assert_eq!(rx.dropped.auth, 200);
    assert_eq!(rx.dropped.ssrcs, 0);
}

#[test]
fn forged_packets_do_not_move_the_window() {
    // A forged packet far ahead must not push genuine ones out of the window.
    let (mut tx, mut rx) = pair();
    let p1 = sealed(&mut tx, &rtp(10, 4, b"a"));
    let p2 = sealed(&mut tx, &rtp(11, 4, b"b"));
    assert!(open(&mut rx, &p1).is_ok());
    let mut forged = rtp(30_000, 4, &[9; 10]);
    forged.extend_from_slice(&[7; TAG]);
    assert_eq!(open(&mut rx, &forged), Err(Drop::Auth));
    assert!(open(&mut rx, &p2).is_ok());
}

#[test]
fn sender_never_seals_one_nonce_twice() {
    let (mut tx, mut rx) = pair();
    let plain = rtp(7, 99, b"first");
    let first = sealed(&mut tx, &plain);
    // The softphone sends seq 7 again (a retransmission, or another payload).
    for again in [plain.clone(), rtp(7, 99, b"other payload")] {
        let mut p = again.clone();
        assert_eq!(tx.rtp(&mut p), Err(Drop::Replay));
        assert_eq!(p, again, "refused packets are left untouched");
    }
    // Same seq under another SSRC is another nonce: fine.
    let other = sealed(&mut tx, &rtp(7, 100, b"first"));
    assert_ne!(other[12..], first[12..]);
    // Later sequence numbers go on; earlier ones inside the window that were
    // never sealed are still allowed once; too old ones are refused.
    for s in [8u16, 100, 50, 60] {
        let _ = sealed(&mut tx, &rtp(s, 99, b"x"));
    }
    for s in [8u16, 50, 100, 7, 36] {
        let mut p = rtp(s, 99, b"x");
        assert_eq!(tx.rtp(&mut p), Err(Drop::Replay), "seq {s}");
    }
    let _ = sealed(&mut tx, &rtp(37, 99, b"x"));
    // Across a wrap too.
    let mut s = 65_530u16;
    for _ in 0..12 {
        let _ = sealed(&mut tx, &rtp(s, 5, b"x"));
        s = s.wrapping_add(1);
    }
    for s in [65_531u16, 65_535, 0, 5] {
        let mut p = rtp(s, 5, b"x");
        assert_eq!(tx.rtp(&mut p), Err(Drop::Replay), "seq {s}");
    }
    assert!(open(&mut rx, &first).is_ok());
}

#[test]
fn protect_refuses_non_rtp() {
    let (mut tx, _) = pair();
    for bad in [
        vec![],
        vec![0x80; 11],
        vec![0x40; 20],                                    // version 1
        vec![0x8f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // 15 CSRCs announced, none there
        {
            let mut p = rtp(1, 1, &[]);
            p[0] |= 0x10; // extension announced, none there
            p
        },
        {
            let mut p = rtp_full(1, 1, 0, Some(4), &[]);
            p.truncate(p.len() - 1); // extension shorter than it says
            p
        },
    ] {
        let mut p = bad.clone();
        assert_eq!(tx.rtp(&mut p), Err(Drop::Malformed), "{bad:?}");
        assert_eq!(p, bad);
    }
    for bad in [
        vec![],
        vec![0x80, 200, 0, 1, 0, 0, 0],
        rtp(1, 1, b"not rtcp"),
    ] {
        let mut p = bad.clone();
        assert_eq!(tx.rtcp(&mut p), Err(Drop::Malformed));
        assert_eq!(p, bad);
    }
}

#[test]
fn is_rtcp_by_payload_type() {
    assert!(is_rtcp(&rtcp_sr(1)));
    for pt in 200..=211u8 {
        assert!(is_rtcp(&[0x80, pt, 0, 1, 0, 0, 0, 0]));
    }
    assert!(!is_rtcp(&[0x80, 199, 0, 1, 0, 0, 0, 0]));
    assert!(!is_rtcp(&[0x80, 212, 0, 1, 0, 0, 0, 0]));
    assert!(!is_rtcp(&[0x40, 200, 0, 1, 0, 0, 0, 0]), "version 1");
    assert!(!is_rtcp(&[0x80, 200, 0, 1, 0, 0, 0]), "7 bytes");
    assert!(!is_rtcp(&rtp(1, 1, b"audio")));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn open_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut rx = Unprotect::new(&key(), Direction::CallerToCallee);
        let mut p = bytes.clone();
        let r = rx.open(&mut p);
        prop_assert!(r.is_err(), "random bytes do not authenticate");
        prop_assert_eq!(rx.passed, 0);
        let d = rx.dropped;
        prop_assert_eq!(d.malformed + d.auth + d.replay + d.ssrcs, 1);
    }

    #[test]
    fn open_never_panics_on_rtp_like(
        first in prop_oneof![Just(0x80u8), Just(0x90), 0x80u8..0xc0],
        second in any::<u8>(),
        rest in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut rx = Unprotect::new(&key(), Direction::CallerToCallee);
        let mut p = vec![first, second];
        p.extend_from_slice(&rest);
        prop_assert!(rx.open(&mut p).is_err());
        let mut p = vec![first, second];
        p.extend_from_slice(&rest);
        let mut tx = Protect::new(&key(), Direction::CallerToCallee);
        let _ = tx.rtp(&mut p.clone());
        let _ = tx.rtcp(&mut p);
    }

    #[test]
    fn rtp_round_trips(
        seq in any::<u16>(),
        ssrc in any::<u32>(),
        csrcs in 0u8..16,
        ext in proptest::option::of(0u16..8),
        payload in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let (mut tx, mut rx) = pair();
        let plain = rtp_full(seq, ssrc, csrcs, ext, &payload);
        let mut p = plain.clone();
        prop_assume!(!is_rtcp(&p));
        tx.rtp(&mut p).unwrap();
        prop_assert_eq!(p.len(), plain.len() + TAG);
        let hl = header_len(csrcs, ext);
        prop_assert_eq!(&p[..hl], &plain[..hl]);
        rx.open(&mut p).unwrap();
        prop_assert_eq!(p, plain);
    }

    #[test]
    fn rtcp_round_trips(ssrc in any::<u32>(), pt in 200u8..=211, body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let (mut tx, mut rx) = pair();
        let mut plain = vec![0x80, pt, 0, 0];
        plain.extend_from_slice(&ssrc.to_be_bytes());
        plain.extend_from_slice(&body);
        let mut p = plain.clone();
        tx.rtcp(&mut p).unwrap();
        rx.open(&mut p).unwrap();
        prop_assert_eq!(p, plain);
    }

    #[test]
    fn in_order_stream_from_any_start_passes(start in any::<u16>(), n in 1usize..200) {
        let (mut tx, mut rx) = pair();
        let mut s = start;
        for _ in 0..n {
            let p = sealed(&mut tx, &rtp(s, 1, b"."));
            prop_assert!(open(&mut rx, &p).is_ok(), "seq {}", s);
            s = s.wrapping_add(1);
        }
        prop_assert_eq!(rx.passed, n as u64);
    }
}
