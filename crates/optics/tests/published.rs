//! The analytic models against published results. Every figure comes from
//! `data/published.toml`, which cites paper, section and table.

use qkdnet_optics::keyrate::{Evaluator, Model, ModelOptions, plob};
use qkdnet_optics::preset;

fn published() -> toml::Table {
    toml::from_str(include_str!("../data/published.toml")).expect("published.toml parses")
}

fn num(t: &toml::Table, path: &[&str]) -> f64 {
    let mut v = &toml::Value::Table(t.clone());
    for p in path {
        v = v.get(p).unwrap_or_else(|| panic!("missing {path:?}"));
    }
    v.as_float()
        .or_else(|| v.as_integer().map(|i| i as f64))
        .expect("number")
}

fn max_distance(name: &str, model: Model, block: f64) -> f64 {
    let link = preset::get(name).unwrap();
    let mut ev = Evaluator::new(
        &link,
        ModelOptions {
            model,
            block_bits: block,
            optimize: true,
        },
    )
    .unwrap();
    ev.max_distance(0.0, 400.0).unwrap().expect("key at 0 km")
}

/// Ma, Qi, Zhao, Lo, PRA 72, 012326 (2005), GYS parameters: 142.05 km with
/// infinite decoys, 140.55 km with vacuum + weak decoy.
#[test]
fn gys2004_cutoff_distances_match_ma_qi_zhao_lo_2005() {
    let p = published();
    let inf = max_distance("gys2004", Model::DecoyInf, 0.0);
    let vw = max_distance("gys2004", Model::DecoyVw, 0.0);
    let gllp = max_distance("gys2004", Model::Gllp, 0.0);
    println!("GYS: decoy-inf {inf:.2} km, decoy-vw {vw:.2} km, gllp {gllp:.2} km");
    let want_inf = num(
        &p,
        &[
            "gys2004_mqzl2005",
            "results",
            "max_distance_km_infinite_decoy",
        ],
    );
    let want_vw = num(
        &p,
        &[
            "gys2004_mqzl2005",
            "results",
            "max_distance_km_vacuum_weak_decoy",
        ],
    );
    assert!(
        (inf - want_inf).abs() < 1.0,
        "decoy-inf {inf} vs {want_inf}"
    );
    assert!((vw - want_vw).abs() < 1.0, "decoy-vw {vw} vs {want_vw}");
    // without decoys the multi-photon pulses cap the distance far below
    assert!(gllp < 0.5 * vw && gllp > 5.0, "gllp {gllp}");
}

/// Lim et al., PRA 89, 022307 (2014), Sec. IV: key over 135 km with n_X = 10^4,
/// and at 100 km the rate at n_X = 10^9 is about 1.75 times that at 10^7.
#[test]
fn lim2014_finite_key_figures() {
    let p = published();
    let link = preset::get("lim2014").unwrap();
    let rate = |block: f64, km: f64| {
        let mut ev = Evaluator::new(
            &link,
            ModelOptions {
                model: Model::Finite,
                block_bits: block,
                optimize: true,
            },
        )
        .unwrap();
        // warm up the optimiser along the way, as a sweep does
        for d in [0.0, 25.0, 50.0, 75.0] {
            if d < km {
                ev.at_distance(d).unwrap();
            }
        }
        ev.at_distance(km).unwrap().key_rate_per_pulse
    };
    let ratio = rate(1e9, 100.0) / rate(1e7, 100.0);
    let want_ratio = num(
        &p,
        &[
            "lim2014",
            "results",
            "ratio_rate_n_x_1e9_over_1e7_at_100_km",
        ],
    );
    let d4 = max_distance("lim2014", Model::Finite, 1e4);
    println!("Lim: ratio {ratio:.3} (paper {want_ratio}), max distance at n_X=1e4: {d4:.1} km");
    assert!(
        (ratio - want_ratio).abs() / want_ratio < 0.15,
        "ratio {ratio}"
    );
    let want_d4 = num(&p, &["lim2014", "results", "max_distance_km_n_x_1e4"]);
    assert!(
        (d4 - want_d4).abs() < 3.0,
        "n_X = 1e4 reaches {d4} km, paper {want_d4}"
    );
}

#[test]
fn plob_bound_is_minus_log2_one_minus_eta() {
    assert!((plob(0.5) - 1.0).abs() < 1e-12);
    // high loss: ≈ 1.44 η
    let eta = 1e-5;
    assert!((plob(eta) / eta - std::f64::consts::LOG2_E).abs() < 1e-4);
}

#[test]
fn models_stay_below_plob() {
    for name in ["gys2004", "lim2014", "metro-1ghz"] {
        let link = preset::get(name).unwrap();
        for model in [Model::DecoyInf, Model::DecoyVw, Model::Gllp] {
            let mut ev = Evaluator::new(
                &link,
                ModelOptions {
                    model,
                    block_bits: 0.0,
                    optimize: true,
                },
            )
            .unwrap();
            for km in [0.0, 20.0, 60.0, 120.0] {
                let pt = ev.at_distance(km).unwrap();
                assert!(
                    pt.key_rate_per_pulse <= pt.plob_per_pulse,
                    "{name} {model:?} {km}"
                );
            }
        }
    }
}

/// Liao et al., Nature 549, 43 (2017): the 19 December 2016 pass gave
/// 3,551,136 detections and 1,671,072 sifted bits in 273 s. The preset's
/// geometry and link budget (from the paper's stated losses) should land
/// within 20 % of both, and the pass should last about as long.
#[test]
fn micius_pass_matches_liao_2017_counts() {
    let p = published();
    let link = preset::get("micius2017").unwrap();
    let s = qkdnet_optics::keyrate::pass_summary(&link, 1.0).unwrap();
    let want_det = num(
        &p,
        &["micius_liao2017", "pass_2016_12_19", "detection_events"],
    );
    let want_sift = num(
        &p,
        &["micius_liao2017", "pass_2016_12_19", "sifted_key_bits"],
    );
    let want_final = num(
        &p,
        &["micius_liao2017", "pass_2016_12_19", "final_key_bits"],
    );
    println!(
        "Micius pass: {:.0} s, loss {:.1}–{:.1} dB, detections {:.0} (paper {want_det}), sifted {:.0} (paper {want_sift}), QBER {:.2} %, final {:.0} (paper {want_final}, both bases)",
        s.duration_s,
        s.loss_db_range.0,
        s.loss_db_range.1,
        s.detections,
        s.sifted_bits,
        s.qber * 100.0,
        s.final_key_bits
    );
    assert!((s.detections / want_det - 1.0).abs() < 0.2);
    assert!(
        (s.duration_s / num(&p, &["micius_liao2017", "pass_2016_12_19", "duration_s"]) - 1.0).abs()
            < 0.1
    );
    assert!((s.sifted_bits / want_sift - 1.0).abs() < 0.2);
    assert!(s.final_key_bits > 0.0);
}
