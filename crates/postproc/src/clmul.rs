//! Carry-less (GF(2)\[x\]) multiplication of 64-bit words: the one place in the
//! crate that uses `unsafe`.
//!
//! Toeplitz hashing ([`crate::pa`]) and the GF(2^128) polynomial hash
//! ([`crate::auth`]) both reduce to carry-less products of 64-bit words. x86-64
//! has a single instruction for that (PCLMULQDQ), reachable only through
//! `core::arch` intrinsics, which are `unsafe` and must only run on CPUs that
//! have the feature (and VPCLMULQDQ on 512-bit vectors does four at once).
//! This module keeps that unsafety in one small place: the fast paths are
//! reachable only through [`Pclmul`] and [`Avx512Clmul`], tokens that can
//! only be built after a successful runtime check, so safe code elsewhere
//! cannot call an intrinsic on a CPU without it. A portable, constant-time
//! software implementation with the same interface is the fallback and the
//! reference the fast paths are tested against. No crate is used: the generic carry-less
//! crates either lack a runtime-dispatched PCLMULQDQ path or do not expose the
//! word-array middle-product kernel that the Toeplitz recursion needs as its
//! base case.
#![allow(
    unsafe_code,
    reason = "PCLMULQDQ/VPCLMULQDQ intrinsics; each site has a SAFETY comment"
)]

/// A schoolbook carry-less multiplier of word arrays, the base case of the
/// Karatsuba-style Toeplitz recursion in [`crate::pa`].
pub(crate) trait ClmulBase: Copy {
    /// Middle product: with `n = x.len()`, `seed.len() == 2n` and
    /// `out.len() == n`, `out ^= words n..2n of seed * x` over GF(2)\[x\]
    /// (words LSB-first). This is an `64n × 64n` Toeplitz matrix-vector
    /// product, the base case of the recursion in [`crate::pa`].
    fn middle_xor(self, seed: &[u64], x: &[u64], out: &mut [u64]);
    /// Tile size (words) at or below which the Toeplitz recursion calls
    /// `middle_xor` instead of splitting further (tuned per kernel).
    const BASE_WORDS: usize;
    /// Carry-less product of two words as (low, high) words.
    fn mul64(self, a: u64, b: u64) -> (u64, u64);
}

/// Portable software carry-less multiply, constant-time (no secret-indexed
/// tables or branches: keys pass through it).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Portable;

/// Low 64 bits of the carry-less product, with ordinary integer multiplies:
/// each operand is split into four bit classes (positions ≡ 0, 1, 2, 3 mod 4)
/// so that within one integer product every column sums at most 15 one-bits
/// below bit 64, which fit in the 3 zero bits ("holes") above each position;
/// the column parities are then the bits of the right residue class. Integer
/// multiplication is constant-time on the targets we support.
#[inline]
fn bmul64_low(x: u64, y: u64) -> u64 {
    const M0: u64 = 0x1111_1111_1111_1111;
    const M1: u64 = M0 << 1;
    const M2: u64 = M0 << 2;
    const M3: u64 = M0 << 3;
    let (x0, x1, x2, x3) = (x & M0, x & M1, x & M2, x & M3);
    let (y0, y1, y2, y3) = (y & M0, y & M1, y & M2, y & M3);
    let m = |a: u64, b: u64| a.wrapping_mul(b);
    let z0 = m(x0, y0) ^ m(x1, y3) ^ m(x2, y2) ^ m(x3, y1);
    let z1 = m(x0, y1) ^ m(x1, y0) ^ m(x2, y3) ^ m(x3, y2);
    let z2 = m(x0, y2) ^ m(x1, y1) ^ m(x2, y0) ^ m(x3, y3);
    let z3 = m(x0, y3) ^ m(x1, y2) ^ m(x2, y1) ^ m(x3, y0);
    (z0 & M0) | (z1 & M1) | (z2 & M2) | (z3 & M3)
}

