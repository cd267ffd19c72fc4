//! Instant messages (SIP MESSAGE) sealed between two edges; sans-IO.
//!
//! Each message gets its own key-service session (the sender's edge opens
//! it naming the recipient, the recipient's edge joins it), so a message
//! costs each party two medium keys, like a call. The body is sealed with
//! SM4-GCM under HKDF-SM3(session key, "qkdnet call message v1"); the
//! message's Call-ID and CSeq are the additional data, so a sealed body
//! cannot be moved into another message. Layout: nonce (12) ‖ ciphertext ‖
//! tag (16).

use qkdnet_crypto::gcm::{GCM_NONCE_LEN, GCM_TAG_LEN, Sm4Gcm};
use qkdnet_crypto::kdf::hkdf_sm3;
use qkdnet_crypto::secret::Sm4Key;
use qkdnet_media::Key256;

/// Content-Type of a sealed body between edges.
pub const SEALED_TYPE: &str = "application/vnd.qkdnet.sealed-message";
/// Largest body sealed (a SIP MESSAGE over UDP stays well under this).
pub const MAX_BODY: usize = 8 * 1024;

/// Why a sealed body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// Larger than [`MAX_BODY`].
    #[error("message body larger than {MAX_BODY} bytes")]
    TooLarge,
    /// Shorter than a nonce and a tag.
    #[error("sealed message too short")]
    Truncated,
    /// The tag does not verify (tampered, moved, or another key).
    #[error("sealed message does not authenticate")]
    Auth,
}

fn cipher(session: &Key256) -> Sm4Gcm {
    let okm = hkdf_sm3(
        b"qkdnet call message v1",
        session.expose_secret(),
        &[b"message"],
        16,
    )
    .expect("invariant: 16 bytes is a valid HKDF-SM3 length");
    let mut k = [0u8; 16];
    k.copy_from_slice(okm.expose_secret());
    let c = Sm4Gcm::new(&Sm4Key::new(k));
    zeroize::Zeroize::zeroize(&mut k);
    c
}

fn aad(call_id: &str, cseq: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(call_id.len() + cseq.len() + 1);
    a.extend_from_slice(call_id.as_bytes());
    a.push(0);
    a.extend_from_slice(cseq.as_bytes());
    a
}

/// Seals `body` of the message (`call_id`, `cseq`) under the session key.
pub fn seal(
    session: &Key256,
    call_id: &str,
    cseq: &str,
    body: &[u8],
) -> Result<Vec<u8>, SealError> {
    if body.len() > MAX_BODY {
        return Err(SealError::TooLarge);
    }
    let mut nonce = [0u8; GCM_NONCE_LEN];
    getrandom::fill(&mut nonce).expect("invariant: the OS CSPRNG works");
    let mut out = Vec::with_capacity(GCM_NONCE_LEN + body.len() + GCM_TAG_LEN);
    out.extend_from_slice(&nonce);
    let mut ct = body.to_vec();
    let tag = cipher(session)
        .seal_in_place_detached(&nonce, &aad(call_id, cseq), &mut ct)
        .map_err(|_| SealError::TooLarge)?;
    out.extend_from_slice(&ct);
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Opens a sealed body; nothing is returned unless it authenticates.
pub fn open(
    session: &Key256,
    call_id: &str,
    cseq: &str,
    sealed: &[u8],
) -> Result<Vec<u8>, SealError> {
    if sealed.len() < GCM_NONCE_LEN + GCM_TAG_LEN {
        return Err(SealError::Truncated);
    }
    if sealed.len() > MAX_BODY + GCM_NONCE_LEN + GCM_TAG_LEN {
        return Err(SealError::TooLarge);
    }
    let (nonce, rest) = sealed.split_at(GCM_NONCE_LEN);
    let (ct, tag) = rest.split_at(rest.len() - GCM_TAG_LEN);
    let nonce: [u8; GCM_NONCE_LEN] = nonce.try_into().map_err(|_| SealError::Truncated)?;
    let tag: [u8; GCM_TAG_LEN] = tag.try_into().map_err(|_| SealError::Truncated)?;
    let mut pt = ct.to_vec();
    cipher(session)
        .open_in_place_detached(&nonce, &aad(call_id, cseq), &mut pt, &tag)
        .map_err(|_| SealError::Auth)?;
    Ok(pt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_messages_open_only_with_their_key_and_place() {
        let k = Key256::new([3; 32]);
        let s = seal(&k, "c1", "1 MESSAGE", b"hello bob").expect("seal");
        assert!(!s.windows(9).any(|w| w == b"hello bob"));
        assert_eq!(open(&k, "c1", "1 MESSAGE", &s).expect("open"), b"hello bob");
        assert_eq!(open(&k, "c2", "1 MESSAGE", &s), Err(SealError::Auth));
        assert_eq!(open(&k, "c1", "2 MESSAGE", &s), Err(SealError::Auth));
        assert_eq!(
            open(&Key256::new([4; 32]), "c1", "1 MESSAGE", &s),
            Err(SealError::Auth)
        );
        for i in 0..s.len() {
            let mut f = s.clone();
            f[i] ^= 1;
            assert!(open(&k, "c1", "1 MESSAGE", &f).is_err(), "flip at {i}");
        }
        assert_eq!(
            open(&k, "c1", "1 MESSAGE", &s[..20]),
            Err(SealError::Truncated)
        );
        assert_eq!(
            seal(&k, "c", "1", &vec![0; MAX_BODY + 1]),
            Err(SealError::TooLarge)
        );
    }
}
