//! `sm4` media mode: RTP and RTCP between two edges protected with SM4-GCM
//! under keys derived from the call's quantum session key; sans-IO.
//!
//! The layout follows SRTP with AEAD (RFC 7714) with SM4 in place of AES:
//!
//! - **RTP**: the header (fixed part, CSRCs, extension) stays in the clear and
//!   is the additional data; the payload is encrypted; a 16-byte tag follows.
//!   Nonce = salt ⊕ (0⁽¹⁶⁾ ‖ SSRC ‖ ROC ‖ SEQ); the roll-over counter is not
//!   sent, each side estimates it from the highest sequence seen (RFC 3711
//!   §3.3.1).
//! - **RTCP**: the first 8 bytes (header, sender SSRC) are additional data, the
//!   rest is encrypted, then the tag and a 4-byte index with the E bit set
//!   (also additional data). Nonce = salt ⊕ (0⁽¹⁶⁾ ‖ SSRC ‖ 0⁽¹⁶⁾ ‖ index).
//! - **Keys**: per direction (caller→callee, callee→caller) and per kind,
//!   HKDF-SM3 of the session key, 16 key bytes and 12 salt bytes each; so no
//!   nonce is ever used twice under one key.
//! - **Replay**: a 64-packet window per SSRC on the 48-bit index; a packet
//!   older than the window, seen before, or failing its tag is dropped and
//!   counted ([`Counters`]). At most [`MAX_SSRCS`] SSRCs per direction.
//!
//! Written here because it is the national-algorithm variant of SRTP, which
//! no SRTP crate offers; the cipher is RustCrypto's through `qkdnet-crypto`.

use std::collections::HashMap;

use qkdnet_crypto::gcm::{GCM_TAG_LEN, GcmNonce, Sm4Gcm};
use qkdnet_crypto::kdf::hkdf_sm3;
use qkdnet_crypto::secret::Sm4Key;
use qkdnet_media::Key256;

/// Most SSRCs tracked per direction; packets of further SSRCs are dropped.
pub const MAX_SSRCS: usize = 8;
/// Replay window, packets.
pub const WINDOW: u64 = 64;
const RTCP_E: u32 = 0x8000_0000;

/// Which way the media goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the party who placed the call.
    CallerToCallee,
    /// Toward it.
    CalleeToCaller,
}

impl Direction {
    pub(crate) fn label(self) -> &'static [u8] {
        match self {
            Self::CallerToCallee => b"caller->callee",
            Self::CalleeToCaller => b"callee->caller",
        }
    }
}

/// Why a packet was not passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Drop {
    /// Too short or not RTP/RTCP version 2.
    #[error("not an RTP/RTCP packet")]
    Malformed,
    /// The tag does not verify (tampered, or another key).
    #[error("authentication failed")]
    Auth,
    /// Seen before, or older than the window.
    #[error("replayed or too old")]
    Replay,
    /// More SSRCs than [`MAX_SSRCS`].
    #[error("too many SSRCs")]
    TooManySsrcs,
    /// `otp` mode: no pad for it (not yet fetched, or run out).
    #[error("no one-time pad for it")]
    NoPad,
}

/// Packets dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Malformed.
    pub malformed: u64,
    /// Failed authentication (tampered).
    pub auth: u64,
    /// Replayed or too old.
    pub replay: u64,
    /// Beyond the SSRC limit.
    pub ssrcs: u64,
    /// `otp` mode: no pad for it.
    pub no_pad: u64,
}

impl Counters {
    /// Counts one drop.
    pub fn count(&mut self, d: Drop) {
        match d {
            Drop::Malformed => self.malformed += 1,
            Drop::Auth => self.auth += 1,
            Drop::Replay => self.replay += 1,
            Drop::TooManySsrcs => self.ssrcs += 1,
            Drop::NoPad => self.no_pad += 1,
        }
    }
}

struct Keyed {
    cipher: Sm4Gcm,
    salt: GcmNonce,
}

