//! The network planner against hand calculations, its rerouting, its
//! refusals of bad demand files, and the shipped topologies (issue #7).

use std::collections::BTreeMap;
use std::path::PathBuf;

use qkdnet_net::plan::{
    DemandFile, DemandSpec, KeySource, PlanLink, PlanNetwork, PlanOptions, PlanReport, plan,
};
use qkdnet_net::topology::Topology;

/// A network from (node, node, bit/s) links; SAE `sae-X` on every node `X`.
fn network(nodes: &[&str], links: &[(&str, &str, f64)]) -> PlanNetwork {
    let at = |n: &str| nodes.iter().position(|m| *m == n).unwrap();
    PlanNetwork {
        name: "test".into(),
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        saes: nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("sae-{n}"), i))
            .collect::<BTreeMap<_, _>>(),
        links: links
            .iter()
            .map(|&(a, b, bps)| PlanLink {
                id: format!("{a}-{b}"),
                a: at(a),
                b: at(b),
                source: KeySource::Continuous { bps },
                distance_km: None,
                preset: "test".into(),
            })
            .collect(),
    }
}

fn demand(from: &str, to: &str, rate_bps: f64) -> DemandSpec {
    DemandSpec {
        from: format!("sae-{from}"),
        to: format!("sae-{to}"),
        rate_bps,
        start_s: None,
        end_s: None,
        interval_s: None,
    }
}

fn opts(duration_s: f64) -> PlanOptions {
    PlanOptions {
        duration_s,
        request_interval_s: 10.0,
        ..PlanOptions::default()
    }
}

fn link<'a>(r: &'a PlanReport, id: &str) -> &'a qkdnet_net::plan::LinkReport {
    r.links.iter().find(|l| l.id == id).unwrap()
}

fn close(x: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (x - want).abs() <= tol,
        "{what}: {x} is not within {tol} of {want}"
    );
}

// Hand calculation, chain a —1000 bit/s— b —400 bit/s— c, one demand a → c,
// requests every 10 s over T = 10,000 s, pools start empty and hold 1e9 bits.
//
// Below capacity (300 bit/s): each hop's pool gains more per interval than a
// request takes, so nothing is blocked and each link's utilisation is
// demand / rate: 300/1000 = 0.3 and 300/400 = 0.75 (exactly, up to rounding:
// both the consumed and the generated key scale with T).
//
// Above capacity (800 bit/s): b–c makes 400·T bits and the demand wants
// 800·T, so in steady state half is blocked: 1 − 400/800 = 0.5. Served key
// is at most what b–c made, and at least that minus what its pool can hold
// unserved (below one request, 8,000 bits, plus one interval's gain, 4,000
// bits): the blocked fraction is 0.5 within 12,000 / (800·T) = 0.0015. a–b
// carries what was served: utilisation 400/1000 = 0.4 within the same slack.
#[test]
fn steady_state_matches_the_hand_calculation_on_a_chain() {
    let net = network(&["a", "b", "c"], &[("a", "b", 1000.0), ("b", "c", 400.0)]);
    let t = 10_000.0;

    let r = plan(&net, &[demand("a", "c", 300.0)], &opts(t)).unwrap();
    assert_eq!(r.totals.blocked_requests, 0);
    assert_eq!(r.totals.blocked_bits, 0.0);
    close(r.totals.requested_bits, 300.0 * t, 1e-6, "requested");
    close(link(&r, "a-b").utilisation, 0.3, 1e-9, "a-b utilisation");
    close(link(&r, "b-c").utilisation, 0.75, 1e-9, "b-c utilisation");
    assert_eq!(r.demands[0].primary_route, ["a-b", "b-c"]);

    let r = plan(&net, &[demand("a", "c", 800.0)], &opts(t)).unwrap();
    let slack = (800.0 * 10.0 + 400.0 * 10.0) / (800.0 * t);
    close(r.totals.blocked_fraction, 0.5, slack, "blocked fraction");
    close(r.demands[0].totals.blocked_fraction, 0.5, slack, "demand");
    close(link(&r, "a-b").utilisation, 0.4, slack, "a-b utilisation");
    assert!(link(&r, "b-c").utilisation > 0.99);
    // The blocking is charged to b–c, the bottleneck, not to a–b.
    assert!(link(&r, "b-c").blocked_bits > 0.0);
    assert_eq!(link(&r, "a-b").blocked_bits, 0.0);
    assert_eq!(r.bottlenecks[0], 1);
}

