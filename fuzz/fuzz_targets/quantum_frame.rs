//! Frames of the emulated quantum channel (`qkdnet_net::quantum::read_frame`),
//! read from a stream as Bob's node does: any bytes give frames, a clean end or
//! an error, never a panic; every frame read re-encodes to one that reads back
//! the same (the record format inside has slack, so bytes are not compared).
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_net::quantum::{encode, read_frame};

fuzz_target!(|data: &[u8]| {
    let mut r = std::io::Cursor::new(data);
    // a stream holds any number of frames; a bounded number is enough here
    for _ in 0..64 {
        let f = match read_frame(&mut r) {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => return,
        };
        let bytes = encode(f.block, f.span, &f.detections).expect("a frame read re-encodes");
        let back = read_frame(&mut bytes.as_slice())
            .expect("a re-encoded frame reads")
            .expect("a re-encoded frame is not empty");
        assert_eq!(back.block, f.block);
        assert_eq!(back.span, f.span);
        assert_eq!(back.detections, f.detections);
    }
});
