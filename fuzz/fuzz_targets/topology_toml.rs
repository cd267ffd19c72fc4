//! Topology files (`qkdnet_net::topology::Topology::from_toml`, then
//! `validate`, then the planner's view of the result). Any text parses to a
//! topology or an error, never a panic; a parsed topology serialises to TOML
//! that parses back to the same; validation either refuses it or gives a
//! topology the planner accepts without panicking.
//!
//! Validation loads presets named by path from the file system, so topologies
//! naming a preset by path are only parsed, not validated (the fuzzer must not
//! read `/dev/zero` or block on `/dev/stdin`); the number of links validated is
//! capped because each runs the finite-key model.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_net::plan::PlanNetwork;
use qkdnet_net::topology::Topology;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(t) = Topology::from_toml(text) else {
        return;
    };
    let s1 = toml::to_string(&t).expect("a parsed topology serialises");
    let t2 = Topology::from_toml(&s1).expect("a serialised topology parses");
    let s2 = toml::to_string(&t2).expect("a parsed topology serialises");
    assert_eq!(s1, s2);
    let path_like = |p: &str| p.ends_with(".toml") || p.contains('/');
    if t.links.len() > 8 || t.links.iter().any(|l| path_like(&l.preset)) {
        return;
    }
    if let Ok(v) = t.validate() {
        let net = PlanNetwork::from_topology(&v);
        assert_eq!(net.nodes.len(), v.nodes.len());
        assert_eq!(net.links.len(), v.links.len());
    }
});
