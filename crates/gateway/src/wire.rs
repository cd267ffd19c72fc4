//! The tunnel's datagrams on the wan (sans-IO, fuzzed).
//!
//! Every datagram is UDP payload. Data packets follow ESP (RFC 4303) in shape:
//!
//! ```text
//! data:     SPI (u32, ≠ 0) ‖ sequence number (u64) ‖ SM4-GCM ciphertext ‖ tag (16)
//!           AAD = the 12 header bytes; nonce = 4-byte salt ‖ sequence number
//! control:  0 (u32) ‖ version = 1 ‖ type ‖ body
//!   offer   (1): SPI (u32) ‖ key ID (16) ‖ HMAC-SM3 (32)   initiator → responder
//!   ack     (2): SPI (u32) ‖ HMAC-SM3 (32)                   responder → initiator
//!   request (3): SPI the sender could not open (u32)          either way, unauthenticated
//! ```
//!
//! SPI 0 marks control messages, as IKE's non-ESP marker does. The sequence
//! number is 64 bits on the wire (ESP sends the low 32 and infers the rest; a
//! tunnel of our own can afford four bytes for not having to). Offers and acks
//! are authenticated with a key derived from the QKD key they name (see
//! [`crate::sa`]); a rekey *request* cannot be (its sender has no key) and is
//! rate-limited by its receiver instead.

/// Bytes of a data packet's header (SPI and sequence number).
pub const HEADER_LEN: usize = 12;
/// Bytes of the SM4-GCM tag.
pub const TAG_LEN: usize = 16;
/// The SPI that marks a control message.
pub const CONTROL_SPI: u32 = 0;
/// Control message format version.
pub const CONTROL_VERSION: u8 = 1;
/// Bytes of a control MAC (HMAC-SM3).
pub const MAC_LEN: usize = 32;

/// A datagram that is not a packet of this tunnel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than any packet.
    #[error("datagram too short ({0} bytes)")]
    Short(usize),
    /// A control message of another version.
    #[error("control message version {0} (this gateway speaks 1)")]
    Version(u8),
    /// An unknown control type.
    #[error("unknown control message type {0}")]
    Type(u8),
    /// A control message of the wrong length for its type.
    #[error("control message type {kind} of {len} bytes")]
    Length {
        /// Control type.
        kind: u8,
        /// Its length.
        len: usize,
    },
    /// SPI 0 is reserved for control messages.
    #[error("data packet with SPI 0")]
    ZeroSpi,
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// The initiator installed a new SA under `spi`, keyed from the QKD key
    /// `key_id` (which the responder fetches by ID from its own KME).
    Offer {
        /// SPI of the new SA (both directions).
        spi: u32,
        /// ETSI 014 key ID.
        key_id: [u8; 16],
        /// HMAC-SM3 under the new SA's control key over type, SPI and key ID.
        mac: [u8; MAC_LEN],
    },
    /// The responder installed `spi` and sends under it.
    Ack {
        /// SPI of the new SA.
        spi: u32,
        /// HMAC-SM3 under the new SA's control key.
        mac: [u8; MAC_LEN],
    },
    /// The sender got data under an SPI it has no key for (it restarted, or
    /// missed a rekey): asks the initiator for a new SA.
    Request {
        /// The SPI it could not open (0 if none).
        spi: u32,
    },
}

impl Control {
    fn kind(&self) -> u8 {
        match self {
            Self::Offer { .. } => 1,
            Self::Ack { .. } => 2,
            Self::Request { .. } => 3,
        }
    }

    /// The bytes an offer's or ack's MAC covers: type, SPI and (offer) key ID.
    pub fn mac_input(kind: u8, spi: u32, key_id: &[u8; 16]) -> [u8; 21] {
        let mut m = [0u8; 21];
        m[0] = kind;
        m[1..5].copy_from_slice(&spi.to_be_bytes());
        m[5..].copy_from_slice(key_id);
        m
    }

