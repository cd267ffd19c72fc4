//! The file medium against its promises: keys come out once, in order, equal to
//! what was charged; a damaged or truncated file or a wrong PIN gives a typed error
//! and never a wrong key; a process killed (SIGKILL) while taking or charging
//! leaves a medium that opens and never hands a key out twice.
//!
//! Keys are derived from their index (`key_for`), so any key that comes out can be
//! checked against the one charged under that number. Argon2id runs with its
//! minimal parameters here: the tests open media thousands of times.

mod common;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{charge, indices, key_for, keys, record, take_all};
use proptest::prelude::*;
use qkdnet_crypto::secret::SecretBytes;
use qkdnet_media::format::{LOG_OFFSET, PAGE_LEN, RECORD_LEN, SLOT_LEN, STATE_LEN};
use qkdnet_media::{FileMedium, KdfParams, MediaError, Medium, MediumSpec, MediumStatus};
use uuid::Uuid;

const PIN: &[u8] = b"246810";

fn pin() -> SecretBytes {
    SecretBytes::from_slice(PIN)
}

fn spec(capacity: u64, log_capacity: u32) -> MediumSpec {
    MediumSpec {
        id: Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0001),
        owner: "sip:alice@qkd.example".into(),
        capacity,
        log_capacity,
        kdf: KdfParams::MINIMAL,
    }
}

fn open(path: &Path) -> FileMedium {
    FileMedium::open(path, &pin()).expect("the medium opens")
}

/// A new medium in a fresh directory (removed when the returned guard drops).
fn new_medium(capacity: u64, log_capacity: u32) -> (tempfile::TempDir, PathBuf, FileMedium) {
    created_in(
        tempfile::tempdir().expect("tempdir"),
        capacity,
        log_capacity,
    )
}

/// As [`new_medium`], in [`scratch_dir`].
fn new_scratch_medium(
    capacity: u64,
    log_capacity: u32,
) -> (tempfile::TempDir, PathBuf, FileMedium) {
    created_in(scratch_dir(), capacity, log_capacity)
}

fn created_in(
    dir: tempfile::TempDir,
    capacity: u64,
    log_capacity: u32,
) -> (tempfile::TempDir, PathBuf, FileMedium) {
    let path = dir.path().join("m");
    let m = FileMedium::create(&path, &spec(capacity, log_capacity), &pin()).expect("create");
    (dir, path, m)
}

#[test]
fn charged_keys_come_out_once_in_order_and_survive_reopening() {
    let (_dir, path, m) = new_medium(100, 8);
    common::keys_come_out_once_in_order_and_survive_reopening(m, || open(&path));
}

#[test]
fn wrong_pin_and_foreign_files_are_refused() {
    let (dir, path, mut m) = new_medium(4, 2);
    charge(&mut m, 2);
    drop(m);
    let e = FileMedium::open(&path, &SecretBytes::from_slice(b"246811")).expect_err("wrong PIN");
    assert!(matches!(e, MediaError::WrongPin), "{e}");
    assert!(e.to_string().contains("wrong PIN"), "{e}");
    let e = FileMedium::open(&path, &SecretBytes::from_slice(b"")).expect_err("empty PIN");
    assert!(matches!(e, MediaError::EmptyPin), "{e}");

    let other = dir.path().join("other");
    std::fs::write(&other, b"#!/bin/sh\necho not a medium\n").expect("write");
    let e = FileMedium::open(&other, &pin()).expect_err("not a medium");
    assert!(matches!(e, MediaError::NotAMedium), "{e}");
    std::fs::write(&other, b"").expect("write");
    let e = FileMedium::open(&other, &pin()).expect_err("empty");
    assert!(matches!(e, MediaError::Truncated { .. }), "{e}");
    let e = FileMedium::open(&dir.path().join("missing"), &pin()).expect_err("missing");
    assert!(matches!(e, MediaError::Io { .. }), "{e}");
    // Creating never overwrites.
    let e = FileMedium::create(&path, &spec(4, 2), &pin()).expect_err("exists");
    assert!(matches!(e, MediaError::Io { .. }), "{e}");
    assert_eq!(open(&path).status().expect("status").charged, 2);
}

