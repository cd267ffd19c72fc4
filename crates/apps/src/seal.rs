//! Sealed files: a file encrypted for one SAE with keys from the QKD network.
//!
//! The sender (master SAE) asks its KME for fresh QKD keys shared with the
//! recipient (`enc_keys`), encrypts, and writes the key IDs into the file's header;
//! the recipient reads the header, asks *its* KME for the same keys (`dec_keys`,
//! which only it may do, and only once), and decrypts. No key travels with the
//! file, and the file can go by any route (mail, USB stick, object store).
//!
//! # Format
//!
//! A header ([`crate::format`], the layout table is there) followed by the body.
//! `H = SM3(header bytes)` binds everything that follows to the header.
//!
//! **qkd** (default) and **hybrid**: the plaintext is cut into *segments* of the
//! rekey interval (default 64 MiB, at least one segment even for an empty file),
//! each protected by its own QKD key of 256 bits. The SM4 key of segment `s` is
//!
//! ```text
//! K_s = HKDF-SM3 combiner (qkdnet_crypto::hybrid::combine_to_sm4_key)
//!       of QKD key s [and, in hybrid mode, the ML-KEM-768 shared secret and transcript],
//!       context = "qkdnet/msg/v1" || H || s (u64 BE)
//! ```
//!
//! i.e. the 128-bit SM4 key is derived from the 256-bit QKD key with the SM3-based
//! KDF rather than asking the KME for 128-bit keys, so that the key is bound to this
//! file, this segment and both SAE IDs. Each segment is one STREAM of SM4-GCM chunks
//! ([`qkdnet_crypto::chunked`], nonce = file prefix || chunk index || last flag)
//! with `AAD = H || s`; every chunk on disk is `ciphertext (chunk size bytes, the
//! last of a segment shorter) || tag (16 bytes)`, and the chunk sizes follow from
//! the plaintext length in the header. Tampering, reordering (within or across
//! segments), truncation and trailing data are therefore all detected, and each
//! chunk is authenticated before its plaintext is written. Memory is one chunk
//! (default 64 KiB) whatever the file size.
//!
//! In **hybrid** mode the header also carries the recipient's ML-KEM-768
//! encapsulation key and a fresh ciphertext: the file stays confidential if either
//! the QKD keys or ML-KEM hold. The recipient needs the matching decapsulation key
//! ([`OpenOptions::mlkem_key`]); keys are generated and stored by the caller.
//!
//! **otp** (messages up to [`crate::format::OTP_MAX_BYTES`]): QKD key material is
//! concatenated in key-ID order; its first 32 bytes key an HMAC-SM3 tag over
//! `header || ciphertext`, the next `plaintext length` bytes are the one-time pad,
//! the rest is discarded. Body = `ciphertext || tag (32 bytes)`. The tag is checked
//! before anything is decrypted. (HMAC makes the integrity computational; the
//! confidentiality is information-theoretic.)
//!
//! # Outputs
//!
//! Output goes to a temporary file in the output's directory (mode 0600), which is
//! renamed over the output only when everything succeeded and deleted otherwise: a
//! failed open leaves no plaintext, a failed seal no half-sealed file, and an
//! existing output file is untouched unless the operation succeeds.
//!
//! # What the KME sees and what is spent
//!
//! Sealing first calls `status` (to check that the TLS certificate in use is the
//! sender's and that enough keys are available), then `enc_keys` in batches.
//! Opening checks everything it can locally (magic, version, ranges, recipient,
//! the ML-KEM key) *before* `dec_keys`, because keys are delivered only once: a file
//! that fails its integrity check afterwards has used up its keys. Keys fetched
//! for a seal that then fails (say the input changed meanwhile) are lost too.

use std::io::Read;
use std::path::Path;

