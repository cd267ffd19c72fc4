//! Bit gather, `out[j] = key[idx[j]]` on packed bits: how Cascade sees a key
//! through a pass's permutation.
//!
//! Every shuffled pass of Cascade reads the whole key in a random order, one
//! bit at a time; done word by word in portable code that is about four
//! cycles a bit, a fifth of a frame's time. AVX-512F has a 16-lane gather and
//! per-lane shifts, so sixteen bits cost a few instructions. The intrinsics
//! are `unsafe` (they read memory at computed addresses and must only run on
//! CPUs that have them), so they live in this one module, behind a runtime
//! check, with every index clamped into the key before it is used as an
//! address. The portable loop is the fallback and the reference the fast path
//! is tested against. No crate does this: bit-permutation crates work within
//! a word, not across a long array.
#![allow(
    unsafe_code,
    reason = "AVX-512 gather intrinsics; each site has a SAFETY comment"
)]

/// Gathers bits: bit `j` of the result (LSB-first words, `idx.len()` bits,
/// the last word's unused bits zero) is bit `idx[j]` of `key`. Every index
/// must be below `64 · key.len()`; an index past that gives an unspecified
/// bit (never an out-of-bounds read).
pub(crate) fn gather_bits(key: &[u64], idx: &[u32]) -> Vec<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        if !key.is_empty() && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F was detected at run time just above; the
            // callee's memory accesses are justified at their sites.
            return unsafe { x86::gather_512(key, idx) };
        }
    }
    gather_portable(key, idx)
}

/// The portable reference: one bit at a time.
pub(crate) fn gather_portable(key: &[u64], idx: &[u32]) -> Vec<u64> {
    idx.chunks(64)
        .map(|chunk| {
            chunk.iter().enumerate().fold(0u64, |w, (k, &o)| {
                let bit = key
                    .get(o as usize / 64)
                    .map_or(0, |word| (word >> (o % 64)) & 1);
                w | (bit << k)
            })
        })
        .collect()
}

/// Bit compaction: the bits of `src` at the positions set in `keep`, in
/// order, packed LSB-first (`keep`'s popcount bits; the last word's unused
/// bits zero). `src` must have at least as many words as `keep`. This is
/// how a Cascade pass drops the values of its `2^k`-element shuffle that lie
/// beyond the frame. BMI2's `pext` does a word in one instruction; the
/// portable loop walks the set bits.
pub(crate) fn compact_bits(src: &[u64], keep: &[u64]) -> Vec<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("bmi2") {
            // SAFETY: BMI2 was detected at run time just above; the callee
            // only indexes slices (bounds-checked).
            return unsafe { x86::compact_bmi2(src, keep) };
        }
    }
    compact_with(src, keep, pext_portable)
}

/// The portable `pext`: the bits of `x` under `mask`, packed low.
fn pext_portable(x: u64, mut mask: u64) -> u64 {
    let (mut out, mut k) = (0u64, 0);
    while mask != 0 {
        let i = mask.trailing_zeros();
        out |= ((x >> i) & 1) << k;
        k += 1;
        mask &= mask - 1;
    }
    out
}

