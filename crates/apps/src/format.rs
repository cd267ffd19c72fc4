//! The header of a sealed file: encoding and a bounded, pure parser.
//!
//! The header is everything the recipient needs *before* it has a key: who sealed
//! the file for whom, which QKD keys to ask its KME for, and how the body is cut
//! into segments and chunks. It cannot be authenticated before the keys are known,
//! so the parser trusts nothing: every field is range-checked, the number of key
//! IDs must be exactly the number the declared length needs, and nothing is
//! allocated beyond what the checked fields allow. Once the keys are in hand the
//! header *is* authenticated: its SM3 digest is in the AAD of every chunk and in
//! the key derivation context (QKD and hybrid modes), or under the HMAC tag (OTP).
//! The layout (all integers big-endian):
//!
//! | field | size | |
//! |---|---|---|
//! | magic | 8 | `QKDNSEAL` |
//! | version | 1 | 1 |
//! | mode | 1 | 1 = qkd, 2 = hybrid, 3 = otp |
//! | sender SAE ID | 1 + n | length, then the ID (1..=64 bytes, `A-Z a-z 0-9 . _ -`) |
//! | recipient SAE ID | 1 + n | likewise |
//! | key size | 2 | bits per QKD key (multiple of 8, 128..=8192) |
//! | plaintext length | 8 | bytes |
//! | chunk size | 4 | plaintext bytes per chunk (1..=16 MiB; 0 in OTP mode) |
//! | rekey interval | 8 | plaintext bytes per QKD key, a multiple of the chunk size (0 in OTP mode) |
//! | nonce prefix | 7 | random per file (zero in OTP mode) |
//! | key count | 4 | number of key IDs |
//! | key IDs | 16 each | UUIDs, in order of use |
//! | ML-KEM encapsulation key | 1184 | hybrid mode only: the recipient's ML-KEM-768 key |
//! | ML-KEM ciphertext | 1088 | hybrid mode only |

use std::io::Read;

use qkdnet_crypto::chunked::{NONCE_PREFIX_LEN, NoncePrefix};
use qkdnet_crypto::hybrid::{MLKEM768_CT_LEN, MLKEM768_EK_LEN};
use qkdnet_etsi::ids::SaeId;
use serde::Serialize;
use uuid::Uuid;

use crate::error::AppError;

/// First bytes of every sealed file.
pub const MAGIC: [u8; 8] = *b"QKDNSEAL";
/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
/// Largest chunk (bounds the memory of sealing and opening).
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Largest rekey interval (1 TiB).
pub const MAX_REKEY_BYTES: u64 = 1 << 40;
/// Most QKD keys one file may use (bounds the header to 16 MiB of key IDs).
pub const MAX_KEYS: u64 = 1 << 20;
/// Longest message in OTP mode.
pub const OTP_MAX_BYTES: u64 = 64 << 10;
/// Bytes of key material for the OTP mode's HMAC-SM3 key.
pub const OTP_MAC_KEY_LEN: u64 = 32;
/// Smallest and largest QKD key size in bits.
pub const KEY_BITS_RANGE: core::ops::RangeInclusive<u16> = 128..=8192;

/// How the body is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// SM4-GCM chunks, one SM4 key per rekey interval derived from one QKD key.
    Qkd,
    /// As `Qkd`, each SM4 key derived from a QKD key *and* an ML-KEM-768 shared secret.
    Hybrid,
    /// One-time pad with an HMAC-SM3 tag, all from QKD key material (short messages).
    Otp,
}

impl Mode {
    fn code(self) -> u8 {
        match self {
            Mode::Qkd => 1,
            Mode::Hybrid => 2,
            Mode::Otp => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(Mode::Qkd),
            2 => Some(Mode::Hybrid),
            3 => Some(Mode::Otp),
            _ => None,
        }
    }
}

impl core::fmt::Display for Mode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Mode::Qkd => "qkd",
            Mode::Hybrid => "hybrid",
            Mode::Otp => "otp",
        })
    }
}

impl core::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "qkd" => Ok(Mode::Qkd),
            "hybrid" => Ok(Mode::Hybrid),
            "otp" => Ok(Mode::Otp),
            _ => Err(format!("unknown mode {s:?} (qkd, hybrid or otp)")),
        }
    }
}

