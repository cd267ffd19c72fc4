//! Key derivation: the SM2 KDF of GB/T 32918 and HKDF instantiated with HMAC-SM3.
//!
//! Two KDFs, because they serve different callers. The GB/T 32918.4 KDF (a
//! counter-mode hash, identical in shape to ANSI X9.63 with SM3) is what SM2
//! encryption and key exchange specify, so interoperable code needs it bit for bit.
//! HKDF (RFC 5869) with HMAC-SM3 is what qkdnet uses for its own derivations (the
//! hybrid combiner, per-session SM4 keys), because its extract step is a proven
//! randomness extractor and its expand step separates contexts with an `info`
//! string; keeping SM3 inside keeps the whole key path within the national suite.
//! Both write into caller-owned buffers so hot paths need not allocate.

use crate::error::{CryptoError, Result};
use crate::secret::{SecretBytes, SharedSecret};
use crate::sm3::{HmacSm3, SM3_LEN, Sm3Hasher};

/// Largest output of [`sm2_kdf`]: the 32-bit counter may not wrap, (2^32 - 1) blocks.
pub const SM2_KDF_MAX_LEN: u64 = (u32::MAX as u64) * SM3_LEN as u64;

/// Largest output of [`hkdf_sm3_expand`]: 255 HMAC blocks (RFC 5869 § 2.3).
pub const HKDF_SM3_MAX_LEN: usize = 255 * SM3_LEN;

/// The KDF of GB/T 32918.4-2016 § 5.4.3: `out = SM3(z || ct=1) || SM3(z || ct=2) || ...`,
/// truncated to `out.len()`, with a 32-bit big-endian counter starting at 1.
///
/// Fills all of `out`. Errors only if `out` is longer than [`SM2_KDF_MAX_LEN`].
pub fn sm2_kdf(z: &[u8], out: &mut [u8]) -> Result<()> {
    sm2_kdf_with_info(z, &[], out)
}

/// [`sm2_kdf`] with extra shared info appended after the counter, as in ANSI X9.63
/// (`SM3(z || ct || info)`). With empty `info` it is exactly the GB/T 32918 KDF.
pub fn sm2_kdf_with_info(z: &[u8], info: &[u8], out: &mut [u8]) -> Result<()> {
    if out.len() as u64 > SM2_KDF_MAX_LEN {
        return Err(CryptoError::KdfOutputTooLong {
            requested: out.len(),
            max: usize::try_from(SM2_KDF_MAX_LEN).unwrap_or(usize::MAX),
        });
    }
    let mut prefix = Sm3Hasher::new();
    prefix.update(z);
    for (i, block) in out.chunks_mut(SM3_LEN).enumerate() {
        // i < 2^32 - 1 by the length check above, so the counter cannot wrap.
        let counter =
            u32::try_from(i + 1).expect("invariant: length checked against SM2_KDF_MAX_LEN");
        let mut h = prefix.clone();
        h.update(&counter.to_be_bytes());
        h.update(info);
        let d = h.finalize();
        block.copy_from_slice(&d[..block.len()]);
    }
    Ok(())
}

/// HKDF-Extract (RFC 5869 § 2.2) with HMAC-SM3: `PRK = HMAC-SM3(salt, ikm)`.
/// An empty salt means 32 zero bytes, as in the RFC. `ikm` is given as parts that
/// are concatenated, so secrets need not be copied into one buffer first.
pub fn hkdf_sm3_extract(salt: &[u8], ikm: &[&[u8]]) -> SharedSecret {
    let mut prk = SharedSecret::zeroed();
    let mut mac = if salt.is_empty() {
        HmacSm3::new(&[0u8; SM3_LEN])
    } else {
        HmacSm3::new(salt)
    };
    for part in ikm {
        mac.update(part);
    }
    *prk.expose_secret_mut() = mac.finalize();
    prk
}