use qkdnet_crypto::chunked::{ChunkOpener, ChunkSealer};
use qkdnet_crypto::gcm::{GCM_TAG_LEN, GcmTag};
use qkdnet_crypto::hybrid::{
    KeyMaterial, MlKemCiphertext, MlKemDecapsulationKey, MlKemEncapsulationKey, MlKemTranscript,
};
use qkdnet_crypto::otp::one_time_pad;
use qkdnet_crypto::sm3::{HmacSm3, SM3_LEN, Sm3Digest, sm3};
use qkdnet_crypto::{SecretBytes, SharedSecret, Sm4Key};
use qkdnet_etsi::client::{EtsiClient, Key};
use serde::Serialize;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::AppError;
use crate::files::{TempOutput, open_input, read_exactly, read_some, run_blocking};
use crate::format::{Header, MlKemFields, Mode, OTP_MAC_KEY_LEN};
use crate::keys::{
    check_identity_and_pool, dec_keys, derive_sm4_key, enc_keys, qkd_secret, random_array, sae_id,
};

/// Default plaintext bytes per chunk.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 << 10;
/// Default plaintext bytes per QKD key.
pub const DEFAULT_REKEY_BYTES: u64 = 64 << 20;
/// Default (and KME unit) QKD key size in bits.
pub const DEFAULT_KEY_BITS: u16 = 256;
/// Domain separation label of the key derivation context.
const KDF_LABEL: &[u8] = b"qkdnet/msg/v1";

/// How to seal.
#[derive(Debug)]
pub struct SealOptions {
    /// Protection mode.
    pub mode: Mode,
    /// Plaintext bytes per chunk (QKD and hybrid modes).
    pub chunk_size: u32,
    /// Plaintext bytes per QKD key; a multiple of `chunk_size`.
    pub rekey_bytes: u64,
    /// QKD key size to ask for, in bits.
    pub key_bits: u16,
    /// The recipient's ML-KEM-768 encapsulation key (hybrid mode only).
    pub recipient_mlkem: Option<MlKemEncapsulationKey>,
}

impl Default for SealOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Qkd,
            chunk_size: DEFAULT_CHUNK_SIZE,
            rekey_bytes: DEFAULT_REKEY_BYTES,
            key_bits: DEFAULT_KEY_BITS,
            recipient_mlkem: None,
        }
    }
}

/// How to open (only hybrid files need anything).
#[derive(Debug, Default)]
pub struct OpenOptions {
    /// The recipient's ML-KEM-768 decapsulation key (hybrid files only).
    pub mlkem_key: Option<MlKemDecapsulationKey>,
}

/// What a seal or open did. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Protection mode.
    pub mode: Mode,
    /// Sealing SAE.
    pub sender: String,
    /// Recipient SAE.
    pub recipient: String,
    /// QKD key IDs, in order of use.
    pub key_ids: Vec<Uuid>,
    /// QKD key bits taken from the KME.
    pub key_bits_consumed: u64,
    /// Of those, bits that protect the file (OTP: pad + MAC key; the rest of the
    /// last key is discarded).
    pub key_bits_used: u64,
    /// Plaintext length.
    pub plaintext_bytes: u64,
    /// Sealed file length.
    pub sealed_bytes: u64,
    /// Segments (one per QKD key; 0 in OTP mode).
    pub segments: u64,
    /// SM4-GCM chunks (0 in OTP mode).
    pub chunks: u64,
}

/// Report of [`seal`].
pub type SealReport = Report;
/// Report of [`open`].
pub type OpenReport = Report;

