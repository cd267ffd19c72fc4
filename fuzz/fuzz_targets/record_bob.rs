//! Bob's detection records: any bytes give detections or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = qkdnet_optics::record::BobReader::new(data) {
        let _ = r.read_all();
    }
});
