//! The key-service protocol core: how a terminal spends medium keys with the
//! operator's key service. Sans-IO: messages in and out as bytes, no sockets, no
//! store, no clock, no randomness (challenges and nonces are passed in).
//!
//! # Why it is shaped this way
//!
//! A terminal reaches the key service over a network nobody vouches for (no TLS
//! is assumed), and the only secret it shares with the service is its medium: keys
//! numbered `K[0], K[1], …`, the same on both sides, each used once. So:
//!
//! - **One key authenticates one request.** The service sends a fresh random
//!   [`Challenge`]; the terminal answers with an [`AuthRequest`] whose tag is
//!   `HMAC-SM3(K[i], "qkdnet/media/proto/v1/auth" ‖ medium ID ‖ i ‖ challenge ‖
//!   encoded request)`. The request rides inside the MAC, so a man in the middle
//!   can neither change what is asked for nor move the tag to another challenge.
//!   The tag is checked in constant time ([`HmacSm3::verify`]).
//! - **Keys are used in order.** The service keeps, per medium, the index of the
//!   next unused key. An index *below* it is a replay ([`ProtoError::Replay`],
//!   "key already used"); an index *above* it is out of order
//!   ([`ProtoError::OutOfOrder`]). The rule is strict (no skipping), and
//!   [`verify_auth`] takes a `max_skip` window that is `0` for that rule
//!   ([`STRICT`]). A window exists because the strict rule has a liveness cost: the
//!   terminal destroys `K[i]` as it sends, so a request lost on the way (or a
//!   terminal that crashed after taking the key) leaves the terminal one key ahead
//!   of the service for ever, and only a recharge heals it. With `max_skip = n` the
//!   service accepts `i` up to `next + n`, *only after the tag verifies under
//!   `K[i]`*, and destroys the skipped keys too ([`Authenticated::consumed`]).
//!   Nobody without `K[i]` can make the service skip, and skipped keys were never
//!   used on the service side, so nothing is replayable. Whether to deploy `n > 0`
//!   is the store's decision; the core default is strict.
//! - **A bad tag consumes nothing.** The medium ID travels in clear, so if a wrong
//!   tag burned the key at the expected index anyone on the path could drain a
//!   terminal's medium. A guessed 256-bit HMAC key is not a realistic attack, so
//!   leaving the key in place costs nothing. Replays and out-of-order requests are
//!   refused before any key is looked up (the key of a replayed index is gone).
//! - **A request spends two keys.** The terminal takes `K[i]` *and* `K[i+1]` from
//!   its medium (both destroyed there first) before it sends; `K[i]` makes the
//!   tag, `K[i+1]` will unwrap the answer. The service destroys both, so a lost
//!   answer costs the two keys on both sides and the next request, with `K[i+2]`,
//!   fits the service's skip window.
//! - **Two parties, two requests.** The opener names the peer in a
//!   [`Request::SessionKey`]; the service draws the session key, stores the
//!   session and answers the opener. The peer, told the session ID over the call's
//!   signalling (never a key), sends a [`Request::JoinSession`] with its own
//!   medium and gets the same key under its own wrap key. Either may ask again
//!   (with fresh keys) until the session expires: a lost answer never leaves one
//!   side with the key and the other without a way to get it.
//! - **The consumed key is named, not destroyed, here.** [`verify_auth`] returns an
//!   [`Authenticated`] proof that says which indices the store must destroy and
//!   what the next expected index is; the store does it durably, before answering.
//! - **Session keys are wrapped, one charged key per party.** The service draws a
//!   256-bit session key (from the QKD network or a CSPRNG; the [`KeySource`] is
//!   carried, authenticated, in the answer) and for each party seals it with
//!   SM4-GCM under a key derived from that party's next charged key `K[w]`:
//!   `SM4 key = HKDF-SM3(salt = medium ID, ikm = K[w], info =
//!   "qkdnet/media/proto/v1/wrap-key", 16 bytes)`. SM4 keys are 128 bits and `K[w]`
//!   is 256, so a KDF (not truncation) makes the wrap key; the label keeps it apart
//!   from any HMAC use of the same bytes. The associated data is the label
//!   `"qkdnet/media/proto/v1/grant"`, the party's medium ID and the grant's body up
//!   to and including `wrap_index` (session ID, both identities, key source), so a
//!   grant cut for another medium, session, party pair or index does not open.
//!   `K[w]` is used once, so the nonce cannot repeat under it; it is still carried
//!   (passed in, random) so the wrap does not depend on that argument alone.
//! - **A grant can only be cut from a proof.** [`Authenticated::grant`] is the one
//!   way to seal grants: it checks that party A is the medium that authenticated and
//!   party B is the peer it asked for (states as types, as in rustls).
//! - **The terminal checks what it was promised.** [`open_grant`] opens a grant
//!   only for the session ID it expects, only if its own identity is one of the two
//!   parties, only under the key with the grant's index; it returns the session key
//!   and the *other* party's identity.
//! - **Parse, don't validate.** Identities are an [`Identity`] newtype (1..=256
//!   bytes of UTF-8 without control characters) that cannot hold anything else;
//!   decoders are bounded, read exactly one frame, refuse trailing bytes and return
//!   [`ProtoError`], never panic.
//!
//! # Frames
//!
//! All integers big-endian. One message per frame; a frame never exceeds
//! [`MAX_FRAME`] bytes. [`frame_len`] tells a stream adapter how long the frame at
//! the head of its buffer is.
//!
//! | offset | length | field |
//! |---|---|---|
//! | 0 | 4 | magic `QKMS` |
//! | 4 | 1 | protocol version, 1 |
//! | 5 | 1 | message type (below) |
//! | 6 | 2 | body length `n` (0..=[`MAX_BODY`]) |
//! | 8 | `n` | body |
//!
//! | type | message | direction |
//! |---|---|---|
//! | 1 | [`Challenge`] | service → terminal |
//! | 2 | [`AuthRequest`] | terminal → service |
//! | 3 | [`SessionKeyGrant`] | service → terminal (one per party) |
//! | 4 | `Refused` ([`RefuseReason`]) | service → terminal or charger |
//! | 5 | [`ChargeOffer`] | charging point → service |
//! | 6 | [`ChargeAck`] | service → charging point |
//!
//! Identity (inside bodies): 2-byte length `l` (1..=256), then `l` bytes of UTF-8
//! without control characters.
//!
//! Challenge body, 32 bytes:
//!
//! | offset | length | field |
//! |---|---|---|
//! | 0 | 32 | challenge, random |
//!
//! AuthRequest body:
//!
//! | offset | length | field |
//! |---|---|---|
//! | 0 | 16 | medium ID (UUID) |
//! | 16 | 8 | key index `i` |
//! | 24 | r | request (below) |
//! | 24 + r | 32 | tag = HMAC-SM3(K\[i\], `qkdnet/media/proto/v1/auth` ‖ medium ID ‖ `i` ‖ challenge ‖ request bytes) |
//!
//! Request, kind 1 `SessionKey`:
//!
//! | offset | length | field |
//! |---|---|---|
//! | 0 | 1 | kind, 1 |
//! | 1 | 16 | session ID |
//! | 17 | 2 + l | peer identity (SIP URI or device ID) |
//!
//! Request, kind 2 `JoinSession`: kind byte 2, then the 16-byte session ID.
//!
//! SessionKeyGrant body:
//!
//! | offset | length | field |
//! |---|---|---|
//! | 0 | 16 | session ID |
//! | 16 | 2 + a | identity of party A (the requester) |
//! | 18 + a | 2 + b | identity of party B (the peer) |
//! | 20 + a + b | 1 | key source: 1 QKD network, 2 CSPRNG |
//! | 21 + a + b | 8 | wrap index `w` |
//! | 29 + a + b | 12 | nonce |
//! | 41 + a + b | 48 | SM4-GCM(wrap key from K\[w\], nonce, AAD, session key): ciphertext 32 ‖ tag 16 |
//!
//! AAD = `qkdnet/media/proto/v1/grant` ‖ the receiving party's medium ID ‖ body
//! bytes `0 .. 29 + a + b`.
//!
//! ChargeOffer body: medium ID (16), owner (identity), charger SAE ID (2-byte
//! length, 1..=64 bytes), first index (8), authentication key ID (16), number of
//! keys `n` (2, 1..=[`MAX_CHARGE_KEYS`]), `n` key IDs (16 each), tag (32) =
//! HMAC-SM3(authentication key, `qkdnet/media/proto/v1/charge` ‖ challenge ‖ the
//! body before the tag). ChargeAck body: medium ID (16), first index (8), count
//! (2), tag (32) = HMAC-SM3(authentication key, `qkdnet/media/proto/v1/charge-ack`
//! ‖ challenge ‖ offer tag ‖ medium ID ‖ first index ‖ count).
//!
//! Refused body, 1 byte: reason 1 revoked, 2 exhausted, 3 bad tag, 4 replay, 5 out
//! of order, 6 unknown medium, 7 malformed, 8 unknown session, 9 not a party, 10
//! unknown peer, 11 not enrolled, 12 medium conflict, 13 index mismatch, 14 charge
//! rejected, 15 unavailable ([`RefuseReason::ALL`]).

