//! Measures the frame-error rate, efficiency and decoding throughput of
//! rate-adaptive LDPC reconciliation over seeded random frames with i.i.d.
//! errors.
//!
//! Usage: `cargo run --release -p qkdnet-postproc --example ldpc_stats -- [frames] [code_len] [q1,q2,…] [f1,f2,…]`
//! (defaults: 30 frames, 16 384 bits, QBER 1/2/5/8 %, f from 1.1 to 1.7).
//! Prints one JSON object per (QBER, efficiency): frames failed, mean
//! iterations, and decoding throughput over all frames and over the frames
//! that decoded (Bob's key bits per second of decoding, one thread).

use std::time::Instant;

use qkdnet_optics::entropy::efficiency;
use qkdnet_postproc::bits::BitVec;
use qkdnet_postproc::ldpc::RateAdaptation;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

fn list(arg: Option<String>, default: &[f64]) -> Vec<f64> {
    arg.map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let frames: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(30);
    let len: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(16_384);
    let qbers = list(args.next(), &[0.01, 0.02, 0.05, 0.08]);
    let effs = list(
        args.next(),
        &[1.1, 1.15, 1.2, 1.25, 1.3, 1.35, 1.4, 1.5, 1.6, 1.7],
    );
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(7);
    for &q in &qbers {
        for &f in &effs {
            let Ok(ad) = RateAdaptation::for_qber(len, q, f, 0.1, 77) else {
                continue;
            };
            let thresh = (q * 2f64.powi(53)) as u64;
            let (mut ok, mut secs, mut ok_secs, mut iters) = (0u64, 0f64, 0f64, 0usize);
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
                let res = ad.decode_counted(&bob, q, &syn, 200);
                let dt = t.elapsed().as_secs_f64();
                secs += dt;
                match res {
                    Ok((k, it)) if k == alice => {
                        ok += 1;
                        ok_secs += dt;
                        iters += it;
                    }
                    Ok(_) => eprintln!("q={q} f={f}: converged to a wrong word"),
                    Err(_) => iters += 200,
                }
            }
            println!(
                "{{\"qber\":{q},\"f_target\":{f},\"f\":{:.3},\"frames\":{frames},\"failed\":{},\"mean_iterations\":{:.1},\"decode_mbit_per_s\":{:.2},\"decoded_frames_mbit_per_s\":{:.2}}}",
                efficiency(ad.leaked_bits(), ad.key_len() as u64, q).unwrap_or(f64::NAN),
                frames - ok,
                iters as f64 / frames as f64,
                (frames as usize * ad.key_len()) as f64 / secs / 1e6,
                (ok as usize * ad.key_len()) as f64 / ok_secs.max(1e-12) / 1e6
            );
        }
    }
}