impl Keyed {
    fn derive(session: &Key256, dir: Direction, kind: &[u8]) -> Self {
        let okm = hkdf_sm3(
            b"qkdnet call sm4 media v1",
            session.expose_secret(),
            &[kind, dir.label()],
            28,
        )
        .expect("invariant: 28 bytes is a valid HKDF-SM3 length");
        let bytes = okm.expose_secret();
        let mut key = [0u8; 16];
        key.copy_from_slice(&bytes[..16]);
        let mut salt = [0u8; 12];
        salt.copy_from_slice(&bytes[16..28]);
        let cipher = Sm4Gcm::new(&Sm4Key::new(key));
        zeroize::Zeroize::zeroize(&mut key);
        Self { cipher, salt }
    }

    fn nonce(&self, ssrc: u32, hi: u32, lo: u32) -> GcmNonce {
        let mut n = [0u8; 12];
        n[2..6].copy_from_slice(&ssrc.to_be_bytes());
        n[6..10].copy_from_slice(&hi.to_be_bytes());
        n[10..12].copy_from_slice(&(lo as u16).to_be_bytes());
        for (a, b) in n.iter_mut().zip(self.salt) {
            *a ^= b;
        }
        n
    }

    fn nonce_rtcp(&self, ssrc: u32, index: u32) -> GcmNonce {
        let mut n = [0u8; 12];
        n[2..6].copy_from_slice(&ssrc.to_be_bytes());
        n[8..12].copy_from_slice(&index.to_be_bytes());
        for (a, b) in n.iter_mut().zip(self.salt) {
            *a ^= b;
        }
        n
    }
}

/// Highest index seen and the replay bitmap below it.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Window {
    started: bool,
    highest: u64,
    seen: u64,
}

impl Window {
    pub(crate) fn check(&self, idx: u64) -> Result<(), Drop> {
        if !self.started || idx > self.highest {
            return Ok(());
        }
        let back = self.highest - idx;
        if back >= WINDOW || self.seen & (1 << back) != 0 {
            return Err(Drop::Replay);
        }
        Ok(())
    }

    pub(crate) fn accept(&mut self, idx: u64) {
        if !self.started {
            *self = Self {
                started: true,
                highest: idx,
                seen: 1,
            };
        } else if idx > self.highest {
            let shift = idx - self.highest;
            self.seen = if shift >= WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.highest = idx;
        } else {
            self.seen |= 1 << (self.highest - idx);
        }
    }

    /// The 48-bit index of sequence number `seq` (RFC 3711 §3.3.1).
    pub(crate) fn estimate(&self, seq: u16) -> u64 {
        if !self.started {
            return u64::from(seq);
        }
        let roc = (self.highest >> 16) as i64;
        let s_l = (self.highest & 0xffff) as i64;
        let seq_i = i64::from(seq);
        let v = if s_l < 32_768 {
            if seq_i - s_l > 32_768 { roc - 1 } else { roc }
        } else if s_l - 32_768 > seq_i {
            roc + 1
        } else {
            roc
        };
        if v < 0 {
            return u64::from(seq);
        }
        ((v as u64) << 16) | u64::from(seq)
    }
}

pub(crate) fn rtp_header_len(p: &[u8]) -> Result<usize, Drop> {
    if p.len() < 12 || p[0] >> 6 != 2 {
        return Err(Drop::Malformed);
    }
    let cc = usize::from(p[0] & 0x0f);
    let mut len = 12 + 4 * cc;
    if p[0] & 0x10 != 0 {
        if p.len() < len + 4 {
            return Err(Drop::Malformed);
        }
        let words = usize::from(u16::from_be_bytes([p[len + 2], p[len + 3]]));
        len += 4 + 4 * words;
    }
    if p.len() < len {
        return Err(Drop::Malformed);
    }
    Ok(len)
}

fn ssrc_at(p: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

/// Is this datagram RTCP (payload type 200–211 in the second byte)?
pub fn is_rtcp(p: &[u8]) -> bool {
    p.len() >= 8 && p[0] >> 6 == 2 && (200..=211).contains(&p[1])
}

/// Protects one direction's packets (the sending edge).
pub struct Protect {
    rtp: Keyed,
    rtcp: Keyed,
    windows: HashMap<u32, Window>,
    rtcp_index: u32,
}

impl std::fmt::Debug for Protect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Protect").finish_non_exhaustive()
    }
}

