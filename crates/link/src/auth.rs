//! The authenticated classical channel: Wegman–Carter tags on every frame.
//!
//! QKD is only as secure as the authentication of its classical channel, and
//! only information-theoretic authentication keeps it unconditional. Each
//! direction has its own key stream: a 128-bit polynomial hash key (reused,
//! which Wegman–Carter permits) and a queue of one-time pads, 128 bits per
//! frame. Streams start from a pre-shared bootstrap secret and are refilled
//! from distilled key at points both ends agree on (block completion), so the
//! two queues stay aligned without extra messages. Every bit consumed is
//! counted: it is subtracted from the link's net yield.
//!
//! Frame: `seq (u64 LE) | body length (u32 LE) | body | tag (16 bytes)`; the
//! body is a batch (`count (u32)`, then `length (u32) | message` each), so
//! the messages of many blocks in flight share one tag; the tag covers a
//! direction byte, `seq` and the body. Sequence numbers are
//! strictly consecutive, so replays, reordering and deletions are detected.
//! Only this module can produce an [`Authenticated`] message.

use std::collections::VecDeque;

use qkdnet_postproc::auth::{AuthKey, HashKey, TAG_BYTES, Tag};
use zeroize::{Zeroize, Zeroizing};

use crate::LinkError;
use crate::msg::Msg;

/// Largest frame body accepted (bounded memory per frame).
pub const MAX_FRAME: usize = 160 << 20;
/// Header bytes before the body.
pub const HEADER: usize = 12;

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
    hash_key: Zeroizing<[u8; 16]>,
    pads: VecDeque<u8>,
    used_bits: u64,
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
        Stream {
            hash_key: Zeroizing::new(hk),
            pads: material[16..].iter().copied().collect(),
            used_bits: 128,
        }
    }

    fn next_key(&mut self) -> Result<AuthKey, LinkError> {
        if self.pads.len() < TAG_BYTES {
            return Err(LinkError::AuthKeyExhausted);
        }
        let mut pad = [0u8; 16];
        for b in pad.iter_mut() {
            // Invariant: length checked above.
            *b = self.pads.pop_front().expect("pad bytes available");
        }
        self.used_bits += 128;
        let key = AuthKey::new(HashKey::from_bytes(*self.hash_key), pad);
        pad.zeroize();
        Ok(key)
    }
}

/// Both directions' authentication state of one link endpoint.
pub struct AuthChannel {
    role: Role,
    send: Stream,
    recv: Stream,
    send_seq: u64,
    recv_seq: u64,
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

    fn tagged_bytes(dir: u8, seq: u64, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(9 + body.len());
        m.push(dir);
        m.extend_from_slice(&seq.to_le_bytes());
        m.extend_from_slice(body);
        m
    }

    /// Encodes, numbers and tags a batch of messages into one frame.
    pub fn seal(&mut self, msgs: &[Msg]) -> Result<Vec<u8>, LinkError> {
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
        let key = self.send.next_key()?;
        let seq = self.send_seq;
        let tag = key.tag(&Self::tagged_bytes(self.role.direction_byte(), seq, &body));
        self.send_seq += 1;
        let mut frame = Vec::with_capacity(HEADER + body.len() + TAG_BYTES);
        frame.extend_from_slice(&seq.to_le_bytes());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        frame.extend_from_slice(&tag.0);
        Ok(frame)
    }

    /// Checks a whole frame from the peer and decodes it. A frame that fails
    /// authentication consumes the pad of its sequence number; the channel is
    /// then unusable (the caller should close it): an attacker learns nothing
    /// but gets no second try at the same pad.
    pub fn open(&mut self, frame: &[u8]) -> Result<Vec<Authenticated>, LinkError> {
        if frame.len() < HEADER + TAG_BYTES {
            return Err(LinkError::Malformed(
                "frame shorter than its header and tag".into(),
            ));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&frame[..8]);
        let seq = u64::from_le_bytes(seq);
        let mut len = [0u8; 4];
        len.copy_from_slice(&frame[8..12]);
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME || frame.len() != HEADER + len + TAG_BYTES {
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
        let body = &frame[HEADER..HEADER + len];
        let mut tag = [0u8; TAG_BYTES];
        tag.copy_from_slice(&frame[HEADER + len..]);
        let key = self.recv.next_key()?;
        self.recv_seq += 1;
        key.verify(
            &Self::tagged_bytes(self.role.peer().direction_byte(), seq, body),
            &Tag(tag),
        )
        .map_err(|_| LinkError::Authentication(format!("tag of frame {seq} does not verify")))?;
        Ok(decode_batch(body)?.into_iter().map(Authenticated).collect())
    }
}

/// Reads the body length from a frame header (for stream adapters).
pub fn frame_len(header: &[u8; HEADER]) -> Result<usize, LinkError> {
    let mut len = [0u8; 4];
    len.copy_from_slice(&header[8..12]);
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(LinkError::Malformed(format!(
            "frame body of {len} bytes exceeds the limit"
        )));
    }
    Ok(HEADER + len + TAG_BYTES)
}
