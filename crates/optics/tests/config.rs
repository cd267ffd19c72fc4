//! Device configurations: bad values are refused with messages that say why.

use qkdnet_optics::device::{Eve, LinkConfig};
use qkdnet_optics::preset;

fn with(from: &str, to: &str) -> Result<LinkConfig, String> {
    let t = preset::text("gys2004").unwrap();
    assert!(t.contains(from), "fixture drift: {from}");
    LinkConfig::from_toml(&t.replace(from, to)).map_err(|e| e.to_string())
}

#[test]
fn out_of_range_values_name_their_bound() {
    let e = with("efficiency = 0.045", "efficiency = 1.5").unwrap_err();
    assert!(e.contains("[0, 1]") && e.contains("1.5"), "{e}");
    let e = with("length_km = 50.0", "length_km = -3.0").unwrap_err();
    assert!(e.contains(">= 0"), "{e}");
    let e = with("prob = 0.8", "prob = 0.7").unwrap_err();
    assert!(e.contains("sum to 1"), "{e}");
    let e = with("ec_efficiency = 1.22", "ec_efficiency = 0.9").unwrap_err();
    assert!(e.contains("ec_efficiency"), "{e}");
    let e = with("kind = \"fibre\"", "kind = \"wormhole\"").unwrap_err();
    assert!(e.contains("wormhole"), "{e}");
    let e = with("misalignment = 0.033", "misalignment = 0.033\ncolour = 3").unwrap_err();
    assert!(e.contains("colour"), "{e}");
    assert!(with("length_km = 50.0", "length_km = nan").is_err());
}

#[test]
fn distances_and_eves_are_checked() {
    let link = preset::get("gys2004").unwrap();
    assert!(link.at_distance(-1.0).is_err());
    assert!(link.at_distance(f64::NAN).is_err());
    let sat = preset::get("micius2017").unwrap();
    assert!(sat.at_distance(300.0).is_err(), "below the orbit");
    assert!(sat.at_distance(1200.0).is_ok());
    assert!(Eve::parse("intercept-resend:1.2").is_err());
    assert!(Eve::parse("intercept-resend:x").is_err());
    assert!(Eve::parse("mitm").is_err());
    assert_eq!(Eve::parse("none").unwrap(), Eve::None);
}

proptest::proptest! {
    #[test]
    fn arbitrary_toml_never_panics(s in ".{0,400}") {
        let _ = LinkConfig::from_toml(&s);
    }
}
