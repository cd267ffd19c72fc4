//! Quasi-linear multiplication of long GF(2)\[x\] polynomials with an additive
//! FFT over GF(2^64): the engine of privacy amplification at 10^8-bit blocks.
//!
//! # Why this shape
//!
//! A Toeplitz hash of an `n`-bit block is a window of a carry-less product
//! of two polynomials of ~`n` bits ([`crate::pa`]). Karatsuba costs
//! `O(n^1.585)` and falls to ~18 Mbit/s at 10^8 bits; only an FFT gets the
//! cost down to `O(n log n)`. GF(2) has no roots of unity, so the FFT is
//! *additive*: evaluation on an affine subspace of a binary field. It is
//! hand-written because no crate multiplies large GF(2)\[x\] polynomials with
//! a hardware carry-less base case, and because the result feeds a
//! normative hash, so it must be exact and reproducible on every CPU (all
//! kernels are tested bit-identical to a portable one).
//!
//! # Algorithm
//!
//! 1. *Embedding.* Cut each operand into 32-bit chunks,
//!    `A(z) = Σ A_i(z)·Z^i` with `Z = z^32`, and read each chunk as an
//!    element of GF(2^64) = GF(2)\[x\]/(x^64 + x^4 + x^3 + x + 1). A chunk
//!    product has degree ≤ 62, so the coefficients `C_k = Σ A_i·B_{k−i}` of
//!    the product over GF(2^64) are the exact GF(2)\[x\] chunk products: no
//!    reduction ever touches them. Overlap-adding `C_k` at bit `32k` gives
//!    the product.
//! 2. *Novel polynomial basis* (Lin, Chung, Han, FOCS 2014) with a *Cantor
//!    basis* `β_0 = 1, β_i^2 + β_i = β_{i−1}` of GF(2^64): the subspace
//!    polynomials `s_i` of `W_i = span(β_0..β_{i−1})` are `s_1 = x^2 + x`
//!    composed `i` times, have 0/1 coefficients, satisfy `s_i(β_i) = 1` and
//!    `s_j(ω_i) = ω_{i >> j}` where `ω_i = Σ_{bit l of i} β_l`. The basis is
//!    `X_k = Π_{bit i of k} s_i`. Converting from monomials uses
//!    `s_{2^t}(x) = x^(2^(2^t)) + x`: a Taylor expansion of `f` in
//!    `Y = x^(2^t) + x` (Gao–Mateer; divisions by binomials, XORs only), then
//!    the conversion of each coefficient block and of the polynomial in `Y`
//!    (whose basis is again Cantor's, `s_j(Y) = s_{2^t + j}(x)`).
//! 3. *FFT.* Evaluate on `W_K` (`2^K` points `ω_i`). For a block of size
//!    `2^j` at block index `b`, `D = D_0 + s_{j−1}·D_1` and
//!    `s_{j−1}(ω_{b·2^j}) = ω_{2b}`, so the butterfly is
//!    `D_0 += ω_{2b}·D_1; D_1 += D_0` — one multiply by a constant.
//!    Multiply the two transforms pointwise, invert, convert back.
//!
//! # Cost and memory layout
//!
//! For `N = 2^K` chunks: `K·N/2` constant multiplications per transform
//! (three transforms) plus `N` general ones, and about `(K/4)·log2 K` word
//! XORs per chunk per transform for the basis conversions. Multiplications
//! run eight at a time with VPCLMULQDQ when available (private `clmul`
//! module: two carry-less multiplies, then a shift-and-table reduction). The
//! work is memory-bound unless blocked, so for `K > 16` the array is a
//! `2^(K−16) × 2^16` matrix: the Taylor expansion in `x^65536 + x`
//! separates the two levels; the top `K − 16` layers (conversion and FFT)
//! run on column stripes copied into a contiguous 256 KiB buffer (rows are a
//! power of two apart, so a stripe in place would sit in few cache sets),
//! then each 512 KiB row is converted and transformed in L2 (narrow
//! conversion blocks through a transposition, the lowest FFT layers in
//! L1-sized blocks, the last three in registers). Memory: two arrays of
//! `2^K` words, 128 MiB for a 10^8-bit Toeplitz hash (`K = 23`), which
//! callers may keep in a [`Scratch`].
//!
//! Where the time goes at `K = 23` on the development machine (AVX-512 Zen 4
//! core; ~0.38 s per 10^8-bit Toeplitz hash cold, ~0.30 s with a warm
//! [`Scratch`]): about a third in the GF(2^64) multiplications (vector-ALU
//! bound), a third in the conversions' XOR passes (L2-bandwidth bound), the
//! rest in DRAM passes (Taylor expansion, stripe copies) and, cold, ~50 ms
//! of first-touch page faults on the fresh buffers.
//!
//! Everything here is a pure function of its inputs. Buffers that held key
//! material are zeroized before they are freed.

use std::sync::OnceLock;

use zeroize::Zeroize;

use crate::bits::{BitVec, extract_bits, words_for};
use crate::clmul::{Avx512Gf, Gf64, Pclmul, Portable, gf64_mul_portable};

/// Bits per chunk (field element holds a chunk; products stay below 64 bits).
const CHUNK: usize = 32;

/// Shape of the two-level layout (a parameter so tests can exercise the
/// two-level path on small sizes).
#[derive(Clone, Copy, Debug)]
struct Layout {
    /// log2 of the row length; a power of two (the Taylor expansion is in
    /// `x^(2^row_log) + x`, a binomial only then).
    row_log: u32,
    /// Words in one column stripe of the top layers (L2-sized).
    stripe_words: usize,
    /// log2 of the block size done layer by layer (L1-sized).
    l1_log: u32,
}

