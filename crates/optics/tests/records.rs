//! The detection-record format: round trips, and every malformation is an error.

use proptest::prelude::*;
use qkdnet_optics::record::{
    AliceLog, AliceRecord, Basis, BobReader, BobWriter, Clicks, Detection, Span,
};

fn span(gates: u64) -> Span {
    Span {
        first_gate: 1000,
        gates,
        rep_rate_hz: 1e9,
    }
}

fn sample_bob() -> Vec<u8> {
    let mut w = BobWriter::new(Vec::new(), span(1_000_000)).unwrap();
    for (i, g) in [1000u64, 1001, 1500, 70_000, 999_999 + 1000]
        .iter()
        .enumerate()
    {
        w.push(Detection {
            gate: *g,
            basis: if i % 2 == 0 { Basis::Z } else { Basis::X },
            clicks: [Clicks::D0, Clicks::D1, Clicks::Both][i % 3],
        })
        .unwrap();
    }
    w.finish().unwrap()
}

#[test]
fn every_truncation_is_detected() {
    let bytes = sample_bob();
    assert_eq!(
        BobReader::new(&bytes[..])
            .unwrap()
            .read_all()
            .unwrap()
            .len(),
        5
    );
    for cut in 0..bytes.len() {
        let r = BobReader::new(&bytes[..cut]).and_then(|r| r.read_all());
        assert!(r.is_err(), "truncation at {cut} accepted");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(BobReader::new(&longer[..]).unwrap().read_all().is_err());
}

#[test]
fn wrong_kind_version_and_out_of_span_are_refused() {
    let mut bytes = sample_bob();
    bytes[6] = b'A';
    assert!(BobReader::new(&bytes[..]).is_err());
    let mut bytes = sample_bob();
    bytes[7] = 2;
    let e = BobReader::new(&bytes[..]).err().unwrap().to_string();
    assert!(e.contains("version 2"), "{e}");
    let mut w = BobWriter::new(Vec::new(), span(10)).unwrap();
    assert!(
        w.push(Detection {
            gate: 1010,
            basis: Basis::Z,
            clicks: Clicks::D0
        })
        .is_err()
    );
    assert!(
        w.push(Detection {
            gate: 999,
            basis: Basis::Z,
            clicks: Clicks::D0
        })
        .is_err()
    );
}

#[test]
fn explicit_alice_log_round_trips_and_is_checked() {
    let classes = vec![
        ("signal".to_string(), 0.5, 0.75),
        ("vacuum".to_string(), 0.0, 0.25),
    ];
    let log: Vec<u8> = (0..64u8)
        .map(|i| (i % 2) | ((i % 3 == 0) as u8) << 2 | ((i % 5 == 0) as u8) << 3)
        .collect();
    let rec = AliceRecord::new(
        span(64),
        classes.clone(),
        0.5,
        AliceLog::Explicit(log.clone()),
    )
    .unwrap();
    let mut bytes = Vec::new();
    rec.write_to(&mut bytes).unwrap();
    let back = AliceRecord::read_from(&mut &bytes[..]).unwrap();
    assert_eq!(back, rec);
    let c = back.choice(1003).unwrap();
    assert_eq!((c.class, c.basis, c.bit), (1, Basis::X, 0)); // offset 3: odd → class 1, 3 % 3 == 0 → X, 3 % 5 != 0 → 0
    assert!(back.choice(999).is_none() && back.choice(1064).is_none());
    // class index beyond the table
    let mut bad = log;
    bad[3] = 3;
    assert!(AliceRecord::new(span(64), classes, 0.5, AliceLog::Explicit(bad)).is_err());
}

#[test]
fn seeded_alice_follows_her_probabilities() {
    let classes = vec![
        ("s".to_string(), 0.5, 0.7),
        ("d".to_string(), 0.1, 0.2),
        ("v".to_string(), 0.0, 0.1),
    ];
    let rec = AliceRecord::new(span(1_000_000), classes, 0.9, AliceLog::Seeded(77)).unwrap();
    let mut counts = [0u32; 3];
    let mut z = 0u32;
    let mut ones = 0u32;
    for g in 1000..1_001_000 {
        let c = rec.choice(g).unwrap();
        counts[c.class as usize] += 1;
        z += (c.basis == Basis::Z) as u32;
        ones += c.bit as u32;
    }
    let n = 1e6;
    for (k, p) in [0.7, 0.2, 0.1].iter().enumerate() {
        assert!(
            (counts[k] as f64 - n * p).abs() < 4.0 * (n * p * (1.0 - p)).sqrt(),
            "{counts:?}"
        );
    }
    assert!((z as f64 - 0.9 * n).abs() < 4.0 * (n * 0.09f64).sqrt());
    assert!((ones as f64 - 0.5 * n).abs() < 4.0 * (n * 0.25f64).sqrt());
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = BobReader::new(&bytes[..]).and_then(|r| r.read_all());
        let _ = AliceRecord::read_from(&mut &bytes[..]);
    }

    #[test]
    fn mutated_valid_records_never_panic(pos in 0usize..200, val in any::<u8>()) {
        let mut bytes = sample_bob();
        let p = pos % bytes.len();
        bytes[p] = val;
        let _ = BobReader::new(&bytes[..]).and_then(|r| r.read_all());
    }

    #[test]
    fn detections_round_trip(gaps in proptest::collection::vec((0u64..100_000, 0u8..6), 0..300)) {
        let total: u64 = gaps.iter().map(|(g, _)| g + 1).sum();
        let sp = Span { first_gate: 5, gates: total + 1, rep_rate_hz: 2e6 };
        let mut w = BobWriter::new(Vec::new(), sp).unwrap();
        let mut gate = 5;
        let mut want = Vec::new();
        for (gap, f) in gaps {
            gate += gap;
            let d = Detection { gate, basis: if f & 1 == 0 { Basis::Z } else { Basis::X }, clicks: [Clicks::D0, Clicks::D1, Clicks::Both][(f / 2) as usize] };
            w.push(d).unwrap();
            want.push(d);
            gate += 1;
        }
        let bytes = w.finish().unwrap();
        prop_assert_eq!(BobReader::new(&bytes[..]).unwrap().read_all().unwrap(), want);
    }
}
