//! ML-KEM-768 and the QKD + ML-KEM hybrid key combiner.
//!
//! Defence in depth: an SM4 session key should stay secret if *either* the QKD key
//! (physics, but trusted relays and imperfect devices) *or* the ML-KEM shared secret
//! (lattice assumptions, but young) is secure. XOR would do that for two uniform keys
//! but binds nothing and breaks if one input is attacker-chosen or reused; instead
//! this module follows the concatenate-then-KDF pattern of ETSI TS 103 744
//! ("CatKDF"), instantiated with HMAC-SM3 to keep the key path in the national suite:
//!
//! ```text
//! IKM  = len32(qkd_key) || qkd_key || len32(ss) || ss            (absent parts omitted)
//! PRK  = HKDF-Extract-SM3(salt = "qkdnet/hybrid-kdf/v1", IKM)
//! info = "qkdnet/hybrid-kdf/v1" || lv(mode label) || lv(ML-KEM encapsulation key)
//!        || lv(ML-KEM ciphertext) || lv(context) || len32(L)
//! OKM  = HKDF-Expand-SM3(PRK, info, L)
//! ```
//!
//! where `lv(x) = len32(x) || x` and `len32` is a 32-bit big-endian length. HMAC is
//! a dual PRF, so PRK is pseudorandom if either secret in IKM is; the length
//! prefixes make the encoding injective; the mode label separates QkdOnly, PqcOnly
//! and Hybrid derivations; and the public ML-KEM transcript (encapsulation key and
//! ciphertext) plus a caller context (e.g. key IDs and SAE IDs) bind the key to
//! this exchange, as TS 103 744 § 8.2 does with its `MA`/`MB` transcripts. Which
//! inputs are present is a type ([`KeyMaterial`]), so a "hybrid" key cannot silently
//! be derived from one input.
//!
//! The ML-KEM wrappers keep RustCrypto `ml-kem` 0.3 types out of callers' signatures
//! and fix the parameter set to ML-KEM-768 (FIPS 203, category 3).

use ml_kem::kem::{Decapsulate, Encapsulate, KeyExport, TryKeyInit};
use ml_kem::{FromSeed, MlKem768};

use crate::error::{CryptoError, Result, check_len};
use crate::kdf::{HKDF_SM3_MAX_LEN, hkdf_sm3_expand, hkdf_sm3_extract};
use crate::secret::{SecretBytes, SecretKey, SharedSecret, Sm4Key};

/// ML-KEM-768 encapsulation key length (FIPS 203 Table 3).
pub const MLKEM768_EK_LEN: usize = 1184;
/// ML-KEM-768 ciphertext length (FIPS 203 Table 3).
pub const MLKEM768_CT_LEN: usize = 1088;
/// ML-KEM decapsulation key seed length (`d || z`).
pub const MLKEM_SEED_LEN: usize = 64;

/// Minimum QKD key length accepted by the combiner (128 bits).
pub const MIN_QKD_KEY_LEN: usize = 16;

const LABEL: &[u8] = b"qkdnet/hybrid-kdf/v1";

/// An ML-KEM-768 decapsulation (private) key, held as its 64-byte seed form.
/// Zeroized on drop by `ml-kem` itself.
pub struct MlKemDecapsulationKey(ml_kem::ml_kem_768::DecapsulationKey);