/// Rows of 2^16 words (512 KiB) fit in the 1 MiB L2; stripes of 256 KiB
/// (measured best of 64 KiB–1 MiB at 10^8 bits); 16 KiB blocks in L1.
const LAYOUT: Layout = Layout {
    row_log: 16,
    stripe_words: 1 << 15,
    l1_log: 11,
};

/// The Cantor basis of GF(2^64) and twiddle tables derived from it.
struct Tables {
    /// `bytes[p][v] = ω_(v << 8p)`: `ω` of any index is eight lookups.
    bytes: [[u64; 256]; 8],
    /// `ω_(2q)` for `q < 8`: twiddle offsets inside a 16-element unit.
    small: [u64; 8],
    /// `step[s][t] = ω_(m·(2^(t+1) − 1))` for `m = 4, 8, 16`: added to a unit's
    /// twiddle bases when its index `U` with `t` trailing ones becomes `U+1`.
    step: [[u64; 60]; 3],
    /// `step2[t] = ω_(2·(2^(t+1) − 1))`: added to the twiddle `ω_2b` of
    /// block `b` (with `t` trailing ones) to get that of block `b + 1`.
    step2: [u64; 60],
}

impl Tables {
    fn new() -> Self {
        let beta = cantor_basis();
        let mut bytes = [[0u64; 256]; 8];
        for (p, row) in bytes.iter_mut().enumerate() {
            for (v, slot) in row.iter_mut().enumerate() {
                *slot = (0..8)
                    .filter(|l| (v >> l) & 1 == 1)
                    .fold(0, |acc, l| acc ^ beta[8 * p + l]);
            }
        }
        let mut t = Self {
            bytes,
            small: [0; 8],
            step: [[0; 60]; 3],
            step2: [0; 60],
        };
        for q in 0..8 {
            t.small[q] = t.omega(2 * q as u64);
        }
        for (s, m) in [4u64, 8, 16].into_iter().enumerate() {
            for i in 0..60 {
                t.step[s][i] = t.omega(m.wrapping_mul((1u64 << (i + 1)) - 1));
            }
        }
        for i in 0..60 {
            t.step2[i] = t.omega(2u64.wrapping_mul((1u64 << (i + 1)) - 1));
        }
        t
    }

    /// `ω_x = Σ_{bit l of x} β_l`, the `x`-th point of the subspace.
    #[inline]
    fn omega(&self, x: u64) -> u64 {
        self.bytes.iter().enumerate().fold(0, |acc, (p, row)| {
            acc ^ row[((x >> (8 * p)) & 0xFF) as usize]
        })
    }
}

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(Tables::new)
}

/// A Cantor basis of GF(2^64): `β_0 = 1`, `β_i^2 + β_i = β_{i−1}`. The map
/// `y ↦ y^2 + y` is GF(2)-linear with kernel {0, 1}; each step solves it by
/// Gaussian elimination. A chain of length 64 exists because 64 is a power
/// of two (tested); should a step fail, the rest stay zero.
fn cantor_basis() -> [u64; 64] {
    // Echelon form of the columns L(x^j) = x^2j + x^j, keyed by leading bit,
    // each with the combination of columns that produced it.
    let mut piv: [Option<(u64, u64)>; 64] = [None; 64];
    for j in 0..64 {
        let x = 1u64 << j;
        let (mut v, mut c) = (gf64_mul_portable(x, x) ^ x, x);
        while v != 0 {
            let p = 63 - v.leading_zeros() as usize;
            match piv[p] {
                Some((pv, pc)) => {
                    v ^= pv;
                    c ^= pc;
                }
                None => {
                    piv[p] = Some((v, c));
                    break;
                }
            }
        }
    }
    let solve = |target: u64| -> Option<u64> {
        let (mut v, mut c) = (target, 0u64);
        while v != 0 {
            let (pv, pc) = piv[63 - v.leading_zeros() as usize]?;
            v ^= pv;
            c ^= pc;
        }
        Some(c)
    };
    let mut beta = [0u64; 64];
    beta[0] = 1;
    for i in 1..64 {
        match solve(beta[i - 1]) {
            Some(y) => beta[i] = y,
            None => break,
        }
    }
    beta
}

/// A set of `2^k` equal-width elements inside a word array: element `i` is
/// `data[off + i·stride ..][..width]`.
#[derive(Clone, Copy, Debug)]
struct View {
    off: usize,
    stride: usize,
    width: usize,
}

impl View {
    const SCALARS: View = View {
        off: 0,
        stride: 1,
        width: 1,
    };

    #[inline]
    fn at(self, i: usize) -> usize {
        self.off + i * self.stride
    }

    /// Elements are adjacent, so a run of them is one slice.
    #[inline]
    fn dense(self) -> bool {
        self.stride == self.width
    }

    fn shifted(self, i: usize) -> View {
        View {
            off: self.at(i),
            ..self
        }
    }
}

/// Elements `dst..dst+n` ^= elements `src..src+n`, with `dst + n ≤ src`.
fn xor_elems<G: Gf64>(g: G, data: &mut [u64], v: View, src: usize, dst: usize, n: usize) {
    if n == 0 {
        return;
    }
    if v.dense() {
        let (a, b) = data.split_at_mut(v.at(src));
        g.xor_into(&mut a[v.at(dst)..v.at(dst + n)], &b[..n * v.width]);
    } else {
        g.xor_strided(data, v.at(dst), v.at(src), v.stride, v.width, n);
    }
}

