//! National commercial cryptography (SM2/SM3/SM4), KDFs, the QKD + ML-KEM hybrid
//! combiner and secret types for qkdnet's service layer.
//!
//! This crate is where keys from the KME become traffic protection, so it is shaped
//! to make the safe path the short one. Secrets are types ([`secret`]) that zeroize,
//! refuse to print and compare in constant time. Each primitive sits in its own
//! module behind a small typed API over audited RustCrypto implementations
//! (`sm2`, `sm3`, `ghash`, `hmac`, `ml-kem`), with one exception: the SM4 block
//! function is qkdnet's own constant-time kernel (AVX-512 + GFNI, or bitsliced;
//! see [`sm4`] for why), differential-tested against RustCrypto's `sm4` and
//! `aes-gcm`. Hot paths (SM4-CTR, SM4-GCM, chunked sealing) work in place on
//! caller-owned buffers. Nothing here does I/O; errors are one typed
//! enum ([`CryptoError`]) that separates caller misuse from bad data.
//!
//! | module | what |
//! |---|---|
//! | [`sm3`] | SM3 hash, HMAC-SM3 |
//! | [`kdf`] | GB/T 32918 KDF, HKDF-SM3 |
//! | [`sm4`] | SM4 block (constant-time kernels), SM4-CTR |
//! | [`gcm`] | SM4-GCM (RFC 8998), one-shot and streaming |
//! | [`chunked`] | STREAM-style chunked SM4-GCM for large files |
//! | [`sm2`] | SM2 signatures with distinguishing ID |
//! | [`otp`] | one-time pad for key relay |
//! | [`replay`] | anti-replay window for sequence-numbered packets |
//! | [`hybrid`] | ML-KEM-768 and the QKD + ML-KEM combiner |

#![warn(missing_docs)]

pub mod chunked;
pub mod error;
pub mod gcm;
pub mod hybrid;
pub mod kdf;
pub mod otp;
pub mod replay;
pub mod secret;
pub mod sm2;
pub mod sm3;
pub mod sm4;

pub use error::{CryptoError, Result};
pub use secret::{SecretBytes, SecretKey, SharedSecret, Sm4Key};
