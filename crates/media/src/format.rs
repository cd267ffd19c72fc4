//! The file medium's format, version 1: layout, encoding, bounded pure decoders.
//!
//! Everything here works on bytes and does no I/O ([`crate::file`] reads and
//! writes the regions this module describes), so the decoders can be fuzzed and
//! the charging and taking rules tested without a disk.
//!
//! # Why it is shaped this way
//!
//! A medium file is read back from a place an attacker (or a failing card) may have
//! changed, and it holds keys that must be used once. So:
//!
//! - **The PIN unlocks a random medium key, not the keys.** Argon2id (RFC 9106)
//!   stretches the PIN with the header's salt into an SM4 key that unwraps (SM4-GCM)
//!   a random 32-byte *medium key*; the whole header is the wrap's associated data,
//!   so a header changed by anyone without the PIN does not unwrap. A wrong PIN
//!   fails the same way ([`MediaError::WrongPin`]). A PIN change would rewrite the
//!   header only. From the medium key, HKDF-SM3 (salt: the medium ID) derives the
//!   slot key (SM4-GCM) and the MAC key (HMAC-SM3) for the counter and charge log.
//! - **The header also carries an unkeyed SM3 checksum**, checked before the PIN is
//!   tried, so an accidentally damaged header says "corrupt" rather than "wrong PIN".
//! - **One key, one slot, one tag.** Each 256-bit key is sealed alone with SM4-GCM
//!   (48 bytes: ciphertext and tag). The nonce is (charge epoch, key index) and the
//!   associated data binds the medium ID, epoch and index, so a slot moved to another
//!   index, another medium or another charge does not open. Per-slot tags cost 16
//!   bytes a key (130,000 keys: 6.24 MB instead of 4.16 MB) and buy what group MACs
//!   cannot: a used slot is erased (zeroed) on its own, without recomputing anything
//!   over its neighbours, and a damaged slot costs one key, not a group.
//! - **Nonces are never reused.** Every charge attempt first bumps the *epoch* in a
//!   durable counter record; slots written under it use it in their nonce. A charge
//!   that crashes half-way burns its epoch, not its indices: the next charge writes
//!   the same indices under a new epoch.
//! - **Slots form a ring.** Key `i` lives in slot `i mod capacity`; a charge may
//!   only overwrite slots whose keys are used, so a medium can be recharged for ever
//!   and `capacity` bounds the unused keys it holds at once.
//! - **The counter lives in two alternating copies**, each in its own 4 KiB page,
//!   each with a sequence number and an HMAC. State `seq` is written to copy
//!   `seq mod 2`, the other copy is left alone, and opening takes the valid copy
//!   with the higher `seq`. A write torn by a crash fails its MAC, and the other copy
//!   (the state before that write) rules. This costs one 96-byte write and one
//!   `fdatasync` per key taken. Write-temp-fsync-rename was the alternative: it
//!   needs the counter in a second file (rewriting the whole medium per key is out
//!   of the question) that could be paired with an old copy of the key file, and it
//!   costs a rename and a directory sync per key. In-place alternation keeps the
//!   medium one file and the per-key cost one small write.
//! - **The charge log is a ring of MAC'd records**, one per charge (who, when, how
//!   many, first index, epoch). A record is live once the counter record's
//!   `log_end` covers it; a charge writes its record *before* that commit, so a
//!   crashed charge leaves at most a dead record that the next charge overwrites.
//!   The oldest record is dropped only when all its keys are used.
//!
//! What it does **not** protect against: a copy of the whole file restored over the
//! medium (or an old counter page written back) replays keys that were used since
//! the copy was taken. A file cannot know it was rolled back; hardware media (a
//! PKCS#11 token, a SIM) keep the counter where it cannot be rewritten. Erasing each
//! used slot narrows this: an old counter *page* alone restores no key.
//!
//! # Layout
//!
//! All integers big-endian. Offsets in bytes from the start of the file.
//!
//! | region | offset | length | content |
//! |---|---|---|---|
//! | header | 0 | 4096 | see below |
//! | counter copy 0 | 4096 | 96 | state with even `seq`; rest of the page unused |
//! | counter copy 1 | 8192 | 96 | state with odd `seq`; rest of the page unused |
//! | charge log | 12288 | 128 × L | record `n` at `12288 + 128 × (n mod L)` |
//! | key slots | 12288 + 128 L | 48 × C | key `i` at `slots + 48 × (i mod C)`; the file grows as slots are first written |
//!
//! (`C` = capacity, `L` = log capacity, both from the header.)
//!
//! Header:
//!
//! | offset | length | field |
//! |---|---|---|
//! | 0 | 8 | magic `QKDMEDIA` |
//! | 8 | 2 | format version, 1 |
//! | 10 | 2 | reserved, 0 |
//! | 12 | 16 | medium ID (UUID) |
//! | 28 | 4 | capacity `C` (1..=2^24 keys) |
//! | 32 | 4 | log capacity `L` (1..=65536 records) |
//! | 36 | 4 | Argon2id memory, KiB (8·p..=2^20) |
//! | 40 | 4 | Argon2id passes (1..=64) |
//! | 44 | 4 | Argon2id lanes (1..=16) |
//! | 48 | 32 | salt |
//! | 80 | 48 | medium key wrapped: SM4-GCM(Argon2id(PIN, salt), nonce 0, AAD = bytes 0..80 ‖ 128..4064), ciphertext 32 ‖ tag 16 |
//! | 128 | 2 | owner length (1..=256) |
//! | 130 | 256 | owner, UTF-8, zero-padded |
//! | 386 | 3678 | reserved, 0 |
//! | 4064 | 32 | SM3 of bytes 0..4064 |
//!
//! The wrap's nonce is fixed because its key is used once: every header written
//! draws a fresh salt, so Argon2id yields a fresh wrapping key.
//!
//! Counter record (state), 96 bytes:
//!
//! | offset | length | field |
//! |---|---|---|
//! | 0 | 8 | `seq`: sequence number; its parity is the copy it lives in |
//! | 8 | 8 | `next`: index of the next key to hand out |
//! | 16 | 8 | `end`: one past the last key charged |
//! | 24 | 4 | `epoch`: charge attempts begun |
//! | 28 | 4 | `log_start`: number of the oldest live charge record |
//! | 32 | 4 | `log_end`: one past the newest live charge record |
//! | 36 | 28 | reserved, 0 |
//! | 64 | 32 | HMAC-SM3(MAC key, `qkdnet/media/v1/state` ‖ medium ID ‖ bytes 0..64) |
//!
//! Charge record, 128 bytes:
//!
//! | offset | length | field |
//! |---|---|---|
//! | 0 | 4 | record number |
//! | 4 | 4 | epoch the charge's slots were sealed under |
//! | 8 | 8 | index of the first key |
//! | 16 | 4 | number of keys (≥ 1) |
//! | 20 | 8 | charged at, seconds since the Unix epoch |
//! | 28 | 1 | charger SAE ID length (1..=64) |
//! | 29 | 64 | charger SAE ID, UTF-8, zero-padded |
//! | 93 | 3 | reserved, 0 |
//! | 96 | 32 | HMAC-SM3(MAC key, `qkdnet/media/v1/record` ‖ medium ID ‖ bytes 0..96) |
//!
//! Key slot, 48 bytes: SM4-GCM(slot key, nonce = epoch (4) ‖ index (8),
//! AAD = `qkdnet/media/v1/slot` ‖ medium ID ‖ epoch ‖ index), ciphertext 32 ‖
//! tag 16. A used slot is all zeros.
//!
//! Keys: `MK` = the unwrapped medium key; `PRK = HKDF-SM3-Extract(medium ID, MK)`;
//! slot key = Expand(`PRK`, `qkdnet/media/v1/slot-key`, 16); MAC key =
//! Expand(`PRK`, `qkdnet/media/v1/mac-key`, 32).