/// Taylor expansion in `Y = x^(2^t) + x` of the polynomial whose `2^k`
/// coefficients are the elements of `v`: afterwards block `h` (of `2^t`
/// elements) holds `g_h` with `f = Σ g_h(x)·Y^h`. Divides by
/// `Y^(2^(k−t−1)) = x^m + x^e` (`m = 2^(k−1)`, `e = 2^(k−t−1)`) — the
/// quotient lands in the upper half, the remainder in the lower — and
/// recurses on both halves. Long division by a binomial is
/// `f[i − (m − e)] ^= f[i]` for `i` from `2m − 1` down to `m`, done as two
/// runs without internal dependencies.
fn taylor<G: Gf64>(g: G, data: &mut [u64], v: View, k: u32, t: u32) {
    if k <= t {
        return;
    }
    let m = 1usize << (k - 1);
    let e = 1usize << (k - t - 1);
    xor_elems(g, data, v, m + e, 2 * e, m - e);
    xor_elems(g, data, v, m, e, e);
    taylor(g, data, v, k - 1, t);
    taylor(g, data, v.shifted(m), k - 1, t);
}

/// [`taylor`] on dense scalars of which only the first `nz` may be nonzero:
/// a half that is all zero stays zero, and dividing by a polynomial with a
/// zero upper half (quotient zero) leaves the lower half as it is.
fn taylor_prefix<G: Gf64>(g: G, data: &mut [u64], k: u32, t: u32, nz: usize) {
    let m = 1usize << k.saturating_sub(1);
    if k <= t || nz == 0 {
        return;
    }
    if nz <= m {
        taylor_prefix(g, &mut data[..m], k - 1, t, nz);
        return;
    }
    if nz >= 2 * m {
        taylor(g, data, View::SCALARS, k, t);
        return;
    }
    let e = 1usize << (k - t - 1);
    xor_elems(g, data, View::SCALARS, m + e, 2 * e, m - e);
    xor_elems(g, data, View::SCALARS, m, e, e);
    let (lo, hi) = data.split_at_mut(m);
    taylor(g, lo, View::SCALARS, k - 1, t);
    taylor_prefix(g, hi, k - 1, t, nz - m);
}

/// Inverse of [`taylor`]: the same XORs in reverse order.
fn inv_taylor<G: Gf64>(g: G, data: &mut [u64], v: View, k: u32, t: u32) {
    if k <= t {
        return;
    }
    let m = 1usize << (k - 1);
    let e = 1usize << (k - t - 1);
    inv_taylor(g, data, v, k - 1, t);
    inv_taylor(g, data, v.shifted(m), k - 1, t);
    xor_elems(g, data, v, m, e, e);
    xor_elems(g, data, v, m + e, 2 * e, m - e);
}

/// Largest power of two `t < k` (for `k ≥ 2`), the split of the conversion.
fn split_of(k: u32) -> u32 {
    1 << (31 - (k - 1).leading_zeros())
}

/// Views of the polynomial in `Y` left by a Taylor expansion with blocks of
/// `2^t` elements: one view with wide elements if `v` is dense, else one
/// per position inside a block.
fn hi_views(v: View, t: u32, mut f: impl FnMut(View)) {
    let blk = 1usize << t;
    if v.dense() {
        f(View {
            off: v.off,
            stride: v.stride * blk,
            width: v.width * blk,
        });
    } else {
        for r in 0..blk {
            f(View {
                off: v.at(r),
                stride: v.stride * blk,
                width: v.width,
            });
        }
    }
}

/// Elements narrower than this (words) make the block step of a square
/// conversion go through a transposition (see [`to_novel`]).
const NARROW: usize = 16;

/// Transposes, in place, the `2^t × 2^t` matrix whose entry `(q, i)` is
/// element `q·2^t + i` of the dense view `v` (scalars by the kernel's 8 × 8
/// tiles, wider elements by swapping slices).
fn transpose<G: Gf64>(g: G, data: &mut [u64], v: View, t: u32) {
    let n = 1usize << t;
    let w = v.width;
    if w == 1 && n >= 8 {
        g.transpose(&mut data[v.off..v.off + n * n], n);
        return;
    }
    for i in 0..n {
        for j in i + 1..n {
            let (x, y) = (v.at(i * n + j), v.at(j * n + i));
            let (lo, hi) = data.split_at_mut(y);
            lo[x..x + w].swap_with_slice(&mut hi[..w]);
        }
    }
}

/// The block step of the conversion: `f` on each block of `2^t` elements.
/// When the view is dense, narrow and square (`k = 2t`), the blocks are
/// transposed so that the step becomes one call on `2^t` wide elements
/// instead of `2^t` calls on narrow ones (whose recursion overhead would
/// dominate); otherwise block by block.
fn blocks<G: Gf64>(
    g: G,
    data: &mut [u64],
    v: View,
    k: u32,
    t: u32,
    f: fn(G, &mut [u64], View, u32),
) {
    if v.dense() && v.width < NARROW && k == 2 * t {
        transpose(g, data, v, t);
        let wide = View {
            off: v.off,
            stride: v.width << t,
            width: v.width << t,
        };
        f(g, data, wide, t);
        transpose(g, data, v, t);
    } else {
        for q in 0..1usize << (k - t) {
            f(g, data, v.shifted(q << t), t);
        }
    }
}

/// Monomial → novel polynomial basis, in place, for `2^k` coefficients.
fn to_novel<G: Gf64>(g: G, data: &mut [u64], v: View, k: u32) {
    if k <= 1 {
        return; // X_0 = 1, X_1 = x
    }
    let t = split_of(k);
    taylor(g, data, v, k, t);
    blocks(g, data, v, k, t, to_novel::<G>);
    hi_views(v, t, |h| to_novel(g, data, h, k - t));
}

/// Novel → monomial basis: [`to_novel`] undone step by step.
fn from_novel<G: Gf64>(g: G, data: &mut [u64], v: View, k: u32) {
    if k <= 1 {
        return;
    }
    let t = split_of(k);
    hi_views(v, t, |h| from_novel(g, data, h, k - t));
    blocks(g, data, v, k, t, from_novel::<G>);
    inv_taylor(g, data, v, k, t);
}

