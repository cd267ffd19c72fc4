//! `otp` media mode: RTP and RTCP between two edges under a one-time pad taken
//! one-for-one from QKD keys, with a Wegman–Carter MAC; sans-IO.
//!
//! # Where the pad comes from
//!
//! Both edges are SAEs of the QKD network (fixed secure phones at QKD nodes).
//! Each edge is the *master* of the direction it sends: it takes keys from
//! its KME with ETSI GS QKD 014 `enc_keys` naming the far edge's SAE, and tells
//! the far edge their IDs in an [`Announce`]; the far edge takes the same keys
//! with `dec_keys`. The keys are concatenated, in the announced order, into a
//! *segment* of the direction's pad, which is one byte stream numbered from 0.
//! The pad never passes through any cipher on its way here other than the
//! KMEs' own one-time-padded relay and the local mutual-TLS hop between an SAE
//! and its KME (as for every ETSI key).
//!
//! # Packets
//!
//! ```text
//! header ‖ payload ⊕ pad[o+16 .. o+16+n] ‖ counter (8) ‖ o (8) ‖ tag (16)
//! tag = GHASH_H(header ‖ counter ‖ o, ciphertext) ⊕ pad[o .. o+16]
//! ```
//!
//! `header` is the RTP header (fixed part, CSRCs, extension) or the first 8
//! bytes of RTCP, in the clear as in SRTP. `o` is the packet's offset in the
//! direction's pad, `counter` the sender's packet number (RTP and RTCP share
//! it). `H` is the first 16 bytes of the direction's pad (offset 0..16), reused
//! for the whole call as Wegman–Carter allows; every tag mask is fresh pad
//! ([`qkdnet_crypto::otp::wegman_carter_tag`]). A packet never spans two
//! segments: the sender skips the rest of a segment that cannot hold it.
//! Pad per G.711 packet (160 bytes of payload): 176 bytes; 8,800 bytes a
//! second each way at 50 packets a second, plus RTCP.
//!
//! # Freshness and loss
//!
//! The receiver keeps a 64-packet window on the authenticated counter: a
//! replayed or too old packet is dropped and counted, a tampered one fails its
//! tag. Used pad is zeroized at once on both sides; the receiver frees a
//! segment once packets of the segment after next arrive. A packet whose pad
//! has not arrived (its announcement lost or still being fetched) is dropped
//! and counted as [`Drop::NoPad`] — the edge first holds such packets for
//! up to [`HOLD`] while the pad is fetched ([`OtpRecv::pad_here`]); a sender
//! without pad drops what it would send and counts it the same way — never a
//! packet in the clear.
//!
//! # Announcements
//!
//! ```text
//! "QKDP" ‖ version 1 ‖ n (1..=64) ‖ start (8) ‖ key bytes (2) ‖ n key IDs (16 each) ‖ tag (32)
//! tag = HMAC-SM3(K_ann, everything before it)
//! K_ann = HKDF-SM3(call's session key, "qkdnet call otp announce v1", direction)
//! ```
//!
//! An announcement is not secret (key IDs only); the tag keeps anyone on the
//! path from making the far edge spend its KME's keys on IDs it names. It is
//! sent on the media path (its first byte is not RTP version 2) as soon as the
//! segment is installed and repeated with later packets, since UDP may lose it.
//!
//! Written here because no crate offers a one-time-pad RTP profile.

use std::collections::{BTreeMap, VecDeque};

use qkdnet_crypto::otp::{WC_TAG_LEN, wegman_carter_tag};
use qkdnet_media::Key256;
use subtle::ConstantTimeEq;
use uuid::Uuid;
use zeroize::{Zeroize, Zeroizing};

use crate::media::{ControlMac, Counters, Direction, Drop, Window, is_rtcp, rtp_header_len};

