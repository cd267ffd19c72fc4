//! SRTP and SRTCP with `AES_CM_128_HMAC_SHA1_80` (RFC 3711), the suite every
//! SDES softphone offers; sans-IO.
//!
//! Used by the `srtp` media mode: a softphone always encrypts with the key it
//! chose itself (the key in its own SDP); the edge opens those packets with
//! that key and protects them again with a key derived from the call's
//! quantum session key, which it wrote into the SDP the *other* softphone
//! received — so each softphone decrypts with the quantum-derived key, and
//! only quantum-derived keys protect media between the edges.
//!
//! Written here from RustCrypto's AES, CTR, HMAC and SHA-1: the Rust SRTP
//! crates are bindings to libsrtp (a C library to link) or part of a WebRTC
//! stack far larger than this; what SRTP needs (the AES-CM key derivation,
//! counter-mode encryption, an 80-bit HMAC-SHA1 tag, roll-over counter and
//! replay window) is short, and checked against RFC 3711's test vectors.

use aes::Aes128;
use aes::cipher::{BlockCipherEncrypt, KeyInit, KeyIvInit, StreamCipher};
use hmac::{Hmac, Mac};
use sha1::Sha1;
use zeroize::Zeroize;

use crate::media::{Drop as Discard, Window, rtp_header_len};

/// The SDES name of the suite.
pub const SUITE: &str = "AES_CM_128_HMAC_SHA1_80";
/// Master key length.
pub const KEY_LEN: usize = 16;
/// Master salt length.
pub const SALT_LEN: usize = 14;
/// Authentication tag length (80 bits).
pub const TAG_LEN: usize = 10;
const RTCP_E: u32 = 0x8000_0000;

type Ctr = ctr::Ctr128BE<Aes128>;

/// A master key and salt (30 bytes, as in an SDES `inline:` parameter).
#[derive(Clone, zeroize::ZeroizeOnDrop)]
pub struct MasterKey {
    key: [u8; KEY_LEN],
    salt: [u8; SALT_LEN],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(…)")
    }
}

impl MasterKey {
    /// From the 30 bytes of key ‖ salt.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != KEY_LEN + SALT_LEN {
            return None;
        }
        let mut key = [0u8; KEY_LEN];
        let mut salt = [0u8; SALT_LEN];
        key.copy_from_slice(&b[..KEY_LEN]);
        salt.copy_from_slice(&b[KEY_LEN..]);
        Some(Self { key, salt })
    }

    /// Key ‖ salt in base64 (padded), as SDES writes it after `inline:`.
    pub fn to_inline(&self) -> String {
        use base64::Engine as _;
        let mut b = [0u8; KEY_LEN + SALT_LEN];
        b[..KEY_LEN].copy_from_slice(&self.key);
        b[KEY_LEN..].copy_from_slice(&self.salt);
        let s = base64::engine::general_purpose::STANDARD.encode(b);
        b.zeroize();
        s
    }

    /// From an SDES `inline:` value (`KEY_SALT_BASE64[|lifetime][|MKI:len]`).
    pub fn from_inline(s: &str) -> Option<Self> {
        use base64::Engine as _;
        let b64 = s.split('|').next()?;
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64))
            .ok()?;
        let k = Self::from_bytes(&raw);
        raw.zeroize();
        k
    }

    /// The AES-CM PRF of RFC 3711 §4.3.1 (key derivation rate 0): `len`
    /// bytes for `label`.
    fn derive(&self, label: u8, out: &mut [u8]) {
        let mut iv = [0u8; 16];
        iv[..SALT_LEN].copy_from_slice(&self.salt);
        iv[7] ^= label;
        let mut c = Ctr::new(&self.key.into(), &iv.into());
        out.fill(0);
        c.apply_keystream(out);
    }
}

/// The `a=crypto` value of a description for `SUITE` (tag, master key), if
/// it offers that suite.
pub fn parse_crypto(line: &str) -> Option<(u32, MasterKey)> {
    let rest = line.strip_prefix("a=crypto:")?;
    let mut it = rest.split_whitespace();
    let tag: u32 = it.next()?.parse().ok()?;
    if it.next()? != SUITE {
        return None;
    }
    let key = it.next()?.strip_prefix("inline:")?;
    Some((tag, MasterKey::from_inline(key)?))
}

/// The first `SUITE` crypto line of an SDP body.
pub fn crypto_of(body: &[u8]) -> Option<(u32, MasterKey)> {
    std::str::from_utf8(body)
        .ok()?
        .lines()
        .find_map(|l| parse_crypto(l.trim_end()))
}

struct Session {
    enc: Aes128,
    auth: Hmac<Sha1>,
    salt: [u8; SALT_LEN],
}

