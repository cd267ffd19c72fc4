//! Throughput of the bulk primitives at packet-ish (16 KiB) and file-ish (1 MiB) sizes.
//!
//! Run: `cargo bench -p qkdnet-crypto --bench throughput -- --warm-up-time 1 --measurement-time 3`.
//! Compare with `openssl speed -evp sm4-ctr` / `-evp sm3` on the same machine.

#![allow(
    missing_docs,
    reason = "criterion_group! expands to an undocumented pub fn"
)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use qkdnet_crypto::Sm4Key;
use qkdnet_crypto::gcm::Sm4Gcm;
use qkdnet_crypto::sm3::sm3;
use qkdnet_crypto::sm4::Sm4Ctr;

const SIZES: &[(usize, &str)] = &[(16 * 1024, "16KiB"), (1024 * 1024, "1MiB")];

fn bench(c: &mut Criterion) {
    let key = Sm4Key::new([0x42; 16]);
    let mut g = c.benchmark_group("crypto");
    for &(size, label) in SIZES {
        let mut buf = vec![0x5Au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(BenchmarkId::new("sm3", label), |b| {
            b.iter(|| black_box(sm3(black_box(&buf))))
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
                    gcm.seal_in_place_detached(&[0u8; 12], b"", black_box(&mut buf))
                        .expect("short message"),
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
