//! QKD post-processing kernels: reconciliation, verification, privacy
//! amplification and Wegman–Carter authentication, on packed bits.
//!
//! Pure numerics: no I/O, no clock, no async, no unseeded randomness. The
//! protocol state machines that drive these kernels between Alice and Bob
//! live in the `link` layer; the one interactive kernel here (Cascade) is
//! therefore itself a sans-IO state machine that emits batched requests and
//! consumes replies, and randomness always comes in as an argument or a seed.
//!
//! Map of the crate, in the order a key block meets it:
//!
//! * [`bits`] — [`bits::BitVec`], the packed LSB-first bit vector every other
//!   module works on.
//! * [`cascade`] — Cascade reconciliation (Bob's state machine, Alice's pure
//!   answering function, schedules, exact leakage). The binary entropy and the
//!   efficiency f that reconciliation is measured by come from
//!   `qkdnet_optics::entropy`, the one definition the workspace has.
//! * [`ldpc`] — one-message, rate-adaptive LDPC syndrome reconciliation.
//! * [`verify`] — universal-hash comparison bounding ε_cor.
//! * [`pa`] — Toeplitz privacy amplification as a carry-less product;
//!   [`gf2x`] — the additive-FFT GF(2)\[x\] multiplication it uses for
//!   large blocks.
//! * [`auth`] — Wegman–Carter tags (GF(2^128) polynomial hash + one-time pad)
//!   for every classical message.
//!
//! `unsafe` is confined to three private modules: `clmul` (carry-less
//! multiply intrinsics behind runtime-detected proof tokens), `gather` (the
//! AVX-512 bit gather behind Cascade's permutations) and `layered` (the LDPC
//! decoder's one call into its copy compiled for AVX-512 or AVX2, after
//! runtime detection); everything else is safe.

pub mod auth;
pub mod bits;
pub mod cascade;
mod clmul;
mod gather;
pub mod gf2x;
mod layered;
pub mod ldpc;
pub mod pa;
pub mod verify;
