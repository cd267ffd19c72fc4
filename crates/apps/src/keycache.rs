//! The recipient's key cache: QKD keys fetched for sealed files, kept encrypted on
//! disk so that a file can be opened again, and so that a damaged copy cannot
//! use up the keys of the intact original.
//!
//! # Why
//!
//! A KME hands each key out once (`dec_keys` deletes it). Without a cache,
//! opening a sealed file twice fails the second time, and opening a tampered copy
//! first spends the keys before its integrity check fails, after which the intact
//! original can no longer be opened (issue #27). The cache closes both holes:
//! [`crate::seal::open_with`] looks here first, fetches from the KME only the keys
//! that are missing, and **stores every fetched key here before using it**. A
//! failed open keeps the keys; a successful one keeps them too, for re-opening,
//! until the entry's lifetime ends ([`DEFAULT_LIFETIME`], 7 days) or the user
//! discards them ([`KeyCache::forget`], `qkdnet msg forget`, `msg open --forget`).
//! Expired entries are deleted at every use ([`KeyCache::sweep`]).
//!
//! # Which key protects the cache
//!
//! Each entry is encrypted with SM4-GCM under the *cache key*, derived with
//! HKDF-SM3 from the bytes of the recipient SAE's **TLS private key file** (the
//! one `connect.json` names for it):
//!
//! ```text
//! cache key = HKDF-SM3(salt = "qkdnet/keycache/v1", ikm = TLS private key file,
//!                      info = "sm4-gcm cache key" || SAE ID), 16 bytes
//! ```
//!
//! That private key is already what the KME trusts to hand this SAE its keys, so
//! the cache adds no new secret to guard, and its entries are worth nothing to
//! whoever lacks the credential that could have fetched those keys in the first
//! place (a stolen backup of the cache directory alone, another user of the
//! machine who can read the directory but not the key). A random key in a file
//! next to the cache would have protected only against copying one directory but
//! not the other. The cost: replacing the SAE's TLS key makes existing entries
//! unreadable; they are then reported (never silently dropped) and expire.
//!
//! # Layout
//!
//! One file per QKD key, `DIR/SENDER_KEYID.qkc` (mode 0600, directory 0700),
//! written to a temporary file, synced and renamed, then the directory synced, so
//! that a key is on disk before the open that fetched it goes on. One file per key
//! rather than per sealed file because a tampered copy may list the keys in
//! another order or only some of them; whatever copy fetched a key, the original
//! finds it by its ID. All integers big-endian:
//!
//! | field | size | |
//! |---|---|---|
//! | magic | 8 | `QKDNKEYC` |
//! | version | 1 | 1 |
//! | expires | 8 | Unix time (seconds) after which the entry is deleted |
//! | nonce | 12 | random per write |
//! | ciphertext | 1..=1024 | the key material, SM4-GCM |
//! | tag | 16 | |
//!
//! The AAD is `magic || version || expires || len || recipient SAE || len ||
//! sender SAE || key ID`: an entry cannot be moved to another key, sender or
//! recipient, nor its expiry extended. The expiry is in clear so that
//! [`KeyCache::sweep`] needs no decryption. Key material exists in clear only in
//! memory, in zeroizing buffers, and is never logged.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qkdnet_crypto::Sm4Key;
use qkdnet_crypto::gcm::{GCM_NONCE_LEN, GCM_TAG_LEN, GcmNonce, GcmTag, Sm4Gcm};
use qkdnet_crypto::kdf::hkdf_sm3;
use qkdnet_etsi::client::Key;
use qkdnet_etsi::ids::SaeId;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::AppError;
use crate::files::{TempOutput, remove_stale_open_outputs};
use crate::keys::{random_array, sae_id};

/// How long fetched keys stay in the cache by default: 7 days.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// First bytes of every cache entry.
pub const ENTRY_MAGIC: [u8; 8] = *b"QKDNKEYC";
/// The entry format version this code writes and reads.
pub const ENTRY_VERSION: u8 = 1;
/// Largest key the cache holds (8192 bits, the largest key a sealed file names).
pub const MAX_KEY_BYTES: usize = 1024;
/// Bytes before the ciphertext: magic, version, expiry, nonce.
const PREFIX_LEN: usize = 8 + 1 + 8 + GCM_NONCE_LEN;
/// Longest valid entry.
pub const MAX_ENTRY_LEN: usize = PREFIX_LEN + MAX_KEY_BYTES + GCM_TAG_LEN;
/// File name suffix of entries.
const SUFFIX: &str = ".qkc";
/// Salt of the cache key derivation.
const KDF_SALT: &[u8] = b"qkdnet/keycache/v1";

