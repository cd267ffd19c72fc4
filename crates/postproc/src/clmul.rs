//! Carry-less (GF(2)\[x\]) multiplication of 64-bit words: the one place in the
//! crate that uses `unsafe`.
//!
//! Toeplitz hashing ([`crate::pa`]) and the GF(2^128) polynomial hash
//! ([`crate::auth`]) both reduce to carry-less products of 64-bit words. x86-64
//! has a single instruction for that (PCLMULQDQ), reachable only through
//! `core::arch` intrinsics, which are `unsafe` and must only run on CPUs that
//! have the feature (and VPCLMULQDQ on 512-bit vectors does four at once).
//! This module keeps that unsafety in one small place: the fast paths are
//! reachable only through [`Pclmul`], [`Avx512Clmul`] and [`Avx512Gf`],
//! tokens that can only be built after a successful runtime check, so safe
//! code elsewhere cannot call an intrinsic on a CPU without it. A portable,
//! constant-time software implementation with the same interface is the
//! fallback and the reference the fast paths are tested against. No crate is
//! used: the generic carry-less crates either lack a runtime-dispatched
//! PCLMULQDQ path or do not expose the word-array middle-product kernel that
//! the Toeplitz recursion needs as its base case.
//!
//! The second half holds the kernels of the additive FFT in [`crate::gf2x`]
//! (trait [`Gf64`]): GF(2^64) multiplication eight lanes at a time, the FFT
//! butterflies, the in-register last three layers, and the XOR and
//! transposition passes of the basis conversions, all 512-bit (AVX-512F/BW +
//! VPCLMULQDQ) behind [`Avx512Gf`], with scalar defaults (PCLMULQDQ or
//! portable) that the tests compare them with.
#![allow(
    unsafe_code,
    reason = "PCLMULQDQ/VPCLMULQDQ/AVX-512 intrinsics; each site has a SAFETY comment"
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

// ---------------------------------------------------------------------------
// GF(2^64) arithmetic for the additive FFT in `crate::gf2x`.
// ---------------------------------------------------------------------------

/// Low terms of the GF(2^64) modulus `x^64 + x^4 + x^3 + x + 1`.
pub(crate) const GF64_POLY: u64 = 0x1B;

/// Reduces the 128-bit carry-less product `(lo, hi)` modulo
/// `x^64 + x^4 + x^3 + x + 1`. `hi·x^64 ≡ hi·(x^4+x^3+x+1)`; the bits of that
/// which overflow 64 (`o`, at most 4 bits) are folded once more, and
/// `o·(x^4+x^3+x+1)` fits in 8 bits.
#[inline]
pub(crate) fn gf64_reduce(lo: u64, hi: u64) -> u64 {
    let t = hi ^ (hi >> 63) ^ (hi >> 61) ^ (hi >> 60);
    lo ^ t ^ (t << 1) ^ (t << 3) ^ (t << 4)
}

/// Portable GF(2^64) product (constant-time, like [`clmul64_portable`]).
#[inline]
pub(crate) fn gf64_mul_portable(a: u64, b: u64) -> u64 {
    let (lo, hi) = clmul64_portable(a, b);
    gf64_reduce(lo, hi)
}

/// GF(2^64) kernels of the additive FFT (`crate::gf2x`), with portable
/// defaults built on [`Gf64::mul`]; fast tokens override them with SIMD.
/// Every implementation must give bit-identical results (tested).
pub(crate) trait Gf64: Copy {
    /// `a·b` in GF(2^64).
    fn mul(self, a: u64, b: u64) -> u64;