use qkdnet_crypto::gcm::{GCM_TAG_LEN, Sm4Gcm};
use qkdnet_crypto::kdf::{hkdf_sm3_expand, hkdf_sm3_extract};
use qkdnet_crypto::secret::{SecretBytes, Sm4Key};
use qkdnet_crypto::sm3::{HmacSm3, sm3};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::{MediaError, Result};
use crate::medium::{
    ChargeEntry, ChargeRecord, KEY_LEN, Key256, MAX_CHARGER_LEN, MAX_OWNER_LEN, check_charge,
    check_text,
};

/// First bytes of every medium file.
pub const MAGIC: [u8; 8] = *b"QKDMEDIA";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// The page size regions are aligned to.
pub const PAGE_LEN: u64 = 4096;
/// Length of the header.
pub const HEADER_LEN: usize = 4096;
/// Length of one copy of the counter record.
pub const STATE_LEN: usize = 96;
/// Offsets of the two copies of the counter record.
pub const STATE_OFFSETS: [u64; 2] = [PAGE_LEN, 2 * PAGE_LEN];
/// Offset of the charge log.
pub const LOG_OFFSET: u64 = 3 * PAGE_LEN;
/// Length of one charge record.
pub const RECORD_LEN: usize = 128;
/// Length of one key slot.
pub const SLOT_LEN: usize = KEY_LEN + GCM_TAG_LEN;
/// Length of the header's salt.
pub const SALT_LEN: usize = 32;
/// Largest capacity (unused keys held at once).
pub const MAX_CAPACITY: u64 = 1 << 24;
/// Largest charge log.
pub const MAX_LOG_RECORDS: u32 = 1 << 16;

const H_VERSION: usize = 8;
const H_RESERVED: usize = 10;
const H_ID: usize = 12;
const H_CAPACITY: usize = 28;
const H_LOG: usize = 32;
const H_M: usize = 36;
const H_T: usize = 40;
const H_P: usize = 44;
const H_SALT: usize = 48;
const H_WRAPPED: usize = 80;
const WRAPPED_LEN: usize = KEY_LEN + GCM_TAG_LEN;
const H_OWNER_LEN: usize = 128;
const H_OWNER: usize = 130;
const H_TAIL: usize = H_OWNER + MAX_OWNER_LEN;
const H_CHECKSUM: usize = HEADER_LEN - 32;

const S_MAC: usize = 64;
const R_CHARGER_LEN: usize = 28;
const R_CHARGER: usize = 29;
const R_MAC: usize = 96;

const LABEL_STATE: &[u8] = b"qkdnet/media/v1/state";
const LABEL_RECORD: &[u8] = b"qkdnet/media/v1/record";
const LABEL_SLOT: &[u8] = b"qkdnet/media/v1/slot";
const LABEL_SLOT_KEY: &[u8] = b"qkdnet/media/v1/slot-key";
const LABEL_MAC_KEY: &[u8] = b"qkdnet/media/v1/mac-key";

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Argon2id cost parameters for stretching the PIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    m_kib: u32,
    t: u32,
    p: u32,
}

impl KdfParams {
    /// Largest memory cost accepted (1 GiB): bounds what opening a file can allocate.
    pub const MAX_M_KIB: u32 = 1 << 20;
    /// Most passes accepted.
    pub const MAX_T: u32 = 64;
    /// Most lanes accepted.
    pub const MAX_P: u32 = 16;
    /// RFC 9106 § 4, second recommended option: 64 MiB, 3 passes, one lane.
    pub const RECOMMENDED: Self = Self {
        m_kib: 64 * 1024,
        t: 3,
        p: 1,
    };
    /// The cheapest parameters Argon2id allows (8 KiB, one pass). They give the PIN
    /// no protection against guessing: for tests and fuzzing only.
    pub const MINIMAL: Self = Self {
        m_kib: 8,
        t: 1,
        p: 1,
    };

    /// Parameters: memory in KiB (at least 8 per lane, at most [`Self::MAX_M_KIB`]),
    /// passes (1..=[`Self::MAX_T`]) and lanes (1..=[`Self::MAX_P`]).
    pub fn new(m_kib: u32, t: u32, p: u32) -> Result<Self> {
        if p == 0 || p > Self::MAX_P {
            return Err(MediaError::InvalidKdfParams("lanes must be 1..=16"));
        }
        if t == 0 || t > Self::MAX_T {
            return Err(MediaError::InvalidKdfParams("passes must be 1..=64"));
        }
        if m_kib < 8 * p || m_kib > Self::MAX_M_KIB {
            return Err(MediaError::InvalidKdfParams(
                "memory must be at least 8 KiB per lane and at most 1 GiB",
            ));
        }
        Ok(Self { m_kib, t, p })
    }

