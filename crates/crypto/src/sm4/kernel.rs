//! The SM4 block function, in groups of sixteen blocks, in constant time.
//!
//! Why this is written here: the RustCrypto `sm4` crate (the reference our tests
//! compare against) looks its S-box up in a table, one block at a time. That is
//! about 95 MiB/s per core, and a table indexed by secret bytes leaks through the
//! cache. No maintained crate offers a parallel constant-time SM4, so this module
//! has one, built on an algebraic fact: the SM4 S-box is an affine map, an
//! inversion in GF(2^8) and the same affine map again,
//! `S(x) = A·(A·x ⊕ C)^-1 ⊕ C` with `A` the circulant bit matrix of row `0xA7` and
//! `C = 0xD3`, the inversion taken modulo `x^8+x^7+x^6+x^5+x^4+x^2+1` (0x1F5).
//!
//! Two kernels evaluate that with no secret-dependent memory access or branch:
//!
//! * **`avx512-gfni`** (x86-64 with AVX-512F/BW and GFNI, chosen at run time):
//!   sixteen blocks in four 512-bit registers, transposed so each register holds
//!   one 32-bit word of every block. The S-box is two instructions over 64 bytes:
//!   `GF2P8AFFINEQB` (an 8×8 bit matrix and a constant) and `GF2P8AFFINEINVQB`
//!   (inversion in AES's field, then a matrix). SM4's field is mapped into AES's
//!   by the field isomorphism that sends `x` to the root `0x23` of SM4's
//!   polynomial, folded into the two matrices (`GFNI_PRE`, `GFNI_POST` in `consts`; a unit
//!   test rebuilds the S-box from them bit by bit).
//! * **`soft`** (every target): the same sixteen blocks with the S-box bitsliced:
//!   the 64 bytes of a round are turned into eight 64-bit bit planes, the affine
//!   maps become XORs of planes and the inversion is `x^254` by bitsliced
//!   multiplications. Slower (a few tens of MiB/s) but portable and constant-time.
//!
//! Blocks go through in groups of sixteen, up to four groups interleaved per pass
//! (`BATCH`); fewer than sixteen blocks cost the same as sixteen, so callers
//! batch (CTR and GCM generate keystream a pass at a time). Only encryption exists: every
//! mode qkdnet uses (CTR, GCM, the key-ID permutation) needs only the forward
//! function. Round keys are zeroized on drop.

use zeroize::Zeroize;

pub(crate) use super::consts::{BATCH, Block, LANES};
#[cfg(test)]
use super::consts::{GFNI_POST, GFNI_POST_C, GFNI_PRE, GFNI_PRE_C, SM4_AFFINE, SM4_AFFINE_C};

/// The system parameter FK (GB/T 32907 § 7.3).
const FK: [u32; 4] = [0xa3b1_bac6, 0x56aa_3350, 0x677d_9197, 0xb270_22dc];

/// The constant CK_i: byte j of CK_i is (4i + j)·7 mod 256 (GB/T 32907 § 7.3).
const CK: [u32; 32] = {
    let mut ck = [0u32; 32];
    let mut i = 0;
    while i < 32 {
        let mut j = 0;
        while j < 4 {
            ck[i] |= ((((4 * i + j) * 7) % 256) as u32) << (24 - 8 * j);
            j += 1;
        }
        i += 1;
    }
    ck
};

/// Which implementation runs the block function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sm4Kernel {
    /// AVX-512 with GFNI, sixteen blocks in four registers.
    Avx512Gfni,
    /// Portable bitsliced code.
    Soft,
}

impl Sm4Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("gfni")
            {
                return Self::Avx512Gfni;
            }
        }
        Self::Soft
    }

    /// Whether this CPU can run the kernel.
    pub fn available(self) -> bool {
        match self {
            Self::Soft => true,
            Self::Avx512Gfni => Self::detect() == Self::Avx512Gfni,
        }
    }

    /// The name logs and benchmarks show.
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512Gfni => "avx512-gfni",
            Self::Soft => "soft (bitsliced)",
        }
    }
}

/// An expanded SM4 key and the kernel that uses it.
#[derive(Clone)]
pub(crate) struct RoundKeys {
    rk: [u32; 32],
    kernel: Sm4Kernel,
}

impl RoundKeys {
    /// Expands `key` for the fastest kernel available.
    pub(crate) fn new(key: &[u8; 16]) -> Self {
        Self::with_kernel(key, Sm4Kernel::detect())
    }