/// Bytes the pad gives each packet besides its payload (the tag mask).
pub const MASK_LEN: usize = WC_TAG_LEN;
/// Bytes a packet grows by: counter, offset, tag.
pub const TRAILER_LEN: usize = 8 + 8 + WC_TAG_LEN;
/// Most keys one announcement names.
pub const MAX_ANNOUNCE_KEYS: usize = 64;
/// Largest key an announcement may name, bytes (the ETSI default maximum,
/// 8192 bits).
pub const MAX_KEY_BYTES: usize = 1024;
/// Announcement magic (its first byte, 0x51, is not RTP version 2).
pub const MAGIC: [u8; 4] = *b"QKDP";
const VERSION: u8 = 1;
const ANN_HEADER: usize = 4 + 1 + 1 + 8 + 2;
const ANN_TAG: usize = 32;
/// Segments a receiver holds at most (the current one, the one before it
/// for late packets, and ones announced ahead).
pub const MAX_SEGMENTS: usize = 6;
/// How long a relay may hold a packet whose pad is being fetched.
pub const HOLD: std::time::Duration = std::time::Duration::from_millis(1000);
/// Packets a relay holds at most while pad is fetched.
pub const MAX_HELD: usize = 64;
/// Pad of one G.711 packet: 160 bytes of payload and the tag mask.
pub const G711_PACKET_PAD: u64 = 160 + MASK_LEN as u64;
/// Pad one G.711 direction uses per second (50 packets).
pub const G711_PAD_PER_SECOND: u64 = 50 * G711_PACKET_PAD;

/// Is this datagram an announcement (not RTP/RTCP)?
pub fn is_announce(p: &[u8]) -> bool {
    p.starts_with(&MAGIC)
}

/// Keys that became pad at `start` of a direction's pad.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    /// Offset of the segment's first byte in the direction's pad.
    pub start: u64,
    /// Length of each key, bytes.
    pub key_bytes: u16,
    /// The keys' IDs, in pad order.
    pub ids: Vec<Uuid>,
}

impl Announce {
    /// Bytes of pad the segment holds.
    pub fn len(&self) -> u64 {
        self.ids.len() as u64 * u64::from(self.key_bytes)
    }

    /// Whether it names no key (never true of a decoded one).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Why an announcement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnounceError {
    /// Not an announcement, wrong length, version or limits.
    #[error("malformed pad announcement")]
    Malformed,
    /// The tag does not verify.
    #[error("pad announcement failed authentication")]
    Auth,
}

/// The announcement key of direction `dir` of the call keyed by `session`.
pub struct AnnounceKey(ControlMac);

impl std::fmt::Debug for AnnounceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AnnounceKey(..)")
    }
}

impl AnnounceKey {
    /// Derives it (HKDF-SM3).
    pub fn derive(session: &Key256, dir: Direction) -> Self {
        Self(ControlMac::derive(
            session,
            b"qkdnet call otp announce v1",
            dir,
        ))
    }

    /// Encodes `a` (at most [`MAX_ANNOUNCE_KEYS`] keys of at most
    /// [`MAX_KEY_BYTES`] bytes; larger lists are a caller bug and truncated).
    pub fn encode(&self, a: &Announce) -> Vec<u8> {
        let n = a.ids.len().min(MAX_ANNOUNCE_KEYS);
        let mut out = Vec::with_capacity(ANN_HEADER + 16 * n + ANN_TAG);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(n as u8);
        out.extend_from_slice(&a.start.to_be_bytes());
        out.extend_from_slice(&a.key_bytes.to_be_bytes());
        for id in &a.ids[..n] {
            out.extend_from_slice(id.as_bytes());
        }
        let t = self.0.tag(&out);
        out.extend_from_slice(&t);
        out
    }

    /// Decodes and checks an announcement.
    pub fn decode(&self, p: &[u8]) -> Result<Announce, AnnounceError> {
        if p.len() < ANN_HEADER + ANN_TAG || !is_announce(p) || p[4] != VERSION {
            return Err(AnnounceError::Malformed);
        }
        let n = usize::from(p[5]);
        if n == 0 || n > MAX_ANNOUNCE_KEYS || p.len() != ANN_HEADER + 16 * n + ANN_TAG {
            return Err(AnnounceError::Malformed);
        }
        let (body, tag) = p.split_at(p.len() - ANN_TAG);
        if !self.0.verify(body, tag) {
            return Err(AnnounceError::Auth);
        }
        let mut start = [0u8; 8];
        start.copy_from_slice(&p[6..14]);
        let key_bytes = u16::from_be_bytes([p[14], p[15]]);
        if key_bytes == 0 || usize::from(key_bytes) > MAX_KEY_BYTES {
            return Err(AnnounceError::Malformed);
        }
        let ids = body[ANN_HEADER..]
            .chunks_exact(16)
            .map(|c| {
                let mut b = [0u8; 16];
                b.copy_from_slice(c);
                Uuid::from_bytes(b)
            })
            .collect();
        Ok(Announce {
            start: u64::from_be_bytes(start),
            key_bytes,
            ids,
        })
    }
}

