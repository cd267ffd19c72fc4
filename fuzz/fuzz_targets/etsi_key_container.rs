//! A KME's key container as the SAE client decodes it (enc_keys/dec_keys
//! answers): any bytes give keys or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_etsi::client::decode_keys;
use qkdnet_etsi::wire::KeyContainer;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = serde_json::from_slice::<KeyContainer>(data) {
        let _ = decode_keys(&c);
    }
});
