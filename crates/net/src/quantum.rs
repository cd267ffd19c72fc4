//! The emulated quantum channel between two nodes.
//!
//! There is no photon hardware, so one process has to play source, fibre and
//! detectors. In qkdnet that is Alice's node: it runs the event simulator
//! (`qkdnet_optics::sim`), which knows what Alice sent, applies the channel and
//! Bob's detectors, and streams **only what Bob's detectors recorded** to Bob's
//! node over its own TCP connection: the stand-in for the fibre. Bob's process
//! never sees Alice's choices; everything else between the two crosses the
//! authenticated classical channel. This connection is not authenticated, just
//! as a fibre is not: tampering with it is an attack on the quantum channel and
//! shows up in the QBER and the decoy statistics.
//!
//! Wire format, one frame per block (all integers little-endian):
//!
//! ```text
//! u64 block number
//! u32 length L (at most MAX_FRAME_BYTES)
//! L bytes: Bob's detection record for the block's gates, in the versioned
//!          record format of qkdnet_optics::record (BobWriter / BobReader)
//! ```

use std::io::{Read, Write};

use qkdnet_optics::record::{BobReader, BobWriter, Detection, Span};

use crate::NetError;

/// Largest accepted frame body (a 1e9-gate block at high gain fits).
pub const MAX_FRAME_BYTES: u32 = 512 << 20;

/// Body bytes reserved before any arrive (the buffer grows as they do).
const INITIAL_BODY_BYTES: usize = 1 << 20;

/// One block's detections as they cross the emulated fibre.
pub struct QuantumFrame {
    /// Block number (the classical protocol uses the same).
    pub block: u64,
    /// The gates this block covers.
    pub span: Span,
    /// Bob's detections, in gate order.
    pub detections: Vec<Detection>,
}

/// Encodes one frame.
pub fn encode(block: u64, span: Span, detections: &[Detection]) -> Result<Vec<u8>, NetError> {
    let mut w = BobWriter::new(Vec::with_capacity(detections.len() * 3 + 64), span)?;
    for d in detections {
        w.push(*d)?;
    }
    let body = w.finish()?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_FRAME_BYTES)
        .ok_or_else(|| NetError::Config("block too large for one quantum frame".into()))?;
    let mut out = Vec::with_capacity(12 + body.len());
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Writes one frame.
pub fn write_frame(
    w: &mut impl Write,
    block: u64,
    span: Span,
    detections: &[Detection],
) -> Result<(), NetError> {
    w.write_all(&encode(block, span, detections)?)?;
    w.flush()?;
    Ok(())
}

/// Decodes a frame body (the record bytes) for `block`.
pub fn decode_body(block: u64, body: &[u8]) -> Result<QuantumFrame, NetError> {
    let bad = |e: qkdnet_optics::OpticsError| {
        NetError::Peer(format!("quantum channel: block {block}: {e}"))
    };
    let r = BobReader::new(body).map_err(bad)?;
    let span = r.span;
    let detections = r.read_all().map_err(bad)?;
    Ok(QuantumFrame {
        block,
        span,
        detections,
    })
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub fn read_frame(r: &mut impl Read) -> Result<Option<QuantumFrame>, NetError> {
    let mut head = [0u8; 12];
    match r.read_exact(&mut head[..1]) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut head[1..]).map_err(truncated)?;
    let block = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes"));
    if len > MAX_FRAME_BYTES {
        return Err(NetError::Peer(format!(
            "quantum channel: frame of {len} bytes exceeds the {MAX_FRAME_BYTES}-byte limit"
        )));
    }
    // The buffer grows with the bytes that actually arrive: a 12-byte header
    // declaring a huge frame must not make Bob allocate it up front.
    let mut body = Vec::with_capacity((len as usize).min(INITIAL_BODY_BYTES));
    r.take(u64::from(len))
        .read_to_end(&mut body)
        .map_err(truncated)?;
    if body.len() != len as usize {
        return Err(closed_inside_a_frame());
    }
    decode_body(block, &body).map(Some)
}

fn closed_inside_a_frame() -> NetError {
    NetError::Peer("quantum channel closed inside a frame".into())
}

fn truncated(e: std::io::Error) -> NetError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        closed_inside_a_frame()
    } else {
        e.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qkdnet_optics::record::{Basis, Clicks};

    #[test]
    fn frames_round_trip_and_bad_frames_are_refused() {
        let span = Span {
            first_gate: 1000,
            gates: 500,
            rep_rate_hz: 1e9,
        };
        let dets = vec![
            Detection {
                gate: 1003,
                basis: Basis::Z,
                clicks: Clicks::D0,
            },
            Detection {
                gate: 1499,
                basis: Basis::X,
                clicks: Clicks::Both,
            },
        ];
        let bytes = encode(7, span, &dets).expect("encode");
        let f = read_frame(&mut &bytes[..]).expect("read").expect("a frame");
        assert_eq!(f.block, 7);
        assert_eq!(f.detections, dets);
        assert_eq!(f.span.first_gate, 1000);
        assert!(read_frame(&mut &bytes[..0]).expect("eof").is_none());
        for cut in [5, 12, bytes.len() - 1] {
            assert!(read_frame(&mut &bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = bytes.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_frame(&mut &huge[..]).is_err());
    }

    /// Found while fuzzing `quantum_frame`: a bare header declaring the largest
    /// frame made the reader allocate all of it before reading a byte. It is
    /// now refused as truncated, the buffer sized by the bytes that came.
    #[test]
    fn largest_declared_frame_without_body_is_truncated() {
        let mut head = 7u64.to_le_bytes().to_vec();
        head.extend_from_slice(&MAX_FRAME_BYTES.to_le_bytes());
        head.extend_from_slice(b"QKDNET");
        match read_frame(&mut &head[..]) {
            Err(NetError::Peer(m)) => assert!(m.contains("inside a frame"), "{m}"),
            r => panic!(
                "expected a truncation error, got {:?}",
                r.map(|f| f.is_some())
            ),
        }
    }
}
