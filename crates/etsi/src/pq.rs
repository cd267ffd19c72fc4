//! X25519MLKEM768: the hybrid post-quantum key exchange of every qkdnet TLS
//! connection (draft-ietf-tls-ecdhe-mlkem, TLS 1.3 group 0x11EC).
//!
//! rustls ships this group only in its aws-lc-rs provider; qkdnet uses the ring
//! provider (no C/CMake build of aws-lc on a 2-core machine), so this module
//! composes the group from two well-kept implementations instead: ring's X25519
//! (through rustls's own ring key-exchange group) and RustCrypto's `ml-kem`
//! (through `qkdnet-crypto`'s ML-KEM-768 wrappers, FIPS 203). Nothing here is new
//! cryptography; it is the draft's concatenation, which is what interoperability
//! with other TLS stacks depends on:
//!
//! ```text
//! client share = ML-KEM-768 encapsulation key (1184) || X25519 public key (32)
//! server share = ML-KEM-768 ciphertext (1088)       || X25519 public key (32)
//! shared secret = ML-KEM shared secret (32)          || X25519 shared secret (32)
//! ```
//!
//! The TLS 1.3 key schedule then runs HKDF over that secret, so the session keys
//! are safe if either component is. Shares of the wrong length, an encapsulation key
//! that fails FIPS 203's modulus check and an all-zero X25519 result are refused as
//! an invalid key share. The test module checks the split and the secret's layout
//! against the components run by hand.

use qkdnet_crypto::hybrid::{
    MLKEM768_CT_LEN, MLKEM768_EK_LEN, MlKemCiphertext, MlKemDecapsulationKey, MlKemEncapsulationKey,
};
use rustls::crypto::{ActiveKeyExchange, CompletedKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::{Error, NamedGroup, PeerMisbehaved, ProtocolVersion};
use zeroize::Zeroizing;

/// The X25519MLKEM768 group, for [`rustls::crypto::CryptoProvider::kx_groups`].
pub static X25519MLKEM768: &dyn SupportedKxGroup = &Hybrid;

/// Length of an X25519 public key.
const X25519_LEN: usize = 32;

fn classical() -> &'static dyn SupportedKxGroup {
    rustls::crypto::ring::kx_group::X25519
}

fn invalid_share() -> Error {
    Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare)
}

#[derive(Debug)]
struct Hybrid;

impl SupportedKxGroup for Hybrid {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let x25519 = classical().start()?;
        let dk = MlKemDecapsulationKey::generate();
        let mut share = Vec::with_capacity(MLKEM768_EK_LEN + X25519_LEN);
        share.extend_from_slice(&dk.encapsulation_key().to_bytes());
        share.extend_from_slice(x25519.pub_key());
        Ok(Box::new(ClientHalf { dk, x25519, share }))
    }

    /// The server side: encapsulate to the client's key, finish X25519 with its
    /// public key, answer with ciphertext || our X25519 public key.
    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        if client_share.len() != MLKEM768_EK_LEN + X25519_LEN {
            return Err(invalid_share());
        }
        let (ek, x_pub) = client_share.split_at(MLKEM768_EK_LEN);
        let ek = MlKemEncapsulationKey::from_bytes(ek).map_err(|_| invalid_share())?;
        let (ct, pq_secret) = ek.encapsulate();
        let x = classical().start_and_complete(x_pub)?;
        let mut pub_key = Vec::with_capacity(MLKEM768_CT_LEN + X25519_LEN);
        pub_key.extend_from_slice(ct.as_bytes());
        pub_key.extend_from_slice(&x.pub_key);
        Ok(CompletedKeyExchange {
            group: NamedGroup::X25519MLKEM768,
            pub_key,
            secret: combine(pq_secret.expose_secret(), x.secret.secret_bytes()),
        })
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