/// Seals `input` for SAE `to` into `output`, with keys from `client` (which must
/// present SAE `from`'s certificate). See the module documentation.
pub async fn seal(
    client: &EtsiClient,
    from: &str,
    to: &str,
    input: &Path,
    output: &Path,
    opts: &SealOptions,
) -> Result<SealReport, AppError> {
    let sender = sae_id(from, "sender")?;
    let recipient = sae_id(to, "recipient")?;
    if sender == recipient {
        return Err(AppError::InvalidInput(
            "sender and recipient are the same SAE".into(),
        ));
    }
    if (opts.mode == Mode::Hybrid) != opts.recipient_mlkem.is_some() {
        return Err(AppError::InvalidInput(
            "hybrid mode needs the recipient's ML-KEM-768 public key, and only hybrid mode uses one"
                .into(),
        ));
    }
    let (mut reader, plaintext_len) = open_input(input)?;
    let (chunk_size, rekey_bytes) = match opts.mode {
        Mode::Otp => (0, 0),
        Mode::Qkd | Mode::Hybrid => (opts.chunk_size, opts.rekey_bytes),
    };
    let layout = Header::plan(
        opts.mode,
        opts.key_bits,
        plaintext_len,
        chunk_size,
        rekey_bytes,
    )
    .map_err(|e| match e {
        AppError::Format(m) => AppError::InvalidInput(m),
        e => e,
    })?;
    let mut out = TempOutput::create(output)?;

    let batch =
        check_identity_and_pool(client, &sender, &recipient, layout.keys, opts.key_bits).await?;
    let keys = enc_keys(client, &recipient, layout.keys, opts.key_bits, batch).await?;
    let key_ids: Vec<Uuid> = keys.iter().map(|k| k.id).collect();

    let nonce_prefix = match opts.mode {
        Mode::Otp => [0; 7],
        Mode::Qkd | Mode::Hybrid => random_array()?,
    };
    let mlkem = opts.recipient_mlkem.as_ref().map(|ek| {
        let (ct, ss) = ek.encapsulate();
        (ek, ct, ss)
    });
    let header = Header {
        mode: opts.mode,
        sender,
        recipient,
        key_bits: opts.key_bits,
        plaintext_len,
        chunk_size,
        rekey_bytes,
        nonce_prefix,
        key_ids,
        mlkem: mlkem.as_ref().map(|(ek, ct, _)| MlKemFields {
            encapsulation_key: Box::new(ek.to_bytes()),
            ciphertext: Box::new(*ct.as_bytes()),
        }),
    };
    let raw = header.encode();
    let body = match header.mode {
        Mode::Otp => Body::Otp(concat_keys(keys)),
        Mode::Qkd | Mode::Hybrid => {
            let transcript = mlkem.as_ref().map(|(ek, ct, ss)| MlKemTranscript {
                shared_secret: ss,
                encapsulation_key: ek,
                ciphertext: ct,
            });
            Body::Chunks(segment_keys(&raw, keys, transcript)?)
        }
    };
    let report = report(&header, raw.len() as u64);
    run_blocking(move || {
        out.write(&raw)?;
        match body {
            Body::Otp(km) => seal_otp(&raw, km, &mut reader, &mut out, plaintext_len)?,
            Body::Chunks(ks) => seal_chunks(&header, &raw, &ks, &mut reader, &mut out)?,
        }
        let mut probe = [0u8; 1];
        if read_some(&mut reader, &mut probe, "reading the input")? != 0 {
            return Err(AppError::InvalidInput(
                "the input grew while it was being sealed; nothing written".into(),
            ));
        }
        out.commit()
    })
    .await?;
    Ok(report)
}

/// Opens the sealed file `input` as SAE `as_sae` (the recipient named in it) into
/// `output`, with keys from `client` (which must present `as_sae`'s certificate).
pub async fn open(
    client: &EtsiClient,
    as_sae: &str,
    input: &Path,
    output: &Path,
) -> Result<OpenReport, AppError> {
    open_with(client, as_sae, input, output, &OpenOptions::default()).await
}

