//! Detection records: the interface between the optics and the link layer.
//!
//! Real QKD hardware produces two logs, one per side, and nothing else crosses
//! between the parties except through the classical protocol. qkdnet's
//! simulator writes the same two logs, in this documented, versioned binary
//! format, so that hardware output converted to it can replace the simulator
//! unchanged. All integers are little-endian; `f64` is IEEE 754 binary64.
//!
//! **Common header (32 bytes)**: magic `QKDNET` (6 bytes), kind (`A` Alice,
//! `B` Bob), format version (1), first gate index (u64), number of gates
//! covered (u64), pulse repetition rate in Hz (f64).
//!
//! **Alice (`A`)** then holds: class count (u8, 1–4); per class μ (f64),
//! probability (f64), label length (u8, ≤ 64) and UTF-8 label; her Z-basis
//! probability (f64); and a generator byte:
//! - `1` *seeded*: a u64 seed. Her choice for gate g is derived from
//!   z = SplitMix64(seed + g·0x9E3779B97F4A7C15) (the SplitMix64 output
//!   function): the class is the first k with (z >> 32) < ⌊2³²·Σ_{j≤k} p_j⌋,
//!   the basis is Z iff ((z >> 1) & (2³¹−1)) < ⌊2³¹·q_Z⌋, and the bit is z & 1.
//!   This is how a transmitter driven by a seeded generator logs a trillion
//!   pulses in 8 bytes; the seed is Alice's secret and never leaves her.
//! - `2` *explicit*: one byte per gate (bits 0–1 class, bit 2 basis (1 = X),
//!   bit 3 bit value, bits 4–7 zero): what hardware logs.
//!
//! **Bob (`B`)** then holds chunks: a u32 event count c (1–65,536) and c
//! events, each a LEB128 varint gap (gate − previous gate − 1; the first gate
//! counts from the header's first gate) and a byte (bits 0–1 clicks: 1 = D0,
//! 2 = D1, 3 = both; bit 2 basis, 1 = X; bits 3–7 zero). A chunk of count 0
//! ends the stream, followed by the total event count (u64) as a check, so a
//! truncated file is always detected.

use std::io::{Read, Write};

use crate::OpticsError;

const MAGIC: &[u8; 6] = b"QKDNET";
/// The record format version this crate writes and reads.
pub const VERSION: u8 = 1;
const CHUNK: usize = 65_536;
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// A measurement or preparation basis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Basis {
    /// Rectilinear: the key basis.
    Z,
    /// Diagonal: the test basis.
    X,
}

/// Which of Bob's detectors fired in a gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Clicks {
    /// Only D0 (bit 0).
    D0,
    /// Only D1 (bit 1).
    D1,
    /// Both (a double click; the link layer assigns a random bit).
    Both,
}

/// One gate in which Bob saw at least one click.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detection {
    /// Gate index.
    pub gate: u64,
    /// Bob's measurement basis.
    pub basis: Basis,
    /// Which detectors fired.
    pub clicks: Clicks,
}

/// What Alice prepared in one gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PulseChoice {
    /// Intensity class index (0 = signal).
    pub class: u8,
    /// Preparation basis.
    pub basis: Basis,
    /// Bit value.
    pub bit: u8,
}

/// The span of gates a record covers and the clock that numbers them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    /// First gate index.
    pub first_gate: u64,
    /// Number of gates.
    pub gates: u64,
    /// Repetition rate in Hz.
    pub rep_rate_hz: f64,
}

/// How Alice's choices are logged.
#[derive(Debug, Clone, PartialEq)]
pub enum AliceLog {
    /// Derived from a seed (see the module doc).
    Seeded(u64),
    /// One byte per gate.
    Explicit(Vec<u8>),
}

/// Alice's record: what she sent.
#[derive(Debug, Clone, PartialEq)]
pub struct AliceRecord {
    /// Gates covered.
    pub span: Span,
    /// Intensity classes: (label, μ, probability).
    pub classes: Vec<(String, f64, f64)>,
    /// Probability of the Z basis.
    pub basis_prob_z: f64,
    /// The log itself.
    pub log: AliceLog,
    thresholds: [u64; 4],
    basis_threshold: u32,
}

