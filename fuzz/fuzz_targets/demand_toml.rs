//! Planner demand files (`qkdnet_net::plan::DemandFile::from_toml`), then the
//! planner's checks of each demand against a small fixed network. Any text
//! parses to demands or an error, never a panic; parsed demands serialise to
//! TOML that parses back to the same; planning with them either refuses them
//! or runs. Demand lists are capped in length and request rate so that one
//! input plans in well under a second.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use qkdnet_net::plan::{DemandFile, KeySource, PlanLink, PlanNetwork, PlanOptions, plan};

fn network() -> PlanNetwork {
    let link = |id: &str, a, b, source| PlanLink {
        id: id.into(),
        a,
        b,
        source,
        distance_km: None,
        preset: "fuzz".into(),
    };
    PlanNetwork {
        name: "fuzz".into(),
        nodes: vec!["n0".into(), "n1".into(), "n2".into()],
        saes: BTreeMap::from([
            ("a".into(), 0),
            ("b".into(), 1),
            ("c".into(), 2),
            ("d".into(), 2),
        ]),
        links: vec![
            link("n0-n1", 0, 1, KeySource::Continuous { bps: 1000.0 }),
            link("n1-n2", 1, 2, KeySource::Continuous { bps: 500.0 }),
            link(
                "n0-n2",
                0,
                2,
                KeySource::Passes {
                    period_s: 1800.0,
                    offset_s: 100.0,
                    duration_s: 300.0,
                    key_bits_per_pass: 1e6,
                },
            ),
        ],
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(f) = DemandFile::from_toml(text) else {
        return;
    };
    let s1 = toml::to_string(&f).expect("a parsed demand file serialises");
    let f2 = DemandFile::from_toml(&s1).expect("a serialised demand file parses");
    let s2 = toml::to_string(&f2).expect("a parsed demand file serialises");
    assert_eq!(s1, s2);
    let opts = PlanOptions {
        duration_s: 3600.0,
        request_interval_s: 60.0,
        sample_interval_s: 600.0,
        ..PlanOptions::default()
    };
    let cheap = f.demands.len() <= 16
        && f.demands
            .iter()
            .all(|d| d.interval_s.is_none_or(|i| i >= 10.0 || !(i > 0.0)));
    if cheap {
        let _ = plan(&network(), &f.demands, &opts);
    }
});
