//! `sm4` rekeying during a call: the in-band messages by which two edges move
//! to a new session key from the key service; sans-IO.
//!
//! Every `--rekey-seconds` the caller's edge opens a new session at the key
//! service naming the same callee (two more medium keys) and sends an
//! [`Kind::Offer`] for epoch `e` on the media path, naming the new session;
//! the callee's edge joins it (its own medium keys; the service checks that
//! the other party is still the caller), starts *receiving* under both keys,
//! switches its *sending* to the new key and answers with an [`Kind::Ack`].
//! The caller's edge already receives under both keys from the moment it
//! opened the session, and switches its sending when the ack arrives. So a
//! packet is never sent under a key the far edge does not hold yet
//! (make-before-break), and nothing is lost at the switch. The offer repeats
//! until acknowledged (UDP loses datagrams); a repeated offer is answered
//! again.
//!
//! ```text
//! "QKDR" ‖ version 1 ‖ kind (1 offer, 2 ack) ‖ epoch (4) ‖ session ID (16) ‖ tag (32)
//! tag = HMAC-SM3(K_ctl, everything before it)
//! K_ctl = HKDF-SM3(key, "qkdnet call sm4 rekey v1", direction)
//! ```
//!
//! An offer for epoch `e` is authenticated under the key of epoch `e − 1`
//! (which both edges hold), caller→callee; an ack under the new key of epoch
//! `e`, callee→caller, so it also proves the callee got that key. A session
//! ID is not secret; the keys never travel here.

use qkdnet_media::Key256;
use qkdnet_media::proto::SESSION_ID_LEN;

use crate::media::{ControlMac, Direction};

/// Magic of a rekey message (its first byte, 0x51, is not RTP version 2).
pub const MAGIC: [u8; 4] = *b"QKDR";
const VERSION: u8 = 1;
const TAG: usize = 32;
/// Length of every rekey message.
pub const LEN: usize = 4 + 1 + 1 + 4 + SESSION_ID_LEN + TAG;

/// Is this datagram a rekey message?
pub fn is_control(p: &[u8]) -> bool {
    p.starts_with(&MAGIC)
}

/// Which message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Caller → callee: move to the key of this session.
    Offer,
    /// Callee → caller: joined; sending under the new key now.
    Ack,
}

/// A rekey message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    /// Offer or ack.
    pub kind: Kind,
    /// The epoch it moves to (the call starts at 0).
    pub epoch: u32,
    /// The key-service session of that epoch.
    pub session: [u8; SESSION_ID_LEN],
}

/// Why a rekey message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// Wrong length, magic, version or kind.
    #[error("malformed rekey message")]
    Malformed,
    /// The tag does not verify under this key.
    #[error("rekey message failed authentication")]
    Auth,
}

/// The key that authenticates rekey messages of one direction under one
/// session key.
pub struct ControlKey(ControlMac);

impl std::fmt::Debug for ControlKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlKey(..)")
    }
}

impl ControlKey {
    /// Derives it (HKDF-SM3).
    pub fn derive(key: &Key256, dir: Direction) -> Self {
        Self(ControlMac::derive(key, b"qkdnet call sm4 rekey v1", dir))
    }

    /// Encodes `c`.
    pub fn encode(&self, c: &Control) -> Vec<u8> {
        let mut out = Vec::with_capacity(LEN);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(match c.kind {
            Kind::Offer => 1,
            Kind::Ack => 2,
        });
        out.extend_from_slice(&c.epoch.to_be_bytes());
        out.extend_from_slice(&c.session);
        let t = self.0.tag(&out);
        out.extend_from_slice(&t);
        out
    }

    /// Decodes and checks a message.
    pub fn decode(&self, p: &[u8]) -> Result<Control, ControlError> {
        if p.len() != LEN || !is_control(p) || p[4] != VERSION {
            return Err(ControlError::Malformed);
        }
        let kind = match p[5] {
            1 => Kind::Offer,
            2 => Kind::Ack,
            _ => return Err(ControlError::Malformed),
        };
        let (body, tag) = p.split_at(LEN - TAG);
        if !self.0.verify(body, tag) {
            return Err(ControlError::Auth);
        }
        let mut session = [0u8; SESSION_ID_LEN];
        session.copy_from_slice(&p[10..10 + SESSION_ID_LEN]);
        Ok(Control {
            kind,
            epoch: u32::from_be_bytes([p[6], p[7], p[8], p[9]]),
            session,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_only_under_their_key_and_direction() {
        let k0 = Key256::new([1; 32]);
        let k1 = Key256::new([2; 32]);
        let offer = Control {
            kind: Kind::Offer,
            epoch: 1,
            session: [9; SESSION_ID_LEN],
        };
        let b = ControlKey::derive(&k0, Direction::CallerToCallee).encode(&offer);
        assert_eq!(b.len(), LEN);
        assert!(is_control(&b));
        assert_eq!(
            ControlKey::derive(&k0, Direction::CallerToCallee).decode(&b),
            Ok(offer)
        );
        for wrong in [
            ControlKey::derive(&k1, Direction::CallerToCallee),
            ControlKey::derive(&k0, Direction::CalleeToCaller),
        ] {
            assert_eq!(wrong.decode(&b), Err(ControlError::Auth));
        }
        let mut bad = b.clone();
        bad[12] ^= 1;
        assert_eq!(
            ControlKey::derive(&k0, Direction::CallerToCallee).decode(&bad),
            Err(ControlError::Auth)
        );
        assert_eq!(
            ControlKey::derive(&k0, Direction::CallerToCallee).decode(&b[1..]),
            Err(ControlError::Malformed)
        );
    }
}
