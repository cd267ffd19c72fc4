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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::{
        _mm512_and_si512, _mm512_i32gather_epi32, _mm512_loadu_si512, _mm512_min_epu32,
        _mm512_set1_epi32, _mm512_srli_epi32, _mm512_srlv_epi32, _mm512_test_epi32_mask,
    };

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
    fn out_of_range_indices_do_not_read_out_of_bounds() {
        let key = [u64::MAX; 2];
        let idx = vec![u32::MAX; 128];
        // Unspecified bits, but no fault and the right length.
        assert_eq!(gather_bits(&key, &idx).len(), 2);
    }
}