use qkdnet_crypto::gcm::{GCM_NONCE_LEN, GCM_TAG_LEN, GcmNonce, Sm4Gcm};
use qkdnet_crypto::kdf::{hkdf_sm3_expand, hkdf_sm3_extract};
use qkdnet_crypto::secret::Sm4Key;
use qkdnet_crypto::sm3::HmacSm3;
use thiserror::Error;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::medium::{KEY_LEN, Key256, MAX_OWNER_LEN, check_text};

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"QKMS";
/// Protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Frame header length.
pub const HEADER_LEN: usize = 8;
/// Largest body a frame may carry (a [`ChargeOffer`] of [`MAX_CHARGE_KEYS`] key
/// IDs is the largest message, 4,4xx bytes).
pub const MAX_BODY: usize = 8192;
/// Most keys one [`ChargeOffer`] may name.
pub const MAX_CHARGE_KEYS: usize = 256;
/// Longest charger SAE ID, in bytes.
pub const MAX_CHARGER_LEN: usize = crate::medium::MAX_CHARGER_LEN;
/// Largest frame.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_BODY;
/// Longest identity, in bytes (UTF-8); the same bound as a medium's owner.
pub const MAX_IDENTITY_LEN: usize = MAX_OWNER_LEN;
/// Length of a challenge.
pub const CHALLENGE_LEN: usize = 32;
/// Length of an authentication tag (HMAC-SM3).
pub const TAG_LEN: usize = 32;
/// Length of a session ID.
pub const SESSION_ID_LEN: usize = 16;
/// Length of a wrapped session key (ciphertext and GCM tag).
pub const WRAPPED_LEN: usize = KEY_LEN + GCM_TAG_LEN;
/// `max_skip` for the strict rule: only the expected index is accepted.
pub const STRICT: u64 = 0;

const LABEL_AUTH: &[u8] = b"qkdnet/media/proto/v1/auth";
const LABEL_GRANT: &[u8] = b"qkdnet/media/proto/v1/grant";
const LABEL_WRAP_KEY: &[u8] = b"qkdnet/media/proto/v1/wrap-key";
const LABEL_CHARGE: &[u8] = b"qkdnet/media/proto/v1/charge";
const LABEL_CHARGE_ACK: &[u8] = b"qkdnet/media/proto/v1/charge-ack";

