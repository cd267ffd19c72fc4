//! Classical-channel messages and their binary encoding.
//!
//! Every message of the post-processing protocol is one variant of [`Msg`],
//! tagged with the block it belongs to so that many blocks can be in flight
//! on one connection. The encoding is hand-written (a tag byte, then
//! little-endian fields, bit strings as a bit count and packed bytes) because
//! it is the exact byte string the authenticator covers and the fuzzers
//! attack: it must be canonical, bounded and never panic on any input.

use qkdnet_postproc::bits::BitVec;
use qkdnet_postproc::cascade::{ParityQuery, ParityReply, ParityRequest};

use crate::LinkError;

/// Largest bit string a message may carry (2^30 bits = 128 MiB).
pub const MAX_BITS: u64 = 1 << 30;
/// Largest list a message may carry.
pub const MAX_ITEMS: u64 = 1 << 26;
/// Longest abort reason carried, in bytes (longer reasons are cut when encoded).
pub const MAX_REASON: usize = 1024;

/// Which reconciliation algorithm a block uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciler {
    /// Cascade, Brassard–Salvail schedule.
    Cascade,
    /// Cascade, optimised schedule of Martinez-Mateo et al. 2015.
    CascadeOpt,
    /// Rate-adaptive LDPC syndrome decoding.
    Ldpc,
}

impl Reconciler {
    /// Parses `cascade|cascade-opt|ldpc`.
    pub fn parse(s: &str) -> Result<Reconciler, LinkError> {
        match s {
            "cascade" => Ok(Reconciler::Cascade),
            "cascade-opt" => Ok(Reconciler::CascadeOpt),
            "ldpc" => Ok(Reconciler::Ldpc),
            _ => Err(LinkError::Usage(format!(
                "unknown reconciler '{s}' (cascade, cascade-opt, ldpc)"
            ))),
        }
    }
    fn code(self) -> u8 {
        match self {
            Reconciler::Cascade => 0,
            Reconciler::CascadeOpt => 1,
            Reconciler::Ldpc => 2,
        }
    }
    fn from_code(c: u8) -> Result<Self, LinkError> {
        Ok(match c {
            0 => Reconciler::Cascade,
            1 => Reconciler::CascadeOpt,
            2 => Reconciler::Ldpc,
            _ => return Err(LinkError::Malformed(format!("unknown reconciler code {c}"))),
        })
    }
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)] // each variant's doc says what its fields carry
pub enum Msg {
    /// Bob → Alice (record mode): the gates of this block in which he detected, and his bases (1 = X).
    Detections {
        block: u64,
        gates: Vec<u64>,
        bases: BitVec,
    },
    /// Alice → Bob: her basis per detection (1 = X) and intensity class (2 bits each).
    SiftReply {
        block: u64,
        bases: BitVec,
        classes: Vec<u8>,
    },
    /// Bob → Alice (offline mode): a block of `n` sifted bits is ready, with a
    /// seed (Bob's) choosing the `sample` positions he will disclose.
    Start {
        block: u64,
        n: u64,
        sample: u64,
        seed: u64,
    },
    /// Bob → Alice: his disclosed bits (record mode: the test basis; offline: the sample).
    TestBits { block: u64, bits: BitVec },
    /// Alice → Bob: errors per class in the disclosed bits, and the reconciliation to run.
    Estimate {
        block: u64,
        errors: Vec<u64>,
        reconciler: Reconciler,
        qber_ppm: u32,
        seed: u64,
    },
    /// Bob → Alice: Cascade parity queries.
    Parities { block: u64, request: ParityRequest },
    /// Alice → Bob: Cascade parities.
    ParityAnswers { block: u64, reply: ParityReply },
    /// Alice → Bob: LDPC syndromes, one per frame.
    Syndromes { block: u64, syndromes: Vec<BitVec> },
    /// Bob → Alice: reconciliation finished; bits disclosed in total, errors
    /// corrected, and (LDPC) the frames that did not decode, which both drop.
    Reconciled {
        block: u64,
        leaked_bits: u64,
        corrected: u64,
        failed_frames: Vec<u32>,
    },
    /// Alice → Bob: verification hash key and tag, key length, Toeplitz seed.
    Confirm {
        block: u64,
        verify_key: [u8; 16],
        tag_bits: u32,
        tag: u128,
        key_bits: u64,
        pa_seed: BitVec,
    },
    /// Bob → Alice: the verification outcome.
    Verified { block: u64, ok: bool },
    /// Either side: this block is abandoned; no key leaves it.
    Abort { block: u64, reason: String },
}