impl Protect {
    /// The sender of direction `dir` of the call keyed by `session`.
    pub fn new(session: &Key256, dir: Direction) -> Self {
        Self {
            rtp: Keyed::derive(session, dir, b"rtp"),
            rtcp: Keyed::derive(session, dir, b"rtcp"),
            windows: HashMap::new(),
            rtcp_index: 0,
        }
    }

    /// Protects a plain RTP packet in place (appends the tag).
    pub fn rtp(&mut self, p: &mut Vec<u8>) -> Result<(), Drop> {
        let hl = rtp_header_len(p)?;
        let seq = u16::from_be_bytes([p[2], p[3]]);
        let ssrc = ssrc_at(p, 8);
        if !self.windows.contains_key(&ssrc) && self.windows.len() >= MAX_SSRCS {
            return Err(Drop::TooManySsrcs);
        }
        let w = self.windows.entry(ssrc).or_default();
        let idx = w.estimate(seq);
        // The sender may see a packet twice from its softphone; sealing it
        // twice under one nonce would be the one fatal mistake, so a repeat
        // is dropped like a replay.
        w.check(idx)?;
        w.accept(idx);
        let nonce = self.rtp.nonce(ssrc, (idx >> 16) as u32, idx as u32);
        let (head, body) = p.split_at_mut(hl);
        let tag = self
            .rtp
            .cipher
            .seal_in_place_detached(&nonce, head, body)
            .map_err(|_| Drop::Malformed)?;
        p.extend_from_slice(&tag);
        Ok(())
    }

    /// Protects a plain RTCP packet in place (appends tag and index).
    pub fn rtcp(&mut self, p: &mut Vec<u8>) -> Result<(), Drop> {
        if !is_rtcp(p) {
            return Err(Drop::Malformed);
        }
        let ssrc = ssrc_at(p, 4);
        let index = self.rtcp_index & !RTCP_E;
        self.rtcp_index = self.rtcp_index.wrapping_add(1) & !RTCP_E;
        let e_index = (index | RTCP_E).to_be_bytes();
        let nonce = self.rtcp.nonce_rtcp(ssrc, index);
        let mut aad = [0u8; 12];
        aad[..8].copy_from_slice(&p[..8]);
        aad[8..].copy_from_slice(&e_index);
        let tag = self
            .rtcp
            .cipher
            .seal_in_place_detached(&nonce, &aad, &mut p[8..])
            .map_err(|_| Drop::Malformed)?;
        p.extend_from_slice(&tag);
        p.extend_from_slice(&e_index);
        Ok(())
    }
}

/// Checks and opens one direction's packets (the receiving edge).
pub struct Unprotect {
    rtp: Keyed,
    rtcp: Keyed,
    windows: HashMap<u32, Window>,
    rtcp_windows: HashMap<u32, Window>,
    /// What was dropped.
    pub dropped: Counters,
    /// Packets passed.
    pub passed: u64,
}

impl std::fmt::Debug for Unprotect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unprotect")
            .field("dropped", &self.dropped)
            .field("passed", &self.passed)
            .finish_non_exhaustive()
    }
}

impl Unprotect {
    /// The receiver of direction `dir` of the call keyed by `session`.
    pub fn new(session: &Key256, dir: Direction) -> Self {
        Self {
            rtp: Keyed::derive(session, dir, b"rtp"),
            rtcp: Keyed::derive(session, dir, b"rtcp"),
            windows: HashMap::new(),
            rtcp_windows: HashMap::new(),
            dropped: Counters::default(),
            passed: 0,
        }
    }

    /// Opens a protected RTP or RTCP packet in place; on error the packet is
    /// to be dropped (and was counted).
    pub fn open(&mut self, p: &mut Vec<u8>) -> Result<(), Drop> {
        let r = self.try_open(p);
        match r {
            Ok(()) => self.passed += 1,
            Err(d) => self.dropped.count(d),
        }
        r
    }

    /// [`Unprotect::open`] without counting (for a receiver that tries the
    /// keys of two epochs around a rekey and counts once).
    pub fn try_open(&mut self, p: &mut Vec<u8>) -> Result<(), Drop> {
        if is_rtcp(p) {
            self.open_rtcp(p)
        } else {
            self.open_rtp(p)
        }
    }