/// [`open`] with options (the ML-KEM key of hybrid files).
pub async fn open_with(
    client: &EtsiClient,
    as_sae: &str,
    input: &Path,
    output: &Path,
    opts: &OpenOptions,
) -> Result<OpenReport, AppError> {
    let me = sae_id(as_sae, "recipient")?;
    let (mut reader, sealed_len) = open_input(input)?;
    let (header, raw) = Header::read(&mut reader)?;
    if header.recipient != me {
        return Err(AppError::WrongRecipient {
            sealed_for: header.recipient.to_string(),
            as_sae: me.to_string(),
        });
    }
    let layout = header.layout()?;
    let expected_len = sealed_length(&header, raw.len() as u64)?;
    if sealed_len != expected_len {
        return Err(AppError::Integrity(format!(
            "the file is {sealed_len} bytes where its header implies {expected_len} \
             (truncated or extended); no keys were used"
        )));
    }
    // Everything that can be checked without keys is checked before dec_keys,
    // which hands each key out only once.
    let mlkem = match &header.mlkem {
        None => None,
        Some(f) => Some(decapsulate(f, opts.mlkem_key.as_ref())?),
    };
    let mut out = TempOutput::create(output)?;
    let batch = check_identity_and_pool(client, &me, &header.sender, 0, header.key_bits).await?;
    let keys = dec_keys(
        client,
        &header.sender,
        &header.key_ids,
        header.key_bits,
        batch,
    )
    .await?;
    let body = match header.mode {
        Mode::Otp => Body::Otp(concat_keys(keys)),
        Mode::Qkd | Mode::Hybrid => {
            let transcript = mlkem.as_ref().map(|(ek, ct, ss)| MlKemTranscript {
                shared_secret: ss,
                encapsulation_key: ek,
                ciphertext: ct,
            });
            Body::Chunks(segment_keys(&raw, keys, transcript)?)
        }
    };
    debug_assert_eq!(layout.keys as usize, header.key_ids.len());
    let report = report(&header, raw.len() as u64);
    run_blocking(move || {
        match body {
            Body::Otp(km) => open_otp(&header, &raw, km, &mut reader, &mut out)?,
            Body::Chunks(ks) => open_chunks(&header, &raw, &ks, &mut reader, &mut out)?,
        }
        let mut probe = [0u8; 1];
        if read_some(&mut reader, &mut probe, "reading the sealed file")? != 0 {
            return Err(AppError::Integrity(
                "data after the last chunk (the file was extended)".into(),
            ));
        }
        out.commit()
    })
    .await?;
    Ok(report)
}

/// Reads the header of a sealed file (no KME involved), with its length in bytes.
pub fn read_header(path: &Path) -> Result<(Header, u64), AppError> {
    let (mut r, _) = open_input(path)?;
    let (h, raw) = Header::read(&mut r)?;
    Ok((h, raw.len() as u64))
}

// ---- key handling ----

/// Key material ready for the body.
enum Body {
    /// One SM4 key per segment.
    Chunks(Vec<Sm4Key>),
    /// All QKD key material, concatenated (OTP).
    Otp(SecretBytes),
}

fn decapsulate(
    f: &MlKemFields,
    dk: Option<&MlKemDecapsulationKey>,
) -> Result<(MlKemEncapsulationKey, MlKemCiphertext, SharedSecret), AppError> {
    let dk = dk.ok_or_else(|| {
        AppError::InvalidInput(
            "this file is sealed in hybrid mode: give the recipient's ML-KEM-768 private key"
                .into(),
        )
    })?;
    let ek = dk.encapsulation_key();
    if ek.to_bytes()[..] != f.encapsulation_key[..] {
        return Err(AppError::InvalidInput(
            "this file was sealed to another ML-KEM-768 key than the one given".into(),
        ));
    }
    let ct = MlKemCiphertext::from_slice(&f.ciphertext[..])?;
    let ss = dk.decapsulate(&ct);
    Ok((ek, ct, ss))
}

/// The SM4 key of every segment (see the module documentation).
fn segment_keys(
    raw_header: &[u8],
    keys: Vec<Key>,
    mlkem: Option<MlKemTranscript<'_>>,
) -> Result<Vec<Sm4Key>, AppError> {
    let h = sm3(raw_header);
    keys.into_iter()
        .enumerate()
        .map(|(s, k)| {
            let qkd_key = qkd_secret(k);
            let material = match mlkem {
                None => KeyMaterial::QkdOnly { qkd_key: &qkd_key },
                Some(t) => KeyMaterial::Hybrid {
                    qkd_key: &qkd_key,
                    mlkem: t,
                },
            };
            Ok(derive_sm4_key(&material, KDF_LABEL, &h, s as u64, b"")?)
        })
        .collect()
}