const TYPE_CHALLENGE: u8 = 1;
const TYPE_AUTH_REQUEST: u8 = 2;
const TYPE_GRANT: u8 = 3;
const TYPE_REFUSED: u8 = 4;
const TYPE_CHARGE_OFFER: u8 = 5;
const TYPE_CHARGE_ACK: u8 = 6;

const KIND_SESSION_KEY: u8 = 1;
const KIND_JOIN_SESSION: u8 = 2;

/// Errors of the key-service protocol.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtoError {
    // ---- the caller misused the API ----
    /// An identity is empty, too long or contains control characters.
    #[error("invalid identity: {0}")]
    InvalidIdentity(&'static str),
    /// A grant was asked for parties that are not the ones that authenticated.
    #[error("grant parties do not match the authenticated request: {0}")]
    PartyMismatch(&'static str),

    // ---- the bytes are malformed ----
    /// The frame does not start with the protocol magic.
    #[error("not a key-service frame (bad magic)")]
    BadMagic,
    /// A protocol version this build does not speak.
    #[error("protocol version {0} is not supported (this build speaks version 1)")]
    UnsupportedVersion(u8),
    /// A message type this build does not know.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The bytes end before a field.
    #[error("truncated {what}: needs {needed} bytes, there are {got}")]
    Truncated {
        /// The part cut off.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        got: usize,
    },
    /// A body longer than [`MAX_BODY`].
    #[error("frame body of {0} bytes exceeds the limit of {MAX_BODY}")]
    TooLong(usize),
    /// Bytes after the end of a message or frame.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// A field holds a value the protocol does not define.
    #[error("invalid {0}")]
    InvalidField(&'static str),

    // ---- the peer's request or answer is refused ----
    /// The key index was already used (below the expected index).
    #[error("key already used: index {index}, the next unused key is {expected}")]
    Replay {
        /// Index in the request.
        index: u64,
        /// Index expected.
        expected: u64,
    },
    /// The key index is ahead of the expected index by more than allowed.
    #[error("key used out of order: index {index}, the next unused key is {expected}")]
    OutOfOrder {
        /// Index in the request or grant.
        index: u64,
        /// Index expected.
        expected: u64,
    },
    /// No charged key at the index: the medium is used up.
    #[error("no unused key left for this medium: recharge at a charging point")]
    Exhausted,
    /// The authentication tag does not verify.
    #[error("the authentication tag does not verify")]
    BadTag,
    /// The grant does not open under the key for its index (tampered, or for another
    /// medium, session, party pair or index).
    #[error("the session key grant does not open")]
    GrantRejected,
    /// The grant is for another session.
    #[error("the session key grant is for another session")]
    WrongSession,
    /// This terminal is not one of the grant's two parties.
    #[error("the session key grant is for other parties")]
    NotAParty,
}

impl ProtoError {
    /// What the service answers the terminal with when this error ends a request.
    /// `None` for errors the service itself caused (API misuse).
    pub fn refusal(&self) -> Option<RefuseReason> {
        Some(match self {
            Self::InvalidIdentity(_) | Self::PartyMismatch(_) => return None,
            Self::Replay { .. } => RefuseReason::Replay,
            Self::OutOfOrder { .. } => RefuseReason::OutOfOrder,
            Self::Exhausted => RefuseReason::Exhausted,
            Self::BadTag => RefuseReason::BadTag,
            _ => RefuseReason::Malformed,
        })
    }
}

/// Shorthand for results of this module.
pub type Result<T, E = ProtoError> = core::result::Result<T, E>;

/// A party's identity: a SIP URI or a device ID, 1..=256 bytes of UTF-8 without
/// control characters. Cannot hold anything else.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity(String);

impl Identity {
    /// Checks and wraps an identity.
    pub fn new(s: impl Into<String>) -> Result<Self> {
        let s = s.into();
        check_text(&s, MAX_IDENTITY_LEN).map_err(ProtoError::InvalidIdentity)?;
        Ok(Self(s))
    }

    /// The identity as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn encode(&self, out: &mut Vec<u8>) {
        // At most MAX_IDENTITY_LEN (256) bytes, checked in `new`.
        encode_text(&self.0, out);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        decode_text(r, "identity", MAX_IDENTITY_LEN).map(Self)
    }
}

impl core::fmt::Display for Identity {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a session key came from; carried, authenticated, in the grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeySource {
    /// Key relayed over the QKD network.
    Qkd,
    /// Key drawn from the service's CSPRNG (no QKD key was available).
    Csprng,
}

impl KeySource {
    fn to_byte(self) -> u8 {
        match self {
            Self::Qkd => 1,
            Self::Csprng => 2,
        }
    }

    fn from_byte(b: u8) -> Result<Self> {
        match b {
            1 => Ok(Self::Qkd),
            2 => Ok(Self::Csprng),
            _ => Err(ProtoError::InvalidField("key source")),
        }
    }
}

/// Why the service refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RefuseReason {
    /// The medium was revoked.
    #[error("the medium is revoked")]
    Revoked,
    /// All keys of the medium are used.
    #[error("the medium's keys are used up: recharge at a charging point")]
    Exhausted,
    /// The authentication tag did not verify.
    #[error("the authentication tag did not verify")]
    BadTag,
    /// The key index was already used.
    #[error("key already used")]
    Replay,
    /// The key index is ahead of the service's.
    #[error("key used out of order")]
    OutOfOrder,
    /// The service does not know the medium.
    #[error("unknown medium")]
    UnknownMedium,
    /// The request could not be decoded.
    #[error("malformed request")]
    Malformed,
    /// No such session, or it expired before this party joined.
    #[error("no such session (or it expired)")]
    UnknownSession,
    /// The session exists and belongs to other parties.
    #[error("the session belongs to other parties")]
    NotAParty,
    /// The peer named in the request is not a subscriber with a usable medium.
    #[error("the peer is not a subscriber of this key service")]
    UnknownPeer,
    /// A charge names an owner who is not an enrolled subscriber.
    #[error("the medium's owner is not an enrolled subscriber")]
    NotEnrolled,
    /// A charge names a new medium for a subscriber who holds another one.
    #[error("the subscriber holds another medium: report it lost before charging a new one")]
    MediumConflict,
    /// A charge's first index does not follow the keys the service holds.
    #[error("the charge's key indices do not follow the service's record of the medium")]
    IndexMismatch,
    /// The charging point is not allowed to charge, or its keys could not be
    /// fetched from the QKD network by ID.
    #[error("the charge was not accepted: charger not allowed or its keys not obtainable")]
    ChargeRejected,
    /// The service cannot answer now (store or network trouble): retry.
    #[error("the key service is unavailable: retry")]
    Unavailable,
}

const REFUSALS: [RefuseReason; 15] = [
    RefuseReason::Revoked,
    RefuseReason::Exhausted,
    RefuseReason::BadTag,
    RefuseReason::Replay,
    RefuseReason::OutOfOrder,
    RefuseReason::UnknownMedium,
    RefuseReason::Malformed,
    RefuseReason::UnknownSession,
    RefuseReason::NotAParty,
    RefuseReason::UnknownPeer,
    RefuseReason::NotEnrolled,
    RefuseReason::MediumConflict,
    RefuseReason::IndexMismatch,
    RefuseReason::ChargeRejected,
    RefuseReason::Unavailable,
];

impl RefuseReason {
    /// Every reason, in wire order (byte 1 first).
    pub const ALL: &[RefuseReason] = &REFUSALS;

    fn to_byte(self) -> u8 {
        let i = REFUSALS
            .iter()
            .position(|r| *r == self)
            .expect("invariant: REFUSALS lists every reason");
        u8::try_from(i + 1).expect("invariant: fewer than 255 reasons")
    }

    fn from_byte(b: u8) -> Result<Self> {
        usize::from(b)
            .checked_sub(1)
            .and_then(|i| REFUSALS.get(i))
            .copied()
            .ok_or(ProtoError::InvalidField("refusal reason"))
    }
}

/// The service's challenge: 32 random bytes, drawn by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// The challenge.
    pub challenge: [u8; CHALLENGE_LEN],
}

