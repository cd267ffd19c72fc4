//! The wire format of live streams (`qkdnet msg send`/`listen`): encoders and
//! bounded, pure decoders.
//!
//! A stream is a cleartext *handshake* from the sender followed by *frames* in
//! both directions. The receiver has no key when the handshake arrives (it names
//! the key to fetch), so the decoders trust nothing: every field is range-checked,
//! a frame's length is bounded by [`MAX_FRAME_BODY`] and must fit its kind before a
//! byte of its body is looked at, and nothing is allocated from a length read off
//! the wire. Decoders work on whatever bytes have arrived and answer `Ok(None)`
//! when more are needed, so the same code serves the socket adapter, the tests and
//! the fuzzer ([`decode_stream`]). The handshake is authenticated once keys are in
//! hand: its SM3 digest is in the derivation of every key ([`crate::stream`]).
//! All integers are big-endian.
//!
//! **Handshake** (sender → receiver, once):
//!
//! | field | size | |
//! |---|---|---|
//! | magic | 8 | `QKDNSTRM` |
//! | version | 1 | 1 |
//! | mode | 1 | 1 = qkd (the code of sealed files; streams have no other mode) |
//! | sender SAE ID | 1 + n | length, then the ID (1..=64 bytes, `A-Z a-z 0-9 . _ -`) |
//! | recipient SAE ID | 1 + n | likewise |
//! | key size | 2 | bits per QKD key (multiple of 8, 128..=8192) |
//! | stream ID | 16 | random per stream |
//! | first key ID | 16 | UUID of the QKD key of epoch 0 |
//!
//! **Frame** (both directions):
//!
//! | field | size | |
//! |---|---|---|
//! | length | 4 | bytes of ciphertext and tag that follow the header (16..=2^20) |
//! | kind | 1 | 1 data, 2 rekey, 3 end (sender → receiver); 4 ack (receiver → sender) |
//! | sequence number | 8 | 0, 1, 2, … in each direction, continuing across rekeys |
//! | ciphertext | length − 16 | SM4-GCM, nonce = epoch (4) ‖ sequence number (8), AAD = the 13 header bytes |
//! | tag | 16 | |
//!
//! | kind | plaintext |
//! |---|---|
//! | data | 1..=2^20 − 16 bytes of the application's stream |
//! | rekey | the 16-byte ID of the QKD key of the next epoch |
//! | end | total plaintext bytes of the stream (8) |
//! | ack | total plaintext bytes (8) ‖ sequence number of the end frame (8) |

use qkdnet_crypto::gcm::GCM_TAG_LEN;
use qkdnet_etsi::ids::SaeId;
use uuid::Uuid;

use crate::error::StreamError;
use crate::format::{KEY_BITS_RANGE, Mode};

/// First bytes of every stream.
pub const MAGIC: [u8; 8] = *b"QKDNSTRM";
/// The protocol version this code speaks.
pub const VERSION: u8 = 1;
/// Length of the random stream ID.
pub const STREAM_ID_LEN: usize = 16;
/// Longest possible handshake.
pub const MAX_HANDSHAKE_LEN: usize =
    8 + 1 + 1 + 2 * (1 + qkdnet_etsi::ids::MAX_ID_LEN) + 2 + STREAM_ID_LEN + 16;
/// Bytes of a frame header: length, kind, sequence number.
pub const FRAME_HEADER_LEN: usize = 4 + 1 + 8;
/// Largest frame body (ciphertext and tag), the `length` field's maximum.
pub const MAX_FRAME_BODY: usize = 1 << 20;
/// Largest data payload of one frame.
pub const MAX_PAYLOAD: usize = MAX_FRAME_BODY - GCM_TAG_LEN;
/// Largest frame on the wire.
pub const MAX_FRAME_LEN: usize = FRAME_HEADER_LEN + MAX_FRAME_BODY;

/// Sealed-file code of the qkd mode, the only one streams support.
const MODE_QKD: u8 = 1;