    /// Expands `key` for `kernel`, falling back to [`Sm4Kernel::Soft`] when the CPU
    /// lacks it (so the choice can never make the code unsound).
    pub(crate) fn with_kernel(key: &[u8; 16], kernel: Sm4Kernel) -> Self {
        let kernel = if kernel.available() {
            kernel
        } else {
            Sm4Kernel::Soft
        };
        let mut k = [0u32; 4];
        for (w, c) in k.iter_mut().zip(key.chunks_exact(4)) {
            *w = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for (w, f) in k.iter_mut().zip(FK) {
            *w ^= f;
        }
        let mut rk = [0u32; 32];
        for (i, ck) in CK.iter().enumerate() {
            let x = k[(i + 1) % 4] ^ k[(i + 2) % 4] ^ k[(i + 3) % 4] ^ ck;
            let b = sbox_word(x);
            k[i % 4] ^= b ^ b.rotate_left(13) ^ b.rotate_left(23);
            rk[i] = k[i % 4];
        }
        k.zeroize();
        Self { rk, kernel }
    }

    /// The kernel these keys run on.
    pub(crate) fn kernel(&self) -> Sm4Kernel {
        self.kernel
    }

    /// Encrypts every block of `blocks` in place (any count). Full passes take
    /// [`BATCH`] blocks; a tail takes the fewest groups of sixteen that cover it.
    pub(crate) fn encrypt_blocks(&self, blocks: &mut [Block]) {
        let mut chunks = blocks.chunks_exact_mut(BATCH);
        for chunk in &mut chunks {
            self.encrypt_groups(chunk);
        }
        let rest = chunks.into_remainder();
        if rest.len() % LANES == 0 {
            if !rest.is_empty() {
                self.encrypt_groups(rest);
            }
        } else {
            let mut tmp = [[0u8; 16]; BATCH];
            let padded = rest.len().next_multiple_of(LANES);
            tmp[..rest.len()].copy_from_slice(rest);
            self.encrypt_groups(&mut tmp[..padded]);
            rest.copy_from_slice(&tmp[..rest.len()]);
            tmp[..padded].as_flattened_mut().zeroize();
        }
    }

    /// `blocks.len()` is a multiple of [`LANES`], at most [`BATCH`].
    fn encrypt_groups(&self, blocks: &mut [Block]) {
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            Sm4Kernel::Avx512Gfni => super::x86::encrypt(&self.rk, blocks),
            _ => {
                for g in blocks.chunks_exact_mut(LANES) {
                    super::soft::encrypt16(&self.rk, g.try_into().expect("16 blocks"));
                }
            }
        }
    }
}

impl Drop for RoundKeys {
    fn drop(&mut self) {
        self.rk.zeroize();
    }
}

/// The S-box on the four bytes of a word, in constant time (key schedule only):
/// GFNI where present, else the bitsliced S-box on a mostly empty batch.
fn sbox_word(x: u32) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(y) = super::x86::sbox_word(x) {
        return y;
    }
    sbox_word_soft(x)
}

