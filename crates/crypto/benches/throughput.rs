//! Throughput per core of the bulk primitives, at a voice packet (160 B), a
//! full-MTU tunnel packet (1400 B), OpenSSL's largest `speed` block
//! (16 KiB), at the chunk and frame size of sealed files and live streams
//! (64 KiB), and file-sized (1 MiB).
//!
//! Criterion runs one thread, so every figure is per core. Covered: SM3, HMAC-SM3
//! (OTP tags), SM4-CTR, SM4-GCM seal and open (and seal on the portable
//! bitsliced SM4 kernel at 16 KiB) (one-shot, in place, as frames and
//! chunks use it) and the STREAM chunk sealer that sealed files use (1 MiB in
//! 64 KiB chunks, i.e. 16 tags per MiB).
//!
//! Run (on an otherwise idle machine):
//! `cargo bench -p qkdnet-crypto --bench throughput -- --warm-up-time 1 --measurement-time 3`
//! (machine-readable results: `target/criterion/crypto/*/*/new/estimates.json`).
//! Compare with `openssl speed -seconds 3 -bytes 16384 -evp sm4-ctr`, `-evp sm3`
//! and `-hmac sm3` on the same machine; OpenSSL 3.0 has no SM4-GCM.

#![allow(
    missing_docs,
    reason = "criterion_group! expands to an undocumented pub fn"
)]

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use qkdnet_crypto::Sm4Key;
use qkdnet_crypto::chunked::ChunkSealer;
use qkdnet_crypto::gcm::Sm4Gcm;
use qkdnet_crypto::sm3::{hmac_sm3, sm3};
use qkdnet_crypto::sm4::{Sm4Ctr, Sm4Kernel};

const SIZES: &[(usize, &str)] = &[
    (160, "160B"),   // one G.711 RTP payload (20 ms)
    (1400, "1400B"), // one full-MTU tunnel packet
    (16 * 1024, "16KiB"),
    (64 * 1024, "64KiB"),
    (1024 * 1024, "1MiB"),
];

/// Chunk size of sealed files (`qkdnet_apps::seal::DEFAULT_CHUNK_SIZE`).
const CHUNK: usize = 64 * 1024;

fn bench(c: &mut Criterion) {
    eprintln!("SM4 kernel: {}", qkdnet_crypto::sm4::kernel().name());
    let key = Sm4Key::new([0x42; 16]);
    let nonce = [7u8; 12];
    let aad = [0u8; 13]; // a stream frame header
    let mut g = c.benchmark_group("crypto");
    for &(size, label) in SIZES {
        let mut buf = vec![0x5Au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(BenchmarkId::new("sm3", label), |b| {
            b.iter(|| black_box(sm3(black_box(&buf))))
        });
        g.bench_function(BenchmarkId::new("hmac-sm3", label), |b| {
            b.iter(|| black_box(hmac_sm3(&[1u8; 32], black_box(&buf))))
        });
        g.bench_function(BenchmarkId::new("sm4-ctr", label), |b| {
            b.iter(|| {
                let mut ctr = Sm4Ctr::new(&key, &[0u8; 16]);
                ctr.apply_keystream(black_box(&mut buf))
                    .expect("short stream");
            })
        });
        let gcm = Sm4Gcm::new(&key);
        g.bench_function(BenchmarkId::new("sm4-gcm-seal", label), |b| {
            b.iter(|| {
                black_box(
                    gcm.seal_in_place_detached(&nonce, &aad, black_box(&mut buf))
                        .expect("short message"),
                )
            })
        });
        // Open needs a fresh ciphertext each time: the copy is made outside the
        // timed part.
        let mut sealed = vec![0x5Au8; size];
        let tag = gcm
            .seal_in_place_detached(&nonce, &aad, &mut sealed)
            .expect("short message");
        g.bench_function(BenchmarkId::new("sm4-gcm-open", label), |b| {
            b.iter_batched_ref(
                || sealed.clone(),
                |ct| {
                    gcm.open_in_place_detached(&nonce, &aad, black_box(ct), &tag)
                        .expect("authentic")
                },
                BatchSize::LargeInput,
            )
        });
        if size == 16 * 1024 {
            // The portable constant-time kernel, for CPUs without AVX-512 + GFNI.
            let soft = Sm4Gcm::with_kernel(&key, Sm4Kernel::Soft);
            g.bench_function(BenchmarkId::new("sm4-gcm-seal-soft", label), |b| {
                b.iter(|| {
                    black_box(
                        soft.seal_in_place_detached(&nonce, &aad, black_box(&mut buf))
                            .expect("short message"),
                    )
                })
            });
        }
        if size >= CHUNK {
            g.bench_function(BenchmarkId::new("sm4-gcm-chunked-64KiB", label), |b| {
                b.iter(|| {
                    let mut s = ChunkSealer::new(&key, [3; 7]);
                    let n = buf.len().div_ceil(CHUNK);
                    let mut chunks = buf.chunks_mut(CHUNK);
                    for _ in 1..n {
                        let c = chunks.next().expect("n chunks");
                        black_box(s.seal_chunk(&aad, c).expect("short"));
                    }
                    let last = chunks.next().expect("n chunks");
                    black_box(s.seal_last(&aad, last).expect("short"))
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
