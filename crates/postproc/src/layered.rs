//! The layered normalised min-sum kernel behind [`crate::ldpc`]: one base-matrix
//! row (a *layer* of [`LIFT`] checks) at a time, all its checks in SIMD lanes.
//!
//! # Why this shape
//!
//! A quasi-cyclic code's layer is `Z = 64` checks whose edges into one
//! column block are a cyclic rotation of that block: check `i` of the layer
//! meets variable `(i + shift) mod Z`. So no two checks of a layer share a
//! variable, a layer's `Z` check updates are independent, and rotating the
//! block's posteriors into a scratch row lines every check up with its lane.
//! The update is then plain element-wise arithmetic over `[i16; Z]` rows of
//! fixed-point LLRs (16 per unit, saturating) — subtract, absolute value,
//! two running minima, a sign XOR, a select — which the compiler turns into
//! 32-lane AVX-512 (or 16-lane AVX2) code. Processing
//! the checks of a layer together is *exactly* the scalar layered schedule
//! (check by check, in row order), because they touch disjoint variables; the
//! test below holds the two bit-identical on random codes. The scalar decoder
//! ran at 5–10 ns per edge and iteration, this one at a fraction of a
//! nanosecond (BENCHMARKS.md). 16-bit fixed point (an LLR of 1 is 16,
//! saturating at ±32767) decodes the same frames in the same iterations as
//! `f32` did (frame-error sweeps in BENCHMARKS.md) at twice the lanes.
//!
//! Early termination costs almost nothing: hard decisions pack into one `u64`
//! per column block (`Z = 64`), and a layer's syndrome is the XOR of its
//! blocks' words rotated by the shifts, so the check after each iteration is
//! one rotate and XOR per base-matrix entry.
//!
//! `unsafe` here is the one call into the function compiled with the CPU's
//! vector extensions, made only after they were detected at run time; the
//! same source, compiled for the baseline CPU, is the fallback.
#![allow(
    unsafe_code,
    reason = "calls a #[target_feature] function after runtime detection; SAFETY comment at the site"
)]

/// Lifting factor: checks per layer, variables per column block, lanes.
pub(crate) const LIFT: usize = 64;

/// A log-likelihood ratio in fixed point: 16-bit, saturating, so a 512-bit
/// vector holds 32 lanes (twice as many as `f32`). Callers scale LLRs by
/// [`LLR_ONE`]; [`LLR_MAX`] stands for "known".
pub(crate) type Llr = i16;
/// The fixed-point value of an LLR of 1.
pub(crate) const LLR_ONE: f32 = 16.0;
/// Largest magnitude (symmetric: −[`LLR_MAX`] is the smallest value, so
/// negating never overflows).
pub(crate) const LLR_MAX: Llr = i16::MAX;
/// Starting value of the running minima.
const MIN_START: Llr = LLR_MAX;

/// A quasi-cyclic parity-check matrix as its base matrix: layer `r` holds
/// entries `start[r]..start[r + 1]` of `cols`/`shifts`.
pub(crate) struct Base<'a> {
    pub start: &'a [u32],
    pub cols: &'a [u32],
    pub shifts: &'a [u32],
}

impl Base<'_> {
    fn layers(&self) -> usize {
        self.start.len().saturating_sub(1)
    }
    fn layer(&self, r: usize) -> std::ops::Range<usize> {
        self.start[r] as usize..self.start[r + 1] as usize
    }
    /// Edges (base entries) of the largest layer.
    pub fn max_degree(&self) -> usize {
        (0..self.layers())
            .map(|r| self.layer(r).len())
            .max()
            .unwrap_or(0)
    }
}

/// Floats kept per column block: four copies of its `Z` posteriors, so
/// that a rotated read is one contiguous run (see [`State`]).
const SPAN: usize = 4 * LIFT;

/// Decoder state of one frame: posteriors by column block, check-to-variable
/// messages by base entry (in the layer's rotated order).
///
/// Each column block's posteriors are stored four times in a row
/// (`[b | b | b | b]`, [`SPAN`] floats). Reading the block rotated by `s`
/// is the run `64 + s .. 128 + s`, and writing a rotated row back is three
/// stores at `s`, `64 + s` and `128 + s`, which leave copies 1 and 2 whole.
/// Fixed-length runs compile to plain vector loads and stores, where a
/// rotation done as two variable-length copies cost a `memcpy` call each.
pub(crate) struct State {
    post: Vec<Llr>,
    msg: Vec<Llr>,
    /// Per check: −1 (all ones) where the syndrome bit is 1, else 0.
    syn_sign: Vec<Llr>,
    /// One `u64` of syndrome per layer.
    syn_words: Vec<u64>,
    scratch: Vec<Llr>,
    hard: Vec<u64>,
}