/// Carry-less product of two words, in software: (low, high). The high word
/// comes from the bit-reversed operands: reversing both reverses the 127-bit
/// product, so the low word of that product, reversed, is bits 63..127.
#[inline]
pub(crate) fn clmul64_portable(a: u64, b: u64) -> (u64, u64) {
    let lo = bmul64_low(a, b);
    let hi = bmul64_low(a.reverse_bits(), b.reverse_bits()).reverse_bits() >> 1;
    (lo, hi)
}

impl ClmulBase for Portable {
    const BASE_WORDS: usize = 16;
    fn middle_xor(self, seed: &[u64], x: &[u64], out: &mut [u64]) {
        middle_xor_generic(clmul64_portable, seed, x, out);
    }

    #[inline]
    fn mul64(self, a: u64, b: u64) -> (u64, u64) {
        clmul64_portable(a, b)
    }
}

/// The middle-product schoolbook, generic over the word multiplier so both
/// backends share one loop. For input word `j` only the `n + 1` seed words
/// whose products land in columns `n−1 ..= 2n−1` are touched: column
/// `n − 1 + t` gives its high word to `out[t]` and column `n + t` its low
/// word to `out[t]`.
#[inline(always)]
fn middle_xor_generic(
    mul: impl Fn(u64, u64) -> (u64, u64),
    seed: &[u64],
    x: &[u64],
    out: &mut [u64],
) {
    let n = x.len();
    let seed = &seed[..2 * n];
    let out = &mut out[..n];
    for (j, &xj) in x.iter().enumerate() {
        if xj == 0 {
            continue;
        }
        let row = &seed[n - 1 - j..2 * n - j];
        let (_, mut prev_hi) = mul(row[0], xj);
        for (o, &s) in out.iter_mut().zip(&row[1..]) {
            let (lo, hi) = mul(s, xj);
            *o ^= lo ^ prev_hi;
            prev_hi = hi;
        }
    }
}

/// Proof that the running CPU supports PCLMULQDQ (and SSE2). Only
/// [`Pclmul::detect`] builds it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pclmul {
    _proof: (),
}

impl Pclmul {
    /// The token if the CPU supports PCLMULQDQ, else `None`.
    pub(crate) fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("pclmulqdq")
                && std::arch::is_x86_feature_detected!("sse2")
            {
                return Some(Self { _proof: () });
            }
        }
        None
    }
}

/// Proof that the running CPU supports VPCLMULQDQ on 512-bit vectors
/// (AVX-512F + VPCLMULQDQ, plus PCLMULQDQ for the scalar fallback). Only
/// [`Avx512Clmul::detect`] builds it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512Clmul {
    scalar: Pclmul,
}

impl Avx512Clmul {
    /// The token if the CPU has AVX-512F, VPCLMULQDQ and PCLMULQDQ.
    pub(crate) fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            let scalar = Pclmul::detect()?;
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("vpclmulqdq")
            {
                return Some(Self { scalar });
            }
        }
        None
    }
}

impl ClmulBase for Avx512Clmul {
    const BASE_WORDS: usize = 48;
    #[inline]
    fn middle_xor(self, seed: &[u64], x: &[u64], out: &mut [u64]) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: an `Avx512Clmul` token exists only if `detect` saw
            // AVX-512F, VPCLMULQDQ, PCLMULQDQ and SSE2 at run time; the
            // callee's only raw-pointer access is justified at its site.
            unsafe { x86::middle_xor_512(seed, x, out) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.scalar.middle_xor(seed, x, out)
    }