/// Half-blocks of at most this many words go through the batched
/// [`Gf64::butterflies`] kernel instead of one call per block.
const SMALL_HALF: usize = 256;

/// One FFT layer `j` (blocks of `2^j` elements) over the `2^k` elements of
/// `v`, whose element 0 has global index `base` (a multiple of `2^k`).
#[allow(
    clippy::too_many_arguments,
    reason = "internal helper; the arguments are one layer's coordinates"
)]
fn layer<G: Gf64>(
    g: G,
    tb: &Tables,
    data: &mut [u64],
    v: View,
    j: u32,
    k: u32,
    base: u64,
    inv: bool,
) {
    let h = 1usize << (j - 1);
    if v.dense() && v.width * h <= SMALL_HALF {
        // Many small blocks: twiddles computed incrementally, a whole run of
        // blocks per kernel call.
        const RUN: usize = 256;
        let mut tw = [0u64; RUN];
        let mut b = base >> j;
        let mut w = tb.omega(2 * b);
        let span = 2 * h * v.width;
        let body = &mut data[v.off..v.off + (span << (k - j))];
        for chunk in body.chunks_mut(span * RUN) {
            let count = chunk.len() / span;
            for slot in tw.iter_mut().take(count) {
                *slot = w;
                w ^= tb.step2[(b.trailing_ones() as usize).min(59)];
                b += 1;
            }
            g.butterflies(chunk, h * v.width, &tw[..count], inv);
        }
        return;
    }
    for q in 0..1usize << (k - j) {
        let c = tb.omega(2 * ((base >> j) + q as u64));
        let lo = q << j;
        let runs = if v.dense() { 1 } else { h };
        let n = if v.dense() { h * v.width } else { v.width };
        for r in 0..runs {
            let (a, b) = data.split_at_mut(v.at(lo + h + r));
            let l = &mut a[v.at(lo + r)..][..n];
            let hh = &mut b[..n];
            if c == 0 {
                g.xor_into(hh, l); // both directions: hi ^= lo
            } else if inv {
                g.ibutterfly(c, l, hh);
            } else {
                g.butterfly(c, l, hh);
            }
        }
    }
}

/// The last three layers on `data` (length a multiple of 16, element 0 at
/// global index `base`, a multiple of 16), via the kernel's `tail3`.
fn tail<G: Gf64>(g: G, tb: &Tables, data: &mut [u64], base: u64, inv: bool) {
    const UNITS: usize = 128;
    let mut units = [[0u64; 3]; UNITS];
    let mut u = base / 16;
    let mut w = [tb.omega(4 * u), tb.omega(8 * u), tb.omega(16 * u)];
    for chunk in data.chunks_mut(16 * UNITS) {
        let count = chunk.len() / 16;
        for slot in units.iter_mut().take(count) {
            *slot = w;
            let ones = (u.trailing_ones() as usize).min(59);
            for (wi, s) in w.iter_mut().zip(&tb.step) {
                *wi ^= s[ones];
            }
            u += 1;
        }
        if inv {
            g.itail3(chunk, &units[..count], &tb.small);
        } else {
            g.tail3(chunk, &units[..count], &tb.small);
        }
    }
}

/// Forward FFT of a dense block of `2^k` scalars at global index `base`:
/// the top layers one by one (each halving the block) until it fits in L1,
/// then all layers there, the last three in registers.
fn fft_dense<G: Gf64>(g: G, tb: &Tables, data: &mut [u64], base: u64, k: u32, lay: Layout) {
    if k > lay.l1_log {
        let c = tb.omega(2 * (base >> k));
        let half = 1usize << (k - 1);
        let (lo, hi) = data.split_at_mut(half);
        g.butterfly(c, lo, hi);
        fft_dense(g, tb, lo, base, k - 1, lay);
        fft_dense(g, tb, hi, base + half as u64, k - 1, lay);
        return;
    }
    let low = if k >= 4 { 3 } else { 0 };
    for j in (low + 1..=k).rev() {
        layer(g, tb, data, View::SCALARS, j, k, base, false);
    }
    if k >= 4 {
        tail(g, tb, data, base, false);
    }
}

/// Inverse of [`fft_dense`].
fn ifft_dense<G: Gf64>(g: G, tb: &Tables, data: &mut [u64], base: u64, k: u32, lay: Layout) {
    if k > lay.l1_log {
        let c = tb.omega(2 * (base >> k));
        let half = 1usize << (k - 1);
        let (lo, hi) = data.split_at_mut(half);
        ifft_dense(g, tb, lo, base, k - 1, lay);
        ifft_dense(g, tb, hi, base + half as u64, k - 1, lay);
        g.ibutterfly(c, lo, hi);
        return;
    }
    let low = if k >= 4 {
        tail(g, tb, data, base, true);
        3
    } else {
        0
    };
    for j in low + 1..=k {
        layer(g, tb, data, View::SCALARS, j, k, base, true);
    }
}

/// Runs `f` on column stripes of the `2^kh × 2^row_log` matrix `data`, each
/// copied into a contiguous buffer first: rows are a power of two apart, so
/// a stripe read in place would map to the same few cache sets and thrash.
/// `f` sees a dense view of `2^kh` elements (one per row) of the stripe's
/// width; element `r` is row `r`'s segment.
fn stripes(data: &mut [u64], kh: u32, lay: Layout, mut f: impl FnMut(&mut [u64], View)) {
    let row = 1usize << lay.row_log;
    let rows = 1usize << kh;
    let cw = (lay.stripe_words >> kh).clamp(1, row);
    let mut buf = vec![0u64; rows * cw];
    for c0 in (0..row).step_by(cw) {
        let w = cw.min(row - c0);
        for (r, seg) in buf.chunks_exact_mut(w).enumerate() {
            seg.copy_from_slice(&data[r * row + c0..][..w]);
        }
        let sv = View {
            off: 0,
            stride: w,
            width: w,
        };
        f(&mut buf[..rows * w], sv);
        for (r, seg) in buf.chunks_exact(w).enumerate() {
            data[r * row + c0..][..w].copy_from_slice(seg);
        }
    }
    buf.zeroize();
}

