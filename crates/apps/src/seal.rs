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
//! Opening a chunked file takes **two passes** over it, so that no plaintext
//! reaches the disk before the whole file is authenticated (issue #18, item 9): the
//! first decrypts every chunk into a scratch buffer in memory and checks its tag,
//! the end of every segment and the end of the file, and writes nothing; only then
//! does the second read the file again (same open file handle), check every tag
//! again (the file may have changed in between) and write the plaintext to the
//! temporary file. A process killed at any moment (SIGKILL, power loss, which run
//! no destructor) therefore leaves at most an empty temporary file, or one holding
//! a prefix of a file that authenticated completely. Those files are named
//! `.NAME.qkdnet-open-PID-RANDOM.tmp` and the next open into the same directory
//! deletes them once process PID is gone (on Linux; elsewhere they stay, mode 0600).
//! The price is reading and decrypting the file twice; memory stays one chunk.
//! OTP messages (at most 64 KiB) are checked in memory before anything is written.
//!
//! # What the KME sees and what is spent
//!
//! Sealing first calls `status` (to check that the TLS certificate in use is the
//! sender's and that enough keys are available), then `enc_keys` in batches.
//! Keys fetched for a seal that then fails (say the input changed meanwhile) are
//! lost.
//!
//! Opening checks everything it can locally (magic, version, ranges, recipient,
//! the ML-KEM key) *before* asking for keys. The KME hands each key out only once,
//! so opening with a key cache ([`OpenOptions::key_cache`], see
//! [`crate::keycache`]; `qkdnet msg open` always uses one) looks there first, asks
//! the KME (`status`, then `dec_keys` in batches) only for the keys it lacks, and
//! stores each batch in the cache *before* using it. A copy that fails its
//! integrity check thus leaves the keys in the cache for the intact original, and
//! an opened file can be opened again until its entry expires or is forgotten
//! ([`OpenOptions::forget_keys`]). Without a cache, a file opens once, and a
//! damaged copy uses up the keys of the original. When the KME no longer has a
//! key and the cache does not either, the error ([`AppError::KeysUnavailable`])
//! says so.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::SystemTime;

use qkdnet_crypto::chunked::{ChunkOpener, ChunkSealer};
use qkdnet_crypto::gcm::{GCM_TAG_LEN, GcmTag};
use qkdnet_crypto::hybrid::{
    KeyMaterial, MlKemCiphertext, MlKemDecapsulationKey, MlKemEncapsulationKey, MlKemTranscript,
};
use qkdnet_crypto::otp::one_time_pad;
use qkdnet_crypto::sm3::{HmacSm3, SM3_LEN, Sm3Digest, sm3};
use qkdnet_crypto::{SecretBytes, SharedSecret, Sm4Key};
use qkdnet_etsi::client::{ClientError, EtsiClient, Key};
use qkdnet_etsi::ids::SaeId;
use serde::Serialize;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::AppError;
use crate::files::{
    TempOutput, open_input, read_exactly, read_some, remove_stale_open_outputs, run_blocking,
};
use crate::format::{Header, MlKemFields, Mode, OTP_MAC_KEY_LEN};
use crate::keycache::{KeyCache, unix_secs};
use crate::keys::{
    check_identity_and_pool, derive_sm4_key, enc_keys, qkd_secret, random_array, sae_id,
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

/// How to open.
#[derive(Debug, Default)]
pub struct OpenOptions {
    /// The recipient's ML-KEM-768 decapsulation key (hybrid files only).
    pub mlkem_key: Option<MlKemDecapsulationKey>,
    /// Where to keep the file's keys (see the module documentation). Without one
    /// the file can be opened only once, and a damaged copy uses up its keys.
    pub key_cache: Option<KeyCache>,
    /// Delete the file's keys from the cache once it has opened successfully
    /// (they stay after a failure, whatever this says).
    pub forget_keys: bool,
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

/// Report of [`open`]: the file's [`Report`] and where its keys came from. Holds
/// no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpenReport {
    /// The same report as the sender's.
    #[serde(flatten)]
    pub file: Report,
    /// Keys found in the key cache.
    pub keys_from_cache: u64,
    /// Keys fetched from the KME (and stored in the cache first, if there is one).
    pub keys_from_kme: u64,
    /// Unix time (seconds) until which the file's keys stay in the key cache for
    /// re-opening; `None` without a cache or after [`OpenOptions::forget_keys`].
    pub keys_cached_until: Option<u64>,
    /// Problems that did not stop the open (unreadable cache entries, a cache that
    /// could not be written, stale files that could not be deleted).
    pub warnings: Vec<String>,
}

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

/// [`open`] with options (the ML-KEM key of hybrid files, the key cache).
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
    if let Some(c) = &opts.key_cache {
        if c.sae() != &me {
            return Err(AppError::InvalidInput(format!(
                "the key cache given is SAE {}'s, not {me}'s",
                c.sae()
            )));
        }
    }
    // Everything that can be checked without keys is checked before dec_keys,
    // which hands each key out only once.
    let mlkem = match &header.mlkem {
        None => None,
        Some(f) => Some(decapsulate(f, opts.mlkem_key.as_ref())?),
    };
    let mut warnings = Vec::new();
    let out_dir = match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let (_, problems) = remove_stale_open_outputs(out_dir);
    warnings.extend(problems);
    let mut out = TempOutput::create_for_open(output)?;
    let now = SystemTime::now();
    let (keys, mut source) = file_keys(client, &me, &header, opts.key_cache.as_ref(), now).await?;
    warnings.append(&mut source.warnings);
    source.warnings = warnings;
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
    let file = report(&header, raw.len() as u64);
    let header = std::sync::Arc::new(header);
    let h = std::sync::Arc::clone(&header);
    let result = run_blocking(move || {
        match body {
            Body::Otp(km) => open_otp(&h, &raw, km, &mut reader, &mut out)?,
            Body::Chunks(ks) => {
                // Pass 1: authenticate everything, write nothing.
                chunks_pass(&h, &raw, &ks, &mut reader, None)?;
                let body_start = raw.len() as u64;
                reader
                    .seek(SeekFrom::Start(body_start))
                    .map_err(|e| AppError::io("rewinding the sealed file", e))?;
                // Pass 2: authenticate again (the file may have changed) and write.
                chunks_pass(&h, &raw, &ks, &mut reader, Some(&mut out)).map_err(|e| match e {
                    AppError::Integrity(m) => AppError::Integrity(format!(
                        "{m} (the file changed while it was being opened)"
                    )),
                    e => e,
                })?;
            }
        }
        out.commit()
    })
    .await;
    let cache = opts.key_cache.as_ref();
    if let Err(e) = result {
        return Err(match (e, cache, source.cached_until) {
            (AppError::Integrity(m), Some(c), Some(until)) => AppError::Integrity(format!(
                "{m}; no output was written. The keys of this file stay in the key cache \
                 {} for {}, so an intact copy of it can still be opened",
                c.dir().display(),
                human_duration(until.saturating_sub(unix_secs(SystemTime::now())))
            )),
            (e, _, _) => e,
        });
    }
    if let (Some(c), true) = (cache, opts.forget_keys) {
        match c.forget(&header.sender, &header.key_ids) {
            Ok(_) => source.cached_until = None,
            Err(e) => source.warnings.push(format!(
                "could not delete the file's keys from the key cache: {e}"
            )),
        }
    }
    Ok(OpenReport {
        file,
        keys_from_cache: source.from_cache,
        keys_from_kme: source.from_kme,
        keys_cached_until: source.cached_until,
        warnings: source.warnings,
    })
}

