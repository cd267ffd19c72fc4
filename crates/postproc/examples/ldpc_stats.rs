//! Measures the frame-error rate and throughput of rate-adaptive LDPC
//! reconciliation over seeded random frames with i.i.d. errors.
//!
//! Usage: `cargo run --release -p qkdnet-postproc --example ldpc_stats -- [frames] [code_len]`
//! Prints one JSON object per (QBER, efficiency) line.

use std::time::Instant;

use qkdnet_postproc::bits::BitVec;
use qkdnet_postproc::cascade::h2;
use qkdnet_postproc::ldpc::RateAdaptation;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

fn main() {
    let mut args = std::env::args().skip(1);
    let frames: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(30);
    let len: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(16_384);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
    for q in [0.01, 0.02, 0.05, 0.08] {
        for f in [1.1, 1.15, 1.2, 1.25, 1.3, 1.35, 1.4, 1.5, 1.6, 1.7] {
            let Ok(ad) = RateAdaptation::for_qber(len, q, f, 0.1, 77) else {
                continue;
            };
            let thresh = (q * 2f64.powi(53)) as u64;
            let (mut ok, mut secs) = (0u64, 0f64);
            for _ in 0..frames {
                let alice = BitVec::random(ad.key_len(), &mut rng);
                let mut bob = alice.clone();
                for i in 0..bob.len() {
                    if (rng.next_u64() >> 11) < thresh {
                        bob.flip(i);
                    }
                }
                let Ok(syn) = ad.encode(&alice, &mut rng) else {
                    return;
                };
                let t = Instant::now();
                let res = ad.decode(&bob, q, &syn, 200);
                secs += t.elapsed().as_secs_f64();
                if res.is_ok_and(|k| k == alice) {
                    ok += 1;
                }
            }
            println!(
                "{{\"qber\":{q},\"f_target\":{f},\"f\":{:.3},\"frames\":{frames},\"failed\":{},\"decode_mbit_per_s\":{:.2}}}",
                ad.leaked_bits() as f64 / (ad.key_len() as f64 * h2(q)),
                frames - ok,
                (frames as usize * ad.key_len()) as f64 / secs / 1e6
            );
        }
    }
}
