//! Known-answer tests from the standards, read from `tests/vectors/*.json`
//! (each file names its source).

use qkdnet_crypto::gcm::Sm4Gcm;
use qkdnet_crypto::sm2::{Sm2Signature, Sm2SigningKey, Sm2VerifyingKey};
use qkdnet_crypto::sm3::sm3;
use qkdnet_crypto::sm4::Sm4Block;
use qkdnet_crypto::{CryptoError, SecretKey, Sm4Key};
use serde::Deserialize;

#[derive(Deserialize)]
struct File<T> {
    source: String,
    tests: Vec<T>,
}

fn load<T: for<'de> Deserialize<'de>>(name: &str) -> File<T> {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("vector file exists");
    let file: File<T> = serde_json::from_str(&text).expect("vector file parses");
    assert!(!file.source.is_empty(), "{name} must cite its source");
    assert!(!file.tests.is_empty(), "{name} has no tests");
    file
}

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).expect("valid hex in vector file")
}

fn arr<const N: usize>(s: &str) -> [u8; N] {
    h(s).try_into().expect("vector field has the right length")
}

#[derive(Deserialize)]
struct Sm3Vec {
    name: String,
    message_hex: String,
    digest: String,
}

#[test]
fn sm3_gbt32905_appendix_a() {
    for t in load::<Sm3Vec>("sm3.json").tests {
        assert_eq!(hex::encode(sm3(&h(&t.message_hex))), t.digest, "{}", t.name);
    }
}

#[derive(Deserialize)]
struct Sm4Vec {
    name: String,
    key: String,
    plaintext: String,
    iterations: u32,
    ciphertext: String,
}

#[test]
fn sm4_gbt32907_appendix_a_including_million_iterations() {
    for t in load::<Sm4Vec>("sm4.json").tests {
        let cipher = Sm4Block::new(&Sm4Key::new(arr(&t.key)));
        let mut block: [u8; 16] = arr(&t.plaintext);
        for _ in 0..t.iterations {
            cipher.encrypt_block(&mut block);
        }
        assert_eq!(hex::encode(block), t.ciphertext, "{}", t.name);
    }
}

#[derive(Deserialize)]
struct GcmVec {
    name: String,
    key: String,
    nonce: String,
    aad: String,
    plaintext: String,
    ciphertext: String,
    tag: String,
}

#[test]
fn sm4_gcm_rfc8998_a1_one_shot_and_streaming() {
    use qkdnet_crypto::gcm::{Sm4GcmDecryptor, Sm4GcmEncryptor};
    for t in load::<GcmVec>("sm4_gcm.json").tests {
        let key = Sm4Key::new(arr(&t.key));
        let nonce: [u8; 12] = arr(&t.nonce);
        let aad = h(&t.aad);
        let gcm = Sm4Gcm::new(&key);

        let mut buf = h(&t.plaintext);
        let tag = gcm
            .seal_in_place_detached(&nonce, &aad, &mut buf)
            .expect("seal");
        assert_eq!(hex::encode(&buf), t.ciphertext, "{}", t.name);
        assert_eq!(hex::encode(tag), t.tag, "{}", t.name);
        gcm.open_in_place_detached(&nonce, &aad, &mut buf, &tag)
            .expect("open");
        assert_eq!(hex::encode(&buf), t.plaintext);

        let mut buf = h(&t.plaintext);
        let mut enc = Sm4GcmEncryptor::new(&key, &nonce, &aad).expect("enc");
        for piece in buf.chunks_mut(10) {
            enc.update(piece).expect("update");
        }
        assert_eq!(hex::encode(&buf), t.ciphertext, "{} (streaming)", t.name);
        assert_eq!(hex::encode(enc.finish()), t.tag, "{} (streaming)", t.name);
        let mut dec = Sm4GcmDecryptor::new(&key, &nonce, &aad).expect("dec");
        dec.update(&mut buf).expect("update");
        dec.finish(&arr(&t.tag)).expect("tag verifies");

        // A flipped tag bit must fail, and leave the ciphertext in place.
        let mut buf = h(&t.ciphertext);
        let mut bad_tag: [u8; 16] = arr(&t.tag);
        bad_tag[15] ^= 0x80;
        assert_eq!(
            gcm.open_in_place_detached(&nonce, &aad, &mut buf, &bad_tag),
            Err(CryptoError::AuthenticationFailed)
        );
        assert_eq!(hex::encode(&buf), t.ciphertext);
    }
}

#[derive(Deserialize)]
struct Sm2Vec {
    name: String,
    dist_id: String,
    message_hex: String,
    private_key: String,
    public_key_x: String,
    public_key_y: String,
    r: String,
    s: String,
}

#[test]
fn sm2_gbt32918_appendix_a_signature_verifies() {
    for t in load::<Sm2Vec>("sm2.json").tests {
        let mut sec1 = vec![0x04];
        sec1.extend(h(&t.public_key_x));
        sec1.extend(h(&t.public_key_y));
        let vk = Sm2VerifyingKey::from_sec1_bytes(&t.dist_id, &sec1).expect("public key on curve");
        let mut rs = h(&t.r);
        rs.extend(h(&t.s));
        let sig = Sm2Signature::from_slice(&rs).expect("64 bytes");
        let msg = h(&t.message_hex);
        vk.verify(&msg, &sig).expect(&t.name);

        // The private key of the example yields the example's public key.
        let sk = Sm2SigningKey::from_bytes(&t.dist_id, &SecretKey::new(arr(&t.private_key)))
            .expect("valid private key");
        assert_eq!(sk.verifying_key().to_sec1_bytes(), sec1, "{}", t.name);
        // Our own (deterministic-nonce) signature also verifies under the example key.
        let ours = sk.sign(&msg).expect("sign");
        vk.verify(&msg, &ours).expect("own signature verifies");

        // Tampering: message, ID, r and s.
        assert!(vk.verify(b"message digesT", &sig).is_err());
        let other_id =
            Sm2VerifyingKey::from_sec1_bytes("ALICE123@YAHOO.COM", &sec1).expect("point");
        assert!(other_id.verify(&msg, &sig).is_err());
        for i in [0usize, 63] {
            let mut bad = rs.clone();
            bad[i] ^= 1;
            let bad = Sm2Signature::from_slice(&bad).expect("64 bytes");
            assert_eq!(vk.verify(&msg, &bad), Err(CryptoError::InvalidSignature));
        }
    }
}