    /// `dst ^= src` over the common length (the basis conversions' one
    /// operation).
    fn xor_into(self, dst: &mut [u64], src: &[u64]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d ^= *s;
        }
    }

    /// Strided [`Gf64::xor_into`]: for `i < count`,
    /// `a[dst + i·stride..][..width] ^= b[i·stride..][..width]` where
    /// `(a, b) = data.split_at_mut(src)` (so every source lies above every
    /// destination when `dst + count·stride ≤ src`).
    #[allow(
        clippy::too_many_arguments,
        reason = "one strided operation's coordinates"
    )]
    fn xor_strided(
        self,
        data: &mut [u64],
        dst: usize,
        src: usize,
        stride: usize,
        width: usize,
        count: usize,
    ) {
        let (a, b) = data.split_at_mut(src);
        for i in 0..count {
            let s = &b[i * stride..][..width];
            for (d, x) in a[dst + i * stride..][..width].iter_mut().zip(s) {
                *d ^= *x;
            }
        }
    }

    /// Transposes the `n × n` row-major matrix `d` in place (`n` a multiple
    /// of 8, `d.len() ≥ n²`), by 8 × 8 tiles.
    fn transpose(self, d: &mut [u64], n: usize) {
        let load = |d: &[u64], r0: usize, c0: usize| {
            let mut a = [[0u64; 8]; 8];
            for (i, row) in a.iter_mut().enumerate() {
                row.copy_from_slice(&d[(r0 + i) * n + c0..][..8]);
            }
            a
        };
        let store_t = |d: &mut [u64], r0: usize, c0: usize, a: &[[u64; 8]; 8]| {
            for i in 0..8 {
                for (j, x) in d[(r0 + i) * n + c0..][..8].iter_mut().enumerate() {
                    *x = a[j][i];
                }
            }
        };
        for bi in (0..n).step_by(8) {
            for bj in (bi..n).step_by(8) {
                let a = load(d, bi, bj);
                if bi == bj {
                    store_t(d, bi, bj, &a);
                } else {
                    let b = load(d, bj, bi);
                    store_t(d, bj, bi, &a);
                    store_t(d, bi, bj, &b);
                }
            }
        }
    }

    /// Forward butterfly over equal-length slices: `lo ^= c·hi; hi ^= lo`.
    fn butterfly(self, c: u64, lo: &mut [u64], hi: &mut [u64]) {
        for (l, h) in lo.iter_mut().zip(hi.iter_mut()) {
            *l ^= self.mul(*h, c);
            *h ^= *l;
        }
    }

    /// Inverse butterfly: `hi ^= lo; lo ^= c·hi`.
    fn ibutterfly(self, c: u64, lo: &mut [u64], hi: &mut [u64]) {
        for (l, h) in lo.iter_mut().zip(hi.iter_mut()) {
            *h ^= *l;
            *l ^= self.mul(*h, c);
        }
    }

    /// A whole FFT layer of small blocks: block `q` is
    /// `data[2hq..2hq + 2h]`, its halves are butterflied (forward, or
    /// inverse if `inv`) with twiddle `tw[q]`.
    fn butterflies(self, data: &mut [u64], h: usize, tw: &[u64], inv: bool) {
        for (blk, &c) in data.chunks_exact_mut(2 * h).zip(tw) {
            let (lo, hi) = blk.split_at_mut(h);
            if inv {
                self.ibutterfly(c, lo, hi);
            } else {
                self.butterfly(c, lo, hi);
            }
        }
    }

    /// Pointwise product `a[i] = a[i]·b[i]`.
    fn mul_assign(self, a: &mut [u64], b: &[u64]) {
        for (x, &y) in a.iter_mut().zip(b) {
            *x = self.mul(*x, y);
        }
    }

    /// The last three FFT layers (blocks of 8, 4, 2 elements) on 16-element
    /// units: unit `u` is `data[16u..16u+16]`, `units[u] = [w3, w2, w1]` are
    /// the twiddle bases of its layers, and the block at offset `q·2^j`
    /// inside the unit (layer `j`) uses twiddle `w_j ^ small[q]`.
    fn tail3(self, data: &mut [u64], units: &[[u64; 3]], small: &[u64; 8]) {
        for (d, w) in data.chunks_exact_mut(16).zip(units) {
            for (j, &base) in [3usize, 2, 1].iter().zip(w) {
                let h = 1 << (j - 1);
                for (q, blk) in d.chunks_exact_mut(2 * h).enumerate() {
                    let (lo, hi) = blk.split_at_mut(h);
                    self.butterfly(base ^ small[q], lo, hi);
                }
            }
        }
    }

    /// Inverse of [`Gf64::tail3`] (same arguments).
    fn itail3(self, data: &mut [u64], units: &[[u64; 3]], small: &[u64; 8]) {
        for (d, w) in data.chunks_exact_mut(16).zip(units) {
            for (j, &base) in [1usize, 2, 3].iter().zip(w.iter().rev()) {
                let h = 1 << (j - 1);
                for (q, blk) in d.chunks_exact_mut(2 * h).enumerate() {
                    let (lo, hi) = blk.split_at_mut(h);
                    self.ibutterfly(base ^ small[q], lo, hi);
                }
            }
        }
    }
}