fn malformed(m: impl Into<String>) -> StreamError {
    StreamError::Malformed(m.into())
}

/// The sender's opening message, in clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// Protection mode (always [`Mode::Qkd`] for streams).
    pub mode: Mode,
    /// The sending SAE (master of the QKD keys).
    pub sender: SaeId,
    /// The receiving SAE (slave of the QKD keys).
    pub recipient: SaeId,
    /// Bits per QKD key.
    pub key_bits: u16,
    /// Random per stream: no two streams derive the same keys even if a KME
    /// delivered a key twice.
    pub stream_id: [u8; STREAM_ID_LEN],
    /// The QKD key of epoch 0.
    pub first_key: Uuid,
}

impl Handshake {
    /// The encoded handshake. Fails only for a mode streams do not support.
    pub fn encode(&self) -> Result<Vec<u8>, StreamError> {
        if self.mode != Mode::Qkd {
            return Err(StreamError::Misuse(format!(
                "streams support mode qkd only, not {}",
                self.mode
            )));
        }
        check_key_bits(self.key_bits).map_err(|e| StreamError::Misuse(e.to_string()))?;
        let mut v = Vec::with_capacity(MAX_HANDSHAKE_LEN);
        v.extend_from_slice(&MAGIC);
        v.push(VERSION);
        v.push(MODE_QKD);
        for id in [&self.sender, &self.recipient] {
            // SaeId is at most 64 bytes (ids::MAX_ID_LEN), so the length fits a byte.
            v.push(id.as_str().len() as u8);
            v.extend_from_slice(id.as_str().as_bytes());
        }
        v.extend_from_slice(&self.key_bits.to_be_bytes());
        v.extend_from_slice(&self.stream_id);
        v.extend_from_slice(self.first_key.as_bytes());
        Ok(v)
    }

    /// Decodes a handshake from the start of `buf`: `Ok(None)` if `buf` is a
    /// valid but incomplete prefix, else the handshake and its length in bytes.
    pub fn decode(buf: &[u8]) -> Result<Option<(Handshake, usize)>, StreamError> {
        let mut r = Cursor { buf, pos: 0 };
        let Some(magic) = r.array::<8>() else {
            return prefix_of(buf, &MAGIC);
        };
        if magic != MAGIC {
            return Err(malformed("bad magic (not a qkdnet stream)"));
        }
        let Some([version]) = r.array() else {
            return Ok(None);
        };
        if version != VERSION {
            return Err(malformed(format!(
                "stream version {version} is not supported (this build speaks version {VERSION})"
            )));
        }
        let Some([mode]) = r.array() else {
            return Ok(None);
        };
        let mode = match mode {
            MODE_QKD => Mode::Qkd,
            2 | 3 => {
                return Err(malformed(
                    "the sender asks for mode hybrid or otp; streams support qkd only",
                ));
            }
            m => return Err(malformed(format!("unknown mode {m}"))),
        };
        let Some(sender) = r.sae_id("sender")? else {
            return Ok(None);
        };
        let Some(recipient) = r.sae_id("recipient")? else {
            return Ok(None);
        };
        let Some(bits) = r.array() else {
            return Ok(None);
        };
        let key_bits = u16::from_be_bytes(bits);
        check_key_bits(key_bits)?;
        let Some(stream_id) = r.array() else {
            return Ok(None);
        };
        let Some(first_key) = r.array() else {
            return Ok(None);
        };
        let h = Handshake {
            mode,
            sender,
            recipient,
            key_bits,
            stream_id,
            first_key: Uuid::from_bytes(first_key),
        };
        Ok(Some((h, r.pos)))
    }
}

fn check_key_bits(bits: u16) -> Result<(), StreamError> {
    if KEY_BITS_RANGE.contains(&bits) && bits.is_multiple_of(8) {
        Ok(())
    } else {
        Err(malformed(format!(
            "key size {bits} bits is not a multiple of 8 in 128..=8192"
        )))
    }
}