fn sbox_word_soft(x: u32) -> u32 {
    let mut bytes = [0u8; 64];
    bytes[..4].copy_from_slice(&x.to_le_bytes());
    super::soft::sbox64(&mut bytes);
    let y = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    bytes.zeroize();
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use sm4::cipher::{BlockCipherEncrypt, KeyInit};

    /// Software model of `GF2P8AFFINEQB`: bit i of the result is the parity of
    /// `x AND byte (7 - i) of m`, XOR bit i of `c`.
    fn affine(m: u64, x: u8, c: u8) -> u8 {
        (0..8).fold(0u8, |y, i| {
            let row = (m >> (8 * (7 - i))) as u8;
            y | ((((row & x).count_ones() & 1) as u8) << i)
        }) ^ c
    }

    fn gmul(mut a: u8, mut b: u8, poly: u16) -> u8 {
        let mut r = 0u8;
        while b != 0 {
            if b & 1 == 1 {
                r ^= a;
            }
            b >>= 1;
            let carry = a & 0x80 != 0;
            a <<= 1;
            if carry {
                a ^= (poly & 0xff) as u8;
            }
        }
        r
    }

    fn ginv(a: u8, poly: u16) -> u8 {
        (0..=255u8).find(|&b| gmul(a, b, poly) == 1).unwrap_or(0)
    }

    /// The S-box from the standard's algebraic form (the tests below also check
    /// whole encryptions against the reference crate's table).
    fn sbox_algebraic(x: u8) -> u8 {
        // Row 0 in the qword's top byte, as `affine` reads it.
        let m = u64::from_be_bytes(SM4_AFFINE);
        affine(m, ginv(affine(m, x, SM4_AFFINE_C), 0x1f5), SM4_AFFINE_C)
    }

    #[test]
    fn gfni_matrices_rebuild_the_sbox_through_aes_field_inversion() {
        for x in 0..=255u8 {
            let y = affine(GFNI_PRE, x, GFNI_PRE_C);
            let z = affine(GFNI_POST, ginv(y, 0x11b), GFNI_POST_C);
            assert_eq!(z, sbox_algebraic(x), "x = {x:#04x}");
        }
    }

    #[test]
    fn bitsliced_sbox_matches_algebraic_form_on_all_bytes() {
        let mut bytes = [0u8; 64];
        for hi in 0..4u8 {
            for (k, b) in bytes.iter_mut().enumerate() {
                *b = hi * 64 + k as u8;
            }
            super::super::soft::sbox64(&mut bytes);
            for (k, &b) in bytes.iter().enumerate() {
                assert_eq!(b, sbox_algebraic(hi * 64 + k as u8));
            }
        }
    }

    #[test]
    fn key_schedule_sbox_paths_agree() {
        for b in 0..=255u32 {
            let x = b | ((255 - b) << 8) | (b.wrapping_mul(37) & 0xff) << 16 | (b ^ 0x5a) << 24;
            let want = u32::from_le_bytes(x.to_le_bytes().map(sbox_algebraic));
            assert_eq!(sbox_word_soft(x), want);
            assert_eq!(sbox_word(x), want);
        }
    }

    #[test]
    fn ck_matches_the_standard_table() {
        assert_eq!(CK[0], 0x0007_0e15);
        assert_eq!(CK[1], 0x1c23_2a31);
        assert_eq!(CK[31], 0x646b_7279);
    }

    fn reference(key: &[u8; 16], block: &Block) -> Block {
        let c = sm4::Sm4::new(key.into());
        let mut b = *block;
        c.encrypt_block((&mut b).into());
        b
    }

    /// Differential test: every kernel against the table-based RustCrypto `sm4`,
    /// for every count of blocks from 0 to 140 (full passes and every tail).
    #[test]
    fn every_kernel_matches_reference_crate() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for kernel in [Sm4Kernel::Soft, Sm4Kernel::Avx512Gfni] {
            if !kernel.available() {
                eprintln!("skipping {} (CPU lacks it)", kernel.name());
                continue;
            }
            for n in 0..=140usize {
                let mut key = [0u8; 16];
                key[..8].copy_from_slice(&next().to_le_bytes());
                key[8..].copy_from_slice(&next().to_le_bytes());
                let rk = RoundKeys::with_kernel(&key, kernel);
                assert_eq!(rk.kernel(), kernel);
                let blocks: Vec<Block> = (0..n)
                    .map(|_| {
                        let mut b = [0u8; 16];
                        b[..8].copy_from_slice(&next().to_le_bytes());
                        b[8..].copy_from_slice(&next().to_le_bytes());
                        b
                    })
                    .collect();
                let want: Vec<Block> = blocks.iter().map(|b| reference(&key, b)).collect();
                let mut got = blocks.clone();
                rk.encrypt_blocks(&mut got);
                assert_eq!(got, want, "{} with {n} blocks", kernel.name());
            }
        }
    }

    #[test]
    fn gbt32907_example_1_on_every_kernel() {
        let key = *b"\x01\x23\x45\x67\x89\xab\xcd\xef\xfe\xdc\xba\x98\x76\x54\x32\x10";
        for kernel in [Sm4Kernel::Soft, Sm4Kernel::Avx512Gfni] {
            let rk = RoundKeys::with_kernel(&key, kernel);
            let mut b = [key];
            rk.encrypt_blocks(&mut b);
            assert_eq!(
                b[0],
                *b"\x68\x1e\xdf\x34\xd2\x06\x96\x5e\x86\xb3\xe9\x4f\x53\x6e\x42\x46"
            );
        }
    }
}