    /// Memory cost in KiB.
    pub fn memory_kib(&self) -> u32 {
        self.m_kib
    }

    /// Number of passes.
    pub fn passes(&self) -> u32 {
        self.t
    }

    /// Number of lanes.
    pub fn lanes(&self) -> u32 {
        self.p
    }

    /// Argon2id(PIN, salt) → the 16-byte key that wraps the medium key.
    fn stretch(&self, pin: &SecretBytes, salt: &[u8; SALT_LEN]) -> Result<Sm4Key> {
        if pin.is_empty() {
            return Err(MediaError::EmptyPin);
        }
        let params = argon2::Params::new(self.m_kib, self.t, self.p, Some(16))
            .map_err(|_| MediaError::InvalidKdfParams("rejected by Argon2"))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = Zeroizing::new([0u8; 16]);
        argon
            .hash_password_into(pin.expose_secret(), salt, &mut out[..])
            .map_err(|_| MediaError::InvalidKdfParams("Argon2 failed (out of memory?)"))?;
        Sm4Key::from_slice(&out[..]).map_err(|_| MediaError::InvalidKdfParams("output length"))
    }
}

impl Default for KdfParams {
    fn default() -> Self {
        Self::RECOMMENDED
    }
}

/// The keys a medium's content is protected with, derived from its medium key.
pub struct MediumKeys {
    slot: Sm4Gcm,
    mac: Zeroizing<[u8; 32]>,
}

impl core::fmt::Debug for MediumKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("MediumKeys { .. }")
    }
}

impl MediumKeys {
    fn derive(id: &Uuid, master: &[u8]) -> Self {
        let prk = hkdf_sm3_extract(id.as_bytes(), &[master]);
        let mut k = Zeroizing::new([0u8; 16]);
        let mut mac = Zeroizing::new([0u8; 32]);
        // Both lengths are far below HKDF's limit of 255 blocks.
        hkdf_sm3_expand(&prk, &[LABEL_SLOT_KEY], &mut k[..]).expect("invariant: 16 bytes");
        hkdf_sm3_expand(&prk, &[LABEL_MAC_KEY], &mut mac[..]).expect("invariant: 32 bytes");
        let key = Sm4Key::from_slice(&k[..]).expect("invariant: 16 bytes");
        Self {
            slot: Sm4Gcm::new(&key),
            mac,
        }
    }

    fn mac(&self, label: &[u8], id: &Uuid, body: &[u8]) -> HmacSm3 {
        let mut m = HmacSm3::new(&self.mac[..]);
        m.update(label);
        m.update(id.as_bytes());
        m.update(body);
        m
    }
}

/// What a new medium is: everything its header records except the secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MediumSpec {
    /// The medium's ID.
    pub id: Uuid,
    /// The owner (e.g. a SIP URI): 1..=256 bytes of UTF-8, no control characters.
    pub owner: String,
    /// Most unused keys the medium holds at once (1..=2^24).
    pub capacity: u64,
    /// Most charges remembered at once (1..=65536).
    pub log_capacity: u32,
    /// How the PIN is stretched.
    pub kdf: KdfParams,
}

impl MediumSpec {
    /// A medium for `owner` with a random ID, room for `capacity` unused keys, a
    /// log of 1024 charges and [`KdfParams::RECOMMENDED`].
    pub fn new(owner: impl Into<String>, capacity: u64) -> Self {
        Self {
            id: Uuid::new_v4(),
            owner: owner.into(),
            capacity,
            log_capacity: 1024,
            kdf: KdfParams::RECOMMENDED,
        }
    }

    /// Checks the owner, capacity and charge-log size.
    pub(crate) fn check(&self) -> Result<()> {
        check_text(&self.owner, MAX_OWNER_LEN).map_err(MediaError::InvalidOwner)?;
        if self.capacity == 0 || self.capacity > MAX_CAPACITY {
            return Err(MediaError::InvalidCapacity {
                got: self.capacity,
                max: MAX_CAPACITY,
            });
        }
        if self.log_capacity == 0 || self.log_capacity > MAX_LOG_RECORDS {
            return Err(MediaError::InvalidLogCapacity {
                got: self.log_capacity.into(),
                max: MAX_LOG_RECORDS.into(),
            });
        }
        Ok(())
    }
}

/// A decoded header: the medium's identity, sizes and PIN parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The medium's ID, owner, sizes and KDF parameters.
    pub spec: MediumSpec,
    salt: [u8; SALT_LEN],
    wrapped: [u8; WRAPPED_LEN],
}

/// The header bytes the key wrap authenticates: all but the wrapped key and the checksum.
fn wrap_aad(page: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(H_CHECKSUM - WRAPPED_LEN);
    aad.extend_from_slice(&page[..H_WRAPPED]);
    aad.extend_from_slice(&page[H_WRAPPED + WRAPPED_LEN..H_CHECKSUM]);
    aad
}

impl Header {
    /// Creates the header of a new medium: `salt` and `master` (the medium key) come
    /// from the caller's randomness. Returns the encoded header page and the keys.
    pub fn create(
        spec: &MediumSpec,
        pin: &SecretBytes,
        salt: [u8; SALT_LEN],
        master: &Key256,
    ) -> Result<(Vec<u8>, Self, MediumKeys)> {
        spec.check()?;
        let wrap_key = spec.kdf.stretch(pin, &salt)?;
        let mut header = Self {
            spec: spec.clone(),
            salt,
            wrapped: [0; WRAPPED_LEN],
        };
        let mut page = header.encode();
        let aad = wrap_aad(&page);
        let mut ct = Zeroizing::new(*master.expose_secret());
        let tag = Sm4Gcm::new(&wrap_key)
            .seal_in_place_detached(&[0; 12], &aad, &mut ct[..])
            .expect("invariant: 32 bytes are far below GCM's limit");
        header.wrapped[..KEY_LEN].copy_from_slice(&ct[..]);
        header.wrapped[KEY_LEN..].copy_from_slice(&tag);
        page = header.encode();
        let keys = MediumKeys::derive(&spec.id, master.expose_secret());
        Ok((page, header, keys))
    }

