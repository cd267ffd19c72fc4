//! The `otp` media relay (`qkdnet_call::otp`) and the `sm4` rekey messages
//! (`qkdnet_call::rekey`): datagrams, pad announcements and rekey offers from
//! the far edge's network path, which nobody vouches for.
//! Under a pad the fuzzer does not know, every packet is dropped and counted,
//! never a panic, and no announcement or rekey message verifies; the same bytes protected by
//! the sending side under a pad both sides hold open back to themselves,
//! once.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_call::media::Direction;
use qkdnet_call::otp::{AnnounceKey, OtpRecv, OtpSend};
use qkdnet_media::Key256;
use zeroize::Zeroizing;

fn pad(seed: u8) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(
        (0..4096u32)
            .map(|i| (i as u8).wrapping_mul(29) ^ seed)
            .collect(),
    )
}

fuzz_target!(|data: &[u8]| {
    let mut rx = OtpRecv::new();
    rx.install(0, pad(1));
    let mut p = data.to_vec();
    assert!(rx.open(&mut p).is_err(), "an unpadded packet opened");
    assert_eq!(rx.passed, 0);

    let k = AnnounceKey::derive(&Key256::new([7; 32]), Direction::CalleeToCaller);
    assert!(k.decode(data).is_err(), "a forged announcement verified");
    let r =
        qkdnet_call::rekey::ControlKey::derive(&Key256::new([7; 32]), Direction::CallerToCallee);
    assert!(r.decode(data).is_err(), "a forged rekey message verified");

    let mut tx = OtpSend::new();
    tx.install(pad(2));
    let mut rx = OtpRecv::new();
    rx.install(0, pad(2));
    let mut sealed = data.to_vec();
    if tx.protect(&mut sealed).is_ok() {
        let mut opened = sealed.clone();
        assert!(
            rx.open(&mut opened).is_ok(),
            "a protected packet did not open"
        );
        assert_eq!(opened, data);
        assert!(rx.open(&mut sealed).is_err(), "a replay opened");
    } else {
        assert_eq!(sealed, data, "a refused packet was changed");
    }
});
