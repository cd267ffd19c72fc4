//! Privacy amplification by Toeplitz hashing, computed as a carry-less
//! polynomial product.
//!
//! # Why this shape
//!
//! A random Toeplitz matrix is a 2-universal hash family that needs only
//! `n + m − 1` seed bits (against `n·m` for a random matrix), which is what
//! the leftover hash lemma needs and what the security proofs of QKD assume.
//! Multiplying an `m × n` Toeplitz matrix by a vector bit by bit costs
//! `O(n·m)`, hopeless at 10^8-bit blocks; but each output bit is a sum along a
//! diagonal, so the whole output is a window of the GF(2)\[x\] product of the
//! seed polynomial and the input polynomial. That window is computed on
//! packed 64-bit words, by a Karatsuba recursion for small blocks and by the
//! additive FFT of [`crate::gf2x`] for large ones, both with VPCLMULQDQ/
//! PCLMULQDQ when the CPU has them (the private `clmul` module, the only
//! `unsafe` in the crate) and a portable software carry-less multiply
//! otherwise. No crate is used because none offers large GF(2)\[x\] products
//! with a hardware carry-less base case, and the exact Toeplitz convention
//! below must be pinned down in our own code anyway since both ends of a link
//! must compute the identical function. Every backend computes the same
//! function bit for bit (tested against each other and the definition).
//!
//! # Convention (normative: both ends of a link rely on it)
//!
//! Input `x` has `n` bits, the output `y` has `m` bits, the seed `s` has
//! `n + m − 1` bits, all indexed from 0 in the LSB-first layout of
//! [`BitVec`]. The Toeplitz matrix is
//!
//! ```text
//! T[i][j] = s[i − j + n − 1]      (0 ≤ i < m, 0 ≤ j < n)
//! y[i]    = XOR over j of T[i][j] · x[j]
//! ```
//!
//! so the first row is `s[n−1], s[n−2], …, s[0]` (seed read backwards), the
//! first column is `s[n−1], s[n], …, s[n+m−2]`, and diagonal `d = i − j` is
//! constant and equal to `s[d + n − 1]`. Equivalently, with polynomials
//! `S(z) = Σ s_k z^k` and `X(z) = Σ x_j z^j`, `y[i]` is the coefficient of
//! `z^(i + n − 1)` in `S(z)·X(z)`: the output is bits `n−1 .. n−1+m` of the
//! carry-less product.
//!
//! # Algorithm and cost
//!
//! Below [`FFT_MIN_SIDE`] bits of input or output (the measured crossover),
//! the output is cut into square word-aligned tiles (side = the smaller of
//! the input and output word counts, padded to `c·2^k` words). Each tile is
//! a Toeplitz matrix-vector product computed by the Karatsuba-style
//! recursion in `toeplitz_rec` (three half-size products per level, only the
//! needed "middle" part of the polynomial product is ever formed), with a
//! schoolbook middle product as base case: AVX-512 VPCLMULQDQ (four word
//! products per instruction) when available, else PCLMULQDQ, else the
//! portable kernel. Cost is `O(N^1.585)` word operations for `N`-word tiles.
//!
//! Above it, the whole product `S·X` is computed by [`gf2x`]'s additive FFT
//! over GF(2^64) (`O(N log N)`: three transforms of `2^K` 32-bit chunks,
//! `2^K ≥ (2n + m)/32`) and the window cut out of it. Memory is two
//! `2^K`-word buffers (128 MiB at 10^8 input bits; peak RSS 172 MiB with the
//! inputs), reusable across blocks through [`toeplitz_hash_in`].
//!
//! Measured on one core of the development machine (AVX-512 Zen 4), m = n/2,
//! median of three runs of `examples/pa_block` on fresh buffers: 0.26 Gbit/s
//! at 10^6 input bits (Karatsuba), 0.25 Gbit/s at 10^7 and 0.26 Gbit/s at
//! 10^8 (FFT; Karatsuba manages 60 and 18.5 Mbit/s there); 0.33 Gbit/s at
//! 10^8 with a reused scratch. The FFT is limited by its ≈ 290 M GF(2^64)
//! multiplications at 10^8 (vector-ALU bound), the basis conversions' XOR
//! passes (L2 bandwidth), DRAM passes and, on fresh buffers, page faults;
//! 1 Gbit/s at 10^8 would need another ~4×, which this design does not
//! reach on one core.