impl MlKemDecapsulationKey {
    /// A fresh key pair from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let (dk, _ek) = <MlKem768 as ml_kem::Kem>::generate_keypair();
        Self(dk)
    }

    /// Deterministically from a 64-byte seed (FIPS 203 `ML-KEM.KeyGen_internal(d, z)`).
    pub fn from_seed(seed: &SecretKey<MLKEM_SEED_LEN>) -> Self {
        let (dk, _ek) = <MlKem768 as FromSeed>::from_seed(seed.expose_secret().into());
        Self(dk)
    }

    /// The seed, for storage.
    pub fn to_seed(&self) -> SecretKey<MLKEM_SEED_LEN> {
        let mut out = SecretKey::zeroed();
        let seed = self
            .0
            .to_seed()
            .expect("invariant: keys are only built from seeds here");
        out.expose_secret_mut().copy_from_slice(&seed);
        out
    }

    /// The matching public key.
    pub fn encapsulation_key(&self) -> MlKemEncapsulationKey {
        MlKemEncapsulationKey(self.0.encapsulation_key().clone())
    }

    /// Recovers the shared secret. ML-KEM uses implicit rejection: a tampered
    /// ciphertext yields an unrelated pseudorandom secret, not an error, so the
    /// mismatch shows up when the derived keys fail to authenticate.
    pub fn decapsulate(&self, ct: &MlKemCiphertext) -> SharedSecret {
        let ss = self.0.decapsulate((&ct.0).into());
        let mut out = SharedSecret::zeroed();
        out.expose_secret_mut().copy_from_slice(&ss);
        out
    }
}

impl core::fmt::Debug for MlKemDecapsulationKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("MlKemDecapsulationKey([REDACTED])")
    }
}

/// An ML-KEM-768 encapsulation (public) key.
#[derive(Clone)]
pub struct MlKemEncapsulationKey(ml_kem::ml_kem_768::EncapsulationKey);

impl MlKemEncapsulationKey {
    /// Decodes and checks a public key received from a peer (FIPS 203 § 7.2 input check).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        ml_kem::ml_kem_768::EncapsulationKey::new_from_slice(bytes)
            .map(Self)
            .map_err(|_| CryptoError::InvalidPublicKey)
    }

    /// The 1184-byte encoding.
    pub fn to_bytes(&self) -> [u8; MLKEM768_EK_LEN] {
        self.0.to_bytes().into()
    }

    /// Creates a fresh shared secret and the ciphertext that carries it to the key's owner.
    pub fn encapsulate(&self) -> (MlKemCiphertext, SharedSecret) {
        let (ct, ss) = self.0.encapsulate();
        let mut out = SharedSecret::zeroed();
        out.expose_secret_mut().copy_from_slice(&ss);
        (MlKemCiphertext(ct.into()), out)
    }
}

impl core::fmt::Debug for MlKemEncapsulationKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("MlKemEncapsulationKey(ML-KEM-768)")
    }
}

/// An ML-KEM-768 ciphertext (1088 bytes, public).
#[derive(Clone, PartialEq, Eq)]
pub struct MlKemCiphertext([u8; MLKEM768_CT_LEN]);

impl MlKemCiphertext {
    /// From received bytes, checking the length.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        bytes
            .try_into()
            .map(Self)
            .map_err(|_| CryptoError::InvalidCiphertext)
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8; MLKEM768_CT_LEN] {
        &self.0
    }
}

impl core::fmt::Debug for MlKemCiphertext {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("MlKemCiphertext(1088 bytes)")
    }
}

/// Which secrets feed a derived key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CombineMode {
    /// The QKD key alone (information-theoretic, given trusted relays).
    QkdOnly,
    /// The ML-KEM shared secret alone (computational, post-quantum).
    PqcOnly,
    /// Both: secure if either is.
    Hybrid,
}

impl CombineMode {
    /// The label mixed into the KDF's `info`.
    pub fn label(self) -> &'static [u8] {
        match self {
            CombineMode::QkdOnly => b"QkdOnly",
            CombineMode::PqcOnly => b"PqcOnly",
            CombineMode::Hybrid => b"Hybrid",
        }
    }
}

/// The ML-KEM half of a derivation: the shared secret and the public transcript it came from.
#[derive(Clone, Copy, Debug)]
pub struct MlKemTranscript<'a> {
    /// The shared secret (from `encapsulate` or `decapsulate`).
    pub shared_secret: &'a SharedSecret,
    /// The recipient's encapsulation key.
    pub encapsulation_key: &'a MlKemEncapsulationKey,
    /// The ciphertext sent to the recipient.
    pub ciphertext: &'a MlKemCiphertext,
}

