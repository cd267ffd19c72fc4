//! Live streams: a TCP stream between two SAEs protected with SM4-GCM under QKD keys.
//!
//! A sealed file ([`mod@crate::seal`]) knows its length before it is written; a live
//! stream (a log, a shell pipe, a sensor feed) does not, and its receiver must
//! release each piece as it arrives. So the stream is cut into *frames*, each
//! authenticated before its plaintext is released, and the guarantees a file gets
//! from its header (nothing dropped, reordered, replayed or cut off) come from a
//! sequence number and an authenticated end frame instead. The wire format is in
//! [`crate::stream_wire`].
//!
//! # Protocol
//!
//! The sender (master SAE) checks with its KME that it has keys for the receiver
//! ([`prepare`], before connecting, so a stream that cannot start costs no key),
//! connects, takes a QKD key shared with the receiver (`enc_keys`) and opens with a
//! cleartext handshake naming both SAEs and the key's ID. The receiver checks that
//! the stream is addressed to it (and, if it keeps a list, that it accepts the
//! sender), asks *its* KME for that key (`dec_keys` with the sender as master: only
//! the named slave SAE gets it, and only once, so a recorded stream cannot be
//! replayed to it later; this also authenticates the sender named in the
//! handshake), and from then on both sides derive, per *epoch* `e` (one QKD key
//! each) and direction,
//!
//! ```text
//! K_e,dir = HKDF-SM3 combiner (qkdnet_crypto::hybrid::combine_to_sm4_key) of QKD key e,
//!           context = "qkdnet/stream/v1" || H || e (u64 BE) || dir      dir = "s2r" | "r2s"
//! ```
//!
//! with `H = SM3(handshake)`, so a modified handshake yields other keys and the
//! first frame fails. Every frame is SM4-GCM with nonce `e (u32) || seq (u64)` and
//! the frame header (length, kind, `seq`) as AAD; the receiver requires sequence
//! numbers 0, 1, 2, … with no gap, so a replayed, reordered or dropped frame is an
//! error, and the stream is complete only with an authenticated *end* frame that
//! also carries the total length. After `--rekey-bytes` bytes, or `--rekey-seconds`
//! seconds after an epoch's first data (checked when the next data is sent, so an
//! idle stream spends no keys), the sender takes a new key and announces its ID in
//! an authenticated *rekey* frame; the receiver fetches that key by ID and both move to
//! the next epoch. Sequence numbers continue across epochs. Finally the receiver
//! answers the end frame with an *ack* under its own direction's key, sent only
//! once the output is complete (for a file: renamed into place), so the sender
//! knows the stream arrived whole; without it `send` fails. A receiver that
//! refuses a stream just closes the connection (it has no key to say why with);
//! the sender notices when it next writes or waits for the ack.
//!
//! Streams support the `qkd` mode only. Hybrid (ML-KEM) and OTP protection need the
//! length or the recipient's public key up front: seal a file for those.
//!
//! # Shape
//!
//! The protocol is a sans-IO core, [`Sender`] (then [`Finished`]) and [`Receiver`]:
//! bytes and keys in, bytes and events out, time passed in as an [`Instant`], no
//! sockets, no KME, no clock. [`send`] and [`receive`] are the thin tokio adapter:
//! they move bytes between the core and a connection, ask the KME for keys when the
//! core says so, and read and write files on the blocking pool. Every length read
//! off the wire is bounded ([`MAX_FRAME_LEN`]); the receiver's buffer is allocated
//! once at its largest and never grows. Key material lives in [`Key`] and the
//! `qkdnet-crypto` secret types and is zeroized on drop; plaintext buffers are
//! zeroized on drop too; nothing secret is printed.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use qkdnet_crypto::gcm::{GCM_TAG_LEN, GcmNonce, GcmTag, Sm4Gcm};
use qkdnet_crypto::hybrid::KeyMaterial;
use qkdnet_crypto::sm3::{Sm3Digest, sm3};
use qkdnet_etsi::client::{EtsiClient, Key};
use qkdnet_etsi::ids::SaeId;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::{AppError, StreamError};
use crate::files::{TempOutput, read_some, run_blocking};
use crate::format::{MAX_REKEY_BYTES, Mode};
use crate::keycache::KeyCache;
use crate::keys::{
    check_identity_and_pool, dec_keys, derive_sm4_key, enc_keys, qkd_secret, random_array, sae_id,
};
use crate::stream_wire::{
    FRAME_HEADER_LEN, FrameHeader, FrameKind, Handshake, MAX_FRAME_LEN, MAX_HANDSHAKE_LEN,
    MAX_PAYLOAD, STREAM_ID_LEN, decode_frame,
};

/// Default plaintext bytes per frame the sender writes (the receiver takes up to
/// [`MAX_PAYLOAD`]).
pub const DEFAULT_FRAME_PAYLOAD: usize = 64 << 10;
/// Default plaintext bytes per QKD key.
pub const DEFAULT_REKEY_BYTES: u64 = crate::seal::DEFAULT_REKEY_BYTES;
/// Domain separation label of the key derivation context.
const KDF_LABEL: &[u8] = b"qkdnet/stream/v1";
/// Direction labels of the key derivation.
const S2R: &[u8] = b"s2r";
const R2S: &[u8] = b"r2s";
/// Plaintext of an ack frame: total bytes and the end frame's sequence number.
const ACK_PAYLOAD_LEN: usize = 16;
/// An ack frame on the wire.
const ACK_FRAME_LEN: usize = FRAME_HEADER_LEN + ACK_PAYLOAD_LEN + GCM_TAG_LEN;
/// Most bytes the adapter reads from the connection at once.
const READ_CHUNK: usize = 64 << 10;
/// The receiver's buffer: one largest frame and one read.
const RX_BUFFER: usize = MAX_FRAME_LEN + READ_CHUNK;

// ---- keys and frames ----

/// The SM4-GCM keys of one epoch, both directions.
struct EpochKeys {
    epoch: u32,
    s2r: Sm4Gcm,
    r2s: Sm4Gcm,
}

impl EpochKeys {
    fn derive(key: Key, key_bits: u16, h: &Sm3Digest, epoch: u32) -> Result<Self, StreamError> {
        if key.material.len() != usize::from(key_bits / 8) {
            return Err(StreamError::Misuse(format!(
                "key {} is {} bytes, not {key_bits} bits",
                key.id,
                key.material.len()
            )));
        }
        let qkd_key = qkd_secret(key);
        let m = KeyMaterial::QkdOnly { qkd_key: &qkd_key };
        let e = u64::from(epoch);
        Ok(Self {
            epoch,
            s2r: Sm4Gcm::new(&derive_sm4_key(&m, KDF_LABEL, h, e, S2R)?),
            r2s: Sm4Gcm::new(&derive_sm4_key(&m, KDF_LABEL, h, e, R2S)?),
        })
    }
}

fn nonce(epoch: u32, seq: u64) -> GcmNonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&epoch.to_be_bytes());
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n
}

/// Appends the frame `kind`/`seq` carrying `payload` to `out`.
fn seal_frame(
    gcm: &Sm4Gcm,
    epoch: u32,
    kind: FrameKind,
    seq: u64,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), StreamError> {
    let header = FrameHeader::new(kind, seq, payload.len())?.encode();
    out.extend_from_slice(&header);
    let start = out.len();
    out.extend_from_slice(payload);
    let tag = gcm.seal_in_place_detached(&nonce(epoch, seq), &header, &mut out[start..])?;
    out.extend_from_slice(&tag);
    Ok(())
}