/// `Ok(None)` if `buf` (shorter than `magic`) could still become it.
fn prefix_of<T>(buf: &[u8], magic: &[u8]) -> Result<Option<T>, StreamError> {
    if magic.starts_with(buf) {
        Ok(None)
    } else {
        Err(malformed("bad magic (not a qkdnet stream)"))
    }
}

/// Reads fields off a slice; `None` when the slice ends first.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let end = self.pos.checked_add(N)?;
        let a: [u8; N] = self.buf.get(self.pos..end)?.try_into().ok()?;
        self.pos = end;
        Some(a)
    }

    fn sae_id(&mut self, what: &str) -> Result<Option<SaeId>, StreamError> {
        let Some([len]) = self.array() else {
            return Ok(None);
        };
        let end = self.pos + usize::from(len);
        let Some(raw) = self.buf.get(self.pos..end) else {
            return Ok(None);
        };
        let id = core::str::from_utf8(raw)
            .ok()
            .and_then(|s| SaeId::new(s).ok())
            .ok_or_else(|| malformed(format!("{what} SAE ID in the handshake is invalid")))?;
        self.pos = end;
        Ok(Some(id))
    }
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Application data (sender → receiver).
    Data,
    /// The key ID of the next epoch (sender → receiver).
    Rekey,
    /// The end of the stream, with its length (sender → receiver).
    End,
    /// The receiver's confirmation (receiver → sender).
    Ack,
}

impl FrameKind {
    fn code(self) -> u8 {
        match self {
            FrameKind::Data => 1,
            FrameKind::Rekey => 2,
            FrameKind::End => 3,
            FrameKind::Ack => 4,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(FrameKind::Data),
            2 => Some(FrameKind::Rekey),
            3 => Some(FrameKind::End),
            4 => Some(FrameKind::Ack),
            _ => None,
        }
    }

    /// The plaintext lengths this kind allows.
    pub fn payload_range(self) -> core::ops::RangeInclusive<usize> {
        match self {
            FrameKind::Data => 1..=MAX_PAYLOAD,
            FrameKind::Rekey => 16..=16,
            FrameKind::End => 8..=8,
            FrameKind::Ack => 16..=16,
        }
    }
}

/// A frame header: checked against the limits and its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the frame carries.
    pub kind: FrameKind,
    /// Its sequence number.
    pub seq: u64,
    /// Plaintext bytes (the body is this plus the tag).
    pub payload_len: usize,
}

impl FrameHeader {
    /// A header for `payload_len` bytes of `kind`, if the length fits the kind.
    pub fn new(kind: FrameKind, seq: u64, payload_len: usize) -> Result<Self, StreamError> {
        if !kind.payload_range().contains(&payload_len) {
            return Err(StreamError::Misuse(format!(
                "{kind:?} frame of {payload_len} bytes"
            )));
        }
        Ok(Self {
            kind,
            seq,
            payload_len,
        })
    }

    /// The 13 header bytes (also the frame's AAD).
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut h = [0u8; FRAME_HEADER_LEN];
        // payload_len <= MAX_PAYLOAD (checked by `new` and `decode`), so the body
        // length fits 32 bits.
        let body = (self.payload_len + GCM_TAG_LEN) as u32;
        h[..4].copy_from_slice(&body.to_be_bytes());
        h[4] = self.kind.code();
        h[5..].copy_from_slice(&self.seq.to_be_bytes());
        h
    }

    /// Decodes a header from the start of `buf` (`Ok(None)` if fewer than 13 bytes).
    pub fn decode(buf: &[u8]) -> Result<Option<FrameHeader>, StreamError> {
        let Some(h) = buf.get(..FRAME_HEADER_LEN) else {
            return Ok(None);
        };
        let body = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let kind = FrameKind::from_code(h[4])
            .ok_or_else(|| malformed(format!("unknown frame kind {}", h[4])))?;
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&h[5..]);
        let seq = u64::from_be_bytes(seq);
        let payload_len = body
            .checked_sub(GCM_TAG_LEN)
            .filter(|n| kind.payload_range().contains(n))
            .ok_or_else(|| {
                malformed(format!(
                    "frame {seq}: a {kind:?} frame cannot have a body of {body} bytes"
                ))
            })?;
        Ok(Some(FrameHeader {
            kind,
            seq,
            payload_len,
        }))
    }

    /// The whole frame's length on the wire.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + self.payload_len + GCM_TAG_LEN
    }
}