/// SplitMix64's output function.
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl AliceRecord {
    /// Builds a record, checking the class table.
    pub fn new(
        span: Span,
        classes: Vec<(String, f64, f64)>,
        basis_prob_z: f64,
        log: AliceLog,
    ) -> Result<AliceRecord, OpticsError> {
        let bad = |m: String| OpticsError::Record(m);
        if classes.is_empty() || classes.len() > 4 {
            return Err(bad(format!(
                "Alice's record must have 1 to 4 intensity classes, has {}",
                classes.len()
            )));
        }
        let mut cum = 0.0;
        let mut thresholds = [u64::MAX; 4];
        for (k, (label, mu, p)) in classes.iter().enumerate() {
            if !(mu.is_finite() && *mu >= 0.0 && (0.0..=1.0).contains(p)) || label.len() > 64 {
                return Err(bad(format!("class {k} ('{label}') has μ = {mu}, p = {p}")));
            }
            cum += p;
            thresholds[k] = ((cum * 4_294_967_296.0).round() as u64).min(1 << 32);
        }
        if (cum - 1.0).abs() > 1e-9 {
            return Err(bad(format!("class probabilities sum to {cum}, not 1")));
        }
        thresholds[classes.len() - 1] = 1 << 32;
        if !(0.0..=1.0).contains(&basis_prob_z) {
            return Err(bad(format!(
                "Z-basis probability {basis_prob_z} is not a probability"
            )));
        }
        if !(span.rep_rate_hz.is_finite() && span.rep_rate_hz > 0.0) {
            return Err(bad(format!("repetition rate {} Hz", span.rep_rate_hz)));
        }
        if let AliceLog::Explicit(bytes) = &log {
            if bytes.len() as u64 != span.gates {
                return Err(bad(format!(
                    "explicit log has {} gates, header says {}",
                    bytes.len(),
                    span.gates
                )));
            }
            if let Some(i) = bytes
                .iter()
                .position(|&b| b & 0xF0 != 0 || (b & 3) as usize >= classes.len())
            {
                return Err(bad(format!("explicit log byte {i} is malformed")));
            }
        }
        Ok(AliceRecord {
            span,
            classes,
            basis_prob_z,
            log,
            thresholds,
            basis_threshold: ((basis_prob_z * 2_147_483_648.0).round() as u64).min(1 << 31) as u32,
        })
    }

    /// What Alice sent in `gate`, or `None` outside the record's span.
    #[inline]
    pub fn choice(&self, gate: u64) -> Option<PulseChoice> {
        let off = gate.checked_sub(self.span.first_gate)?;
        if off >= self.span.gates {
            return None;
        }
        Some(match &self.log {
            AliceLog::Seeded(seed) => self.seeded_choice(*seed, gate),
            AliceLog::Explicit(bytes) => {
                let b = bytes[off as usize];
                PulseChoice {
                    class: b & 3,
                    basis: if b & 4 != 0 { Basis::X } else { Basis::Z },
                    bit: (b >> 3) & 1,
                }
            }
        })
    }

    #[inline]
    fn seeded_choice(&self, seed: u64, gate: u64) -> PulseChoice {
        let z = splitmix64(seed.wrapping_add(gate.wrapping_mul(GOLDEN)));
        let u = z >> 32;
        let class = self.thresholds.iter().position(|&t| u < t).unwrap_or(0) as u8;
        let basis = if (((z >> 1) & 0x7FFF_FFFF) as u32) < self.basis_threshold {
            Basis::Z
        } else {
            Basis::X
        };
        PulseChoice {
            class,
            basis,
            bit: (z & 1) as u8,
        }
    }

    /// Writes the record.
    pub fn write_to(&self, w: &mut impl Write) -> Result<(), OpticsError> {
        write_header(w, b'A', &self.span)?;
        w.write_all(&[self.classes.len() as u8])?;
        for (label, mu, p) in &self.classes {
            w.write_all(&mu.to_le_bytes())?;
            w.write_all(&p.to_le_bytes())?;
            w.write_all(&[label.len() as u8])?;
            w.write_all(label.as_bytes())?;
        }
        w.write_all(&self.basis_prob_z.to_le_bytes())?;
        match &self.log {
            AliceLog::Seeded(seed) => {
                w.write_all(&[1])?;
                w.write_all(&seed.to_le_bytes())?;
            }
            AliceLog::Explicit(bytes) => {
                w.write_all(&[2])?;
                w.write_all(bytes)?;
            }
        }
        Ok(())
    }

    /// Parses a record; any malformation is an error, never a panic.
    pub fn read_from(r: &mut impl Read) -> Result<AliceRecord, OpticsError> {
        let span = read_header(r, b'A')?;
        let n = read_u8(r)? as usize;
        if n == 0 || n > 4 {
            return Err(OpticsError::Record(format!(
                "Alice's record declares {n} intensity classes (1–4 allowed)"
            )));
        }
        let mut classes = Vec::with_capacity(n);
        for _ in 0..n {
            let mu = read_f64(r)?;
            let p = read_f64(r)?;
            let len = read_u8(r)? as usize;
            if len > 64 {
                return Err(OpticsError::Record(format!(
                    "class label of {len} bytes (max 64)"
                )));
            }
            let mut label = vec![0u8; len];
            read_exact(r, &mut label)?;
            let label = String::from_utf8(label)
                .map_err(|_| OpticsError::Record("class label is not UTF-8".into()))?;
            classes.push((label, mu, p));
        }
        let qz = read_f64(r)?;
        let log = match read_u8(r)? {
            1 => AliceLog::Seeded(read_u64(r)?),
            2 => {
                if span.gates > (1 << 34) {
                    return Err(OpticsError::Record(format!(
                        "explicit log of {} gates is too large",
                        span.gates
                    )));
                }
                let mut bytes = Vec::new();
                r.take(span.gates).read_to_end(&mut bytes)?;
                if bytes.len() as u64 != span.gates {
                    return Err(OpticsError::Record("explicit log is truncated".into()));
                }
                AliceLog::Explicit(bytes)
            }
            g => return Err(OpticsError::Record(format!("unknown generator kind {g}"))),
        };
        expect_eof(r)?;
        AliceRecord::new(span, classes, qz, log)
    }
}

