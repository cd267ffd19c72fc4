//! The identity (`sae:ID` / `kme:ID`) read from a peer's certificate: any DER
//! bytes give an identity or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_etsi::identity::identity_from_cert;

fuzz_target!(|data: &[u8]| {
    let _ = identity_from_cert(data);
});