/// The public ML-KEM transcript of a hybrid file.
#[derive(Clone, PartialEq, Eq)]
pub struct MlKemFields {
    /// The recipient's ML-KEM-768 encapsulation key.
    pub encapsulation_key: Box<[u8; MLKEM768_EK_LEN]>,
    /// The ciphertext for it.
    pub ciphertext: Box<[u8; MLKEM768_CT_LEN]>,
}

impl core::fmt::Debug for MlKemFields {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("MlKemFields { .. }")
    }
}

/// A parsed, range-checked header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Protection mode.
    pub mode: Mode,
    /// The sealing SAE (master of the QKD keys).
    pub sender: SaeId,
    /// The SAE the file is sealed for (slave of the QKD keys).
    pub recipient: SaeId,
    /// Bits per QKD key.
    pub key_bits: u16,
    /// Plaintext length in bytes.
    pub plaintext_len: u64,
    /// Plaintext bytes per chunk (0 in OTP mode).
    pub chunk_size: u32,
    /// Plaintext bytes per QKD key (0 in OTP mode).
    pub rekey_bytes: u64,
    /// Nonce prefix of the chunk streams (zero in OTP mode).
    pub nonce_prefix: NoncePrefix,
    /// QKD key IDs, in order of use.
    pub key_ids: Vec<Uuid>,
    /// Hybrid mode only.
    pub mlkem: Option<MlKemFields>,
}

/// How a body is laid out, computed from the header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// QKD keys needed.
    pub keys: u64,
    /// Segments (one per QKD key) in QKD and hybrid modes; 0 in OTP mode.
    pub segments: u64,
}

fn bad(m: impl Into<String>) -> AppError {
    AppError::Format(m.into())
}

impl Header {
    /// Checks the fields against each other and the limits, and computes the
    /// layout. The parser calls this before reading the key IDs; [`Header::encode`]
    /// callers should too.
    pub fn layout(&self) -> Result<Layout, AppError> {
        Self::plan(
            self.mode,
            self.key_bits,
            self.plaintext_len,
            self.chunk_size,
            self.rekey_bytes,
        )
    }

