//! ETSI GS QKD 014 GET query strings (enc_keys `number`/`size`, dec_keys `key_ID`)
//! and the client-certificate identity reader: never panic on any input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_kms::etsi::{Limits, parse_dec_query, parse_enc_query, validate_ids};

fuzz_target!(|data: &[u8]| {
    let _ = qkdnet_kms::identity::identity_from_cert(data);
    let Ok(q) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = parse_enc_query(Some(q)) {
        let _ = r.validate(&Limits::default());
    }
    if let Ok(id) = parse_dec_query(Some(q)) {
        let _ = validate_ids(std::iter::once(id.as_str()), 1, &Limits::default());
    }
});
