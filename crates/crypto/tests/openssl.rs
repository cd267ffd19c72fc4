//! Differential tests against the OpenSSL command line on seeded pseudo-random
//! inputs: SM3, HMAC-SM3, SM4-CTR and the SM2 KDF (= ANSI X9.63 KDF with SM3).
//!
//! Each test first checks that this machine's `openssl` supports the algorithm; if
//! not it prints a `SKIPPED:` note (visible with `--nocapture`) instead of failing,
//! never passing silently on a broken comparison.

use std::io::Write;
use std::process::{Command, Stdio};

use qkdnet_crypto::kdf::sm2_kdf;
use qkdnet_crypto::sm3::{hmac_sm3, sm3};
use qkdnet_crypto::sm4::Sm4Ctr;

/// SplitMix64: a tiny seeded generator, enough to drive differential tests.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Runs openssl with `stdin`, returning stdout, or None if it failed.
fn openssl(args: &[&str], stdin: &[u8]) -> Option<Vec<u8>> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(stdin).ok()?;
    let out = child.wait_with_output().ok()?;
    out.status.success().then_some(out.stdout)
}

fn supported(what: &str, args: &[&str]) -> bool {
    let ok = openssl(args, b"probe").is_some();
    if !ok {
        println!(
            "SKIPPED: this openssl lacks {what} (`openssl {}` failed)",
            args.join(" ")
        );
    }
    ok
}

const LENGTHS: &[usize] = &[0, 1, 15, 16, 17, 55, 56, 63, 64, 65, 1000, 4096, 100_003];

#[test]
fn sm3_matches_openssl() {
    if !supported("SM3", &["dgst", "-sm3", "-binary"]) {
        return;
    }
    let mut rng = SplitMix(0x5133);
    for &len in LENGTHS {
        let data = rng.bytes(len);
        let theirs = openssl(&["dgst", "-sm3", "-binary"], &data).expect("openssl dgst ran");
        assert_eq!(sm3(&data).to_vec(), theirs, "len {len}");
    }
}

#[test]
fn hmac_sm3_matches_openssl() {
    let probe = ["mac", "-digest", "SM3", "-macopt", "hexkey:00", "HMAC"];
    if !supported("HMAC-SM3", &probe) {
        return;
    }
    let mut rng = SplitMix(0x4D41);
    // Key lengths around the 64-byte block, where HMAC hashes long keys.
    for (i, key_len) in [1usize, 16, 32, 63, 64, 65, 100].into_iter().enumerate() {
        let key = rng.bytes(key_len);
        let data = rng.bytes(LENGTHS[i % LENGTHS.len()] + i);
        let hexkey = format!("hexkey:{}", hex::encode(&key));
        let out = openssl(
            &["mac", "-digest", "SM3", "-macopt", &hexkey, "HMAC"],
            &data,
        )
        .expect("openssl mac ran");
        let theirs = String::from_utf8(out)
            .expect("hex text")
            .trim()
            .to_lowercase();
        assert_eq!(
            hex::encode(hmac_sm3(&key, &data)),
            theirs,
            "key len {key_len}"
        );
    }
}

#[test]
fn sm4_ctr_matches_openssl_enc() {
    let probe = [
        "enc",
        "-sm4-ctr",
        "-K",
        "00000000000000000000000000000000",
        "-iv",
        "00000000000000000000000000000000",
    ];
    if !supported("SM4-CTR", &probe) {
        return;
    }
    let mut rng = SplitMix(0x5344);
    for (i, &len) in LENGTHS.iter().enumerate() {
        let key = rng.bytes(16);
        let mut iv = rng.bytes(16);
        if i % 3 == 0 {
            // Low 64 bits about to carry: OpenSSL's counter is the full 128 bits.
            iv[8..].copy_from_slice(&[0xff; 8]);
        }
        let data = rng.bytes(len);
        let (k, v) = (hex::encode(&key), hex::encode(&iv));
        let theirs =
            openssl(&["enc", "-sm4-ctr", "-K", &k, "-iv", &v], &data).expect("openssl enc ran");
        let mut ours = data.clone();
        let mut ctr = Sm4Ctr::from_slices(&key, &iv).expect("lengths");
        // Odd chunking to exercise keystream continuation.
        for piece in ours.chunks_mut(1 + i * 7) {
            ctr.apply_keystream(piece).expect("short stream");
        }
        assert_eq!(ours, theirs, "len {len}");
    }
}

#[test]
fn sm2_kdf_matches_openssl_x963kdf_with_sm3() {
    let probe = [
        "kdf",
        "-keylen",
        "16",
        "-kdfopt",
        "digest:SM3",
        "-kdfopt",
        "hexsecret:00",
        "X963KDF",
    ];
    if !supported("X963KDF with SM3", &probe) {
        return;
    }
    let mut rng = SplitMix(0x4B44);
    for (z_len, out_len) in [
        (1usize, 1usize),
        (32, 16),
        (64, 32),
        (64, 33),
        (65, 100),
        (20, 257),
    ] {
        let z = rng.bytes(z_len);
        let secret = format!("hexsecret:{}", hex::encode(&z));
        let keylen = out_len.to_string();
        let out = openssl(
            &[
                "kdf",
                "-keylen",
                &keylen,
                "-kdfopt",
                "digest:SM3",
                "-kdfopt",
                &secret,
                "X963KDF",
            ],
            b"",
        )
        .expect("openssl kdf ran");
        let theirs = String::from_utf8(out)
            .expect("text")
            .trim()
            .replace(':', "")
            .to_lowercase();
        let mut ours = vec![0u8; out_len];
        sm2_kdf(&z, &mut ours).expect("short output");
        assert_eq!(hex::encode(ours), theirs, "z {z_len} out {out_len}");
    }
}
