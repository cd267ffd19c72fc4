//! The authenticated classical channel: Wegman–Carter tags over runs of frames.
//!
//! QKD is only as secure as the authentication of its classical channel, and
//! only information-theoretic authentication keeps it unconditional. Each
//! direction has its own key stream: a 128-bit polynomial hash key (reused,
//! which Wegman–Carter permits) and a queue of one-time pads, 128 bits per
//! tag. Streams start from a pre-shared bootstrap secret and are refilled
//! from distilled key at points both ends agree on (block completion), so the
//! two queues stay aligned without extra messages. Every bit consumed is
//! counted: it is subtracted from the link's net yield.
//!
//! # Frames and transcripts
//!
//! Frame: `seq (u64 LE) | kind (u8) | body length (u32 LE) | body [| tag (16
//! bytes)]`; the body is a batch (`count (u32)`, then `length (u32) |
//! message` each), so the messages of many blocks in flight share a frame.
//! Sequence numbers are strictly consecutive, so replays, reordering and
//! deletions are detected. Each direction hashes every frame it sends or
//! receives into a running transcript ([`TranscriptHash`]) as two padded
//! pieces, `direction byte ‖ header` and then the body; the header carries
//! the body's length, so the pieces decode one way only. A *tagged* frame (kind 1)
//! ends with the tag of the transcript since the previous tagged frame,
//! itself included; a *provisional* frame (kind 0) has no tag and is
//! covered by the next tagged frame of its direction.
//!
//! Only Cascade's parity rounds ([`Msg::Parities`], [`Msg::ParityAnswers`])
//! may travel provisionally, in at most [`MAX_PROVISIONAL_RUN`] frames in a
//! row; everything else, and so every message that moves a block towards
//! key (reconciled, confirm, verified), travels in tagged frames. This is the
//! "one tag per round of post-processing" idea of Kiktenko et al.,
//! *Lightweight authentication for quantum key distribution* (IEEE TIFS
//! 2020, arXiv:1903.10237): Cascade-optimised needs about a thousand round
//! trips per block, and a tag per frame spent more key on authentication
//! than the block distilled over its leakage. Why it is safe: a block
//! releases key only after its side has processed a tagged frame from the
//! peer sent after every parity message of that block (Bob: Alice's
//! `Confirm`; Alice: Bob's `Verified`, sent after Bob verified `Confirm`),
//! and that tag covers, in order, every provisional frame before it. If any
//! provisional frame was forged, altered, dropped or reordered, that tag
//! fails (except with the probability bound of
//! [`qkdnet_postproc::auth`], computed on the whole transcript), the channel
//! fails and no key leaves either side. Until then a forged parity query
//! can only make Alice disclose parities of a block that is going to be
//! thrown away, which rests on an invariant the callers keep: a channel
//! that failed is closed for good ([`AuthChannel::open`] refuses every later
//! frame), and the blocks it had in flight are discarded, never resumed or
//! re-run on another channel (`qkdnet node` starts a new session with new
//! blocks; `qkdnet postproc` fails). Only this module makes
//! [`Authenticated`] and [`Provisional`] messages.

use std::collections::VecDeque;

use qkdnet_postproc::auth::{HashKey, TAG_BYTES, Tag, TranscriptHash};
use zeroize::{Zeroize, Zeroizing};

use crate::LinkError;
use crate::msg::Msg;

/// Largest frame body accepted (bounded memory per frame). A header's length
/// is unauthenticated until the whole frame has been checked, so stream
/// adapters must not allocate it up front: `crate::tcp::read_frame` grows its
/// buffer with the bytes that arrive.
pub const MAX_FRAME: usize = 160 << 20;
/// Header bytes before the body.
pub const HEADER: usize = 13;
/// Most provisional (untagged) frames in a row, per direction.
pub const MAX_PROVISIONAL_RUN: u32 = 1 << 16;
/// Offset of the kind byte in the header.
const KIND_AT: usize = 8;
const KIND_PROVISIONAL: u8 = 0;
const KIND_TAGGED: u8 = 1;

