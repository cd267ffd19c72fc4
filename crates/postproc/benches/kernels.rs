//! Criterion benchmarks of the post-processing kernels: Toeplitz privacy
//! amplification, Cascade reconciliation and Wegman–Carter tagging.
//! Throughputs are in bits of input per second ("elements" = bits).
//!
//! Run: `cargo bench -p qkdnet-postproc --bench kernels -- --warm-up-time 1 --measurement-time 3`

#![allow(
    missing_docs,
    reason = "criterion_group! generates an undocumented pub fn"
)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use qkdnet_postproc::auth::{AuthKey, HashKey};
use qkdnet_postproc::bits::BitVec;
use qkdnet_postproc::cascade::{CascadeAlice, CascadeBob, CascadeParams, CascadePlan, Schedule};
use qkdnet_postproc::ldpc::RateAdaptation;
use qkdnet_postproc::pa::{Backend, seed_len, toeplitz_hash_with};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

fn pa(c: &mut Criterion) {
    let mut g = c.benchmark_group("pa_toeplitz");
    g.sample_size(10);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
    for (n, backend) in [
        (1_000_000usize, Backend::Auto),
        (1_000_000, Backend::Portable),
        (10_000_000, Backend::Auto),
        (10_000_000, Backend::Pclmul),
        (100_000_000, Backend::Auto),
    ] {
        let m = n / 2;
        let x = BitVec::random(n, &mut rng);
        let seed = BitVec::random(seed_len(n, m), &mut rng);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(
            BenchmarkId::new(format!("{backend:?}"), n),
            &(x, seed),
            |b, (x, seed)| b.iter(|| toeplitz_hash_with(backend, black_box(seed), black_box(x), m)),
        );
    }
    g.finish();
}

fn noisy(alice: &BitVec, q: f64, rng: &mut impl Rng) -> BitVec {
    let mut bob = alice.clone();
    let thresh = (q * 2f64.powi(53)) as u64;
    for i in 0..alice.len() {
        if (rng.next_u64() >> 11) < thresh {
            bob.flip(i);
        }
    }
    bob
}

fn cascade(c: &mut Criterion) {
    let mut g = c.benchmark_group("cascade");
    g.sample_size(10);
    let n = 100_000;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(2);
    for schedule in [Schedule::Demystified7, Schedule::Original] {
        for q in [0.01, 0.02, 0.05, 0.08] {
            let alice_key = BitVec::random(n, &mut rng);
            let bob_key = noisy(&alice_key, q, &mut rng);
            let Ok(params) = CascadeParams::new(schedule, n, q, 7) else {
                continue;
            };
            // Both parties in one thread; the plan (permutations) is shared
            // across frames as a link would do.
            let plan = Arc::new(CascadePlan::reusable(&params));
            g.throughput(Throughput::Elements(n as u64));
            g.bench_function(BenchmarkId::new(format!("{schedule:?}"), q), |b| {
                b.iter(|| {
                    let (Ok(alice), Ok(mut bob)) = (
                        CascadeAlice::with_plan(&alice_key, plan.clone()),
                        CascadeBob::with_plan(bob_key.clone(), plan.clone()),
                    ) else {
                        return 0;
                    };
                    while let Some(req) = bob.poll_request() {
                        let Ok(rep) = alice.answer(&req) else { break };
                        if bob.handle_reply(&rep).is_err() {
                            break;
                        }
                    }
                    bob.leaked_bits()
                })
            });
        }
    }
    // Cost of computing a fresh plan per frame (14 permutations of 10^5).
    if let Ok(params) = CascadeParams::new(Schedule::Demystified7, n, 0.02, 7) {
        g.bench_function("plan_Demystified7_1e5", |b| {
            b.iter(|| CascadePlan::new(black_box(&params)))
        });
    }
    g.finish();
}

fn ldpc(c: &mut Criterion) {
    let mut g = c.benchmark_group("ldpc_decode");
    g.sample_size(10);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(3);
    for (q, f) in [(0.02, 1.6), (0.05, 1.4)] {
        let Ok(ad) = RateAdaptation::for_qber(16_384, q, f, 0.1, 1) else {
            continue;
        };
        let alice = BitVec::random(ad.key_len(), &mut rng);
        let bob = noisy(&alice, q, &mut rng);
        let Ok(syn) = ad.encode(&alice, &mut rng) else {
            continue;
        };
        g.throughput(Throughput::Elements(ad.key_len() as u64));
        g.bench_function(BenchmarkId::new("16k", q), |b| {
            b.iter(|| ad.decode(black_box(&bob), q, &syn, 200).is_ok())
        });
    }
    g.finish();
}

fn auth(c: &mut Criterion) {
    let mut g = c.benchmark_group("auth_tag");
    let msg = vec![0x5au8; 4096];
    g.throughput(Throughput::Bytes(msg.len() as u64));
    g.bench_function("4KiB", |b| {
        b.iter(|| AuthKey::new(HashKey::from_bytes([7; 16]), [9; 16]).tag(black_box(&msg)))
    });
    g.finish();
}

criterion_group!(benches, pa, cascade, ldpc, auth);
criterion_main!(benches);