/// What a terminal asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    /// A session key shared with `peer`, for the session `session_id`.
    SessionKey {
        /// The session (e.g. derived from the SIP Call-ID), chosen by the terminal.
        session_id: [u8; SESSION_ID_LEN],
        /// The other party.
        peer: Identity,
    },
    /// The peer's side: the session key of `session_id`, which the other party
    /// opened naming this terminal's identity as its peer.
    JoinSession {
        /// The session, as the opening party named it.
        session_id: [u8; SESSION_ID_LEN],
    },
}

impl Request {
    /// The session the request is about.
    pub fn session_id(&self) -> [u8; SESSION_ID_LEN] {
        match self {
            Self::SessionKey { session_id, .. } | Self::JoinSession { session_id } => *session_id,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::SessionKey { session_id, peer } => {
                out.push(KIND_SESSION_KEY);
                out.extend_from_slice(session_id);
                peer.encode(out);
            }
            Self::JoinSession { session_id } => {
                out.push(KIND_JOIN_SESSION);
                out.extend_from_slice(session_id);
            }
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        match r.u8("request kind")? {
            KIND_SESSION_KEY => Ok(Self::SessionKey {
                session_id: r.array("session ID")?,
                peer: Identity::decode(r)?,
            }),
            KIND_JOIN_SESSION => Ok(Self::JoinSession {
                session_id: r.array("session ID")?,
            }),
            _ => Err(ProtoError::InvalidField("request kind")),
        }
    }
}

/// A terminal's authenticated request. The tag is public (it travels in clear).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthRequest {
    /// The terminal's medium.
    pub medium_id: Uuid,
    /// Index of the medium key the tag is made with.
    pub key_index: u64,
    /// What is asked for.
    pub request: Request,
    /// HMAC-SM3 tag (see the module docs).
    pub tag: [u8; TAG_LEN],
}

impl AuthRequest {
    /// Terminal side: signs `request` with the medium key `key` (index `key_index`)
    /// in answer to `challenge`. The terminal destroys the key afterwards (taking it
    /// from the medium does that).
    pub fn sign(
        medium_id: Uuid,
        key_index: u64,
        key: &Key256,
        challenge: &Challenge,
        request: Request,
    ) -> Self {
        let tag = auth_mac(&medium_id, key_index, key, challenge, &request).finalize();
        Self {
            medium_id,
            key_index,
            request,
            tag,
        }
    }
}

fn auth_mac(
    medium_id: &Uuid,
    key_index: u64,
    key: &Key256,
    challenge: &Challenge,
    request: &Request,
) -> HmacSm3 {
    let mut req = Vec::new();
    request.encode(&mut req);
    let mut m = HmacSm3::new(key.expose_secret());
    m.update(LABEL_AUTH);
    m.update(medium_id.as_bytes());
    m.update(&key_index.to_be_bytes());
    m.update(&challenge.challenge);
    m.update(&req);
    m
}

/// Checks where `index` stands against `expected` with a skip window: `Ok` if it is
/// in `expected ..= expected + max_skip`. A request spends `index` and `index + 1`
/// (the wrap key), so the two top indices are never valid (the index after them
/// could not be named): they are out of order.
pub fn check_index(index: u64, expected: u64, max_skip: u64) -> Result<()> {
    if index < expected {
        return Err(ProtoError::Replay { index, expected });
    }
    if index - expected > max_skip || index >= u64::MAX - 1 {
        return Err(ProtoError::OutOfOrder { index, expected });
    }
    Ok(())
}

/// Proof that a request's tag verified. The only way to cut a grant.
#[derive(Debug)]
pub struct Authenticated {
    medium_id: Uuid,
    first_consumed: u64,
    key_index: u64,
    request: Request,
}

