//! Device presets (TOML): any text parses to a valid link or an error; a valid
//! link can be evaluated without panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_optics::keyrate::{Evaluator, Model, ModelOptions};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(link) = qkdnet_optics::device::LinkConfig::from_toml(text) {
        if let Ok(mut ev) = Evaluator::new(&link, ModelOptions { model: Model::DecoyInf, block_bits: 1e6, optimize: false }) {
            let _ = ev.at_distance(10.0);
        }
    }
});
