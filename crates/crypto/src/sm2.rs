//! SM2 digital signatures (GB/T 32918.2-2016) with a distinguishing identifier.
//!
//! SM2 signs `SM3(Z_A || M)` where `Z_A` hashes the signer's distinguishing ID and
//! public key, so the ID is part of every key here: a verifying key is bound to one
//! ID at construction and cannot be used with another by mistake. Signatures travel
//! as the fixed 64-byte `r || s` encoding (the form GB/T 32918 examples print); DER
//! belongs to certificate code, not here. Signing uses the RustCrypto `sm2` crate's
//! deterministic nonce (RFC 6979 style, with SM3), so no RNG is needed to sign and a
//! weak RNG cannot leak the key.
//!
//! **Key exchange:** the RustCrypto `sm2` crate (0.14) provides signatures (`dsa`)
//! and public-key encryption (`pke`) but *not* the SM2 key exchange protocol of
//! GB/T 32918.3, so this module offers none; qkdnet's key agreement is QKD plus
//! ML-KEM (see [`crate::hybrid`]).
//!
//! **Zeroization caveat:** the secret scalar lives inside `sm2::dsa::SigningKey`,
//! which does not zeroize on drop in 0.14. [`Sm2SigningKey::to_bytes`] returns a
//! zeroizing copy, but the copy inside the foreign type is outside our control.

use sm2::dsa::signature::{Signer, Verifier};

use crate::error::{CryptoError, Result};
use crate::secret::SecretKey;

/// The default distinguishing ID of GM/T 0009-2012 § 10 (used by certificates and TLS).
pub const DEFAULT_DIST_ID: &str = "1234567812345678";

/// Length of an `r || s` signature.
pub const SM2_SIGNATURE_LEN: usize = 64;

/// Length of an SM2 private key.
pub const SM2_SECRET_KEY_LEN: usize = 32;

/// An SM2 private key (as bytes).
pub type Sm2SecretBytes = SecretKey<SM2_SECRET_KEY_LEN>;

/// Longest ID whose bit length fits ENTL's 16 bits.
const MAX_DIST_ID_LEN: usize = 8191;

fn check_dist_id(dist_id: &str) -> Result<()> {
    if dist_id.len() > MAX_DIST_ID_LEN {
        Err(CryptoError::InvalidDistId)
    } else {
        Ok(())
    }
}

/// An SM2 signing key bound to a distinguishing ID.
pub struct Sm2SigningKey(sm2::dsa::SigningKey);

impl Sm2SigningKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate(dist_id: &str) -> Result<Self> {
        check_dist_id(dist_id)?;
        let sk = <sm2::SecretKey as sm2::elliptic_curve::Generate>::generate();
        sm2::dsa::SigningKey::new(dist_id, &sk)
            .map(Self)
            .map_err(|_| CryptoError::InvalidDistId)
    }

    /// From a 32-byte big-endian private key `d` with `1 <= d < n`.
    pub fn from_bytes(dist_id: &str, secret: &Sm2SecretBytes) -> Result<Self> {
        check_dist_id(dist_id)?;
        sm2::dsa::SigningKey::from_slice(dist_id, secret.expose_secret())
            .map(Self)
            .map_err(|_| CryptoError::InvalidPrivateKey)
    }

    /// The private key bytes (zeroized when the returned value drops).
    pub fn to_bytes(&self) -> Sm2SecretBytes {
        let mut out = Sm2SecretBytes::zeroed();
        out.expose_secret_mut().copy_from_slice(&self.0.to_bytes());
        out
    }

    /// The matching verifying key (same distinguishing ID).
    pub fn verifying_key(&self) -> Sm2VerifyingKey {
        Sm2VerifyingKey(self.0.verifying_key().clone())
    }

    /// Signs `msg` (the `Z_A` prefix is added internally).
    pub fn sign(&self, msg: &[u8]) -> Result<Sm2Signature> {
        let sig: sm2::dsa::Signature = self
            .0
            .try_sign(msg)
            .map_err(|_| CryptoError::InvalidPrivateKey)?;
        Ok(Sm2Signature(sig.to_bytes().into()))
    }
}

impl core::fmt::Debug for Sm2SigningKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sm2SigningKey")
            .field("dist_id", &self.0.distid())
            .finish_non_exhaustive()
    }
}

/// An SM2 public key bound to a distinguishing ID.
#[derive(Clone)]
pub struct Sm2VerifyingKey(sm2::dsa::VerifyingKey);

