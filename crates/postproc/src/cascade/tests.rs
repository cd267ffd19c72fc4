use super::*;
use qkdnet_optics::entropy::efficiency;

fn rng(seed: u64) -> Xoshiro256PlusPlus {
    Xoshiro256PlusPlus::seed_from_u64(seed)
}

/// Bob's key = Alice's with i.i.d. flips at rate `q`.
fn noisy(alice: &BitVec, q: f64, r: &mut Xoshiro256PlusPlus) -> BitVec {
    let mut bob = alice.clone();
    let thresh = (q * 2f64.powi(53)) as u64;
    for i in 0..alice.len() {
        if (r.next_u64() >> 11) < thresh {
            bob.flip(i);
        }
    }
    bob
}

/// Drives one frame to completion; returns Bob (bounded loop).
fn run(alice_key: &BitVec, bob_key: BitVec, params: &CascadeParams) -> CascadeBob {
    let alice = CascadeAlice::new(alice_key, params).expect("key length matches");
    let mut bob = CascadeBob::new(bob_key, params).expect("key length matches");
    let mut guard = 0;
    while let Some(req) = bob.poll_request() {
        let rep = alice.answer(&req).expect("own requests are valid");
        bob.handle_reply(&rep)
            .expect("honest replies are consistent");
        guard += 1;
        assert!(guard < 100_000, "runaway protocol");
    }
    assert!(bob.is_done());
    bob
}

#[test]
fn schedules_match_papers() {
    assert_eq!(
        Schedule::Original.block_sizes(100_000, 0.01),
        vec![73, 146, 292, 584]
    );
    let s7 = Schedule::Demystified7.block_sizes(100_000, 0.01);
    assert_eq!(s7.len(), 14);
    assert_eq!(&s7[..3], &[128, 512, 50_000]);
    let s8 = Schedule::Demystified8.block_sizes(16_384, 0.02);
    // alpha = log2(50) - 0.5 = 5.14 -> k1 = 64, k2 = 2^ceil(8.57) = 512.
    assert_eq!(&s8[..4], &[64, 512, 4096, 8192]);
    assert_eq!(s8.len(), 14);
    // Capped at n.
    assert_eq!(Schedule::Original.block_sizes(100, 0.001), vec![100; 4]);
    assert!(CascadeParams::new(Schedule::Original, 100, 0.6, 1).is_err());
    assert!(CascadeParams::new(Schedule::Original, 0, 0.1, 1).is_err());
    assert!(CascadeParams::with_block_sizes(10, vec![11], 1).is_err());
    assert!(CascadeParams::with_block_sizes(10, vec![], 1).is_err());
}

#[test]
fn permutations_are_shared_bijections() {
    let a = Perm::for_pass(1000, 42, 3, false);
    let b = Perm::for_pass(1000, 42, 3, false);
    let c = Perm::for_pass(1000, 42, 4, false);
    let mut seen = vec![false; 1000];
    let mut moved = 0;
    for pos in 0..1000 {
        assert_eq!(a.orig(pos), b.orig(pos));
        assert_eq!(a.pos(a.orig(pos)), pos);
        assert!(!seen[a.orig(pos)]);
        seen[a.orig(pos)] = true;
        if a.orig(pos) != c.orig(pos) {
            moved += 1;
        }
    }
    assert!(moved > 900);
    assert_eq!(Perm::for_pass(10, 42, 0, false).orig(7), 7);
}

/// Both representations of a pass's permutation (rank/select over the
/// memoised shuffle; full maps in a reusable plan) are the same bijection,
/// and `shuffle` reads the key through it.
#[test]
fn lean_and_mapped_permutations_agree() {
    let mut r = rng(51);
    for n in [1usize, 2, 63, 64, 65, 1000, 1024, 1025, 4097, 70_001] {
        let key = BitVec::random(n, &mut r);
        for p in 1..4 {
            let lean = Perm::for_pass(n, 5, p, false);
            let mapped = Perm::for_pass(n, 5, p, true);
            let shuffled = lean.shuffle(&key);
            assert_eq!(shuffled, mapped.shuffle(&key), "n {n} pass {p}");
            for pos in 0..n {
                let o = lean.orig(pos);
                assert_eq!(o, mapped.orig(pos), "n {n} pass {p} pos {pos}");
                assert_eq!(lean.pos(o), pos);
                assert_eq!(mapped.pos(o), pos);
                assert_eq!(shuffled.get(pos), key.get(o));
            }
        }
    }
}

