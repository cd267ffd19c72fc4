//! Sealed files end to end: two KMEs in-process, alice seals for bob, bob opens.

#[path = "apps_common/mod.rs"]
mod common;

use common::*;
use qkdnet_apps::format::Mode;
use qkdnet_apps::keycache::{DEFAULT_LIFETIME, KeyCache};
use qkdnet_apps::seal::{OpenOptions, SealOptions, open, open_with, read_header, seal};
use qkdnet_apps::{AppError, OpenReport, SealReport};
use qkdnet_crypto::hybrid::MlKemDecapsulationKey;

/// Small chunks and rekey interval so that tests cross both boundaries.
fn small() -> SealOptions {
    SealOptions {
        chunk_size: 1024,
        rekey_bytes: 4096,
        ..SealOptions::default()
    }
}

async fn seal_for_bob(net: &Net, name: &str, plain: &[u8], opts: &SealOptions) -> SealReport {
    let input = net.file(&format!("{name}.plain"), plain);
    seal(
        &net.client("alice"),
        "alice",
        "bob",
        &input,
        &net.path(&format!("{name}.sealed")),
        opts,
    )
    .await
    .expect("seal")
}

async fn bob_opens(net: &Net, name: &str) -> Result<OpenReport, AppError> {
    open(
        &net.client("bob"),
        "bob",
        &net.path(&format!("{name}.sealed")),
        &net.path(&format!("{name}.out")),
    )
    .await
}

fn opened(net: &Net, name: &str) -> Vec<u8> {
    std::fs::read(net.path(&format!("{name}.out"))).expect("output")
}

#[tokio::test]
async fn round_trips_empty_small_and_rekeyed_files() {
    let net = Net::start().await;
    for (name, len, opts) in [
        ("empty", 0, SealOptions::default()),
        ("small", 1000, SealOptions::default()),
        ("empty-small-chunks", 0, small()),
        ("exact", 8192, small()),   // two full segments, no short chunk
        ("multi", 10_000, small()), // 3 segments, 10 chunks
    ] {
        let plain = data(len, 1);
        let r = seal_for_bob(&net, name, &plain, &opts).await;
        let (h, header_len) = read_header(&net.path(&format!("{name}.sealed"))).expect("header");
        assert_eq!(
            h.key_ids, r.key_ids,
            "{name}: header lists the enc_keys IDs"
        );
        assert_eq!(h.sender.as_str(), "alice");
        assert_eq!(h.recipient.as_str(), "bob");
        let sealed_len = std::fs::metadata(net.path(&format!("{name}.sealed")))
            .expect("sealed")
            .len();
        assert_eq!(r.sealed_bytes, sealed_len, "{name}");
        assert_eq!(
            sealed_len,
            header_len + len as u64 + 16 * r.chunks,
            "{name}"
        );
        let o = bob_opens(&net, name).await.expect("open");
        assert_eq!(opened(&net, name), plain, "{name}");
        assert_eq!(o.file, r, "{name}: both ends report the same");
        assert_eq!(r.key_bits_consumed, 256 * r.key_ids.len() as u64);
    }
    let (h, _) = read_header(&net.path("multi.sealed")).expect("header");
    assert_eq!(
        (h.key_ids.len(), h.chunk_size, h.rekey_bytes),
        (3, 1024, 4096)
    );
    let r = bob_opens(&net, "exact").await;
    assert!(
        matches!(r, Err(AppError::KeysUnavailable(_))),
        "keys are delivered once (no key cache here): {r:?}"
    );
}

#[tokio::test]
async fn header_key_ids_are_the_ones_enc_keys_returned() {
    let net = Net::start().await;
    let r = seal_for_bob(&net, "f", &data(5000, 2), &small()).await;
    let (h, _) = read_header(&net.path("f.sealed")).expect("header");
    assert_eq!(h.key_ids, r.key_ids);
    assert_eq!(h.key_ids.len(), 2);
    // bob can fetch exactly these IDs from his KME, with alice as master...
    let keys = net
        .client("bob")
        .dec_keys("alice", &h.key_ids)
        .await
        .expect("dec_keys");
    assert!(keys.iter().all(|k| k.material.len() == 32));
    // ...after which they are spent: without a key cache holding them the file
    // can no longer be opened, the error says why, and no output appears.
    let e = bob_opens(&net, "f").await.unwrap_err();
    assert!(
        matches!(&e, AppError::KeysUnavailable(m) if m.contains("no longer has the keys")
            && m.contains("already opened") && m.contains("no key cache")),
        "{e}"
    );
    assert_no_output(&net.dir, "f.out");
}

