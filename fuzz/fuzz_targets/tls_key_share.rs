//! The X25519MLKEM768 key shares of qkdnet's TLS (`qkdnet_etsi::pq`), which any
//! client (server side) or server (client side) sends before authentication:
//! any bytes are a key exchange or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_etsi::pq::X25519MLKEM768;

fuzz_target!(|data: &[u8]| {
    // As the server: the client's share.
    let _ = X25519MLKEM768.start_and_complete(data);
    // As the client: the server's share.
    if let Ok(kx) = X25519MLKEM768.start() {
        let _ = kx.complete(data);
    }
});