// The same chain from a topology file, at the finite-key model rates of
// metro-1ghz over 10 km and 40 km: utilisation is demand / model rate.
#[test]
fn steady_state_at_model_rates_of_a_topology() {
    let topo = Topology::from_toml(
        r#"
        [network]
        name = "chain"
        [[node]]
        id = "a"
        [[node]]
        id = "b"
        [[node]]
        id = "c"
        [[sae]]
        id = "sae-a"
        node = "a"
        [[sae]]
        id = "sae-c"
        node = "c"
        [[link]]
        a = "a"
        b = "b"
        preset = "metro-1ghz"
        distance_km = 10.0
        [[link]]
        a = "b"
        b = "c"
        preset = "metro-1ghz"
        distance_km = 40.0
        "#,
    )
    .unwrap()
    .validate()
    .unwrap();
    let (r1, r2) = (topo.links[0].model_key_bps, topo.links[1].model_key_bps);
    assert!(r1 > r2 && r2 > 0.0, "{r1} {r2}");
    let net = PlanNetwork::from_topology(&topo);
    let t = 3600.0;

    let rate = 0.5 * r2;
    let r = plan(&net, &[demand("a", "c", rate)], &opts(t)).unwrap();
    assert_eq!(r.totals.blocked_bits, 0.0);
    close(r.links[0].utilisation, rate / r1, 1e-9, "a-b utilisation");
    close(r.links[1].utilisation, 0.5, 1e-9, "b-c utilisation");

    let rate = 2.0 * r2;
    let r = plan(&net, &[demand("a", "c", rate)], &opts(t)).unwrap();
    let slack = (rate * 10.0 + r2 * 10.0) / (rate * t);
    close(r.totals.blocked_fraction, 0.5, slack, "blocked fraction");
}

// A ring a–b–c–d–a where the direct link a–b is slow (100 bit/s) and the way
// round (a–d–c–b) fast (1000 bit/s per hop). A demand a → b of 300 bit/s
// (3,000 bits a request) finds a–b's pool short two times in three and is
// served round the ring then: nothing blocked, a–b used fully (100 bit/s),
// the detour carrying the other 200 bit/s (utilisation 0.2).
#[test]
fn reroutes_around_an_empty_pool_on_a_ring() {
    let net = network(
        &["a", "b", "c", "d"],
        &[
            ("a", "b", 100.0),
            ("b", "c", 1000.0),
            ("c", "d", 1000.0),
            ("d", "a", 1000.0),
        ],
    );
    let t = 10_000.0;
    let r = plan(&net, &[demand("a", "b", 300.0)], &opts(t)).unwrap();
    assert_eq!(r.totals.blocked_bits, 0.0);
    let d = &r.demands[0];
    assert_eq!(d.primary_route, ["a-b"]);
    assert!(d.totals.rerouted_requests > 0);
    // 3,000 bits a request, 1,000 bits of a–b per interval: one in three on a–b.
    let slack = 3000.0 / (300.0 * t) + 1e-9;
    close(
        d.totals.rerouted_requests as f64 / d.totals.requests as f64,
        2.0 / 3.0,
        2.0 * slack,
        "share of requests on the detour",
    );
    close(link(&r, "a-b").utilisation, 1.0, 2.0 * slack, "a-b");
    for id in ["b-c", "c-d", "d-a"] {
        close(link(&r, id).utilisation, 0.2, 2.0 * slack, id);
    }
    assert!(link(&r, "a-b").detoured_requests > 0);
    // Mean hops: one third at 1 hop, two thirds at 3.
    close(d.mean_served_hops, 7.0 / 3.0, 0.01, "mean hops");
}