/// The key cache of one recipient SAE (see the module documentation).
pub struct KeyCache {
    dir: PathBuf,
    sae: SaeId,
    gcm: Sm4Gcm,
    lifetime: Duration,
}

impl core::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("KeyCache")
            .field("dir", &self.dir)
            .field("sae", &self.sae)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

/// An entry split into its fields, before decryption ([`EntryFrame::parse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryFrame<'a> {
    /// Unix time (seconds) after which the entry is deleted.
    pub expires: u64,
    /// The SM4-GCM nonce.
    pub nonce: GcmNonce,
    /// The encrypted key material (1..=[`MAX_KEY_BYTES`] bytes).
    pub ciphertext: &'a [u8],
    /// The SM4-GCM tag.
    pub tag: GcmTag,
}

impl<'a> EntryFrame<'a> {
    /// Splits an entry file's bytes; checks magic, version and lengths, nothing
    /// secret (the tag is checked by [`KeyCache::decode_entry`]).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, AppError> {
        let bad = |m: &str| AppError::Format(format!("key cache entry: {m}"));
        if bytes.len() > MAX_ENTRY_LEN {
            return Err(bad("too long"));
        }
        if bytes.len() < PREFIX_LEN + 1 + GCM_TAG_LEN {
            return Err(bad("too short"));
        }
        let (prefix, rest) = bytes.split_at(PREFIX_LEN);
        if prefix[..8] != ENTRY_MAGIC {
            return Err(bad("not a key cache entry (bad magic)"));
        }
        if prefix[8] != ENTRY_VERSION {
            return Err(bad(&format!("unknown version {}", prefix[8])));
        }
        let mut expires = [0u8; 8];
        expires.copy_from_slice(&prefix[9..17]);
        let mut nonce = [0u8; GCM_NONCE_LEN];
        nonce.copy_from_slice(&prefix[17..PREFIX_LEN]);
        let (ciphertext, tag_bytes) = rest.split_at(rest.len() - GCM_TAG_LEN);
        let mut tag = [0u8; GCM_TAG_LEN];
        tag.copy_from_slice(tag_bytes);
        Ok(Self {
            expires: u64::from_be_bytes(expires),
            nonce,
            ciphertext,
            tag,
        })
    }
}

/// What a look-up found.
#[derive(Debug)]
pub(crate) struct Lookup {
    /// The keys asked for, in order; `None` where the cache has none.
    pub keys: Vec<Option<Key>>,
    /// Entries that exist but cannot be read (corrupted, or another TLS key).
    pub unreadable: Vec<String>,
    /// The latest expiry among the keys found (Unix seconds).
    pub expires: Option<u64>,
}

/// What [`KeyCache::sweep`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sweep {
    /// Expired entries (and stale temporary files) deleted.
    pub removed: u64,
    /// Files that could not be read or deleted; left in place.
    pub warnings: Vec<String>,
}