/// A session as the service holds it: who opened it, with whom, and its key.
#[derive(Debug)]
pub struct Session<'a> {
    /// The session ID the opener chose.
    pub session_id: [u8; SESSION_ID_LEN],
    /// The party that opened the session ([`Request::SessionKey`]).
    pub a: &'a Identity,
    /// The peer it named, who joins with [`Request::JoinSession`].
    pub b: &'a Identity,
    /// Where the session key came from.
    pub source: KeySource,
    /// The session key.
    pub key: &'a Key256,
}

impl Authenticated {
    /// The medium that authenticated.
    pub fn medium_id(&self) -> Uuid {
        self.medium_id
    }

    /// What it asked for.
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// The index of the key the answer is wrapped under: the one after the key
    /// the tag was made with. The terminal took both before it sent the request.
    pub fn wrap_index(&self) -> u64 {
        self.key_index + 1
    }

    /// The key indices the store must destroy, durably, before it answers: any
    /// the request skipped (only with a skip window), the key the tag was made
    /// with and the wrap key.
    pub fn consumed(&self) -> core::ops::RangeInclusive<u64> {
        self.first_consumed..=self.wrap_index()
    }

    /// The index the service expects next from this medium.
    pub fn next_expected(&self) -> u64 {
        // check_index refuses the two top indices, so this does not overflow.
        self.key_index + 2
    }

    /// Seals `session`'s key for the medium that authenticated, whose identity
    /// (as the service has it bound) is `me`, under its wrap key `wrap_key` (the
    /// key at [`Authenticated::wrap_index`]). The session must be the one asked
    /// for, and `me` the party the request makes it: the opener (and the peer
    /// the one it named) for [`Request::SessionKey`], the peer for
    /// [`Request::JoinSession`]. `nonce` is random.
    pub fn grant(
        &self,
        session: &Session<'_>,
        me: &Identity,
        wrap_key: &Key256,
        nonce: GcmNonce,
    ) -> Result<SessionKeyGrant> {
        if session.session_id != self.request.session_id() {
            return Err(ProtoError::PartyMismatch("another session than requested"));
        }
        if session.a == session.b {
            return Err(ProtoError::PartyMismatch("both parties are one identity"));
        }
        match &self.request {
            Request::SessionKey { peer, .. } => {
                if session.a != me {
                    return Err(ProtoError::PartyMismatch("the requester is not party A"));
                }
                if session.b != peer {
                    return Err(ProtoError::PartyMismatch(
                        "party B is not the requested peer",
                    ));
                }
            }
            Request::JoinSession { .. } => {
                if session.b != me {
                    return Err(ProtoError::PartyMismatch("the joiner is not party B"));
                }
            }
        }
        Ok(seal_grant(
            session,
            &self.medium_id,
            self.wrap_index(),
            wrap_key,
            nonce,
        ))
    }
}

/// Service side: checks an [`AuthRequest`] against the challenge sent and the
/// medium's next expected index.
///
/// Order: the index is checked first (a replayed index's key is gone, so it must be
/// refused without one); then `key_at(index)` is asked for the key (`None`: no
/// key charged there, [`ProtoError::Exhausted`]); then the tag, in constant time.
/// Nothing is consumed on error. `max_skip` is [`STRICT`] for the rule.
/// The caller must also hold the wrap key (`index + 1`) before it grants.
pub fn verify_auth(
    challenge: &Challenge,
    req: &AuthRequest,
    expected: u64,
    max_skip: u64,
    key_at: impl FnOnce(u64) -> Option<Key256>,
) -> Result<Authenticated> {
    check_index(req.key_index, expected, max_skip)?;
    let key = key_at(req.key_index).ok_or(ProtoError::Exhausted)?;
    auth_mac(&req.medium_id, req.key_index, &key, challenge, &req.request)
        .verify(&req.tag)
        .map_err(|_| ProtoError::BadTag)?;
    Ok(Authenticated {
        medium_id: req.medium_id,
        first_consumed: expected,
        key_index: req.key_index,
        request: req.request.clone(),
    })
}

/// A session key wrapped for one party.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionKeyGrant {
    /// The session.
    pub session_id: [u8; SESSION_ID_LEN],
    /// Party A (the requester).
    pub a_identity: Identity,
    /// Party B (the peer).
    pub b_identity: Identity,
    /// Where the session key came from.
    pub source: KeySource,
    /// Index of the receiving party's key the session key is wrapped under.
    pub wrap_index: u64,
    /// GCM nonce.
    pub nonce: GcmNonce,
    /// Wrapped session key: ciphertext ‖ tag.
    pub ciphertext: [u8; WRAPPED_LEN],
}

impl SessionKeyGrant {
    /// The body bytes the AEAD binds (everything before the nonce).
    fn bound_fields(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.session_id);
        self.a_identity.encode(out);
        self.b_identity.encode(out);
        out.push(self.source.to_byte());
        out.extend_from_slice(&self.wrap_index.to_be_bytes());
    }

    fn aad(&self, medium_id: &Uuid) -> Vec<u8> {
        let mut aad = Vec::with_capacity(LABEL_GRANT.len() + 16 + 2 * MAX_IDENTITY_LEN + 32);
        aad.extend_from_slice(LABEL_GRANT);
        aad.extend_from_slice(medium_id.as_bytes());
        self.bound_fields(&mut aad);
        aad
    }
}

fn wrap_cipher(medium_id: &Uuid, key: &Key256) -> Sm4Gcm {
    let prk = hkdf_sm3_extract(medium_id.as_bytes(), &[key.expose_secret()]);
    let mut k = Zeroizing::new([0u8; 16]);
    // 16 bytes are far below HKDF's limit of 255 blocks.
    hkdf_sm3_expand(&prk, &[LABEL_WRAP_KEY], &mut k[..]).expect("invariant: 16 bytes");
    let key = Sm4Key::from_slice(&k[..]).expect("invariant: 16 bytes");
    Sm4Gcm::new(&key)
}

