//! The security gateway's wan decoder (`qkdnet_gateway::wire`) and packet
//! opening (`qkdnet_gateway::sa`): datagrams from the wan, which anyone can
//! send. Parsing never panics; a control message that parses encodes back to
//! the same bytes; a data packet under a key the fuzzer does not know never
//! opens and never moves the replay window; and one the sending SA sealed
//! opens back to the same packet.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use qkdnet_gateway::sa::{EpochKeys, Inbound, Outbound, Role};
use qkdnet_gateway::wire::{Datagram, parse};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let later = now + Duration::from_secs(60);
    let keys = EpochKeys::derive(&[9; 32], 0x0102_0304, [1; 16], "gw-a", "gw-b");
    match parse(data) {
        Ok(Datagram::Control(c)) => assert_eq!(c.encode(), data, "control round trip"),
        Ok(Datagram::Data { seq, .. }) => {
            let mut rx = Inbound::new(&keys, Role::Responder, later);
            let mut d = data.to_vec();
            assert!(rx.open(now, seq, &mut d).is_err(), "a forged packet opened");
        }
        Err(_) => {}
    }
    // Whatever the bytes, as an IP packet they seal and open back (or are
    // refused as not IP, after authenticating).
    let mut tx = Outbound::new(&keys, Role::Initiator, later);
    let mut rx = Inbound::new(&keys, Role::Responder, later);
    let mut wire = Vec::new();
    tx.seal(now, data, 64, &mut wire).expect("seal");
    let Ok(Datagram::Data { seq, .. }) = parse(&wire) else {
        panic!("sealed packet does not parse as data");
    };
    if let Ok(p) = rx.open(now, seq, &mut wire) {
        assert!(data.starts_with(p), "opened to other bytes");
    }
});