/// Unix seconds of `t` (0 before 1970).
pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl KeyCache {
    /// The cache of SAE `sae` in `dir`, protected by a key derived from
    /// `tls_private_key` (the bytes of the SAE's TLS private key file), with
    /// entries living `lifetime` after they are written. Touches no file; the
    /// directory is created on the first write.
    pub fn new(
        dir: impl Into<PathBuf>,
        sae: &str,
        tls_private_key: &[u8],
        lifetime: Duration,
    ) -> Result<Self, AppError> {
        let sae = sae_id(sae, "recipient")?;
        if tls_private_key.is_empty() {
            return Err(AppError::InvalidInput(
                "the TLS private key that protects the key cache is empty".into(),
            ));
        }
        let okm = hkdf_sm3(
            KDF_SALT,
            tls_private_key,
            &[b"sm4-gcm cache key", sae.as_str().as_bytes()],
            Sm4Key::LEN,
        )?;
        let key = Sm4Key::from_slice(okm.expose_secret())?;
        Ok(Self {
            dir: dir.into(),
            sae,
            gcm: Sm4Gcm::new(&key),
            lifetime,
        })
    }

    /// [`KeyCache::new`] with the key read from the TLS private key file `path`.
    pub fn with_tls_key_file(
        dir: impl Into<PathBuf>,
        sae: &str,
        path: &Path,
        lifetime: Duration,
    ) -> Result<Self, AppError> {
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
            AppError::io(
                format!(
                    "cannot read the TLS private key {} that protects the key cache",
                    path.display()
                ),
                e,
            )
        })?);
        Self::new(dir, sae, &bytes, lifetime)
    }

    /// The default cache directory of SAE `sae`: `STATE/keycache/SAE`.
    pub fn default_dir(state_dir: &Path, sae: &str) -> PathBuf {
        state_dir.join("keycache").join(sae)
    }

    /// The cache's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The SAE whose keys this cache holds.
    pub fn sae(&self) -> &SaeId {
        &self.sae
    }

    /// How long entries live after they are written.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// The file of key `id` delivered for `sender`'s file.
    pub fn entry_path(&self, sender: &SaeId, id: &Uuid) -> PathBuf {
        self.dir
            .join(format!("{}_{}{SUFFIX}", sender.as_str(), id.hyphenated()))
    }

    fn aad(&self, expires: u64, sender: &SaeId, id: &Uuid) -> Vec<u8> {
        let (me, from) = (self.sae.as_str().as_bytes(), sender.as_str().as_bytes());
        let mut a = Vec::with_capacity(8 + 1 + 8 + 2 + me.len() + from.len() + 16);
        a.extend_from_slice(&ENTRY_MAGIC);
        a.push(ENTRY_VERSION);
        a.extend_from_slice(&expires.to_be_bytes());
        // SAE IDs are at most 64 bytes (qkdnet_etsi::ids), so their lengths fit a byte.
        a.push(me.len() as u8);
        a.extend_from_slice(me);
        a.push(from.len() as u8);
        a.extend_from_slice(from);
        a.extend_from_slice(id.as_bytes());
        a
    }

    /// The bytes of the entry holding `material` (key `id` from `sender`),
    /// expiring at Unix time `expires`.
    pub fn encode_entry(
        &self,
        sender: &SaeId,
        id: &Uuid,
        material: &[u8],
        expires: u64,
    ) -> Result<Vec<u8>, AppError> {
        if material.is_empty() || material.len() > MAX_KEY_BYTES {
            return Err(AppError::InvalidInput(format!(
                "a key of {} bytes cannot be cached (1 to {MAX_KEY_BYTES})",
                material.len()
            )));
        }
        let nonce: GcmNonce = random_array()?;
        let mut out = Vec::with_capacity(PREFIX_LEN + material.len() + GCM_TAG_LEN);
        out.extend_from_slice(&ENTRY_MAGIC);
        out.push(ENTRY_VERSION);
        out.extend_from_slice(&expires.to_be_bytes());
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(material);
        let tag = self.gcm.seal_in_place_detached(
            &nonce,
            &self.aad(expires, sender, id),
            &mut out[start..],
        )?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// The key material in an entry for key `id` from `sender`, with its expiry.
    /// Fails on anything but an intact entry written by this cache for that key.
    pub fn decode_entry(
        &self,
        sender: &SaeId,
        id: &Uuid,
        bytes: &[u8],
    ) -> Result<(Zeroizing<Vec<u8>>, u64), AppError> {
        let f = EntryFrame::parse(bytes)?;
        let mut material = Zeroizing::new(f.ciphertext.to_vec());
        self.gcm
            .open_in_place_detached(
                &f.nonce,
                &self.aad(f.expires, sender, id),
                &mut material,
                &f.tag,
            )
            .map_err(|_| {
                AppError::Integrity(format!(
                    "key cache entry does not authenticate (corrupted, or written under \
                     another TLS key of SAE {})",
                    self.sae
                ))
            })?;
        Ok((material, f.expires))
    }

    /// Deletes expired entries and temporary files of writers that were killed.
    /// Unreadable entries are reported and left alone (they may hold the only
    /// copy of a key).
    pub fn sweep(&self, now: SystemTime) -> Sweep {
        let mut s = Sweep::default();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return s; // no cache yet
        };
        let now = unix_secs(now);
        for e in entries.flatten() {
            let path = e.path();
            if !path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(SUFFIX) && !n.starts_with('.'))
            {
                continue;
            }
            match read_entry(&path) {
                Ok(Some(bytes)) => match EntryFrame::parse(&bytes) {
                    Ok(f) if f.expires <= now => match std::fs::remove_file(&path) {
                        Ok(()) => s.removed += 1,
                        Err(err) => s.warnings.push(format!(
                            "cannot delete the expired key cache entry {}: {err}",
                            path.display()
                        )),
                    },
                    Ok(_) => {}
                    Err(err) => s
                        .warnings
                        .push(format!("{}: {err}; left in place", path.display())),
                },
                Ok(None) => {}
                Err(err) => s.warnings.push(format!("{err}; left in place")),
            }
        }
        let (removed, problems) = remove_stale_open_outputs(&self.dir);
        s.removed += removed.len() as u64;
        s.warnings.extend(problems);
        s
    }

    /// The keys `ids` from `sender` that the cache holds and that have not expired
    /// at `now`. Expired entries found on the way are deleted.
    pub(crate) fn lookup(&self, sender: &SaeId, ids: &[Uuid], now: SystemTime) -> Lookup {
        let now = unix_secs(now);
        let mut l = Lookup {
            keys: Vec::with_capacity(ids.len()),
            unreadable: Vec::new(),
            expires: None,
        };
        for id in ids {
            let path = self.entry_path(sender, id);
            let found = match read_entry(&path) {
                Ok(None) => None,
                Ok(Some(bytes)) => match self.decode_entry(sender, id, &bytes) {
                    Ok((_, expires)) if expires <= now => {
                        let _ = std::fs::remove_file(&path);
                        None
                    }
                    Ok((material, expires)) => {
                        l.expires = Some(l.expires.map_or(expires, |e| e.max(expires)));
                        Some(Key { id: *id, material })
                    }
                    Err(e) => {
                        l.unreadable.push(format!("{}: {e}", path.display()));
                        None
                    }
                },
                Err(e) => {
                    l.unreadable.push(e.to_string());
                    None
                }
            };
            l.keys.push(found);
        }
        l
    }

    /// Writes `keys` (delivered for `sender`'s file) to the cache, each durable
    /// before this returns. Returns their expiry (Unix seconds).
    pub(crate) fn store(
        &self,
        sender: &SaeId,
        keys: &[Key],
        now: SystemTime,
    ) -> Result<u64, AppError> {
        let expires = unix_secs(now).saturating_add(self.lifetime.as_secs());
        create_private_dir(&self.dir)?;
        for k in keys {
            let bytes = self.encode_entry(sender, &k.id, &k.material, expires)?;
            let mut out = TempOutput::create_for_open(&self.entry_path(sender, &k.id))?;
            out.write(&bytes)?;
            out.commit()?;
        }
        // The renames are durable once the directory is.
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| AppError::io(format!("syncing {}", self.dir.display()), e))?;
        Ok(expires)
    }

    /// Deletes the cached keys `ids` from `sender`; returns how many there were.
    pub fn forget(&self, sender: &SaeId, ids: &[Uuid]) -> Result<u64, AppError> {
        let mut n = 0;
        for id in ids {
            let path = self.entry_path(sender, id);
            match std::fs::remove_file(&path) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(AppError::io(format!("deleting {}", path.display()), e)),
            }
        }
        Ok(n)
    }
}

