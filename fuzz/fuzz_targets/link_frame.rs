//! Classical-channel frames (`qkdnet_link::auth::AuthChannel::open`): any
//! bytes, fed as a sequence of frames to Bob's channel, give messages or an
//! error, never a panic. The input is cut into frames by the header lengths
//! the way the TCP adapter reads them; the key is fixed, so a tagged frame
//! only passes by a forged tag (it will not), while provisional frames reach
//! the batch and message decoders and the run bound.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_link::auth::{AuthChannel, HEADER, Role, frame_len};

fuzz_target!(|data: &[u8]| {
    let secret = [0x42u8; AuthChannel::MIN_PRESHARED];
    let Ok(mut bob) = AuthChannel::from_preshared(Role::Bob, &secret) else {
        return;
    };
    let mut rest = data;
    while rest.len() >= HEADER {
        let mut header = [0u8; HEADER];
        header.copy_from_slice(&rest[..HEADER]);
        let Ok(total) = frame_len(&header) else { return };
        let take = total.min(rest.len());
        let (frame, tail) = rest.split_at(take);
        if bob.open(frame).is_err() {
            return;
        }
        rest = tail;
    }
});