impl Session {
    fn new(m: &MasterKey, labels: [u8; 3]) -> Self {
        let mut k = [0u8; 16];
        let mut a = [0u8; 20];
        let mut s = [0u8; SALT_LEN];
        m.derive(labels[0], &mut k);
        m.derive(labels[1], &mut a);
        m.derive(labels[2], &mut s);
        let enc = Aes128::new(&k.into());
        let auth =
            <Hmac<Sha1> as KeyInit>::new_from_slice(&a).expect("invariant: HMAC takes any key");
        k.zeroize();
        a.zeroize();
        Self { enc, auth, salt: s }
    }

    /// AES-CM keystream applied to `data` for (ssrc, index) (RFC 3711 §4.1.1).
    fn crypt(&self, ssrc: u32, index: u64, data: &mut [u8]) {
        let mut iv = [0u8; 16];
        iv[..SALT_LEN].copy_from_slice(&self.salt);
        for (i, b) in ssrc.to_be_bytes().iter().enumerate() {
            iv[4 + i] ^= b;
        }
        let idx = index.to_be_bytes(); // 48-bit index in the low 6 bytes
        for i in 0..6 {
            iv[8 + i] ^= idx[2 + i];
        }
        let mut counter = u128::from_be_bytes(iv);
        for chunk in data.chunks_mut(16) {
            let mut block = counter.to_be_bytes().into();
            self.enc.encrypt_block(&mut block);
            for (d, k) in chunk.iter_mut().zip(block.iter()) {
                *d ^= k;
            }
            counter = counter.wrapping_add(1);
        }
    }

    fn tag(&self, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        let mut mac = self.auth.clone();
        for p in parts {
            mac.update(p);
        }
        let full = mac.finalize().into_bytes();
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(&full[..TAG_LEN]);
        t
    }
}

/// One direction of SRTP/SRTCP under one master key: protects, or checks and
/// opens, with a replay window per direction (one SSRC per stream here: a
/// change of SSRC starts a new window).
pub struct Context {
    rtp: Session,
    rtcp: Session,
    window: Window,
    ssrc: Option<u32>,
    rtcp_window: Window,
    rtcp_index: u32,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("srtp::Context").finish_non_exhaustive()
    }
}

impl Context {
    /// A context for one direction keyed by `m`.
    pub fn new(m: &MasterKey) -> Self {
        Self {
            rtp: Session::new(m, [0, 1, 2]),
            rtcp: Session::new(m, [3, 4, 5]),
            window: Window::default(),
            ssrc: None,
            rtcp_window: Window::default(),
            rtcp_index: 0,
        }
    }

    fn stream(&mut self, ssrc: u32) {
        if self.ssrc != Some(ssrc) {
            self.ssrc = Some(ssrc);
            self.window = Window::default();
        }
    }

    /// Encrypts and tags a plain RTP packet in place.
    pub fn protect_rtp(&mut self, p: &mut Vec<u8>) -> Result<(), Discard> {
        let hl = rtp_header_len(p)?;
        let seq = u16::from_be_bytes([p[2], p[3]]);
        let ssrc = u32::from_be_bytes([p[8], p[9], p[10], p[11]]);
        self.stream(ssrc);
        let idx = self.window.estimate(seq);
        self.window.check(idx)?;
        self.window.accept(idx);
        self.rtp.crypt(ssrc, idx, &mut p[hl..]);
        let roc = ((idx >> 16) as u32).to_be_bytes();
        let tag = self.rtp.tag(&[p, &roc]);
        p.extend_from_slice(&tag);
        Ok(())
    }

