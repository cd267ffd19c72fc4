//! Hashes one random block with Toeplitz privacy amplification and prints the
//! throughput; used to measure peak memory with `/usr/bin/time -v`.
//!
//! Usage: `cargo run --release -p qkdnet-postproc --example pa_block -- [n_bits] [m_bits]`
//! (defaults: 10^8 input bits, m = n/2).

use std::time::Instant;

use qkdnet_postproc::bits::BitVec;
use qkdnet_postproc::pa::{seed_len, toeplitz_hash};
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000_000);
    let m: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(n / 2);
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
    let x = BitVec::random(n, &mut rng);
    let seed = BitVec::random(seed_len(n, m), &mut rng);
    let t = Instant::now();
    let y = match toeplitz_hash(&seed, &x, m) {
        Ok(y) => y,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let dt = t.elapsed().as_secs_f64();
    println!(
        "{{\"n\":{n},\"m\":{m},\"seconds\":{dt:.4},\"gbit_per_s\":{:.4},\"ones\":{}}}",
        n as f64 / dt / 1e9,
        y.count_ones()
    );
}
