//! `connect.json` (the SAE's map of SAEs, KMEs and credential paths): any text
//! parses and checks into a connect file or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_etsi::connect::ConnectFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ConnectFile::parse(text);
    }
});