/// Which end of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The transmitter.
    Alice,
    /// The receiver.
    Bob,
}

impl Role {
    fn direction_byte(self) -> u8 {
        match self {
            Role::Alice => b'A',
            Role::Bob => b'B',
        }
    }
    /// The other end.
    pub fn peer(self) -> Role {
        match self {
            Role::Alice => Role::Bob,
            Role::Bob => Role::Alice,
        }
    }
}

/// A message that passed authentication. Only [`AuthChannel::open`] makes one.
#[derive(Debug)]
pub struct Authenticated(Msg);

/// A Cascade parity message from a provisional frame: not yet authenticated,
/// covered by the peer's next tagged frame (module docs). Only
/// [`AuthChannel::open`] makes one, and only for the kinds
/// [`may_travel_provisionally`] allows.
#[derive(Debug)]
pub struct Provisional(Msg);

impl Provisional {
    /// The message.
    pub fn msg(&self) -> &Msg {
        &self.0
    }
    /// Takes the message.
    pub fn into_msg(self) -> Msg {
        self.0
    }
}

/// A message as the channel delivers it.
#[derive(Debug)]
pub enum Received {
    /// From a tagged frame whose tag verified.
    Authenticated(Authenticated),
    /// From a provisional frame.
    Provisional(Provisional),
}

impl Received {
    /// The message.
    pub fn msg(&self) -> &Msg {
        match self {
            Received::Authenticated(m) => m.msg(),
            Received::Provisional(m) => m.msg(),
        }
    }
}

/// Whether `m` may travel in a provisional frame: Cascade's parity rounds
/// only (module docs).
pub fn may_travel_provisionally(m: &Msg) -> bool {
    matches!(m, Msg::Parities { .. } | Msg::ParityAnswers { .. })
}

/// What [`AuthChannel::open`] got from one frame.
#[derive(Debug)]
pub struct Opened {
    /// Whether the frame was tagged (and its tag, over the transcript since
    /// the previous tagged frame, verified).
    pub tagged: bool,
    /// Its messages, in order.
    pub msgs: Vec<Received>,
}

/// Most messages one frame may carry.
pub const MAX_BATCH: usize = 1 << 16;

fn encode_batch(msgs: &[Msg]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(msgs.len() as u32).to_le_bytes());
    let mut one = Vec::new();
    for m in msgs {
        one.clear();
        m.encode(&mut one);
        body.extend_from_slice(&(one.len() as u32).to_le_bytes());
        body.extend_from_slice(&one);
    }
    body
}

fn decode_batch(mut body: &[u8]) -> Result<Vec<Msg>, LinkError> {
    let mut take = |n: usize| -> Result<&[u8], LinkError> {
        if body.len() < n {
            return Err(LinkError::Malformed("batch is truncated".into()));
        }
        let (h, t) = body.split_at(n);
        body = t;
        Ok(h)
    };
    let mut c = [0u8; 4];
    c.copy_from_slice(take(4)?);
    let count = u32::from_le_bytes(c) as usize;
    if count == 0 || count > MAX_BATCH {
        return Err(LinkError::Malformed(format!(
            "frame carries {count} messages"
        )));
    }
    let mut out = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        c.copy_from_slice(take(4)?);
        let len = u32::from_le_bytes(c) as usize;
        out.push(Msg::decode(take(len)?)?);
    }
    if !body.is_empty() {
        return Err(LinkError::Malformed(
            "trailing bytes after the last message".into(),
        ));
    }
    Ok(out)
}

impl Authenticated {
    /// The message.
    pub fn msg(&self) -> &Msg {
        &self.0
    }
    /// Takes the message.
    pub fn into_msg(self) -> Msg {
        self.0
    }
}

struct Stream {
    pads: VecDeque<u8>,
    used_bits: u64,
    /// Frames since the last tagged one (that one excluded).
    transcript: TranscriptHash,
    /// Provisional frames since the last tagged one.
    run: u32,
}