/// One segment of a direction's pad.
struct Segment {
    start: u64,
    pad: Zeroizing<Vec<u8>>,
}

impl Segment {
    fn end(&self) -> u64 {
        self.start + self.pad.len() as u64
    }
}

/// The header length of an RTP or RTCP packet.
fn header_len(p: &[u8]) -> Result<usize, Drop> {
    if is_rtcp(p) { Ok(8) } else { rtp_header_len(p) }
}

/// The parts of a received packet: header length, where the trailer starts,
/// and the trailer's counter, offset and tag.
struct Trailer {
    hl: usize,
    body_end: usize,
    counter: u64,
    offset: u64,
    tag: [u8; WC_TAG_LEN],
}

impl Trailer {
    fn parse(p: &[u8]) -> Result<Self, Drop> {
        if p.len() < 8 + TRAILER_LEN {
            return Err(Drop::Malformed);
        }
        let body_end = p.len() - TRAILER_LEN;
        let hl = header_len(&p[..body_end])?;
        let t = &p[body_end..];
        let word = |at: usize| u64::from_be_bytes(t[at..at + 8].try_into().expect("8 bytes"));
        let mut tag = [0u8; WC_TAG_LEN];
        tag.copy_from_slice(&t[16..]);
        Ok(Self {
            hl,
            body_end,
            counter: word(0),
            offset: word(8),
            tag,
        })
    }

    /// Pad the packet uses: the tag mask and its payload.
    fn need(&self) -> u64 {
        (MASK_LEN + self.body_end - self.hl) as u64
    }
}

fn take_hash_key(seg: &mut Segment) -> Option<Zeroizing<[u8; 16]>> {
    if seg.start != 0 || seg.pad.len() < MASK_LEN {
        return None;
    }
    let mut h = Zeroizing::new([0u8; 16]);
    h.copy_from_slice(&seg.pad[..16]);
    seg.pad[..16].zeroize();
    Some(h)
}

fn aad(header: &[u8], counter: u64, offset: u64) -> Vec<u8> {
    let mut a = Vec::with_capacity(header.len() + 16);
    a.extend_from_slice(header);
    a.extend_from_slice(&counter.to_be_bytes());
    a.extend_from_slice(&offset.to_be_bytes());
    a
}

/// The sending side of one direction.
pub struct OtpSend {
    hash_key: Option<Zeroizing<[u8; 16]>>,
    segs: VecDeque<Segment>,
    /// Next unused pad offset.
    cursor: u64,
    counter: u64,
    /// Pad installed, bytes.
    pub pad_bytes: u64,
    /// Pad spent on packets (masks, payloads) and skipped at segment ends.
    pub used_bytes: u64,
    /// Packets dropped for want of pad.
    pub no_pad: u64,
}

impl std::fmt::Debug for OtpSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtpSend")
            .field("cursor", &self.cursor)
            .field("remaining", &self.remaining())
            .finish_non_exhaustive()
    }
}

impl Default for OtpSend {
    fn default() -> Self {
        Self::new()
    }
}

impl OtpSend {
    /// A sender with no pad yet.
    pub fn new() -> Self {
        Self {
            hash_key: None,
            segs: VecDeque::new(),
            cursor: 0,
            counter: 0,
            pad_bytes: 0,
            used_bytes: 0,
            no_pad: 0,
        }
    }

    /// Where the next segment starts (the end of the last one installed).
    pub fn next_start(&self) -> u64 {
        self.segs.back().map_or(self.cursor, Segment::end)
    }

    /// Pad left to send with, bytes.
    pub fn remaining(&self) -> u64 {
        self.next_start().saturating_sub(self.cursor)
    }

    /// Adds `pad` (the concatenated keys) as the next segment and returns its
    /// announcement start. The first segment's first 16 bytes become `H`.
    pub fn install(&mut self, pad: Zeroizing<Vec<u8>>) -> u64 {
        let start = self.next_start();
        let mut seg = Segment { start, pad };
        self.pad_bytes += seg.pad.len() as u64;
        if self.hash_key.is_none() {
            if let Some(h) = take_hash_key(&mut seg) {
                self.hash_key = Some(h);
                self.cursor = MASK_LEN as u64;
                self.used_bytes += MASK_LEN as u64;
            }
        }
        self.segs.push_back(seg);
        start
    }