fn concat_keys(keys: Vec<Key>) -> SecretBytes {
    let mut all = Zeroizing::new(Vec::with_capacity(
        keys.iter().map(|k| k.material.len()).sum(),
    ));
    for k in &keys {
        all.extend_from_slice(&k.material);
    }
    SecretBytes::new(std::mem::take(&mut *all))
}

fn chunk_aad(h: &Sm3Digest, segment: u64) -> [u8; SM3_LEN + 8] {
    let mut a = [0u8; SM3_LEN + 8];
    a[..SM3_LEN].copy_from_slice(h);
    a[SM3_LEN..].copy_from_slice(&segment.to_be_bytes());
    a
}

// ---- bodies (blocking) ----

/// Chunk lengths of segment `s`: full chunks, then the last (possibly short or
/// empty) one.
fn chunk_plan(h: &Header, s: u64) -> (u64, u64) {
    let len = h.segment_len(s);
    let c = u64::from(h.chunk_size);
    let chunks = len.div_ceil(c).max(1);
    (chunks, len - (chunks - 1) * c)
}

fn layout_chunks(h: &Header) -> u64 {
    match h.mode {
        Mode::Otp => 0,
        Mode::Qkd | Mode::Hybrid => (0..h.key_ids.len() as u64)
            .map(|s| chunk_plan(h, s).0)
            .sum(),
    }
}

/// The length of the whole sealed file that `h` describes.
fn sealed_length(h: &Header, header_len: u64) -> Result<u64, AppError> {
    let tags = match h.mode {
        Mode::Otp => SM3_LEN as u64,
        Mode::Qkd | Mode::Hybrid => layout_chunks(h) * GCM_TAG_LEN as u64,
    };
    header_len
        .checked_add(h.plaintext_len)
        .and_then(|n| n.checked_add(tags))
        .ok_or_else(|| AppError::Format("lengths overflow".into()))
}

fn report(h: &Header, header_len: u64) -> Report {
    let consumed = h.key_ids.len() as u64 * u64::from(h.key_bits);
    let used = match h.mode {
        Mode::Otp => (h.plaintext_len + OTP_MAC_KEY_LEN) * 8,
        Mode::Qkd | Mode::Hybrid => consumed,
    };
    Report {
        mode: h.mode,
        sender: h.sender.to_string(),
        recipient: h.recipient.to_string(),
        key_ids: h.key_ids.clone(),
        key_bits_consumed: consumed,
        key_bits_used: used,
        plaintext_bytes: h.plaintext_len,
        // The header checked its lengths, so this sum cannot overflow in practice.
        sealed_bytes: sealed_length(h, header_len).unwrap_or(u64::MAX),
        segments: match h.mode {
            Mode::Otp => 0,
            Mode::Qkd | Mode::Hybrid => h.key_ids.len() as u64,
        },
        chunks: layout_chunks(h),
    }
}

fn seal_chunks(
    h: &Header,
    raw: &[u8],
    keys: &[Sm4Key],
    input: &mut impl Read,
    out: &mut TempOutput,
) -> Result<(), AppError> {
    let digest = sm3(raw);
    let full = h.chunk_size as usize;
    let mut buf = Zeroizing::new(vec![0u8; full]);
    let shrank = || "the input shrank while it was being sealed; nothing written".to_owned();
    for (s, key) in keys.iter().enumerate() {
        let s = s as u64;
        let aad = chunk_aad(&digest, s);
        let mut sealer = ChunkSealer::new(key, h.nonce_prefix);
        let (chunks, last_len) = chunk_plan(h, s);
        for _ in 1..chunks {
            read_exactly(input, &mut buf[..], shrank)?;
            let tag = sealer.seal_chunk(&aad, &mut buf[..])?;
            out.write(&buf[..])?;
            out.write(&tag)?;
        }
        // At most chunk_size, a u32.
        let b = &mut buf[..last_len as usize];
        read_exactly(input, b, shrank)?;
        let tag = sealer.seal_last(&aad, b)?;
        out.write(b)?;
        out.write(&tag)?;
    }
    Ok(())
}