impl Gf64 for Portable {
    #[inline]
    fn mul(self, a: u64, b: u64) -> u64 {
        gf64_mul_portable(a, b)
    }
}

impl Gf64 for Pclmul {
    #[inline]
    fn mul(self, a: u64, b: u64) -> u64 {
        let (lo, hi) = self.mul64(a, b);
        gf64_reduce(lo, hi)
    }
}

/// Proof that the running CPU has what the 512-bit GF(2^64) kernels use:
/// AVX-512F, AVX-512BW (byte shuffle), VPCLMULQDQ and PCLMULQDQ. Only
/// [`Avx512Gf::detect`] builds it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx512Gf {
    scalar: Pclmul,
}

impl Avx512Gf {
    /// The token if the CPU has AVX-512F/BW, VPCLMULQDQ and PCLMULQDQ.
    pub(crate) fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            let scalar = Pclmul::detect()?;
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("vpclmulqdq")
            {
                return Some(Self { scalar });
            }
        }
        None
    }
}

impl Gf64 for Avx512Gf {
    #[inline]
    fn mul(self, a: u64, b: u64) -> u64 {
        self.scalar.mul(a, b)
    }

    fn xor_into(self, dst: &mut [u64], src: &[u64]) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: the token proves AVX-512F (see `butterfly`); the
            // callee's raw-pointer accesses are justified at their sites.
            unsafe { gf512::xor_into(dst, src) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.scalar.xor_into(dst, src)
    }