/// Streams Bob's detections into a writer, chunk by chunk.
pub struct BobWriter<W: Write> {
    w: W,
    span: Span,
    buf: Vec<u8>,
    in_chunk: u32,
    total: u64,
    next_gate: u64,
}

impl<W: Write> BobWriter<W> {
    /// Writes the header and prepares to take detections in gate order.
    pub fn new(mut w: W, span: Span) -> Result<BobWriter<W>, OpticsError> {
        write_header(&mut w, b'B', &span)?;
        Ok(BobWriter {
            w,
            span,
            buf: Vec::with_capacity(CHUNK * 3),
            in_chunk: 0,
            total: 0,
            next_gate: span.first_gate,
        })
    }

    /// Appends one detection; gates must increase and lie within the span.
    pub fn push(&mut self, d: Detection) -> Result<(), OpticsError> {
        if d.gate < self.next_gate || d.gate - self.span.first_gate >= self.span.gates {
            return Err(OpticsError::Record(format!(
                "detection at gate {} is out of order or outside the span",
                d.gate
            )));
        }
        let mut gap = d.gate - self.next_gate;
        loop {
            let byte = (gap & 0x7F) as u8;
            gap >>= 7;
            if gap == 0 {
                self.buf.push(byte);
                break;
            }
            self.buf.push(byte | 0x80);
        }
        self.buf.push(event_byte(d));
        self.next_gate = d.gate + 1;
        self.in_chunk += 1;
        self.total += 1;
        if self.in_chunk as usize == CHUNK {
            self.flush_chunk()?;
        }
        Ok(())
    }

    fn flush_chunk(&mut self) -> Result<(), OpticsError> {
        if self.in_chunk > 0 {
            self.w.write_all(&self.in_chunk.to_le_bytes())?;
            self.w.write_all(&self.buf)?;
            self.buf.clear();
            self.in_chunk = 0;
        }
        Ok(())
    }

    /// Writes the end marker and the total; returns the writer.
    pub fn finish(mut self) -> Result<W, OpticsError> {
        self.flush_chunk()?;
        self.w.write_all(&0u32.to_le_bytes())?;
        self.w.write_all(&self.total.to_le_bytes())?;
        self.w.flush()?;
        Ok(self.w)
    }
}

fn event_byte(d: Detection) -> u8 {
    let c = match d.clicks {
        Clicks::D0 => 1,
        Clicks::D1 => 2,
        Clicks::Both => 3,
    };
    c | if d.basis == Basis::X { 4 } else { 0 }
}

/// Reads Bob's detections from a stream, validating as it goes.
pub struct BobReader<R: Read> {
    r: R,
    /// The gates the record covers.
    pub span: Span,
    left_in_chunk: u32,
    total: u64,
    next_gate: u64,
    done: bool,
}

impl<R: Read> BobReader<R> {
    /// Reads and checks the header.
    pub fn new(mut r: R) -> Result<BobReader<R>, OpticsError> {
        let span = read_header(&mut r, b'B')?;
        Ok(BobReader {
            r,
            span,
            left_in_chunk: 0,
            total: 0,
            next_gate: span.first_gate,
            done: false,
        })
    }

