//! Security associations: keys from one QKD key, sealing and opening packets
//! (sans-IO).
//!
//! One QKD key (256 bits from ETSI 014) keys one *epoch*, named by its SPI:
//!
//! ```text
//! okm = HKDF-SM3(salt = "qkdnet/gateway/v1", ikm = QKD key,
//!                info = SPI ‖ key ID ‖ initiator SAE ‖ 0 ‖ responder SAE), 104 bytes
//! i2r key (16) ‖ i2r salt (4) ‖ r2i key (16) ‖ r2i salt (4) ‖ control key (32)
//!   ‖ WireGuard preshared key (32, used only by the WireGuard agent)
//! ```
//!
//! so each direction has its own SM4-GCM key and nonce salt, and offers and acks
//! of the epoch are authenticated with the control key. A packet's plaintext is
//! the IP packet, optionally zero-padded to a multiple of `pad_to` bytes to hide
//! its length (the receiver cuts the padding off by the IP header's length).
//! Sealing refuses a packet once the sequence number space is spent; opening
//! checks the replay window before decrypting and updates it only after the tag
//! verified.

use std::time::Instant;

use qkdnet_crypto::gcm::{GCM_TAG_LEN, Sm4Gcm};
use qkdnet_crypto::kdf::hkdf_sm3;
use qkdnet_crypto::replay::{Replay, ReplayWindow};
use qkdnet_crypto::sm3::HmacSm3;
use qkdnet_crypto::{Sm4Key, sm4::Sm4Kernel};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::wire::{Control, HEADER_LEN, MAC_LEN, TAG_LEN, ip_len};

/// Replay window: 1,024 sequence numbers (packets reordered by up to that many
/// on the wan still arrive).
pub type Window = ReplayWindow<16>;

/// Packets one direction of an SA may seal (SM4-GCM with 96-bit nonces is good
/// for 2^32 messages per key by NIST's guidance; rekeying comes far earlier).
pub const MAX_PACKETS: u64 = 1 << 32;

/// One direction's cipher.
#[derive(Clone)]
struct DirKey {
    gcm: Sm4Gcm,
    salt: [u8; 4],
}

impl DirKey {
    fn nonce(&self, seq: u64) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.salt);
        n[4..].copy_from_slice(&seq.to_be_bytes());
        n
    }
}

/// The keys of one epoch, both directions.
pub struct EpochKeys {
    /// SPI naming the epoch.
    pub spi: u32,
    /// The QKD key's ID.
    pub key_id: [u8; 16],
    i2r: DirKey,
    r2i: DirKey,
    control: Zeroizing<[u8; 32]>,
    psk: Zeroizing<[u8; 32]>,
}

impl core::fmt::Debug for EpochKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("EpochKeys")
            .field("spi", &format_args!("{:#010x}", self.spi))
            .finish_non_exhaustive()
    }
}

/// Which end of the tunnel this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Master SAE: takes new keys with `enc_keys` and offers them.
    Initiator,
    /// Slave SAE: fetches offered keys by ID with `dec_keys`.
    Responder,
}

impl EpochKeys {
    /// Derives an epoch's keys from a QKD key.
    pub fn derive(
        qkd_key: &[u8],
        spi: u32,
        key_id: [u8; 16],
        initiator_sae: &str,
        responder_sae: &str,
    ) -> Self {
        let okm = hkdf_sm3(
            b"qkdnet/gateway/v1",
            qkd_key,
            &[
                &spi.to_be_bytes(),
                &key_id,
                initiator_sae.as_bytes(),
                &[0],
                responder_sae.as_bytes(),
            ],
            104,
        )
        .expect("invariant: 104 bytes is a valid HKDF-SM3 length");
        let k = okm.expose_secret();
        let dir = |at: usize| DirKey {
            gcm: Sm4Gcm::new(&Sm4Key::new(k[at..at + 16].try_into().expect("16 bytes"))),
            salt: k[at + 16..at + 20].try_into().expect("4 bytes"),
        };
        let mut control = Zeroizing::new([0u8; 32]);
        control.copy_from_slice(&k[40..72]);
        let mut psk = Zeroizing::new([0u8; 32]);
        psk.copy_from_slice(&k[72..104]);
        Self {
            spi,
            key_id,
            i2r: dir(0),
            r2i: dir(20),
            control,
            psk,
        }
    }

    /// The epoch's WireGuard preshared key (the WireGuard agent's product).
    pub fn wireguard_psk(&self) -> &[u8; 32] {
        &self.psk
    }