/// An entry's bytes (at most one byte more than [`MAX_ENTRY_LEN`], which the
/// parser then refuses), or `None` if there is no such file.
fn read_entry(path: &Path) -> Result<Option<Vec<u8>>, AppError> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AppError::io(format!("cannot read {}", path.display()), e)),
    };
    let mut bytes = Vec::with_capacity(MAX_ENTRY_LEN + 1);
    f.take(MAX_ENTRY_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| AppError::io(format!("cannot read {}", path.display()), e))?;
    Ok(Some(bytes))
}

/// Creates `dir` (and its parents), the last level with mode 0700.
fn create_private_dir(dir: &Path) -> Result<(), AppError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
        .map_err(|e| AppError::io(format!("cannot create the key cache {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(dir: &Path, lifetime: Duration) -> KeyCache {
        KeyCache::new(dir, "bob", b"-----BEGIN PRIVATE KEY----- test", lifetime).expect("cache")
    }

    fn sae(s: &str) -> SaeId {
        SaeId::new(s).expect("valid")
    }

    fn tmp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("qkdnet-keycache-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn entries_round_trip_and_bind_key_sender_recipient_and_expiry() {
        let c = cache(Path::new("unused"), DEFAULT_LIFETIME);
        let (alice, id) = (sae("alice"), Uuid::from_u128(7));
        let material = [0x5a; 32];
        let e = c
            .encode_entry(&alice, &id, &material, 1000)
            .expect("encode");
        assert_eq!(e.len(), PREFIX_LEN + 32 + GCM_TAG_LEN);
        assert!(
            !e.windows(32).any(|w| w == material),
            "no key bytes in clear"
        );
        let (m, exp) = c.decode_entry(&alice, &id, &e).expect("decode");
        assert_eq!((&m[..], exp), (&material[..], 1000));
        // Another key ID, sender, recipient or cache key: refused.
        assert!(c.decode_entry(&alice, &Uuid::from_u128(8), &e).is_err());
        assert!(c.decode_entry(&sae("carol"), &id, &e).is_err());
        let carol = KeyCache::new(
            "unused",
            "carol",
            b"-----BEGIN PRIVATE KEY----- test",
            DEFAULT_LIFETIME,
        )
        .expect("cache");
        assert!(carol.decode_entry(&alice, &id, &e).is_err());
        let other =
            KeyCache::new("unused", "bob", b"another key", DEFAULT_LIFETIME).expect("cache");
        assert!(other.decode_entry(&alice, &id, &e).is_err());
        // A later expiry written in clear: refused.
        let mut later = e.clone();
        later[16] ^= 1;
        assert!(c.decode_entry(&alice, &id, &later).is_err());
        // Every truncation and every single-bit flip is an error, not a panic.
        for n in 0..e.len() {
            assert!(c.decode_entry(&alice, &id, &e[..n]).is_err(), "{n}");
        }
        for i in 0..e.len() {
            let mut b = e.clone();
            b[i] ^= 0x10;
            assert!(c.decode_entry(&alice, &id, &b).is_err(), "{i}");
        }
        assert!(c.encode_entry(&alice, &id, &[], 1).is_err());
        assert!(
            c.encode_entry(&alice, &id, &[0; MAX_KEY_BYTES + 1], 1)
                .is_err()
        );
    }

    #[test]
    fn store_lookup_expire_and_forget() {
        let dir = tmp_dir("store");
        let c = cache(&dir, Duration::from_secs(100));
        let alice = sae("alice");
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let keys: Vec<Key> = (0..3u8)
            .map(|i| Key {
                id: Uuid::from_u128(u128::from(i) + 1),
                material: Zeroizing::new(vec![i; 32]),
            })
            .collect();
        let ids: Vec<Uuid> = keys.iter().map(|k| k.id).collect();
        assert_eq!(c.sweep(t0), Sweep::default(), "no directory yet");
        assert_eq!(c.store(&alice, &keys[..2], t0).expect("store"), 1_000_100);
        let l = c.lookup(&alice, &ids, t0);
        assert!(l.unreadable.is_empty());
        assert_eq!(l.expires, Some(1_000_100));
        let found: Vec<Option<u8>> = l
            .keys
            .iter()
            .map(|k| k.as_ref().map(|k| k.material[0]))
            .collect();
        assert_eq!(found, [Some(0), Some(1), None]);
        // A corrupted entry is reported, not used, not deleted.
        let p = c.entry_path(&alice, &ids[1]);
        let mut b = std::fs::read(&p).expect("entry");
        let n = b.len();
        b[n - 1] ^= 1;
        std::fs::write(&p, &b).expect("write");
        let l = c.lookup(&alice, &ids, t0);
        assert_eq!(l.unreadable.len(), 1);
        assert!(l.keys[1].is_none());
        assert!(p.exists());
        // Not yet expired one second before; gone at expiry.
        assert_eq!(c.sweep(t0 + Duration::from_secs(99)).removed, 0);
        let s = c.sweep(t0 + Duration::from_secs(100));
        assert_eq!(s.removed, 2);
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        assert!(c.lookup(&alice, &ids, t0).keys.iter().all(Option::is_none));
        // forget
        c.store(&alice, &keys, t0).expect("store");
        assert_eq!(c.forget(&alice, &ids).expect("forget"), 3);
        assert_eq!(c.forget(&alice, &ids).expect("forget"), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