/// Decodes the frame at the start of `buf`: `Ok(None)` until all of it has
/// arrived, else its header and the whole frame's bytes (header, ciphertext, tag).
pub fn decode_frame(buf: &[u8]) -> Result<Option<(FrameHeader, &[u8])>, StreamError> {
    let Some(h) = FrameHeader::decode(buf)? else {
        return Ok(None);
    };
    Ok(buf.get(..h.frame_len()).map(|f| (h, f)))
}

/// One direction of a recorded stream, decoded without keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedStream {
    /// The handshake, if the bytes start with one (the sender's direction).
    pub handshake: Option<Handshake>,
    /// Every complete frame's header, in order.
    pub frames: Vec<FrameHeader>,
    /// Bytes after the last complete frame (an incomplete frame).
    pub trailing: usize,
}

/// Decodes one direction of a stream as the receiver's decoders see it: a
/// handshake if `data` starts with the magic, then frames up to the first
/// incomplete one. Never panics and allocates at most one header per 30 input
/// bytes; for fuzzing and for inspecting captures.
pub fn decode_stream(data: &[u8]) -> Result<DecodedStream, StreamError> {
    let mut pos = 0;
    let mut handshake = None;
    if data.starts_with(&MAGIC[..data.len().min(MAGIC.len())]) && !data.is_empty() {
        match Handshake::decode(data)? {
            Some((h, n)) => {
                handshake = Some(h);
                pos = n;
            }
            None => {
                return Ok(DecodedStream {
                    handshake: None,
                    frames: Vec::new(),
                    trailing: data.len(),
                });
            }
        }
    }
    let mut frames = Vec::new();
    while let Some((h, f)) = decode_frame(&data[pos..])? {
        frames.push(h);
        pos += f.len();
    }
    Ok(DecodedStream {
        handshake,
        frames,
        trailing: data.len() - pos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Handshake {
        Handshake {
            mode: Mode::Qkd,
            sender: SaeId::new("alice").expect("valid"),
            recipient: SaeId::new("bob-1.x_y").expect("valid"),
            key_bits: 256,
            stream_id: [7; STREAM_ID_LEN],
            first_key: Uuid::from_u128(0x1234),
        }
    }

    #[test]
    fn handshake_round_trips_and_every_prefix_wants_more() {
        let h = sample();
        let enc = h.encode().expect("encodes");
        assert!(enc.len() <= MAX_HANDSHAKE_LEN);
        let mut with_tail = enc.clone();
        with_tail.extend_from_slice(b"frames follow");
        assert_eq!(
            Handshake::decode(&with_tail).expect("valid"),
            Some((h, enc.len()))
        );
        for n in 0..enc.len() {
            assert_eq!(Handshake::decode(&enc[..n]).expect("prefix"), None, "{n}");
        }
        let long = Handshake {
            sender: SaeId::new(&"s".repeat(64)).expect("valid"),
            recipient: SaeId::new(&"r".repeat(64)).expect("valid"),
            ..sample()
        };
        assert_eq!(long.encode().expect("encodes").len(), MAX_HANDSHAKE_LEN);
    }

    #[test]
    fn bad_handshake_fields_are_errors() {
        let enc = sample().encode().expect("encodes");
        let cases: [(usize, u8); 5] = [
            (0, b'X'),      // magic
            (8, 2),         // version
            (9, 2),         // hybrid
            (9, 9),         // unknown mode
            (10 + 1, b'/'), // sender ID character
        ];
        for (at, v) in cases {
            let mut m = enc.clone();
            m[at] = v;
            assert!(Handshake::decode(&m).is_err(), "byte {at} = {v}");
        }
        let mut zero_len = enc.clone();
        zero_len[10] = 0;
        assert!(Handshake::decode(&zero_len).is_err());
        let bits_at = 10 + 1 + 5 + 1 + 9;
        let mut bad_bits = enc.clone();
        bad_bits[bits_at..bits_at + 2].copy_from_slice(&100u16.to_be_bytes());
        assert!(Handshake::decode(&bad_bits).is_err());
        assert!(Handshake::decode(b"GET / HTTP/1.1\r\n").is_err());
        let hybrid = Handshake {
            mode: Mode::Hybrid,
            ..sample()
        };
        assert!(matches!(hybrid.encode(), Err(StreamError::Misuse(_))));
    }

    #[test]
    fn frame_headers_round_trip_and_lengths_fit_the_kind() {
        for (kind, len) in [
            (FrameKind::Data, 1),
            (FrameKind::Data, MAX_PAYLOAD),
            (FrameKind::Rekey, 16),
            (FrameKind::End, 8),
            (FrameKind::Ack, 16),
        ] {
            let h = FrameHeader::new(kind, u64::MAX - 1, len).expect("valid");
            let enc = h.encode();
            assert_eq!(FrameHeader::decode(&enc).expect("valid"), Some(h));
            assert_eq!(FrameHeader::decode(&enc[..12]).expect("short"), None);
        }
        for (kind, len) in [
            (FrameKind::Data, 0),
            (FrameKind::Data, MAX_PAYLOAD + 1),
            (FrameKind::Rekey, 15),
            (FrameKind::End, 16),
        ] {
            assert!(FrameHeader::new(kind, 0, len).is_err());
        }
        let mut h = FrameHeader::new(FrameKind::End, 3, 8)
            .expect("valid")
            .encode();
        h[..4].copy_from_slice(&(8u32 + 16 + 1).to_be_bytes());
        assert!(FrameHeader::decode(&h).is_err(), "end frame of 9 bytes");
        h[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        h[4] = 1;
        assert!(FrameHeader::decode(&h).is_err(), "4 GiB data frame");
        h[..4].copy_from_slice(&3u32.to_be_bytes());
        assert!(FrameHeader::decode(&h).is_err(), "shorter than a tag");
        h[4] = 0;
        assert!(FrameHeader::decode(&h).is_err(), "kind 0");
    }

    #[test]
    fn decode_stream_walks_handshake_and_frames() {
        let mut wire = sample().encode().expect("encodes");
        let d = FrameHeader::new(FrameKind::Data, 0, 5).expect("valid");
        wire.extend_from_slice(&d.encode());
        wire.extend_from_slice(&[0; 5 + 16]);
        let e = FrameHeader::new(FrameKind::End, 1, 8).expect("valid");
        wire.extend_from_slice(&e.encode());
        wire.extend_from_slice(&[0; 8 + 16]);
        let got = decode_stream(&wire).expect("decodes");
        assert_eq!(got.handshake, Some(sample()));
        assert_eq!(got.frames, vec![d, e]);
        assert_eq!(got.trailing, 0);
        let got = decode_stream(&wire[..wire.len() - 1]).expect("decodes");
        assert_eq!((got.frames.len(), got.trailing), (1, 8 + 16 + 13 - 1));
        // Without a handshake (the receiver's direction).
        let ack = FrameHeader::new(FrameKind::Ack, 0, 16).expect("valid");
        let mut back = ack.encode().to_vec();
        back.extend_from_slice(&[0; 32]);
        assert_eq!(decode_stream(&back).expect("decodes").frames, vec![ack]);
        assert!(decode_stream(&[]).is_ok());
        assert!(decode_stream(b"QKDN").is_ok());
    }
}
