//! A key cache entry (`qkdnet_apps::keycache`), read back from the recipient's
//! disk where anyone with write access may have changed it: any bytes give an
//! error or an entry, never a panic; a frame that parses has the lengths the
//! format allows; arbitrary bytes never decrypt; and key material of any allowed
//! length round-trips through encode and decode.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_apps::keycache::{DEFAULT_LIFETIME, EntryFrame, KeyCache, MAX_ENTRY_LEN, MAX_KEY_BYTES};
use qkdnet_kms::ids::SaeId;
use uuid::Uuid;

fuzz_target!(|data: &[u8]| {
    let cache =
        KeyCache::new("unused", "bob", b"fuzz TLS key", DEFAULT_LIFETIME).expect("a valid cache");
    let sender = SaeId::new("alice").expect("valid");
    let id = Uuid::from_u128(1);
    if let Ok(f) = EntryFrame::parse(data) {
        assert!(data.len() <= MAX_ENTRY_LEN);
        assert!(!f.ciphertext.is_empty() && f.ciphertext.len() <= MAX_KEY_BYTES);
    }
    // Forging a tag is not what a fuzzer finds: arbitrary bytes never decode.
    assert!(cache.decode_entry(&sender, &id, data).is_err());
    let material = &data[..data.len().min(MAX_KEY_BYTES)];
    match cache.encode_entry(&sender, &id, material, 1234) {
        Ok(e) => {
            let (back, expires) = cache.decode_entry(&sender, &id, &e).expect("round trip");
            assert_eq!((&back[..], expires), (material, 1234));
        }
        Err(_) => assert!(material.is_empty()),
    }
});
