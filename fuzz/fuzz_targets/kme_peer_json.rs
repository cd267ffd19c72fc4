//! KME-to-KME bodies (`qkdnet_kms::kme_wire`): `ExtKeysReserve`,
//! `ExtKeysVoid`, `RelayForward`, `RelayVoid` and link-state lists as the server
//! and its peers decode them with `serde_json::from_slice`. Any bytes give a
//! message or an error, never a panic; a message decoded serialises to JSON
//! that decodes to the same message.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_kms::kme_wire::{ExtKeysReserve, ExtKeysVoid, LinkState, RelayForward, RelayVoid};
use qkdnet_kms::store::KeyLayout;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = serde_json::from_slice::<ExtKeysReserve>(data) {
        let json = serde_json::to_vec(&m).expect("a reservation serialises");
        let back: ExtKeysReserve =
            serde_json::from_slice(&json).expect("serialised reservation parses");
        assert_eq!(back, m);
        let layouts: Vec<KeyLayout> = m.keys.into_iter().map(Into::into).collect();
        let _ = layouts;
    }
    if let Ok(m) = serde_json::from_slice::<ExtKeysVoid>(data) {
        let json = serde_json::to_vec(&m).expect("a void serialises");
        let back: ExtKeysVoid = serde_json::from_slice(&json).expect("serialised void parses");
        assert_eq!(back, m);
    }
    if let Ok(m) = serde_json::from_slice::<RelayForward>(data) {
        let json = serde_json::to_vec(&m).expect("a relay hop serialises");
        let back: RelayForward = serde_json::from_slice(&json).expect("serialised hop parses");
        assert_eq!(back, m);
    }
    if let Ok(m) = serde_json::from_slice::<RelayVoid>(data) {
        let json = serde_json::to_vec(&m).expect("a relay void serialises");
        let back: RelayVoid = serde_json::from_slice(&json).expect("serialised void parses");
        assert_eq!(back, m);
    }
    if let Ok(m) = serde_json::from_slice::<Vec<LinkState>>(data) {
        let json = serde_json::to_vec(&m).expect("link state serialises");
        let back: Vec<LinkState> = serde_json::from_slice(&json).expect("link state parses");
        assert_eq!(back, m);
    }
});