    /// The SM4 kernel the ciphers run on (for the log).
    pub fn kernel(&self) -> Sm4Kernel {
        self.i2r.gcm.kernel()
    }

    /// MAC of an offer (`kind` 1) or ack (`kind` 2) of this epoch.
    pub fn control_mac(&self, kind: u8) -> [u8; MAC_LEN] {
        let mut h = HmacSm3::new(&self.control[..]);
        h.update(&Control::mac_input(kind, self.spi, &self.key_id));
        h.finalize()
    }

    /// Checks an offer's or ack's MAC in constant time.
    pub fn verify_control(&self, kind: u8, mac: &[u8; MAC_LEN]) -> bool {
        bool::from(self.control_mac(kind).ct_eq(mac))
    }

    fn sending(&self, role: Role) -> &DirKey {
        match role {
            Role::Initiator => &self.i2r,
            Role::Responder => &self.r2i,
        }
    }

    fn receiving(&self, role: Role) -> &DirKey {
        match role {
            Role::Initiator => &self.r2i,
            Role::Responder => &self.i2r,
        }
    }
}

/// Why a packet was not sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealError {
    /// The SA's lifetime is over (fail closed).
    Expired,
    /// The SA sealed its last sequence number.
    Exhausted,
}

/// The SA this gateway sends under.
pub struct Outbound {
    spi: u32,
    key: DirKey,
    next_seq: u64,
    expires: Instant,
    /// Plaintext bytes sealed.
    pub bytes: u64,
}

impl Outbound {
    /// The sending half of `keys` for this end, usable until `expires`.
    pub fn new(keys: &EpochKeys, role: Role, expires: Instant) -> Self {
        Self {
            spi: keys.spi,
            key: keys.sending(role).clone(),
            next_seq: 1,
            expires,
            bytes: 0,
        }
    }

    /// SPI of the SA.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// When the SA stops sealing.
    pub fn expires(&self) -> Instant {
        self.expires
    }

    /// Seals `packet` into `out` (cleared first): header ‖ ciphertext ‖ tag,
    /// the plaintext zero-padded to a multiple of `pad_to` (0: no padding).
    pub fn seal(
        &mut self,
        now: Instant,
        packet: &[u8],
        pad_to: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        if now >= self.expires {
            return Err(SealError::Expired);
        }
        if self.next_seq > MAX_PACKETS {
            return Err(SealError::Exhausted);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        out.clear();
        out.extend_from_slice(&self.spi.to_be_bytes());
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(packet);
        if pad_to > 1 {
            let padded = packet.len().next_multiple_of(pad_to);
            out.resize(HEADER_LEN + padded, 0);
        }
        let (header, body) = out.split_at_mut(HEADER_LEN);
        let tag = self
            .key
            .gcm
            .seal_in_place_detached(&self.key.nonce(seq), header, body)
            .expect("invariant: a datagram is far below SM4-GCM's message limit");
        out.extend_from_slice(&tag);
        self.bytes += packet.len() as u64;
        Ok(())
    }
}

/// Why a received data packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// Sequence number seen before or too old.
    Replayed,
    /// Tag did not verify (forged, corrupted, or another key).
    Forged,
    /// The SA's lifetime is over.
    Expired,
    /// Authentic, but the plaintext is not an IP packet that fits.
    NotIp,
}

/// An SA this gateway receives under.
pub struct Inbound {
    spi: u32,
    key: DirKey,
    window: Window,
    expires: Instant,
    /// Plaintext bytes opened.
    pub bytes: u64,
}

impl Inbound {
    /// The receiving half of `keys` for this end, usable until `expires`.
    pub fn new(keys: &EpochKeys, role: Role, expires: Instant) -> Self {
        Self {
            spi: keys.spi,
            key: keys.receiving(role).clone(),
            window: Window::default(),
            expires,
            bytes: 0,
        }
    }

    /// SPI of the SA.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// Shortens the SA's life (an old epoch kept for packets in flight).
    pub fn retire_at(&mut self, at: Instant) {
        self.expires = self.expires.min(at);
    }

    /// When the SA stops opening.
    pub fn expires(&self) -> Instant {
        self.expires
    }