    /// Encodes the header page (with its checksum).
    pub fn encode(&self) -> Vec<u8> {
        let s = &self.spec;
        let mut p = vec![0u8; HEADER_LEN];
        p[..8].copy_from_slice(&MAGIC);
        p[H_VERSION..H_VERSION + 2].copy_from_slice(&VERSION.to_be_bytes());
        p[H_ID..H_ID + 16].copy_from_slice(s.id.as_bytes());
        // Capacity and log capacity were checked against their maxima (2^24, 2^16).
        let cap = u32::try_from(s.capacity).expect("invariant: capacity <= 2^24");
        p[H_CAPACITY..H_CAPACITY + 4].copy_from_slice(&cap.to_be_bytes());
        p[H_LOG..H_LOG + 4].copy_from_slice(&s.log_capacity.to_be_bytes());
        p[H_M..H_M + 4].copy_from_slice(&s.kdf.m_kib.to_be_bytes());
        p[H_T..H_T + 4].copy_from_slice(&s.kdf.t.to_be_bytes());
        p[H_P..H_P + 4].copy_from_slice(&s.kdf.p.to_be_bytes());
        p[H_SALT..H_SALT + SALT_LEN].copy_from_slice(&self.salt);
        p[H_WRAPPED..H_WRAPPED + WRAPPED_LEN].copy_from_slice(&self.wrapped);
        let owner = s.owner.as_bytes();
        let owner_len = u16::try_from(owner.len()).expect("invariant: owner <= 256 bytes");
        p[H_OWNER_LEN..H_OWNER_LEN + 2].copy_from_slice(&owner_len.to_be_bytes());
        p[H_OWNER..H_OWNER + owner.len()].copy_from_slice(owner);
        let sum = sm3(&p[..H_CHECKSUM]);
        p[H_CHECKSUM..].copy_from_slice(&sum);
        p
    }

    /// Decodes a header page. Checks, in order: magic, version, checksum, then every
    /// field's range. Needs no PIN.
    pub fn decode(page: &[u8]) -> Result<Self> {
        let magic_len = page.len().min(MAGIC.len());
        if page[..magic_len] != MAGIC[..magic_len] {
            return Err(MediaError::NotAMedium);
        }
        if page.len() < HEADER_LEN {
            return Err(MediaError::Truncated {
                what: "the header",
                needed: HEADER_LEN as u64,
                got: page.len() as u64,
            });
        }
        let page = &page[..HEADER_LEN];
        let version = be_u16(page, H_VERSION);
        if version != VERSION {
            return Err(MediaError::UnsupportedVersion(version));
        }
        if sm3(&page[..H_CHECKSUM])[..] != page[H_CHECKSUM..] {
            return Err(MediaError::CorruptHeader("checksum mismatch"));
        }
        if !all_zero(&page[H_RESERVED..H_ID]) || !all_zero(&page[H_TAIL..H_CHECKSUM]) {
            return Err(MediaError::CorruptHeader("reserved bytes are not zero"));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&page[H_ID..H_ID + 16]);
        let capacity = u64::from(be_u32(page, H_CAPACITY));
        let log_capacity = be_u32(page, H_LOG);
        let kdf = KdfParams::new(be_u32(page, H_M), be_u32(page, H_T), be_u32(page, H_P))
            .map_err(|_| MediaError::CorruptHeader("Argon2id parameters out of range"))?;
        let owner_len = usize::from(be_u16(page, H_OWNER_LEN));
        if owner_len == 0 || owner_len > MAX_OWNER_LEN {
            return Err(MediaError::CorruptHeader("owner length out of range"));
        }
        if !all_zero(&page[H_OWNER + owner_len..H_TAIL]) {
            return Err(MediaError::CorruptHeader("owner padding is not zero"));
        }
        let owner = std::str::from_utf8(&page[H_OWNER..H_OWNER + owner_len])
            .map_err(|_| MediaError::CorruptHeader("owner is not UTF-8"))?
            .to_owned();
        let spec = MediumSpec {
            id: Uuid::from_bytes(id),
            owner,
            capacity,
            log_capacity,
            kdf,
        };
        spec.check()
            .map_err(|_| MediaError::CorruptHeader("a field is out of range"))?;
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&page[H_SALT..H_SALT + SALT_LEN]);
        let mut wrapped = [0u8; WRAPPED_LEN];
        wrapped.copy_from_slice(&page[H_WRAPPED..H_WRAPPED + WRAPPED_LEN]);
        Ok(Self {
            spec,
            salt,
            wrapped,
        })
    }

    /// Stretches the PIN (Argon2id, the costly step) and unwraps the medium key.
    pub fn unlock(&self, pin: &SecretBytes) -> Result<MediumKeys> {
        let wrap_key = self.spec.kdf.stretch(pin, &self.salt)?;
        let page = self.encode();
        let aad = wrap_aad(&page);
        let mut master = Zeroizing::new([0u8; KEY_LEN]);
        master.copy_from_slice(&self.wrapped[..KEY_LEN]);
        let mut tag = [0u8; GCM_TAG_LEN];
        tag.copy_from_slice(&self.wrapped[KEY_LEN..]);
        Sm4Gcm::new(&wrap_key)
            .open_in_place_detached(&[0; 12], &aad, &mut master[..], &tag)
            .map_err(|_| MediaError::WrongPin)?;
        Ok(MediumKeys::derive(&self.spec.id, &master[..]))
    }

    /// Where each region of this medium lies.
    pub fn layout(&self) -> Layout {
        Layout {
            capacity: self.spec.capacity,
            log_capacity: self.spec.log_capacity,
        }
    }
}

/// Offsets of a medium's regions (from its header's sizes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    capacity: u64,
    log_capacity: u32,
}

impl Layout {
    /// Offset of charge record `number`.
    pub fn record_offset(&self, number: u32) -> u64 {
        LOG_OFFSET + u64::from(number % self.log_capacity) * RECORD_LEN as u64
    }

    /// Offset of the first key slot (the end of the metadata).
    pub fn slots_offset(&self) -> u64 {
        LOG_OFFSET + u64::from(self.log_capacity) * RECORD_LEN as u64
    }

    /// Offset of the slot of key `index`.
    pub fn slot_offset(&self, index: u64) -> u64 {
        self.slots_offset() + (index % self.capacity) * SLOT_LEN as u64
    }