    fn xor_strided(
        self,
        data: &mut [u64],
        dst: usize,
        src: usize,
        stride: usize,
        width: usize,
        count: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: the token proves AVX-512F (see `butterfly`); the
            // callee's raw-pointer accesses are justified at their sites.
            unsafe { gf512::xor_strided(data, dst, src, stride, width, count) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.scalar
            .xor_strided(data, dst, src, stride, width, count)
    }

    fn transpose(self, d: &mut [u64], n: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: the token proves AVX-512F (see `butterfly`); the
            // callee's raw-pointer accesses are justified at their sites.
            unsafe { gf512::transpose(d, n) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.scalar.transpose(d, n)
    }

    fn butterfly(self, c: u64, lo: &mut [u64], hi: &mut [u64]) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: an `Avx512Gf` token exists only if `detect` saw
            // AVX-512F/BW, VPCLMULQDQ and PCLMULQDQ at run time; the callee's
            // raw-pointer accesses are justified at their sites.
            unsafe { gf512::butterfly(c, lo, hi) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.scalar.butterfly(c, lo, hi)
    }

    fn ibutterfly(self, c: u64, lo: &mut [u64], hi: &mut [u64]) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: as in `butterfly`: the token proves the CPU features.
            unsafe { gf512::ibutterfly(c, lo, hi) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.scalar.ibutterfly(c, lo, hi)
    }

    fn butterflies(self, data: &mut [u64], h: usize, tw: &[u64], inv: bool) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: as in `butterfly`: the token proves the CPU features.
            unsafe {
                if inv {
                    gf512::butterflies::<true>(data, h, tw);
                } else {
                    gf512::butterflies::<false>(data, h, tw);
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.scalar.butterflies(data, h, tw, inv)
    }

    fn mul_assign(self, a: &mut [u64], b: &[u64]) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: as in `butterfly`: the token proves the CPU features.
            unsafe { gf512::mul_assign(a, b) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.scalar.mul_assign(a, b)
    }

    fn tail3(self, data: &mut [u64], units: &[[u64; 3]], small: &[u64; 8]) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: as in `butterfly`: the token proves the CPU features.
            unsafe { gf512::tail3::<false>(data, units, small) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.scalar.tail3(data, units, small)
    }

    fn itail3(self, data: &mut [u64], units: &[[u64; 3]], small: &[u64; 8]) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: as in `butterfly`: the token proves the CPU features.
            unsafe { gf512::tail3::<true>(data, units, small) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.scalar.itail3(data, units, small)
    }
}

/// Second fold of the reduction by the top nibble `h4` of the high word:
/// the bits of `H·(x^4+x^3+x+1)` above 64 are `o = h4 ^ h4>>1 ^ h4>>3`, and
/// `o·x^64 ≡ o·(x^4+x^3+x+1)` (< 256); one byte each, for a byte shuffle.
const FOLD_TABLE: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        let o = i ^ (i >> 1) ^ (i >> 3);
        let mut acc = 0u8;
        let mut b = 0;
        while b < 4 {
            if (o >> b) & 1 == 1 {
                acc ^= (GF64_POLY as u8) << b;
            }
            b += 1;
        }
        t[i] = acc;
        i += 1;
    }
    t
};

/// Index vectors for the in-register layers of `tail3`. A 16-element unit is
/// held in two vectors `(A, B)` "split by bit p": `A` holds the elements whose
/// index has bit `p` clear (in order), `B` those with it set. `SPLIT[p][q]`
/// is the `permutex2var` index pair taking split `p` to split `q`.
const fn split_perm(p: usize, q: usize) -> [u64; 16] {
    let mut out = [0u64; 16];
    let mut o = 0;
    while o < 16 {
        // Element at output lane o of split q.
        let k = o % 8;
        let set = o / 8;
        let e = ((k >> q) << (q + 1)) | (k & ((1 << q) - 1)) | (set << q);
        // Its position in split p.
        let pos = ((e >> p) & 1) * 8 + (((e >> (p + 1)) << p) | (e & ((1 << p) - 1)));
        out[o] = pos as u64;
        o += 1;
    }
    out
}

/// `lane[p][l]` = index (in `small`) of the twiddle offset of lane `l` of `A`
/// in split `p`: the element there is `e`, its block offset `e >> (p + 1)`.
const fn split_lanes(p: usize) -> [usize; 8] {
    let mut out = [0usize; 8];
    let mut l = 0;
    while l < 8 {
        let e = ((l >> p) << (p + 1)) | (l & ((1 << p) - 1));
        out[l] = e >> (p + 1);
        l += 1;
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod gf512 {
    use core::arch::x86_64::{
        __m512i, _mm512_clmulepi64_epi128, _mm512_loadu_si512, _mm512_permutex2var_epi64,
        _mm512_set_epi64, _mm512_set1_epi64, _mm512_setzero_si512, _mm512_shuffle_epi8,
        _mm512_slli_epi64, _mm512_srli_epi64, _mm512_storeu_si512, _mm512_ternarylogic_epi64,
        _mm512_unpackhi_epi64, _mm512_unpacklo_epi64, _mm512_xor_si512,
    };

    use super::{FOLD_TABLE, split_lanes, split_perm};

    /// Eight `u64` as a vector, lane 0 first.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn vec8(v: [u64; 8]) -> __m512i {
        _mm512_set_epi64(
            v[7] as i64,
            v[6] as i64,
            v[5] as i64,
            v[4] as i64,
            v[3] as i64,
            v[2] as i64,
            v[1] as i64,
            v[0] as i64,
        )
    }

    /// The fold table replicated into every 128-bit lane.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn fold_table() -> __m512i {
        let mut lo = 0u64;
        let mut hi = 0u64;
        for i in 0..8 {
            lo |= u64::from(FOLD_TABLE[i]) << (8 * i);
            hi |= u64::from(FOLD_TABLE[i + 8]) << (8 * i);
        }
        vec8([lo, hi, lo, hi, lo, hi, lo, hi])
    }

    /// Eight GF(2^64) products, lane by lane. Two VPCLMULQDQ give the
    /// 128-bit products of the even and odd lanes, regrouped into low words
    /// `L` and high words `H`; then `H·x^64 ≡ H·(x^4+x^3+x+1)` is folded with
    /// shifts, and the ≤ 4 bits that overflow (a function of the top nibble
    /// of `H`) with a byte-table shuffle. Clmul throughput is the limit, so
    /// the fold avoids it.
    #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
    #[inline]
    fn mul8(a: __m512i, b: __m512i, table: __m512i) -> __m512i {
        let pe = _mm512_clmulepi64_epi128::<0x00>(a, b);
        let po = _mm512_clmulepi64_epi128::<0x11>(a, b);
        let l = _mm512_unpacklo_epi64(pe, po);
        let h = _mm512_unpackhi_epi64(pe, po);
        let f = _mm512_ternarylogic_epi64::<0x96>(
            h,
            _mm512_slli_epi64::<1>(h),
            _mm512_slli_epi64::<3>(h),
        );
        let g = _mm512_ternarylogic_epi64::<0x96>(f, _mm512_slli_epi64::<4>(h), l);
        _mm512_xor_si512(g, _mm512_shuffle_epi8(table, _mm512_srli_epi64::<60>(h)))
    }

    /// Loads eight words.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn load(c: &[u64; 8]) -> __m512i {
        // SAFETY: `c` is 64 bytes of initialised memory; the load is unaligned.
        unsafe { _mm512_loadu_si512(c.as_ptr().cast::<__m512i>()) }
    }