/// The secrets for one derivation; the variant *is* the mode.
#[derive(Clone, Copy, Debug)]
pub enum KeyMaterial<'a> {
    /// QKD key only.
    QkdOnly {
        /// Key from the KME (ETSI GS QKD 014 `enc_keys`/`dec_keys`), at least 16 bytes.
        qkd_key: &'a SecretBytes,
    },
    /// ML-KEM only.
    PqcOnly(MlKemTranscript<'a>),
    /// Both.
    Hybrid {
        /// Key from the KME, at least 16 bytes.
        qkd_key: &'a SecretBytes,
        /// The ML-KEM exchange.
        mlkem: MlKemTranscript<'a>,
    },
}

impl KeyMaterial<'_> {
    /// The mode this material implies.
    pub fn mode(&self) -> CombineMode {
        match self {
            KeyMaterial::QkdOnly { .. } => CombineMode::QkdOnly,
            KeyMaterial::PqcOnly(_) => CombineMode::PqcOnly,
            KeyMaterial::Hybrid { .. } => CombineMode::Hybrid,
        }
    }
}

fn len32(n: usize) -> Result<[u8; 4]> {
    u32::try_from(n)
        .map(u32::to_be_bytes)
        .map_err(|_| CryptoError::MessageTooLong("hybrid KDF field"))
}

/// Derives `out.len()` bytes (at most 8160) from `material`, bound to `context`
/// (e.g. the QKD key IDs and both SAE IDs). See the module docs for the construction.
pub fn combine_keys(material: &KeyMaterial<'_>, context: &[u8], out: &mut [u8]) -> Result<()> {
    if out.len() > HKDF_SM3_MAX_LEN {
        return Err(CryptoError::KdfOutputTooLong {
            requested: out.len(),
            max: HKDF_SM3_MAX_LEN,
        });
    }
    let (qkd, mlkem) = match material {
        KeyMaterial::QkdOnly { qkd_key } => (Some(*qkd_key), None),
        KeyMaterial::PqcOnly(t) => (None, Some(t)),
        KeyMaterial::Hybrid { qkd_key, mlkem } => (Some(*qkd_key), Some(mlkem)),
    };
    if let Some(q) = qkd
        && q.len() < MIN_QKD_KEY_LEN
    {
        return Err(CryptoError::KeyTooShort {
            what: "QKD key",
            min: MIN_QKD_KEY_LEN,
            got: q.len(),
        });
    }

    // Extract.
    let qkd_bytes: &[u8] = qkd.map_or(&[], |q| q.expose_secret());
    let ss_bytes: &[u8] = mlkem.map_or(&[], |t| t.shared_secret.expose_secret());
    let qkd_len = len32(qkd_bytes.len())?;
    let ss_len = len32(ss_bytes.len())?;
    let mut ikm: [&[u8]; 4] = [&[], &[], &[], &[]];
    let mut n = 0;
    if qkd.is_some() {
        ikm[0] = &qkd_len;
        ikm[1] = qkd_bytes;
        n = 2;
    }
    if mlkem.is_some() {
        ikm[n] = &ss_len;
        ikm[n + 1] = ss_bytes;
        n += 2;
    }
    let prk = hkdf_sm3_extract(LABEL, &ikm[..n]);

    // Expand, with the public transcript and context in `info`.
    let mode = material.mode().label();
    let ek = mlkem.map(|t| t.encapsulation_key.to_bytes());
    let ek_bytes: &[u8] = ek.as_ref().map_or(&[], |e| e.as_slice());
    let ct_bytes: &[u8] = mlkem.map_or(&[], |t| t.ciphertext.as_bytes().as_slice());
    let mode_len = len32(mode.len())?;
    let ek_len = len32(ek_bytes.len())?;
    let ct_len = len32(ct_bytes.len())?;
    let ctx_len = len32(context.len())?;
    let out_len = len32(out.len())?;
    let info: [&[u8]; 10] = [
        LABEL, &mode_len, mode, &ek_len, ek_bytes, &ct_len, ct_bytes, &ctx_len, context, &out_len,
    ];
    hkdf_sm3_expand(&prk, &info, out)
}