impl Drop for Stream {
    fn drop(&mut self) {
        let (a, b) = self.pads.as_mut_slices();
        a.zeroize();
        b.zeroize();
    }
}

impl Stream {
    fn new(material: &[u8]) -> Stream {
        let mut hk = [0u8; 16];
        hk.copy_from_slice(&material[..16]);
        let hash_key = HashKey::from_bytes(hk);
        hk.zeroize();
        Stream {
            transcript: TranscriptHash::new(&hash_key),
            pads: material[16..].iter().copied().collect(),
            used_bits: 128,
            run: 0,
        }
    }

    fn next_pad(&mut self) -> Result<Zeroizing<[u8; 16]>, LinkError> {
        if self.pads.len() < TAG_BYTES {
            return Err(LinkError::AuthKeyExhausted);
        }
        let mut pad = Zeroizing::new([0u8; 16]);
        for b in pad.iter_mut() {
            // Invariant: length checked above.
            *b = self.pads.pop_front().expect("pad bytes available");
        }
        self.used_bits += 128;
        Ok(pad)
    }

    /// Hashes one frame (its header and body) into the transcript, without
    /// copying the body.
    fn absorb(&mut self, dir: u8, header: &[u8; HEADER], body: &[u8]) {
        let mut head = [0u8; 1 + HEADER];
        head[0] = dir;
        head[1..].copy_from_slice(header);
        self.transcript.absorb_padded(&head);
        self.transcript.absorb_padded(body);
    }

    fn end_run(&mut self) {
        self.transcript.reset();
        self.run = 0;
    }
}

/// Both directions' authentication state of one link endpoint.
pub struct AuthChannel {
    role: Role,
    send: Stream,
    recv: Stream,
    send_seq: u64,
    recv_seq: u64,
    /// Set by the first frame [`AuthChannel::open`] refuses: the provisional
    /// frames before it will never be covered, so nothing more is accepted.
    failed: bool,
}

impl std::fmt::Debug for AuthChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthChannel")
            .field("role", &self.role)
            .field("send_seq", &self.send_seq)
            .field("recv_seq", &self.recv_seq)
            .finish_non_exhaustive()
    }
}

impl AuthChannel {
    /// Minimum bootstrap secret: a hash key and at least 8 pads per direction.
    pub const MIN_PRESHARED: usize = 2 * (16 + 8 * 16);

    /// Splits a pre-shared secret: first half authenticates Alice → Bob, second half Bob → Alice.
    pub fn from_preshared(role: Role, secret: &[u8]) -> Result<AuthChannel, LinkError> {
        if secret.len() < Self::MIN_PRESHARED {
            return Err(LinkError::Usage(format!(
                "pre-shared authentication secret must be at least {} bytes, got {}",
                Self::MIN_PRESHARED,
                secret.len()
            )));
        }
        let (ab, ba) = secret.split_at(secret.len() / 2);
        let (a_to_b, b_to_a) = (Stream::new(ab), Stream::new(ba));
        let (send, recv) = match role {
            Role::Alice => (a_to_b, b_to_a),
            Role::Bob => (b_to_a, a_to_b),
        };
        Ok(AuthChannel {
            role,
            send,
            recv,
            send_seq: 0,
            recv_seq: 0,
            failed: false,
        })
    }

    /// Appends fresh key material to both streams (identically at both ends).
    pub fn refill(&mut self, a_to_b: &[u8], b_to_a: &[u8]) {
        let (s, r) = match self.role {
            Role::Alice => (a_to_b, b_to_a),
            Role::Bob => (b_to_a, a_to_b),
        };
        self.send.pads.extend(s.iter().copied());
        self.recv.pads.extend(r.iter().copied());
    }

    /// Key bits consumed so far (hash keys and pads, both directions).
    pub fn used_bits(&self) -> u64 {
        self.send.used_bits + self.recv.used_bits
    }