/// Authenticates and decrypts the whole frame `frame` in place; returns the plaintext.
fn open_frame<'a>(
    gcm: &Sm4Gcm,
    epoch: u32,
    h: &FrameHeader,
    frame: &'a mut [u8],
) -> Result<&'a mut [u8], StreamError> {
    let (header, rest) = frame.split_at_mut(FRAME_HEADER_LEN);
    let (ct, tag) = rest.split_at_mut(h.payload_len);
    let tag: &GcmTag = (&*tag)
        .try_into()
        .map_err(|_| StreamError::Misuse("frame shorter than its header says".into()))?;
    gcm.open_in_place_detached(&nonce(epoch, h.seq), header, ct, tag)
        .map_err(|_| StreamError::Authentication { seq: h.seq })?;
    Ok(ct)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn next(seq: &mut u64) -> Result<u64, StreamError> {
    let s = *seq;
    *seq = s
        .checked_add(1)
        .ok_or_else(|| StreamError::Misuse("sequence numbers exhausted".into()))?;
    Ok(s)
}

/// What a stream did, as far as one side can tell. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Plaintext bytes.
    pub plaintext_bytes: u64,
    /// Frames from the sender (data, rekey and end).
    pub frames: u64,
    /// QKD key IDs, one per epoch, in order.
    pub key_ids: Vec<Uuid>,
}

// ---- the sender ----

/// How the sender cuts and rekeys the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderConfig {
    /// Plaintext bytes per QKD key, 1..=2^40.
    pub rekey_bytes: u64,
    /// Longest an epoch lasts from its first data (`None`: no time limit).
    pub rekey_interval: Option<Duration>,
    /// Largest data frame payload, 1..=[`MAX_PAYLOAD`].
    pub frame_payload: usize,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            rekey_bytes: DEFAULT_REKEY_BYTES,
            rekey_interval: None,
            frame_payload: DEFAULT_FRAME_PAYLOAD,
        }
    }
}

impl SenderConfig {
    /// Why these settings are invalid, if they are.
    pub fn check(&self) -> Result<(), String> {
        if self.rekey_bytes == 0 || self.rekey_bytes > MAX_REKEY_BYTES {
            return Err(format!(
                "the rekey interval must be 1 to {MAX_REKEY_BYTES} bytes, not {}",
                self.rekey_bytes
            ));
        }
        if self.rekey_interval == Some(Duration::ZERO) {
            return Err("the rekey time must be positive".into());
        }
        if self.frame_payload == 0 || self.frame_payload > MAX_PAYLOAD {
            return Err(format!(
                "the frame payload must be 1 to {MAX_PAYLOAD} bytes, not {}",
                self.frame_payload
            ));
        }
        Ok(())
    }
}

/// What [`Sender::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// This many bytes (at least one, unless the input was empty) went into a frame.
    Sealed(usize),
    /// The epoch is over: give a new key with [`Sender::rekey`] first.
    NeedKey,
}

/// The sending side of a stream, open for data.
pub struct Sender {
    h: Sm3Digest,
    key_bits: u16,
    keys: EpochKeys,
    seq: u64,
    epoch_bytes: u64,
    epoch_start: Instant,
    total: u64,
    cfg: SenderConfig,
    key_ids: Vec<Uuid>,
}