    /// Opens a data datagram (`seq` from [`crate::wire::parse`]) in place and
    /// returns the IP packet inside it. On error the datagram is dropped whole.
    pub fn open<'a>(
        &mut self,
        now: Instant,
        seq: u64,
        datagram: &'a mut [u8],
    ) -> Result<&'a [u8], OpenError> {
        if now >= self.expires {
            return Err(OpenError::Expired);
        }
        self.window.check(seq).map_err(|e| match e {
            Replay::Duplicate | Replay::TooOld => OpenError::Replayed,
        })?;
        if datagram.len() < HEADER_LEN + TAG_LEN {
            return Err(OpenError::Forged);
        }
        let (header, rest) = datagram.split_at_mut(HEADER_LEN);
        let (body, tag) = rest.split_at_mut(rest.len() - GCM_TAG_LEN);
        let tag: &[u8; GCM_TAG_LEN] = (&*tag).try_into().expect("16 bytes");
        self.key
            .gcm
            .open_in_place_detached(&self.key.nonce(seq), header, body, tag)
            .map_err(|_| OpenError::Forged)?;
        self.window.accept(seq);
        let len = ip_len(body)
            .filter(|&l| l <= body.len())
            .ok_or(OpenError::NotIp)?;
        self.bytes += len as u64;
        Ok(&body[..len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ipv4(len: usize, fill: u8) -> Vec<u8> {
        let mut p = vec![fill; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p
    }

    fn pair() -> (EpochKeys, EpochKeys) {
        let k = [0x11u8; 32];
        (
            EpochKeys::derive(&k, 0x1234, [5; 16], "gw-a", "gw-b"),
            EpochKeys::derive(&k, 0x1234, [5; 16], "gw-a", "gw-b"),
        )
    }

    #[test]
    fn both_directions_round_trip_with_and_without_padding() {
        let (a, b) = pair();
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        for (tx_keys, tx_role, rx_keys, rx_role) in [
            (&a, Role::Initiator, &b, Role::Responder),
            (&b, Role::Responder, &a, Role::Initiator),
        ] {
            let mut tx = Outbound::new(tx_keys, tx_role, later);
            let mut rx = Inbound::new(rx_keys, rx_role, later);
            for (len, pad) in [(20usize, 0usize), (84, 0), (100, 256), (1400, 64)] {
                let p = ipv4(len, len as u8);
                let mut wire = Vec::new();
                tx.seal(now, &p, pad, &mut wire).expect("seal");
                if pad > 1 {
                    assert_eq!(wire.len(), HEADER_LEN + len.next_multiple_of(pad) + TAG_LEN);
                }
                let crate::wire::Datagram::Data { spi, seq } =
                    crate::wire::parse(&wire).expect("data")
                else {
                    panic!("not data");
                };
                assert_eq!(spi, 0x1234);
                assert_eq!(rx.open(now, seq, &mut wire).expect("open"), &p[..]);
            }
        }
    }

    #[test]
    fn replayed_forged_expired_and_wrong_direction_packets_are_refused() {
        let (a, b) = pair();
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let mut tx = Outbound::new(&a, Role::Initiator, later);
        let mut rx = Inbound::new(&b, Role::Responder, later);
        let mut wrong_dir = Inbound::new(&b, Role::Initiator, later);
        let p = ipv4(60, 7);
        let mut wire = Vec::new();
        tx.seal(now, &p, 0, &mut wire).expect("seal");
        let copy = wire.clone();
        let mut w = copy.clone();
        assert_eq!(wrong_dir.open(now, 1, &mut w), Err(OpenError::Forged));
        let mut w = copy.clone();
        w[20] ^= 1;
        assert_eq!(rx.open(now, 1, &mut w), Err(OpenError::Forged));
        // A forged packet did not move the window: the real one still opens.
        let mut w = copy.clone();
        rx.open(now, 1, &mut w).expect("authentic");
        let mut w = copy.clone();
        assert_eq!(rx.open(now, 1, &mut w), Err(OpenError::Replayed));
        // Header tampering (SPI/seq are AAD and nonce).
        let mut w = copy.clone();
        w[11] = 2;
        assert_eq!(rx.open(now, 2, &mut w), Err(OpenError::Forged));
        assert_eq!(tx.seal(later, &p, 0, &mut wire), Err(SealError::Expired));
        let mut w = copy;
        assert_eq!(rx.open(later, 3, &mut w), Err(OpenError::Expired));
    }

    #[test]
    fn control_macs_bind_the_epoch() {
        let (a, b) = pair();
        assert!(b.verify_control(1, &a.control_mac(1)));
        assert!(!b.verify_control(2, &a.control_mac(1)));
        let other = EpochKeys::derive(&[0x11; 32], 0x1235, [5; 16], "gw-a", "gw-b");
        assert!(!other.verify_control(1, &a.control_mac(1)));
    }
}