/// Monomial coefficients (`data.len() == 2^k`) → values at `ω_0..ω_(2^k−1)`.
fn forward<G: Gf64>(g: G, tb: &Tables, data: &mut [u64], k: u32, lay: Layout, nz: usize) {
    if k <= lay.row_log {
        to_novel(g, data, View::SCALARS, k);
        fft_dense(g, tb, data, 0, k, lay);
        return;
    }
    let (row, kh) = (1usize << lay.row_log, k - lay.row_log);
    taylor_prefix(g, data, k, lay.row_log, nz);
    stripes(data, kh, lay, |buf, sv| {
        to_novel(g, buf, sv, kh);
        for j in (1..=kh).rev() {
            layer(g, tb, buf, sv, j, kh, 0, false);
        }
    });
    for (r, chunk) in data.chunks_exact_mut(row).enumerate() {
        to_novel(g, chunk, View::SCALARS, lay.row_log);
        fft_dense(g, tb, chunk, (r as u64) << lay.row_log, lay.row_log, lay);
    }
}

/// Inverse of [`forward`].
fn inverse<G: Gf64>(g: G, tb: &Tables, data: &mut [u64], k: u32, lay: Layout) {
    if k <= lay.row_log {
        ifft_dense(g, tb, data, 0, k, lay);
        from_novel(g, data, View::SCALARS, k);
        return;
    }
    let (row, kh) = (1usize << lay.row_log, k - lay.row_log);
    for (r, chunk) in data.chunks_exact_mut(row).enumerate() {
        ifft_dense(g, tb, chunk, (r as u64) << lay.row_log, lay.row_log, lay);
        from_novel(g, chunk, View::SCALARS, lay.row_log);
    }
    stripes(data, kh, lay, |buf, sv| {
        for j in 1..=kh {
            layer(g, tb, buf, sv, j, kh, 0, true);
        }
        from_novel(g, buf, sv, kh);
    });
    inv_taylor(g, data, View::SCALARS, k, lay.row_log);
}

/// Working memory of the FFT product: the two transform buffers (16 MiB
/// per 10^7 input bits of a Toeplitz hash, 128 MiB at 10^8). Keeping one
/// across products saves allocating and first touching that memory each
/// time, which is page faults the kernel must serve (~25 ms per 64 MiB on
/// the development machine). Between products it holds only zeros: every
/// product zeroizes its buffers before returning (and should one be
/// interrupted by a panic, dropping the scratch zeroizes them).
#[derive(Default)]
pub struct Scratch {
    a: Vec<u64>,
    b: Vec<u64>,
    /// Set while a product runs: the buffers may hold key material. Only
    /// then does `drop` need to zeroize them (it would take two more
    /// 64 MiB passes at 10^8 bits otherwise).
    dirty: bool,
}

impl Scratch {
    /// An empty scratch; buffers grow on first use.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.dirty {
            self.a.zeroize();
            self.b.zeroize();
        }
    }
}

/// Fills `buf` with the first `bits` bits of `words` as 32-bit chunks,
/// zero-padded to `size`.
fn load_chunks(buf: &mut Vec<u64>, words: &[u64], bits: usize, size: usize) {
    buf.clear();
    buf.resize(size, 0);
    let n = bits.div_ceil(CHUNK).min(size);
    let src = words.iter().flat_map(|&w| [w & 0xFFFF_FFFF, w >> 32]);
    for (slot, c) in buf[..n].iter_mut().zip(src) {
        *slot = c;
    }
    if !bits.is_multiple_of(CHUNK)
        && let Some(last) = buf[..n].last_mut()
    {
        *last &= (1u64 << (bits % CHUNK)) - 1;
    }
}

/// Bits `start .. start + len` of the carry-less product of the first
/// `a_bits` bits of `a` and the first `b_bits` bits of `b`, as words (bits
/// past the product read as zero), with kernel `g` and layout `lay`.
fn window_with<G: Gf64>(
    g: G,
    lay: Layout,
    scratch: &mut Scratch,
    (a, a_bits): (&[u64], usize),
    (b, b_bits): (&[u64], usize),
    start: usize,
    len: usize,
) -> Vec<u64> {
    if a_bits == 0 || b_bits == 0 || len == 0 {
        return vec![0; words_for(len)];
    }
    let terms = a_bits.div_ceil(CHUNK) + b_bits.div_ceil(CHUNK) - 1;
    let size = terms.next_power_of_two();
    let k = size.trailing_zeros();
    let tb = tables();
    scratch.dirty = true;
    let Scratch {
        a: fa,
        b: fb,
        dirty,
    } = scratch;
    load_chunks(fa, a, a_bits, size);
    load_chunks(fb, b, b_bits, size);
    forward(g, tb, fa, k, lay, a_bits.div_ceil(CHUNK));
    forward(g, tb, fb, k, lay, b_bits.div_ceil(CHUNK));
    g.mul_assign(fa, fb);
    fb.as_mut_slice().zeroize();
    inverse(g, tb, fa, k, lay);
    // Product word j = C_2j ^ (C_2j+1 << 32) ^ (C_2j−1 >> 32).
    let at = |i: usize| fa.get(i).copied().unwrap_or(0);
    let w0 = start / 64;
    let mut pw: Vec<u64> = (w0..w0 + words_for(len) + 1)
        .map(|j| {
            let below = if j > 0 { at(2 * j - 1) >> 32 } else { 0 };
            at(2 * j) ^ (at(2 * j + 1) << 32) ^ below
        })
        .collect();
    fa.as_mut_slice().zeroize();
    *dirty = false;
    let out = extract_bits(&pw, start % 64, len);
    pw.zeroize();
    out
}