    /// Encodes the whole datagram.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + 4 + 16 + MAC_LEN);
        out.extend_from_slice(&CONTROL_SPI.to_be_bytes());
        out.push(CONTROL_VERSION);
        out.push(self.kind());
        match self {
            Self::Offer { spi, key_id, mac } => {
                out.extend_from_slice(&spi.to_be_bytes());
                out.extend_from_slice(key_id);
                out.extend_from_slice(mac);
            }
            Self::Ack { spi, mac } => {
                out.extend_from_slice(&spi.to_be_bytes());
                out.extend_from_slice(mac);
            }
            Self::Request { spi } => out.extend_from_slice(&spi.to_be_bytes()),
        }
        out
    }

    fn parse(body: &[u8]) -> Result<Self, WireError> {
        let [version, kind, rest @ ..] = body else {
            return Err(WireError::Short(body.len() + 4));
        };
        if *version != CONTROL_VERSION {
            return Err(WireError::Version(*version));
        }
        let bad = || WireError::Length {
            kind: *kind,
            len: body.len() + 4,
        };
        let spi = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        match kind {
            1 => {
                if rest.len() != 4 + 16 + MAC_LEN {
                    return Err(bad());
                }
                Ok(Self::Offer {
                    spi: spi(rest),
                    key_id: rest[4..20].try_into().map_err(|_| bad())?,
                    mac: rest[20..].try_into().map_err(|_| bad())?,
                })
            }
            2 => {
                if rest.len() != 4 + MAC_LEN {
                    return Err(bad());
                }
                Ok(Self::Ack {
                    spi: spi(rest),
                    mac: rest[4..].try_into().map_err(|_| bad())?,
                })
            }
            3 => {
                if rest.len() != 4 {
                    return Err(bad());
                }
                Ok(Self::Request { spi: spi(rest) })
            }
            k => Err(WireError::Type(*k)),
        }
    }
}

/// A parsed datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Datagram {
    /// A data packet: header fields; the sealed part is `datagram[HEADER_LEN..]`.
    Data {
        /// Security parameter index.
        spi: u32,
        /// Sequence number.
        seq: u64,
    },
    /// A control message.
    Control(Control),
}

/// Classifies a datagram received on the wan.
pub fn parse(datagram: &[u8]) -> Result<Datagram, WireError> {
    if datagram.len() < 4 {
        return Err(WireError::Short(datagram.len()));
    }
    let spi = u32::from_be_bytes([datagram[0], datagram[1], datagram[2], datagram[3]]);
    if spi == CONTROL_SPI {
        return Control::parse(&datagram[4..]).map(Datagram::Control);
    }
    if datagram.len() < HEADER_LEN + TAG_LEN {
        return Err(WireError::Short(datagram.len()));
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&datagram[4..12]);
    Ok(Datagram::Data {
        spi,
        seq: u64::from_be_bytes(seq),
    })
}

/// The length an IP packet says it has (IPv4 total length, IPv6 40 + payload
/// length), so padding after it can be cut off. `None` if `packet` is not IP.
pub fn ip_len(packet: &[u8]) -> Option<usize> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => Some(usize::from(u16::from_be_bytes([packet[2], packet[3]]))),
        6 if packet.len() >= 40 => {
            Some(40 + usize::from(u16::from_be_bytes([packet[4], packet[5]])))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip() {
        for c in [
            Control::Offer {
                spi: 7,
                key_id: [3; 16],
                mac: [9; 32],
            },
            Control::Ack {
                spi: u32::MAX,
                mac: [1; 32],
            },
            Control::Request { spi: 0 },
        ] {
            let bytes = c.encode();
            assert_eq!(parse(&bytes), Ok(Datagram::Control(c.clone())));
            // Every truncation and every extension is refused, never misread.
            for n in 0..bytes.len() {
                assert!(parse(&bytes[..n]).is_err(), "{c:?} cut to {n}");
            }
            let mut long = bytes.clone();
            long.push(0);
            assert!(parse(&long).is_err());
        }
    }

    #[test]
    fn data_header_and_short_packets() {
        let mut d = vec![0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 1, 2];
        assert_eq!(parse(&d), Err(WireError::Short(12)));
        d.extend_from_slice(&[0; 16]);
        assert_eq!(parse(&d), Ok(Datagram::Data { spi: 5, seq: 258 }));
        assert_eq!(parse(&[0, 0, 0, 0, 2, 1]), Err(WireError::Version(2)));
        assert_eq!(parse(&[0, 0, 0, 0, 1, 9]), Err(WireError::Type(9)));
    }

    #[test]
    fn ip_lengths() {
        let mut v4 = vec![0u8; 28];
        v4[0] = 0x45;
        v4[3] = 28;
        assert_eq!(ip_len(&v4), Some(28));
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        v6[5] = 8;
        assert_eq!(ip_len(&v6), Some(48));
        assert_eq!(ip_len(&[0x45; 10]), None);
        assert_eq!(ip_len(&[]), None);
        assert_eq!(ip_len(&[0x10; 60]), None);
    }
}