impl Sm2VerifyingKey {
    /// From SEC1 bytes (`04 || x || y` uncompressed, or compressed).
    pub fn from_sec1_bytes(dist_id: &str, bytes: &[u8]) -> Result<Self> {
        check_dist_id(dist_id)?;
        sm2::dsa::VerifyingKey::from_sec1_bytes(dist_id, bytes)
            .map(Self)
            .map_err(|_| CryptoError::InvalidPublicKey)
    }

    /// Uncompressed SEC1 encoding, `04 || x || y` (65 bytes).
    pub fn to_sec1_bytes(&self) -> Vec<u8> {
        self.0.to_sec1_bytes().into_vec()
    }

    /// The distinguishing ID this key is bound to.
    pub fn dist_id(&self) -> &str {
        self.0.distid()
    }

    /// Verifies `sig` over `msg`.
    pub fn verify(&self, msg: &[u8], sig: &Sm2Signature) -> Result<()> {
        let sig = sm2::dsa::Signature::from_bytes(&sig.0.into())
            .map_err(|_| CryptoError::InvalidSignature)?;
        self.0
            .verify(msg, &sig)
            .map_err(|_| CryptoError::InvalidSignature)
    }
}

impl core::fmt::Debug for Sm2VerifyingKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Sm2VerifyingKey")
            .field("dist_id", &self.0.distid())
            .field("sec1", &HexDisplay(&self.to_sec1_bytes()))
            .finish()
    }
}

struct HexDisplay<'a>(&'a [u8]);

impl core::fmt::Debug for HexDisplay<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// An SM2 signature, `r || s` (32 bytes each, big-endian).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Sm2Signature([u8; SM2_SIGNATURE_LEN]);

impl Sm2Signature {
    /// Wraps `r || s` bytes (validity is checked at verification).
    pub fn from_bytes(bytes: [u8; SM2_SIGNATURE_LEN]) -> Self {
        Self(bytes)
    }

    /// From a slice, checking the length.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        bytes
            .try_into()
            .map(Self)
            .map_err(|_| CryptoError::InvalidSignature)
    }

    /// The `r || s` bytes.
    pub fn to_bytes(&self) -> [u8; SM2_SIGNATURE_LEN] {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_tamper() {
        let sk = Sm2SigningKey::generate("alice@qkdnet").expect("fresh key");
        let vk = sk.verifying_key();
        let sig = sk.sign(b"key block 42").expect("sign");
        vk.verify(b"key block 42", &sig).expect("valid");
        assert_eq!(
            vk.verify(b"key block 43", &sig),
            Err(CryptoError::InvalidSignature)
        );
        let mut bad = sig.to_bytes();
        bad[10] ^= 1;
        assert!(
            vk.verify(b"key block 42", &Sm2Signature::from_bytes(bad))
                .is_err()
        );
        // Same key, other ID: Z_A differs, so the signature must not verify.
        let other =
            Sm2VerifyingKey::from_sec1_bytes("bob@qkdnet", &vk.to_sec1_bytes()).expect("point");
        assert!(other.verify(b"key block 42", &sig).is_err());
    }

    #[test]
    fn zero_signature_and_bad_inputs_are_rejected() {
        let sk = Sm2SigningKey::generate(DEFAULT_DIST_ID).expect("fresh key");
        let vk = sk.verifying_key();
        assert!(vk.verify(b"m", &Sm2Signature::from_bytes([0; 64])).is_err());
        assert!(Sm2Signature::from_slice(&[1; 63]).is_err());
        assert!(Sm2VerifyingKey::from_sec1_bytes(DEFAULT_DIST_ID, &[4; 65]).is_err());
        assert_eq!(
            Sm2SigningKey::from_bytes(DEFAULT_DIST_ID, &SecretKey::new([0; 32])).err(),
            Some(CryptoError::InvalidPrivateKey)
        );
        assert_eq!(
            Sm2SigningKey::from_bytes(&"x".repeat(8192), &SecretKey::new([1; 32])).err(),
            Some(CryptoError::InvalidDistId)
        );
    }

    #[test]
    fn key_round_trips_through_bytes() {
        let sk = Sm2SigningKey::generate(DEFAULT_DIST_ID).expect("fresh key");
        let again = Sm2SigningKey::from_bytes(DEFAULT_DIST_ID, &sk.to_bytes()).expect("valid");
        assert_eq!(
            sk.verifying_key().to_sec1_bytes(),
            again.verifying_key().to_sec1_bytes()
        );
        let dbg = format!("{sk:?}");
        let secret_hex: String = sk
            .to_bytes()
            .expose_secret()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(
            dbg.contains("dist_id") && !dbg.contains(&secret_hex),
            "{dbg}"
        );
    }
}