// The same ring with a weak way round (50 bit/s on c–d): together the two
// routes make 150 bit/s, the demand wants 300 bit/s, so half is blocked in
// steady state (the fast path that skips the search while no route can
// exist must not change this), within two requests' worth of slack.
#[test]
fn blocks_what_neither_route_can_carry() {
    let net = network(
        &["a", "b", "c", "d"],
        &[
            ("a", "b", 100.0),
            ("b", "c", 1000.0),
            ("c", "d", 50.0),
            ("d", "a", 1000.0),
        ],
    );
    let t = 20_000.0;
    let r = plan(&net, &[demand("a", "b", 300.0)], &opts(t)).unwrap();
    let slack = 2.0 * (3000.0 + 150.0 * 10.0) / (300.0 * t);
    close(r.totals.blocked_fraction, 0.5, slack, "blocked fraction");
    close(link(&r, "a-b").utilisation, 1.0, 0.01, "a-b");
    close(link(&r, "c-d").utilisation, 1.0, 0.01, "c-d");
    // Blocking is charged to the primary route's link.
    assert!(link(&r, "a-b").blocked_bits > 0.0);
}

// Two demands share one link: each gets its own primary route, and the
// shared link's utilisation is their sum over its rate.
#[test]
fn demands_share_a_link() {
    let net = network(&["a", "b", "c"], &[("a", "b", 1000.0), ("b", "c", 1000.0)]);
    let r = plan(
        &net,
        &[demand("a", "c", 200.0), demand("b", "c", 300.0)],
        &opts(5000.0),
    )
    .unwrap();
    assert_eq!(r.totals.blocked_bits, 0.0);
    close(link(&r, "a-b").utilisation, 0.2, 1e-9, "a-b");
    close(link(&r, "b-c").utilisation, 0.5, 1e-9, "b-c");
}

#[test]
fn satellite_key_arrives_at_pass_ends() {
    let mut net = network(&["a", "b"], &[("a", "b", 0.0)]);
    net.links[0].source = KeySource::Passes {
        period_s: 1000.0,
        offset_s: 100.0,
        duration_s: 300.0,
        key_bits_per_pass: 50_000.0,
    };
    // Pass ends at 400, 1400, …, 9400 s: ten passes in 10,000 s.
    let r = plan(&net, &[demand("a", "b", 10.0)], &opts(10_000.0)).unwrap();
    close(r.links[0].generated_bits, 500_000.0, 1e-6, "generated");
    close(r.links[0].mean_key_bps, 50.0, 1e-12, "mean rate");
    // 10 bit/s of 50 available on average: nothing blocked once the first
    // pass is in, everything blocked before it (400 s of 10,000).
    close(
        r.totals.blocked_fraction,
        0.04,
        0.002,
        "blocked before the first pass",
    );
}