fn header_len(net: &Net, name: &str) -> usize {
    read_header(&net.path(&format!("{name}.sealed")))
        .expect("header")
        .1 as usize
}

/// Seals a fresh 10 000-byte file, lets `tamper` change the sealed bytes, and
/// expects `open` to fail without output.
async fn tampered(net: &Net, name: &str, tamper: impl FnOnce(&mut Vec<u8>, usize)) -> AppError {
    seal_for_bob(net, name, &data(10_000, 3), &small()).await;
    let path = net.path(&format!("{name}.sealed"));
    let mut bytes = std::fs::read(&path).expect("sealed");
    tamper(&mut bytes, header_len(net, name));
    std::fs::write(&path, &bytes).expect("write");
    let e = bob_opens(net, name)
        .await
        .expect_err("tampered file must not open");
    assert_no_output(&net.dir, &format!("{name}.out"));
    e
}

const FRAME: usize = 1024 + 16;

#[tokio::test]
async fn tampering_truncation_and_reordering_are_refused_without_output() {
    let net = Net::start().await;
    let e = tampered(&net, "flip", |b, h| b[h + 2 * FRAME + 100] ^= 0x01).await;
    assert!(
        matches!(&e, AppError::Integrity(m) if m.contains("segment 0, chunk 2")),
        "{e}"
    );
    let e = tampered(&net, "tag", |b, _| {
        let n = b.len();
        b[n - 1] ^= 0x80
    })
    .await;
    assert!(matches!(e, AppError::Integrity(_)), "{e}");
    let e = tampered(&net, "swap", |b, h| {
        let (c0, c1) = (h..h + FRAME, h + FRAME..h + 2 * FRAME);
        let first = b[c0.clone()].to_vec();
        b.copy_within(c1, c0.start);
        b[h + FRAME..h + 2 * FRAME].copy_from_slice(&first);
    })
    .await;
    assert!(
        matches!(&e, AppError::Integrity(m) if m.contains("chunk 0")),
        "{e}"
    );
    // Segment 1's first chunk in place of segment 0's (each segment is 4 chunks).
    let e = tampered(&net, "cross", |b, h| {
        let other = b[h + 4 * FRAME..h + 5 * FRAME].to_vec();
        b[h..h + FRAME].copy_from_slice(&other);
    })
    .await;
    assert!(matches!(e, AppError::Integrity(_)), "{e}");
    let e = tampered(&net, "trunc", |b, _| b.truncate(b.len() - 5)).await;
    assert!(
        matches!(&e, AppError::Integrity(m) if m.contains("truncated")),
        "{e}"
    );
    // Dropping the whole last chunk (a clean chunk boundary).
    let e = tampered(&net, "drop", |b, _| {
        let n = b.len();
        b.truncate(n - (10_000 - 9 * 1024 + 16))
    })
    .await;
    assert!(matches!(e, AppError::Integrity(_)), "{e}");
    let e = tampered(&net, "extend", |b, _| b.push(0)).await;
    assert!(matches!(e, AppError::Integrity(_)), "{e}");
    // The nonce prefix is in the header: changing it breaks every chunk.
    let e = tampered(&net, "prefix", |b, h| {
        b[h - 4 - 16 * 3 - 1] ^= 1;
    })
    .await;
    assert!(matches!(e, AppError::Integrity(_)), "{e}");
    let e = tampered(&net, "magic", |b, _| b[0] = b'X').await;
    assert!(matches!(e, AppError::Format(_)), "{e}");
}

#[tokio::test]
async fn an_existing_output_survives_a_failed_open() {
    let net = Net::start().await;
    seal_for_bob(&net, "keep", &data(3000, 4), &small()).await;
    let path = net.path("keep.sealed");
    let mut bytes = std::fs::read(&path).expect("sealed");
    let n = bytes.len();
    bytes[n - 20] ^= 1;
    std::fs::write(&path, &bytes).expect("write");
    std::fs::write(net.path("keep.out"), b"precious").expect("write");
    assert!(bob_opens(&net, "keep").await.is_err());
    assert_eq!(opened(&net, "keep"), b"precious");
}