fn seal_grant(
    session: &Session<'_>,
    medium_id: &Uuid,
    wrap_index: u64,
    wrap_key: &Key256,
    nonce: GcmNonce,
) -> SessionKeyGrant {
    let mut g = SessionKeyGrant {
        session_id: session.session_id,
        a_identity: session.a.clone(),
        b_identity: session.b.clone(),
        source: session.source,
        wrap_index,
        nonce,
        ciphertext: [0; WRAPPED_LEN],
    };
    let aad = g.aad(medium_id);
    let mut buf = Zeroizing::new(*session.key.expose_secret());
    let tag = wrap_cipher(medium_id, wrap_key)
        .seal_in_place_detached(&nonce, &aad, &mut buf[..])
        .expect("invariant: 32 bytes are far below the GCM limit");
    g.ciphertext[..KEY_LEN].copy_from_slice(&buf[..]);
    g.ciphertext[KEY_LEN..].copy_from_slice(&tag);
    g
}

/// What a terminal expects of a grant: its medium, its identity, the session.
#[derive(Clone, Debug)]
pub struct GrantExpect<'a> {
    /// The terminal's medium.
    pub medium_id: Uuid,
    /// The terminal's own identity.
    pub me: &'a Identity,
    /// The session it asked for (or was invited to).
    pub session_id: [u8; SESSION_ID_LEN],
}

/// A session key as the terminal receives it.
#[derive(Debug)]
pub struct SessionKey {
    /// The key (zeroized on drop, never printed).
    pub key: Key256,
    /// Where the service got it.
    pub source: KeySource,
    /// The session.
    pub session_id: [u8; SESSION_ID_LEN],
    /// The other party's identity.
    pub peer: Identity,
}

/// Terminal side: opens a grant with the medium key `key` at index `wrap_index`
/// (the terminal's next key; the grant must name the same index), checking that it
/// is for the expected session and that the terminal is one of its parties.
pub fn open_grant(
    grant: &SessionKeyGrant,
    expect: &GrantExpect<'_>,
    wrap_index: u64,
    key: &Key256,
) -> Result<SessionKey> {
    if grant.wrap_index < wrap_index {
        return Err(ProtoError::Replay {
            index: grant.wrap_index,
            expected: wrap_index,
        });
    }
    if grant.wrap_index > wrap_index {
        return Err(ProtoError::OutOfOrder {
            index: grant.wrap_index,
            expected: wrap_index,
        });
    }
    if grant.session_id != expect.session_id {
        return Err(ProtoError::WrongSession);
    }
    let peer = if &grant.a_identity == expect.me {
        grant.b_identity.clone()
    } else if &grant.b_identity == expect.me {
        grant.a_identity.clone()
    } else {
        return Err(ProtoError::NotAParty);
    };
    let aad = grant.aad(&expect.medium_id);
    let mut buf = Zeroizing::new([0u8; KEY_LEN]);
    buf.copy_from_slice(&grant.ciphertext[..KEY_LEN]);
    let tag: [u8; GCM_TAG_LEN] = grant.ciphertext[KEY_LEN..]
        .try_into()
        .expect("invariant: WRAPPED_LEN - KEY_LEN = GCM_TAG_LEN");
    wrap_cipher(&expect.medium_id, key)
        .open_in_place_detached(&grant.nonce, &aad, &mut buf[..], &tag)
        .map_err(|_| ProtoError::GrantRejected)?;
    Ok(SessionKey {
        key: Key256::from_slice(&buf[..]).expect("invariant: 32 bytes"),
        source: grant.source,
        session_id: grant.session_id,
        peer,
    })
}

/// A charging point's offer of keys for a medium (charger → service).
///
/// The charger obtained `1 + key_ids.len()` keys from its KME with the key
/// service as slave SAE: the first (`auth_key_id`) authenticates this offer and
/// the service's [`ChargeAck`] and is never charged; the others are charged into
/// the medium at `first_index, first_index + 1, …` in order. The service fetches
/// all of them by ID from its own KME (which hands them only to the slave the
/// charger named, and only as keys `charger` obtained), then checks the tag
/// under the first: so an offer that verifies was made by the SAE `charger`
/// (the KME vouches for that) for exactly this medium, owner and indices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeOffer {
    /// What the offer says.
    pub terms: ChargeTerms,
    /// HMAC-SM3(auth key, `qkdnet/media/proto/v1/charge` ‖ challenge ‖ body
    /// without the tag).
    pub tag: [u8; TAG_LEN],
}

/// What a [`ChargeOffer`] says: everything but its tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeTerms {
    /// The medium being charged.
    pub medium_id: Uuid,
    /// Its owner, as written in the medium (a subscriber's identity).
    pub owner: Identity,
    /// The charging point's SAE ID (1..=64 bytes, no control characters).
    pub charger: String,
    /// Index of the first charged key (the medium's charged count).
    pub first_index: u64,
    /// ID of the key that authenticates offer and acknowledgement.
    pub auth_key_id: Uuid,
    /// IDs of the charged keys, in index order (1..=[`MAX_CHARGE_KEYS`], distinct).
    pub key_ids: Vec<Uuid>,
}

impl ChargeOffer {
    /// Signs `terms` in answer to `challenge` with the authentication key.
    /// Checks what the decoder would refuse.
    pub fn sign(terms: ChargeTerms, challenge: &Challenge, auth_key: &Key256) -> Result<Self> {
        terms.check()?;
        let tag = terms.mac(challenge, auth_key).finalize();
        Ok(Self { terms, tag })
    }

