//! The event simulator against the analytic expectation of the same physics,
//! and the behaviours a hardware link shows: eavesdroppers, dead time,
//! afterpulses, determinism.

use qkdnet_optics::detection::LinkPhysics;
use qkdnet_optics::device::{Eve, LinkConfig};
use qkdnet_optics::preset;
use qkdnet_optics::record::{BobReader, BobWriter, Clicks, Detection};
use qkdnet_optics::sim::{ClassTally, Simulator};
use qkdnet_optics::units::{NonNegative, Probability};

fn link(name: &str, km: f64) -> LinkConfig {
    preset::get(name).unwrap().at_distance(km).unwrap()
}

fn run(link: &LinkConfig, eve: Eve, seed: u64, gates: u64) -> (Vec<ClassTally>, Vec<Detection>) {
    let mut sim = Simulator::new(link, eve, seed).unwrap();
    let mut dets = Vec::new();
    sim.run(gates, &mut |d| {
        dets.push(d);
        Ok::<(), ()>(())
    })
    .unwrap();
    (sim.tallies().to_vec(), dets)
}

fn z_score(observed: f64, expected: f64, sigma: f64) -> f64 {
    (observed - expected) / sigma.max(1e-12)
}

/// Gains and QBERs per class agree with the analytic model within 4σ.
#[test]
fn simulated_gains_and_qber_match_the_model_within_4_sigma() {
    let mut quiet_lim = link("lim2014", 50.0);
    quiet_lim.receiver.afterpulse_prob = Probability::new(0.0).unwrap();
    let mut quiet_metro = link("metro-1ghz", 10.0);
    quiet_metro.receiver.afterpulse_prob = Probability::new(0.0).unwrap();
    quiet_metro.receiver.dead_time_s = NonNegative::new(0.0).unwrap();
    let cases = [
        (link("gys2004", 20.0), 200_000_000u64),
        (quiet_lim, 20_000_000),
        (quiet_metro, 5_000_000),
        (link("qd-sps-2025", 80.0), 20_000_000),
        (link("micius2017", 900.0), 500_000_000),
    ];
    for (seed, (cfg, gates)) in cases.iter().enumerate() {
        let (tallies, _) = run(cfg, Eve::None, seed as u64, *gates);
        let ph = LinkPhysics::from_config(cfg);
        for (k, (label, mu, p)) in cfg.source.classes().iter().enumerate() {
            let (q, e) = ph.gain_error(*mu);
            let t = &tallies[k];
            let n = *gates as f64;
            let exp_det = n * p * q;
            let zd = z_score(
                t.detections as f64,
                exp_det,
                (n * p * q * (1.0 - p * q)).sqrt(),
            );
            let sifted = t.sifted_z as f64;
            let ze = z_score(
                t.errors_z as f64,
                sifted * e,
                (sifted * e * (1.0 - e)).sqrt(),
            );
            println!(
                "{} {label}: detections {} (exp {exp_det:.0}, z {zd:.2}); Z errors {} of {} (exp QBER {e:.4}, z {ze:.2})",
                cfg.name, t.detections, t.errors_z, t.sifted_z
            );
            assert!(zd.abs() < 4.0, "{} {label} detections z = {zd}", cfg.name);
            assert!(ze.abs() < 4.0, "{} {label} QBER z = {ze}", cfg.name);
        }
    }
}

/// A full intercept-resend attack raises the matched-basis QBER to about 25 %.
#[test]
fn full_intercept_resend_gives_a_quarter_errors() {
    let cfg = link("gys2004", 10.0);
    let eve = Eve::parse("intercept-resend:1.0").unwrap();
    let gates = 100_000_000;
    let (t, _) = run(&cfg, eve, 7, gates);
    let (sig_err, sig_n) = (t[0].errors_z + t[0].errors_x, t[0].sifted_z + t[0].sifted_x);
    let qber = sig_err as f64 / sig_n as f64;
    let (_, e_honest) = LinkPhysics::from_config(&cfg).gain_error(cfg.source.classes()[0].1);
    // half the pulses measured in the wrong basis → half of those wrong, plus the honest errors on the rest
    let expected = 0.25 + 0.5 * e_honest;
    let sigma = (expected * (1.0 - expected) / sig_n as f64).sqrt();
    println!("intercept-resend QBER {qber:.4} (expected {expected:.4}, n {sig_n})");
    assert!((qber - expected).abs() < 4.0 * sigma);
    assert!((qber - 0.25).abs() < 0.03);
    // half-strength attack: about half the excess
    let (t, _) = run(&cfg, Eve::parse("intercept-resend:0.5").unwrap(), 8, gates);
    let q_half = (t[0].errors_z + t[0].errors_x) as f64 / (t[0].sifted_z + t[0].sifted_x) as f64;
    assert!(
        (q_half - (0.125 + 0.75 * e_honest)).abs() < 0.01,
        "{q_half}"
    );
}