impl core::fmt::Debug for Sender {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sender")
            .field("epoch", &self.keys.epoch)
            .field("seq", &self.seq)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl Sender {
    /// Starts a stream whose handshake is `handshake` and whose first key is
    /// `first_key` (the key the handshake names); appends the handshake to `out`.
    pub fn new(
        handshake: &Handshake,
        first_key: Key,
        cfg: SenderConfig,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Result<Self, StreamError> {
        cfg.check().map_err(StreamError::Misuse)?;
        if first_key.id != handshake.first_key {
            return Err(StreamError::Misuse(
                "the first key is not the one the handshake names".into(),
            ));
        }
        let raw = handshake.encode()?;
        let h = sm3(&raw);
        let key_ids = vec![first_key.id];
        let keys = EpochKeys::derive(first_key, handshake.key_bits, &h, 0)?;
        out.extend_from_slice(&raw);
        Ok(Self {
            h,
            key_bits: handshake.key_bits,
            keys,
            seq: 0,
            epoch_bytes: 0,
            epoch_start: now,
            total: 0,
            cfg,
            key_ids,
        })
    }

    /// Whether the current epoch is over: it carried data and reached the byte
    /// limit or the time limit (counted from its first data).
    pub fn rekey_due(&self, now: Instant) -> bool {
        self.epoch_bytes > 0
            && (self.epoch_bytes >= self.cfg.rekey_bytes
                || self
                    .cfg
                    .rekey_interval
                    .is_some_and(|i| now.saturating_duration_since(self.epoch_start) >= i))
    }

    /// Seals a prefix of `data` into one data frame appended to `out`, or asks
    /// for a new key first.
    pub fn push(
        &mut self,
        data: &[u8],
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Result<Push, StreamError> {
        if data.is_empty() {
            return Ok(Push::Sealed(0));
        }
        if self.rekey_due(now) {
            return Ok(Push::NeedKey);
        }
        if self.epoch_bytes == 0 {
            self.epoch_start = now;
        }
        // Not due, so epoch_bytes < rekey_bytes and the budget is at least 1.
        let budget = self.cfg.rekey_bytes - self.epoch_bytes;
        let n = data
            .len()
            .min(self.cfg.frame_payload)
            .min(usize::try_from(budget).unwrap_or(usize::MAX));
        let seq = next(&mut self.seq)?;
        seal_frame(
            &self.keys.s2r,
            self.keys.epoch,
            FrameKind::Data,
            seq,
            &data[..n],
            out,
        )?;
        self.epoch_bytes += n as u64;
        self.total += n as u64;
        Ok(Push::Sealed(n))
    }

    /// Starts the next epoch with `key` (fresh from `enc_keys`): appends a rekey
    /// frame announcing its ID, under the current key, to `out`.
    pub fn rekey(&mut self, key: Key, now: Instant, out: &mut Vec<u8>) -> Result<(), StreamError> {
        if self.key_ids.contains(&key.id) {
            return Err(StreamError::Misuse(format!(
                "key {} was used already",
                key.id
            )));
        }
        let epoch = self
            .keys
            .epoch
            .checked_add(1)
            .ok_or_else(|| StreamError::Misuse("epochs exhausted".into()))?;
        let id = key.id;
        let keys = EpochKeys::derive(key, self.key_bits, &self.h, epoch)?;
        let seq = next(&mut self.seq)?;
        seal_frame(
            &self.keys.s2r,
            self.keys.epoch,
            FrameKind::Rekey,
            seq,
            id.as_bytes(),
            out,
        )?;
        self.keys = keys;
        self.key_ids.push(id);
        self.epoch_bytes = 0;
        self.epoch_start = now;
        Ok(())
    }

    /// Ends the stream: appends the end frame to `out`. What remains is waiting
    /// for the receiver's ack.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<Finished, StreamError> {
        let seq = next(&mut self.seq)?;
        seal_frame(
            &self.keys.s2r,
            self.keys.epoch,
            FrameKind::End,
            seq,
            &self.total.to_be_bytes(),
            out,
        )?;
        Ok(Finished {
            keys: self.keys,
            end_seq: seq,
            summary: Summary {
                plaintext_bytes: self.total,
                frames: self.seq,
                key_ids: self.key_ids,
            },
            buf: Vec::with_capacity(ACK_FRAME_LEN),
        })
    }
}

/// A sender that has sent its end frame and waits for the receiver's ack.
pub struct Finished {
    keys: EpochKeys,
    end_seq: u64,
    summary: Summary,
    buf: Vec<u8>,
}

impl core::fmt::Debug for Finished {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Finished")
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl Finished {
    /// Takes bytes from the receiver; returns the stream's summary once they
    /// form a valid ack for exactly this stream.
    pub fn handle_bytes(&mut self, input: &[u8]) -> Result<Option<Summary>, StreamError> {
        if self.buf.len() + input.len() > ACK_FRAME_LEN {
            return Err(StreamError::Protocol(
                "the receiver sent more than an acknowledgement".into(),
            ));
        }
        self.buf.extend_from_slice(input);
        let Some(h) = FrameHeader::decode(&self.buf)? else {
            return Ok(None);
        };
        if h.kind != FrameKind::Ack {
            return Err(StreamError::Protocol(format!(
                "the receiver sent a {:?} frame",
                h.kind
            )));
        }
        if h.seq != 0 {
            return Err(StreamError::Sequence {
                expected: 0,
                got: h.seq,
            });
        }
        if self.buf.len() < ACK_FRAME_LEN {
            return Ok(None);
        }
        let ack = open_frame(&self.keys.r2s, self.keys.epoch, &h, &mut self.buf)?;
        let (total, end_seq) = (u64_at(ack, 0), u64_at(ack, 8));
        if total != self.summary.plaintext_bytes || end_seq != self.end_seq {
            return Err(StreamError::Unconfirmed(format!(
                "the receiver acknowledged {total} bytes up to frame {end_seq}, not {} bytes up to \
                 frame {}",
                self.summary.plaintext_bytes, self.end_seq
            )));
        }
        Ok(Some(self.summary.clone()))
    }

    /// The error for a connection that closed before the ack.
    pub fn handle_eof(&self) -> StreamError {
        StreamError::Unconfirmed(
            "the connection closed before the receiver acknowledged the stream \
             (it may have refused it; see its error)"
                .into(),
        )
    }
}

// ---- the receiver ----

/// What the receiver needs from its caller, or has for it.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// The handshake arrived and is addressed to this SAE. The keys it names come
    /// from `handshake.sender` (check it is a peer to accept).
    Handshake(&'a Handshake),
    /// Fetch this key (`dec_keys` with the handshake's sender as master) and give
    /// it to [`Receiver::supply_key`].
    NeedKey(Uuid),
    /// Authenticated plaintext, in order.
    Data(&'a [u8]),
    /// The authenticated end of the stream: everything has been delivered. Send
    /// [`Receiver::ack`] once the output is safe.
    End,
}

enum RxState {
    Handshake,
    Announced,
    NeedKey { id: Uuid, epoch: u32 },
    Open,
    Ended { end_seq: u64 },
    Acked,
    Failed,
}

/// The receiving side of a stream.
pub struct Receiver {
    me: SaeId,
    buf: Zeroizing<Vec<u8>>,
    start: usize,
    state: RxState,
    handshake: Option<Handshake>,
    h: Sm3Digest,
    keys: Option<EpochKeys>,
    seq: u64,
    total: u64,
    key_ids: Vec<Uuid>,
}

impl core::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Receiver")
            .field("me", &self.me)
            .field("seq", &self.seq)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// A receiver for streams addressed to `me`.
    pub fn new(me: SaeId) -> Self {
        Self {
            me,
            buf: Zeroizing::new(Vec::with_capacity(RX_BUFFER)),
            start: 0,
            state: RxState::Handshake,
            handshake: None,
            h: [0; 32],
            keys: None,
            seq: 0,
            total: 0,
            key_ids: Vec::new(),
        }
    }

    /// The handshake, once it has arrived.
    pub fn handshake(&self) -> Option<&Handshake> {
        self.handshake.as_ref()
    }

    /// How many bytes [`Receiver::handle_bytes`] takes now (at least
    /// [`MAX_FRAME_LEN`] minus what is buffered).
    pub fn read_capacity(&self) -> usize {
        RX_BUFFER - (self.buf.len() - self.start)
    }

    /// Takes bytes from the connection (at most [`Receiver::read_capacity`]).
    pub fn handle_bytes(&mut self, input: &[u8]) -> Result<(), StreamError> {
        match self.state {
            RxState::Failed => return Err(StreamError::Misuse("the stream failed".into())),
            RxState::Ended { .. } | RxState::Acked if !input.is_empty() => {
                self.state = RxState::Failed;
                return Err(StreamError::Protocol(
                    "data after the end of the stream".into(),
                ));
            }
            _ => {}
        }
        if input.len() > self.read_capacity() {
            return Err(StreamError::Misuse(format!(
                "{} bytes given where {} fit",
                input.len(),
                self.read_capacity()
            )));
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        // Within RX_BUFFER (checked above), the capacity reserved at creation:
        // the buffer never reallocates, so no copy of plaintext is left behind.
        self.buf.extend_from_slice(input);
        Ok(())
    }

    /// The error for a connection that closed now (a receiver reads only until
    /// the end frame).
    pub fn handle_eof(&mut self) -> StreamError {
        let e = match self.state {
            RxState::Handshake if self.buf.len() == self.start => {
                StreamError::Truncated("the connection closed before the handshake".into())
            }
            RxState::Handshake => {
                StreamError::Truncated("the connection closed inside the handshake".into())
            }
            RxState::Ended { .. } | RxState::Acked => {
                StreamError::Misuse("end of connection after the end frame".into())
            }
            _ => StreamError::Truncated(format!(
                "the connection closed after {} bytes and {} frames, without the end frame",
                self.total, self.seq
            )),
        };
        self.state = RxState::Failed;
        e
    }

    /// The next thing to do: `Ok(None)` means more bytes are needed.
    pub fn poll_event(&mut self) -> Result<Option<Event<'_>>, StreamError> {
        match self.step() {
            Ok(Some(Step::Handshake)) => Ok(self.handshake.as_ref().map(Event::Handshake)),
            Ok(Some(Step::NeedKey(id))) => Ok(Some(Event::NeedKey(id))),
            Ok(Some(Step::Data(r))) => Ok(Some(Event::Data(&self.buf[r]))),
            Ok(Some(Step::End)) => Ok(Some(Event::End)),
            Ok(None) => Ok(None),
            Err(e) => {
                self.state = RxState::Failed;
                Err(e)
            }
        }
    }

    fn step(&mut self) -> Result<Option<Step>, StreamError> {
        match self.state {
            RxState::Handshake => {
                let Some((h, n)) = Handshake::decode(&self.buf[self.start..])? else {
                    return Ok(None);
                };
                if h.recipient != self.me {
                    return Err(StreamError::WrongRecipient {
                        recipient: h.recipient.to_string(),
                        me: self.me.to_string(),
                    });
                }
                self.h = sm3(&self.buf[self.start..self.start + n]);
                self.start += n;
                self.handshake = Some(h);
                self.state = RxState::Announced;
                Ok(Some(Step::Handshake))
            }
            RxState::Announced => {
                let id = self
                    .handshake
                    .as_ref()
                    .map(|h| h.first_key)
                    .ok_or_else(|| StreamError::Misuse("no handshake".into()))?;
                self.state = RxState::NeedKey { id, epoch: 0 };
                Ok(Some(Step::NeedKey(id)))
            }
            RxState::NeedKey { id, .. } => Ok(Some(Step::NeedKey(id))),
            RxState::Open => self.open_next(),
            RxState::Ended { .. } | RxState::Acked => Ok(None),
            RxState::Failed => Err(StreamError::Misuse("the stream failed".into())),
        }
    }

    fn open_next(&mut self) -> Result<Option<Step>, StreamError> {
        let Some((h, frame)) = decode_frame(&self.buf[self.start..])? else {
            return Ok(None);
        };
        let len = frame.len();
        if h.seq != self.seq {
            return Err(StreamError::Sequence {
                expected: self.seq,
                got: h.seq,
            });
        }
        if h.kind == FrameKind::Ack {
            return Err(StreamError::Protocol("an ack frame from the sender".into()));
        }
        let keys = self
            .keys
            .as_ref()
            .ok_or_else(|| StreamError::Misuse("no key".into()))?;
        let epoch = keys.epoch;
        let range = self.start..self.start + len;
        let plain = open_frame(&keys.s2r, epoch, &h, &mut self.buf[range])?;
        let payload = self.start + FRAME_HEADER_LEN..self.start + FRAME_HEADER_LEN + plain.len();
        self.start += len;
        self.seq = h
            .seq
            .checked_add(1)
            .ok_or_else(|| StreamError::Protocol("sequence numbers exhausted".into()))?;
        match h.kind {
            FrameKind::Data => {
                self.total += payload.len() as u64;
                Ok(Some(Step::Data(payload)))
            }
            FrameKind::Rekey => {
                let mut id = [0u8; 16];
                id.copy_from_slice(&self.buf[payload]);
                let id = Uuid::from_bytes(id);
                if self.key_ids.contains(&id) {
                    return Err(StreamError::Protocol(format!("key {id} announced twice")));
                }
                let epoch = epoch
                    .checked_add(1)
                    .ok_or_else(|| StreamError::Protocol("epochs exhausted".into()))?;
                self.keys = None;
                self.state = RxState::NeedKey { id, epoch };
                Ok(Some(Step::NeedKey(id)))
            }
            FrameKind::End => {
                let total = u64_at(&self.buf[payload], 0);
                if total != self.total {
                    return Err(StreamError::Protocol(format!(
                        "the end frame says {total} bytes where {} arrived",
                        self.total
                    )));
                }
                if self.buf.len() > self.start {
                    return Err(StreamError::Protocol(
                        "data after the end of the stream".into(),
                    ));
                }
                self.state = RxState::Ended { end_seq: h.seq };
                Ok(Some(Step::End))
            }
            FrameKind::Ack => Err(StreamError::Protocol("an ack frame from the sender".into())),
        }
    }

    /// Gives the key asked for by [`Event::NeedKey`].
    pub fn supply_key(&mut self, key: Key) -> Result<(), StreamError> {
        let RxState::NeedKey { id, epoch } = self.state else {
            return Err(StreamError::Misuse("no key was asked for".into()));
        };
        if key.id != id {
            return Err(StreamError::Misuse(format!(
                "key {} given where {id} was asked for",
                key.id
            )));
        }
        let bits = self
            .handshake
            .as_ref()
            .map(|h| h.key_bits)
            .ok_or_else(|| StreamError::Misuse("no handshake".into()))?;
        self.keys = Some(EpochKeys::derive(key, bits, &self.h, epoch)?);
        self.key_ids.push(id);
        self.state = RxState::Open;
        Ok(())
    }

    /// After [`Event::End`]: appends the ack to `out`.
    pub fn ack(&mut self, out: &mut Vec<u8>) -> Result<(), StreamError> {
        let (RxState::Ended { end_seq }, Some(keys)) = (&self.state, &self.keys) else {
            return Err(StreamError::Misuse(
                "ack before the end of the stream".into(),
            ));
        };
        let mut p = [0u8; ACK_PAYLOAD_LEN];
        p[..8].copy_from_slice(&self.total.to_be_bytes());
        p[8..].copy_from_slice(&end_seq.to_be_bytes());
        seal_frame(&keys.r2s, keys.epoch, FrameKind::Ack, 0, &p, out)?;
        self.state = RxState::Acked;
        Ok(())
    }

    /// What arrived so far.
    pub fn summary(&self) -> Summary {
        Summary {
            plaintext_bytes: self.total,
            frames: self.seq,
            key_ids: self.key_ids.clone(),
        }
    }
}

/// An event without the borrow (ranges into the buffer).
enum Step {
    Handshake,
    NeedKey(Uuid),
    Data(core::ops::Range<usize>),
    End,
}

// ---- the tokio adapter ----

/// How to send a stream.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Protection mode: [`Mode::Qkd`] only.
    pub mode: Mode,
    /// QKD key size to ask for, in bits.
    pub key_bits: u16,
    /// Cutting and rekeying.
    pub sender: SenderConfig,
    /// How long to wait for the receiver's ack after the end frame.
    pub ack_timeout: Duration,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Qkd,
            key_bits: crate::seal::DEFAULT_KEY_BITS,
            sender: SenderConfig::default(),
            ack_timeout: Duration::from_secs(60),
        }
    }
}