use crate::bits::{BitVec, extract_bits, words_for};
use crate::clmul::{Avx512Clmul, ClmulBase, Pclmul, Portable};
use crate::gf2x::{self, Scratch};

/// Errors from privacy amplification; all are caller misuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PaError {
    /// The seed does not have exactly `n + m − 1` bits.
    #[error("Toeplitz seed has {got} bits, expected n + m - 1 = {expected}")]
    SeedLength {
        /// Required seed length.
        expected: usize,
        /// Provided seed length.
        got: usize,
    },
    /// An empty input cannot be hashed (the seed length would be undefined).
    #[error("privacy amplification input is empty")]
    EmptyInput,
}

/// Which algorithm and carry-less multiplier to use. All variants compute
/// the identical function (the convention above); they differ only in speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backend {
    /// The fastest kernel the CPU supports (AVX-512 VPCLMULQDQ, else
    /// PCLMULQDQ, else portable), and the additive FFT ([`crate::gf2x`])
    /// when both the input and the output have at least [`FFT_MIN_SIDE`]
    /// bits, Karatsuba otherwise.
    #[default]
    Auto,
    /// Scalar PCLMULQDQ if available (portable otherwise), never AVX-512;
    /// algorithm chosen by size as in [`Backend::Auto`].
    Pclmul,
    /// Always the portable software kernel (for tests and comparison);
    /// algorithm chosen by size as in [`Backend::Auto`].
    Portable,
    /// The fastest kernel, always the Karatsuba recursion.
    Karatsuba,
    /// The fastest kernel, always the additive FFT.
    Fft,
}

/// [`Backend::Auto`] uses the additive FFT when both the input and the
/// output length (bits) are at least this. Measured on the development
/// machine: Karatsuba costs ~`n·m^0.585` and wins below (3.8 ms against
/// 5.8 ms at n = 10^6, m = n/2), the FFT costs ~`(2n + m)·log` and wins
/// above (5.8 against 7.1 ms at 1.5·10^6; 42 against 54 ms at n = 10^7,
/// m = 10^6; but 49 against 28 ms at n = 10^7, m = 10^5).
pub const FFT_MIN_SIDE: usize = 750_000;

/// Seed length for hashing `input_len` bits to `output_len` bits:
/// `input_len + output_len − 1` (0 if both are 0).
pub fn seed_len(input_len: usize, output_len: usize) -> usize {
    (input_len + output_len).saturating_sub(1)
}

/// Toeplitz hash of `input` (n bits) to `output_len` (m) bits with a seed of
/// exactly `n + m − 1` bits, per the convention in the module docs.
pub fn toeplitz_hash(seed: &BitVec, input: &BitVec, output_len: usize) -> Result<BitVec, PaError> {
    toeplitz_hash_with(Backend::Auto, seed, input, output_len)
}

/// [`toeplitz_hash`] with an explicit [`Backend`].
pub fn toeplitz_hash_with(
    backend: Backend,
    seed: &BitVec,
    input: &BitVec,
    output_len: usize,
) -> Result<BitVec, PaError> {
    toeplitz_hash_in(&mut Scratch::new(), backend, seed, input, output_len)
}