/// Where the keys of an open came from.
#[derive(Debug, Default)]
struct KeySource {
    from_cache: u64,
    from_kme: u64,
    cached_until: Option<u64>,
    warnings: Vec<String>,
}

/// The file's keys, in order: from the cache where it has them, the rest from the
/// KME, each batch stored in the cache before it is used.
async fn file_keys(
    client: &EtsiClient,
    me: &SaeId,
    header: &Header,
    cache: Option<&KeyCache>,
    now: SystemTime,
) -> Result<(Vec<Key>, KeySource), AppError> {
    let ids = &header.key_ids;
    let mut src = KeySource::default();
    let mut unreadable = Vec::new();
    let mut have: Vec<Option<Key>> = match cache {
        None => ids.iter().map(|_| None).collect(),
        Some(c) => {
            let swept = c.sweep(now);
            src.warnings.extend(swept.warnings);
            let found = c.lookup(&header.sender, ids, now);
            src.cached_until = found.expires;
            unreadable = found.unreadable;
            src.warnings
                .extend(unreadable.iter().map(|w| format!("ignored: {w}")));
            found.keys
        }
    };
    src.from_cache = have.iter().filter(|k| k.is_some()).count() as u64;
    let missing: Vec<usize> = (0..ids.len()).filter(|&i| have[i].is_none()).collect();
    if !missing.is_empty() {
        let batch = check_identity_and_pool(client, me, &header.sender, 0, header.key_bits).await?;
        // `batch` is at most MAX_KEYS_PER_CALL, so it fits usize.
        for part in missing.chunks(batch.max(1) as usize) {
            let part_ids: Vec<Uuid> = part.iter().map(|&i| ids[i]).collect();
            let got = match client.dec_keys(header.sender.as_str(), &part_ids).await {
                Ok(k) => k,
                Err(ClientError::Api {
                    status: 400,
                    message,
                }) => {
                    return Err(keys_unavailable(
                        me,
                        header,
                        cache,
                        &src,
                        &unreadable,
                        &message,
                    ));
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(c) = cache {
                match c.store(&header.sender, &got, now) {
                    Ok(until) => {
                        src.cached_until = Some(src.cached_until.map_or(until, |u| u.max(until)));
                    }
                    Err(e) => src.warnings.push(format!(
                        "could not keep keys in the key cache {} ({e}): they are used now, \
                         and lost if this open fails",
                        c.dir().display()
                    )),
                }
            }
            src.from_kme += got.len() as u64;
            // dec_keys returns exactly the IDs asked for, in that order (checked by
            // the client); a mismatch leaves a slot empty, reported below.
            for (&i, k) in part.iter().zip(got) {
                if k.id == ids[i] {
                    have[i] = Some(k);
                }
            }
        }
    }
    let keys: Vec<Key> = have
        .into_iter()
        .collect::<Option<_>>()
        .ok_or_else(|| AppError::Internal("the KME did not return every key asked for".into()))?;
    let key_bytes = usize::from(header.key_bits / 8);
    if keys.iter().any(|k| k.material.len() != key_bytes) {
        return Err(AppError::Integrity(format!(
            "the file's keys are not {} bits long as its header says (modified header?)",
            header.key_bits
        )));
    }
    Ok((keys, src))
}

/// The error for keys that neither the KME nor the cache has.
fn keys_unavailable(
    me: &SaeId,
    h: &Header,
    cache: Option<&KeyCache>,
    src: &KeySource,
    unreadable: &[String],
    kme_said: &str,
) -> AppError {
    let n = h.key_ids.len();
    let cache_note = match cache {
        None => "no key cache was in use, so no copy of them is kept here".to_owned(),
        Some(c) if src.from_cache == 0 => {
            format!("no cached keys for it in {}", c.dir().display())
        }
        Some(c) => format!(
            "the key cache {} holds {} of its {n} keys",
            c.dir().display(),
            src.from_cache
        ),
    };
    let unreadable_note = match unreadable.first() {
        None => String::new(),
        Some(first) => format!(
            "; {} cached key(s) of it are unreadable (corrupted, or the SAE's TLS key \
             changed): {first}",
            unreadable.len()
        ),
    };
    AppError::KeysUnavailable(format!(
        "SAE {me}'s KME no longer has the keys of this file from {} (it answered: {kme_said}): \
         the file was already opened, here without a key cache or elsewhere, or its keys \
         were used up by another copy of it, or they never reached this KME; {cache_note}\
         {unreadable_note}",
        h.sender
    ))
}

/// "7 days", "5 hours", "12 minutes", "40 seconds" (rounded up).
fn human_duration(secs: u64) -> String {
    match secs {
        s if s > 2 * 86_400 => format!("{} days", s.div_ceil(86_400)),
        s if s > 2 * 3600 => format!("{} hours", s.div_ceil(3600)),
        s if s > 120 => format!("{} minutes", s.div_ceil(60)),
        s => format!("{s} seconds"),
    }
}

/// Reads the header of a sealed file (no KME involved), with its length in bytes.
pub fn read_header(path: &Path) -> Result<(Header, u64), AppError> {
    let (mut r, _) = open_input(path)?;
    let (h, raw) = Header::read(&mut r)?;
    Ok((h, raw.len() as u64))
}

/// Deletes from `cache` the keys of the sealed file `sealed` (read for its
/// header only); returns how many there were.
pub fn forget_sealed(cache: &KeyCache, sealed: &Path) -> Result<u64, AppError> {
    let (h, _) = read_header(sealed)?;
    if h.recipient != *cache.sae() {
        return Err(AppError::WrongRecipient {
            sealed_for: h.recipient.to_string(),
            as_sae: cache.sae().to_string(),
        });
    }
    cache.forget(&h.sender, &h.key_ids)
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

/// One pass over the chunks of a sealed body: every chunk is decrypted and its
/// tag checked; with `out`, its plaintext is then written. Ends with the check
/// that nothing follows the last chunk.
fn chunks_pass(
    h: &Header,
    raw: &[u8],
    keys: &[Sm4Key],
    input: &mut impl Read,
    mut out: Option<&mut TempOutput>,
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
            if let Some(o) = out.as_deref_mut() {
                o.write(&buf[..])?;
            }
        }
        let c = chunks - 1;
        let b = &mut buf[..last_len as usize];
        read_exactly(input, b, || cut(c))?;
        read_exactly(input, &mut tag, || cut(c))?;
        opener.open_last(&aad, b, &tag).map_err(|_| forged(c))?;
        if let Some(o) = out.as_deref_mut() {
            o.write(b)?;
        }
    }
    let mut probe = [0u8; 1];
    if read_some(input, &mut probe, "reading the sealed file")? != 0 {
        return Err(AppError::Integrity(
            "data after the last chunk (the file was extended)".into(),
        ));
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
    let mut probe = [0u8; 1];
    if read_some(input, &mut probe, "reading the sealed file")? != 0 {
        return Err(AppError::Integrity(
            "data after the tag (the file was extended)".into(),
        ));
    }
    one_time_pad(pad, &mut data)?;
    out.write(&data)
}