/// HKDF-Expand (RFC 5869 § 2.3) with HMAC-SM3 into `out` (at most [`HKDF_SM3_MAX_LEN`] bytes).
///
/// `info` is given as parts that are concatenated, so callers can pass a label and
/// encoded fields without first building one buffer.
pub fn hkdf_sm3_expand(prk: &SharedSecret, info: &[&[u8]], out: &mut [u8]) -> Result<()> {
    if out.len() > HKDF_SM3_MAX_LEN {
        return Err(CryptoError::KdfOutputTooLong {
            requested: out.len(),
            max: HKDF_SM3_MAX_LEN,
        });
    }
    let keyed = HmacSm3::new(prk.expose_secret());
    let mut t = SharedSecret::zeroed();
    let mut t_len = 0usize;
    for (i, block) in out.chunks_mut(SM3_LEN).enumerate() {
        let mut mac = keyed.clone();
        mac.update(&t.expose_secret()[..t_len]);
        for part in info {
            mac.update(part);
        }
        // i < 255 by the length check above.
        let counter = u8::try_from(i + 1).expect("invariant: at most 255 blocks");
        mac.update(&[counter]);
        *t.expose_secret_mut() = mac.finalize();
        t_len = SM3_LEN;
        block.copy_from_slice(&t.expose_secret()[..block.len()]);
    }
    Ok(())
}

/// Extract-then-expand convenience returning `len` bytes as a secret.
pub fn hkdf_sm3(salt: &[u8], ikm: &[u8], info: &[&[u8]], len: usize) -> Result<SecretBytes> {
    let prk = hkdf_sm3_extract(salt, &[ikm]);
    let mut out = SecretBytes::zeroed(len);
    hkdf_sm3_expand(&prk, info, out.expose_secret_mut())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sm3::{hmac_sm3, sm3};

    /// Obviously-correct reference: build each counter block from scratch.
    fn sm2_kdf_reference(z: &[u8], len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut ct = 1u32;
        while out.len() < len {
            let mut buf = z.to_vec();
            buf.extend_from_slice(&ct.to_be_bytes());
            out.extend_from_slice(&sm3(&buf));
            ct += 1;
        }
        out.truncate(len);
        out
    }

    #[test]
    fn sm2_kdf_matches_reference_at_block_edges() {
        for len in [0, 1, 31, 32, 33, 64, 65, 100] {
            let mut out = vec![0u8; len];
            sm2_kdf(b"shared secret z", &mut out).expect("short output");
            assert_eq!(out, sm2_kdf_reference(b"shared secret z", len), "len {len}");
        }
    }

    #[test]
    fn hkdf_expand_matches_rfc5869_definition() {
        let prk = hkdf_sm3_extract(b"salt", &[b"i", b"km"]);
        assert_eq!(prk.expose_secret(), &hmac_sm3(b"salt", b"ikm"));
        let mut out = [0u8; 70];
        hkdf_sm3_expand(&prk, &[b"in", b"fo"], &mut out).expect("70 <= 8160");
        let t1 = hmac_sm3(prk.expose_secret(), b"info\x01");
        let mut m2 = t1.to_vec();
        m2.extend_from_slice(b"info\x02");
        let t2 = hmac_sm3(prk.expose_secret(), &m2);
        let mut m3 = t2.to_vec();
        m3.extend_from_slice(b"info\x03");
        let t3 = hmac_sm3(prk.expose_secret(), &m3);
        assert_eq!(&out[..32], &t1);
        assert_eq!(&out[32..64], &t2);
        assert_eq!(&out[64..], &t3[..6]);
    }

    #[test]
    fn hkdf_rejects_too_long_output() {
        let prk = hkdf_sm3_extract(b"", &[b"ikm"]);
        let mut out = vec![0u8; HKDF_SM3_MAX_LEN + 1];
        assert!(matches!(
            hkdf_sm3_expand(&prk, &[], &mut out),
            Err(CryptoError::KdfOutputTooLong { .. })
        ));
        assert!(hkdf_sm3_expand(&prk, &[], &mut out[..HKDF_SM3_MAX_LEN]).is_ok());
    }
}