/// [`toeplitz_hash_with`] with caller-owned working memory for the FFT
/// path: a node that amplifies block after block keeps one [`Scratch`] and
/// saves re-allocating (and page-faulting in) 128 MiB per 10^8-bit block.
/// The scratch holds no key material between calls.
pub fn toeplitz_hash_in(
    scratch: &mut Scratch,
    backend: Backend,
    seed: &BitVec,
    input: &BitVec,
    output_len: usize,
) -> Result<BitVec, PaError> {
    let n = input.len();
    check(seed, n, output_len)?;
    if output_len == 0 {
        return Ok(BitVec::zeros(0));
    }
    let fft = match backend {
        Backend::Fft => true,
        Backend::Karatsuba => false,
        _ => n.min(output_len) >= FFT_MIN_SIDE,
    };
    let out = if fft {
        let kernel = match backend {
            Backend::Pclmul => gf2x::Kernel::Pclmul,
            Backend::Portable => gf2x::Kernel::Portable,
            _ => gf2x::Kernel::Best,
        };
        // y[i] = coefficient of z^(i + n − 1) of S(z)·X(z).
        gf2x::product_window(
            kernel,
            scratch,
            (seed.as_words(), seed.len()),
            (input.as_words(), n),
            n - 1,
            output_len,
        )
    } else {
        match backend {
            Backend::Auto | Backend::Karatsuba | Backend::Fft => {
                if let Some(wide) = Avx512Clmul::detect() {
                    toeplitz_words(wide, seed, input, output_len)
                } else if let Some(fast) = Pclmul::detect() {
                    toeplitz_words(fast, seed, input, output_len)
                } else {
                    toeplitz_words(Portable, seed, input, output_len)
                }
            }
            Backend::Pclmul => match Pclmul::detect() {
                Some(fast) => toeplitz_words(fast, seed, input, output_len),
                None => toeplitz_words(Portable, seed, input, output_len),
            },
            Backend::Portable => toeplitz_words(Portable, seed, input, output_len),
        }
    };
    Ok(BitVec::from_words_truncate(out, output_len))
}

/// The slow, obviously-correct reference: `O(n·m)` bit by bit, straight from
/// the matrix definition. For tests and for checking other implementations.
pub fn toeplitz_hash_reference(
    seed: &BitVec,
    input: &BitVec,
    output_len: usize,
) -> Result<BitVec, PaError> {
    let n = input.len();
    check(seed, n, output_len)?;
    let mut y = BitVec::zeros(output_len);
    for i in 0..output_len {
        let mut acc = false;
        for j in 0..n {
            acc ^= seed.get(i + n - 1 - j) & input.get(j);
        }
        y.set(i, acc);
    }
    Ok(y)
}

fn check(seed: &BitVec, n: usize, m: usize) -> Result<(), PaError> {
    if n == 0 {
        return Err(PaError::EmptyInput);
    }
    let expected = seed_len(n, m);
    if seed.len() != expected {
        return Err(PaError::SeedLength {
            expected,
            got: seed.len(),
        });
    }
    Ok(())
}

/// Bits `off .. off + 64·words` of `v` as words; positions outside `v`
/// (including negative ones) read as zero.
fn window(v: &BitVec, off: isize, words: usize) -> Vec<u64> {
    let bits = 64 * words;
    if off >= 0 {
        return extract_bits(v.as_words(), off as usize, bits);
    }
    let skip = off.unsigned_abs();
    if skip >= bits {
        return vec![0; words];
    }
    // Leading zeros, then the first `bits - skip` bits of `v`.
    let body = extract_bits(v.as_words(), 0, bits - skip);
    let mut out = vec![0u64; words];
    let (ws, sh) = (skip / 64, skip % 64);
    for (i, &w) in body.iter().enumerate() {
        out[ws + i] |= w << sh;
        if sh != 0 && ws + i + 1 < words {
            out[ws + i + 1] |= w >> (64 - sh);
        }
    }
    out
}

/// Smallest `c·2^k ≥ n` with `c ≤ base`, so the recursion halves evenly all
/// the way down to the base case.
fn padded_tile(n: usize, base: usize) -> usize {
    let mut k = 0;
    while n.div_ceil(1 << k) > base {
        k += 1;
    }
    n.div_ceil(1 << k) << k
}

