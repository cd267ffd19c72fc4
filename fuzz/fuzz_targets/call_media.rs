//! The `sm4` media relay (`qkdnet_call::media`) and the SDP it is set up from
//! (`qkdnet_call::sdp`), both from parties nobody vouches for: a datagram on the
//! relay port opens only if it was sealed under the call's key, which the
//! fuzzer does not know, so every input is dropped and counted, never a panic;
//! and the same bytes sealed by the sending edge open back to themselves. Any
//! body gives an audio stream or an error from `sdp::audio`, and `sdp::rewrite`
//! fails exactly on non-text, never leaving a key (`a=crypto:`) behind.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_call::media::{Direction, Protect, Unprotect, is_rtcp};
use qkdnet_call::sdp;
use qkdnet_media::Key256;

fuzz_target!(|data: &[u8]| {
    let key = Key256::new([0x42; 32]);
    let mut rx = Unprotect::new(&key, Direction::CallerToCallee);
    let mut p = data.to_vec();
    assert!(rx.open(&mut p).is_err(), "an unkeyed packet opened");
    let d = rx.dropped;
    assert_eq!(
        (d.malformed + d.auth + d.replay + d.ssrcs, rx.passed),
        (1, 0)
    );

    // The same bytes as a plain packet at the sending edge: if they are
    // accepted, they open at the receiver to what they were.
    let mut tx = Protect::new(&key, Direction::CallerToCallee);
    let mut sealed = data.to_vec();
    let ok = if is_rtcp(data) {
        tx.rtcp(&mut sealed)
    } else {
        tx.rtp(&mut sealed)
    };
    if ok.is_ok() {
        let mut rx = Unprotect::new(&key, Direction::CallerToCallee);
        let mut opened = sealed.clone();
        assert!(rx.open(&mut opened).is_ok(), "a sealed packet did not open");
        assert_eq!(opened, data);
        assert!(rx.open(&mut sealed).is_err(), "a replay opened");
    } else {
        assert_eq!(sealed, data, "a refused packet was changed");
    }

    let audio = sdp::audio(data);
    let relay = "127.0.0.1:40000".parse().expect("address");
    match sdp::rewrite(data, relay, "RTP/AVP") {
        Ok(out) => {
            assert_ne!(audio, Err(sdp::SdpError::NotText));
            let text = std::str::from_utf8(&out).expect("rewritten SDP is text");
            assert!(text.lines().all(|l| !l.starts_with("a=crypto:")));
            let _ = sdp::audio(&out);
        }
        Err(e) => {
            assert_eq!(e, sdp::SdpError::NotText);
            assert_eq!(audio, Err(sdp::SdpError::NotText));
        }
    }
});