    /// The layout of a file with these parameters, or why they are invalid.
    pub fn plan(
        mode: Mode,
        key_bits: u16,
        plaintext_len: u64,
        chunk_size: u32,
        rekey_bytes: u64,
    ) -> Result<Layout, AppError> {
        if !KEY_BITS_RANGE.contains(&key_bits) || !key_bits.is_multiple_of(8) {
            return Err(bad(format!(
                "key size {key_bits} bits is not a multiple of 8 in 128..=8192"
            )));
        }
        let key_bytes = u64::from(key_bits / 8);
        match mode {
            Mode::Otp => {
                if chunk_size != 0 || rekey_bytes != 0 {
                    return Err(bad("OTP mode has no chunks"));
                }
                if plaintext_len > OTP_MAX_BYTES {
                    return Err(bad(format!(
                        "OTP mode is for messages up to {OTP_MAX_BYTES} bytes, not {plaintext_len}"
                    )));
                }
                let keys = (plaintext_len + OTP_MAC_KEY_LEN).div_ceil(key_bytes);
                Ok(Layout { keys, segments: 0 })
            }
            Mode::Qkd | Mode::Hybrid => {
                if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
                    return Err(bad(format!(
                        "chunk size {chunk_size} is not in 1..={MAX_CHUNK_SIZE}"
                    )));
                }
                if rekey_bytes < u64::from(chunk_size)
                    || rekey_bytes > MAX_REKEY_BYTES
                    || !rekey_bytes.is_multiple_of(u64::from(chunk_size))
                {
                    return Err(bad(format!(
                        "rekey interval {rekey_bytes} is not a multiple of the chunk size \
                         {chunk_size} up to {MAX_REKEY_BYTES}"
                    )));
                }
                let segments = plaintext_len.div_ceil(rekey_bytes).max(1);
                if segments > MAX_KEYS {
                    return Err(bad(format!(
                        "{plaintext_len} bytes need {segments} keys at this rekey interval \
                         (at most {MAX_KEYS}); use a larger rekey interval"
                    )));
                }
                Ok(Layout {
                    keys: segments,
                    segments,
                })
            }
        }
    }

    /// Plaintext bytes of segment `s` (QKD and hybrid modes).
    pub fn segment_len(&self, s: u64) -> u64 {
        let start = s.saturating_mul(self.rekey_bytes);
        self.plaintext_len
            .saturating_sub(start)
            .min(self.rekey_bytes)
    }

    /// The encoded header.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64 + 16 * self.key_ids.len());
        v.extend_from_slice(&MAGIC);
        v.push(VERSION);
        v.push(self.mode.code());
        for id in [&self.sender, &self.recipient] {
            // SaeId is at most 64 bytes (ids::MAX_ID_LEN), so the length fits a byte.
            v.push(id.as_str().len() as u8);
            v.extend_from_slice(id.as_str().as_bytes());
        }
        v.extend_from_slice(&self.key_bits.to_be_bytes());
        v.extend_from_slice(&self.plaintext_len.to_be_bytes());
        v.extend_from_slice(&self.chunk_size.to_be_bytes());
        v.extend_from_slice(&self.rekey_bytes.to_be_bytes());
        v.extend_from_slice(&self.nonce_prefix);
        // At most MAX_KEYS (checked by `layout`), so the count fits 32 bits.
        v.extend_from_slice(&(self.key_ids.len() as u32).to_be_bytes());
        for id in &self.key_ids {
            v.extend_from_slice(id.as_bytes());
        }
        if let Some(m) = &self.mlkem {
            v.extend_from_slice(&m.encapsulation_key[..]);
            v.extend_from_slice(&m.ciphertext[..]);
        }
        v
    }

    /// Reads a header from `r`, returning it and its exact encoded bytes (which
    /// the caller authenticates once it has the keys).
    pub fn read(r: &mut impl Read) -> Result<(Header, Vec<u8>), AppError> {
        let mut rec = Recorder { r, raw: Vec::new() };
        let magic: [u8; 8] = rec.array()?;
        if magic != MAGIC {
            return Err(bad("not a qkdnet sealed file (bad magic)"));
        }
        let [version] = rec.array()?;
        if version != VERSION {
            return Err(bad(format!(
                "sealed file version {version} is not supported (this build reads version {VERSION})"
            )));
        }
        let [mode] = rec.array()?;
        let mode = Mode::from_code(mode).ok_or_else(|| bad(format!("unknown mode {mode}")))?;
        let sender = rec.sae_id("sender")?;
        let recipient = rec.sae_id("recipient")?;
        let key_bits = u16::from_be_bytes(rec.array()?);
        let plaintext_len = u64::from_be_bytes(rec.array()?);
        let chunk_size = u32::from_be_bytes(rec.array()?);
        let rekey_bytes = u64::from_be_bytes(rec.array()?);
        let nonce_prefix: [u8; NONCE_PREFIX_LEN] = rec.array()?;
        let count = u64::from(u32::from_be_bytes(rec.array()?));
        let layout = Self::plan(mode, key_bits, plaintext_len, chunk_size, rekey_bytes)?;
        if count != layout.keys {
            return Err(bad(format!(
                "header lists {count} key IDs where {} are needed",
                layout.keys
            )));
        }
        let mut key_ids = Vec::with_capacity(layout.keys as usize); // <= MAX_KEYS
        for _ in 0..count {
            key_ids.push(Uuid::from_bytes(rec.array()?));
        }
        let mlkem = match mode {
            Mode::Hybrid => Some(MlKemFields {
                encapsulation_key: Box::new(rec.array()?),
                ciphertext: Box::new(rec.array()?),
            }),
            _ => None,
        };
        let h = Header {
            mode,
            sender,
            recipient,
            key_bits,
            plaintext_len,
            chunk_size,
            rekey_bytes,
            nonce_prefix,
            key_ids,
            mlkem,
        };
        Ok((h, rec.raw))
    }
}

/// Reads exactly, keeping a copy of every byte read.
struct Recorder<'a, R: Read> {
    r: &'a mut R,
    raw: Vec<u8>,
}