    /// The shortest file that holds every slot written by charges up to `end`.
    pub fn min_len(&self, end: u64) -> u64 {
        self.slots_offset() + end.min(self.capacity) * SLOT_LEN as u64
    }
}

/// The counter record: what is used, what is charged, which charges are live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Sequence number; the record lives in copy `seq mod 2`.
    pub seq: u64,
    /// Index of the next key to hand out.
    pub next: u64,
    /// One past the last key charged.
    pub end: u64,
    /// Charge attempts begun (the nonce epoch of the latest).
    pub epoch: u32,
    /// Number of the oldest live charge record.
    pub log_start: u32,
    /// One past the newest live charge record.
    pub log_end: u32,
}

impl State {
    /// Which of the two copies this state is written to.
    pub fn copy(&self) -> usize {
        usize::from(self.seq % 2 == 1)
    }

    /// The state to write next, with `seq` advanced.
    pub fn successor(&self) -> Result<Self> {
        Ok(Self {
            seq: self
                .seq
                .checked_add(1)
                .ok_or(MediaError::Inconsistent("counter sequence exhausted"))?,
            ..*self
        })
    }

    /// Encodes the record with its MAC.
    pub fn encode(&self, keys: &MediumKeys, id: &Uuid) -> [u8; STATE_LEN] {
        let mut b = [0u8; STATE_LEN];
        b[..8].copy_from_slice(&self.seq.to_be_bytes());
        b[8..16].copy_from_slice(&self.next.to_be_bytes());
        b[16..24].copy_from_slice(&self.end.to_be_bytes());
        b[24..28].copy_from_slice(&self.epoch.to_be_bytes());
        b[28..32].copy_from_slice(&self.log_start.to_be_bytes());
        b[32..36].copy_from_slice(&self.log_end.to_be_bytes());
        let tag = keys.mac(LABEL_STATE, id, &b[..S_MAC]).finalize();
        b[S_MAC..].copy_from_slice(&tag);
        b
    }

    /// Decodes copy `copy`; `None` if it does not verify (torn, never written, or
    /// damaged) or does not belong in that copy.
    pub fn decode(bytes: &[u8], copy: usize, keys: &MediumKeys, id: &Uuid) -> Option<Self> {
        let b = bytes.get(..STATE_LEN)?;
        keys.mac(LABEL_STATE, id, &b[..S_MAC])
            .verify(&b[S_MAC..])
            .ok()?;
        if !all_zero(&b[36..S_MAC]) {
            return None;
        }
        let s = Self {
            seq: be_u64(b, 0),
            next: be_u64(b, 8),
            end: be_u64(b, 16),
            epoch: be_u32(b, 24),
            log_start: be_u32(b, 28),
            log_end: be_u32(b, 32),
        };
        (s.copy() == copy).then_some(s)
    }

    /// The current state from the two copies: the valid one with the higher `seq`,
    /// checked against the header's sizes.
    pub fn current(copies: [&[u8]; 2], keys: &MediumKeys, header: &Header) -> Result<Self> {
        let id = &header.spec.id;
        let a = Self::decode(copies[0], 0, keys, id);
        let b = Self::decode(copies[1], 1, keys, id);
        let s = match (a, b) {
            (Some(a), Some(b)) => {
                if a.seq > b.seq {
                    a
                } else {
                    b
                }
            }
            (Some(s), None) | (None, Some(s)) => s,
            (None, None) => return Err(MediaError::CorruptState),
        };
        if s.next > s.end {
            return Err(MediaError::Inconsistent("more keys used than charged"));
        }
        if s.end - s.next > header.spec.capacity {
            return Err(MediaError::Inconsistent(
                "more unused keys than the capacity",
            ));
        }
        if s.log_start > s.log_end || s.log_end - s.log_start > header.spec.log_capacity {
            return Err(MediaError::Inconsistent("charge log bounds"));
        }
        Ok(s)
    }
}

/// One charge as recorded in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The record's number (its position in the log ring is `number mod L`).
    pub number: u32,
    /// The epoch the charge's slots were sealed under.
    pub epoch: u32,
    /// Index of the first key.
    pub first: u64,
    /// Number of keys (at least 1).
    pub count: u32,
    /// Who charged and when.
    pub charge: ChargeRecord,
}

impl Record {
    /// One past the charge's last key.
    pub fn end(&self) -> u64 {
        self.first + u64::from(self.count)
    }

    /// The record as status reports it.
    pub fn entry(&self) -> ChargeEntry {
        ChargeEntry {
            record: self.charge.clone(),
            count: self.count.into(),
            first: self.first,
            last: self.end() - 1,
        }
    }