/// Where a received stream's plaintext goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Standard output, each frame as soon as it authenticates (a failed stream
    /// leaves what arrived before the failure, and an error).
    Stdout,
    /// A file that appears (replacing any old one) only once the whole stream is
    /// authenticated; a failed stream leaves no file.
    File(PathBuf),
}

/// How to receive a stream.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// How long the handshake may take to arrive.
    pub handshake_timeout: Duration,
    /// Accept streams only from these SAEs (empty: from any SAE whose keys the
    /// KME delivers). Checked before the KME is asked for anything.
    pub senders: Vec<SaeId>,
    /// Keep every key fetched for a stream in this cache *before* using it, and
    /// look there first: a connection that names a real key (its handshake is
    /// cleartext, so anyone on the path can copy it) but never authenticates
    /// then costs the genuine stream nothing. A stream's keys are deleted from
    /// the cache once it has ended and been acknowledged; keys of streams that
    /// failed stay until the cache's lifetime ends.
    pub key_cache: Option<std::sync::Arc<KeyCache>>,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(30),
            senders: Vec::new(),
            key_cache: None,
        }
    }
}

/// What a stream did. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamReport {
    /// Protection mode.
    pub mode: Mode,
    /// Sending SAE.
    pub sender: String,
    /// Receiving SAE.
    pub recipient: String,
    /// QKD key IDs, one per epoch, in order.
    pub key_ids: Vec<Uuid>,
    /// QKD key bits taken from the KME.
    pub key_bits_consumed: u64,
    /// Plaintext bytes.
    pub plaintext_bytes: u64,
    /// Frames from the sender (data, rekey, end).
    pub frames: u64,
    /// Bytes from the sender on the connection (handshake and frames).
    pub wire_bytes: u64,
    /// Problems that did not stop the stream (a key cache that could not be cleaned).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl StreamReport {
    fn new(h: &Handshake, s: Summary, wire_bytes: u64) -> Self {
        Self {
            mode: h.mode,
            sender: h.sender.to_string(),
            recipient: h.recipient.to_string(),
            key_bits_consumed: s.key_ids.len() as u64 * u64::from(h.key_bits),
            key_ids: s.key_ids,
            plaintext_bytes: s.plaintext_bytes,
            frames: s.frames,
            wire_bytes,
            warnings: Vec::new(),
        }
    }
}