/// The normative construction: the `n`-bit permutation is the `2^⌈log₂ n⌉`
/// shuffle with the values ≥ n left out (so frames of different lengths
/// share the memoised shuffle), and the plan's block masks, built by
/// streaming that shuffle, hold exactly the positions of each block.
#[test]
fn permutations_restrict_the_power_of_two_shuffle_and_masks_match_them() {
    // Several lengths, so that the first half of the 2^k shuffle holds both
    // fewer and more than ⌈n/2⌉ values below n (both boundary fix-ups of
    // the two-block masks), and powers of two (no fix-up).
    for n in [1000usize, 1024, 1025, 4097]
        .into_iter()
        .chain((1500..1530).step_by(3))
    {
        let master = master_perm(n.next_power_of_two(), 9, 2);
        let expect: Vec<usize> = master
            .iter()
            .map(|&v| v as usize)
            .filter(|&v| v < n)
            .collect();
        let perm = Perm::for_pass(n, 9, 2, false);
        let got: Vec<usize> = (0..n).map(|pos| perm.orig(pos)).collect();
        assert_eq!(got, expect, "n = {n}");
        let params = CascadeParams::with_block_sizes(n, vec![64, n.div_ceil(2), n.div_ceil(3)], 9)
            .expect("valid sizes");
        let plan = CascadePlan::new(&params);
        for p in 1..3 {
            assert!(!plan.masks[p].is_empty(), "pass {p} has few blocks");
            let perm = Perm::for_pass(n, 9, p, false);
            let k = params.block_sizes[p];
            for orig in 0..n {
                let b = perm.pos(orig) / k;
                assert_eq!(
                    plan.mask_block(p, orig),
                    Some(b),
                    "n {n} pass {p} bit {orig}"
                );
            }
        }
    }
}

#[test]
fn alice_parities_match_naive_reference() {
    let mut r = rng(50);
    let key = BitVec::random(3001, &mut r);
    let params = CascadeParams::with_block_sizes(3001, vec![7, 100, 3001], 9).expect("valid");
    let alice = CascadeAlice::new(&key, &params).expect("ok");
    let mut queries = vec![ParityQuery::Blocks { pass: 1 }];
    let mut expect = Vec::new();
    let perm1 = Perm::for_pass(3001, 9, 1, false);
    for b in 0..31 {
        let (s, e) = (b * 100, ((b + 1) * 100).min(3001));
        expect.push((s..e).fold(false, |a, pos| a ^ key.get(perm1.orig(pos))));
    }
    for _ in 0..200 {
        let pass = (r.next_u64() % 3) as u16;
        let s = (r.next_u64() % 3000) as u32;
        let e = s + 1 + (r.next_u64() % u64::from(3001 - s)) as u32;
        queries.push(ParityQuery::Range {
            pass,
            start: s,
            end: e,
        });
        let perm = Perm::for_pass(3001, 9, pass.into(), false);
        expect.push((s..e).fold(false, |a, pos| a ^ key.get(perm.orig(pos as usize))));
    }
    let rep = alice
        .answer(&ParityRequest { round: 5, queries })
        .expect("valid");
    assert_eq!(rep.round, 5);
    assert_eq!(rep.parities, expect.into_iter().collect::<BitVec>());
}

/// Naive BINARY on plain bool slices: returns (error position, parities
/// asked) using the same split rule as the state machine.
fn naive_binary(alice: &[bool], bob: &[bool], mut s: usize, mut e: usize) -> (usize, u64) {
    let par = |v: &[bool], s: usize, e: usize| v[s..e].iter().fold(false, |a, &b| a ^ b);
    let mut asked = 0;
    while e - s > 1 {
        let m = s + (e - s) / 2;
        asked += 1;
        if par(alice, s, m) != par(bob, s, m) {
            e = m;
        } else {
            s = m;
        }
    }
    (s, asked)
}

#[test]
fn single_error_binary_search_matches_reference() {
    let mut r = rng(51);
    for n in [1usize, 2, 3, 64, 100, 129] {
        for _ in 0..10 {
            let alice = BitVec::random(n, &mut r);
            let pos = (r.next_u64() % n as u64) as usize;
            let mut bob = alice.clone();
            bob.flip(pos);
            let params = CascadeParams::with_block_sizes(n, vec![n], 1).expect("valid");
            let done = run(&alice, bob.clone(), &params);
            let a: Vec<bool> = (0..n).map(|i| alice.get(i)).collect();
            let b: Vec<bool> = (0..n).map(|i| bob.get(i)).collect();
            let (p, asked) = naive_binary(&a, &b, 0, n);
            assert_eq!(p, pos);
            assert_eq!(done.key(), &alice);
            assert_eq!(done.corrections(), 1);
            // One block parity plus the binary-search parities.
            assert_eq!(done.leaked_bits(), 1 + asked, "n={n}");
        }
    }
}