#[tokio::test]
async fn only_the_recipient_opens() {
    let net = Net::start().await;
    seal_for_bob(&net, "m", &data(2000, 5), &small()).await;
    let sealed = net.path("m.sealed");
    // carol, with her own certificate, is told whom the file is for; no key is used.
    let e = open(&net.client("carol"), "carol", &sealed, &net.path("m.out"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AppError::WrongRecipient { sealed_for, as_sae } if sealed_for == "bob" && as_sae == "carol"),
        "{e}"
    );
    // carol's certificate claiming to be bob.
    let e = open(&net.client("carol"), "bob", &sealed, &net.path("m.out"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AppError::InvalidInput(m) if m.contains("carol")),
        "{e}"
    );
    // A header rewritten to name carol: her KME answers as for unknown keys (400),
    // and bob's keys are not touched.
    let (mut h, len) = read_header(&sealed).expect("header");
    h.recipient = qkdnet_kms::ids::SaeId::new("carol").expect("valid");
    let mut bytes = std::fs::read(&sealed).expect("sealed");
    let mut forged = h.encode();
    forged.extend_from_slice(&bytes.split_off(len as usize));
    let forged_path = net.file("forged.sealed", &forged);
    let e = open(
        &net.client("carol"),
        "carol",
        &forged_path,
        &net.path("m.out"),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, AppError::KeysUnavailable(_)), "{e}");
    assert_no_output(&net.dir, "m.out");
    // bob still can.
    bob_opens(&net, "m").await.expect("bob opens");
    assert_eq!(opened(&net, "m"), data(2000, 5));
}

#[tokio::test]
async fn otp_mode_round_trip_and_tamper() {
    let net = Net::start().await;
    let opts = SealOptions {
        mode: Mode::Otp,
        ..SealOptions::default()
    };
    let msg = b"attack at dawn".to_vec();
    let r = seal_for_bob(&net, "otp", &msg, &opts).await;
    assert_eq!(r.mode, Mode::Otp);
    assert_eq!(r.key_ids.len(), 2); // 14 + 32 bytes need two 256-bit keys
    assert_eq!(r.key_bits_consumed, 512);
    assert_eq!(r.key_bits_used, (14 + 32) * 8);
    let o = bob_opens(&net, "otp").await.expect("open");
    assert_eq!(opened(&net, "otp"), msg);
    assert_eq!(o.file, r);

    let r = seal_for_bob(&net, "otp-empty", b"", &opts).await;
    assert_eq!(r.key_ids.len(), 1);
    bob_opens(&net, "otp-empty").await.expect("open");
    assert_eq!(opened(&net, "otp-empty"), b"");

    seal_for_bob(&net, "otp-bad", &data(3000, 6), &opts).await;
    let path = net.path("otp-bad.sealed");
    let mut bytes = std::fs::read(&path).expect("sealed");
    let n = bytes.len();
    bytes[n - 100] ^= 4;
    std::fs::write(&path, &bytes).expect("write");
    let e = bob_opens(&net, "otp-bad").await.unwrap_err();
    assert!(matches!(e, AppError::Integrity(_)), "{e}");
    assert_no_output(&net.dir, "otp-bad.out");

    // Too long for OTP: refused before any key is taken.
    let big = net.file("big.plain", &data(70 << 10, 7));
    let e = seal(
        &net.client("alice"),
        "alice",
        "bob",
        &big,
        &net.path("big.sealed"),
        &opts,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, AppError::InvalidInput(_)), "{e}");
    assert_no_output(&net.dir, "big.sealed");
}