/// [`combine_keys`] producing an SM4 key.
pub fn combine_to_sm4_key(material: &KeyMaterial<'_>, context: &[u8]) -> Result<Sm4Key> {
    let mut key = Sm4Key::zeroed();
    combine_keys(material, context, key.expose_secret_mut())?;
    Ok(key)
}

/// [`combine_keys`] producing `len` bytes as a secret.
pub fn combine_to_secret(
    material: &KeyMaterial<'_>,
    context: &[u8],
    len: usize,
) -> Result<SecretBytes> {
    let mut out = SecretBytes::zeroed(len);
    combine_keys(material, context, out.expose_secret_mut())?;
    Ok(out)
}

/// Checks a received encapsulation key's length before parsing (for clearer errors).
pub fn check_encapsulation_key_len(bytes: &[u8]) -> Result<()> {
    check_len("ML-KEM-768 encapsulation key", MLKEM768_EK_LEN, bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Exchange {
        dk: MlKemDecapsulationKey,
        ek: MlKemEncapsulationKey,
        ct: MlKemCiphertext,
        ss_sender: SharedSecret,
    }

    fn exchange(seed: u8) -> Exchange {
        let dk = MlKemDecapsulationKey::from_seed(&SecretKey::new([seed; 64]));
        let ek =
            MlKemEncapsulationKey::from_bytes(&dk.encapsulation_key().to_bytes()).expect("own key");
        let (ct, ss_sender) = ek.encapsulate();
        Exchange {
            dk,
            ek,
            ct,
            ss_sender,
        }
    }

    #[test]
    fn kem_round_trip_and_implicit_rejection() {
        let x = exchange(1);
        assert_eq!(x.dk.decapsulate(&x.ct), x.ss_sender);
        let mut bad = *x.ct.as_bytes();
        bad[0] ^= 1;
        let bad = MlKemCiphertext::from_slice(&bad).expect("right length");
        assert_ne!(x.dk.decapsulate(&bad), x.ss_sender);
        assert!(MlKemCiphertext::from_slice(&[0; 1087]).is_err());
        assert!(MlKemEncapsulationKey::from_bytes(&[0; 1183]).is_err());
        // Seed round trip gives the same public key.
        let again = MlKemDecapsulationKey::from_seed(&x.dk.to_seed());
        assert_eq!(again.encapsulation_key().to_bytes(), x.ek.to_bytes());
    }

    #[test]
    fn both_ends_derive_the_same_key_and_modes_differ() {
        let x = exchange(2);
        let ss_recv = x.dk.decapsulate(&x.ct);
        let qkd = SecretBytes::from_slice(&[0x5A; 32]);
        let send = MlKemTranscript {
            shared_secret: &x.ss_sender,
            encapsulation_key: &x.ek,
            ciphertext: &x.ct,
        };
        let recv = MlKemTranscript {
            shared_secret: &ss_recv,
            encapsulation_key: &x.ek,
            ciphertext: &x.ct,
        };
        let a = combine_to_sm4_key(
            &KeyMaterial::Hybrid {
                qkd_key: &qkd,
                mlkem: send,
            },
            b"ctx",
        )
        .expect("ok");
        let b = combine_to_sm4_key(
            &KeyMaterial::Hybrid {
                qkd_key: &qkd,
                mlkem: recv,
            },
            b"ctx",
        )
        .expect("ok");
        assert_eq!(a, b);
        let q = combine_to_sm4_key(&KeyMaterial::QkdOnly { qkd_key: &qkd }, b"ctx").expect("ok");
        let p = combine_to_sm4_key(&KeyMaterial::PqcOnly(send), b"ctx").expect("ok");
        assert_ne!(a, q);
        assert_ne!(a, p);
        assert_ne!(q, p);
        let other_ctx = combine_to_sm4_key(
            &KeyMaterial::Hybrid {
                qkd_key: &qkd,
                mlkem: send,
            },
            b"ctX",
        )
        .expect("ok");
        assert_ne!(a, other_ctx);
    }

    #[test]
    fn each_input_changes_the_hybrid_key() {
        let x = exchange(3);
        let y = exchange(4);
        let qkd1 = SecretBytes::from_slice(&[1; 32]);
        let qkd2 = SecretBytes::from_slice(&[2; 32]);
        fn t(e: &Exchange) -> MlKemTranscript<'_> {
            MlKemTranscript {
                shared_secret: &e.ss_sender,
                encapsulation_key: &e.ek,
                ciphertext: &e.ct,
            }
        }
        let base = combine_to_secret(
            &KeyMaterial::Hybrid {
                qkd_key: &qkd1,
                mlkem: t(&x),
            },
            b"",
            32,
        )
        .expect("ok");
        let q_changed = combine_to_secret(
            &KeyMaterial::Hybrid {
                qkd_key: &qkd2,
                mlkem: t(&x),
            },
            b"",
            32,
        )
        .expect("ok");
        let k_changed = combine_to_secret(
            &KeyMaterial::Hybrid {
                qkd_key: &qkd1,
                mlkem: t(&y),
            },
            b"",
            32,
        )
        .expect("ok");
        assert_ne!(base, q_changed);
        assert_ne!(base, k_changed);
        // Same shared secret, different ciphertext in the transcript: different key.
        let swapped_ct = MlKemTranscript {
            shared_secret: &x.ss_sender,
            encapsulation_key: &x.ek,
            ciphertext: &y.ct,
        };
        let ct_changed = combine_to_secret(
            &KeyMaterial::Hybrid {
                qkd_key: &qkd1,
                mlkem: swapped_ct,
            },
            b"",
            32,
        )
        .expect("ok");
        assert_ne!(base, ct_changed);
        // Output length is bound into info: a 16-byte key is not a prefix of the 32-byte one.
        let short = combine_to_secret(
            &KeyMaterial::Hybrid {
                qkd_key: &qkd1,
                mlkem: t(&x),
            },
            b"",
            16,
        )
        .expect("ok");
        assert_ne!(short.expose_secret(), &base.expose_secret()[..16]);
    }

    #[test]
    fn short_qkd_key_and_long_output_are_rejected() {
        let qkd = SecretBytes::from_slice(&[1; 15]);
        assert!(matches!(
            combine_to_sm4_key(&KeyMaterial::QkdOnly { qkd_key: &qkd }, b""),
            Err(CryptoError::KeyTooShort {
                min: 16,
                got: 15,
                ..
            })
        ));
        let qkd = SecretBytes::from_slice(&[1; 16]);
        let mut out = vec![0u8; HKDF_SM3_MAX_LEN + 1];
        assert!(combine_keys(&KeyMaterial::QkdOnly { qkd_key: &qkd }, b"", &mut out).is_err());
    }

    #[test]
    fn construction_matches_the_documented_formula() {
        // QkdOnly, recomputed by hand from the module docs with plain HMAC-SM3.
        use crate::sm3::hmac_sm3;
        let qkd = SecretBytes::from_slice(&[7; 20]);
        let got =
            combine_to_secret(&KeyMaterial::QkdOnly { qkd_key: &qkd }, b"ids", 32).expect("ok");
        let mut ikm = 20u32.to_be_bytes().to_vec();
        ikm.extend_from_slice(&[7; 20]);
        let prk = hmac_sm3(LABEL, &ikm);
        let mut info = LABEL.to_vec();
        for field in [&b"QkdOnly"[..], b"", b"", b"ids"] {
            info.extend_from_slice(&(field.len() as u32).to_be_bytes());
            info.extend_from_slice(field);
        }
        info.extend_from_slice(&32u32.to_be_bytes());
        info.push(1);
        assert_eq!(got.expose_secret(), &hmac_sm3(&prk, &info));
    }
}
