//! Constants and types the SM4 kernels share (a leaf module: the kernels and
//! the dispatcher import it, it imports nothing).

/// Blocks in one group of a kernel (one 32-bit word of each in a 512-bit register).
pub(crate) const LANES: usize = 16;
/// Blocks per full pass: four groups, interleaved (measured: four groups run
/// long messages 25 % faster than two; a short tail runs fewer, see
/// `encrypt_blocks`).
pub(crate) const BATCH: usize = 4 * LANES;

/// One SM4 block.
pub(crate) type Block = [u8; 16];

/// Rows of SM4's affine matrix `A`: output bit `i` is the parity of `x & A[i]`.
pub(crate) const SM4_AFFINE: [u8; 8] = [0xa7, 0x4f, 0x9e, 0x3d, 0x7a, 0xf4, 0xe9, 0xd3];
/// SM4's affine constant `C`.
pub(crate) const SM4_AFFINE_C: u8 = 0xd3;

/// `GF2P8AFFINEQB` matrix applied before inversion: `φ·A`, with `φ` the isomorphism
/// from SM4's field into AES's. Byte `7 - i` of the qword is row `i`.
pub(crate) const GFNI_PRE: u64 = 0x4c28_7db9_1a22_505d;
/// Constant of the pre-inversion map: `φ(C)`.
pub(crate) const GFNI_PRE_C: u8 = 0x3e;
/// `GF2P8AFFINEINVQB` matrix applied after AES-field inversion: `A·φ^-1`.
pub(crate) const GFNI_POST: u64 = 0xf3ab_34a9_74a6_b589;
/// Constant of the post-inversion map: `C`.
pub(crate) const GFNI_POST_C: u8 = SM4_AFFINE_C;