/// ML-KEM secret first, then X25519's (the draft's order for this group).
fn combine(pq: &[u8], classical: &[u8]) -> SharedSecret {
    let mut s = Zeroizing::new(Vec::with_capacity(pq.len() + classical.len()));
    s.extend_from_slice(pq);
    s.extend_from_slice(classical);
    // rustls zeroizes a SharedSecret's buffer on drop.
    SharedSecret::from(std::mem::take(&mut *s))
}

/// The client's half: our ML-KEM decapsulation key and X25519 key until the
/// server's share arrives.
struct ClientHalf {
    dk: MlKemDecapsulationKey,
    x25519: Box<dyn ActiveKeyExchange>,
    share: Vec<u8>,
}

impl ActiveKeyExchange for ClientHalf {
    fn complete(self: Box<Self>, server_share: &[u8]) -> Result<SharedSecret, Error> {
        if server_share.len() != MLKEM768_CT_LEN + X25519_LEN {
            return Err(invalid_share());
        }
        let (ct, x_pub) = server_share.split_at(MLKEM768_CT_LEN);
        let ct = MlKemCiphertext::from_slice(ct).map_err(|_| invalid_share())?;
        let pq_secret = self.dk.decapsulate(&ct);
        let x_secret = self.x25519.complete(x_pub)?;
        Ok(combine(pq_secret.expose_secret(), x_secret.secret_bytes()))
    }

    /// Offer X25519 alone as well, so a server that only knows X25519 can
    /// answer from the same share (when the client's policy allows it).
    fn hybrid_component(&self) -> Option<(NamedGroup, &[u8])> {
        Some((classical().name(), self.x25519.pub_key()))
    }

    fn complete_hybrid_component(
        self: Box<Self>,
        peer_pub_key: &[u8],
    ) -> Result<SharedSecret, Error> {
        self.x25519.complete(peer_pub_key)
    }

    fn pub_key(&self) -> &[u8] {
        &self.share
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_agree_and_the_secret_is_pq_then_classical() {
        let client = X25519MLKEM768.start().expect("start");
        assert_eq!(client.pub_key().len(), MLKEM768_EK_LEN + X25519_LEN);
        let server = X25519MLKEM768
            .start_and_complete(client.pub_key())
            .expect("server");
        assert_eq!(server.group, NamedGroup::X25519MLKEM768);
        assert_eq!(server.pub_key.len(), MLKEM768_CT_LEN + X25519_LEN);
        let ours = client.complete(&server.pub_key).expect("client");
        assert_eq!(ours.secret_bytes(), server.secret.secret_bytes());
        assert_eq!(ours.secret_bytes().len(), 64);
    }

    #[test]
    fn secret_layout_matches_the_components() {
        // Run the components by hand and check the concatenation order.
        let client = X25519MLKEM768.start().expect("start");
        let share = client.pub_key().to_vec();
        let ek = MlKemEncapsulationKey::from_bytes(&share[..MLKEM768_EK_LEN]).expect("ek");
        let (ct, pq) = ek.encapsulate();
        let x = classical()
            .start_and_complete(&share[MLKEM768_EK_LEN..])
            .expect("x25519");
        let mut server_share = ct.as_bytes().to_vec();
        server_share.extend_from_slice(&x.pub_key);
        let got = client.complete(&server_share).expect("complete");
        assert_eq!(&got.secret_bytes()[..32], pq.expose_secret());
        assert_eq!(&got.secret_bytes()[32..], x.secret.secret_bytes());
    }

    #[test]
    fn bad_shares_are_refused() {
        for len in [0, 32, MLKEM768_EK_LEN, MLKEM768_EK_LEN + X25519_LEN + 1] {
            assert!(X25519MLKEM768.start_and_complete(&vec![7; len]).is_err());
        }
        // An encapsulation key whose coefficients exceed the modulus (all 0xff).
        let mut share = vec![0xff; MLKEM768_EK_LEN];
        share.extend_from_slice(&[9; X25519_LEN]);
        assert!(X25519MLKEM768.start_and_complete(&share).is_err());
        let client = X25519MLKEM768.start().expect("start");
        assert!(client.complete(&[1; 10]).is_err());
    }
}