#[test]
fn a_second_open_is_refused_while_the_first_is_held() {
    let (_dir, path, first) = new_medium(4, 2);
    let e = FileMedium::open(&path, &pin()).expect_err("held");
    assert!(matches!(e, MediaError::Busy), "{e}");
    drop(first);
    open(&path);
}

#[test]
fn the_ring_reuses_used_slots_and_capacity_is_enforced() {
    let (_dir, path, mut m) = new_medium(4, 8);
    common::a_charge_too_large_or_empty_is_refused(&mut m);
    assert_eq!(m.take_next().expect("key").0, 0);
    assert_eq!(m.take_next().expect("key").0, 1);
    // Keys 3..6 go to slots 3, 0, 1: the ring wraps inside one charge.
    charge(&mut m, 3);
    let st = m.status().expect("status");
    assert_eq!((st.remaining, st.free), (4, 0));
    let len = std::fs::metadata(&path).expect("meta").len();
    assert_eq!(
        len,
        LOG_OFFSET + 8 * RECORD_LEN as u64 + 4 * SLOT_LEN as u64
    );
    drop(m);
    let mut m = open(&path);
    assert_eq!(indices(&take_all(&mut m)), vec![2, 3, 4, 5]);
    charge(&mut m, 4);
    assert_eq!(indices(&take_all(&mut m)), vec![6, 7, 8, 9]);
}

#[test]
fn a_full_log_drops_only_fully_used_charges() {
    let (_dir, path, mut m) = new_medium(16, 2);
    charge(&mut m, 2);
    charge(&mut m, 2);
    assert_eq!(m.take_next().expect("key").0, 0);
    let e = m.charge(&keys(4, 1), record(4)).expect_err("log full");
    assert!(matches!(e, MediaError::ChargeLogFull { records: 2 }), "{e}");
    assert_eq!(m.take_next().expect("key").0, 1);
    charge(&mut m, 1);
    let st = m.status().expect("status");
    let firsts: Vec<u64> = st.charges.iter().map(|c| c.first).collect();
    assert_eq!(
        firsts,
        vec![2, 4],
        "the first charge, all used, was forgotten"
    );
    drop(m);
    let mut m = open(&path);
    assert_eq!(indices(&take_all(&mut m)), vec![2, 3, 4]);
}

#[test]
fn taking_a_key_changes_only_its_slot_and_one_counter_copy() {
    let (_dir, path, mut m) = new_medium(8, 2);
    charge(&mut m, 8);
    let slots = LOG_OFFSET + 2 * RECORD_LEN as u64;
    for i in 0..8u64 {
        let before = std::fs::read(&path).expect("read");
        assert_eq!(m.take_next().expect("key").0, i);
        let after = std::fs::read(&path).expect("read");
        assert_eq!(before.len(), after.len());
        let slot = (slots + i * SLOT_LEN as u64) as usize;
        assert!(
            after[slot..slot + SLOT_LEN].iter().all(|&b| b == 0),
            "used slot {i} is erased"
        );
        let changed: Vec<usize> = (0..after.len())
            .filter(|&j| before[j] != after[j])
            .collect();
        // seq 2 (the charge's commit) was in copy 0; take i writes seq 3 + i.
        let copy = PAGE_LEN as usize * (1 + (3 + i as usize) % 2);
        assert!(
            changed
                .iter()
                .all(|&j| (copy..copy + STATE_LEN).contains(&j)
                    || (slot..slot + SLOT_LEN).contains(&j)),
            "take {i} wrote outside its slot and counter copy"
        );
    }
}

#[test]
fn a_rolled_back_counter_finds_the_erased_slot() {
    let (_dir, path, mut m) = new_medium(8, 2);
    charge(&mut m, 4); // seq 2 in copy 0
    m.take_next().expect("key 0"); // seq 3 in copy 1
    m.take_next().expect("key 1"); // seq 4 in copy 0
    drop(m);
    // The newest counter copy is lost (a bad sector): the medium falls back to the
    // copy before it, which says key 1 is unused. Its slot is erased, so key 1 is
    // not handed out again.
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[PAGE_LEN as usize + 10] ^= 0x40;
    std::fs::write(&path, &bytes).expect("write");
    let mut m = open(&path);
    assert_eq!(m.status().expect("status").used, 1);
    let e = m.take_next().expect_err("erased");
    assert!(matches!(e, MediaError::ErasedSlot { index: 1 }), "{e}");
    assert_eq!(indices(&take_all(&mut m)), vec![2, 3]);
}

