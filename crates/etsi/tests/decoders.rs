//! Property tests: the ETSI JSON decoders and query parsers never panic on
//! arbitrary input, and validation accepts exactly the requests the limits allow.

use proptest::prelude::*;
use qkdnet_etsi::error::EtsiError;
use qkdnet_etsi::identity::identity_from_cert;
use qkdnet_etsi::wire::{
    KeyRequest, Limits, decode_key_ids, decode_key_request, parse_dec_query, parse_enc_query,
};

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn key_request_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let l = Limits::default();
        if let Ok(r) = decode_key_request(&bytes) {
            let _ = r.validate(&l);
        }
    }

    #[test]
    fn key_ids_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let l = Limits::default();
        if let Ok(r) = decode_key_ids(&bytes) {
            let _ = r.validate(&l);
        }
    }

    #[test]
    fn json_shaped_input_never_panics(s in r#"\{("(number|size|key_IDs|key_ID|extension_mandatory|additional_slave_SAE_IDs)":(-?[0-9]{1,22}|\[[^\]]{0,40}\]|\{[^}]{0,20}\}|"[^"]{0,40}"|null|true),?){0,4}\}"#) {
        let l = Limits::default();
        if let Ok(r) = decode_key_request(s.as_bytes()) { let _ = r.validate(&l); }
        if let Ok(r) = decode_key_ids(s.as_bytes()) { let _ = r.validate(&l); }
    }

    #[test]
    fn queries_never_panic(q in ".{0,80}") {
        let _ = parse_enc_query(Some(&q));
        let _ = parse_dec_query(Some(&q));
    }

    #[test]
    fn certificate_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = identity_from_cert(&bytes);
    }

    #[test]
    fn validation_matches_the_limits(number in proptest::option::of(0u64..3000), size in proptest::option::of(0u64..20000)) {
        let l = Limits::default();
        let r = KeyRequest { number, size, ..Default::default() }.validate(&l);
        let n = number.unwrap_or(1);
        let s = size.unwrap_or(u64::from(l.key_size));
        let ok = n >= 1 && n <= u64::from(l.max_key_per_request)
            && s % 8 == 0 && s >= u64::from(l.min_key_size) && s <= u64::from(l.max_key_size);
        prop_assert_eq!(r.is_ok(), ok);
        if let Ok(v) = r {
            prop_assert_eq!((u64::from(v.number), u64::from(v.size_bits)), (n, s));
        } else if n >= 1 && n <= u64::from(l.max_key_per_request) && s % 8 != 0 {
            prop_assert!(matches!(r, Err(EtsiError::SizeNotMultipleOf8)));
        }
    }
}
