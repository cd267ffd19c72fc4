//! The AVX-512 + GFNI SM4 kernel (see [`super::kernel`] for the algebra).
//!
//! The intrinsics that touch memory are `unsafe`, and the function may only run
//! on a CPU that has the features, so it lives in this module behind the run-time
//! check in `RoundKeys::with_kernel`.
#![allow(
    unsafe_code,
    reason = "AVX-512/GFNI intrinsics; each site has a SAFETY comment"
)]

use core::arch::x86_64::{
    __m512i, _mm_cvtsi32_si128, _mm_cvtsi128_si32, _mm_gf2p8affine_epi64_epi8,
    _mm_gf2p8affineinv_epi64_epi8, _mm_set1_epi64x, _mm512_gf2p8affine_epi64_epi8,
    _mm512_gf2p8affineinv_epi64_epi8, _mm512_loadu_si512, _mm512_rol_epi32, _mm512_set_epi8,
    _mm512_set1_epi32, _mm512_set1_epi64, _mm512_setzero_si512, _mm512_shuffle_epi8,
    _mm512_storeu_si512, _mm512_ternarylogic_epi32, _mm512_unpackhi_epi32, _mm512_unpackhi_epi64,
    _mm512_unpacklo_epi32, _mm512_unpacklo_epi64, _mm512_xor_si512,
};

use super::consts::{BATCH, Block, GFNI_POST, GFNI_POST_C, GFNI_PRE, GFNI_PRE_C, LANES};

/// Byte order swap within each 32-bit word (the standard's words are big-endian).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn bswap32(x: __m512i) -> __m512i {
    #[rustfmt::skip]
    let m = _mm512_set_epi8(
        12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3,
        12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3,
        12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3,
        12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3,
    );
    _mm512_shuffle_epi8(x, m)
}

/// 4×4 transpose of 32-bit words inside each 128-bit lane of four registers.
/// Its own inverse.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose(a: __m512i, b: __m512i, c: __m512i, d: __m512i) -> [__m512i; 4] {
    let t0 = _mm512_unpacklo_epi32(a, b);
    let t1 = _mm512_unpacklo_epi32(c, d);
    let t2 = _mm512_unpackhi_epi32(a, b);
    let t3 = _mm512_unpackhi_epi32(c, d);
    [
        _mm512_unpacklo_epi64(t0, t1),
        _mm512_unpackhi_epi64(t0, t1),
        _mm512_unpacklo_epi64(t2, t3),
        _mm512_unpackhi_epi64(t2, t3),
    ]
}

/// One round on sixteen blocks: `x0 ^= L(S(x1 ^ x2 ^ x3 ^ rk))`.
#[inline]
#[target_feature(enable = "avx512f,gfni")]
fn round(x0: __m512i, x1: __m512i, x2: __m512i, x3: __m512i, rk: u32) -> __m512i {
    let pre = _mm512_set1_epi64(GFNI_PRE as i64);
    let post = _mm512_set1_epi64(GFNI_POST as i64);
    // 0x96: three-way XOR.
    let t = _mm512_ternarylogic_epi32::<0x96>(x1, x2, x3);
    let t = _mm512_xor_si512(t, _mm512_set1_epi32(rk as i32));
    let t = _mm512_gf2p8affine_epi64_epi8::<{ GFNI_PRE_C as i32 }>(t, pre);
    let t = _mm512_gf2p8affineinv_epi64_epi8::<{ GFNI_POST_C as i32 }>(t, post);
    let u =
        _mm512_ternarylogic_epi32::<0x96>(t, _mm512_rol_epi32::<2>(t), _mm512_rol_epi32::<10>(t));
    let v =
        _mm512_ternarylogic_epi32::<0x96>(u, _mm512_rol_epi32::<18>(t), _mm512_rol_epi32::<24>(t));
    _mm512_xor_si512(x0, v)
}

/// Whether the CPU has what [`encrypt`] uses (a cached load).
fn has_avx512_gfni() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("gfni")
}