/// Which GF(2^64) kernel the FFT uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// AVX-512 VPCLMULQDQ if present, else PCLMULQDQ, else portable.
    Best,
    /// Scalar PCLMULQDQ if present, else portable.
    Pclmul,
    /// Portable software multiply.
    Portable,
}

/// [`window_with`] with the kernel chosen at run time.
pub(crate) fn product_window(
    kernel: Kernel,
    scratch: &mut Scratch,
    a: (&[u64], usize),
    b: (&[u64], usize),
    start: usize,
    len: usize,
) -> Vec<u64> {
    let wide = match kernel {
        Kernel::Best => Avx512Gf::detect(),
        _ => None,
    };
    let scalar = match kernel {
        Kernel::Portable => None,
        _ => Pclmul::detect(),
    };
    match (wide, scalar) {
        (Some(w), _) => window_with(w, LAYOUT, scratch, a, b, start, len),
        (None, Some(p)) => window_with(p, LAYOUT, scratch, a, b, start, len),
        (None, None) => window_with(Portable, LAYOUT, scratch, a, b, start, len),
    }
}

/// The carry-less product `a·b` over GF(2)\[x\] (bit `i` = coefficient of
/// `x^i`), of length `a.len() + b.len() − 1`, or empty if either is empty.
pub fn mul(a: &BitVec, b: &BitVec) -> BitVec {
    mul_in(&mut Scratch::new(), a, b)
}