#[test]
fn status_and_debug_never_show_key_bytes() {
    let (_dir, path, m) = new_medium(8, 2);
    common::status_and_debug_never_show_key_bytes(
        m,
        |_| FileMedium::open(&path, &pin()).expect_err("busy"),
        &[],
    );
}

#[test]
fn charging_130k_keys_fits_in_about_six_megabytes() {
    const N: u64 = 130_000;
    let (_dir, path, mut m) = new_medium(N, 1024);
    charge(&mut m, N);
    let len = std::fs::metadata(&path).expect("meta").len();
    assert_eq!(
        len,
        LOG_OFFSET + 1024 * RECORD_LEN as u64 + N * SLOT_LEN as u64
    );
    assert!(len < 6_400_000, "{len} bytes");
    for i in 0..3 {
        assert_eq!(m.take_next().expect("key").0, i);
    }
    drop(m);
    let mut m = open(&path);
    let (i, k) = m.take_next().expect("key");
    assert_eq!(i, 3);
    assert!(k == key_for(3));
    let st = m.status().expect("status");
    assert_eq!((st.charged, st.remaining, st.free), (N, N - 4, 4));
}

/// A directory for the tests that write thousands of damaged copies (each
/// rewrite of a file on ext4 is flushed on close, and each take syncs): in memory
/// where the machine has a tmpfs. Those tests are about decoding; the SIGKILL
/// tests below cover durability on the real disk.
fn scratch_dir() -> tempfile::TempDir {
    match Path::new("/dev/shm") {
        shm if shm.is_dir() => tempfile::tempdir_in(shm),
        _ => tempfile::tempdir(),
    }
    .expect("tempdir")
}

/// How a damaged copy of the medium behaved.
#[derive(Debug)]
enum Outcome {
    OpenFailed(MediaError),
    Opened {
        status: MediaStatusLite,
        takes: Vec<Result<u64, MediaError>>,
    },
}

/// The counters of a status (the part a flip could change).
#[derive(Debug, PartialEq, Eq)]
struct MediaStatusLite {
    charged: u64,
    used: u64,
    charges: usize,
}

impl From<MediumStatus> for MediaStatusLite {
    fn from(s: MediumStatus) -> Self {
        Self {
            charged: s.charged,
            used: s.used,
            charges: s.charges.len(),
        }
    }
}

fn try_medium(path: &Path, take: bool) -> Outcome {
    match FileMedium::open(path, &pin()) {
        Err(e) => Outcome::OpenFailed(e),
        Ok(mut m) => Outcome::Opened {
            status: m.status().expect("status").into(),
            takes: if take { take_all(&mut m) } else { Vec::new() },
        },
    }
}