#[test]
fn no_errors_costs_only_block_parities() {
    let mut r = rng(52);
    let alice = BitVec::random(10_000, &mut r);
    let params = CascadeParams::new(Schedule::Original, 10_000, 0.02, 3).expect("valid");
    let bob = run(&alice, alice.clone(), &params);
    let expect: usize = params
        .block_sizes()
        .iter()
        .map(|k| 10_000usize.div_ceil(*k))
        .sum();
    assert_eq!(bob.leaked_bits(), expect as u64);
    assert_eq!(bob.rounds(), 4);
    assert_eq!(bob.into_key().expect("done"), alice);
}

/// Runs `frames` frames; returns (failures, mean f, mean rounds).
fn campaign(schedule: Schedule, n: usize, q: f64, frames: u64, seed: u64) -> (u64, f64, f64) {
    let mut r = rng(seed);
    let mut fails = 0;
    let (mut leaked, mut rounds) = (0u64, 0u64);
    for f in 0..frames {
        let alice = BitVec::random(n, &mut r);
        let bob_key = noisy(&alice, q, &mut r);
        let params = CascadeParams::new(schedule, n, q, seed ^ f).expect("valid");
        let bob = run(&alice, bob_key, &params);
        leaked += bob.leaked_bits();
        rounds += bob.rounds();
        if bob.key() != &alice {
            fails += 1;
        }
    }
    let f = efficiency(leaked, frames * n as u64, q).expect("0 < q < 1");
    (fails, f, rounds as f64 / frames as f64)
}

const QBERS: [f64; 6] = [0.005, 0.01, 0.02, 0.05, 0.08, 0.11];

#[test]
fn original_corrects_and_efficiency_in_published_range() {
    for (i, &q) in QBERS.iter().enumerate() {
        let (fails, f, rounds) = campaign(Schedule::Original, 10_000, q, 20, 100 + i as u64);
        eprintln!("original q={q}: failures {fails}/20, f={f:.3}, rounds={rounds:.1}");
        // Original Cascade leaves residual errors in a few percent of frames
        // at high QBER (verification discards those); see the report.
        assert!(fails <= 4, "q={q}: {fails} failures");
        assert!((1.05..1.6).contains(&f), "q={q}: f={f}");
    }
}

#[test]
fn demystified7_corrects_and_beats_original() {
    for (i, &q) in QBERS.iter().enumerate() {
        let (fails, f, rounds) = campaign(Schedule::Demystified7, 10_000, q, 20, 200 + i as u64);
        let (_, f_orig, _) = campaign(Schedule::Original, 10_000, q, 20, 200 + i as u64);
        eprintln!(
            "demystified7 q={q}: failures {fails}/20, f={f:.3} (orig {f_orig:.3}), rounds={rounds:.1}"
        );
        assert!(fails <= 1, "q={q}: {fails} failures");
        assert!((1.0..1.35).contains(&f), "q={q}: f={f}");
        // At q = 0.5 % on 10^4-bit frames the 12 extra half-frame passes
        // (24 parities) outweigh the gain; from 1 % on option (7) wins.
        if q >= 0.01 {
            assert!(f < f_orig, "q={q}: {f} vs {f_orig}");
        }
    }
}

#[test]
fn large_frames_all_qbers() {
    for (i, &q) in QBERS.iter().enumerate() {
        for schedule in [Schedule::Demystified7, Schedule::Demystified8] {
            let (fails, f, rounds) = campaign(schedule, 100_000, q, 2, 300 + i as u64);
            eprintln!("{schedule:?} n=1e5 q={q}: failures {fails}/2, f={f:.3}, rounds={rounds:.1}");
            assert_eq!(fails, 0, "{schedule:?} q={q}");
            assert!((1.0..1.3).contains(&f), "{schedule:?} q={q}: f={f}");
        }
    }
}