    /// Protects an RTP or RTCP packet in place.
    pub fn protect(&mut self, p: &mut Vec<u8>) -> Result<(), Drop> {
        let hl = header_len(p)?;
        let need = (MASK_LEN + p.len() - hl) as u64;
        let Some(h) = self.hash_key.as_ref() else {
            self.no_pad += 1;
            return Err(Drop::NoPad);
        };
        // A packet larger than a whole segment never fits: dropped, and no
        // pad is thrown away for it.
        if self.segs.front().is_some_and(|s| need > s.pad.len() as u64) {
            self.no_pad += 1;
            return Err(Drop::NoPad);
        }
        // The segment holding [cursor, cursor + need), skipping ends too short.
        loop {
            let Some(seg) = self.segs.front() else {
                self.no_pad += 1;
                return Err(Drop::NoPad);
            };
            if self.cursor < seg.start {
                self.cursor = seg.start;
            }
            if self.cursor + need <= seg.end() {
                break;
            }
            self.used_bytes += seg.end().saturating_sub(self.cursor);
            self.cursor = seg.end();
            self.segs.pop_front();
        }
        let seg = self.segs.front_mut().expect("invariant: found above");
        let at = (self.cursor - seg.start) as usize;
        let used = &mut seg.pad[at..at + need as usize];
        let (mask, ks) = used.split_at_mut(MASK_LEN);
        for (b, k) in p[hl..].iter_mut().zip(ks.iter()) {
            *b ^= k;
        }
        let mut m = [0u8; 16];
        m.copy_from_slice(mask);
        let offset = self.cursor;
        let counter = self.counter;
        let tag = wegman_carter_tag(h, &m, &aad(&p[..hl], counter, offset), &p[hl..]);
        m.zeroize();
        used.zeroize();
        p.extend_from_slice(&counter.to_be_bytes());
        p.extend_from_slice(&offset.to_be_bytes());
        p.extend_from_slice(&tag);
        self.cursor += need;
        self.used_bytes += need;
        self.counter += 1;
        if self.segs.front().is_some_and(|s| self.cursor >= s.end()) {
            self.segs.pop_front();
        }
        Ok(())
    }
}

/// The receiving side of one direction.
pub struct OtpRecv {
    hash_key: Option<Zeroizing<[u8; 16]>>,
    segs: BTreeMap<u64, Segment>,
    /// Segment starts announced (asked for or installed), newest last.
    seen: VecDeque<u64>,
    window: Window,
    /// Highest segment start a packet was accepted in.
    current: u64,
    /// Pad installed, bytes.
    pub pad_bytes: u64,
    /// Packets that verified.
    pub passed: u64,
    /// Packets dropped, by reason.
    pub dropped: Counters,
}

impl std::fmt::Debug for OtpRecv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtpRecv")
            .field("segments", &self.segs.len())
            .field("passed", &self.passed)
            .finish_non_exhaustive()
    }
}

impl Default for OtpRecv {
    fn default() -> Self {
        Self::new()
    }
}

impl OtpRecv {
    /// A receiver with no pad yet.
    pub fn new() -> Self {
        Self {
            hash_key: None,
            segs: BTreeMap::new(),
            seen: VecDeque::new(),
            window: Window::default(),
            current: 0,
            pad_bytes: 0,
            passed: 0,
            dropped: Counters::default(),
        }
    }

    /// Should the keys of `a` be fetched? True once per segment start, and
    /// only for segments not behind the ones in use nor too far ahead.
    pub fn wants(&mut self, a: &Announce) -> bool {
        if self.seen.contains(&a.start) || a.start < self.current {
            return false;
        }
        if self.segs.len() >= MAX_SEGMENTS {
            return false;
        }
        self.seen.push_back(a.start);
        if self.seen.len() > 4 * MAX_SEGMENTS {
            self.seen.pop_front();
        }
        true
    }

    /// Forgets that `start` was asked for (its fetch failed; a repeat of the
    /// announcement may try again).
    pub fn unwant(&mut self, start: u64) {
        self.seen.retain(|s| *s != start);
    }