/// Flips one bit in every byte of a medium holding 8 keys in two charges, one byte
/// at a time, and opens and empties each damaged copy. Every byte the format reads
/// must be caught, with the error that names its region; no wrong key ever comes
/// out (`take_all` checks every key against the one charged under its index).
/// The only bytes a flip may leave unnoticed are those the format never reads
/// (the unused rest of the counter pages) and the older counter copy, which a
/// valid newer copy overrules. Flipping the *newer* copy makes it fail its MAC, so
/// the medium opens with the older copy, exactly as after a write torn by a crash:
/// that must be the state before the last charge, with its keys intact.
#[test]
fn every_flipped_byte_is_caught_or_harmless() {
    let (dir, path, mut m) = new_scratch_medium(8, 2);
    charge(&mut m, 4); // seq 1 (copy 1), seq 2 (copy 0)
    charge(&mut m, 4); // seq 3 (copy 1), seq 4 (copy 0): copy 0 is the newer
    drop(m);
    let original = std::fs::read(&path).expect("read");
    let page = PAGE_LEN as usize;
    let log = LOG_OFFSET as usize;
    let slots = log + 2 * RECORD_LEN;
    assert_eq!(original.len(), slots + 8 * SLOT_LEN);
    let intact = MediaStatusLite {
        charged: 8,
        used: 0,
        charges: 2,
    };

    let damaged = dir.path().join("damaged");
    let mut caught = 0;
    for at in 0..original.len() {
        let mut bytes = original.clone();
        bytes[at] ^= 1 << (at % 8);
        std::fs::write(&damaged, &bytes).expect("write");
        // Bytes no one reads: open and compare the counters always, empty the
        // medium for a sample (each take syncs the disk).
        let unread = (page + STATE_LEN..2 * page).contains(&at) || (2 * page..log).contains(&at);
        let take = !unread || (2 * page..2 * page + STATE_LEN).contains(&at) || at % 97 == 0;
        let outcome = try_medium(&damaged, take);
        let region = if at < page {
            "header"
        } else if at < page + STATE_LEN {
            "newer counter copy"
        } else if unread {
            "unread"
        } else if at < slots {
            "charge log"
        } else {
            "key slot"
        };
        match (region, &outcome) {
            ("header", Outcome::OpenFailed(e)) => {
                let ok = match at {
                    0..8 => matches!(e, MediaError::NotAMedium),
                    8..10 => matches!(e, MediaError::UnsupportedVersion(_)),
                    _ => matches!(e, MediaError::CorruptHeader("checksum mismatch")),
                };
                assert!(ok, "byte {at}: {e}");
                caught += 1;
            }
            ("newer counter copy", Outcome::Opened { status, takes }) => {
                // The state after the first charge's commit and the second's begin.
                let before = MediaStatusLite {
                    charged: 4,
                    used: 0,
                    charges: 1,
                };
                assert_eq!(status, &before, "byte {at}");
                assert_eq!(indices(takes), vec![0, 1, 2, 3], "byte {at}");
                caught += 1;
            }
            ("charge log", Outcome::OpenFailed(e)) => {
                let record = ((at - log) / RECORD_LEN) as u32;
                assert!(
                    matches!(e, MediaError::CorruptLog { record: r } if *r == record),
                    "byte {at}: {e}"
                );
                caught += 1;
            }
            ("key slot", Outcome::Opened { status, takes }) => {
                assert_eq!(status, &intact, "byte {at}");
                let bad = ((at - slots) / SLOT_LEN) as u64;
                assert_eq!(takes.len(), 8, "byte {at}");
                for (i, t) in (0u64..).zip(takes) {
                    match t {
                        Ok(j) => assert!(i == *j && i != bad, "byte {at}: key {j}"),
                        Err(MediaError::CorruptSlot { index }) => {
                            assert_eq!(*index, bad, "byte {at}")
                        }
                        Err(e) => panic!("byte {at}: {e}"),
                    }
                }
                caught += 1;
            }
            ("unread", Outcome::Opened { status, takes }) => {
                assert_eq!(status, &intact, "byte {at}");
                if take {
                    assert_eq!(indices(takes), (0..8).collect::<Vec<_>>(), "byte {at}");
                }
            }
            (region, outcome) => panic!("byte {at} ({region}): {outcome:?}"),
        }
    }
    assert_eq!(caught, page + STATE_LEN + 2 * RECORD_LEN + 8 * SLOT_LEN);
}

#[test]
fn every_truncation_is_refused() {
    let (dir, path, mut m) = new_scratch_medium(8, 2);
    charge(&mut m, 8);
    drop(m);
    let original = std::fs::read(&path).expect("read");
    let cut = dir.path().join("cut");
    for len in 0..original.len() {
        std::fs::write(&cut, &original[..len]).expect("write");
        match FileMedium::open(&cut, &pin()) {
            Err(MediaError::Truncated { .. }) => {}
            Err(e) => panic!("cut at {len}: {e}"),
            Ok(_) => panic!("cut at {len}: opened"),
        }
    }
    // Garbage after the last slot is not read.
    let mut longer = original;
    longer.extend_from_slice(&[0x5A; 100]);
    std::fs::write(&cut, &longer).expect("write");
    assert_eq!(open(&cut).status().expect("status").charged, 8);
}