/// Output words of the `m × n` Toeplitz product, by square word-aligned
/// tiles. With the seed shifted up one bit (`s'[t] = s[t−1]`) the output is
/// `y_i = Σ_j s'[i − j + n]`; tile (r, c) of size `N` words is then an
/// `N`-word middle product whose seed is bits
/// `n − 1 + 64·N·(r − c − 1) ..` (`128·N` bits) of `s`.
fn toeplitz_words<B: ClmulBase>(base: B, seed: &BitVec, x: &BitVec, m: usize) -> Vec<u64> {
    let n = x.len();
    let (nw, mw) = (words_for(n), words_for(m));
    let tile = padded_tile(nw.min(mw), B::BASE_WORDS);
    let (rows, cols) = (mw.div_ceil(tile), nw.div_ceil(tile));
    let mut y = vec![0u64; rows * tile];
    let mut xs = vec![0u64; tile];
    let mut acc = vec![0u64; tile];
    let mut scratch = vec![0u64; 4 * tile + 64];
    let xw = x.as_words();
    for c in 0..cols {
        let lo = c * tile;
        let hi = ((c + 1) * tile).min(nw);
        xs.fill(0);
        xs[..hi - lo].copy_from_slice(&xw[lo..hi]);
        for r in 0..rows {
            let off = (n as isize - 1) + 64 * tile as isize * (r as isize - c as isize - 1);
            let mut w = window(seed, off, 2 * tile);
            toeplitz_rec(base, &w, &xs, &mut acc, &mut scratch);
            for (o, a) in y[r * tile..(r + 1) * tile].iter_mut().zip(&acc) {
                *o ^= a;
            }
            zeroize::Zeroize::zeroize(&mut w);
        }
    }
    zeroize::Zeroize::zeroize(&mut xs);
    zeroize::Zeroize::zeroize(&mut acc);
    zeroize::Zeroize::zeroize(&mut scratch);
    y.truncate(mw);
    y
}

