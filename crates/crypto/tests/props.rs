//! Property tests: seal/open round trips and tamper detection for every mode, and
//! the streaming GCM against the one-shot implementation.

use proptest::prelude::*;
use qkdnet_crypto::chunked::{ChunkOpener, ChunkSealer};
use qkdnet_crypto::gcm::{Sm4Gcm, Sm4GcmDecryptor, Sm4GcmEncryptor};
use qkdnet_crypto::otp::one_time_pad;
use qkdnet_crypto::sm4::Sm4Ctr;
use qkdnet_crypto::{SecretBytes, Sm4Key};

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn gcm_round_trip_and_any_single_bit_flip_fails(
        key in any::<[u8; 16]>(),
        nonce in any::<[u8; 12]>(),
        aad in proptest::collection::vec(any::<u8>(), 0..64),
        pt in proptest::collection::vec(any::<u8>(), 0..600),
        flip in any::<usize>(),
        bit in 0u8..8,
    ) {
        let gcm = Sm4Gcm::new(&Sm4Key::new(key));
        let mut buf = pt.clone();
        gcm.seal_in_place(&nonce, &aad, &mut buf).expect("seal");
        prop_assert_eq!(buf.len(), pt.len() + 16);
        let sealed = buf.clone();

        // Flip one bit anywhere in ciphertext || tag || aad || nonce.
        let total = sealed.len() + aad.len() + 12;
        let pos = flip % total;
        let (mut c, mut a, mut n) = (sealed.clone(), aad.clone(), nonce);
        if pos < c.len() {
            c[pos] ^= 1 << bit;
        } else if pos < c.len() + a.len() {
            a[pos - sealed.len()] ^= 1 << bit;
        } else {
            n[pos - sealed.len() - aad.len()] ^= 1 << bit;
        }
        prop_assert!(gcm.open_in_place(&n, &a, &mut c).is_err());

        gcm.open_in_place(&nonce, &aad, &mut buf).expect("open");
        prop_assert_eq!(buf, pt);
    }

    #[test]
    fn streaming_gcm_equals_one_shot_for_any_split(
        key in any::<[u8; 16]>(),
        nonce in any::<[u8; 12]>(),
        aad in proptest::collection::vec(any::<u8>(), 0..40),
        pt in proptest::collection::vec(any::<u8>(), 0..500),
        splits in proptest::collection::vec(0usize..70, 0..12),
    ) {
        let key = Sm4Key::new(key);
        let mut want = pt.clone();
        let tag = Sm4Gcm::new(&key).seal_in_place_detached(&nonce, &aad, &mut want).expect("seal");

        let mut got = pt.clone();
        let mut enc = Sm4GcmEncryptor::new(&key, &nonce, &aad).expect("enc");
        let mut rest: &mut [u8] = &mut got;
        for s in &splits {
            let (head, tail) = rest.split_at_mut((*s).min(rest.len()));
            enc.update(head).expect("update");
            rest = tail;
        }
        enc.update(rest).expect("update");
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(enc.finish(), tag);

        let mut dec = Sm4GcmDecryptor::new(&key, &nonce, &aad).expect("dec");
        dec.update(&mut got).expect("update");
        dec.finish(&tag).expect("verifies");
        prop_assert_eq!(&got, &pt);

        let mut bad = tag;
        bad[0] ^= 1;
        let mut dec = Sm4GcmDecryptor::new(&key, &nonce, &aad).expect("dec");
        dec.update(&mut want).expect("update");
        prop_assert!(dec.finish(&bad).is_err());
    }

    #[test]
    fn chunked_round_trip_and_tamper(
        key in any::<[u8; 16]>(),
        prefix in any::<[u8; 7]>(),
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 1..6),
        victim in any::<usize>(),
    ) {
        let key = Sm4Key::new(key);
        let mut sealer = ChunkSealer::new(&key, prefix);
        let mut sealed = chunks.clone();
        let mut tags = Vec::new();
        let n = sealed.len();
        for c in &mut sealed[..n - 1] {
            tags.push(sealer.seal_chunk(b"file", c).expect("seal"));
        }
        tags.push(sealer.seal_last(b"file", &mut sealed[n - 1]).expect("seal last"));

        let open_all = |data: &[Vec<u8>], tags: &[[u8; 16]]| -> Result<Vec<Vec<u8>>, ()> {
            let mut opener = ChunkOpener::new(&key, prefix);
            let mut out = data.to_vec();
            let n = out.len();
            for (c, t) in out[..n - 1].iter_mut().zip(tags) {
                opener.open_chunk(b"file", c, t).map_err(|_| ())?;
            }
            opener.open_last(b"file", &mut out[n - 1], &tags[n - 1]).map_err(|_| ())?;
            Ok(out)
        };
        prop_assert_eq!(open_all(&sealed, &tags), Ok(chunks.clone()));

        // Tamper with one chunk's tag: the whole stream fails.
        let v = victim % n;
        let mut bad_tags = tags.clone();
        bad_tags[v][victim % 16] ^= 0x40;
        prop_assert!(open_all(&sealed, &bad_tags).is_err());
        // Drop the final chunk (truncation): fails.
        if n > 1 {
            prop_assert!(open_all(&sealed[..n - 1], &tags[..n - 1]).is_err());
        }
    }

    #[test]
    fn ctr_is_an_involution_and_chunking_invariant(
        key in any::<[u8; 16]>(),
        iv in any::<[u8; 16]>(),
        data in proptest::collection::vec(any::<u8>(), 0..400),
        step in 1usize..50,
    ) {
        let key = Sm4Key::new(key);
        let mut whole = data.clone();
        Sm4Ctr::new(&key, &iv).apply_keystream(&mut whole).expect("short");
        let mut pieces = data.clone();
        let mut ctr = Sm4Ctr::new(&key, &iv);
        for p in pieces.chunks_mut(step) {
            ctr.apply_keystream(p).expect("short");
        }
        prop_assert_eq!(&whole, &pieces);
        Sm4Ctr::new(&key, &iv).apply_keystream(&mut whole).expect("short");
        prop_assert_eq!(whole, data);
    }

    #[test]
    fn otp_round_trip(data in proptest::collection::vec(any::<u8>(), 0..200), seed in any::<u8>()) {
        let pad: Vec<u8> = (0..data.len()).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
        let mut buf = data.clone();
        one_time_pad(SecretBytes::from_slice(&pad), &mut buf).expect("same length");
        one_time_pad(SecretBytes::new(pad), &mut buf).expect("same length");
        prop_assert_eq!(buf, data);
    }
}