#[test]
fn bad_demands_are_refused_with_the_entry_named() {
    let net = network(&["a", "b"], &[("a", "b", 1000.0)]);
    let err = |d: &[DemandSpec]| plan(&net, d, &opts(100.0)).unwrap_err().to_string();

    let e = err(&[demand("a", "b", 1.0), demand("a", "x", 1.0)]);
    assert!(
        e.contains("demand 2") && e.contains("unknown SAE 'sae-x'"),
        "{e}"
    );
    let e = err(&[demand("a", "b", -5.0)]);
    assert!(
        e.contains("demand 1") && e.contains("rate_bps must be a number > 0"),
        "{e}"
    );
    let e = err(&[demand("a", "b", f64::NAN)]);
    assert!(e.contains("rate_bps"), "{e}");
    let e = err(&[demand("a", "a", 1.0)]);
    assert!(e.contains("itself"), "{e}");
    let mut d = demand("a", "b", 1.0);
    d.start_s = Some(50.0);
    d.end_s = Some(20.0);
    let e = err(&[d]);
    assert!(e.contains("end_s must be after start_s"), "{e}");
    let e = err(&[]);
    assert!(e.contains("no demand"), "{e}");

    // Same node, and nodes no chain of links joins.
    let mut net2 = network(&["a", "b", "c"], &[("a", "b", 1000.0)]);
    net2.saes.insert("sae-a2".into(), 0);
    let e = plan(&net2, &[demand("a", "a2", 1.0)], &opts(100.0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("both SAEs are on node 'a'"), "{e}");
    let e = plan(&net2, &[demand("a", "c", 1.0)], &opts(100.0))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no chain of QKD links joins node 'a' to node 'c'"),
        "{e}"
    );

    // The file format: unknown fields and wrong types name the place.
    let e = DemandFile::from_toml("[[demand]]\nfrom = \"a\"\nto = \"b\"\nrate = 5\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("rate"), "{e}");
    let e = DemandFile::from_toml("[[demand]]\nfrom = \"a\"\nto = \"b\"\nrate_bps = \"fast\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("rate_bps"), "{e}");
    let f = DemandFile::from_toml(
        "[[demand]]\nfrom = \"sae-a\"\nto = \"sae-b\"\nrate_bps = 256.0\nstart_s = 10.0\n",
    )
    .unwrap();
    assert_eq!(f.demands.len(), 1);
    assert_eq!(f.demands[0].start_s, Some(10.0));

    // Bad options.
    let mut o = opts(100.0);
    o.request_interval_s = 0.0;
    assert!(
        plan(&net, &[demand("a", "b", 1.0)], &o)
            .unwrap_err()
            .to_string()
            .contains("request interval")
    );
}

fn topologies_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../topologies")
}

/// A two-node satellite link in the form `micius-pair.toml` uses.
const SATELLITE_PROBE: &str = r#"
[network]
name = "probe"
[[node]]
id = "a"
[[node]]
id = "b"
[[link]]
a = "a"
b = "b"
preset = "micius2017"
pass_period_s = 86400.0
pass_offset_s = 0.0
"#;

#[test]
fn every_shipped_topology_validates_and_plans() {
    let probe = Topology::from_toml(SATELLITE_PROBE)
        .and_then(|t| t.validate())
        .unwrap();
    assert!(matches!(
        PlanNetwork::from_topology(&probe).links[0].source,
        KeySource::Passes { .. }
    ));
    let mut files: Vec<PathBuf> = std::fs::read_dir(topologies_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let mut checked = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let topo = Topology::from_file(path)
            .and_then(|t| t.validate())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let net = PlanNetwork::from_topology(&topo);
        let demands = qkdnet_net::plan::default_demands(&net, 256.0);
        assert!(!demands.is_empty(), "{name}: no default demand");
        let r = plan(&net, &demands, &opts(3600.0)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(r.totals.requests > 0, "{name}");
        checked.push(name);
    }
    for want in [
        "beijing-shanghai.toml",
        "china-national.toml",
        "hefei-metro.toml",
        "micius-pair.toml",
    ] {
        assert!(
            checked.iter().any(|c| c == want),
            "{want} missing from topologies/ ({checked:?})"
        );
    }
}

#[test]
fn shipped_topologies_have_the_promised_shape() {
    let load = |f: &str| {
        Topology::from_file(&topologies_dir().join(f))
            .and_then(|t| t.validate())
            .unwrap()
    };
    let bs = load("beijing-shanghai.toml");
    let trunk = bs
        .links
        .iter()
        .filter(|l| !l.b.as_str().ends_with("-user"))
        .count();
    assert_eq!(trunk + 1, 32, "32 trusted nodes on the trunk");
    let km: f64 = bs
        .links
        .iter()
        .filter(|l| !l.b.as_str().ends_with("-user"))
        .map(|l| l.distance_km)
        .sum();
    assert!((km - 2032.0).abs() < 1.0, "{km}");
    assert!(bs.saes.keys().any(|s| s.as_str().contains("beijing")));
    assert!(bs.saes.keys().any(|s| s.as_str().contains("shanghai")));

    let cn = Topology::from_file(&topologies_dir().join("china-national.toml")).unwrap();
    let backbone = cn
        .nodes
        .iter()
        .filter(|n| n.role.as_deref() != Some("metro"))
        .count();
    assert!((135..=155).contains(&backbone), "{backbone} backbone nodes");
    let metros = cn
        .nodes
        .iter()
        .filter(|n| n.role.as_deref() == Some("metro") && n.id.ends_with("-m1"))
        .count();
    assert_eq!(metros, 20);
}

/// The planner predicts the routes the relay takes (issue #19): on a grid where
/// most pairs have several equally short, equally wide routes (and a few
/// narrower links break some ties by width), the planner's primary route and
/// the relay's route decision agree for every pair of nodes. Node names are
/// listed out of name order so that numbering cannot hide a disagreement.
#[test]
fn planner_and_relay_choose_the_same_route_for_every_pair() {
    use qkdnet_kms::ids::KmeId;
    use qkdnet_kms::relay::choose_route;
    use qkdnet_kms::routing::{Graph, add_link};

    // A 4 × 4 grid, nodes named so that their index order is not name order.
    let names: Vec<String> = (0..16).map(|i| format!("n{:02}", (i * 7) % 16)).collect();
    let name = |r: usize, c: usize| names[r * 4 + c].as_str();
    let mut links: Vec<(&str, &str, f64)> = Vec::new();
    for r in 0..4 {
        for c in 0..4 {
            // Two narrower links: their pairs must avoid them when a tie allows.
            let bps = |a: &str, b: &str| {
                if (a, b) == (name(1, 1), name(1, 2)) || (a, b) == (name(2, 0), name(3, 0)) {
                    500.0
                } else {
                    1000.0
                }
            };
            if c + 1 < 4 {
                links.push((name(r, c), name(r, c + 1), bps(name(r, c), name(r, c + 1))));
            }
            if r + 1 < 4 {
                links.push((name(r, c), name(r + 1, c), bps(name(r, c), name(r + 1, c))));
            }
        }
    }
    let node_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let net = network(&node_refs, &links);
    let demands = qkdnet_net::plan::default_demands(&net, 1.0);
    let report = plan(&net, &demands, &opts(10.0)).expect("plan");
    assert_eq!(report.demands.len(), 16 * 15 / 2);

    let kme = |s: &str| KmeId::new(s).expect("valid");
    let mut g = Graph::new();
    let mut rate = BTreeMap::new();
    for &(a, b, bps) in &links {
        add_link(&mut g, &kme(a), &kme(b));
        rate.insert((kme(a), kme(b)), bps as u64);
        rate.insert((kme(b), kme(a)), bps as u64);
    }
    let mut ties = 0;
    for d in &report.demands {
        // The planner's primary route as nodes.
        let mut at = d.from_node.clone();
        let mut planned = vec![at.clone()];
        for id in &d.primary_route {
            let l = links
                .iter()
                .find(|l| format!("{}-{}", l.0, l.1) == *id)
                .expect("link");
            at = if l.0 == at {
                l.1.to_string()
            } else {
                l.0.to_string()
            };
            planned.push(at.clone());
        }
        let (relayed, _) = choose_route(
            &g,
            &kme(&d.from_node),
            &kme(&d.to_node),
            1,
            |_, _| true,
            |a, b| rate.get(&(a.clone(), b.clone())).copied(),
        )
        .expect("a route");
        let relayed: Vec<String> = relayed.iter().map(ToString::to_string).collect();
        assert_eq!(planned, relayed, "{} → {}", d.from_node, d.to_node);
        // Grid pairs not on one row or column have several shortest routes.
        let pos = |n: &str| names.iter().position(|m| m == n).expect("node");
        let (p, q) = (pos(&d.from_node), pos(&d.to_node));
        if p / 4 != q / 4 && p % 4 != q % 4 {
            ties += 1;
        }
    }
    assert!(ties > 16 * 15 / 4, "most pairs have ties ({ties})");
}