#[tokio::test]
async fn hybrid_mode_needs_the_right_mlkem_key() {
    let net = Net::start().await;
    let dk = MlKemDecapsulationKey::generate();
    let opts = SealOptions {
        mode: Mode::Hybrid,
        recipient_mlkem: Some(dk.encapsulation_key()),
        ..small()
    };
    let plain = data(6000, 8);
    for name in ["h1", "h2", "h3"] {
        seal_for_bob(&net, name, &plain, &opts).await;
    }
    let (h, _) = read_header(&net.path("h1.sealed")).expect("header");
    assert_eq!(h.mode, Mode::Hybrid);
    assert!(h.mlkem.is_some());

    let bob = net.client("bob");
    // Without the key, or with another one: refused before dec_keys.
    let e = bob_opens(&net, "h1").await.unwrap_err();
    assert!(matches!(e, AppError::InvalidInput(_)), "{e}");
    let other = OpenOptions {
        mlkem_key: Some(MlKemDecapsulationKey::generate()),
        ..OpenOptions::default()
    };
    let e = open_with(
        &bob,
        "bob",
        &net.path("h1.sealed"),
        &net.path("h1.out"),
        &other,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, AppError::InvalidInput(_)), "{e}");
    assert_no_output(&net.dir, "h1.out");

    let right = OpenOptions {
        mlkem_key: Some(MlKemDecapsulationKey::from_seed(&dk.to_seed())),
        ..OpenOptions::default()
    };
    open_with(
        &bob,
        "bob",
        &net.path("h1.sealed"),
        &net.path("h1.out"),
        &right,
    )
    .await
    .expect("open");
    assert_eq!(opened(&net, "h1"), plain);

    // Tampering with the ML-KEM ciphertext changes every key.
    let path = net.path("h2.sealed");
    let mut bytes = std::fs::read(&path).expect("sealed");
    let hl = header_len(&net, "h2");
    bytes[hl - 10] ^= 1;
    std::fs::write(&path, &bytes).expect("write");
    let e = open_with(&bob, "bob", &path, &net.path("h2.out"), &right)
        .await
        .unwrap_err();
    assert!(matches!(e, AppError::Integrity(_)), "{e}");
    assert_no_output(&net.dir, "h2.out");

    // Hybrid without a public key (and a public key without hybrid) is a usage error.
    let e = seal(
        &net.client("alice"),
        "alice",
        "bob",
        &net.path("h3.plain"),
        &net.path("h4.sealed"),
        &SealOptions {
            mode: Mode::Hybrid,
            ..SealOptions::default()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(e, AppError::InvalidInput(_)), "{e}");
}

#[tokio::test]
async fn usage_errors_are_caught_before_keys_are_taken() {
    let net = Net::start().await;
    let input = net.file("u.plain", b"hello");
    let alice = net.client("alice");
    let out = net.path("u.sealed");
    let e = seal(
        &alice,
        "bob",
        "carol",
        &input,
        &out,
        &SealOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, AppError::InvalidInput(m) if m.contains("alice")),
        "{e}"
    );
    let e = seal(
        &alice,
        "alice",
        "alice",
        &input,
        &out,
        &SealOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, AppError::InvalidInput(_)), "{e}");
    let e = seal(
        &alice,
        "alice",
        "bob",
        &input,
        &out,
        &SealOptions {
            chunk_size: 1000,
            rekey_bytes: 1500,
            ..SealOptions::default()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(e, AppError::InvalidInput(_)), "{e}");
    let e = seal(
        &alice,
        "alice",
        "bob",
        &net.path("missing.plain"),
        &out,
        &SealOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("missing.plain"), "{e}");
    assert_no_output(&net.dir, "u.sealed");
    // The pool was not touched: alice still has all her keys.
    let st = alice.status("bob").await.expect("status");
    assert_eq!(st.stored_key_count, BLOCKS * 32);
}

#[tokio::test]
async fn a_multi_mib_file_streams_with_default_chunks() {
    let net = Net::start().await;
    let plain = data(3 << 20 | 12_345, 9);
    let opts = SealOptions {
        rekey_bytes: 1 << 20,
        ..SealOptions::default()
    };
    let r = seal_for_bob(&net, "big", &plain, &opts).await;
    assert_eq!(r.key_ids.len(), 4);
    assert_eq!(r.chunks, 3 * 16 + 1);
    bob_opens(&net, "big").await.expect("open");
    assert!(opened(&net, "big") == plain);
}

