//! Benchmark of a medium: how fast keys go into it (charging) and come out of
//! it (each take makes the consumption counter durable before the key is
//! returned). Keys are made up here (SM3 of a counter): the figure is the
//! medium's, not the network's; a charging point is bounded by whichever is
//! slower, the link's key rate or this. Prints one JSON object.
//!
//! `--backend file` (the default) measures the file medium in a temporary
//! directory. `--backend pkcs11` measures the PKCS#11 medium in the SoftHSM2
//! token that `scripts/softhsm.sh` makes (it reads the variables the script
//! prints) and destroys the medium at the end.
//!
//! ```sh
//! cargo run --release -p qkdnet-media --example media_bench -- --keys 130000 --batch 1000 --takes 2000
//! hsm_env=$(bash scripts/softhsm.sh) && while IFS= read -r l; do export "$l"; done <<<"$hsm_env"
//! cargo run --release -p qkdnet-media --example media_bench -- --backend pkcs11 --keys 130000 --batch 1000 --takes 500
//! ```
#![allow(missing_docs)]

use std::time::Instant;

use qkdnet_crypto::SecretBytes;
use qkdnet_crypto::sm3::sm3;
use qkdnet_media::{ChargeRecord, FileMedium, Key256, Medium, MediumSpec, Pkcs11Medium};

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn number(args: &[String], name: &str, default: u64) -> Result<u64, String> {
    match arg(args, name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| format!("{name} needs a number")),
    }
}

fn env(var: &str) -> Result<String, String> {
    std::env::var(var).map_err(|_| {
        format!("{var} is not set: run `hsm_env=$(bash scripts/softhsm.sh) && …` first")
    })
}

/// Charges `keys` keys in batches of `batch`; returns the seconds it took.
fn charge_all(
    m: &mut impl Medium,
    keys: u64,
    batch: u64,
) -> Result<f64, Box<dyn std::error::Error>> {
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
    Ok(t.elapsed().as_secs_f64())
}

/// Takes `takes` keys; returns each take's time in milliseconds, sorted.
fn take_all(m: &mut impl Medium, takes: u64) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let mut ms = Vec::with_capacity(takes as usize);
    for _ in 0..takes {
        let t = Instant::now();
        let (_, key) = m.take_next()?;
        ms.push(1e3 * t.elapsed().as_secs_f64());
        drop(key);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms)
}

/// The take figures: keys per second, mean, median and 99th percentile.
fn take_json(ms: &[f64]) -> String {
    let total: f64 = ms.iter().sum();
    let at = |q: f64| {
        ms.get(((ms.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    format!(
        "\"takes\": {}, \"take_keys_per_s\": {:.0}, \"take_ms_mean\": {:.3}, \"take_ms_p50\": {:.3}, \"take_ms_p99\": {:.3}",
        ms.len(),
        1e3 * ms.len() as f64 / total.max(f64::MIN_POSITIVE),
        total / ms.len().max(1) as f64,
        at(0.5),
        at(0.99)
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let keys = number(&args, "--keys", 130_000)?;
    let batch = number(&args, "--batch", 1_000)?.max(1);
    let takes = number(&args, "--takes", 2_000)?.min(keys);
    let spec = MediumSpec::new("sip:bench@example.net", keys);
    match arg(&args, "--backend").unwrap_or("file") {
        "file" => {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("bench.medium");
            let pin = SecretBytes::from_slice(b"benchmark PIN");
            let t = Instant::now();
            let mut m = FileMedium::create(&path, &spec, &pin)?;
            let create_s = t.elapsed().as_secs_f64();
            let charge_s = charge_all(&mut m, keys, batch)?;
            let size = std::fs::metadata(&path)?.len();
            drop(m);
            let t = Instant::now();
            let mut m = FileMedium::open(&path, &pin)?;
            let open_s = t.elapsed().as_secs_f64();
            let ms = take_all(&mut m, takes)?;
            println!(
                "{{\"backend\": \"file\", \"keys\": {keys}, \"batch\": {batch}, \"file_bytes\": {size}, \"create_s\": {create_s:.3}, \
                 \"open_s\": {open_s:.3}, \"charge_keys_per_s\": {:.0}, {}}}",
                keys as f64 / charge_s,
                take_json(&ms)
            );
        }
        "pkcs11" => {
            let module = std::path::PathBuf::from(env("QKDNET_TEST_PKCS11_MODULE")?);
            let token = env("QKDNET_TEST_PKCS11_TOKEN_MEDIA")?;
            let mut pin = std::fs::read(env("QKDNET_TEST_PKCS11_PIN_FILE")?)?;
            while pin.last().is_some_and(|b| b.is_ascii_whitespace()) {
                pin.pop();
            }
            let pin = SecretBytes::new(pin);
            let t = Instant::now();
            let mut m = Pkcs11Medium::create(&module, &token, &pin, &spec)?;
            let create_s = t.elapsed().as_secs_f64();
            let charge_s = charge_all(&mut m, keys, batch)?;
            drop(m);
            let t = Instant::now();
            let mut m = Pkcs11Medium::open(&module, &token, &pin, Some(spec.id))?;
            let open_s = t.elapsed().as_secs_f64();
            let ms = take_all(&mut m, takes)?;
            let t = Instant::now();
            m.destroy()?;
            let destroy_s = t.elapsed().as_secs_f64();
            println!(
                "{{\"backend\": \"pkcs11\", \"token\": \"{token}\", \"keys\": {keys}, \"batch\": {batch}, \"create_s\": {create_s:.3}, \
                 \"open_s\": {open_s:.3}, \"destroy_s\": {destroy_s:.3}, \"charge_keys_per_s\": {:.0}, {}}}",
                keys as f64 / charge_s,
                take_json(&ms)
            );
        }
        other => return Err(format!("--backend {other}: file or pkcs11").into()),
    }
    Ok(())
}