    /// Stores eight words.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn store(c: &mut [u64; 8], v: __m512i) {
        // SAFETY: `c` is 64 bytes of writable memory; the store is unaligned.
        unsafe { _mm512_storeu_si512(c.as_mut_ptr().cast::<__m512i>(), v) }
    }

    fn as8(c: &mut [u64]) -> &mut [u64; 8] {
        c.try_into().expect("chunks_exact_mut(8) yields 8 words")
    }

    /// The 8 × 8 tile at row `r0`, column `c0` of the `n`-column matrix
    /// `d`, transposed in registers (unpack, then two rounds of two-source
    /// permutes).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn tile_t(d: &[u64], n: usize, r0: usize, c0: usize) -> [__m512i; 8] {
        let mut r = [_mm512_setzero_si512(); 8];
        for (i, v) in r.iter_mut().enumerate() {
            let row: &[u64; 8] = d[(r0 + i) * n + c0..][..8]
                .try_into()
                .expect("slice of 8 words");
            *v = load(row);
        }
        let a = [
            _mm512_unpacklo_epi64(r[0], r[1]),
            _mm512_unpackhi_epi64(r[0], r[1]),
            _mm512_unpacklo_epi64(r[2], r[3]),
            _mm512_unpackhi_epi64(r[2], r[3]),
            _mm512_unpacklo_epi64(r[4], r[5]),
            _mm512_unpackhi_epi64(r[4], r[5]),
            _mm512_unpacklo_epi64(r[6], r[7]),
            _mm512_unpackhi_epi64(r[6], r[7]),
        ];
        let i1 = vec8([0, 1, 8, 9, 4, 5, 12, 13]);
        let i2 = vec8([2, 3, 10, 11, 6, 7, 14, 15]);
        let b = [
            _mm512_permutex2var_epi64(a[0], i1, a[2]),
            _mm512_permutex2var_epi64(a[1], i1, a[3]),
            _mm512_permutex2var_epi64(a[0], i2, a[2]),
            _mm512_permutex2var_epi64(a[1], i2, a[3]),
            _mm512_permutex2var_epi64(a[4], i1, a[6]),
            _mm512_permutex2var_epi64(a[5], i1, a[7]),
            _mm512_permutex2var_epi64(a[4], i2, a[6]),
            _mm512_permutex2var_epi64(a[5], i2, a[7]),
        ];
        let j1 = vec8([0, 1, 2, 3, 8, 9, 10, 11]);
        let j2 = vec8([4, 5, 6, 7, 12, 13, 14, 15]);
        [
            _mm512_permutex2var_epi64(b[0], j1, b[4]),
            _mm512_permutex2var_epi64(b[1], j1, b[5]),
            _mm512_permutex2var_epi64(b[2], j1, b[6]),
            _mm512_permutex2var_epi64(b[3], j1, b[7]),
            _mm512_permutex2var_epi64(b[0], j2, b[4]),
            _mm512_permutex2var_epi64(b[1], j2, b[5]),
            _mm512_permutex2var_epi64(b[2], j2, b[6]),
            _mm512_permutex2var_epi64(b[3], j2, b[7]),
        ]
    }

    /// Stores eight vectors as the rows of the tile at (`r0`, `c0`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn tile_store(d: &mut [u64], n: usize, r0: usize, c0: usize, t: &[__m512i; 8]) {
        for (i, &v) in t.iter().enumerate() {
            let row: &mut [u64; 8] = (&mut d[(r0 + i) * n + c0..][..8])
                .try_into()
                .expect("slice of 8 words");
            store(row, v);
        }
    }

    /// In-place transpose of the `n × n` matrix `d` (`n` a multiple of 8).
    #[target_feature(enable = "avx512f")]
    pub(super) fn transpose(d: &mut [u64], n: usize) {
        for bi in (0..n).step_by(8) {
            for bj in (bi..n).step_by(8) {
                let a = tile_t(d, n, bi, bj);
                if bi == bj {
                    tile_store(d, n, bi, bj, &a);
                } else {
                    let b = tile_t(d, n, bj, bi);
                    tile_store(d, n, bj, bi, &a);
                    tile_store(d, n, bi, bj, &b);
                }
            }
        }
    }

    /// See `Gf64::xor_strided`; the inner XOR inlined.
    #[target_feature(enable = "avx512f")]
    pub(super) fn xor_strided(
        data: &mut [u64],
        dst: usize,
        src: usize,
        stride: usize,
        width: usize,
        count: usize,
    ) {
        let (a, b) = data.split_at_mut(src);
        for i in 0..count {
            xor_into(
                &mut a[dst + i * stride..][..width],
                &b[i * stride..][..width],
            );
        }
    }

    /// `dst ^= src`, eight words at a time.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) fn xor_into(dst: &mut [u64], src: &[u64]) {
        let n = dst.len().min(src.len());
        let (dst, src) = (&mut dst[..n], &src[..n]);
        let mut dc = dst.chunks_exact_mut(8);
        let mut sc = src.chunks_exact(8);
        for (d, s) in (&mut dc).zip(&mut sc) {
            let d = as8(d);
            let s: &[u64; 8] = s.try_into().expect("chunks_exact(8) yields 8 words");
            store(d, _mm512_xor_si512(load(d), load(s)));
        }
        for (d, s) in dc.into_remainder().iter_mut().zip(sc.remainder()) {
            *d ^= *s;
        }
    }

    /// Layer of small blocks (see `Gf64::butterflies`), the per-block
    /// butterflies inlined.
    #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq,pclmulqdq,sse2")]
    pub(super) fn butterflies<const INV: bool>(data: &mut [u64], h: usize, tw: &[u64]) {
        for (blk, &c) in data.chunks_exact_mut(2 * h).zip(tw) {
            let (lo, hi) = blk.split_at_mut(h);
            if INV {
                ibutterfly(c, lo, hi);
            } else {
                butterfly(c, lo, hi);
            }
        }
    }

    /// `lo ^= c·hi; hi ^= lo`, eight lanes at a time.
    #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq,pclmulqdq,sse2")]
    #[inline]
    pub(super) fn butterfly(c: u64, lo: &mut [u64], hi: &mut [u64]) {
        let n = lo.len().min(hi.len());
        let (lo, hi) = (&mut lo[..n], &mut hi[..n]);
        let table = fold_table();
        let cv = _mm512_set1_epi64(c as i64);
        let mut lc = lo.chunks_exact_mut(8);
        let mut hc = hi.chunks_exact_mut(8);
        for (l, h) in (&mut lc).zip(&mut hc) {
            let (l, h) = (as8(l), as8(h));
            let hv = load(h);
            let lv = _mm512_xor_si512(load(l), mul8(hv, cv, table));
            store(l, lv);
            store(h, _mm512_xor_si512(hv, lv));
        }
        for (l, h) in lc.into_remainder().iter_mut().zip(hc.into_remainder()) {
            let (a, b) = super::x86::mul64(*h, c);
            *l ^= super::gf64_reduce(a, b);
            *h ^= *l;
        }
    }

    /// `hi ^= lo; lo ^= c·hi`, eight lanes at a time.
    #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq,pclmulqdq,sse2")]
    #[inline]
    pub(super) fn ibutterfly(c: u64, lo: &mut [u64], hi: &mut [u64]) {
        let n = lo.len().min(hi.len());
        let (lo, hi) = (&mut lo[..n], &mut hi[..n]);
        let table = fold_table();
        let cv = _mm512_set1_epi64(c as i64);
        let mut lc = lo.chunks_exact_mut(8);
        let mut hc = hi.chunks_exact_mut(8);
        for (l, h) in (&mut lc).zip(&mut hc) {
            let (l, h) = (as8(l), as8(h));
            let lv = load(l);
            let hv = _mm512_xor_si512(load(h), lv);
            store(h, hv);
            store(l, _mm512_xor_si512(lv, mul8(hv, cv, table)));
        }
        for (l, h) in lc.into_remainder().iter_mut().zip(hc.into_remainder()) {
            *h ^= *l;
            let (a, b) = super::x86::mul64(*h, c);
            *l ^= super::gf64_reduce(a, b);
        }
    }

    /// `a[i] = a[i]·b[i]`, eight lanes at a time.
    #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq,pclmulqdq,sse2")]
    pub(super) fn mul_assign(a: &mut [u64], b: &[u64]) {
        let n = a.len().min(b.len());
        let (a, b) = (&mut a[..n], &b[..n]);
        let table = fold_table();
        let mut ac = a.chunks_exact_mut(8);
        let mut bc = b.chunks_exact(8);
        for (x, y) in (&mut ac).zip(&mut bc) {
            let x = as8(x);
            let y: &[u64; 8] = y.try_into().expect("chunks_exact(8) yields 8 words");
            store(x, mul8(load(x), load(y), table));
        }
        for (x, &y) in ac.into_remainder().iter_mut().zip(bc.remainder()) {
            let (lo, hi) = super::x86::mul64(*x, y);
            *x = super::gf64_reduce(lo, hi);
        }
    }

    /// Index pair (for `A` and for `B`) of the permutation from split `p`
    /// to split `q`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn perm(p: usize, q: usize) -> (__m512i, __m512i) {
        let s = split_perm(p, q);
        let (mut a, mut b) = ([0u64; 8], [0u64; 8]);
        a.copy_from_slice(&s[..8]);
        b.copy_from_slice(&s[8..]);
        (vec8(a), vec8(b))
    }

    /// Twiddle offsets of split `p` as a vector.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn lanes(p: usize, small: &[u64; 8]) -> __m512i {
        let l = split_lanes(p);
        let mut v = [0u64; 8];
        for (d, &i) in v.iter_mut().zip(&l) {
            *d = small[i];
        }
        vec8(v)
    }

    /// Forward (`INV = false`) or inverse last three layers on 16-element
    /// units held in two registers, re-split between layers with
    /// `permutex2var` so every butterfly is a full-width vector operation.
    #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq,pclmulqdq,sse2")]
    pub(super) fn tail3<const INV: bool>(data: &mut [u64], units: &[[u64; 3]], small: &[u64; 8]) {
        let table = fold_table();
        // Forward visits splits 3 → 2 → 1 → 0 → 3, inverse 3 → 0 → 1 → 2 → 3.
        let order: [usize; 5] = if INV {
            [3, 0, 1, 2, 3]
        } else {
            [3, 2, 1, 0, 3]
        };
        let p = [
            perm(order[0], order[1]),
            perm(order[1], order[2]),
            perm(order[2], order[3]),
            perm(order[3], order[4]),
        ];
        let ln = [
            lanes(order[1], small),
            lanes(order[2], small),
            lanes(order[3], small),
        ];
        // Twiddle base of split s is units[u][2 - s] (w3, w2, w1 for s = 2, 1, 0).
        for (d, w) in data.chunks_exact_mut(16).zip(units) {
            let (d0, d1) = d.split_at_mut(8);
            let (d0, d1) = (as8(d0), as8(d1));
            let (mut a, mut b) = (load(d0), load(d1));
            for step in 0..3 {
                let (ia, ib) = p[step];
                let na = _mm512_permutex2var_epi64(a, ia, b);
                let nb = _mm512_permutex2var_epi64(a, ib, b);
                let split = order[step + 1];
                let c = _mm512_xor_si512(_mm512_set1_epi64(w[2 - split] as i64), ln[step]);
                if INV {
                    b = _mm512_xor_si512(nb, na);
                    a = _mm512_xor_si512(na, mul8(b, c, table));
                } else {
                    a = _mm512_xor_si512(na, mul8(nb, c, table));
                    b = _mm512_xor_si512(nb, a);
                }
            }
            let (ia, ib) = p[3];
            store(d0, _mm512_permutex2var_epi64(a, ia, b));
            store(d1, _mm512_permutex2var_epi64(a, ib, b));
        }
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