    fn open_rtp(&mut self, p: &mut Vec<u8>) -> Result<(), Drop> {
        let hl = rtp_header_len(p)?;
        if p.len() < hl + GCM_TAG_LEN {
            return Err(Drop::Malformed);
        }
        let seq = u16::from_be_bytes([p[2], p[3]]);
        let ssrc = ssrc_at(p, 8);
        if !self.windows.contains_key(&ssrc) && self.windows.len() >= MAX_SSRCS {
            return Err(Drop::TooManySsrcs);
        }
        let w = self.windows.get(&ssrc).copied().unwrap_or_default();
        let idx = w.estimate(seq);
        w.check(idx)?;
        let nonce = self.rtp.nonce(ssrc, (idx >> 16) as u32, idx as u32);
        let tag_at = p.len() - GCM_TAG_LEN;
        let mut tag = [0u8; GCM_TAG_LEN];
        tag.copy_from_slice(&p[tag_at..]);
        let (head, body) = p[..tag_at].split_at_mut(hl);
        self.rtp
            .cipher
            .open_in_place_detached(&nonce, head, body, &tag)
            .map_err(|_| Drop::Auth)?;
        p.truncate(tag_at);
        self.windows.entry(ssrc).or_default().accept(idx);
        Ok(())
    }

    fn open_rtcp(&mut self, p: &mut Vec<u8>) -> Result<(), Drop> {
        if p.len() < 8 + GCM_TAG_LEN + 4 {
            return Err(Drop::Malformed);
        }
        let ssrc = ssrc_at(p, 4);
        if !self.rtcp_windows.contains_key(&ssrc) && self.rtcp_windows.len() >= MAX_SSRCS {
            return Err(Drop::TooManySsrcs);
        }
        let n = p.len();
        let e_index = [p[n - 4], p[n - 3], p[n - 2], p[n - 1]];
        let raw = u32::from_be_bytes(e_index);
        if raw & RTCP_E == 0 {
            return Err(Drop::Malformed);
        }
        let index = raw & !RTCP_E;
        let w = self.rtcp_windows.get(&ssrc).copied().unwrap_or_default();
        w.check(u64::from(index))?;
        let nonce = self.rtcp.nonce_rtcp(ssrc, index);
        let mut aad = [0u8; 12];
        aad[..8].copy_from_slice(&p[..8]);
        aad[8..].copy_from_slice(&e_index);
        let tag_at = n - 4 - GCM_TAG_LEN;
        let mut tag = [0u8; GCM_TAG_LEN];
        tag.copy_from_slice(&p[tag_at..n - 4]);
        self.rtcp
            .cipher
            .open_in_place_detached(&nonce, &aad, &mut p[8..tag_at], &tag)
            .map_err(|_| Drop::Auth)?;
        p.truncate(tag_at);
        self.rtcp_windows
            .entry(ssrc)
            .or_default()
            .accept(u64::from(index));
        Ok(())
    }
}

/// An HMAC-SM3 key for the edges' in-band control messages (pad
/// announcements, rekey offers), derived per call key, purpose and
/// direction; tags compared in constant time.
pub(crate) struct ControlMac(zeroize::Zeroizing<[u8; 32]>);

impl ControlMac {
    pub(crate) fn derive(key: &Key256, label: &[u8], dir: Direction) -> Self {
        let okm = hkdf_sm3(label, key.expose_secret(), &[dir.label()], 32)
            .expect("invariant: 32 bytes is a valid HKDF-SM3 length");
        let mut k = zeroize::Zeroizing::new([0u8; 32]);
        k.copy_from_slice(okm.expose_secret());
        Self(k)
    }

    pub(crate) fn tag(&self, body: &[u8]) -> [u8; 32] {
        let mut h = qkdnet_crypto::sm3::HmacSm3::new(&self.0[..]);
        h.update(body);
        h.finalize()
    }

    pub(crate) fn verify(&self, body: &[u8], tag: &[u8]) -> bool {
        bool::from(subtle::ConstantTimeEq::ct_eq(&self.tag(body)[..], tag))
    }
}
