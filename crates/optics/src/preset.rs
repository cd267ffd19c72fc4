//! Built-in device presets, each a TOML file under `presets/` citing its source.
//!
//! Presets are data, not code, so a user can copy one, change a number and
//! pass the file instead of the name (`--preset my-link.toml`).

use crate::OpticsError;
use crate::device::LinkConfig;

const PRESETS: &[(&str, &str)] = &[
    ("gys2004", include_str!("../presets/gys2004.toml")),
    ("lim2014", include_str!("../presets/lim2014.toml")),
    ("micius2017", include_str!("../presets/micius2017.toml")),
    ("qd-sps-2025", include_str!("../presets/qd-sps-2025.toml")),
    ("metro-1ghz", include_str!("../presets/metro-1ghz.toml")),
];

/// Names of the built-in presets.
pub fn names() -> Vec<&'static str> {
    PRESETS.iter().map(|(n, _)| *n).collect()
}

/// The TOML text of a built-in preset.
pub fn text(name: &str) -> Option<&'static str> {
    PRESETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// Loads a built-in preset by name.
pub fn get(name: &str) -> Result<LinkConfig, OpticsError> {
    let text = text(name).ok_or_else(|| OpticsError::UnknownPreset {
        name: name.to_string(),
        available: names().join(", "),
    })?;
    LinkConfig::from_toml(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_and_is_named_after_its_file() {
        for n in names() {
            let cfg = get(n).unwrap_or_else(|e| panic!("{n}: {e}"));
            assert_eq!(cfg.name, n);
        }
        assert!(matches!(
            get("nope"),
            Err(OpticsError::UnknownPreset { .. })
        ));
    }
}