    /// Installs the keys of an announced segment (concatenated in order).
    pub fn install(&mut self, start: u64, pad: Zeroizing<Vec<u8>>) {
        let mut seg = Segment { start, pad };
        self.pad_bytes += seg.pad.len() as u64;
        if start == 0 && self.hash_key.is_none() {
            self.hash_key = take_hash_key(&mut seg);
        }
        self.segs.insert(start, seg);
    }

    /// Whether the pad a packet names is here (true also for a packet that
    /// does not parse: [`OtpRecv::open`] then counts it). A relay may hold a
    /// packet whose pad is still being fetched instead of dropping it.
    pub fn pad_here(&self, p: &[u8]) -> bool {
        let Ok(t) = Trailer::parse(p) else {
            return true;
        };
        (self.hash_key.is_some() && self.segment_for(t.offset, t.need()).is_some())
            || t.offset < self.current
    }

    /// The start of the installed segment holding `[offset, offset + need)`.
    fn segment_for(&self, offset: u64, need: u64) -> Option<u64> {
        self.segs
            .range(..=offset)
            .next_back()
            .filter(|(_, s)| offset.checked_add(need).is_some_and(|e| e <= s.end()))
            .map(|(start, _)| *start)
    }

    /// Checks and decrypts a packet in place (the trailer removed).
    pub fn open(&mut self, p: &mut Vec<u8>) -> Result<(), Drop> {
        let r = self.open_inner(p);
        match r {
            Ok(()) => self.passed += 1,
            Err(d) => self.dropped.count(d),
        }
        r
    }