/// `out = words N..2N of seed · x` for `x.len() == N`, `seed.len() == 2N`:
/// an `N`-word square Toeplitz product. Splitting into halves gives the
/// block form `[y0; y1] = [A B; C A]·[x0; x1]` with `A`, `B`, `C` Toeplitz
/// blocks whose seeds are word windows `h..3h`, `0..2h`, `2h..4h`; then
/// `P = A(x0 + x1)`, `y0 = P + (A + B)x1`, `y1 = P + (A + C)x0`: three
/// half-size products instead of four (Karatsuba for Toeplitz matrices), and
/// no part of the full product that is not needed is ever computed.
fn toeplitz_rec<B: ClmulBase>(
    base: B,
    seed: &[u64],
    x: &[u64],
    out: &mut [u64],
    scratch: &mut [u64],
) {
    let n = x.len();
    let out = &mut out[..n];
    if n <= B::BASE_WORDS || n % 2 == 1 {
        out.fill(0);
        base.middle_xor(seed, x, out);
        return;
    }
    let h = n / 2;
    let (xsum, rest) = scratch.split_at_mut(h);
    let (sd, rest) = rest.split_at_mut(2 * h);
    let (p, rest) = rest.split_at_mut(h);
    let (x0, x1) = x.split_at(h);
    for ((d, a), b) in xsum.iter_mut().zip(x0).zip(x1) {
        *d = a ^ b;
    }
    toeplitz_rec(base, &seed[h..3 * h], xsum, p, rest);
    let (y0, y1) = out.split_at_mut(h);
    for ((d, a), b) in sd.iter_mut().zip(&seed[h..3 * h]).zip(&seed[..2 * h]) {
        *d = a ^ b;
    }
    toeplitz_rec(base, sd, x1, y0, rest);
    for ((d, a), b) in sd.iter_mut().zip(&seed[h..3 * h]).zip(&seed[2 * h..4 * h]) {
        *d = a ^ b;
    }
    toeplitz_rec(base, sd, x0, y1, rest);
    for (o, q) in y0.iter_mut().zip(p.iter()) {
        *o ^= q;
    }
    for (o, q) in y1.iter_mut().zip(p.iter()) {
        *o ^= q;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_xoshiro::Xoshiro256PlusPlus;

    #[test]
    fn reference_known_case() {
        // n = 3, m = 2, seed s0..s3 = 1,0,1,1:
        // T = [[s2 s1 s0],[s3 s2 s1]] = [[1 0 1],[1 1 0]]; x = 1,1,0 -> y = 1, 0.
        let seed = BitVec::from_ascii("1011").expect("valid");
        let x = BitVec::from_ascii("110").expect("valid");
        let y = toeplitz_hash_reference(&seed, &x, 2).expect("sizes agree");
        assert_eq!(y.to_ascii(), "10");
        let y2 = toeplitz_hash(&seed, &x, 2).expect("sizes agree");
        assert_eq!(y2.to_ascii(), "10");
    }

    #[test]
    fn identity_like_seed() {
        // Seed with only s[n-1] set is the identity on the first m bits.
        let n = 100;
        let m = 40;
        let mut seed = BitVec::zeros(n + m - 1);
        seed.set(n - 1, true);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(5);
        let x = BitVec::random(n, &mut rng);
        let y = toeplitz_hash(&seed, &x, m).expect("sizes agree");
        assert_eq!(y, x.slice(0, m).expect("in range"));
    }

    #[test]
    fn differential_awkward_sizes() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(6);
        let sizes = [1usize, 2, 63, 64, 65, 127, 128, 129, 1000, 4097];
        for &n in &sizes {
            for m in [1usize, 7, 63, 64, 65, n / 2 + 1, n, n + 3] {
                if n * m > 3_000_000 {
                    continue;
                }
                let x = BitVec::random(n, &mut rng);
                let seed = BitVec::random(seed_len(n, m), &mut rng);
                let r = toeplitz_hash_reference(&seed, &x, m).expect("ok");
                let f = toeplitz_hash_with(Backend::Auto, &seed, &x, m).expect("ok");
                let c = toeplitz_hash_with(Backend::Pclmul, &seed, &x, m).expect("ok");
                let p = toeplitz_hash_with(Backend::Portable, &seed, &x, m).expect("ok");
                let k = toeplitz_hash_with(Backend::Karatsuba, &seed, &x, m).expect("ok");
                let t = toeplitz_hash_with(Backend::Fft, &seed, &x, m).expect("ok");
                assert_eq!(k, r, "karatsuba n={n} m={m}");
                assert_eq!(t, r, "fft n={n} m={m}");
                assert_eq!(f, r, "fast n={n} m={m}");
                assert_eq!(c, r, "pclmul n={n} m={m}");
                assert_eq!(p, r, "portable n={n} m={m}");
            }
        }
    }

    #[test]
    fn window_handles_negative_and_overrun_offsets() {
        let v = BitVec::from_ascii("1101").expect("valid");
        // Bits 0..4 = 1,1,0,1 -> word 0b1011.
        assert_eq!(window(&v, -3, 1), vec![0b1011 << 3]);
        assert_eq!(window(&v, -64, 1), vec![0]);
        assert_eq!(window(&v, -70, 2), vec![0, 0b1011 << 6]);
        assert_eq!(window(&v, -62, 2), vec![0b11 << 62, 0b10]);
        assert_eq!(window(&v, 2, 2), vec![0b10, 0]);
        assert_eq!(padded_tile(16, 16), 16);
        assert_eq!(padded_tile(17, 16), 18);
        assert_eq!(padded_tile(1000, 16), 1024);
        assert_eq!(padded_tile(1001, 16), 1024);
        assert_eq!(padded_tile(1025, 16), 1152);
        assert_eq!(padded_tile(1025, 48), 1056);
    }

    #[test]
    fn large_block_fast_vs_portable() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(8);
        let n = 200_003;
        let m = 150_001;
        let x = BitVec::random(n, &mut rng);
        let seed = BitVec::random(seed_len(n, m), &mut rng);
        let f = toeplitz_hash_with(Backend::Auto, &seed, &x, m).expect("ok");
        let c = toeplitz_hash_with(Backend::Pclmul, &seed, &x, m).expect("ok");
        let p = toeplitz_hash_with(Backend::Portable, &seed, &x, m).expect("ok");
        assert_eq!(f, p);
        assert_eq!(c, p);
        // Spot-check a few output bits against the definition.
        for i in [0, 1, 77, m / 2, m - 1] {
            let mut acc = false;
            for j in 0..n {
                acc ^= seed.get(i + n - 1 - j) & x.get(j);
            }
            assert_eq!(f.get(i), acc, "bit {i}");
        }
    }

    #[test]
    fn fft_matches_karatsuba_on_large_blocks() {
        // Sizes on both sides of the two-level FFT layout (2^16 chunks), odd
        // lengths, and m below and above n/2; the last is a 10^7-bit block.
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(12);
        for (n, m) in [
            (1_000_003usize, 499_999usize),
            (2_100_001, 1_700_003),
            (10_000_019, 4_999_999),
        ] {
            let x = BitVec::random(n, &mut rng);
            let seed = BitVec::random(seed_len(n, m), &mut rng);
            let k = toeplitz_hash_with(Backend::Karatsuba, &seed, &x, m).expect("ok");
            let f = toeplitz_hash_with(Backend::Fft, &seed, &x, m).expect("ok");
            assert_eq!(f, k, "n={n} m={m}");
            for i in [0, m / 3, m - 1] {
                let mut acc = false;
                for j in 0..n {
                    acc ^= seed.get(i + n - 1 - j) & x.get(j);
                }
                assert_eq!(f.get(i), acc, "bit {i}");
            }
        }
    }

    #[test]
    fn fft_handles_tiny_blocks() {
        // n = 1: the output is the seed itself (T[i][0] = s[i]).
        let seed = BitVec::from_ascii("1011001").expect("valid");
        let x = BitVec::from_ascii("1").expect("valid");
        let y = toeplitz_hash_with(Backend::Fft, &seed, &x, 7).expect("ok");
        assert_eq!(y, seed);
        let zero = BitVec::zeros(1);
        let y = toeplitz_hash_with(Backend::Fft, &seed, &zero, 7).expect("ok");
        assert_eq!(y, BitVec::zeros(7));
        let y = toeplitz_hash_with(Backend::Fft, &BitVec::zeros(0), &x, 0).expect("ok");
        assert_eq!(y, BitVec::zeros(0));
    }

    #[test]
    fn linear_in_input() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(9);
        let (n, m) = (5000, 2100);
        let seed = BitVec::random(seed_len(n, m), &mut rng);
        let a = BitVec::random(n, &mut rng);
        let b = BitVec::random(n, &mut rng);
        let mut ab = a.clone();
        ab.xor_assign(&b).expect("same length");
        let mut ha = toeplitz_hash(&seed, &a, m).expect("ok");
        let hb = toeplitz_hash(&seed, &b, m).expect("ok");
        ha.xor_assign(&hb).expect("same length");
        assert_eq!(ha, toeplitz_hash(&seed, &ab, m).expect("ok"));
    }

    #[test]
    fn rejects_bad_sizes() {
        let x = BitVec::zeros(10);
        assert_eq!(
            toeplitz_hash(&BitVec::zeros(10), &x, 2),
            Err(PaError::SeedLength {
                expected: 11,
                got: 10
            })
        );
        assert_eq!(
            toeplitz_hash(&BitVec::zeros(3), &BitVec::zeros(0), 2),
            Err(PaError::EmptyInput)
        );
        assert_eq!(
            toeplitz_hash(&BitVec::zeros(9), &x, 0).expect("m = 0 is fine"),
            BitVec::zeros(0)
        );
    }
}