impl State {
    /// `llr` holds the channel LLRs (length `64 · column blocks`),
    /// `syn_words` the syndrome, one word per layer.
    pub fn new(base: &Base<'_>, llr: &[Llr], syn_words: Vec<u64>) -> Self {
        let syn_sign = syn_words
            .iter()
            .flat_map(|&w| (0..LIFT).map(move |i| -(((w >> i) & 1) as Llr)))
            .collect();
        let mut post = Vec::with_capacity(llr.len() * 4);
        for block in llr.chunks_exact(LIFT) {
            for _ in 0..4 {
                post.extend_from_slice(block);
            }
        }
        Self {
            msg: vec![0; base.cols.len() * LIFT],
            hard: vec![0; llr.len() / LIFT],
            scratch: vec![0; base.max_degree() * LIFT],
            post,
            syn_sign,
            syn_words,
        }
    }

    /// The posteriors, one column block after another.
    pub fn posteriors(&self) -> impl Iterator<Item = &[Llr]> {
        self.post.chunks_exact(SPAN).map(|b| &b[LIFT..2 * LIFT])
    }
}

/// Runs up to `max_iterations` layered iterations, stopping as soon as the
/// hard decisions meet the syndrome. Returns the iterations run when they do
/// (0: the channel values already did), `None` otherwise.
pub(crate) fn decode(
    base: &Base<'_>,
    st: &mut State,
    scale: Llr,
    max_iterations: usize,
) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            // SAFETY: the function only differs from `decode_generic` in being
            // compiled with AVX-512F/VL/DQ/BW, all detected just above.
            return unsafe { x86::decode_avx512(base, st, scale, max_iterations) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: compiled with AVX2, detected just above.
            return unsafe { x86::decode_avx2(base, st, scale, max_iterations) };
        }
    }
    decode_generic(base, st, scale, max_iterations)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Base, Llr, State};

    /// A copy of [`super::decode_generic`] compiled with `$features`.
    macro_rules! vectorised {
        ($name:ident, $features:literal) => {
            #[target_feature(enable = $features)]
            pub(super) fn $name(
                base: &Base<'_>,
                st: &mut State,
                scale: Llr,
                max_iterations: usize,
            ) -> Option<usize> {
                super::decode_generic(base, st, scale, max_iterations)
            }
        };
    }
    vectorised!(decode_avx512, "avx512f,avx512vl,avx512dq,avx512bw,avx2");
    vectorised!(decode_avx2, "avx2");
}

/// The portable body; inlined into each `#[target_feature]` wrapper so that
/// every copy is vectorised for its CPU.
#[inline(always)]
pub(crate) fn decode_generic(
    base: &Base<'_>,
    st: &mut State,
    scale: Llr,
    max_iterations: usize,
) -> Option<usize> {
    if satisfied(base, st) {
        return Some(0);
    }
    for it in 1..=max_iterations {
        iterate(base, st, scale);
        if satisfied(base, st) {
            return Some(it);
        }
    }
    None
}

/// One iteration: every layer in order.
#[inline(always)]
pub(crate) fn iterate(base: &Base<'_>, st: &mut State, scale: Llr) {
    const Z: usize = LIFT;
    let State {
        post,
        msg,
        syn_sign,
        scratch,
        ..
    } = st;
    for r in 0..base.layers() {
        let edges = base.layer(r);
        let mut min1 = [MIN_START; Z];
        let mut min2 = [MIN_START; Z];
        let mut arg = [0 as Llr; Z];
        let mut sign = [0 as Llr; Z];
        sign.copy_from_slice(&syn_sign[r * Z..(r + 1) * Z]);
        for (k, e) in edges.clone().enumerate() {
            let (c, s) = (base.cols[e] as usize, base.shifts[e] as usize % Z);
            // Lane i meets variable (i + s) mod Z of the block.
            let p: &[Llr; Z] = row_at(post, c * SPAN + Z + s);
            let t: &mut [Llr; Z] = row_mut(scratch, k);
            let m: &[Llr; Z] = row(msg, e);
            let kk = k as Llr;
            for i in 0..Z {
                let x = clamp(p[i].saturating_sub(m[i]));
                t[i] = x;
                let a = x.abs();
                // −1 where x < 0: the product of the signs, as a parity.
                sign[i] ^= x >> 15;
                let hi = if a > min1[i] { a } else { min1[i] };
                min2[i] = if hi < min2[i] { hi } else { min2[i] };
                arg[i] = if a < min1[i] { kk } else { arg[i] };
                min1[i] = if a < min1[i] { a } else { min1[i] };
            }
        }
        for i in 0..Z {
            min1[i] = scaled(min1[i], scale);
            min2[i] = scaled(min2[i], scale);
        }
        for (k, e) in edges.enumerate() {
            let (c, s) = (base.cols[e] as usize, base.shifts[e] as usize % Z);
            let t: &mut [Llr; Z] = row_mut(scratch, k);
            let m: &mut [Llr; Z] = row_mut(msg, e);
            let kk = k as Llr;
            for i in 0..Z {
                // A mask blend, not `if … { min2[i] } else { min1[i] }`:
                // LLVM turns that into a select of two addresses and a
                // 16-lane gather.
                let second = -Llr::from(arg[i] == kk);
                let mag = (min2[i] & second) | (min1[i] & !second);
                // Negate where the other edges' signs multiply to −1.
                let neg = sign[i] ^ (t[i] >> 15);
                let rr = (mag ^ neg) - neg;
                m[i] = rr;
                t[i] = clamp(t[i].saturating_add(rr));
            }
            let at = c * SPAN + s;
            for copy in 0..3 {
                row_at_mut::<Z>(post, at + copy * Z).copy_from_slice(t);
            }
        }
    }
}