/// Encrypts whole groups of sixteen blocks in place (`blocks.len()` a multiple
/// of 16, at most [`BATCH`]) with AVX-512 + GFNI when the CPU has them (the
/// portable kernel otherwise). The groups' rounds interleave, so one group's
/// instructions fill another's latency: a round is a chain of dependent
/// instructions, two of them five cycles long.
pub(super) fn encrypt(rk: &[u32; 32], blocks: &mut [Block]) {
    let groups = blocks.len() / LANES;
    assert!(
        blocks.len() % LANES == 0 && groups <= BATCH / LANES,
        "whole groups of 16 blocks, at most {BATCH}"
    );
    if !has_avx512_gfni() {
        for g in blocks.chunks_exact_mut(LANES) {
            super::soft::encrypt16(rk, g.try_into().expect("16 blocks"));
        }
        return;
    }
    let p = blocks.as_mut_ptr().cast::<u8>();
    // SAFETY: the features were detected just above; `p` addresses the
    // `256 * groups` bytes of `blocks`, borrowed mutably for the whole call.
    unsafe {
        match groups {
            1 => encrypt_groups::<1>(rk, p),
            2 => encrypt_groups::<2>(rk, p),
            3 => encrypt_groups::<3>(rk, p),
            4 => encrypt_groups::<4>(rk, p),
            _ => {}
        }
    }
}

/// The S-box on the four bytes of a word with GFNI (key schedule), if the CPU
/// has it.
pub(super) fn sbox_word(x: u32) -> Option<u32> {
    if std::arch::is_x86_feature_detected!("gfni") {
        // SAFETY: GFNI was detected just above (SSE2 is baseline on x86-64).
        Some(unsafe { sbox_word_gfni(x) })
    } else {
        None
    }
}

#[target_feature(enable = "gfni")]
fn sbox_word_gfni(x: u32) -> u32 {
    let v = _mm_cvtsi32_si128(x as i32);
    let v =
        _mm_gf2p8affine_epi64_epi8::<{ GFNI_PRE_C as i32 }>(v, _mm_set1_epi64x(GFNI_PRE as i64));
    let v = _mm_gf2p8affineinv_epi64_epi8::<{ GFNI_POST_C as i32 }>(
        v,
        _mm_set1_epi64x(GFNI_POST as i64),
    );
    _mm_cvtsi128_si32(v) as u32
}

/// Encrypts `G` groups of sixteen blocks at `p` in place.
///
/// # Safety
/// The CPU must support AVX-512F, AVX-512BW and GFNI, and `p` must be valid for
/// reads and writes of `256 * G` bytes.
#[target_feature(enable = "avx512f,avx512bw,gfni")]
unsafe fn encrypt_groups<const G: usize>(rk: &[u32; 32], p: *mut u8) {
    let mut x = [[_mm512_setzero_si512(); 4]; G];
    for (g, xs) in x.iter_mut().enumerate() {
        let q = 256 * g;
        // SAFETY: group g's 256 bytes lie within the `256 * G` the caller vouched
        // for; the loads are unaligned.
        let r = unsafe {
            [
                _mm512_loadu_si512(p.add(q).cast()),
                _mm512_loadu_si512(p.add(q + 64).cast()),
                _mm512_loadu_si512(p.add(q + 128).cast()),
                _mm512_loadu_si512(p.add(q + 192).cast()),
            ]
        };
        *xs = transpose(bswap32(r[0]), bswap32(r[1]), bswap32(r[2]), bswap32(r[3]));
    }
    for k in rk.chunks_exact(4) {
        for (i, &ki) in k.iter().enumerate() {
            for xs in x.iter_mut() {
                xs[i] = round(xs[i], xs[(i + 1) % 4], xs[(i + 2) % 4], xs[(i + 3) % 4], ki);
            }
        }
    }
    for (g, xs) in x.iter().enumerate() {
        let y = transpose(xs[3], xs[2], xs[1], xs[0]);
        let q = 256 * g;
        // SAFETY: as for the loads.
        unsafe {
            _mm512_storeu_si512(p.add(q).cast(), bswap32(y[0]));
            _mm512_storeu_si512(p.add(q + 64).cast(), bswap32(y[1]));
            _mm512_storeu_si512(p.add(q + 128).cast(), bswap32(y[2]));
            _mm512_storeu_si512(p.add(q + 192).cast(), bswap32(y[3]));
        }
    }
}