/// One step of the model test.
#[derive(Clone, Debug)]
enum Op {
    Charge(u64),
    Take,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1u64..6).prop_map(Op::Charge),
        4 => Just(Op::Take),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Charges in batches, takes and reopenings against a plain queue model: the
    /// same keys in the same order, the same refusals (capacity, full log,
    /// exhausted).
    #[test]
    fn batches_and_takes_match_a_queue_model(ops in proptest::collection::vec(op(), 1..40)) {
        const CAP: u64 = 12;
        const LOG: usize = 3;
        let (_dir, path, mut m) = new_medium(CAP, LOG as u32);
        let mut queue: VecDeque<u64> = VecDeque::new();
        let mut charges: VecDeque<(u64, u64)> = VecDeque::new(); // (first, end)
        let (mut next, mut end) = (0u64, 0u64);
        for op in ops {
            match op {
                Op::Charge(n) => {
                    let got = m.charge(&keys(end, n), record(end));
                    let log_full = charges.len() == LOG && charges[0].1 > next;
                    if n > CAP - queue.len() as u64 {
                        prop_assert!(matches!(got, Err(MediaError::CapacityExceeded { .. })), "{got:?}");
                    } else if log_full {
                        prop_assert!(matches!(got, Err(MediaError::ChargeLogFull { .. })), "{got:?}");
                    } else {
                        let e = got.expect("fits");
                        prop_assert_eq!((e.first, e.count), (end, n));
                        if charges.len() == LOG {
                            charges.pop_front();
                        }
                        charges.push_back((end, end + n));
                        queue.extend(end..end + n);
                        end += n;
                    }
                }
                Op::Take => match (m.take_next(), queue.pop_front()) {
                    (Ok((i, k)), Some(j)) => {
                        prop_assert_eq!(i, j);
                        prop_assert!(k == key_for(i));
                        next = i + 1;
                    }
                    (Err(MediaError::Exhausted), None) => {}
                    (got, want) => prop_assert!(false, "{:?} vs {:?}", got.map(|x| x.0), want),
                },
                Op::Reopen => {
                    drop(m);
                    m = open(&path);
                }
            }
            let st = m.status().expect("status");
            prop_assert_eq!((st.charged, st.used, st.remaining), (end, next, queue.len() as u64));
            let firsts: Vec<u64> = st.charges.iter().map(|c| c.first).collect();
            let want: Vec<u64> = charges.iter().map(|c| c.0).collect();
            prop_assert_eq!(firsts, want);
        }
    }
}

// ---- SIGKILL ----

/// Child side of the SIGKILL tests (does nothing unless the parent set
/// `QKDNET_MEDIA_CRASH_CHILD` to `take:<path>` or `charge:<path>`): see
/// `common::crash_child_loop`.
#[test]
fn crash_child() {
    let Some((mode, path)) = common::crash_child_spec() else {
        return;
    };
    common::crash_child_loop(&mode, &mut open(Path::new(&path)));
}

#[test]
fn sigkill_while_taking_never_hands_a_key_out_twice() {
    let (_dir, path, mut m) = new_medium(4000, 4);
    charge(&mut m, 4000);
    drop(m);
    let rounds: Vec<(usize, Duration)> = [1usize, 7, 40, 3, 150, 25]
        .into_iter()
        .enumerate()
        .map(|(round, k)| (k, Duration::from_micros(137 * (round as u64 % 3))))
        .collect();
    let medium = path.display().to_string();
    common::sigkill_while_taking(&medium, || open(&path), &rounds, |_| {});
}

#[test]
fn sigkill_while_charging_loses_no_committed_charge() {
    let (_dir, path, m) = new_medium(100_000, 1024);
    drop(m);
    let rounds: Vec<(usize, Duration)> = [1usize, 4, 2, 9]
        .into_iter()
        .enumerate()
        .map(|(round, k)| (k, Duration::from_micros(211 * (round as u64 % 3))))
        .collect();
    let medium = path.display().to_string();
    let m = common::sigkill_while_charging(&medium, || open(&path), &rounds, |_| {});
    // The file medium remembers every charge (the log is large enough).
    let st = m.status().expect("status");
    assert_eq!(st.charges.iter().map(|c| c.count).sum::<u64>(), st.charged);
}
