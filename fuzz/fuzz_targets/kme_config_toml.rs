//! A standalone KME's TOML configuration: any text parses and checks into a
//! configuration or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_kms::config::KmeConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = KmeConfig::from_toml(text);
    }
});