    #[inline]
    fn mul64(self, a: u64, b: u64) -> (u64, u64) {
        self.scalar.mul64(a, b)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::{__m128i, _mm_clmulepi64_si128, _mm_set_epi64x, _mm_storeu_si128};
    use core::arch::x86_64::{
        __m512i, _mm512_clmulepi64_epi128, _mm512_loadu_si512, _mm512_set1_epi64,
        _mm512_setzero_si512, _mm512_storeu_si512, _mm512_xor_si512,
    };

    /// Carry-less product of two words.
    #[target_feature(enable = "pclmulqdq,sse2")]
    #[inline]
    pub(super) fn mul64(a: u64, b: u64) -> (u64, u64) {
        let p =
            _mm_clmulepi64_si128::<0x00>(_mm_set_epi64x(0, a as i64), _mm_set_epi64x(0, b as i64));
        let mut buf = [0u64; 2];
        // SAFETY: `buf` is 16 bytes of writable, owned memory; the unaligned
        // store has no alignment requirement.
        unsafe { _mm_storeu_si128(buf.as_mut_ptr().cast::<__m128i>(), p) };
        (buf[0], buf[1])
    }

    /// The middle-product schoolbook with PCLMULQDQ word products.
    #[target_feature(enable = "pclmulqdq,sse2")]
    pub(super) fn middle_xor(seed: &[u64], x: &[u64], out: &mut [u64]) {
        super::middle_xor_generic(|a, b| mul64(a, b), seed, x, out);
    }

    /// Largest `n` handled by the 512-bit kernel (fixed-size buffers).
    const MAX_N: usize = 64;
    /// Accumulator blocks of 8 columns: `⌈(MAX_N + 1) / 8⌉`.
    const MAX_BLOCKS: usize = (MAX_N + 1).div_ceil(8);

    /// The middle product with VPCLMULQDQ, four word products per
    /// instruction. By linearity, column sums `A[u] = Σ_j seed[n−1−j+u]·x_j`
    /// (128-bit, `u = 0..=n`) are accumulated eight columns at a time: one
    /// 512-bit load of seed words `k..k+8` against `x_j` broadcast gives the
    /// even columns with selector 0x00 and the odd ones with 0x01. Then
    /// `out[t] ^= low(A[t+1]) ^ high(A[t])`.
    #[target_feature(enable = "avx512f,vpclmulqdq,pclmulqdq,sse2")]
    pub(super) fn middle_xor_512(seed: &[u64], x: &[u64], out: &mut [u64]) {
        let n = x.len();
        if n == 0 || n > MAX_N {
            return middle_xor(seed, x, out);
        }
        let mut pad = [0u64; 2 * MAX_N + 8 * MAX_BLOCKS];
        pad[..2 * n].copy_from_slice(&seed[..2 * n]);
        let out = &mut out[..n];
        let blocks = (n + 1).div_ceil(8);
        let mut even = [_mm512_setzero_si512(); MAX_BLOCKS];
        let mut odd = [_mm512_setzero_si512(); MAX_BLOCKS];
        for (j, &xj) in x.iter().enumerate() {
            let vx = _mm512_set1_epi64(xj as i64);
            let k0 = n - 1 - j;
            for b in 0..blocks {
                let k = k0 + 8 * b;
                debug_assert!(k + 8 <= pad.len());
                // SAFETY: k + 8 ≤ (n − 1) + 8·blocks ≤ 2·MAX_N + 8·MAX_BLOCKS
                // = pad.len() (n ≤ MAX_N, blocks ≤ MAX_BLOCKS), so the
                // unaligned 64-byte load stays inside `pad`.
                let vs = unsafe { _mm512_loadu_si512(pad.as_ptr().add(k).cast::<__m512i>()) };
                even[b] = _mm512_xor_si512(even[b], _mm512_clmulepi64_epi128::<0x00>(vs, vx));
                odd[b] = _mm512_xor_si512(odd[b], _mm512_clmulepi64_epi128::<0x01>(vs, vx));
            }
        }
        // a[2u], a[2u+1] = low and high word of A[u].
        let mut a = [0u64; 2 * 8 * MAX_BLOCKS];
        for b in 0..blocks {
            let (mut e, mut o) = ([0u64; 8], [0u64; 8]);
            // SAFETY: `e` and `o` are 64 bytes of owned, writable memory; the
            // store is unaligned.
            unsafe {
                _mm512_storeu_si512(e.as_mut_ptr().cast::<__m512i>(), even[b]);
                _mm512_storeu_si512(o.as_mut_ptr().cast::<__m512i>(), odd[b]);
            }
            for i in 0..4 {
                let u = 8 * b + 2 * i;
                a[2 * u] = e[2 * i];
                a[2 * u + 1] = e[2 * i + 1];
                a[2 * (u + 1)] = o[2 * i];
                a[2 * (u + 1) + 1] = o[2 * i + 1];
            }
        }
        for (t, o) in out.iter_mut().enumerate() {
            *o ^= a[2 * (t + 1)] ^ a[2 * t + 1];
        }
    }
}

impl ClmulBase for Pclmul {
    const BASE_WORDS: usize = 16;
    #[inline]
    fn middle_xor(self, seed: &[u64], x: &[u64], out: &mut [u64]) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: a `Pclmul` token exists only if `detect` saw PCLMULQDQ
            // and SSE2 at run time; the callee indexes with bounds checks.
            unsafe { x86::middle_xor(seed, x, out) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Portable.middle_xor(seed, x, out)
    }

