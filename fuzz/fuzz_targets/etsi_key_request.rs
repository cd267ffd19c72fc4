//! ETSI GS QKD 014 key request (POST enc_keys body): any bytes decode to a request
//! or a 400 error; a decoded request validates or is refused, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_kms::etsi::{Limits, decode_key_request};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = decode_key_request(data) {
        let _ = r.validate(&Limits::default());
    }
});