fn open_chunks(
    h: &Header,
    raw: &[u8],
    keys: &[Sm4Key],
    input: &mut impl Read,
    out: &mut TempOutput,
) -> Result<(), AppError> {
    let digest = sm3(raw);
    let full = h.chunk_size as usize;
    let mut buf = Zeroizing::new(vec![0u8; full]);
    let mut tag: GcmTag = [0; GCM_TAG_LEN];
    for (s, key) in keys.iter().enumerate() {
        let s = s as u64;
        let aad = chunk_aad(&digest, s);
        let mut opener = ChunkOpener::new(key, h.nonce_prefix);
        let (chunks, last_len) = chunk_plan(h, s);
        let cut = |c: u64| format!("the file ends inside segment {s}, chunk {c} (truncated)");
        let forged = |c: u64| {
            AppError::Integrity(format!(
                "segment {s}, chunk {c} does not authenticate (modified, reordered or wrong keys)"
            ))
        };
        for c in 0..chunks - 1 {
            read_exactly(input, &mut buf[..], || cut(c))?;
            read_exactly(input, &mut tag, || cut(c))?;
            opener
                .open_chunk(&aad, &mut buf[..], &tag)
                .map_err(|_| forged(c))?;
            out.write(&buf[..])?;
        }
        let c = chunks - 1;
        let b = &mut buf[..last_len as usize];
        read_exactly(input, b, || cut(c))?;
        read_exactly(input, &mut tag, || cut(c))?;
        opener.open_last(&aad, b, &tag).map_err(|_| forged(c))?;
        out.write(b)?;
    }
    Ok(())
}

fn otp_split(mut km: SecretBytes, len: u64) -> Result<(SecretBytes, SecretBytes), AppError> {
    // OTP lengths are at most OTP_MAX_BYTES + 32 (checked by Header::plan).
    let mac_key = km.take_prefix(OTP_MAC_KEY_LEN as usize)?;
    let pad = km.take_prefix(len as usize)?;
    Ok((mac_key, pad))
}

fn seal_otp(
    raw: &[u8],
    km: SecretBytes,
    input: &mut impl Read,
    out: &mut TempOutput,
    len: u64,
) -> Result<(), AppError> {
    let (mac_key, pad) = otp_split(km, len)?;
    let mut data = Zeroizing::new(vec![0u8; len as usize]);
    read_exactly(input, &mut data, || {
        "the input shrank while it was being sealed".to_owned()
    })?;
    one_time_pad(pad, &mut data)?;
    let mut mac = HmacSm3::new(mac_key.expose_secret());
    mac.update(raw);
    mac.update(&data);
    out.write(&data)?;
    out.write(&mac.finalize())
}

fn open_otp(
    h: &Header,
    raw: &[u8],
    km: SecretBytes,
    input: &mut impl Read,
    out: &mut TempOutput,
) -> Result<(), AppError> {
    let (mac_key, pad) = otp_split(km, h.plaintext_len)?;
    let mut data = Zeroizing::new(vec![0u8; h.plaintext_len as usize]);
    let mut tag = [0u8; SM3_LEN];
    let cut = || "the file ends before its tag (truncated)".to_owned();
    read_exactly(input, &mut data, cut)?;
    read_exactly(input, &mut tag, cut)?;
    let mut mac = HmacSm3::new(mac_key.expose_secret());
    mac.update(raw);
    mac.update(&data);
    mac.verify(&tag).map_err(|_| {
        AppError::Integrity("the OTP tag does not verify (modified or wrong keys)".into())
    })?;
    one_time_pad(pad, &mut data)?;
    out.write(&data)
}
