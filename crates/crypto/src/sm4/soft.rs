//! The portable SM4 kernel: sixteen blocks per call with a bitsliced S-box.
//!
//! Each round's 64 S-box inputs (one 32-bit word of each of sixteen blocks) are
//! turned into eight bit planes (`plane[b]` bit `k` = bit `b` of byte `k`). In that
//! form SM4's affine map is XORs of planes chosen by public constants, and the
//! inversion in GF(2^8) mod 0x1F5 is `x^254`: seven squarings (linear) and four
//! multiplications (64 ANDs and a reduction each). Every byte goes through the same
//! operations, so time and memory access do not depend on the data.

use zeroize::Zeroize;

use super::consts::{Block, LANES, SM4_AFFINE, SM4_AFFINE_C};

type Planes = [u64; 8];

/// Transposes an 8×8 bit matrix held in a u64 (bit `8r + c` ↔ bit `8c + r`).
fn transpose8(mut x: u64) -> u64 {
    let t = (x ^ (x >> 7)) & 0x00aa_00aa_00aa_00aa;
    x ^= t ^ (t << 7);
    let t = (x ^ (x >> 14)) & 0x0000_cccc_0000_cccc;
    x ^= t ^ (t << 14);
    let t = (x ^ (x >> 28)) & 0x0000_0000_f0f0_f0f0;
    x ^= t ^ (t << 28);
    x
}

fn to_planes(bytes: &[u8; 64]) -> Planes {
    let mut p = [0u64; 8];
    for (g, chunk) in bytes.chunks_exact(8).enumerate() {
        let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        let t = transpose8(w);
        for (b, plane) in p.iter_mut().enumerate() {
            *plane |= ((t >> (8 * b)) & 0xff) << (8 * g);
        }
    }
    p
}

fn from_planes(p: &Planes, bytes: &mut [u8; 64]) {
    for (g, chunk) in bytes.chunks_exact_mut(8).enumerate() {
        let mut t = 0u64;
        for (b, plane) in p.iter().enumerate() {
            t |= ((plane >> (8 * g)) & 0xff) << (8 * b);
        }
        chunk.copy_from_slice(&transpose8(t).to_le_bytes());
    }
}

/// `A·x ⊕ C` on planes. The loops run over the public matrix, not over data.
fn affine(x: &Planes) -> Planes {
    let mut y = [0u64; 8];
    for (i, out) in y.iter_mut().enumerate() {
        for (j, plane) in x.iter().enumerate() {
            if (SM4_AFFINE[i] >> j) & 1 == 1 {
                *out ^= plane;
            }
        }
        if (SM4_AFFINE_C >> i) & 1 == 1 {
            *out = !*out;
        }
    }
    y
}

/// Reduces a product of degree ≤ 14 modulo x^8 = x^7+x^6+x^5+x^4+x^2+1.
fn reduce(mut p: [u64; 15]) -> Planes {
    for k in (8..15).rev() {
        let hi = p[k];
        for t in [0, 2, 4, 5, 6, 7] {
            p[k - 8 + t] ^= hi;
        }
    }
    let mut out = [0u64; 8];
    out.copy_from_slice(&p[..8]);
    p.zeroize();
    out
}

fn mul(a: &Planes, b: &Planes) -> Planes {
    let mut p = [0u64; 15];
    for (i, ai) in a.iter().enumerate() {
        for (j, bj) in b.iter().enumerate() {
            p[i + j] ^= ai & bj;
        }
    }
    reduce(p)
}

fn square(a: &Planes) -> Planes {
    let mut p = [0u64; 15];
    for (i, ai) in a.iter().enumerate() {
        p[2 * i] = *ai;
    }
    reduce(p)
}

/// `x^254` (the inverse, with 0 ↦ 0).
fn invert(x: &Planes) -> Planes {
    let x2 = square(x);
    let x3 = mul(&x2, x);
    let x12 = square(&square(&x3));
    let x15 = mul(&x12, &x3);
    let x240 = square(&square(&square(&square(&x15))));
    let x252 = mul(&x240, &x12);
    mul(&x252, &x2)
}

/// The SM4 S-box on 64 bytes in place.
pub(crate) fn sbox64(bytes: &mut [u8; 64]) {
    let mut p = to_planes(bytes);
    let mut q = affine(&p);
    let mut r = invert(&q);
    let mut s = affine(&r);
    from_planes(&s, bytes);
    for v in [&mut p, &mut q, &mut r, &mut s] {
        v.zeroize();
    }
}

/// SM4's linear map L.
fn l(b: u32) -> u32 {
    b ^ b.rotate_left(2) ^ b.rotate_left(10) ^ b.rotate_left(18) ^ b.rotate_left(24)
}

/// Encrypts sixteen blocks in place.
pub(crate) fn encrypt16(rk: &[u32; 32], blocks: &mut [Block; LANES]) {
    // x[j][n]: word j of block n.
    let mut x = [[0u32; LANES]; 4];
    for (n, b) in blocks.iter().enumerate() {
        for (j, w) in x.iter_mut().enumerate() {
            w[n] = u32::from_be_bytes([b[4 * j], b[4 * j + 1], b[4 * j + 2], b[4 * j + 3]]);
        }
    }
    let mut bytes = [0u8; 64];
    for (i, &k) in rk.iter().enumerate() {
        for n in 0..LANES {
            let t = x[(i + 1) % 4][n] ^ x[(i + 2) % 4][n] ^ x[(i + 3) % 4][n] ^ k;
            bytes[4 * n..4 * n + 4].copy_from_slice(&t.to_le_bytes());
        }
        sbox64(&mut bytes);
        for n in 0..LANES {
            let c = &bytes[4 * n..4 * n + 4];
            x[i % 4][n] ^= l(u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        }
    }
    for (n, b) in blocks.iter_mut().enumerate() {
        for j in 0..4 {
            b[4 * j..4 * j + 4].copy_from_slice(&x[3 - j][n].to_be_bytes());
        }
    }
    bytes.zeroize();
    x.zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose8_is_the_bit_transpose() {
        let x = 0x0123_4567_89ab_cdefu64;
        let t = transpose8(x);
        for r in 0..8 {
            for c in 0..8 {
                assert_eq!((x >> (8 * r + c)) & 1, (t >> (8 * c + r)) & 1);
            }
        }
        assert_eq!(transpose8(t), x);
    }

    #[test]
    fn planes_round_trip() {
        let mut bytes = [0u8; 64];
        for (k, b) in bytes.iter_mut().enumerate() {
            *b = (k as u8).wrapping_mul(37) ^ 0x5a;
        }
        let p = to_planes(&bytes);
        for (k, &b) in bytes.iter().enumerate() {
            for (bit, plane) in p.iter().enumerate() {
                assert_eq!(u64::from((b >> bit) & 1), (plane >> k) & 1);
            }
        }
        let mut back = [0u8; 64];
        from_planes(&p, &mut back);
        assert_eq!(back, bytes);
    }
}