    /// The next detection, `Ok(None)` at a verified end of stream.
    pub fn next_detection(&mut self) -> Result<Option<Detection>, OpticsError> {
        if self.done {
            return Ok(None);
        }
        if self.left_in_chunk == 0 {
            let c = read_u32(&mut self.r)?;
            if c == 0 {
                let total = read_u64(&mut self.r)?;
                if total != self.total {
                    return Err(OpticsError::Record(format!(
                        "trailer says {total} events, stream held {}",
                        self.total
                    )));
                }
                expect_eof(&mut self.r)?;
                self.done = true;
                return Ok(None);
            }
            if c as usize > CHUNK {
                return Err(OpticsError::Record(format!(
                    "chunk of {c} events (max {CHUNK})"
                )));
            }
            self.left_in_chunk = c;
        }
        let mut gap: u64 = 0;
        let mut shift = 0;
        loop {
            let b = read_u8(&mut self.r)?;
            if shift >= 64 || (shift == 63 && b > 1) {
                return Err(OpticsError::Record("gate gap overflows 64 bits".into()));
            }
            gap |= u64::from(b & 0x7F) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        let flags = read_u8(&mut self.r)?;
        let clicks = match flags & 3 {
            1 => Clicks::D0,
            2 => Clicks::D1,
            3 => Clicks::Both,
            _ => return Err(OpticsError::Record("event with no click".into())),
        };
        if flags & 0xF8 != 0 {
            return Err(OpticsError::Record(format!(
                "event flags {flags:#04x} use reserved bits"
            )));
        }
        let gate = self
            .next_gate
            .checked_add(gap)
            .filter(|g| g - self.span.first_gate < self.span.gates)
            .ok_or_else(|| OpticsError::Record("detection beyond the record's span".into()))?;
        self.next_gate = gate + 1;
        self.left_in_chunk -= 1;
        self.total += 1;
        Ok(Some(Detection {
            gate,
            basis: if flags & 4 != 0 { Basis::X } else { Basis::Z },
            clicks,
        }))
    }

    /// Reads all remaining detections.
    pub fn read_all(mut self) -> Result<Vec<Detection>, OpticsError> {
        let mut v = Vec::new();
        while let Some(d) = self.next_detection()? {
            v.push(d);
        }
        Ok(v)
    }
}

fn write_header(w: &mut impl Write, kind: u8, s: &Span) -> Result<(), OpticsError> {
    w.write_all(MAGIC)?;
    w.write_all(&[kind, VERSION])?;
    w.write_all(&s.first_gate.to_le_bytes())?;
    w.write_all(&s.gates.to_le_bytes())?;
    w.write_all(&s.rep_rate_hz.to_le_bytes())?;
    Ok(())
}

fn read_header(r: &mut impl Read, kind: u8) -> Result<Span, OpticsError> {
    let mut m = [0u8; 8];
    read_exact(r, &mut m)?;
    if &m[..6] != MAGIC {
        return Err(OpticsError::Record(
            "not a qkdnet detection record (bad magic)".into(),
        ));
    }
    if m[6] != kind {
        let want = if kind == b'A' { "Alice's" } else { "Bob's" };
        return Err(OpticsError::Record(format!(
            "expected {want} record, found kind '{}'",
            m[6].escape_ascii()
        )));
    }
    if m[7] != VERSION {
        return Err(OpticsError::Record(format!(
            "record format version {} is not supported (this build reads {VERSION})",
            m[7]
        )));
    }
    let span = Span {
        first_gate: read_u64(r)?,
        gates: read_u64(r)?,
        rep_rate_hz: read_f64(r)?,
    };
    if span.first_gate.checked_add(span.gates).is_none() {
        return Err(OpticsError::Record("gate span overflows".into()));
    }
    if !(span.rep_rate_hz.is_finite() && span.rep_rate_hz > 0.0) {
        return Err(OpticsError::Record(format!(
            "repetition rate {} Hz",
            span.rep_rate_hz
        )));
    }
    Ok(span)
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<(), OpticsError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => OpticsError::Record("file is truncated".into()),
        _ => OpticsError::Io(e),
    })
}

fn expect_eof(r: &mut impl Read) -> Result<(), OpticsError> {
    let mut b = [0u8; 1];
    match r.read(&mut b)? {
        0 => Ok(()),
        _ => Err(OpticsError::Record(
            "trailing bytes after the end of the record".into(),
        )),
    }
}

macro_rules! read_num {
    ($name:ident, $t:ty) => {
        fn $name(r: &mut impl Read) -> Result<$t, OpticsError> {
            let mut b = [0u8; std::mem::size_of::<$t>()];
            read_exact(r, &mut b)?;
            Ok(<$t>::from_le_bytes(b))
        }
    };
}
read_num!(read_u8, u8);
read_num!(read_u32, u32);
read_num!(read_u64, u64);
read_num!(read_f64, f64);
