//! Secret types: key material that cleans up after itself.
//!
//! Every key in qkdnet (QKD key blocks, SM4 keys, KEM shared secrets, derived keys)
//! travels in one of two newtypes so that three rules hold by construction rather
//! than by review: the bytes are zeroized when the value is dropped, they cannot be
//! printed by accident (`Debug` is redacted and there is no `Display`), and equality
//! is decided in constant time with `subtle`. Access to the bytes is explicit
//! (`expose_secret`), which makes every place that touches raw key material easy to
//! find with grep. Cloning is allowed but explicit (`Clone`), since a relay or a
//! combiner sometimes genuinely needs two copies.

use core::fmt;

use subtle::{Choice, ConstantTimeEq};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{CryptoError, Result};

/// A fixed-size secret of `N` bytes, zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretKey<const N: usize>([u8; N]);

/// An SM4 key (128 bits).
pub type Sm4Key = SecretKey<16>;

/// A 256-bit shared secret or derived key (ML-KEM shared secret, HKDF output).
pub type SharedSecret = SecretKey<32>;

impl<const N: usize> SecretKey<N> {
    /// Length in bytes.
    pub const LEN: usize = N;

    /// Wraps an array. The caller's copy is *not* zeroized (it was moved in by value;
    /// the compiler may leave copies): prefer [`SecretKey::from_slice`] on a buffer
    /// you then zeroize, or construct keys inside this crate.
    pub fn new(bytes: [u8; N]) -> Self {
        Self(bytes)
    }

    /// Copies from a slice, checking the length.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; N] = bytes.try_into().map_err(|_| CryptoError::InvalidLength {
            what: "secret key",
            expected: N,
            got: bytes.len(),
        })?;
        Ok(Self(arr))
    }

    /// The raw bytes. Named so that every use is easy to find and review.
    pub fn expose_secret(&self) -> &[u8; N] {
        &self.0
    }

    /// Mutable access, for filling a key in place (e.g. from a KDF).
    pub(crate) fn expose_secret_mut(&mut self) -> &mut [u8; N] {
        &mut self.0
    }

    /// An all-zero key, to be filled in place by this crate.
    pub(crate) fn zeroed() -> Self {
        Self([0u8; N])
    }
}

impl<const N: usize> ConstantTimeEq for SecretKey<N> {
    fn ct_eq(&self, other: &Self) -> Choice {
        self.0.ct_eq(&other.0)
    }
}

impl<const N: usize> PartialEq for SecretKey<N> {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl<const N: usize> Eq for SecretKey<N> {}

impl<const N: usize> fmt::Debug for SecretKey<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey<{N}>([REDACTED])")
    }
}

/// A variable-length secret (a QKD key block, a one-time pad, KDF output), zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// Takes ownership of a vector; no copy is made, so no unzeroized copy is left behind.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// Copies from a slice.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }

    /// `len` zero bytes, to be filled in place.
    pub fn zeroed(len: usize) -> Self {
        Self(vec![0u8; len])
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The raw bytes. Named so that every use is easy to find and review.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    /// Mutable access to the bytes (length is fixed).
    pub fn expose_secret_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }

    /// Splits off the first `n` bytes as a new secret, keeping the rest in `self`
    /// (how a pool hands out one-time pads of the right length). Errors if `n > len`.
    pub fn take_prefix(&mut self, n: usize) -> Result<SecretBytes> {
        if n > self.0.len() {
            return Err(CryptoError::InvalidLength {
                what: "secret prefix",
                expected: n,
                got: self.0.len(),
            });
        }
        let rest = self.0.split_off(n);
        // `split_off` moved the tail into a new allocation; the old one now holds
        // exactly the prefix, which we hand out. No bytes are left unzeroized.
        let prefix = core::mem::replace(&mut self.0, rest);
        Ok(SecretBytes(prefix))
    }
}

impl<const N: usize> TryFrom<&SecretBytes> for SecretKey<N> {
    type Error = CryptoError;
    fn try_from(value: &SecretBytes) -> Result<Self> {
        SecretKey::from_slice(value.expose_secret())
    }
}

impl ConstantTimeEq for SecretBytes {
    /// Constant time in the contents; the lengths (public) are compared first.
    fn ct_eq(&self, other: &Self) -> Choice {
        self.0.as_slice().ct_eq(other.0.as_slice())
    }
}

impl PartialEq for SecretBytes {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for SecretBytes {}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(len={}, [REDACTED])", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let k = SecretKey::new([0xABu8; 16]);
        let s = format!("{k:?}");
        assert!(!s.to_lowercase().contains("ab"), "{s}");
        assert!(s.contains("REDACTED"));
        let b = SecretBytes::from_slice(&[0xCD; 5]);
        let s = format!("{b:?}");
        assert!(!s.to_lowercase().contains("cd"), "{s}");
        assert!(s.contains("len=5"));
    }

    #[test]
    fn equality_is_by_content() {
        assert_eq!(SecretKey::new([1u8; 4]), SecretKey::new([1u8; 4]));
        assert_ne!(SecretKey::new([1u8; 4]), SecretKey::new([1, 1, 1, 2]));
        assert_ne!(
            SecretBytes::from_slice(&[1, 2]),
            SecretBytes::from_slice(&[1, 2, 3])
        );
    }

    #[test]
    fn from_slice_checks_length() {
        assert!(Sm4Key::from_slice(&[0u8; 15]).is_err());
        assert!(Sm4Key::from_slice(&[0u8; 16]).is_ok());
    }

    #[test]
    fn take_prefix_splits() {
        let mut pool = SecretBytes::from_slice(&[1, 2, 3, 4, 5]);
        let pad = pool.take_prefix(2).expect("2 <= 5");
        assert_eq!(pad.expose_secret(), &[1, 2]);
        assert_eq!(pool.expose_secret(), &[3, 4, 5]);
        assert!(pool.take_prefix(4).is_err());
        assert_eq!(pool.len(), 3);
    }
}