fn conn_error(what: &str, e: std::io::Error) -> AppError {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
    match e.kind() {
        BrokenPipe | ConnectionReset | ConnectionAborted => {
            StreamError::Unconfirmed(format!("the peer closed the connection while {what}")).into()
        }
        _ => AppError::io(what, e),
    }
}

async fn write_all<S: AsyncWrite + Unpin>(
    conn: &mut S,
    wire: &mut Vec<u8>,
    sent: &mut u64,
) -> Result<(), AppError> {
    conn.write_all(wire)
        .await
        .map_err(|e| conn_error("sending", e))?;
    conn.flush().await.map_err(|e| conn_error("sending", e))?;
    *sent += wire.len() as u64;
    wire.clear();
    Ok(())
}

async fn one_key(client: &EtsiClient, recipient: &SaeId, key_bits: u16) -> Result<Key, AppError> {
    enc_keys(client, recipient, 1, key_bits, 1)
        .await?
        .pop()
        .ok_or_else(|| AppError::Internal("enc_keys returned no key".into()))
}

/// Sends `input` as SAE `from` to SAE `to` over the connection `conn`, with keys
/// from `client` (which must present `from`'s certificate). Returns once the
/// receiver has acknowledged the whole stream. [`prepare`] then [`Prepared::send`].
pub async fn send<R, S>(
    client: &EtsiClient,
    from: &str,
    to: &str,
    input: R,
    conn: S,
    opts: &SendOptions,
) -> Result<StreamReport, AppError>
where
    R: Read + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin,
{
    prepare(client, from, to, opts)
        .await?
        .send(input, conn)
        .await
}

/// A sender whose options are valid and whose certificate and key supply the KME
/// has confirmed (`status`), before any key is taken: connect, then
/// [`Prepared::send`].
#[derive(Debug)]
pub struct Prepared<'a> {
    client: &'a EtsiClient,
    sender: SaeId,
    recipient: SaeId,
    opts: SendOptions,
}

/// Checks what can be checked before connecting (a refused connection then costs
/// no key): the options, and with `status` that `client` presents `from`'s
/// certificate and that the KME has a key for `to`.
pub async fn prepare<'a>(
    client: &'a EtsiClient,
    from: &str,
    to: &str,
    opts: &SendOptions,
) -> Result<Prepared<'a>, AppError> {
    let sender = sae_id(from, "sender")?;
    let recipient = sae_id(to, "recipient")?;
    if sender == recipient {
        return Err(AppError::InvalidInput(
            "sender and recipient are the same SAE".into(),
        ));
    }
    if opts.mode != Mode::Qkd {
        return Err(AppError::InvalidInput(format!(
            "streams support mode qkd only, not {} (seal a file for hybrid or otp)",
            opts.mode
        )));
    }
    opts.sender.check().map_err(AppError::InvalidInput)?;
    check_identity_and_pool(client, &sender, &recipient, 1, opts.key_bits).await?;
    Ok(Prepared {
        client,
        sender,
        recipient,
        opts: opts.clone(),
    })
}

impl Prepared<'_> {
    /// Takes the first key, sends the handshake and `input` over `conn`, and waits
    /// for the receiver's ack.
    pub async fn send<R, S>(self, input: R, conn: S) -> Result<StreamReport, AppError>
    where
        R: Read + Send + 'static,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Prepared {
            client,
            sender,
            recipient,
            opts,
        } = self;
        send_prepared(client, sender, recipient, input, conn, &opts).await
    }
}

async fn send_prepared<R, S>(
    client: &EtsiClient,
    sender: SaeId,
    recipient: SaeId,
    input: R,
    mut conn: S,
    opts: &SendOptions,
) -> Result<StreamReport, AppError>
where
    R: Read + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let first = one_key(client, &recipient, opts.key_bits).await?;
    let handshake = Handshake {
        mode: opts.mode,
        sender,
        recipient,
        key_bits: opts.key_bits,
        stream_id: random_array::<STREAM_ID_LEN>()?,
        first_key: first.id,
    };
    let mut wire = Vec::with_capacity(MAX_HANDSHAKE_LEN + opts.sender.frame_payload + 64);
    let mut sent = 0u64;
    let mut tx = Sender::new(
        &handshake,
        first,
        opts.sender.clone(),
        Instant::now(),
        &mut wire,
    )?;
    write_all(&mut conn, &mut wire, &mut sent).await?;

    let mut input = input;
    let mut buf = Zeroizing::new(vec![0u8; opts.sender.frame_payload]);
    loop {
        let (i, b, n) = run_blocking(move || {
            let n = read_some(&mut input, &mut buf[..], "reading the input")?;
            Ok((input, buf, n))
        })
        .await?;
        (input, buf) = (i, b);
        if n == 0 {
            break;
        }
        let mut done = 0;
        while done < n {
            match tx.push(&buf[done..n], Instant::now(), &mut wire)? {
                Push::Sealed(k) => done += k,
                Push::NeedKey => {
                    write_all(&mut conn, &mut wire, &mut sent).await?;
                    let key = one_key(client, &handshake.recipient, opts.key_bits).await?;
                    tx.rekey(key, Instant::now(), &mut wire)?;
                }
            }
        }
        write_all(&mut conn, &mut wire, &mut sent).await?;
    }
    let mut fin = tx.finish(&mut wire)?;
    write_all(&mut conn, &mut wire, &mut sent).await?;

    let mut ack = [0u8; ACK_FRAME_LEN];
    let summary = tokio::time::timeout(opts.ack_timeout, async {
        loop {
            let n = conn
                .read(&mut ack)
                .await
                .map_err(|e| conn_error("waiting for the ack", e))?;
            if n == 0 {
                return Err(AppError::from(fin.handle_eof()));
            }
            if let Some(s) = fin.handle_bytes(&ack[..n])? {
                return Ok(s);
            }
        }
    })
    .await
    .map_err(|_| {
        StreamError::Unconfirmed(format!(
            "no acknowledgement within {} s",
            opts.ack_timeout.as_secs()
        ))
    })??;
    // The receiver has everything; a failed close changes nothing.
    let _ = conn.shutdown().await;
    Ok(StreamReport::new(&handshake, summary, sent))
}

/// Where plaintext goes while a stream is received.
enum Sink {
    Stdout,
    File(TempOutput),
}

impl Sink {
    fn open(out: &Output) -> Result<Self, AppError> {
        Ok(match out {
            Output::Stdout => Sink::Stdout,
            Output::File(p) => Sink::File(TempOutput::create(p)?),
        })
    }

    fn write(&mut self, data: &[u8]) -> Result<(), AppError> {
        match self {
            Sink::Stdout => {
                let mut o = std::io::stdout().lock();
                o.write_all(data)
                    .and_then(|()| o.flush())
                    .map_err(|e| AppError::io("writing to standard output", e))
            }
            Sink::File(f) => f.write(data),
        }
    }