impl Msg {
    /// The block the message belongs to.
    pub fn block(&self) -> u64 {
        match self {
            Msg::Detections { block, .. }
            | Msg::SiftReply { block, .. }
            | Msg::Start { block, .. }
            | Msg::TestBits { block, .. }
            | Msg::Estimate { block, .. }
            | Msg::Parities { block, .. }
            | Msg::ParityAnswers { block, .. }
            | Msg::Syndromes { block, .. }
            | Msg::Reconciled { block, .. }
            | Msg::Confirm { block, .. }
            | Msg::Verified { block, .. }
            | Msg::Abort { block, .. } => *block,
        }
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Detections { .. } => "Detections",
            Msg::SiftReply { .. } => "SiftReply",
            Msg::Start { .. } => "Start",
            Msg::TestBits { .. } => "TestBits",
            Msg::Estimate { .. } => "Estimate",
            Msg::Parities { .. } => "Parities",
            Msg::ParityAnswers { .. } => "ParityAnswers",
            Msg::Syndromes { .. } => "Syndromes",
            Msg::Reconciled { .. } => "Reconciled",
            Msg::Confirm { .. } => "Confirm",
            Msg::Verified { .. } => "Verified",
            Msg::Abort { .. } => "Abort",
        }
    }

    /// Encodes the message (canonical: decode(encode(m)) == m).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = W(out);
        match self {
            Msg::Detections {
                block,
                gates,
                bases,
            } => {
                w.u8(1);
                w.u64(*block);
                w.u64(gates.len() as u64);
                let mut prev = 0u64;
                for (i, g) in gates.iter().enumerate() {
                    // delta-coded varints; the first is absolute
                    w.varint(if i == 0 { *g } else { g.wrapping_sub(prev) });
                    prev = *g;
                }
                w.bits(bases);
            }
            Msg::SiftReply {
                block,
                bases,
                classes,
            } => {
                w.u8(2);
                w.u64(*block);
                w.bits(bases);
                w.u64(classes.len() as u64);
                w.0.extend_from_slice(classes);
            }
            Msg::Start {
                block,
                n,
                sample,
                seed,
            } => {
                w.u8(3);
                w.u64(*block);
                w.u64(*n);
                w.u64(*sample);
                w.u64(*seed);
            }
            Msg::TestBits { block, bits } => {
                w.u8(4);
                w.u64(*block);
                w.bits(bits);
            }
            Msg::Estimate {
                block,
                errors,
                reconciler,
                qber_ppm,
                seed,
            } => {
                w.u8(5);
                w.u64(*block);
                w.u64(errors.len() as u64);
                for e in errors {
                    w.u64(*e);
                }
                w.u8(reconciler.code());
                w.u32(*qber_ppm);
                w.u64(*seed);
            }
            Msg::Parities { block, request } => {
                w.u8(6);
                w.u64(*block);
                w.u64(request.round);
                w.u64(request.queries.len() as u64);
                for q in &request.queries {
                    match *q {
                        ParityQuery::Blocks { pass } => {
                            w.u8(0);
                            w.u16(pass);
                        }
                        ParityQuery::Range { pass, start, end } => {
                            w.u8(1);
                            w.u16(pass);
                            w.u32(start);
                            w.u32(end);
                        }
                        // a query kind this build cannot encode never reaches the wire
                        _ => w.u8(0xFF),
                    }
                }
            }
            Msg::ParityAnswers { block, reply } => {
                w.u8(7);
                w.u64(*block);
                w.u64(reply.round);
                w.bits(&reply.parities);
            }
            Msg::Syndromes { block, syndromes } => {
                w.u8(8);
                w.u64(*block);
                w.u64(syndromes.len() as u64);
                for s in syndromes {
                    w.bits(s);
                }
            }
            Msg::Reconciled {
                block,
                leaked_bits,
                corrected,
                failed_frames,
            } => {
                w.u8(9);
                w.u64(*block);
                w.u64(*leaked_bits);
                w.u64(*corrected);
                w.u64(failed_frames.len() as u64);
                for f in failed_frames {
                    w.u32(*f);
                }
            }
            Msg::Confirm {
                block,
                verify_key,
                tag_bits,
                tag,
                key_bits,
                pa_seed,
            } => {
                w.u8(10);
                w.u64(*block);
                w.0.extend_from_slice(verify_key);
                w.u32(*tag_bits);
                w.0.extend_from_slice(&tag.to_le_bytes());
                w.u64(*key_bits);
                w.bits(pa_seed);
            }
            Msg::Verified { block, ok } => {
                w.u8(11);
                w.u64(*block);
                w.u8(u8::from(*ok));
            }
            Msg::Abort { block, reason } => {
                w.u8(12);
                w.u64(*block);
                // at most MAX_REASON bytes, cut at a character boundary so the
                // bytes stay UTF-8 (the decoder refuses anything else)
                let mut cut = reason.len().min(MAX_REASON);
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                let r = &reason.as_bytes()[..cut];
                w.u64(r.len() as u64);
                w.0.extend_from_slice(r);
            }
        }
    }

    /// Decodes one message; anything malformed, non-canonical, oversized or
    /// trailing is an error, so whatever decodes re-encodes to the same bytes.
    pub fn decode(bytes: &[u8]) -> Result<Msg, LinkError> {
        let mut r = R { b: bytes };
        let tag = r.u8()?;
        let block = r.u64()?;
        let m = match tag {
            1 => {
                let n = r.count(1)?;
                let mut gates = Vec::with_capacity(n);
                let mut prev = 0u64;
                for i in 0..n {
                    let d = r.varint()?;
                    let g = if i == 0 {
                        d
                    } else {
                        prev.checked_add(d).filter(|_| d > 0).ok_or_else(|| {
                            LinkError::Malformed("detection gates must increase".into())
                        })?
                    };
                    gates.push(g);
                    prev = g;
                }
                let bases = r.bits()?;
                if bases.len() != n {
                    return Err(LinkError::Malformed(
                        "one basis per detection expected".into(),
                    ));
                }
                Msg::Detections {
                    block,
                    gates,
                    bases,
                }
            }
            2 => {
                let bases = r.bits()?;
                let n = r.count(1)?;
                let classes = r.take(n)?.to_vec();
                if classes.iter().any(|&c| c > 3) || classes.len() != bases.len() {
                    return Err(LinkError::Malformed(
                        "class list does not match the bases".into(),
                    ));
                }
                Msg::SiftReply {
                    block,
                    bases,
                    classes,
                }
            }
            3 => Msg::Start {
                block,
                n: r.u64()?,
                sample: r.u64()?,
                seed: r.u64()?,
            },
            4 => Msg::TestBits {
                block,
                bits: r.bits()?,
            },
            5 => {
                let n = r.count(8)?;
                if n > 4 {
                    return Err(LinkError::Malformed(format!(
                        "{n} error counts (at most 4 classes)"
                    )));
                }
                let errors = (0..n).map(|_| r.u64()).collect::<Result<_, _>>()?;
                Msg::Estimate {
                    block,
                    errors,
                    reconciler: Reconciler::from_code(r.u8()?)?,
                    qber_ppm: r.u32()?,
                    seed: r.u64()?,
                }
            }
            6 => {
                let round = r.u64()?;
                let n = r.count(3)?;
                let mut queries = Vec::with_capacity(n);
                for _ in 0..n {
                    queries.push(match r.u8()? {
                        0 => ParityQuery::Blocks { pass: r.u16()? },
                        1 => ParityQuery::Range {
                            pass: r.u16()?,
                            start: r.u32()?,
                            end: r.u32()?,
                        },
                        k => {
                            return Err(LinkError::Malformed(format!(
                                "unknown parity query kind {k}"
                            )));
                        }
                    });
                }
                Msg::Parities {
                    block,
                    request: ParityRequest { round, queries },
                }
            }
            7 => Msg::ParityAnswers {
                block,
                reply: ParityReply {
                    round: r.u64()?,
                    parities: r.bits()?,
                },
            },
            8 => {
                let n = r.count(4)?;
                let syndromes = (0..n).map(|_| r.bits()).collect::<Result<_, _>>()?;
                Msg::Syndromes { block, syndromes }
            }
            9 => {
                let leaked_bits = r.u64()?;
                let corrected = r.u64()?;
                let n = r.count(4)?;
                let failed_frames = (0..n).map(|_| r.u32()).collect::<Result<_, _>>()?;
                Msg::Reconciled {
                    block,
                    leaked_bits,
                    corrected,
                    failed_frames,
                }
            }
            10 => {
                let mut verify_key = [0u8; 16];
                verify_key.copy_from_slice(r.take(16)?);
                let tag_bits = r.u32()?;
                let mut t = [0u8; 16];
                t.copy_from_slice(r.take(16)?);
                Msg::Confirm {
                    block,
                    verify_key,
                    tag_bits,
                    tag: u128::from_le_bytes(t),
                    key_bits: r.u64()?,
                    pa_seed: r.bits()?,
                }
            }
            11 => Msg::Verified {
                block,
                ok: match r.u8()? {
                    0 => false,
                    1 => true,
                    v => return Err(LinkError::Malformed(format!("boolean byte {v}"))),
                },
            },
            12 => {
                let n = r.count(1)?;
                if n > MAX_REASON {
                    return Err(LinkError::Malformed("abort reason too long".into()));
                }
                // strict, not lossy: a lossy decode would re-encode differently
                let reason = String::from_utf8(r.take(n)?.to_vec())
                    .map_err(|_| LinkError::Malformed("abort reason is not UTF-8".into()))?;
                Msg::Abort { block, reason }
            }
            t => return Err(LinkError::Malformed(format!("unknown message type {t}"))),
        };
        if !r.b.is_empty() {
            return Err(LinkError::Malformed(format!(
                "{} trailing bytes after {}",
                r.b.len(),
                m.name()
            )));
        }
        Ok(m)
    }
}