/// [`mul`] with caller-owned working memory, for repeated products.
pub fn mul_in(scratch: &mut Scratch, a: &BitVec, b: &BitVec) -> BitVec {
    let len = (a.len() + b.len()).saturating_sub(1);
    if a.is_empty() || b.is_empty() {
        return BitVec::zeros(0);
    }
    let words = product_window(
        Kernel::Best,
        scratch,
        (a.as_words(), a.len()),
        (b.as_words(), b.len()),
        0,
        len,
    );
    BitVec::from_words_truncate(words, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_xoshiro::Xoshiro256PlusPlus;

    fn naive_mul(a: &BitVec, b: &BitVec) -> BitVec {
        if a.is_empty() || b.is_empty() {
            return BitVec::zeros(0);
        }
        let mut out = BitVec::zeros(a.len() + b.len() - 1);
        for i in 0..a.len() {
            if a.get(i) {
                for j in 0..b.len() {
                    if b.get(j) {
                        out.flip(i + j);
                    }
                }
            }
        }
        out
    }

    /// Word-level schoolbook product (for sizes where bit loops are slow).
    fn schoolbook_words(a: &[u64], b: &[u64]) -> Vec<u64> {
        let mut out = vec![0u64; a.len() + b.len()];
        for (i, &x) in a.iter().enumerate() {
            for (j, &y) in b.iter().enumerate() {
                let (lo, hi) = crate::clmul::clmul64(x, y);
                out[i + j] ^= lo;
                out[i + j + 1] ^= hi;
            }
        }
        out
    }

    fn rand_words(rng: &mut impl Rng, n: usize) -> Vec<u64> {
        (0..n).map(|_| rng.next_u64()).collect()
    }

    #[test]
    fn field_known_products() {
        // x^63 · x = x^64 = x^4 + x^3 + x + 1.
        assert_eq!(gf64_mul_portable(1 << 63, 2), 0x1B);
        assert_eq!(gf64_mul_portable(1, 0xDEAD_BEEF), 0xDEAD_BEEF);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(20);
        for _ in 0..200 {
            let (a, b, c) = (rng.next_u64(), rng.next_u64(), rng.next_u64());
            let m = gf64_mul_portable;
            assert_eq!(m(a, b), m(b, a));
            assert_eq!(m(m(a, b), c), m(a, m(b, c)));
            assert_eq!(m(a, b ^ c), m(a, b) ^ m(a, c));
        }
    }

    #[test]
    fn cantor_basis_property() {
        let beta = cantor_basis();
        assert_eq!(beta[0], 1);
        for i in 1..64 {
            let b = beta[i];
            assert_eq!(gf64_mul_portable(b, b) ^ b, beta[i - 1], "β_{i}");
        }
        // Linearly independent over GF(2): full rank.
        let mut piv = [0u64; 64];
        for &b in &beta {
            let mut v = b;
            while v != 0 {
                let p = 63 - v.leading_zeros() as usize;
                if piv[p] == 0 {
                    piv[p] = v;
                    break;
                }
                v ^= piv[p];
            }
            assert_ne!(v, 0, "dependent basis");
        }
        // s_j(ω_i) = ω_(i >> j) with s_1(x) = x^2 + x.
        let t = tables();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(21);
        for _ in 0..50 {
            let i = rng.next_u64() >> 20;
            let mut w = t.omega(i);
            for j in 1..8 {
                w = gf64_mul_portable(w, w) ^ w;
                assert_eq!(w, t.omega(i >> j));
            }
        }
    }

    /// All kernels against the portable one on awkward lengths.
    fn kernels_match<G: Gf64>(g: G) {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(22);
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 64, 100, 1000] {
            let c = rng.next_u64();
            let (lo, hi) = (rand_words(&mut rng, n), rand_words(&mut rng, n));
            for inv in [false, true] {
                let (mut l1, mut h1, mut l2, mut h2) =
                    (lo.clone(), hi.clone(), lo.clone(), hi.clone());
                if inv {
                    g.ibutterfly(c, &mut l1, &mut h1);
                    Portable.ibutterfly(c, &mut l2, &mut h2);
                } else {
                    g.butterfly(c, &mut l1, &mut h1);
                    Portable.butterfly(c, &mut l2, &mut h2);
                }
                assert_eq!((l1, h1), (l2, h2), "butterfly n={n} inv={inv}");
            }
            let (mut a1, mut a2) = (lo.clone(), lo.clone());
            g.mul_assign(&mut a1, &hi);
            Portable.mul_assign(&mut a2, &hi);
            assert_eq!(a1, a2, "mul n={n}");
            for (x, (&y, &z)) in a2.iter().zip(lo.iter().zip(&hi)) {
                assert_eq!(*x, g.mul(y, z));
            }
        }
        for h in [1usize, 8, 16, 24] {
            let blocks = 5;
            let d = rand_words(&mut rng, 2 * h * blocks);
            let tw = rand_words(&mut rng, blocks);
            for inv in [false, true] {
                let (mut d1, mut d2) = (d.clone(), d.clone());
                g.butterflies(&mut d1, h, &tw, inv);
                Portable.butterflies(&mut d2, h, &tw, inv);
                assert_eq!(d1, d2, "butterflies h={h} inv={inv}");
            }
        }
        for n in [8usize, 16, 64] {
            let d = rand_words(&mut rng, n * n);
            let (mut d1, mut d2) = (d.clone(), d.clone());
            g.transpose(&mut d1, n);
            Portable.transpose(&mut d2, n);
            assert_eq!(d1, d2, "transpose n={n}");
            for i in 0..n {
                for j in 0..n {
                    assert_eq!(d1[i * n + j], d[j * n + i]);
                }
            }
        }
        let small = tables().small;
        for units in [1usize, 2, 5] {
            let d = rand_words(&mut rng, 16 * units);
            let w: Vec<[u64; 3]> = (0..units)
                .map(|_| [rng.next_u64(), rng.next_u64(), rng.next_u64()])
                .collect();
            let (mut d1, mut d2) = (d.clone(), d.clone());
            g.tail3(&mut d1, &w, &small);
            Portable.tail3(&mut d2, &w, &small);
            assert_eq!(d1, d2, "tail3 units={units}");
            g.itail3(&mut d1, &w, &small);
            assert_eq!(d1, d, "itail3 units={units}");
        }
    }

    #[test]
    fn vectorised_kernels_match_portable() {
        kernels_match(Portable);
        if let Some(p) = Pclmul::detect() {
            kernels_match(p);
        }
        if let Some(w) = Avx512Gf::detect() {
            kernels_match(w);
        }
    }

    /// Novel basis polynomial X_k as GF(2) coefficients (s_i have 0/1
    /// coefficients, so products of them too).
    fn novel_poly(k: usize) -> BitVec {
        let mut p = BitVec::from_ascii("1").expect("valid");
        let mut s = BitVec::from_ascii("01").expect("valid"); // s_0 = x
        for i in 0..usize::BITS {
            if (k >> i) & 1 == 1 {
                p = naive_mul(&p, &s);
            }
            if k >> (i + 1) == 0 {
                break;
            }
            // s_(i+1) = s_i(x)^2 + s_i(x) = s_1 ∘ s_i
            let sq = naive_mul(&s, &s);
            let mut next = BitVec::zeros(sq.len());
            for j in 0..sq.len() {
                next.set(j, sq.get(j) ^ (j < s.len() && s.get(j)));
            }
            s = next;
        }
        p
    }

    #[test]
    fn novel_basis_conversion_matches_definition() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(23);
        for k in 0..=7u32 {
            let n = 1usize << k;
            let f = rand_words(&mut rng, n);
            let mut c = f.clone();
            to_novel(Portable, &mut c, View::SCALARS, k);
            // Σ c_j X_j must equal f coefficient by coefficient.
            let mut back = vec![0u64; n];
            for (j, &cj) in c.iter().enumerate() {
                let x = novel_poly(j);
                assert_eq!(x.len(), j + 1, "deg X_{j}");
                for (d, b) in back.iter_mut().enumerate().take(x.len()) {
                    if x.get(d) {
                        *b ^= cj;
                    }
                }
            }
            assert_eq!(back, f, "k={k}");
            from_novel(Portable, &mut c, View::SCALARS, k);
            assert_eq!(c, f, "round trip k={k}");
        }
    }

    #[test]
    fn fft_evaluates_at_subspace_points() {
        let tb = tables();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(24);
        for k in 0..=6u32 {
            let n = 1usize << k;
            // Small polynomial with field coefficients, in monomial basis.
            let f = rand_words(&mut rng, n);
            let mut v = f.clone();
            forward(Portable, tb, &mut v, k, LAYOUT, n);
            for (i, &got) in v.iter().enumerate() {
                let x = tb.omega(i as u64);
                let want = f
                    .iter()
                    .rev()
                    .fold(0, |acc, &c| gf64_mul_portable(acc, x) ^ c);
                assert_eq!(got, want, "k={k} i={i}");
            }
            inverse(Portable, tb, &mut v, k, LAYOUT);
            assert_eq!(v, f, "inverse k={k}");
        }
    }

    #[test]
    fn two_level_layout_matches_one_level() {
        let tb = tables();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(25);
        let one = Layout {
            row_log: 16,
            stripe_words: 1 << 17,
            l1_log: 11,
        };
        for (k, row_log, stripe, l1) in [
            (9u32, 2u32, 64usize, 5u32),
            (10, 4, 256, 4),
            (11, 8, 8, 6),
            (12, 1, 1 << 10, 3),
        ] {
            let lay = Layout {
                row_log,
                stripe_words: stripe,
                l1_log: l1,
            };
            let f = rand_words(&mut rng, 1 << k);
            let (mut a, mut b) = (f.clone(), f.clone());
            forward(Portable, tb, &mut a, k, one, 1 << k);
            // Only a prefix nonzero: exercises the zero-skipping expansion.
            let nz = (1usize << k) / 3;
            let mut p = f.clone();
            p[nz..].fill(0);
            let (mut p1, mut p2) = (p.clone(), p.clone());
            forward(Portable, tb, &mut p1, k, one, 1 << k);
            forward(Portable, tb, &mut p2, k, lay, nz);
            assert_eq!(p1, p2, "prefix k={k} row_log={row_log}");
            forward(Portable, tb, &mut b, k, lay, 1 << k);
            assert_eq!(a, b, "k={k} row_log={row_log}");
            if let Some(w) = Avx512Gf::detect() {
                let mut c = f.clone();
                forward(w, tb, &mut c, k, lay, 1 << k);
                assert_eq!(c, a, "avx512 k={k}");
                inverse(w, tb, &mut c, k, lay);
                assert_eq!(c, f, "avx512 inverse k={k}");
            }
            inverse(Portable, tb, &mut b, k, lay);
            assert_eq!(b, f, "inverse k={k} row_log={row_log}");
        }
    }

    #[test]
    fn product_matches_naive_on_awkward_sizes() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(26);
        let sizes = [0usize, 1, 2, 31, 32, 33, 63, 64, 65, 127, 129, 1000, 3001];
        for &na in &sizes {
            for &nb in &sizes {
                let a = BitVec::random(na, &mut rng);
                let b = BitVec::random(nb, &mut rng);
                let want = naive_mul(&a, &b);
                assert_eq!(mul(&a, &b), want, "{na}x{nb}");
                let len = want.len();
                for kernel in [Kernel::Pclmul, Kernel::Portable] {
                    let w = product_window(
                        kernel,
                        &mut Scratch::new(),
                        (a.as_words(), na),
                        (b.as_words(), nb),
                        0,
                        len,
                    );
                    assert_eq!(
                        BitVec::from_words_truncate(w, len),
                        want,
                        "{kernel:?} {na}x{nb}"
                    );
                }
            }
        }
    }

    #[test]
    fn windows_of_the_product() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(27);
        let a = BitVec::random(777, &mut rng);
        let b = BitVec::random(1234, &mut rng);
        let full = naive_mul(&a, &b);
        let mut scratch = Scratch::new();
        for (start, len) in [
            (0, 1),
            (5, 64),
            (63, 65),
            (776, 1000),
            (2000, 50),
            (2009, 10),
            (3000, 7),
        ] {
            let w = product_window(
                Kernel::Best,
                &mut scratch,
                (a.as_words(), 777),
                (b.as_words(), 1234),
                start,
                len,
            );
            let got = BitVec::from_words_truncate(w, len);
            for i in 0..len {
                let want = start + i < full.len() && full.get(start + i);
                assert_eq!(got.get(i), want, "start={start} i={i}");
            }
        }
    }

    /// `p(r)` for a GF(2)[x] polynomial `p` and a field element `r` (Horner).
    fn eval_bits(p: &BitVec, r: u64) -> u64 {
        (0..p.len())
            .rev()
            .fold(0, |acc, i| gf64_mul_portable(acc, r) ^ u64::from(p.get(i)))
    }

    #[test]
    fn reused_scratch_across_sizes() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(31);
        let mut scratch = Scratch::new();
        for (na, nb) in [
            (3001usize, 1000usize),
            (65, 63),
            (0, 9),
            (20_011, 9_999),
            (1, 1),
        ] {
            let a = BitVec::random(na, &mut rng);
            let b = BitVec::random(nb, &mut rng);
            assert_eq!(mul_in(&mut scratch, &a, &b), naive_mul(&a, &b), "{na}x{nb}");
        }
        // Between products the buffers hold nothing.
        assert!(!scratch.dirty);
        assert!(scratch.a.iter().chain(&scratch.b).all(|&w| w == 0));
    }

    #[test]
    fn large_products_match_schoolbook() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(28);
        let (na, nb) = (200_003usize, 99_999usize);
        let a = BitVec::random(na, &mut rng);
        let b = BitVec::random(nb, &mut rng);
        let want = schoolbook_words(a.as_words(), b.as_words());
        let want = BitVec::from_words_truncate(want, na + nb - 1);
        assert_eq!(mul(&a, &b), want, "{na}x{nb}");
    }

    #[test]
    fn kernels_agree_on_two_level_products() {
        // Over 2^16 chunks: the real two-level layout, every kernel.
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(30);
        let (na, nb) = (1_100_001usize, 1_049_999usize);
        let a = BitVec::random(na, &mut rng);
        let b = BitVec::random(nb, &mut rng);
        let len = na + nb - 1;
        let mut scratch = Scratch::new();
        let mut run = |kernel| {
            product_window(
                kernel,
                &mut scratch,
                (a.as_words(), na),
                (b.as_words(), nb),
                0,
                len,
            )
        };
        let best = run(Kernel::Best);
        assert_eq!(run(Kernel::Pclmul), best);
        assert_eq!(run(Kernel::Portable), best);
    }

    #[test]
    fn two_level_product_passes_evaluation_check() {
        // 2^16 < chunk count: the two-level layout with the real parameters.
        // (A·B)(r) = A(r)·B(r) at random field points r.
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(29);
        let (na, nb) = (1_100_000usize, 1_050_001usize);
        let a = BitVec::random(na, &mut rng);
        let b = BitVec::random(nb, &mut rng);
        let p = mul(&a, &b);
        assert_eq!(p.len(), na + nb - 1);
        for _ in 0..2 {
            let r = rng.next_u64();
            let want = gf64_mul_portable(eval_bits(&a, r), eval_bits(&b, r));
            assert_eq!(eval_bits(&p, r), want);
        }
    }
}