/// Photon-number splitting keeps the signal gain honest-looking, but the
/// decoy class gives it away: its gain collapses relative to the model.
#[test]
fn pns_attack_preserves_signal_gain_but_not_decoy_gain() {
    let cfg = link("gys2004", 60.0);
    let gates = 400_000_000u64;
    let (t, _) = run(&cfg, Eve::Pns, 3, gates);
    let ph = LinkPhysics::from_config(&cfg);
    let classes = cfg.source.classes();
    let n = gates as f64;
    let z = |k: usize| {
        let (q, _) = ph.gain_error(classes[k].1);
        let exp = n * classes[k].2 * q;
        z_score(t[k].detections as f64, exp, exp.sqrt())
    };
    println!("PNS: signal z {:.2}, decoy z {:.2}", z(0), z(1));
    assert!(z(0).abs() < 4.0, "signal gain should look honest");
    assert!(z(1) < -10.0, "decoy gain should collapse");
}

#[test]
fn same_seed_same_records_and_other_seed_differs() {
    let cfg = link("metro-1ghz", 30.0);
    let (_, a) = run(&cfg, Eve::None, 42, 2_000_000);
    let (_, b) = run(&cfg, Eve::None, 42, 2_000_000);
    let (_, c) = run(&cfg, Eve::None, 43, 2_000_000);
    assert!(!a.is_empty());
    assert_eq!(a, b);
    assert_ne!(a, c);
    // running in pieces gives the same stream as one run
    let mut sim = Simulator::new(&cfg, Eve::None, 42).unwrap();
    let mut pieces = Vec::new();
    for _ in 0..4 {
        sim.run(500_000, &mut |d| {
            pieces.push(d);
            Ok::<(), ()>(())
        })
        .unwrap();
    }
    assert_eq!(a, pieces);
}

#[test]
fn dead_time_blinds_each_detector_exactly() {
    let mut cfg = link("metro-1ghz", 0.0);
    cfg.receiver.afterpulse_prob = Probability::new(0.0).unwrap();
    cfg.receiver.dead_time_s = NonNegative::new(100e-9).unwrap(); // 100 gates at 1 GHz
    let (_, dets) = run(&cfg, Eve::None, 5, 5_000_000);
    let mut last = [None::<u64>; 2];
    for d in &dets {
        let fired = match d.clicks {
            Clicks::D0 => [true, false],
            Clicks::D1 => [false, true],
            Clicks::Both => [true, true],
        };
        for k in 0..2 {
            if fired[k] {
                if let Some(prev) = last[k] {
                    assert!(
                        d.gate - prev > 100,
                        "detector {k} fired {} gates after its last click",
                        d.gate - prev
                    );
                }
                last[k] = Some(d.gate);
            }
        }
    }
    // saturated: close to one click per 101 gates per detector
    assert!(dets.len() as f64 > 0.5 * 2.0 * 5_000_000.0 / 101.0 * 0.5);
}

#[test]
fn certain_afterpulses_follow_every_click_right_after_the_dead_time() {
    let mut cfg = link("metro-1ghz", 50.0);
    cfg.receiver.afterpulse_prob = Probability::new(1.0).unwrap();
    cfg.receiver.dead_time_s = NonNegative::new(20e-9).unwrap(); // 20 gates
    let (_, dets) = run(&cfg, Eve::None, 9, 200_000);
    assert!(dets.len() > 100);
    // every click is followed, 21 gates later, by a click on the same detector
    for w in dets.iter().take(dets.len() - 2) {
        let follower = dets.iter().find(|d| d.gate == w.gate + 21);
        let f = follower.unwrap_or_else(|| panic!("no afterpulse after gate {}", w.gate));
        let same = matches!(
            (w.clicks, f.clicks),
            (Clicks::D0, Clicks::D0 | Clicks::Both)
                | (Clicks::D1, Clicks::D1 | Clicks::Both)
                | (Clicks::Both, Clicks::Both)
        );
        assert!(same, "{w:?} then {f:?}");
    }
}

#[test]
fn simulator_output_round_trips_through_the_record_format() {
    let cfg = link("metro-1ghz", 5.0);
    let gates = 3_000_000; // > one 65,536-event chunk
    let (_, dets) = run(&cfg, Eve::None, 1, gates);
    assert!(dets.len() > 70_000);
    let sim = Simulator::new(&cfg, Eve::None, 1).unwrap();
    let alice = sim.alice_record(gates).unwrap();
    let mut w = BobWriter::new(Vec::new(), alice.span).unwrap();
    for d in &dets {
        w.push(*d).unwrap();
    }
    let bytes = w.finish().unwrap();
    let back = BobReader::new(&bytes[..]).unwrap().read_all().unwrap();
    assert_eq!(back, dets);
    let mut abytes = Vec::new();
    alice.write_to(&mut abytes).unwrap();
    let alice2 = qkdnet_optics::record::AliceRecord::read_from(&mut &abytes[..]).unwrap();
    for d in dets.iter().step_by(997) {
        assert_eq!(alice.choice(d.gate), alice2.choice(d.gate));
    }
}

#[test]
fn satellite_transmittance_can_change_mid_run() {
    let cfg = preset::get("micius2017").unwrap();
    let mut sim = Simulator::new(&cfg, Eve::None, 2).unwrap();
    let mut n = [0u64; 2];
    for (i, eta) in [1e-2, 1e-4].into_iter().enumerate() {
        sim.set_channel_transmittance(eta);
        sim.run(10_000_000, &mut |_| {
            n[i] += 1;
            Ok::<(), ()>(())
        })
        .unwrap();
    }
    assert!(n[0] > 50 * n[1], "{n:?}");
}