struct W<'a>(&'a mut Vec<u8>);
impl W<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn varint(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7F) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(b);
                return;
            }
            self.0.push(b | 0x80);
        }
    }
    fn bits(&mut self, b: &BitVec) {
        self.u64(b.len() as u64);
        let bytes = b.to_bytes();
        self.0.extend_from_slice(&bytes[..b.len().div_ceil(8)]);
    }
}

struct R<'a> {
    b: &'a [u8],
}
impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], LinkError> {
        if self.b.len() < n {
            return Err(LinkError::Malformed("message is truncated".into()));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], LinkError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, LinkError> {
        Ok(self.arr::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, LinkError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, LinkError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, LinkError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    /// A list length, checked against the bytes left (`min_item` bytes per item).
    fn count(&mut self, min_item: usize) -> Result<usize, LinkError> {
        let n = self.u64()?;
        if n > MAX_ITEMS || n.saturating_mul(min_item as u64) > self.b.len() as u64 {
            return Err(LinkError::Malformed(format!(
                "list of {n} items does not fit the message"
            )));
        }
        Ok(n as usize)
    }
    fn varint(&mut self) -> Result<u64, LinkError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            if shift == 63 && b > 1 {
                break;
            }
            v |= u64::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                // canonical: the shortest form, so no final zero group
                if b == 0 && shift > 0 {
                    return Err(LinkError::Malformed("varint is not minimal".into()));
                }
                return Ok(v);
            }
        }
        Err(LinkError::Malformed("varint overflows 64 bits".into()))
    }
    fn bits(&mut self) -> Result<BitVec, LinkError> {
        let n = self.u64()?;
        if n > MAX_BITS {
            return Err(LinkError::Malformed(format!(
                "bit string of {n} bits is too long"
            )));
        }
        let bytes = self.take((n as usize).div_ceil(8))?;
        let v = BitVec::from_bytes(bytes, n as usize)
            .map_err(|e| LinkError::Malformed(format!("bit string: {e}")))?;
        // canonical: padding bits must be zero
        if v.to_bytes()[..bytes.len()] != *bytes {
            return Err(LinkError::Malformed(
                "non-zero padding in a bit string".into(),
            ));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(m: &Msg) -> Vec<u8> {
        let mut v = Vec::new();
        m.encode(&mut v);
        v
    }

    /// Found by fuzz target `link_msg`: an abort reason that is not UTF-8 was
    /// decoded lossily, so the message re-encoded to different bytes.
    #[test]
    fn fuzz_link_msg_abort_reason_must_be_utf8() {
        let crash = [
            12, 41, 9, 11, 1, 0, 12, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 0,
        ];
        assert!(matches!(Msg::decode(&crash), Err(LinkError::Malformed(_))));
    }

    /// An over-long reason is cut at a character boundary, so the message still
    /// decodes (to the cut reason) and re-encodes to the same bytes.
    #[test]
    fn long_abort_reason_is_cut_at_a_character_boundary() {
        // 'é' is two bytes: byte MAX_REASON falls inside one after the 'x'
        let reason = format!("x{}", "é".repeat(MAX_REASON));
        let bytes = encoded(&Msg::Abort { block: 3, reason });
        match Msg::decode(&bytes).expect("decodes") {
            Msg::Abort { block: 3, reason } => {
                assert_eq!(reason.len(), MAX_REASON - 1);
                assert_eq!(encoded(&Msg::Abort { block: 3, reason }), bytes);
            }
            m => panic!("decoded {m:?}"),
        }
    }

    /// Byte-for-byte canonicity, as fuzz target `link_msg` checks it: a varint
    /// with a redundant zero group (0x83 0x00 for 3) used to decode.
    #[test]
    fn non_minimal_varint_is_refused() {
        let m = Msg::Detections {
            block: 1,
            gates: vec![3],
            bases: BitVec::zeros(1),
        };
        let good = encoded(&m);
        assert_eq!(Msg::decode(&good).expect("decodes"), m);
        // tag, block, count, then the varint 0x03 at offset 17
        assert_eq!(good[17], 3);
        let mut bad = good[..17].to_vec();
        bad.extend_from_slice(&[0x83, 0x00]);
        bad.extend_from_slice(&good[18..]);
        assert!(matches!(Msg::decode(&bad), Err(LinkError::Malformed(_))));
        // the largest value still decodes, one past it does not
        let max = Msg::Detections {
            block: 1,
            gates: vec![u64::MAX],
            bases: BitVec::zeros(1),
        };
        assert_eq!(Msg::decode(&encoded(&max)).expect("decodes"), max);
        let mut over = good[..17].to_vec();
        over.extend_from_slice(&[0xFF; 9]);
        over.push(0x02);
        over.extend_from_slice(&good[18..]);
        assert!(matches!(Msg::decode(&over), Err(LinkError::Malformed(_))));
    }

    #[test]
    fn every_kind_round_trips_byte_for_byte() {
        let bits = |s: &str| BitVec::from_ascii(s).expect("0/1 text");
        let all = [
            Msg::Detections {
                block: 7,
                gates: vec![3, 10, 400],
                bases: bits("011"),
            },
            Msg::SiftReply {
                block: 7,
                bases: bits("10"),
                classes: vec![0, 3],
            },
            Msg::Start {
                block: 1,
                n: 100,
                sample: 5,
                seed: 42,
            },
            Msg::TestBits {
                block: 2,
                bits: bits("1011001110"),
            },
            Msg::Estimate {
                block: 2,
                errors: vec![3, 0],
                reconciler: Reconciler::Ldpc,
                qber_ppm: 21_000,
                seed: 9,
            },
            Msg::Parities {
                block: 3,
                request: ParityRequest {
                    round: 1,
                    queries: vec![
                        ParityQuery::Blocks { pass: 0 },
                        ParityQuery::Range {
                            pass: 1,
                            start: 8,
                            end: 16,
                        },
                    ],
                },
            },
            Msg::ParityAnswers {
                block: 3,
                reply: ParityReply {
                    round: 1,
                    parities: bits("101"),
                },
            },
            Msg::Syndromes {
                block: 4,
                syndromes: vec![bits("1100101"), bits("")],
            },
            Msg::Reconciled {
                block: 4,
                leaked_bits: 1234,
                corrected: 17,
                failed_frames: vec![2, 5],
            },
            Msg::Confirm {
                block: 5,
                verify_key: [0x5a; 16],
                tag_bits: 64,
                tag: 0x0123_4567_89ab_cdef,
                key_bits: 4096,
                pa_seed: bits("10101"),
            },
            Msg::Verified {
                block: 5,
                ok: false,
            },
            Msg::Abort {
                block: 6,
                reason: "QBER too high: 12 %".into(),
            },
        ];
        for m in all {
            let bytes = encoded(&m);
            let back = Msg::decode(&bytes).expect("decodes");
            assert_eq!(back, m);
            assert_eq!(encoded(&back), bytes);
        }
    }
}
