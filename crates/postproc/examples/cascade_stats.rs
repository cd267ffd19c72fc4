//! Measures Cascade's residual frame-error rate, efficiency f, rounds and
//! single-core throughput (Alice and Bob in one thread, no network, one
//! shared [`CascadePlan::reusable`] per parameter set) on
//! seeded random frames with i.i.d. errors.
//!
//! Usage: `cargo run --release -p qkdnet-postproc --example cascade_stats -- [frames] [n] [schedule] [q1,q2,…] [fresh]`
//! (defaults: 200 frames of 10^4 bits, every schedule, QBER 0.5–11 %; a
//! schedule is `original`, `demystified7` or `demystified8`). By default one
//! reusable plan is built before the clock starts and shared by all frames (its
//! permutations are still made, and timed, when a frame first searches a
//! pass); with `fresh`, every frame builds its own one-shot plan
//! ([`CascadePlan::new`]) inside the timed
//! region, as the link does per block (same seed, so the memoised shuffles
//! are reused, as in a link session). Prints one JSON object per line:
//! `mbit_per_s` for both parties on this one thread, and each party's own
//! rate (`alice_…`: time in `answer`; `bob_…`: the rest, including a fresh
//! plan), which is what each end's core sustains when the two run on their
//! own machines with frames in flight.

use std::time::Instant;

use qkdnet_postproc::bits::BitVec;
use std::sync::Arc;

use qkdnet_optics::entropy::efficiency;
use qkdnet_postproc::cascade::{CascadeAlice, CascadeBob, CascadeParams, CascadePlan, Schedule};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

fn main() {
    let mut args = std::env::args().skip(1);
    let frames: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(200);
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let only = args.next().unwrap_or_default();
    let qbers: Vec<f64> = args
        .next()
        .map(|s| s.split(',').filter_map(|q| q.parse().ok()).collect())
        .unwrap_or_else(|| vec![0.005, 0.01, 0.02, 0.05, 0.08, 0.11]);
    let fresh = args.next().is_some_and(|a| a == "fresh");
    for schedule in [
        Schedule::Original,
        Schedule::Demystified7,
        Schedule::Demystified8,
    ] {
        if !only.is_empty() && !format!("{schedule:?}").eq_ignore_ascii_case(&only) {
            continue;
        }
        for &q in &qbers {
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(1000);
            let (mut leaked, mut rounds, mut fails, mut secs) = (0u64, 0u64, 0u64, 0f64);
            // Each party's share (plan building counts to Bob's when fresh).
            let (mut secs_alice, mut secs_bob) = (0f64, 0f64);
            let thresh = (q * 2f64.powi(53)) as u64;
            // One plan (permutations) per parameter set, shared by all frames.
            let Ok(params) = CascadeParams::new(schedule, n, q, 99) else {
                eprintln!("bad params");
                return;
            };
            let plan = Arc::new(CascadePlan::reusable(&params));
            for _ in 0..frames {
                let alice_key = BitVec::random(n, &mut rng);
                let mut bob_key = alice_key.clone();
                for i in 0..n {
                    if (rng.next_u64() >> 11) < thresh {
                        bob_key.flip(i);
                    }
                }
                let t = Instant::now();
                let plan = if fresh {
                    Arc::new(CascadePlan::new(&params))
                } else {
                    plan.clone()
                };
                let (Ok(alice), Ok(mut bob)) = (
                    CascadeAlice::with_plan(&alice_key, plan.clone()),
                    CascadeBob::with_plan(bob_key, plan.clone()),
                ) else {
                    eprintln!("bad key length");
                    return;
                };
                let mut alice_secs = 0f64;
                while let Some(req) = bob.poll_request() {
                    let ta = Instant::now();
                    let Ok(rep) = alice.answer(&req) else { break };
                    alice_secs += ta.elapsed().as_secs_f64();
                    if bob.handle_reply(&rep).is_err() {
                        break;
                    }
                }
                let frame_secs = t.elapsed().as_secs_f64();
                secs += frame_secs;
                secs_alice += alice_secs;
                secs_bob += frame_secs - alice_secs;
                leaked += bob.leaked_bits();
                rounds += bob.rounds();
                if bob.key() != &alice_key {
                    fails += 1;
                }
            }
            let total = (frames as usize * n) as f64;
            println!(
                "{{\"schedule\":\"{schedule:?}\",\"plan\":\"{}\",\"n\":{n},\"qber\":{q},\"frames\":{frames},\"failed_frames\":{fails},\"f\":{:.4},\"rounds\":{:.1},\"mbit_per_s\":{:.2},\"alice_mbit_per_s\":{:.2},\"bob_mbit_per_s\":{:.2}}}",
                if fresh { "per frame" } else { "shared" },
                efficiency(leaked, total as u64, q).unwrap_or(f64::NAN),
                rounds as f64 / frames as f64,
                total / secs / 1e6,
                total / secs_alice / 1e6,
                total / secs_bob / 1e6
            );
        }
    }
}