    /// Pad bytes left for sending and for receiving.
    pub fn pads_left(&self) -> (usize, usize) {
        (self.send.pads.len(), self.recv.pads.len())
    }

    /// Encodes and numbers a batch of messages into one frame, tagged unless
    /// every message may travel provisionally and the provisional run has
    /// room. Returns the frame and whether it is tagged.
    pub fn seal(&mut self, msgs: &[Msg]) -> Result<(Vec<u8>, bool), LinkError> {
        if msgs.is_empty() || msgs.len() > MAX_BATCH {
            return Err(LinkError::Usage(format!(
                "a frame carries 1 to {MAX_BATCH} messages, not {}",
                msgs.len()
            )));
        }
        let body = encode_batch(msgs);
        if body.len() > MAX_FRAME {
            return Err(LinkError::Usage(format!(
                "a batch of {} bytes exceeds the frame limit",
                body.len()
            )));
        }
        let tagged =
            self.send.run + 1 >= MAX_PROVISIONAL_RUN || !msgs.iter().all(may_travel_provisionally);
        // A tagged frame needs a pad: take it before anything changes, so an
        // exhausted pool leaves the channel as it was.
        let pad = if tagged {
            Some(self.send.next_pad()?)
        } else {
            None
        };
        let seq = self.send_seq;
        let mut header = [0u8; HEADER];
        header[..KIND_AT].copy_from_slice(&seq.to_le_bytes());
        header[KIND_AT] = if tagged {
            KIND_TAGGED
        } else {
            KIND_PROVISIONAL
        };
        header[KIND_AT + 1..].copy_from_slice(&(body.len() as u32).to_le_bytes());
        self.send.absorb(self.role.direction_byte(), &header, &body);
        let mut frame = Vec::with_capacity(HEADER + body.len() + TAG_BYTES);
        frame.extend_from_slice(&header);
        frame.extend_from_slice(&body);
        self.send_seq += 1;
        match pad {
            Some(pad) => {
                frame.extend_from_slice(&self.send.transcript.tag(&pad).0);
                self.send.end_run();
            }
            None => self.send.run += 1,
        }
        Ok((frame, tagged))
    }

    /// Checks a whole frame from the peer and decodes it. A tagged frame
    /// whose tag fails consumes its pad, and any malformed, out-of-order or
    /// misused frame is refused; the channel is then unusable (the caller
    /// should close it): an attacker learns nothing but gets no second try
    /// at the same pad.
    pub fn open(&mut self, frame: &[u8]) -> Result<Opened, LinkError> {
        if self.failed {
            return Err(LinkError::Authentication(
                "the channel refused an earlier frame; nothing more is accepted".into(),
            ));
        }
        let r = self.open_frame(frame);
        self.failed = r.is_err();
        r
    }

