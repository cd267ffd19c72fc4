//! ETSI GS QKD 014 key IDs (POST dec_keys body): any bytes decode to key IDs or a
//! 400 error; validation (UUIDs, distinct, within limits) never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_kms::etsi::{Limits, decode_key_ids};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = decode_key_ids(data) {
        let _ = r.validate(&Limits::default());
    }
});