    #[inline]
    fn mul64(self, a: u64, b: u64) -> (u64, u64) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: as in `middle_xor`: the token proves the CPU features.
            unsafe { x86::mul64(a, b) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        clmul64_portable(a, b)
    }
}

/// Carry-less product of two words, using PCLMULQDQ when available.
#[inline]
pub(crate) fn clmul64(a: u64, b: u64) -> (u64, u64) {
    match Pclmul::detect() {
        Some(p) => p.mul64(a, b),
        None => clmul64_portable(a, b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_xoshiro::Xoshiro256PlusPlus;

    fn naive(a: u64, b: u64) -> (u64, u64) {
        let mut r = 0u128;
        for i in 0..64 {
            if (b >> i) & 1 == 1 {
                r ^= (a as u128) << i;
            }
        }
        (r as u64, (r >> 64) as u64)
    }

    #[test]
    fn known_products() {
        // (x+1)^2 = x^2+1 over GF(2).
        assert_eq!(clmul64_portable(3, 3), (5, 0));
        assert_eq!(clmul64_portable(1 << 63, 1 << 63), (0, 1 << 62));
        assert_eq!(naive(3, 3), (5, 0));
    }

    #[test]
    fn portable_and_fast_match_naive() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(10);
        let fast = Pclmul::detect();
        for _ in 0..2000 {
            let (a, b) = (rng.next_u64(), rng.next_u64());
            assert_eq!(clmul64_portable(a, b), naive(a, b));
            assert_eq!(clmul64(a, b), naive(a, b));
            if let Some(f) = fast {
                assert_eq!(f.mul64(a, b), naive(a, b));
            }
        }
    }

    #[test]
    fn middle_product_matches_full_product() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(11);
        for n in [
            1usize, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 40, 63, 64, 65,
        ] {
            let seed: Vec<u64> = (0..2 * n).map(|_| rng.next_u64()).collect();
            let x: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
            // Full product by the naive word multiply.
            let mut full = vec![0u64; 3 * n];
            for (i, &s) in seed.iter().enumerate() {
                for (j, &y) in x.iter().enumerate() {
                    let (lo, hi) = naive(s, y);
                    full[i + j] ^= lo;
                    full[i + j + 1] ^= hi;
                }
            }
            let mut o1 = vec![0u64; n];
            Portable.middle_xor(&seed, &x, &mut o1);
            assert_eq!(o1, full[n..2 * n], "portable n={n}");
            if let Some(fast) = Pclmul::detect() {
                let mut o2 = vec![0u64; n];
                fast.middle_xor(&seed, &x, &mut o2);
                assert_eq!(o2, full[n..2 * n], "fast n={n}");
            }
            if let Some(wide) = Avx512Clmul::detect() {
                let mut o3 = vec![0u64; n];
                wide.middle_xor(&seed, &x, &mut o3);
                assert_eq!(o3, full[n..2 * n], "avx512 n={n}");
            }
        }
    }
}