/// Keeps a value in `−LLR_MAX..=LLR_MAX` (saturating arithmetic can reach
/// `i16::MIN`, whose magnitude does not fit).
#[inline(always)]
fn clamp(x: Llr) -> Llr {
    if x < -LLR_MAX { -LLR_MAX } else { x }
}

/// `x · scale / 2^15`, rounded (the normalisation of min-sum; `scale` is a
/// Q15 fraction, so the result never exceeds `x`).
#[inline(always)]
fn scaled(x: Llr, scale: Llr) -> Llr {
    ((i32::from(x) * i32::from(scale) + (1 << 14)) >> 15) as Llr
}

/// Whether the hard decisions (sign bits of the posteriors) have the
/// syndrome.
#[inline(always)]
pub(crate) fn satisfied(base: &Base<'_>, st: &mut State) -> bool {
    for (h, block) in st.hard.iter_mut().zip(st.post.chunks_exact(SPAN)) {
        *h = hard_word(&block[LIFT..2 * LIFT]);
    }
    (0..base.layers()).all(|r| layer_syndrome(base, r, &st.hard) == st.syn_words[r])
}

/// Layer `r`'s 64 syndrome bits of a word given as one `u64` per column
/// block: the XOR of its blocks rotated by their shifts.
#[inline(always)]
pub(crate) fn layer_syndrome(base: &Base<'_>, r: usize, word: &[u64]) -> u64 {
    base.layer(r).fold(0, |acc, e| {
        acc ^ word[base.cols[e] as usize].rotate_right(base.shifts[e])
    })
}

/// Bit `i` = sign bit of `block[i]`.
#[inline(always)]
pub(crate) fn hard_word(block: &[Llr]) -> u64 {
    block
        .iter()
        .enumerate()
        .fold(0u64, |w, (i, &x)| w | (u64::from(x < 0) << i))
}

// Every caller indexes whole rows inside its buffer (sized from the base
// matrix in `State::new`), so the conversions to arrays cannot fail.
fn row<const Z: usize>(v: &[Llr], k: usize) -> &[Llr; Z] {
    row_at(v, k * Z)
}

fn row_mut<const Z: usize>(v: &mut [Llr], k: usize) -> &mut [Llr; Z] {
    row_at_mut(v, k * Z)
}

fn row_at<const Z: usize>(v: &[Llr], at: usize) -> &[Llr; Z] {
    (&v[at..at + Z]).try_into().expect("row of Z lanes")
}