    fn finish(self) -> Result<(), AppError> {
        match self {
            Sink::Stdout => Ok(()),
            Sink::File(f) => f.commit(),
        }
    }
}

/// Receives one stream from the connection `conn` as SAE `as_sae`, with keys
/// from `client` (which must present `as_sae`'s certificate), into `output`.
/// Acknowledges the stream to the sender once `output` is complete.
pub async fn receive<S>(
    client: &EtsiClient,
    as_sae: &str,
    mut conn: S,
    output: &Output,
    opts: &ReceiveOptions,
) -> Result<StreamReport, AppError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let me = sae_id(as_sae, "recipient")?;
    let mut sink = Sink::open(output)?;
    let mut rx = Receiver::new(me.clone());
    let mut scratch = Zeroizing::new(vec![0u8; READ_CHUNK]);
    let mut plain = Zeroizing::new(Vec::with_capacity(MAX_PAYLOAD));
    let mut received = 0u64;
    let deadline = tokio::time::Instant::now() + opts.handshake_timeout;
    let mut batch = 1;
    let mut used: Vec<Uuid> = Vec::new();
    loop {
        match rx.poll_event()? {
            None => {
                let want = READ_CHUNK.min(rx.read_capacity());
                let read = conn.read(&mut scratch[..want]);
                let n = if rx.handshake().is_some() {
                    read.await
                } else {
                    tokio::time::timeout_at(deadline, read).await.map_err(|_| {
                        StreamError::Truncated(format!(
                            "no handshake within {} s",
                            opts.handshake_timeout.as_secs()
                        ))
                    })?
                }
                .map_err(|e| AppError::io("reading the stream", e))?;
                if n == 0 {
                    return Err(rx.handle_eof().into());
                }
                received += n as u64;
                rx.handle_bytes(&scratch[..n])?;
            }
            Some(Event::Handshake(h)) => {
                let (sender, bits) = (h.sender.clone(), h.key_bits);
                if !opts.senders.is_empty() && !opts.senders.contains(&sender) {
                    return Err(StreamError::SenderNotAllowed {
                        sender: sender.to_string(),
                    }
                    .into());
                }
                batch = check_identity_and_pool(client, &me, &sender, 0, bits).await?;
            }
            Some(Event::NeedKey(id)) => {
                let h = rx
                    .handshake()
                    .ok_or_else(|| AppError::Internal("key before handshake".into()))?;
                let (sender, bits) = (h.sender.clone(), h.key_bits);
                let key =
                    stream_key(client, opts.key_cache.as_deref(), &sender, id, bits, batch).await?;
                used.push(id);
                rx.supply_key(key)?;
            }
            Some(Event::Data(d)) => {
                plain.clear();
                plain.extend_from_slice(d); // at most MAX_PAYLOAD: no reallocation
                let (s, p) = run_blocking(move || {
                    sink.write(&plain)?;
                    Ok((sink, plain))
                })
                .await?;
                (sink, plain) = (s, p);
            }
            Some(Event::End) => break,
        }
    }
    run_blocking(move || sink.finish()).await?;
    let mut wire = Vec::with_capacity(ACK_FRAME_LEN);
    rx.ack(&mut wire)?;
    let mut acked = 0;
    write_all(&mut conn, &mut wire, &mut acked).await?;
    let _ = conn.shutdown().await;
    let h = rx
        .handshake()
        .ok_or_else(|| AppError::Internal("end before handshake".into()))?;
    let mut report = StreamReport::new(h, rx.summary(), received);
    if let Some(c) = &opts.key_cache {
        // The stream is complete: its keys are spent for good. A failure here
        // leaves them to expire with the cache's lifetime.
        if let Err(e) = c.forget(&h.sender, &used) {
            report.warnings.push(format!(
                "could not delete the stream's keys from the key cache {}: {e}",
                c.dir().display()
            ));
        }
    }
    Ok(report)
}

