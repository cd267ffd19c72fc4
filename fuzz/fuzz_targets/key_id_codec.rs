//! Opaque key IDs (what any SAE sends in dec_keys): every 128-bit value either
//! decodes to an internal unit ID that encodes back to it, or is refused;
//! never a panic. The secret comes from the input too.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_kms::key_id::{KEY_ID_SECRET_LEN, KeyIdCodec};
use uuid::Uuid;

fuzz_target!(|data: &[u8]| {
    if data.len() < KEY_ID_SECRET_LEN + 16 {
        return;
    }
    let mut secret = [0u8; KEY_ID_SECRET_LEN];
    secret.copy_from_slice(&data[..KEY_ID_SECRET_LEN]);
    let mut id = [0u8; 16];
    id.copy_from_slice(&data[KEY_ID_SECRET_LEN..KEY_ID_SECRET_LEN + 16]);
    let codec = KeyIdCodec::opaque(&secret);
    let external = Uuid::from_bytes(id);
    if let Some(internal) = codec.internal(external) {
        assert_eq!(codec.external(internal), external, "decode then encode is the identity");
    }
});