    /// Checks and decrypts an SRTP packet in place.
    pub fn unprotect_rtp(&mut self, p: &mut Vec<u8>) -> Result<(), Discard> {
        let hl = rtp_header_len(p)?;
        if p.len() < hl + TAG_LEN {
            return Err(Discard::Malformed);
        }
        let seq = u16::from_be_bytes([p[2], p[3]]);
        let ssrc = u32::from_be_bytes([p[8], p[9], p[10], p[11]]);
        let w = if self.ssrc == Some(ssrc) {
            self.window
        } else {
            Window::default()
        };
        let idx = w.estimate(seq);
        w.check(idx)?;
        let at = p.len() - TAG_LEN;
        let roc = ((idx >> 16) as u32).to_be_bytes();
        let tag = self.rtp.tag(&[&p[..at], &roc]);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&tag[..], &p[at..])) {
            return Err(Discard::Auth);
        }
        p.truncate(at);
        self.rtp.crypt(ssrc, idx, &mut p[hl..]);
        self.stream(ssrc);
        self.window.accept(idx);
        Ok(())
    }

    /// Encrypts and tags a plain RTCP packet in place (SRTCP, E bit set).
    pub fn protect_rtcp(&mut self, p: &mut Vec<u8>) -> Result<(), Discard> {
        if p.len() < 8 {
            return Err(Discard::Malformed);
        }
        let ssrc = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
        let index = self.rtcp_index & !RTCP_E;
        self.rtcp_index = self.rtcp_index.wrapping_add(1) & !RTCP_E;
        self.rtcp.crypt(ssrc, u64::from(index), &mut p[8..]);
        p.extend_from_slice(&(index | RTCP_E).to_be_bytes());
        let tag = self.rtcp.tag(&[p]);
        p.extend_from_slice(&tag);
        Ok(())
    }

    /// Checks and decrypts an SRTCP packet in place.
    pub fn unprotect_rtcp(&mut self, p: &mut Vec<u8>) -> Result<(), Discard> {
        if p.len() < 8 + 4 + TAG_LEN {
            return Err(Discard::Malformed);
        }
        let at = p.len() - TAG_LEN;
        let tag = self.rtcp.tag(&[&p[..at]]);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&tag[..], &p[at..])) {
            return Err(Discard::Auth);
        }
        let e = u32::from_be_bytes([p[at - 4], p[at - 3], p[at - 2], p[at - 1]]);
        let index = u64::from(e & !RTCP_E);
        self.rtcp_window.check(index)?;
        let ssrc = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
        p.truncate(at - 4);
        if e & RTCP_E != 0 {
            self.rtcp.crypt(ssrc, index, &mut p[8..]);
        }
        self.rtcp_window.accept(index);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// RFC 3711 Appendix B.3: key derivation test vectors.
    #[test]
    fn key_derivation_matches_rfc3711_b3() {
        let mut b = h("E1F97A0D3E018BE0D64FA32C06DE4139");
        b.extend(h("0EC675AD498AFEEBB6960B3AABE6"));
        let m = MasterKey::from_bytes(&b).expect("30 bytes");
        let mut k = [0u8; 16];
        m.derive(0, &mut k);
        assert_eq!(k.to_vec(), h("C61E7A93744F39EE10734AFE3FF7A087"));
        let mut s = [0u8; 14];
        m.derive(2, &mut s);
        assert_eq!(s.to_vec(), h("30CBBC08863D8C85D49DB34A9AE1"));
        let mut a = [0u8; 94];
        m.derive(1, &mut a);
        assert_eq!(
            a[..20].to_vec(),
            h("CEBE321F6FF7716B6FD4AB49AF256A156D38BAA4")
        );
    }

    /// RFC 3711 Appendix B.2: AES-CM keystream.
    #[test]
    fn aes_cm_keystream_matches_rfc3711_b2() {
        let key = h("2B7E151628AED2A6ABF7158809CF4F3C");
        let salt = h("F0F1F2F3F4F5F6F7F8F9FAFBFCFD");
        let s = Session {
            enc: Aes128::new_from_slice(&key).expect("16"),
            auth: <Hmac<Sha1> as KeyInit>::new_from_slice(&[0; 20]).expect("key"),
            salt: salt.try_into().expect("14"),
        };
        let mut ks = vec![0u8; 48];
        s.crypt(0, 0, &mut ks);
        assert_eq!(
            ks,
            h(
                "E03EAD0935C95E80E166B16DD92B4EB4D23513162B02D0F72A43A2FE4A5F97AB41E95B3BB0A2E8DD477901E4FCA894C0"
            )
        );
    }

    #[test]
    fn inline_round_trip_and_crypto_line() {
        let m = MasterKey::from_bytes(&[7u8; 30]).expect("30");
        let line = format!("a=crypto:1 {SUITE} inline:{}", m.to_inline());
        let (tag, back) = parse_crypto(&line).expect("parses");
        assert_eq!(tag, 1);
        assert_eq!(back.key, m.key);
        assert_eq!(back.salt, m.salt);
        assert!(parse_crypto("a=crypto:1 AEAD_AES_128_GCM inline:AAAA").is_none());
    }

    #[test]
    fn protect_then_unprotect_restores_the_packet_and_rejects_flips_and_replays() {
        let m = MasterKey::from_bytes(&[9u8; 30]).expect("30");
        let (mut tx, mut rx) = (Context::new(&m), Context::new(&m));
        let mut plain = vec![0x80, 0, 0, 1, 0, 0, 0, 160, 0xde, 0xad, 0xbe, 0xef];
        plain.extend((0..160).map(|i| i as u8));
        let mut p = plain.clone();
        tx.protect_rtp(&mut p).expect("protect");
        assert_ne!(p[12..172], plain[12..]);
        let mut q = p.clone();
        rx.unprotect_rtp(&mut q).expect("opens");
        assert_eq!(q, plain);
        assert_eq!(rx.unprotect_rtp(&mut p.clone()), Err(Discard::Replay));
        for i in 0..p.len() {
            let mut f = p.clone();
            f[i] ^= 1;
            let mut fresh = Context::new(&m);
            assert!(fresh.unprotect_rtp(&mut f).is_err(), "flip at {i} passed");
        }
        let mut c = vec![0x80, 200, 0, 6, 0xde, 0xad, 0xbe, 0xef];
        c.extend([1u8; 20]);
        let mut pc = c.clone();
        tx.protect_rtcp(&mut pc).expect("protect");
        rx.unprotect_rtcp(&mut pc).expect("open");
        assert_eq!(pc, c);
    }
}