#[test]
fn malformed_replies_are_rejected_without_state_change() {
    let mut r = rng(53);
    let alice_key = BitVec::random(1000, &mut r);
    let bob_key = noisy(&alice_key, 0.03, &mut r);
    let params = CascadeParams::new(Schedule::Demystified7, 1000, 0.03, 7).expect("valid");
    let alice = CascadeAlice::new(&alice_key, &params).expect("ok");
    let mut bob = CascadeBob::new(bob_key, &params).expect("ok");
    let stray = ParityReply {
        round: 0,
        parities: BitVec::zeros(1),
    };
    assert_eq!(bob.handle_reply(&stray), Err(CascadeError::UnexpectedReply));
    let req = bob.poll_request().expect("first request");
    assert!(bob.poll_request().is_none(), "one request at a time");
    let good = alice.answer(&req).expect("valid");
    let mut wrong_round = good.clone();
    wrong_round.round += 1;
    let e = bob.handle_reply(&wrong_round).expect_err("wrong round");
    assert!(e.is_peer_fault());
    let short = ParityReply {
        round: good.round,
        parities: good
            .parities
            .slice(0, good.parities.len() - 1)
            .expect("in range"),
    };
    assert!(matches!(
        bob.handle_reply(&short),
        Err(CascadeError::ReplyLength { .. })
    ));
    assert_eq!(bob.leaked_bits(), 0);
    bob.handle_reply(&good)
        .expect("good reply accepted after bad ones");
    let mut guard = 0;
    while let Some(req) = bob.poll_request() {
        bob.handle_reply(&alice.answer(&req).expect("valid"))
            .expect("ok");
        guard += 1;
        assert!(guard < 10_000);
    }
    assert_eq!(bob.key(), &alice_key);
}

#[test]
fn alice_rejects_invalid_queries() {
    let key = BitVec::zeros(100);
    let params = CascadeParams::with_block_sizes(100, vec![10, 20], 1).expect("valid");
    let alice = CascadeAlice::new(&key, &params).expect("ok");
    for q in [
        ParityQuery::Blocks { pass: 2 },
        ParityQuery::Range {
            pass: 0,
            start: 5,
            end: 5,
        },
        ParityQuery::Range {
            pass: 0,
            start: 6,
            end: 5,
        },
        ParityQuery::Range {
            pass: 1,
            start: 0,
            end: 101,
        },
        ParityQuery::Range {
            pass: 9,
            start: 0,
            end: 1,
        },
    ] {
        let e = alice
            .answer(&ParityRequest {
                round: 0,
                queries: vec![q],
            })
            .expect_err("invalid query");
        assert!(e.is_peer_fault());
    }
    let flood = ParityRequest {
        round: 0,
        queries: vec![ParityQuery::Blocks { pass: 0 }; 31],
    };
    assert!(matches!(
        alice.answer(&flood),
        Err(CascadeError::RequestTooLarge { limit: 300, .. })
    ));
    assert!(matches!(
        CascadeAlice::new(&BitVec::zeros(99), &params),
        Err(CascadeError::KeyLength { .. })
    ));
}

#[test]
fn lying_alice_cannot_hang_or_crash_bob() {
    let mut r = rng(54);
    for trial in 0..20 {
        let key = BitVec::random(2000, &mut r);
        let params = CascadeParams::new(Schedule::Demystified7, 2000, 0.05, trial).expect("valid");
        let mut bob = CascadeBob::new(key, &params).expect("ok");
        let mut guard = 0;
        while let Some(req) = bob.poll_request() {
            let expected: usize = req
                .queries
                .iter()
                .map(|q| match *q {
                    ParityQuery::Blocks { pass } => params.blocks_in(pass.into()),
                    ParityQuery::Range { .. } => 1,
                })
                .sum();
            let lie = ParityReply {
                round: req.round,
                parities: BitVec::random(expected, &mut r),
            };
            if bob.handle_reply(&lie).is_err() {
                break;
            }
            guard += 1;
            assert!(guard < 100_000, "runaway");
        }
        assert!(bob.poll_request().is_none());
    }
}

/// A reusable plan (full position maps, shared by frames) runs the same
/// protocol as a one-shot plan per frame (rank/select over the shuffle).
#[test]
fn shared_plan_matches_fresh_plan() {
    let mut r = rng(55);
    let params = CascadeParams::new(Schedule::Demystified7, 5000, 0.04, 11).expect("valid");
    let plan = Arc::new(CascadePlan::reusable(&params));
    for _ in 0..3 {
        let alice_key = BitVec::random(5000, &mut r);
        let bob_key = noisy(&alice_key, 0.04, &mut r);
        let fresh = run(&alice_key, bob_key.clone(), &params);
        let alice = CascadeAlice::with_plan(&alice_key, plan.clone()).expect("ok");
        let mut bob = CascadeBob::with_plan(bob_key, plan.clone()).expect("ok");
        while let Some(req) = bob.poll_request() {
            bob.handle_reply(&alice.answer(&req).expect("valid"))
                .expect("ok");
        }
        assert_eq!(bob.leaked_bits(), fresh.leaked_bits());
        assert_eq!(bob.rounds(), fresh.rounds());
        assert_eq!(bob.key(), fresh.key());
        assert_eq!(bob.key(), &alice_key);
    }
}