    /// Encodes the record with its MAC.
    pub fn encode(&self, keys: &MediumKeys, id: &Uuid) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[..4].copy_from_slice(&self.number.to_be_bytes());
        b[4..8].copy_from_slice(&self.epoch.to_be_bytes());
        b[8..16].copy_from_slice(&self.first.to_be_bytes());
        b[16..20].copy_from_slice(&self.count.to_be_bytes());
        b[20..28].copy_from_slice(&self.charge.charged_at().to_be_bytes());
        let charger = self.charge.charger().as_bytes();
        // ChargeRecord::new checked 1..=64 bytes.
        b[R_CHARGER_LEN] = u8::try_from(charger.len()).expect("invariant: charger <= 64 bytes");
        b[R_CHARGER..R_CHARGER + charger.len()].copy_from_slice(charger);
        let tag = keys.mac(LABEL_RECORD, id, &b[..R_MAC]).finalize();
        b[R_MAC..].copy_from_slice(&tag);
        b
    }

    /// Decodes record `number` from its 128 bytes.
    pub fn decode(bytes: &[u8], number: u32, keys: &MediumKeys, id: &Uuid) -> Result<Self> {
        let bad = MediaError::CorruptLog { record: number };
        let Some(b) = bytes.get(..RECORD_LEN) else {
            return Err(bad);
        };
        if keys
            .mac(LABEL_RECORD, id, &b[..R_MAC])
            .verify(&b[R_MAC..])
            .is_err()
        {
            return Err(bad);
        }
        let charger_len = usize::from(b[R_CHARGER_LEN]);
        if be_u32(b, 0) != number
            || charger_len > MAX_CHARGER_LEN
            || !all_zero(&b[R_CHARGER + charger_len..R_MAC])
        {
            return Err(MediaError::Inconsistent("a charge record's fields"));
        }
        let charger = std::str::from_utf8(&b[R_CHARGER..R_CHARGER + charger_len])
            .map_err(|_| MediaError::Inconsistent("a charger ID is not UTF-8"))?;
        let charge = ChargeRecord::new(charger, be_u64(b, 20))
            .map_err(|_| MediaError::Inconsistent("a charger ID"))?;
        let first = be_u64(b, 8);
        let count = be_u32(b, 16);
        if count == 0 || first.checked_add(u64::from(count)).is_none() {
            return Err(MediaError::Inconsistent("a charge record's range"));
        }
        Ok(Self {
            number,
            epoch: be_u32(b, 4),
            first,
            count,
            charge,
        })
    }

    /// Decodes the live records (`state.log_start..state.log_end`) from the log
    /// region and checks that they tile the charged keys: contiguous, ending at
    /// `state.end`, covering every unused key, epochs rising.
    pub fn decode_log(
        log: &[u8],
        layout: &Layout,
        state: &State,
        keys: &MediumKeys,
        id: &Uuid,
    ) -> Result<Vec<Self>> {
        let mut records = Vec::with_capacity((state.log_end - state.log_start) as usize);
        for number in state.log_start..state.log_end {
            let at = (layout.record_offset(number) - LOG_OFFSET) as usize;
            let bytes = log.get(at..).unwrap_or_default();
            let r = Self::decode(bytes, number, keys, id)?;
            if let Some(prev) = records.last() {
                let prev: &Record = prev;
                if r.first != prev.end() || r.epoch <= prev.epoch {
                    return Err(MediaError::Inconsistent("charge records do not follow on"));
                }
            }
            if r.epoch > state.epoch {
                return Err(MediaError::Inconsistent("a charge from a future epoch"));
            }
            records.push(r);
        }
        match (records.first(), records.last()) {
            (Some(first), Some(last)) if first.first <= state.next && last.end() == state.end => {}
            (None, None) if state.next == state.end => {}
            _ => {
                return Err(MediaError::Inconsistent(
                    "the charge log does not cover the unused keys",
                ));
            }
        }
        Ok(records)
    }
}

/// The record of the charge that holds key `index`, if it is live.
pub fn record_for(records: &[Record], index: u64) -> Option<&Record> {
    let at = records.partition_point(|r| r.end() <= index);
    records.get(at).filter(|r| r.first <= index)
}

fn slot_nonce_aad(id: &Uuid, epoch: u32, index: u64) -> ([u8; 12], Vec<u8>) {
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&epoch.to_be_bytes());
    nonce[4..].copy_from_slice(&index.to_be_bytes());
    let mut aad = Vec::with_capacity(LABEL_SLOT.len() + 16 + 12);
    aad.extend_from_slice(LABEL_SLOT);
    aad.extend_from_slice(id.as_bytes());
    aad.extend_from_slice(&nonce);
    (nonce, aad)
}

/// Seals key `index` of a charge made under `epoch`.
pub fn seal_slot(
    keys: &MediumKeys,
    id: &Uuid,
    epoch: u32,
    index: u64,
    key: &Key256,
) -> [u8; SLOT_LEN] {
    let (nonce, aad) = slot_nonce_aad(id, epoch, index);
    let mut slot = [0u8; SLOT_LEN];
    slot[..KEY_LEN].copy_from_slice(key.expose_secret());
    let tag = keys
        .slot
        .seal_in_place_detached(&nonce, &aad, &mut slot[..KEY_LEN])
        .expect("invariant: 32 bytes are far below GCM's limit");
    slot[KEY_LEN..].copy_from_slice(&tag);
    slot
}

/// Opens the slot of key `index` (charged under `epoch`). An erased (all-zero) slot
/// is [`MediaError::ErasedSlot`], any other failure [`MediaError::CorruptSlot`];
/// no key bytes leave unless the tag verifies.
pub fn open_slot(
    keys: &MediumKeys,
    id: &Uuid,
    epoch: u32,
    index: u64,
    bytes: &[u8],
) -> Result<Key256> {
    let Some(slot) = bytes.get(..SLOT_LEN) else {
        return Err(MediaError::CorruptSlot { index });
    };
    if all_zero(slot) {
        return Err(MediaError::ErasedSlot { index });
    }
    let (nonce, aad) = slot_nonce_aad(id, epoch, index);
    let mut buf = Zeroizing::new([0u8; KEY_LEN]);
    buf.copy_from_slice(&slot[..KEY_LEN]);
    let mut tag = [0u8; GCM_TAG_LEN];
    tag.copy_from_slice(&slot[KEY_LEN..]);
    keys.slot
        .open_in_place_detached(&nonce, &aad, &mut buf[..], &tag)
        .map_err(|_| MediaError::CorruptSlot { index })?;
    Ok(Key256::from_slice(&buf[..]).expect("invariant: 32 bytes"))
}

/// A medium's metadata, decoded and verified under the PIN.
#[derive(Debug)]
pub struct Unlocked {
    /// The header.
    pub header: Header,
    /// The keys unwrapped with the PIN.
    pub keys: MediumKeys,
    /// The current counter record.
    pub state: State,
    /// The live charge records, oldest first.
    pub records: Vec<Record>,
}

/// Decodes and verifies a medium's metadata: `meta` is the file from its start to
/// (at least) the first key slot. The order of checks gives the clearest error:
/// header (magic, version, checksum, fields), length, PIN, counter record, log.
pub fn unlock_metadata(meta: &[u8], pin: &SecretBytes) -> Result<Unlocked> {
    let header = Header::decode(meta)?;
    let layout = header.layout();
    let needed = layout.slots_offset();
    if (meta.len() as u64) < needed {
        return Err(MediaError::Truncated {
            what: "the counter record and charge log",
            needed,
            got: meta.len() as u64,
        });
    }
    let keys = header.unlock(pin)?;
    let copy = |i: usize| {
        let at = STATE_OFFSETS[i] as usize;
        &meta[at..at + STATE_LEN]
    };
    let state = State::current([copy(0), copy(1)], &keys, &header)?;
    let log = &meta[LOG_OFFSET as usize..needed as usize];
    let records = Record::decode_log(log, &layout, &state, &keys, &header.spec.id)?;
    Ok(Unlocked {
        header,
        keys,
        state,
        records,
    })
}

