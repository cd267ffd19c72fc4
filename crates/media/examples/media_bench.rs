//! Benchmark of the file medium: how fast keys go into a medium (charging) and
//! come out of it (each take syncs the consumption counter before the key is
//! returned). Keys are made up here (SM3 of a counter): the figure is the
//! medium's, not the network's; a charging point is bounded by whichever is
//! slower, the link's key rate or this. Prints one JSON object.
//!
//! ```sh
//! cargo run --release -p qkdnet-media --example media_bench -- --keys 130000 --batch 1000 --takes 2000
//! ```
#![allow(missing_docs)]

use std::time::Instant;

use qkdnet_crypto::SecretBytes;
use qkdnet_crypto::sm3::sm3;
use qkdnet_media::{ChargeRecord, FileMedium, Key256, Medium, MediumSpec};

fn arg(name: &str, default: u64) -> Result<u64, String> {
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == name {
            return it
                .next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number"));
        }
    }
    Ok(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let keys = arg("--keys", 130_000)?;
    let batch = arg("--batch", 1_000)?.max(1);
    let takes = arg("--takes", 2_000)?.min(keys);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.medium");
    let pin = SecretBytes::from_slice(b"benchmark PIN");
    let t = Instant::now();
    let mut m = FileMedium::create(&path, &MediumSpec::new("sip:bench@example.net", keys), &pin)?;
    let create_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut n = 0u64;
    while n < keys {
        let count = batch.min(keys - n);
        let chunk: Vec<Key256> = (n..n + count)
            .map(|i| Key256::new(sm3(&i.to_le_bytes())))
            .collect();
        m.charge(&chunk, ChargeRecord::new("sae-charger", 1_800_000_000)?)?;
        n += count;
    }
    let charge_s = t.elapsed().as_secs_f64();
    let size = std::fs::metadata(&path)?.len();
    drop(m);
    let t = Instant::now();
    let mut m = FileMedium::open(&path, &pin)?;
    let open_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..takes {
        let (_, key) = m.take_next()?;
        drop(key);
    }
    let take_s = t.elapsed().as_secs_f64();
    println!(
        "{{\"keys\": {keys}, \"batch\": {batch}, \"file_bytes\": {size}, \"create_s\": {create_s:.3}, \"open_s\": {open_s:.3}, \
         \"charge_keys_per_s\": {:.0}, \"takes\": {takes}, \"take_keys_per_s\": {:.0}, \"take_ms_mean\": {:.3}}}",
        keys as f64 / charge_s,
        takes as f64 / take_s,
        1e3 * take_s / takes.max(1) as f64
    );
    Ok(())
}
