//! The live-stream decoders (`qkdnet_apps::stream_wire`), run before any key is
//! known: any bytes give a decoded stream or an error, never a panic; whatever
//! decodes re-encodes to the same bytes (handshake, frame headers), the decoded
//! parts cover the input exactly, and the piecewise decoders agree with
//! `decode_stream`.
#![no_main]
use libfuzzer_sys::fuzz_target;
use qkdnet_apps::stream_wire::{
    FRAME_HEADER_LEN, FrameHeader, Handshake, MAGIC, decode_frame, decode_stream,
};

fuzz_target!(|data: &[u8]| {
    // The piecewise decoders on their own, at the start of the input.
    if let Ok(Some((h, n))) = Handshake::decode(data) {
        assert_eq!(h.encode().expect("a decoded handshake encodes"), &data[..n]);
    }
    if let Ok(Some(h)) = FrameHeader::decode(data) {
        assert_eq!(h.encode(), data[..FRAME_HEADER_LEN]);
        assert!(h.kind.payload_range().contains(&h.payload_len));
        match decode_frame(data) {
            Ok(Some((h2, f))) => {
                assert_eq!(h2, h);
                assert_eq!(f, &data[..h.frame_len()]);
            }
            Ok(None) => assert!(data.len() < h.frame_len()),
            Err(e) => panic!("decode_frame fails where its header decodes: {e}"),
        }
    }

    let Ok(d) = decode_stream(data) else {
        return;
    };
    let mut pos = 0;
    if let Some(h) = &d.handshake {
        let enc = h.encode().expect("a decoded handshake encodes");
        assert_eq!(enc, &data[..enc.len()]);
        pos = enc.len();
    } else if !data.is_empty() && data.len() < MAGIC.len() && MAGIC.starts_with(data) {
        // An incomplete magic: nothing decoded, all of it trailing.
        assert!(d.frames.is_empty());
    }
    for h in &d.frames {
        let (h2, f) = decode_frame(&data[pos..])
            .expect("a decoded frame decodes again")
            .expect("a decoded frame is complete");
        assert_eq!(&h2, h);
        assert_eq!(f[..FRAME_HEADER_LEN], h.encode());
        pos += f.len();
    }
    assert_eq!(pos + d.trailing, data.len(), "{d:?}");
});
