//! Alice's records: any bytes give a record or an error; a record answers any gate.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = qkdnet_optics::record::AliceRecord::read_from(&mut &data[..]) {
        for g in [0, 1, r.span.first_gate, r.span.first_gate.wrapping_add(r.span.gates), u64::MAX] {
            let _ = r.choice(g);
        }
    }
});