impl<R: Read> Recorder<'_, R> {
    fn array<const N: usize>(&mut self) -> Result<[u8; N], AppError> {
        let mut a = [0u8; N];
        self.r.read_exact(&mut a).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bad("sealed file ends inside its header")
            } else {
                AppError::Io {
                    what: "reading the sealed header".into(),
                    source: e,
                }
            }
        })?;
        self.raw.extend_from_slice(&a);
        Ok(a)
    }

    fn sae_id(&mut self, what: &str) -> Result<SaeId, AppError> {
        let [len] = self.array()?;
        let mut buf = [0u8; 255];
        let buf = &mut buf[..usize::from(len)];
        for b in buf.iter_mut() {
            let [x] = self.array()?;
            *b = x;
        }
        core::str::from_utf8(buf)
            .ok()
            .and_then(|s| SaeId::new(s).ok())
            .ok_or_else(|| bad(format!("{what} SAE ID in the header is invalid")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(mode: Mode) -> Header {
        let otp = mode == Mode::Otp;
        let mut h = Header {
            mode,
            sender: SaeId::new("alice").expect("valid"),
            recipient: SaeId::new("bob").expect("valid"),
            key_bits: 256,
            plaintext_len: 5000,
            chunk_size: if otp { 0 } else { 1024 },
            rekey_bytes: if otp { 0 } else { 2048 },
            nonce_prefix: if otp { [0; 7] } else { [9; 7] },
            key_ids: Vec::new(),
            mlkem: None,
        };
        let n = h.layout().expect("valid").keys;
        h.key_ids = (0..n).map(|i| Uuid::from_u128(u128::from(i) + 1)).collect();
        if mode == Mode::Hybrid {
            h.mlkem = Some(MlKemFields {
                encapsulation_key: Box::new([1; MLKEM768_EK_LEN]),
                ciphertext: Box::new([2; MLKEM768_CT_LEN]),
            });
        }
        h
    }

    #[test]
    fn round_trips_and_records_the_bytes() {
        for mode in [Mode::Qkd, Mode::Hybrid, Mode::Otp] {
            let h = sample(mode);
            let enc = h.encode();
            let (back, raw) = Header::read(&mut enc.as_slice()).expect("parses");
            assert_eq!(back, h);
            assert_eq!(raw, enc);
        }
        assert_eq!(sample(Mode::Qkd).key_ids.len(), 3); // 5000 bytes / 2048
        assert_eq!(sample(Mode::Otp).key_ids.len(), 158); // (5000 + 32) / 32
    }

    #[test]
    fn every_truncation_and_bad_field_is_an_error() {
        let enc = sample(Mode::Hybrid).encode();
        for n in 0..enc.len() {
            assert!(Header::read(&mut &enc[..n]).is_err(), "prefix {n}");
        }
        let h = sample(Mode::Qkd);
        for f in [
            |h: &mut Header| h.key_bits = 100,
            |h: &mut Header| h.chunk_size = 0,
            |h: &mut Header| h.chunk_size = MAX_CHUNK_SIZE + 1,
            |h: &mut Header| h.rekey_bytes = 1000,
            |h: &mut Header| h.plaintext_len = 1 << 50,
            |h: &mut Header| h.key_ids.push(Uuid::nil()),
        ] {
            let mut m = h.clone();
            f(&mut m);
            assert!(Header::read(&mut m.encode().as_slice()).is_err(), "{m:?}");
        }
        let mut enc = h.encode();
        enc[0] ^= 1;
        assert!(Header::read(&mut enc.as_slice()).is_err());
    }

    #[test]
    fn segments_cover_the_plaintext() {
        let h = sample(Mode::Qkd);
        let l = h.layout().expect("valid");
        let total: u64 = (0..l.segments).map(|s| h.segment_len(s)).sum();
        assert_eq!(total, h.plaintext_len);
        assert_eq!(h.segment_len(2), 5000 - 4096);
        let mut empty = h.clone();
        empty.plaintext_len = 0;
        assert_eq!(empty.layout().expect("valid").segments, 1);
    }
}