fn row_at_mut<const Z: usize>(v: &mut [Llr], at: usize) -> &mut [Llr; Z] {
    (&mut v[at..at + Z]).try_into().expect("row of Z lanes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngExt, SeedableRng};
    use rand_xoshiro::Xoshiro256PlusPlus;

    /// The scalar reference: check by check in row order (`r·Z + i`), each
    /// check over its edges in layer order, messages kept per (entry, lane),
    /// in the same saturating 16-bit arithmetic.
    fn iterate_reference(base: &Base<'_>, st: &mut State, scale: Llr) {
        let z = LIFT;
        for r in 0..base.layers() {
            let edges: Vec<usize> = base.layer(r).collect();
            for i in 0..z {
                let var = |e: usize| base.cols[e] as usize * z + (i + base.shifts[e] as usize) % z;
                let mut neg = st.syn_sign[r * z + i] != 0;
                let (mut min1, mut min2, mut arg) = (MIN_START, MIN_START, 0usize);
                let xs: Vec<Llr> = edges
                    .iter()
                    .enumerate()
                    .map(|(k, &e)| {
                        let x = get(&st.post, var(e))
                            .saturating_sub(st.msg[e * z + i])
                            .max(-LLR_MAX);
                        neg ^= x < 0;
                        let a = x.abs();
                        if a < min1 {
                            min2 = min1;
                            min1 = a;
                            arg = k;
                        } else if a < min2 {
                            min2 = a;
                        }
                        x
                    })
                    .collect();
                for (k, &e) in edges.iter().enumerate() {
                    let m = if k == arg { min2 } else { min1 };
                    let mag = ((i32::from(m) * i32::from(scale) + (1 << 14)) >> 15) as Llr;
                    let r = if neg ^ (xs[k] < 0) { -mag } else { mag };
                    st.msg[e * z + i] = r;
                    set(&mut st.post, var(e), xs[k].saturating_add(r).max(-LLR_MAX));
                }
            }
        }
    }

    /// Variable `v`'s posterior in the four-copy layout.
    fn get(post: &[Llr], v: usize) -> Llr {
        post[v / LIFT * SPAN + LIFT + v % LIFT]
    }
    fn set(post: &mut [Llr], v: usize, x: Llr) {
        for copy in 0..4 {
            post[v / LIFT * SPAN + copy * LIFT + v % LIFT] = x;
        }
    }

    struct OwnedBase {
        start: Vec<u32>,
        cols: Vec<u32>,
        shifts: Vec<u32>,
    }

    impl OwnedBase {
        fn base(&self) -> Base<'_> {
            Base {
                start: &self.start,
                cols: &self.cols,
                shifts: &self.shifts,
            }
        }
    }

    fn random_base(rng: &mut Xoshiro256PlusPlus, nb: usize, mb: usize) -> OwnedBase {
        let (mut start, mut cols, mut shifts) = (vec![0u32], Vec::new(), Vec::new());
        for _ in 0..mb {
            let mut pick: Vec<u32> = (0..nb as u32).collect();
            let d = 2 + (rng.next_u64() % 7) as usize;
            for j in 0..d {
                let k = j + (rng.next_u64() as usize) % (nb - j);
                pick.swap(j, k);
                cols.push(pick[j]);
                shifts.push((rng.next_u64() % LIFT as u64) as u32);
            }
            start.push(cols.len() as u32);
        }
        OwnedBase {
            start,
            cols,
            shifts,
        }
    }

    #[test]
    fn layered_kernel_is_bit_identical_to_the_scalar_schedule() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(11);
        for trial in 0..6 {
            let (nb, mb) = (12 + trial, 5 + trial / 2);
            let owned = random_base(&mut rng, nb, mb);
            let base = owned.base();
            let post: Vec<Llr> = (0..nb * LIFT)
                .map(|_| match rng.next_u64() % 10 {
                    0 => 0,
                    1 => LLR_MAX,
                    2 => -LLR_MAX,
                    _ => (rng.next_u64() % 400) as Llr - 200,
                })
                .collect();
            let syn: Vec<u64> = (0..mb).map(|_| rng.next_u64()).collect();
            let mut fast = State::new(&base, &post, syn.clone());
            let mut slow = State::new(&base, &post, syn);
            for _ in 0..5 {
                iterate(&base, &mut fast, 26214);
                iterate_reference(&base, &mut slow, 26214);
                let flat = |st: &State| st.posteriors().flatten().copied().collect::<Vec<Llr>>();
                assert_eq!(flat(&fast), flat(&slow), "trial {trial}");
                assert_eq!(fast.msg, slow.msg, "trial {trial}");
            }
            // The dispatched (vectorised) copy agrees with the portable one.
            let now: Vec<Llr> = fast.posteriors().flatten().copied().collect();
            let mut a = State::new(&base, &now, fast.syn_words.clone());
            let mut b = State::new(&base, &now, fast.syn_words.clone());
            let ra = decode(&base, &mut a, 26214, 7);
            let rb = decode_generic(&base, &mut b, 26214, 7);
            assert_eq!(ra, rb);
            assert_eq!(a.post, b.post);
        }
    }

    #[test]
    fn syndrome_check_matches_expanded_rows() {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(5);
        let (nb, mb) = (9, 4);
        let owned = random_base(&mut rng, nb, mb);
        let base = owned.base();
        let (cols, shifts) = (&owned.cols, &owned.shifts);
        let post: Vec<Llr> = (0..nb * LIFT)
            .map(|_| if rng.random::<bool>() { -16 } else { 16 })
            .collect();
        // The syndrome of the hard decisions, row by row.
        let syn: Vec<u64> = (0..mb)
            .map(|r| {
                (0..LIFT).fold(0u64, |w, i| {
                    let bit = base.layer(r).fold(false, |a, e| {
                        let v = cols[e] as usize * LIFT + (i + shifts[e] as usize) % LIFT;
                        a ^ (post[v] < 0)
                    });
                    w | (u64::from(bit) << i)
                })
            })
            .collect();
        let mut st = State::new(&base, &post, syn.clone());
        assert!(satisfied(&base, &mut st));
        let mut wrong = syn;
        wrong[2] ^= 1 << 17;
        let mut st = State::new(&base, &post, wrong);
        assert!(!satisfied(&base, &mut st));
    }
}