    fn open_inner(&mut self, p: &mut Vec<u8>) -> Result<(), Drop> {
        let t = Trailer::parse(p)?;
        let (hl, body_end, counter, offset) = (t.hl, t.body_end, t.counter, t.offset);
        self.window.check(counter)?;
        if offset < MASK_LEN as u64 {
            // The hash key's bytes are never a packet's pad.
            return Err(Drop::Auth);
        }
        let Some(h) = self.hash_key.as_ref() else {
            return Err(Drop::NoPad);
        };
        let need = t.need();
        let Some(seg) = self
            .segment_for(offset, need)
            .and_then(|start| self.segs.get_mut(&start))
        else {
            return Err(Drop::NoPad);
        };
        let at = (offset - seg.start) as usize;
        let used = &mut seg.pad[at..at + need as usize];
        let mut m = [0u8; 16];
        m.copy_from_slice(&used[..MASK_LEN]);
        let want = wegman_carter_tag(h, &m, &aad(&p[..hl], counter, offset), &p[hl..body_end]);
        m.zeroize();
        if !bool::from(want.ct_eq(&t.tag)) {
            return Err(Drop::Auth);
        }
        for (b, k) in p[hl..body_end].iter_mut().zip(&used[MASK_LEN..]) {
            *b ^= k;
        }
        used.zeroize();
        self.window.accept(counter);
        p.truncate(body_end);
        // Free segments older than the one before the current.
        let start = seg.start;
        if start > self.current {
            self.current = start;
            let keep = self.segs.range(..start).next_back().map(|(s, _)| *s);
            if let Some(keep) = keep {
                self.segs.retain(|s, _| *s >= keep);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtp(seq: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x80, 0, 0, 0, 0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef];
        p[2..4].copy_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    fn pad(len: usize, seed: u8) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect(),
        )
    }

    #[test]
    fn packets_round_trip_across_segments_and_use_pad_one_for_one() {
        let mut s = OtpSend::new();
        let mut r = OtpRecv::new();
        assert_eq!(s.install(pad(1024, 1)), 0);
        assert_eq!(s.install(pad(1024, 2)), 1024);
        r.install(0, pad(1024, 1));
        r.install(1024, pad(1024, 2));
        let mut sent = 0;
        for seq in 0..11u16 {
            let plain = rtp(seq, &[seq as u8; 160]);
            let mut p = plain.clone();
            match s.protect(&mut p) {
                Ok(()) => {
                    sent += 1;
                    assert_eq!(p.len(), plain.len() + TRAILER_LEN);
                    assert_ne!(&p[12..172], &plain[12..]);
                    r.open(&mut p).expect("opens");
                    assert_eq!(p, plain);
                }
                Err(Drop::NoPad) => break,
                Err(e) => panic!("{e}"),
            }
        }
        // 2048 bytes of pad: H (16), then 176 per packet, not across segments:
        // 5 in the first segment (16 + 5 * 176 = 896), 5 in the second.
        assert_eq!(sent, 10);
        assert_eq!(s.no_pad, 1);
        assert_eq!(r.passed, 10);
    }

    #[test]
    fn tampered_replayed_and_unpadded_packets_are_dropped_and_counted() {
        let mut s = OtpSend::new();
        let mut r = OtpRecv::new();
        s.install(pad(4096, 9));
        let mut p = rtp(1, b"hello world");
        s.protect(&mut p).expect("pad");
        let good = p.clone();
        // Before the pad arrived.
        assert_eq!(r.open(&mut p.clone()), Err(Drop::NoPad));
        r.install(0, pad(4096, 9));
        for at in [2, 12, p.len() - 20, p.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            let e = r.open(&mut bad).expect_err("tampered");
            assert!(matches!(e, Drop::Auth | Drop::NoPad), "{at}: {e:?}");
        }
        r.open(&mut p).expect("intact");
        assert_eq!(r.open(&mut good.clone()), Err(Drop::Replay));
        assert_eq!(r.open(&mut vec![0x80; 20]), Err(Drop::Malformed));
        assert_eq!(r.passed, 1);
        assert!(r.dropped.auth >= 3 && r.dropped.replay == 1);
    }

    #[test]
    fn a_packet_ahead_of_its_pad_can_wait_for_it() {
        let mut s = OtpSend::new();
        s.install(pad(1024, 6));
        let mut p = rtp(1, &[1; 160]);
        s.protect(&mut p).expect("pad");
        let mut r = OtpRecv::new();
        assert!(!r.pad_here(&p));
        assert!(r.pad_here(&[0x80; 4]), "too short: let open() count it");
        r.install(0, pad(1024, 6));
        assert!(r.pad_here(&p));
        r.open(&mut p).expect("opens once its pad is here");
    }

    #[test]
    fn a_packet_larger_than_a_segment_wastes_no_pad() {
        let mut s = OtpSend::new();
        s.install(pad(256, 8));
        let before = s.remaining();
        let mut big = rtp(1, &[0; 400]);
        assert_eq!(s.protect(&mut big), Err(Drop::NoPad));
        assert_eq!(s.remaining(), before);
        let mut small = rtp(2, &[0; 100]);
        s.protect(&mut small).expect("a small packet still fits");
    }

    #[test]
    fn another_pad_never_opens_a_packet() {
        let mut s = OtpSend::new();
        s.install(pad(2048, 3));
        let mut r = OtpRecv::new();
        r.install(0, pad(2048, 4));
        let mut p = rtp(7, &[0u8; 160]);
        s.protect(&mut p).expect("pad");
        assert_eq!(r.open(&mut p), Err(Drop::Auth));
    }

    #[test]
    fn rtcp_shares_the_stream() {
        let mut s = OtpSend::new();
        let mut r = OtpRecv::new();
        s.install(pad(2048, 5));
        r.install(0, pad(2048, 5));
        let plain = vec![0x80, 200, 0, 6, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8];
        let mut p = plain.clone();
        s.protect(&mut p).expect("pad");
        assert_eq!(&p[..8], &plain[..8]);
        r.open(&mut p).expect("opens");
        assert_eq!(p, plain);
    }

    #[test]
    fn announcements_round_trip_and_refuse_forgery() {
        let k = AnnounceKey::derive(&Key256::new([1; 32]), Direction::CallerToCallee);
        let a = Announce {
            start: 4096,
            key_bytes: 1024,
            ids: vec![Uuid::from_bytes([7; 16]), Uuid::from_bytes([8; 16])],
        };
        let b = k.encode(&a);
        assert!(is_announce(&b));
        assert_eq!(k.decode(&b), Ok(a.clone()));
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert_eq!(k.decode(&bad), Err(AnnounceError::Auth));
        let other = AnnounceKey::derive(&Key256::new([1; 32]), Direction::CalleeToCaller);
        assert_eq!(other.decode(&b), Err(AnnounceError::Auth));
        assert_eq!(k.decode(&b[..b.len() - 1]), Err(AnnounceError::Malformed));
        let mut r = OtpRecv::new();
        assert!(r.wants(&a));
        assert!(!r.wants(&a), "asked once");
        r.unwant(a.start);
        assert!(r.wants(&a), "again after a failed fetch");
    }
}