    /// Checks the tag under the authentication key, in constant time.
    pub fn verify(&self, challenge: &Challenge, auth_key: &Key256) -> Result<()> {
        self.terms
            .mac(challenge, auth_key)
            .verify(&self.tag)
            .map_err(|_| ProtoError::BadTag)
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let terms = ChargeTerms::decode(r)?;
        Ok(Self {
            terms,
            tag: r.array("tag")?,
        })
    }
}

impl ChargeTerms {
    fn check(&self) -> Result<()> {
        check_text(&self.charger, MAX_CHARGER_LEN)
            .map_err(|_| ProtoError::InvalidField("charger SAE ID"))?;
        if self.key_ids.is_empty() || self.key_ids.len() > MAX_CHARGE_KEYS {
            return Err(ProtoError::InvalidField("number of charged keys"));
        }
        let mut seen = std::collections::HashSet::with_capacity(self.key_ids.len() + 1);
        seen.insert(self.auth_key_id);
        if !self.key_ids.iter().all(|id| seen.insert(*id)) {
            return Err(ProtoError::InvalidField("duplicate key ID"));
        }
        if self
            .first_index
            .checked_add(self.key_ids.len() as u64)
            .is_none_or(|end| end >= u64::MAX - 1)
        {
            return Err(ProtoError::InvalidField("charge indices"));
        }
        Ok(())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.medium_id.as_bytes());
        self.owner.encode(out);
        encode_text(&self.charger, out);
        out.extend_from_slice(&self.first_index.to_be_bytes());
        out.extend_from_slice(self.auth_key_id.as_bytes());
        let n = u16::try_from(self.key_ids.len()).expect("invariant: ≤ MAX_CHARGE_KEYS");
        out.extend_from_slice(&n.to_be_bytes());
        for id in &self.key_ids {
            out.extend_from_slice(id.as_bytes());
        }
    }

    fn mac(&self, challenge: &Challenge, key: &Key256) -> HmacSm3 {
        let mut body = Vec::with_capacity(64 + 16 * self.key_ids.len());
        self.encode(&mut body);
        let mut m = HmacSm3::new(key.expose_secret());
        m.update(LABEL_CHARGE);
        m.update(&challenge.challenge);
        m.update(&body);
        m
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let medium_id = Uuid::from_bytes(r.array("medium ID")?);
        let owner = Identity::decode(r)?;
        let charger = decode_text(r, "charger SAE ID", MAX_CHARGER_LEN)?;
        let first_index = r.u64("first index")?;
        let auth_key_id = Uuid::from_bytes(r.array("authentication key ID")?);
        let n = usize::from(r.u16("number of keys")?);
        if n == 0 || n > MAX_CHARGE_KEYS {
            return Err(ProtoError::InvalidField("number of charged keys"));
        }
        let key_ids = (0..n)
            .map(|_| r.array("key ID").map(Uuid::from_bytes))
            .collect::<Result<Vec<_>>>()?;
        let terms = Self {
            medium_id,
            owner,
            charger,
            first_index,
            auth_key_id,
            key_ids,
        };
        terms.check()?;
        Ok(terms)
    }
}

/// The service's acknowledgement of a charge (service → charger): the keys are
/// stored for the medium, durably. The charger writes them into the medium only
/// after this verifies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeAck {
    /// The medium charged.
    pub medium_id: Uuid,
    /// Index of its first charged key.
    pub first_index: u64,
    /// Number of keys stored.
    pub count: u16,
    /// HMAC-SM3(auth key, `qkdnet/media/proto/v1/charge-ack` ‖ challenge ‖ the
    /// offer's tag ‖ medium ID ‖ first index ‖ count).
    pub tag: [u8; TAG_LEN],
}

impl ChargeAck {
    /// The acknowledgement of `offer` (made in answer to `challenge`).
    pub fn for_offer(offer: &ChargeOffer, challenge: &Challenge, auth_key: &Key256) -> Self {
        let count = u16::try_from(offer.terms.key_ids.len()).expect("invariant: ≤ MAX_CHARGE_KEYS");
        let mut ack = Self {
            medium_id: offer.terms.medium_id,
            first_index: offer.terms.first_index,
            count,
            tag: [0; TAG_LEN],
        };
        ack.tag = ack.mac(offer, challenge, auth_key).finalize();
        ack
    }

    /// Checks that this acknowledges exactly `offer`, under the authentication key.
    pub fn verify(
        &self,
        offer: &ChargeOffer,
        challenge: &Challenge,
        auth_key: &Key256,
    ) -> Result<()> {
        if self.medium_id != offer.terms.medium_id
            || self.first_index != offer.terms.first_index
            || usize::from(self.count) != offer.terms.key_ids.len()
        {
            return Err(ProtoError::InvalidField(
                "acknowledgement of another charge",
            ));
        }
        self.mac(offer, challenge, auth_key)
            .verify(&self.tag)
            .map_err(|_| ProtoError::BadTag)
    }

    fn mac(&self, offer: &ChargeOffer, challenge: &Challenge, key: &Key256) -> HmacSm3 {
        let mut m = HmacSm3::new(key.expose_secret());
        m.update(LABEL_CHARGE_ACK);
        m.update(&challenge.challenge);
        m.update(&offer.tag);
        m.update(self.medium_id.as_bytes());
        m.update(&self.first_index.to_be_bytes());
        m.update(&self.count.to_be_bytes());
        m
    }
}

