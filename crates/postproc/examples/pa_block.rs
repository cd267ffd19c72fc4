//! Hashes one random block with Toeplitz privacy amplification and prints the
//! throughput; used to measure peak memory with `/usr/bin/time -v`.
//!
//! Usage: `cargo run --release -p qkdnet-postproc --example pa_block -- [n_bits] [m_bits] [backend] [runs]`
//! (defaults: 10^8 input bits, m = n/2, backend `auto`, 1 run; backends
//! `auto`, `karatsuba`, `fft`, `pclmul`, `portable`). Every run hashes the
//! same block. Run 0 calls `toeplitz_hash_with`, which allocates (and
//! frees) fresh FFT buffers: the cold figure. Later runs call
//! `toeplitz_hash_in` with one `Scratch`, warmed by an untimed call first:
//! the steady state of a node amplifying block after block. Prints one JSON
//! line per run; peak RSS is the process's high-water mark (`VmHWM`, Linux
//! only, else null), inputs included.

use std::time::Instant;

use qkdnet_postproc::bits::BitVec;
use qkdnet_postproc::gf2x::Scratch;
use qkdnet_postproc::pa::{Backend, PaError, seed_len, toeplitz_hash_in, toeplitz_hash_with};
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000_000);
    let m: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(n / 2);
    let (name, backend) = match args.next().as_deref() {
        None | Some("auto") => ("auto", Backend::Auto),
        Some("karatsuba") => ("karatsuba", Backend::Karatsuba),
        Some("fft") => ("fft", Backend::Fft),
        Some("pclmul") => ("pclmul", Backend::Pclmul),
        Some("portable") => ("portable", Backend::Portable),
        Some(other) => {
            eprintln!("error: unknown backend {other:?}");
            std::process::exit(2);
        }
    };
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(1);
    let x = BitVec::random(n, &mut rng);
    let seed = BitVec::random(seed_len(n, m), &mut rng);
    let runs: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let mut scratch = Scratch::new();
    for run in 0..runs {
        if run == 1 {
            exit_on_error(toeplitz_hash_in(&mut scratch, backend, &seed, &x, m));
        }
        let t = Instant::now();
        let y = exit_on_error(if run == 0 {
            toeplitz_hash_with(backend, &seed, &x, m)
        } else {
            toeplitz_hash_in(&mut scratch, backend, &seed, &x, m)
        });
        let dt = t.elapsed().as_secs_f64();
        let rss =
            peak_rss_kib().map_or("null".to_string(), |k| format!("{:.1}", k as f64 / 1024.0));
        let buffers = if run == 0 { "fresh" } else { "reused" };
        println!(
            "{{\"n\":{n},\"m\":{m},\"backend\":\"{name}\",\"run\":{run},\"buffers\":\"{buffers}\",\"seconds\":{dt:.4},\"gbit_per_s\":{:.4},\"peak_rss_mib\":{rss},\"ones\":{}}}",
            n as f64 / dt / 1e9,
            y.count_ones()
        );
    }
}

/// The hash, or exit with the error.
fn exit_on_error(r: Result<BitVec, PaError>) -> BitVec {
    r.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1);
    })
}

/// Peak resident set size of this process in KiB (`VmHWM` in
/// `/proc/self/status`), if the platform reports it.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