/// [`compact_bits`] with a given word-level `pext`.
#[inline(always)]
fn compact_with(src: &[u64], keep: &[u64], pext: impl Fn(u64, u64) -> u64) -> Vec<u64> {
    let total: usize = keep.iter().map(|w| w.count_ones() as usize).sum();
    let mut out = vec![0u64; total.div_ceil(64) + 1];
    let mut at = 0usize;
    for (&x, &m) in src.iter().zip(keep) {
        let bits = pext(x, m);
        let (w, s) = (at / 64, at % 64);
        out[w] |= bits << s;
        if s != 0 {
            out[w + 1] |= bits >> (64 - s);
        }
        at += m.count_ones() as usize;
    }
    out.truncate(total.div_ceil(64));
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::{
        _mm512_and_si512, _mm512_i32gather_epi32, _mm512_loadu_si512, _mm512_min_epu32,
        _mm512_set1_epi32, _mm512_srli_epi32, _mm512_srlv_epi32, _mm512_test_epi32_mask,
    };

    /// [`super::compact_bits`] with the `pext` instruction.
    #[target_feature(enable = "bmi2")]
    pub(super) fn compact_bmi2(src: &[u64], keep: &[u64]) -> Vec<u64> {
        super::compact_with(src, keep, |x, m| core::arch::x86_64::_pext_u64(x, m))
    }

    /// [`super::gather_bits`] sixteen bits at a time: each lane loads the
    /// 32-bit word holding its bit, shifts it down and tests bit 0.
    #[target_feature(enable = "avx512f")]
    pub(super) fn gather_512(key: &[u64], idx: &[u32]) -> Vec<u64> {
        // Largest valid bit index, as u32 (keys beyond 2^32 bits are capped,
        // which only matters for indices that could not address them anyway).
        let max_bit = (key.len() * 64 - 1).min(u32::MAX as usize) as u32;
        let lim = _mm512_set1_epi32(max_bit as i32);
        let low5 = _mm512_set1_epi32(31);
        let one = _mm512_set1_epi32(1);
        let base = key.as_ptr().cast::<i32>();
        let mut out = Vec::with_capacity(idx.len().div_ceil(64));
        let mut chunks = idx.chunks_exact(64);
        for c in &mut chunks {
            let mut w = 0u64;
            for q in 0..4 {
                // SAFETY: `c` has 64 u32s, so lanes 16q..16q+16 are in bounds;
                // the load is unaligned.
                let v = unsafe { _mm512_loadu_si512(c.as_ptr().add(16 * q).cast()) };
                let v = _mm512_min_epu32(v, lim);
                // SAFETY: after the clamp every lane is at most `max_bit` <
                // 64·key.len(), so the 32-bit word it names (`v >> 5`, scale
                // 4 bytes) lies inside `key` (x86 is little-endian, so bit
                // `o` of the u64 array is bit `o % 32` of that u32 word).
                let words = unsafe { _mm512_i32gather_epi32::<4>(_mm512_srli_epi32::<5>(v), base) };
                let bits = _mm512_srlv_epi32(words, _mm512_and_si512(v, low5));
                w |= u64::from(_mm512_test_epi32_mask(bits, one)) << (16 * q);
            }
            out.push(w);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            out.extend(super::gather_portable(key, rest));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_xoshiro::Xoshiro256PlusPlus;

    #[test]
    fn portable_matches_bit_by_bit_definition() {
        let key = [0b1011u64, 1 << 63];
        let idx = [0u32, 1, 2, 3, 127, 64, 126];
        assert_eq!(gather_portable(&key, &idx), vec![0b1011 | (1 << 4)]);
    }

    #[test]
    fn fast_path_matches_portable_on_random_inputs() {
        let mut r = Xoshiro256PlusPlus::seed_from_u64(7);
        for len_bits in [1usize, 63, 64, 65, 1000, 4096, 100_003] {
            let key: Vec<u64> = (0..len_bits.div_ceil(64)).map(|_| r.next_u64()).collect();
            for n_idx in [0usize, 1, 15, 16, 64, 65, 1000, len_bits] {
                let idx: Vec<u32> = (0..n_idx)
                    .map(|_| (r.next_u64() % len_bits as u64) as u32)
                    .collect();
                assert_eq!(
                    gather_bits(&key, &idx),
                    gather_portable(&key, &idx),
                    "{len_bits} bits, {n_idx} indices"
                );
            }
        }
    }

    #[test]
    fn compaction_matches_bit_by_bit_definition() {
        let mut r = Xoshiro256PlusPlus::seed_from_u64(8);
        for words in [0usize, 1, 2, 3, 17, 1000] {
            let src: Vec<u64> = (0..words).map(|_| r.next_u64()).collect();
            for density in [0u64, 1, 2, 3] {
                // density 0: empty masks; 3: full words; else random.
                let keep: Vec<u64> = (0..words)
                    .map(|_| match density {
                        0 => 0,
                        3 => u64::MAX,
                        1 => r.next_u64() & r.next_u64(),
                        _ => r.next_u64() | r.next_u64(),
                    })
                    .collect();
                let mut expect = Vec::new();
                for i in 0..words * 64 {
                    if (keep[i / 64] >> (i % 64)) & 1 == 1 {
                        expect.push((src[i / 64] >> (i % 64)) & 1 == 1);
                    }
                }
                let mut want = vec![0u64; expect.len().div_ceil(64)];
                for (j, &b) in expect.iter().enumerate() {
                    want[j / 64] |= u64::from(b) << (j % 64);
                }
                assert_eq!(compact_bits(&src, &keep), want, "{words} words");
                assert_eq!(compact_with(&src, &keep, pext_portable), want);
            }
        }
    }

    #[test]
    fn out_of_range_indices_do_not_read_out_of_bounds() {
        let key = [u64::MAX; 2];
        let idx = vec![u32::MAX; 128];
        // Unspecified bits, but no fault and the right length.
        assert_eq!(gather_bits(&key, &idx).len(), 2);
    }
}