    fn open_frame(&mut self, frame: &[u8]) -> Result<Opened, LinkError> {
        if frame.len() < HEADER {
            return Err(LinkError::Malformed("frame shorter than its header".into()));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&frame[..8]);
        let seq = u64::from_le_bytes(seq);
        let mut header = [0u8; HEADER];
        header.copy_from_slice(&frame[..HEADER]);
        let total = frame_len(&header)?;
        if frame.len() != total {
            return Err(LinkError::Malformed(
                "frame length does not match its header".into(),
            ));
        }
        if seq != self.recv_seq {
            return Err(LinkError::Authentication(format!(
                "frame number {seq} where {} was due (replayed, reordered or lost)",
                self.recv_seq
            )));
        }
        let tagged = header[KIND_AT] == KIND_TAGGED;
        let len = total - HEADER - if tagged { TAG_BYTES } else { 0 };
        let body = &frame[HEADER..HEADER + len];
        self.recv_seq += 1;
        let dir = self.role.peer().direction_byte();
        if tagged {
            let pad = self.recv.next_pad()?;
            let mut tag = [0u8; TAG_BYTES];
            tag.copy_from_slice(&frame[HEADER + len..]);
            self.recv.absorb(dir, &header, body);
            let ok = self.recv.transcript.verify(&pad, &Tag(tag));
            self.recv.end_run();
            ok.map_err(|_| {
                LinkError::Authentication(format!(
                    "tag of frame {seq} does not verify (it covers the provisional frames before it)"
                ))
            })?;
        } else {
            if self.recv.run + 1 >= MAX_PROVISIONAL_RUN {
                return Err(LinkError::Authentication(format!(
                    "frame {seq}: more than {} provisional frames in a row",
                    MAX_PROVISIONAL_RUN - 1
                )));
            }
            self.recv.absorb(dir, &header, body);
            self.recv.run += 1;
        }
        let msgs = decode_batch(body)?;
        if !tagged && let Some(m) = msgs.iter().find(|m| !may_travel_provisionally(m)) {
            return Err(LinkError::Authentication(format!(
                "frame {seq}: {} may not travel in a provisional frame",
                m.name()
            )));
        }
        let wrap = |m| {
            if tagged {
                Received::Authenticated(Authenticated(m))
            } else {
                Received::Provisional(Provisional(m))
            }
        };
        Ok(Opened {
            tagged,
            msgs: msgs.into_iter().map(wrap).collect(),
        })
    }
}