/// What a charge writes, in order: `begin` (the epoch bumped, durably, before any
/// slot is written), the slots and `record`, then `commit`.
#[derive(Debug)]
pub struct ChargePlan {
    /// The state that claims a fresh epoch (and drops the oldest record if needed).
    pub begin: State,
    /// The charge's record.
    pub record: Record,
    /// The state that makes the charge live.
    pub commit: State,
    /// Whether the oldest live record is dropped to make room in the log.
    pub drops_oldest: bool,
}

/// Plans charging `count` keys: checks capacity and log room.
pub fn plan_charge(
    header: &Header,
    state: &State,
    records: &[Record],
    count: usize,
    charge: ChargeRecord,
) -> Result<ChargePlan> {
    let spec = &header.spec;
    check_charge(count, spec.capacity, state.end - state.next)?;
    // count <= capacity <= 2^24.
    let count = u32::try_from(count).expect("invariant: count <= capacity <= 2^24");
    let mut begin = state.successor()?;
    begin.epoch = state
        .epoch
        .checked_add(1)
        .ok_or(MediaError::Inconsistent("charge epochs exhausted"))?;
    let drops_oldest = state.log_end - state.log_start == spec.log_capacity;
    if drops_oldest {
        match records.first() {
            Some(oldest) if oldest.end() <= state.next => begin.log_start += 1,
            _ => {
                return Err(MediaError::ChargeLogFull {
                    records: spec.log_capacity,
                });
            }
        }
    }
    let number = state
        .log_end
        .checked_add(1)
        .ok_or(MediaError::Inconsistent("charge record numbers exhausted"))?;
    let record = Record {
        number: state.log_end,
        epoch: begin.epoch,
        first: state.end,
        count,
        charge,
    };
    let mut commit = begin.successor()?;
    commit.end = record.end();
    commit.log_end = number;
    Ok(ChargePlan {
        begin,
        record,
        commit,
        drops_oldest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(capacity: u64, log_capacity: u32) -> MediumSpec {
        MediumSpec {
            id: Uuid::from_u128(0x1234),
            owner: "sip:alice@example.org".into(),
            capacity,
            log_capacity,
            kdf: KdfParams::MINIMAL,
        }
    }

    fn pin() -> SecretBytes {
        SecretBytes::from_slice(b"123456")
    }

    fn key(i: u8) -> Key256 {
        Key256::new([i; 32])
    }

    fn created(capacity: u64, log: u32) -> (Vec<u8>, Header, MediumKeys) {
        Header::create(&spec(capacity, log), &pin(), [7; SALT_LEN], &key(99)).expect("create")
    }

    #[test]
    fn header_round_trips_and_unlocks_only_with_the_pin() {
        let (page, header, keys) = created(8, 4);
        assert_eq!(page.len(), HEADER_LEN);
        let back = Header::decode(&page).expect("decode");
        assert_eq!(back, header);
        let again = back.unlock(&pin()).expect("unlock");
        let id = &header.spec.id;
        let slot = seal_slot(&keys, id, 1, 0, &key(5));
        assert_eq!(open_slot(&again, id, 1, 0, &slot).expect("open"), key(5));
        assert!(matches!(
            back.unlock(&SecretBytes::from_slice(b"123457")),
            Err(MediaError::WrongPin)
        ));
        assert!(matches!(
            back.unlock(&SecretBytes::from_slice(b"")),
            Err(MediaError::EmptyPin)
        ));
    }

    #[test]
    fn header_decode_names_what_is_wrong() {
        let (page, _, _) = created(8, 4);
        assert!(matches!(
            Header::decode(b"PK\x03\x04 a zip file"),
            Err(MediaError::NotAMedium)
        ));
        assert!(matches!(
            Header::decode(b""),
            Err(MediaError::Truncated { .. })
        ));
        assert!(matches!(
            Header::decode(&page[..100]),
            Err(MediaError::Truncated { .. })
        ));
        let mut v2 = page.clone();
        v2[H_VERSION + 1] = 2;
        assert!(matches!(
            Header::decode(&v2),
            Err(MediaError::UnsupportedVersion(2))
        ));
        let mut bad = page.clone();
        bad[H_OWNER] ^= 1;
        assert!(matches!(
            Header::decode(&bad),
            Err(MediaError::CorruptHeader("checksum mismatch"))
        ));
        // A consistent checksum over a field out of range: still refused, by range.
        let mut bad = page.clone();
        bad[H_CAPACITY..H_CAPACITY + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        let sum = sm3(&bad[..H_CHECKSUM]);
        bad[H_CHECKSUM..].copy_from_slice(&sum);
        assert!(matches!(
            Header::decode(&bad),
            Err(MediaError::CorruptHeader(_))
        ));
        // A header edited with a fixed-up checksum does not unwrap: the PIN check
        // authenticates the whole header.
        let mut edited = page;
        edited[H_OWNER] = b'S';
        let sum = sm3(&edited[..H_CHECKSUM]);
        edited[H_CHECKSUM..].copy_from_slice(&sum);
        let h = Header::decode(&edited).expect("checksum fixed up");
        assert!(matches!(h.unlock(&pin()), Err(MediaError::WrongPin)));
    }

    #[test]
    fn spec_and_params_are_checked() {
        assert!(KdfParams::new(7, 1, 1).is_err());
        assert!(KdfParams::new(8, 0, 1).is_err());
        assert!(KdfParams::new(8, 1, 0).is_err());
        assert!(KdfParams::new(16, 1, 4).is_err());
        assert!(KdfParams::new(KdfParams::MAX_M_KIB + 1, 1, 1).is_err());
        assert_eq!(
            KdfParams::new(8, 1, 1).expect("minimal"),
            KdfParams::MINIMAL
        );
        let bad = |s: MediumSpec| Header::create(&s, &pin(), [0; 32], &key(1)).is_err();
        assert!(bad(spec(0, 4)));
        assert!(bad(spec(MAX_CAPACITY + 1, 4)));
        assert!(bad(spec(8, 0)));
        assert!(bad(spec(8, MAX_LOG_RECORDS + 1)));
        assert!(bad(MediumSpec {
            owner: String::new(),
            ..spec(8, 4)
        }));
        assert!(bad(MediumSpec {
            owner: "a\nb".into(),
            ..spec(8, 4)
        }));
        assert!(bad(MediumSpec {
            owner: "x".repeat(257),
            ..spec(8, 4)
        }));
        assert!(!bad(MediumSpec {
            owner: "é".repeat(128),
            ..spec(8, 4)
        }));
    }

    #[test]
    fn state_copies_verify_and_the_newer_wins() {
        let (_, header, keys) = created(8, 4);
        let id = &header.spec.id;
        let s0 = State::default();
        let s1 = State {
            seq: 1,
            end: 3,
            epoch: 1,
            log_end: 1,
            ..s0
        };
        let (b0, b1) = (s0.encode(&keys, id), s1.encode(&keys, id));
        assert_eq!(State::decode(&b0, 0, &keys, id), Some(s0));
        assert_eq!(State::decode(&b0, 1, &keys, id), None, "wrong copy");
        assert_eq!(State::current([&b0, &b1], &keys, &header).expect("s"), s1);
        let mut torn = b1;
        torn[90] ^= 1;
        assert_eq!(State::current([&b0, &torn], &keys, &header).expect("s"), s0);
        assert!(matches!(
            State::current([&torn, &[0; STATE_LEN]], &keys, &header),
            Err(MediaError::CorruptState)
        ));
        // Verifying but impossible: more used than charged.
        let bad = State { next: 4, ..s1 }.encode(&keys, id);
        assert!(matches!(
            State::current([&b0, &bad], &keys, &header),
            Err(MediaError::Inconsistent(_))
        ));
    }

    #[test]
    fn slots_are_bound_to_index_epoch_and_medium() {
        let (_, header, keys) = created(8, 4);
        let id = &header.spec.id;
        let slot = seal_slot(&keys, id, 3, 5, &key(42));
        assert_eq!(open_slot(&keys, id, 3, 5, &slot).expect("open"), key(42));
        for (epoch, index, other) in [(3, 6, *id), (4, 5, *id), (3, 5, Uuid::from_u128(9))] {
            assert!(matches!(
                open_slot(&keys, &other, epoch, index, &slot),
                Err(MediaError::CorruptSlot { .. })
            ));
        }
        assert!(matches!(
            open_slot(&keys, id, 3, 5, &[0; SLOT_LEN]),
            Err(MediaError::ErasedSlot { index: 5 })
        ));
        assert!(matches!(
            open_slot(&keys, id, 3, 5, &slot[..40]),
            Err(MediaError::CorruptSlot { index: 5 })
        ));
    }

    #[test]
    fn charges_plan_into_the_ring_and_the_log() {
        let (_, header, keys) = created(4, 2);
        let id = header.spec.id;
        let rec = || ChargeRecord::new("kme-charger", 1_700_000_000).expect("valid");
        let mut state = State::default();
        let mut records: Vec<Record> = Vec::new();
        let apply = |state: &mut State, records: &mut Vec<Record>, p: ChargePlan| {
            if p.drops_oldest {
                records.remove(0);
            }
            let bytes = p.record.encode(&keys, &id);
            assert_eq!(
                Record::decode(&bytes, p.record.number, &keys, &id).expect("record"),
                p.record
            );
            records.push(p.record);
            *state = p.commit;
        };
        let p = plan_charge(&header, &state, &records, 3, rec()).expect("fits");
        assert_eq!((p.begin.seq, p.begin.epoch, p.commit.seq), (1, 1, 2));
        assert_eq!((p.record.first, p.commit.end, p.commit.log_end), (0, 3, 1));
        apply(&mut state, &mut records, p);
        assert!(matches!(
            plan_charge(&header, &state, &records, 2, rec()),
            Err(MediaError::CapacityExceeded {
                requested: 2,
                free: 1
            })
        ));
        let p = plan_charge(&header, &state, &records, 1, rec()).expect("fits");
        apply(&mut state, &mut records, p);
        state.next = 2; // two keys used
        // The log holds two records and the oldest still has an unused key.
        assert!(matches!(
            plan_charge(&header, &state, &records, 1, rec()),
            Err(MediaError::ChargeLogFull { records: 2 })
        ));
        state.next = 3;
        let p = plan_charge(&header, &state, &records, 3, rec()).expect("oldest dropped");
        assert!(p.drops_oldest);
        assert_eq!(
            (p.commit.log_start, p.commit.log_end, p.record.first),
            (1, 3, 4)
        );
        apply(&mut state, &mut records, p);
        assert_eq!(record_for(&records, 3).map(|r| r.number), Some(1));
        assert_eq!(record_for(&records, 6).map(|r| r.number), Some(2));
        assert!(record_for(&records, 2).is_none());
        assert!(record_for(&records, 7).is_none());
        assert!(matches!(
            plan_charge(&header, &state, &records, 0, rec()),
            Err(MediaError::EmptyCharge)
        ));
    }

    #[test]
    fn a_charge_record_must_verify_and_carry_its_number() {
        let (_, header, keys) = created(4, 2);
        let id = header.spec.id;
        let r = Record {
            number: 7,
            epoch: 2,
            first: 10,
            count: 3,
            charge: ChargeRecord::new("charger-1", 5).expect("valid"),
        };
        let b = r.encode(&keys, &id);
        assert_eq!(Record::decode(&b, 7, &keys, &id).expect("ok"), r);
        assert!(Record::decode(&b, 8, &keys, &id).is_err());
        assert!(Record::decode(&b[..100], 7, &keys, &id).is_err());
        for i in 0..RECORD_LEN {
            let mut bad = b;
            bad[i] ^= 0x80;
            assert!(matches!(
                Record::decode(&bad, 7, &keys, &id),
                Err(MediaError::CorruptLog { record: 7 })
            ));
        }
    }

    #[test]
    fn a_full_medium_of_130k_keys_is_about_six_megabytes() {
        let (_, header, _) = created(130_000, 1024);
        let len = header.layout().min_len(130_000);
        assert_eq!(len, 12_288 + 1024 * 128 + 130_000 * 48);
        assert!(len < 6_400_000, "{len}");
    }
}