/// bob's key cache in the test network, with entries living `lifetime`.
fn bob_cache(net: &Net, lifetime: std::time::Duration) -> KeyCache {
    KeyCache::with_tls_key_file(
        net.path("keycache/bob"),
        "bob",
        &net.path("pki/sae-bob.key"),
        lifetime,
    )
    .expect("key cache")
}

async fn bob_opens_cached(
    net: &Net,
    sealed: &str,
    out: &str,
    cache: KeyCache,
) -> Result<OpenReport, AppError> {
    open_with(
        &net.client("bob"),
        "bob",
        &net.path(sealed),
        &net.path(out),
        &OpenOptions {
            key_cache: Some(cache),
            ..OpenOptions::default()
        },
    )
    .await
}

/// Files in bob's key cache (entries only).
fn cache_entries(net: &Net) -> Vec<std::path::PathBuf> {
    match std::fs::read_dir(net.path("keycache/bob")) {
        Err(_) => Vec::new(),
        Ok(d) => d
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "qkc"))
            .collect(),
    }
}

/// Issue #27 item 2: with a key cache, a file opens twice, and a tampered copy
/// opened first does not cost the original its keys.
#[tokio::test]
async fn issue_27_a_cached_file_reopens_and_survives_a_tampered_copy_first() {
    let net = Net::start().await;
    let plain = data(10_000, 11);
    let r = seal_for_bob(&net, "orig", &plain, &small()).await;
    assert_eq!(r.key_ids.len(), 3);
    let mut bytes = std::fs::read(net.path("orig.sealed")).expect("sealed");
    let n = bytes.len();
    bytes[n - 30] ^= 1; // in the last chunk
    std::fs::write(net.path("copy.sealed"), &bytes).expect("write");

    let e = bob_opens_cached(
        &net,
        "copy.sealed",
        "copy.out",
        bob_cache(&net, DEFAULT_LIFETIME),
    )
    .await
    .expect_err("the tampered copy must not open");
    assert!(
        matches!(&e, AppError::Integrity(m) if m.contains("segment 2")
            && m.contains("stay in the key cache") && m.contains("7 days")),
        "{e}"
    );
    assert_no_output(&net.dir, "copy.out");
    assert_eq!(cache_entries(&net).len(), 3, "the keys were kept");

    let o = bob_opens_cached(
        &net,
        "orig.sealed",
        "orig.out",
        bob_cache(&net, DEFAULT_LIFETIME),
    )
    .await
    .expect("the original opens after the tampered copy");
    assert_eq!(opened(&net, "orig"), plain);
    assert_eq!(o.file, r);
    assert_eq!((o.keys_from_cache, o.keys_from_kme), (3, 0));
    assert!(o.keys_cached_until.is_some());
    assert!(o.warnings.is_empty(), "{:?}", o.warnings);

    // Again (the KME no longer has the keys; the cache does).
    std::fs::remove_file(net.path("orig.out")).expect("remove");
    bob_opens_cached(
        &net,
        "orig.sealed",
        "orig.out",
        bob_cache(&net, DEFAULT_LIFETIME),
    )
    .await
    .expect("opens a second time");
    assert_eq!(opened(&net, "orig"), plain);

    // Discarding after a successful open: the entries go, and the next open says why it fails.
    open_with(
        &net.client("bob"),
        "bob",
        &net.path("orig.sealed"),
        &net.path("orig.out"),
        &OpenOptions {
            key_cache: Some(bob_cache(&net, DEFAULT_LIFETIME)),
            forget_keys: true,
            ..OpenOptions::default()
        },
    )
    .await
    .expect("opens a third time");
    assert!(cache_entries(&net).is_empty());
    let e = bob_opens_cached(
        &net,
        "orig.sealed",
        "orig.out",
        bob_cache(&net, DEFAULT_LIFETIME),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, AppError::KeysUnavailable(m) if m.contains("already opened")
            && m.contains("no cached keys for it in")),
        "{e}"
    );
}