/// The whole frame's length from its header (for stream adapters): header,
/// body and, for a tagged frame, the tag. The length is the peer's claim,
/// not yet authenticated: read the body incrementally rather than allocating
/// it from this number (see `crate::tcp::read_frame`).
pub fn frame_len(header: &[u8; HEADER]) -> Result<usize, LinkError> {
    let tag = match header[KIND_AT] {
        KIND_PROVISIONAL => 0,
        KIND_TAGGED => TAG_BYTES,
        k => return Err(LinkError::Malformed(format!("unknown frame kind {k}"))),
    };
    let mut len = [0u8; 4];
    len.copy_from_slice(&header[KIND_AT + 1..]);
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(LinkError::Malformed(format!(
            "frame body of {len} bytes exceeds the limit"
        )));
    }
    Ok(HEADER + len + tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qkdnet_postproc::cascade::ParityRequest;

    fn pair() -> (AuthChannel, AuthChannel) {
        let secret: Vec<u8> = (0..2048u32).map(|i| (i * 7 + 3) as u8).collect();
        (
            AuthChannel::from_preshared(Role::Alice, &secret).expect("secret long enough"),
            AuthChannel::from_preshared(Role::Bob, &secret).expect("secret long enough"),
        )
    }

    fn parities(round: u64) -> Msg {
        Msg::Parities {
            block: 0,
            request: ParityRequest {
                round,
                queries: Vec::new(),
            },
        }
    }

    fn verified() -> Msg {
        Msg::Verified { block: 0, ok: true }
    }

    /// A provisional frame as anyone can write it (no key needed).
    fn forged(seq: u64, msgs: &[Msg]) -> Vec<u8> {
        let body = encode_batch(msgs);
        let mut f = seq.to_le_bytes().to_vec();
        f.push(KIND_PROVISIONAL);
        f.extend_from_slice(&(body.len() as u32).to_le_bytes());
        f.extend_from_slice(&body);
        f
    }

    #[test]
    fn parity_rounds_travel_provisionally_and_one_tag_covers_them() {
        let (mut a, mut b) = pair();
        let before = a.used_bits();
        for r in 0..3 {
            let (f, tagged) = a.seal(&[parities(r)]).expect("pads left");
            assert!(!tagged);
            let o = b.open(&f).expect("provisional frame opens");
            assert!(!o.tagged);
            assert!(matches!(o.msgs[..], [Received::Provisional(_)]));
        }
        let (f, tagged) = a.seal(&[parities(3), verified()]).expect("pads left");
        assert!(tagged, "a frame with a non-parity message is tagged");
        let o = b.open(&f).expect("tag over the run verifies");
        assert!(o.tagged);
        assert!(
            o.msgs
                .iter()
                .all(|m| matches!(m, Received::Authenticated(_)))
        );
        assert_eq!(a.used_bits() - before, 128, "one pad for four frames");
        assert_eq!(a.used_bits(), b.used_bits());
    }

    #[test]
    fn a_forged_provisional_frame_fails_the_next_tag() {
        let (mut a, mut b) = pair();
        let (f0, _) = a.seal(&[parities(0)]).expect("pads left");
        let (_dropped, _) = a.seal(&[parities(1)]).expect("pads left");
        let (f2, _) = a.seal(&[verified()]).expect("pads left");
        b.open(&f0).expect("genuine");
        // The forgery opens (nothing to check yet) ...
        let o = b
            .open(&forged(1, &[parities(77)]))
            .expect("no tag to check");
        assert!(matches!(o.msgs[..], [Received::Provisional(_)]));
        // ... and the next tag, over what Alice really sent, fails.
        assert!(matches!(b.open(&f2), Err(LinkError::Authentication(_))));
    }

    #[test]
    fn a_channel_that_refused_a_frame_accepts_nothing_more() {
        let (mut a, mut b) = pair();
        let (f0, _) = a.seal(&[parities(0)]).expect("pads left");
        let (f1, _) = a.seal(&[verified()]).expect("pads left");
        // A forgery with the right number is refused only at the tag ...
        b.open(&forged(0, &[parities(5)])).expect("no tag to check");
        assert!(b.open(&f1).is_err());
        // ... and afterwards even genuine frames are refused.
        let (_, mut b2) = pair();
        assert!(b2.open(&f1).is_err(), "out of order");
        assert!(b2.open(&f0).is_err(), "refused after a failure");
    }

    #[test]
    fn only_parity_rounds_may_be_provisional() {
        let (_, mut b) = pair();
        let e = b.open(&forged(0, &[verified()])).expect_err("refused");
        assert!(matches!(e, LinkError::Authentication(_)), "{e}");
        let (_, mut b) = pair();
        let e = b
            .open(&forged(0, &[parities(0), verified()]))
            .expect_err("refused");
        assert!(matches!(e, LinkError::Authentication(_)), "{e}");
    }

    #[test]
    fn tagged_frames_detect_a_flipped_bit_and_unknown_kinds_are_malformed() {
        let (mut a, mut b) = pair();
        let (mut f, tagged) = a.seal(&[verified()]).expect("pads left");
        assert!(tagged);
        let at = f.len() - TAG_BYTES - 1;
        f[at] ^= 1;
        assert!(matches!(b.open(&f), Err(LinkError::Authentication(_))));
        let (mut a, mut b) = pair();
        let (mut f, _) = a.seal(&[verified()]).expect("pads left");
        f[KIND_AT] = 7;
        assert!(matches!(b.open(&f), Err(LinkError::Malformed(_))));
        let (_, mut b) = pair();
        assert!(matches!(b.open(&f[..5]), Err(LinkError::Malformed(_))));
    }

    #[test]
    fn a_provisional_run_is_bounded() {
        let (mut a, mut b) = pair();
        for r in 0..u64::from(MAX_PROVISIONAL_RUN) {
            let (f, tagged) = a.seal(&[parities(r)]).expect("pads left");
            assert_eq!(tagged, r + 1 == u64::from(MAX_PROVISIONAL_RUN), "frame {r}");
            b.open(&f).expect("accepted");
        }
        // A peer that does not tag in time is refused.
        let (_, mut b) = pair();
        for r in 0..u64::from(MAX_PROVISIONAL_RUN) - 1 {
            b.open(&forged(r, &[parities(r)])).expect("within the run");
        }
        let e = b
            .open(&forged(u64::from(MAX_PROVISIONAL_RUN) - 1, &[parities(0)]))
            .expect_err("run too long");
        assert!(e.to_string().contains("provisional frames in a row"), "{e}");
    }
}