/// Key `id` of a stream from `sender`: from the cache if it holds it, else
/// from the KME, stored in the cache before it is used.
async fn stream_key(
    client: &EtsiClient,
    cache: Option<&KeyCache>,
    sender: &SaeId,
    id: Uuid,
    bits: u16,
    batch: u64,
) -> Result<Key, AppError> {
    let now = std::time::SystemTime::now();
    if let Some(c) = cache
        && let Some(Some(k)) = c.lookup(sender, &[id], now).keys.pop()
    {
        return Ok(k);
    }
    let key = dec_keys(client, sender, &[id], bits, batch)
        .await?
        .pop()
        .ok_or_else(|| AppError::Internal("dec_keys returned no key".into()))?;
    if let Some(c) = cache {
        c.store(sender, std::slice::from_ref(&key), now)?;
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BITS: u16 = 256;

    fn key(n: u8) -> Key {
        Key {
            id: Uuid::from_u128(u128::from(n) + 1),
            material: Zeroizing::new(vec![n.wrapping_mul(37).wrapping_add(1); 32]),
        }
    }

    fn handshake(first: &Key) -> Handshake {
        Handshake {
            mode: Mode::Qkd,
            sender: SaeId::new("alice").expect("valid"),
            recipient: SaeId::new("bob").expect("valid"),
            key_bits: BITS,
            stream_id: [3; STREAM_ID_LEN],
            first_key: first.id,
        }
    }

    fn bob() -> Receiver {
        Receiver::new(SaeId::new("bob").expect("valid"))
    }

    /// Seeded test data (the SM3 counter-mode KDF as a deterministic generator).
    fn data(len: usize, seed: u32) -> Vec<u8> {
        let mut d = vec![0u8; len];
        qkdnet_crypto::kdf::sm2_kdf(&seed.to_be_bytes(), &mut d).expect("short");
        d
    }

    /// The sender's side of a whole stream: `writes` pushed one by one, at
    /// `step` of virtual time apart. Returns the wire bytes and the sender
    /// awaiting its ack.
    fn send_all(cfg: SenderConfig, writes: &[&[u8]], step: Duration) -> (Vec<u8>, Finished) {
        let t0 = Instant::now();
        let mut keys = (1..=u8::MAX).map(key);
        let first = key(0);
        let mut wire = Vec::new();
        let mut tx = Sender::new(&handshake(&first), first, cfg, t0, &mut wire).expect("start");
        for (i, w) in writes.iter().enumerate() {
            let now = t0 + step * i as u32;
            let mut done = 0;
            while done < w.len() {
                match tx.push(&w[done..], now, &mut wire).expect("push") {
                    Push::Sealed(n) => done += n,
                    Push::NeedKey => tx
                        .rekey(keys.next().expect("keys"), now, &mut wire)
                        .expect("rekey"),
                }
            }
        }
        let fin = tx.finish(&mut wire).expect("finish");
        (wire, fin)
    }

    /// The receiver's side, fed `chunk` bytes at a time, with keys by ID.
    fn receive_all(wire: &[u8], chunk: usize) -> Result<(Vec<u8>, Receiver), StreamError> {
        let mut rx = bob();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match rx.poll_event()? {
                None => {
                    if fed == wire.len() {
                        return Err(rx.handle_eof());
                    }
                    let n = chunk.min(wire.len() - fed).min(rx.read_capacity());
                    rx.handle_bytes(&wire[fed..fed + n])?;
                    fed += n;
                }
                Some(Event::Handshake(_)) => {}
                Some(Event::NeedKey(id)) => {
                    let n = id.as_u128().wrapping_sub(1) as u8;
                    rx.supply_key(key(n))?;
                }
                Some(Event::Data(d)) => out.extend_from_slice(d),
                Some(Event::End) => {
                    rx.handle_bytes(&wire[fed..])?;
                    return Ok((out, rx));
                }
            }
        }
    }

    fn round_trip(cfg: SenderConfig, writes: &[&[u8]], step: Duration, chunk: usize) -> Summary {
        let (wire, mut fin) = send_all(cfg, writes, step);
        let (out, mut rx) = receive_all(&wire, chunk).expect("receives");
        assert_eq!(out, writes.concat());
        assert_eq!(rx.handshake(), Some(&handshake(&key(0))));
        let mut ack = Vec::new();
        rx.ack(&mut ack).expect("ack");
        assert_eq!(ack.len(), ACK_FRAME_LEN);
        // The ack may arrive in pieces.
        assert_eq!(fin.handle_bytes(&ack[..5]).expect("part"), None);
        let s = fin.handle_bytes(&ack[5..]).expect("ack").expect("complete");
        assert_eq!(s, rx.summary());
        s
    }

    #[test]
    fn empty_and_small_streams_round_trip() {
        let s = round_trip(SenderConfig::default(), &[], Duration::ZERO, 7);
        assert_eq!((s.plaintext_bytes, s.frames, s.key_ids.len()), (0, 1, 1));
        let s = round_trip(
            SenderConfig::default(),
            &[b"hello", b" world"],
            Duration::ZERO,
            1,
        );
        assert_eq!((s.plaintext_bytes, s.frames), (11, 3));
    }

    #[test]
    fn rekeys_by_bytes_cut_frames_at_the_epoch_boundary() {
        let cfg = SenderConfig {
            rekey_bytes: 1000,
            frame_payload: 300,
            ..SenderConfig::default()
        };
        let d = data(3500, 1);
        let s = round_trip(cfg, &[&d], Duration::ZERO, 4096);
        // 4 keys; per epoch 300+300+300+100 (4 data frames) and a rekey frame.
        assert_eq!(s.key_ids.len(), 4);
        assert_eq!(s.frames, 3 * 4 + 3 + 2 + 1);
        // Exactly at a boundary no key is spent in advance.
        let d = data(2000, 2);
        let cfg = SenderConfig {
            rekey_bytes: 1000,
            ..SenderConfig::default()
        };
        assert_eq!(round_trip(cfg, &[&d], Duration::ZERO, 999).key_ids.len(), 2);
    }

    #[test]
    fn rekeys_by_time_only_when_data_flows() {
        let cfg = SenderConfig {
            rekey_interval: Some(Duration::from_secs(10)),
            ..SenderConfig::default()
        };
        let writes: Vec<&[u8]> = vec![b"a", b"b", b"c", b"d", b"e"];
        // Writes at 0, 4, 8 | 12, 16 s: the first epoch is over at 10 s.
        let s = round_trip(cfg.clone(), &writes, Duration::from_secs(4), 100);
        assert_eq!(s.key_ids.len(), 2);
        // An epoch's time starts with its first data, not with its key: an idle
        // hour spends no key.
        let t0 = Instant::now();
        let first = key(0);
        let mut w = Vec::new();
        let mut tx = Sender::new(&handshake(&first), first, cfg, t0, &mut w).expect("start");
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(tx.push(b"x", at(3600), &mut w), Ok(Push::Sealed(1)));
        assert_eq!(tx.push(b"y", at(3609), &mut w), Ok(Push::Sealed(1)));
        assert_eq!(tx.push(b"z", at(3610), &mut w), Ok(Push::NeedKey));
    }

    #[test]
    fn a_large_stream_in_odd_pieces_round_trips() {
        let cfg = SenderConfig {
            rekey_bytes: 100_000,
            frame_payload: MAX_PAYLOAD,
            ..SenderConfig::default()
        };
        let d = data(3 << 20, 3);
        let writes: Vec<&[u8]> = d.chunks(777_777).collect();
        let s = round_trip(cfg, &writes, Duration::ZERO, 65_536);
        assert_eq!(s.key_ids.len(), (3usize << 20).div_ceil(100_000));
    }

    /// Splits the wire into handshake and whole frames.
    fn frames(wire: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let (_, n) = Handshake::decode(wire).expect("valid").expect("complete");
        let mut pos = n;
        let mut out = Vec::new();
        while let Some((_, f)) = decode_frame(&wire[pos..]).expect("valid") {
            out.push(f.to_vec());
            pos += f.len();
        }
        assert_eq!(pos, wire.len());
        (wire[..n].to_vec(), out)
    }

    fn sample_frames() -> (Vec<u8>, Vec<Vec<u8>>) {
        let cfg = SenderConfig {
            rekey_bytes: 200,
            frame_payload: 100,
            ..SenderConfig::default()
        };
        let d = data(500, 4);
        let (wire, _) = send_all(cfg, &[&d], Duration::ZERO);
        // 100 100 R 100 100 R 100 E
        frames(&wire)
    }

    fn rebuild(hs: &[u8], frames: &[Vec<u8>]) -> Vec<u8> {
        let mut w = hs.to_vec();
        for f in frames {
            w.extend_from_slice(f);
        }
        w
    }

    #[test]
    fn tampering_replay_reordering_dropping_and_truncation_are_errors() {
        let (hs, fr) = sample_frames();
        assert_eq!(fr.len(), 8);
        assert!(receive_all(&rebuild(&hs, &fr), 50).is_ok());
        let err = |f: &[Vec<u8>]| receive_all(&rebuild(&hs, f), 1 << 16).unwrap_err();

        let mut t = fr.clone();
        t[1][20] ^= 1;
        assert_eq!(err(&t), StreamError::Authentication { seq: 1 });
        let mut t = fr.clone();
        let n = t[4].len();
        t[4][n - 1] ^= 0x80; // tag
        assert_eq!(err(&t), StreamError::Authentication { seq: 4 });
        let mut t = fr.clone();
        t[2][4] = 1; // rekey frame claims to be data: AAD differs
        assert_eq!(err(&t), StreamError::Authentication { seq: 2 });
        let mut t = fr.clone();
        t[2][4] = 3; // an end frame cannot have 16 bytes
        assert!(matches!(err(&t), StreamError::Malformed(_)));
        let mut t = fr.clone();
        t.insert(2, fr[1].clone());
        assert_eq!(
            err(&t),
            StreamError::Sequence {
                expected: 2,
                got: 1
            }
        );
        let mut t = fr.clone();
        t.swap(0, 1);
        assert_eq!(
            err(&t),
            StreamError::Sequence {
                expected: 0,
                got: 1
            }
        );
        let mut t = fr.clone();
        t.remove(3);
        assert_eq!(
            err(&t),
            StreamError::Sequence {
                expected: 3,
                got: 4
            }
        );
        // A frame re-numbered to fill the gap does not authenticate.
        let mut t = fr.clone();
        t.remove(3);
        t[3][5..13].copy_from_slice(&3u64.to_be_bytes());
        assert_eq!(err(&t), StreamError::Authentication { seq: 3 });
        // Truncation: without the end frame, at every frame boundary and inside.
        for k in 0..fr.len() {
            let w = rebuild(&hs, &fr[..k]);
            assert!(matches!(err(&fr[..k]), StreamError::Truncated(_)), "{k}");
            let mut w2 = w.clone();
            w2.extend_from_slice(&fr[k][..fr[k].len() / 2]);
            assert!(matches!(
                receive_all(&w2, 64),
                Err(StreamError::Truncated(_))
            ));
        }
        // Trailing data after the end frame.
        let mut t = fr.clone();
        t.push(fr[0].clone());
        assert!(matches!(err(&t), StreamError::Protocol(_)));
        // A modified handshake changes every key.
        let mut h2 = hs.clone();
        let last = h2.len() - 20; // inside the stream ID
        h2[last] ^= 1;
        assert_eq!(
            receive_all(&rebuild(&h2, &fr), 100).unwrap_err(),
            StreamError::Authentication { seq: 0 }
        );
    }

    #[test]
    fn a_frame_from_another_epoch_or_direction_does_not_authenticate() {
        let (hs, fr) = sample_frames();
        // Frame 3 (epoch 1) re-numbered as frame 0 (epoch 0).
        let mut t = fr.clone();
        t[0] = fr[3].clone();
        t[0][5..13].copy_from_slice(&0u64.to_be_bytes());
        assert_eq!(
            receive_all(&rebuild(&hs, &t), 100).unwrap_err(),
            StreamError::Authentication { seq: 0 }
        );
        // The receiver's ack cannot be reflected to the sender as its own, nor
        // can the end frame be replayed back as an ack.
        let (wire, mut fin) = send_all(SenderConfig::default(), &[b"x"], Duration::ZERO);
        let (_, fr) = frames(&wire);
        let mut end_as_ack = fr[1].clone();
        end_as_ack[..4].copy_from_slice(&32u32.to_be_bytes());
        end_as_ack[4] = 4;
        end_as_ack[5..13].copy_from_slice(&0u64.to_be_bytes());
        end_as_ack.resize(ACK_FRAME_LEN, 0);
        assert_eq!(
            fin.handle_bytes(&end_as_ack),
            Err(StreamError::Authentication { seq: 0 })
        );
    }

    #[test]
    fn the_receiver_checks_recipient_and_ack_state() {
        let first = key(0);
        let mut wire = Vec::new();
        let hs = Handshake {
            recipient: SaeId::new("carol").expect("valid"),
            ..handshake(&first)
        };
        Sender::new(
            &hs,
            first,
            SenderConfig::default(),
            Instant::now(),
            &mut wire,
        )
        .expect("start");
        let mut rx = bob();
        rx.handle_bytes(&wire).expect("bytes");
        assert!(matches!(
            rx.poll_event(),
            Err(StreamError::WrongRecipient { .. })
        ));
        assert!(matches!(rx.poll_event(), Err(StreamError::Misuse(_))));
        let mut rx = bob();
        assert!(matches!(
            rx.ack(&mut Vec::new()),
            Err(StreamError::Misuse(_))
        ));
        assert!(matches!(rx.supply_key(key(0)), Err(StreamError::Misuse(_))));
        assert!(matches!(rx.handle_eof(), StreamError::Truncated(_)));
        // The wrong key for the ID asked for.
        let (wire, _) = send_all(SenderConfig::default(), &[b"x"], Duration::ZERO);
        let mut rx = bob();
        rx.handle_bytes(&wire).expect("bytes");
        assert!(matches!(rx.poll_event(), Ok(Some(Event::Handshake(_)))));
        assert_eq!(
            rx.poll_event().expect("event"),
            Some(Event::NeedKey(key(0).id))
        );
        assert!(matches!(rx.supply_key(key(1)), Err(StreamError::Misuse(_))));
        let mut short = key(0);
        short.material.truncate(16);
        assert!(matches!(rx.supply_key(short), Err(StreamError::Misuse(_))));
        // Too many bytes at once.
        let mut rx = bob();
        assert!(matches!(
            rx.handle_bytes(&vec![0; RX_BUFFER + 1]),
            Err(StreamError::Misuse(_))
        ));
    }

    #[test]
    fn the_sender_refuses_bad_settings_and_key_reuse() {
        let first = key(0);
        let hs = handshake(&first);
        for cfg in [
            SenderConfig {
                rekey_bytes: 0,
                ..SenderConfig::default()
            },
            SenderConfig {
                frame_payload: MAX_PAYLOAD + 1,
                ..SenderConfig::default()
            },
            SenderConfig {
                rekey_interval: Some(Duration::ZERO),
                ..SenderConfig::default()
            },
        ] {
            assert!(cfg.check().is_err());
            assert!(Sender::new(&hs, key(0), cfg, Instant::now(), &mut Vec::new()).is_err());
        }
        assert!(
            Sender::new(
                &hs,
                key(1),
                SenderConfig::default(),
                Instant::now(),
                &mut Vec::new()
            )
            .is_err(),
            "first key must be the announced one"
        );
        let mut tx = Sender::new(
            &hs,
            first,
            SenderConfig::default(),
            Instant::now(),
            &mut Vec::new(),
        )
        .expect("start");
        assert!(tx.rekey(key(0), Instant::now(), &mut Vec::new()).is_err());
    }

    #[test]
    fn a_bad_ack_is_refused() {
        let (wire, mut fin) = send_all(SenderConfig::default(), &[b"abc"], Duration::ZERO);
        let (mut out, mut rx) = receive_all(&wire, 100).expect("receives");
        out.clear();
        rx.ack(&mut out).expect("ack");
        let mut bad = out.clone();
        bad[20] ^= 1;
        assert!(matches!(
            fin.handle_bytes(&bad),
            Err(StreamError::Authentication { seq: 0 })
        ));
        let mut more = out.clone();
        more.push(0);
        let (_, mut fin) = send_all(SenderConfig::default(), &[b"abc"], Duration::ZERO);
        assert!(matches!(
            fin.handle_bytes(&more),
            Err(StreamError::Protocol(_))
        ));
        // An ack for another stream (other key) does not authenticate.
        let (wire2, _) = send_all(SenderConfig::default(), &[b"abcd"], Duration::ZERO);
        let (_, mut rx2) = receive_all(&wire2, 100).expect("receives");
        let mut other = Vec::new();
        rx2.ack(&mut other).expect("ack");
        let (_, mut fin) = send_all(SenderConfig::default(), &[b"abc"], Duration::ZERO);
        // Same keys in this test (key(0) both times), so it authenticates but
        // acknowledges 4 bytes, not 3.
        assert!(matches!(
            fin.handle_bytes(&other),
            Err(StreamError::Unconfirmed(_))
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_receiver() {
        let (hs, fr) = sample_frames();
        let wire = rebuild(&hs, &fr);
        for seed in 0..200u32 {
            let mut w = wire.clone();
            let noise = data(8, seed);
            let at =
                (u32::from_be_bytes([noise[0], noise[1], noise[2], noise[3]]) as usize) % w.len();
            w[at] ^= noise[4] | 1;
            if seed % 3 == 0 {
                w.truncate(at + 1);
            }
            assert!(
                receive_all(&w, 1 + seed as usize % 97).is_err(),
                "seed {seed}"
            );
        }
    }
}