/// Entries expire (the lifetime is an option; the test moves the clock of the
/// sweep forward instead of sleeping).
#[tokio::test]
async fn an_expired_cache_entry_is_gone() {
    let net = Net::start().await;
    let plain = data(3000, 12);
    seal_for_bob(&net, "exp", &plain, &small()).await;
    let hour = std::time::Duration::from_secs(3600);
    let o = bob_opens_cached(&net, "exp.sealed", "exp.out", bob_cache(&net, hour))
        .await
        .expect("open");
    assert_eq!(o.keys_from_kme, 1);
    assert_eq!(cache_entries(&net).len(), 1);
    let cache = bob_cache(&net, hour);
    let now = std::time::SystemTime::now();
    assert_eq!(cache.sweep(now).removed, 0, "not expired yet");
    let swept = cache.sweep(now + 2 * hour);
    assert_eq!(swept.removed, 1);
    assert!(swept.warnings.is_empty(), "{:?}", swept.warnings);
    assert!(cache_entries(&net).is_empty());
    let e = bob_opens_cached(&net, "exp.sealed", "exp2.out", bob_cache(&net, hour))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AppError::KeysUnavailable(m) if m.contains("no cached keys")),
        "{e}"
    );
    assert_no_output(&net.dir, "exp2.out");
}

/// A tampered copy stores the keys it fetched before it fails; the cache file
/// holds them encrypted (the raw key bytes appear nowhere in it), and a corrupted
/// entry is reported, not used, and not deleted.
#[tokio::test]
async fn cache_entries_hold_no_key_bytes_in_clear_and_corruption_is_reported() {
    let net = Net::start().await;
    seal_for_bob(&net, "one", &data(500, 13), &SealOptions::default()).await;
    // A key alice takes herself: the test knows its bytes.
    let key = net
        .client("alice")
        .enc_keys("bob", 1, Some(256))
        .await
        .expect("enc_keys")
        .pop()
        .expect("one key");
    // A copy of "one" whose header names that key instead.
    let sealed = net.path("one.sealed");
    let (mut h, len) = read_header(&sealed).expect("header");
    h.key_ids = vec![key.id];
    let mut forged = h.encode();
    forged.extend_from_slice(&std::fs::read(&sealed).expect("sealed")[len as usize..]);
    std::fs::write(net.path("forged.sealed"), &forged).expect("write");
    let e = bob_opens_cached(
        &net,
        "forged.sealed",
        "forged.out",
        bob_cache(&net, DEFAULT_LIFETIME),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, AppError::Integrity(_)), "{e}");
    let entries = cache_entries(&net);
    assert_eq!(entries.len(), 1);
    let stored = std::fs::read(&entries[0]).expect("entry");
    assert!(
        !stored
            .windows(key.material.len())
            .any(|w| w == &key.material[..]),
        "raw key bytes in the cache file"
    );
    // Every 8-byte piece of the key is absent too.
    for piece in key.material.chunks(8) {
        assert!(!stored.windows(8).any(|w| w == piece), "key bytes in clear");
    }

    // Corrupt the entry: reported in the error, kept on disk.
    let mut bad = stored.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    std::fs::write(&entries[0], &bad).expect("write");
    let e = bob_opens_cached(
        &net,
        "forged.sealed",
        "forged.out",
        bob_cache(&net, DEFAULT_LIFETIME),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, AppError::KeysUnavailable(m) if m.contains("unreadable")),
        "{e}"
    );
    assert!(entries[0].exists());
    // A cache under another TLS key reads none of it, and says so.
    let other = KeyCache::new(
        net.path("keycache/bob"),
        "bob",
        b"another TLS key",
        DEFAULT_LIFETIME,
    )
    .expect("cache");
    std::fs::write(&entries[0], &stored).expect("restore");
    let e = bob_opens_cached(&net, "forged.sealed", "forged.out", other)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AppError::KeysUnavailable(m) if m.contains("another TLS key")),
        "{e}"
    );
    // The right cache still has it (the integrity failure is the forged body's).
    let e = bob_opens_cached(
        &net,
        "forged.sealed",
        "forged.out",
        bob_cache(&net, DEFAULT_LIFETIME),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, AppError::Integrity(_)), "{e}");
}

/// The futures can run on a multi-threaded runtime (`tokio::spawn`).
#[allow(dead_code)]
fn futures_are_send(c: &qkdnet_kms::client::EtsiClient, p: &std::path::Path, o: &SealOptions) {
    fn send<T: Send>(_: T) {}
    send(seal(c, "a", "b", p, p, o));
    send(open(c, "b", p, p));
}