fn encode_text(s: &str, out: &mut Vec<u8>) {
    let len = u16::try_from(s.len()).expect("invariant: checked texts are short");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A length-prefixed text of at most `max` bytes, valid UTF-8 without control
/// characters.
fn decode_text(r: &mut Reader<'_>, what: &'static str, max: usize) -> Result<String> {
    let len = usize::from(r.u16(what)?);
    if len > max {
        return Err(ProtoError::InvalidField(what));
    }
    let bytes = r.take(what, len)?;
    let s = core::str::from_utf8(bytes).map_err(|_| ProtoError::InvalidField(what))?;
    check_text(s, max).map_err(|_| ProtoError::InvalidField(what))?;
    Ok(s.to_owned())
}

/// Any message of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// Service → terminal: a fresh challenge.
    Challenge(Challenge),
    /// Terminal → service: an authenticated request.
    AuthRequest(AuthRequest),
    /// Service → terminal: a wrapped session key.
    SessionKeyGrant(SessionKeyGrant),
    /// Service → terminal or charger: the request was refused.
    Refused(RefuseReason),
    /// Charger → service: keys offered for a medium.
    ChargeOffer(ChargeOffer),
    /// Service → charger: the offered keys are stored.
    ChargeAck(ChargeAck),
}

impl Message {
    /// Encodes the message as one frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(128);
        let ty = match self {
            Self::Challenge(c) => {
                body.extend_from_slice(&c.challenge);
                TYPE_CHALLENGE
            }
            Self::AuthRequest(r) => {
                body.extend_from_slice(r.medium_id.as_bytes());
                body.extend_from_slice(&r.key_index.to_be_bytes());
                r.request.encode(&mut body);
                body.extend_from_slice(&r.tag);
                TYPE_AUTH_REQUEST
            }
            Self::SessionKeyGrant(g) => {
                g.bound_fields(&mut body);
                body.extend_from_slice(&g.nonce);
                body.extend_from_slice(&g.ciphertext);
                TYPE_GRANT
            }
            Self::Refused(reason) => {
                body.push(reason.to_byte());
                TYPE_REFUSED
            }
            Self::ChargeOffer(o) => {
                o.terms.encode(&mut body);
                body.extend_from_slice(&o.tag);
                TYPE_CHARGE_OFFER
            }
            Self::ChargeAck(a) => {
                body.extend_from_slice(a.medium_id.as_bytes());
                body.extend_from_slice(&a.first_index.to_be_bytes());
                body.extend_from_slice(&a.count.to_be_bytes());
                body.extend_from_slice(&a.tag);
                TYPE_CHARGE_ACK
            }
        };
        // The largest body (a charge offer of 256 keys) is under 4,500 bytes.
        let len = u16::try_from(body.len()).expect("invariant: bodies ≤ MAX_BODY");
        debug_assert!(body.len() <= MAX_BODY);
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(ty);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes exactly one frame; trailing bytes are an error.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let Some(len) = frame_len(bytes)? else {
            return Err(ProtoError::Truncated {
                what: "frame header",
                needed: HEADER_LEN,
                got: bytes.len(),
            });
        };
        if bytes.len() < len {
            return Err(ProtoError::Truncated {
                what: "frame",
                needed: len,
                got: bytes.len(),
            });
        }
        if bytes.len() > len {
            return Err(ProtoError::Trailing(bytes.len() - len));
        }
        let mut r = Reader(&bytes[HEADER_LEN..]);
        let msg = match bytes[5] {
            TYPE_CHALLENGE => Self::Challenge(Challenge {
                challenge: r.array("challenge")?,
            }),
            TYPE_AUTH_REQUEST => Self::AuthRequest(AuthRequest {
                medium_id: Uuid::from_bytes(r.array("medium ID")?),
                key_index: r.u64("key index")?,
                request: Request::decode(&mut r)?,
                tag: r.array("tag")?,
            }),
            TYPE_GRANT => Self::SessionKeyGrant(SessionKeyGrant {
                session_id: r.array("session ID")?,
                a_identity: Identity::decode(&mut r)?,
                b_identity: Identity::decode(&mut r)?,
                source: KeySource::from_byte(r.u8("key source")?)?,
                wrap_index: r.u64("wrap index")?,
                nonce: r.array::<GCM_NONCE_LEN>("nonce")?,
                ciphertext: r.array("wrapped key")?,
            }),
            TYPE_REFUSED => Self::Refused(RefuseReason::from_byte(r.u8("refusal reason")?)?),
            TYPE_CHARGE_OFFER => Self::ChargeOffer(ChargeOffer::decode(&mut r)?),
            TYPE_CHARGE_ACK => Self::ChargeAck(ChargeAck {
                medium_id: Uuid::from_bytes(r.array("medium ID")?),
                first_index: r.u64("first index")?,
                count: r.u16("count")?,
                tag: r.array("tag")?,
            }),
            // frame_len checked the type.
            t => return Err(ProtoError::UnknownType(t)),
        };
        if !r.0.is_empty() {
            return Err(ProtoError::Trailing(r.0.len()));
        }
        Ok(msg)
    }
}

/// The length of the frame at the head of `buf`, for stream adapters: `Ok(None)`
/// until the 8-byte header is there, then the whole frame's length (header and
/// body) once the header checks out (magic, version, type, body ≤ [`MAX_BODY`]).
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        // Fail early on a wrong magic prefix so garbage is not buffered.
        let n = buf.len().min(MAGIC.len());
        if buf[..n] != MAGIC[..n] {
            return Err(ProtoError::BadMagic);
        }
        return Ok(None);
    };
    if header[..4] != MAGIC {
        return Err(ProtoError::BadMagic);
    }
    if header[4] != VERSION {
        return Err(ProtoError::UnsupportedVersion(header[4]));
    }
    if !(TYPE_CHALLENGE..=TYPE_CHARGE_ACK).contains(&header[5]) {
        return Err(ProtoError::UnknownType(header[5]));
    }
    let body = usize::from(u16::from_be_bytes([header[6], header[7]]));
    if body > MAX_BODY {
        return Err(ProtoError::TooLong(body));
    }
    Ok(Some(HEADER_LEN + body))
}

/// A bounded cursor over a body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(ProtoError::Truncated {
                what,
                needed: n,
                got: self.0.len(),
            });
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let b = self.take(what, N)?;
        Ok(b.try_into().expect("invariant: take returned N bytes"))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
}
