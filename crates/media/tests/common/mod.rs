//! What the tests of both media share: keys derived from their index (so any
//! key that comes out can be checked against the one charged under its
//! number), charging and emptying a medium, and the SIGKILL harness: a crash
//! child (the test binary itself, running its `crash_child` test) that takes
//! or charges keys until it is killed, and the two test bodies that kill it
//! again and again and check that no key comes out twice and no committed
//! charge is lost, whatever holds the medium.
#![allow(dead_code, missing_docs)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use qkdnet_crypto::sm3::sm3;
use qkdnet_media::{ChargeRecord, Key256, MediaError, Medium};

/// The key charged under `index`.
pub fn key_for(index: u64) -> Key256 {
    let mut input = b"qkdnet-media test key ".to_vec();
    input.extend_from_slice(&index.to_be_bytes());
    Key256::new(sm3(&input))
}

pub fn keys(first: u64, count: u64) -> Vec<Key256> {
    (first..first + count).map(key_for).collect()
}

pub fn record(n: u64) -> ChargeRecord {
    ChargeRecord::new("charger-sae-1", 1_750_000_000 + n).expect("valid charger")
}

/// Charges `count` keys after the last charged one.
pub fn charge(m: &mut impl Medium, count: u64) {
    let first = m.status().expect("status").charged;
    let entry = m
        .charge(&keys(first, count), record(first))
        .expect("the keys fit");
    assert_eq!((entry.first, entry.count), (first, count));
}

/// Takes keys until the medium is exhausted, checking each against `key_for`.
pub fn take_all(m: &mut impl Medium) -> Vec<Result<u64, MediaError>> {
    let mut out = Vec::new();
    loop {
        match m.take_next() {
            Ok((i, k)) => {
                assert!(k == key_for(i), "key {i} is not the key charged under {i}");
                out.push(Ok(i));
            }
            Err(MediaError::Exhausted) => return out,
            Err(e) => out.push(Err(e)),
        }
        assert!(out.len() < 1_000_000, "bounded");
    }
}

/// The indices taken, none of them an error.
pub fn indices(r: &[Result<u64, MediaError>]) -> Vec<u64> {
    r.iter().map(|x| *x.as_ref().expect("no error")).collect()
}

/// Charges and takes from `m`, a new, empty medium of capacity 100 owned by
/// `sip:alice@qkd.example`, reopening it (with `reopen`, the handle dropped
/// first) in between: keys come out once, in order, equal to what was
/// charged, and the status counts them. Returns the medium, emptied.
pub fn keys_come_out_once_in_order_and_survive_reopening<M: Medium>(
    mut m: M,
    reopen: impl Fn() -> M,
) -> M {
    let id = m.id();
    assert!(matches!(m.take_next(), Err(MediaError::Exhausted)));
    charge(&mut m, 5);
    charge(&mut m, 1);
    let (i, k) = m.take_next().expect("a key");
    assert_eq!(i, 0);
    assert!(k == key_for(0));
    drop(m);

    let mut m = reopen();
    let st = m.status().expect("status");
    assert_eq!(st.id, id);
    assert_eq!(st.owner, "sip:alice@qkd.example");
    assert_eq!((st.charged, st.used, st.remaining, st.free), (6, 1, 5, 95));
    assert_eq!(st.charges.len(), 2);
    let c = &st.charges[1];
    assert_eq!((c.first, c.last, c.count), (5, 5, 1));
    assert_eq!(c.record.charger(), "charger-sae-1");
    assert_eq!(c.record.charged_at(), 1_750_000_005);
    charge(&mut m, 3);
    drop(m);
    let mut m = reopen();
    assert_eq!(indices(&take_all(&mut m)), (1..9).collect::<Vec<_>>());
    drop(m);
    let mut m = reopen();
    assert!(matches!(m.take_next(), Err(MediaError::Exhausted)));
    let st = m.status().expect("status");
    assert_eq!((st.charged, st.used, st.remaining), (9, 9, 0));
    m
}

/// Charges 3 keys into `m`, a new, empty medium of capacity 4, and checks that
/// 2 more and an empty charge are refused.
pub fn a_charge_too_large_or_empty_is_refused(m: &mut impl Medium) {
    charge(m, 3);
    let e = m
        .charge(&keys(3, 2), record(3))
        .expect_err("5 keys in a medium of 4");
    assert!(
        matches!(
            e,
            MediaError::CapacityExceeded {
                requested: 2,
                free: 1
            }
        ),
        "{e}"
    );
    assert!(matches!(
        m.charge(&[], record(3)),
        Err(MediaError::EmptyCharge)
    ));
}

/// Charges two keys of `0xAB` bytes into `m` (a new medium of capacity 8 or
/// more) and takes one; neither the medium, its status, the key taken nor
/// the error of a second open (`open_again`) shows key bytes, nor any of
/// `secrets`.
pub fn status_and_debug_never_show_key_bytes<M: Medium + core::fmt::Debug>(
    mut m: M,
    open_again: impl FnOnce(&M) -> MediaError,
    secrets: &[&str],
) {
    let k = Key256::new([0xAB; 32]);
    m.charge(&[k.clone(), k], record(0)).expect("charge");
    let (_, taken) = m.take_next().expect("key");
    let shown = format!(
        "{m:?} {:?} {taken:?} {:?}",
        m.status().expect("status"),
        open_again(&m)
    );
    for needle in ["171, 171", "abababab", "ABABABAB"].iter().chain(secrets) {
        assert!(!shown.contains(needle), "{needle} in {shown}");
    }
    assert!(shown.contains("REDACTED"), "{shown}");
}

/// The variable that makes a test binary's `crash_child` test a crash child:
/// `take:<medium>` or `charge:<medium>`, `<medium>` saying which medium (a
/// path, an ID) in the binary's own terms.
pub const CHILD_ENV: &str = "QKDNET_MEDIA_CRASH_CHILD";

/// The crash child's mode and medium, if this process is one. Ends the line
/// libtest began ("test crash_child ... ").
pub fn crash_child_spec() -> Option<(String, String)> {
    let spec = std::env::var(CHILD_ENV).ok()?;
    println!();
    let (mode, medium) = spec.split_once(':').expect("mode:medium");
    Some((mode.to_owned(), medium.to_owned()))
}

/// The crash child's work. `take`: takes keys until killed, printing
/// `T <index>` after `take_next` returned. `charge`: charges batches of 20
/// keys until killed, printing `C <end>` after `charge` returned.
pub fn crash_child_loop(mode: &str, m: &mut impl Medium) {
    for _ in 0..100_000 {
        if mode == "take" {
            match m.take_next() {
                Ok((i, k)) => {
                    assert!(k == key_for(i), "wrong key {i}");
                    println!("T {i}");
                }
                Err(e) => {
                    println!("E {e}");
                    return;
                }
            }
        } else {
            let first = m.status().expect("status").charged;
            if let Err(e) = m.charge(&keys(first, 20), record(first)) {
                println!("E {e}");
                return;
            }
            println!("C {}", first + 20);
        }
    }
}

/// Runs a crash child on `medium` and kills it (SIGKILL) `delay` after it
/// has printed `kill_after` lines of its kind; returns the numbers it printed.
pub fn run_and_kill(mode: &str, medium: &str, kill_after: usize, delay: Duration) -> Vec<u64> {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{mode}:{medium}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let prefix = if mode == "take" { "T " } else { "C " };
    let mut seen = Vec::new();
    let mut killed = false;
    // After the kill, read on to the end of the pipe: all the child printed counts.
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        assert!(!line.starts_with("E "), "the child failed: {line}");
        // A line cut short by the kill does not parse and is ignored.
        let Some(n) = line.strip_prefix(prefix).and_then(|n| n.parse().ok()) else {
            continue;
        };
        seen.push(n);
        if !killed && seen.len() >= kill_after {
            std::thread::sleep(delay);
            child.kill().expect("SIGKILL"); // SIGKILL on Unix
            killed = true;
        }
    }
    assert!(killed, "the child stopped before it was killed");
    let _ = child.wait();
    seen
}

/// Kills a child taking keys from `medium` once per round (after
/// `kill_after` keys and a delay); after each round, opens the medium with
/// `open`, checks that its counter is past every key the child printed and
/// lost at most the one it was taking, and calls `check` with the counter.
/// At the end, no key was printed twice and the medium still hands out the
/// right next key. The medium must hold enough keys for all rounds.
pub fn sigkill_while_taking<M: Medium>(
    medium: &str,
    open: impl Fn() -> M,
    rounds: &[(usize, Duration)],
    mut check: impl FnMut(u64),
) {
    let mut printed: Vec<u64> = Vec::new();
    for (round, &(kill_after, delay)) in rounds.iter().enumerate() {
        let seen = run_and_kill("take", medium, kill_after, delay);
        assert!(!seen.is_empty());
        printed.extend(&seen);
        let last = *seen.last().expect("non-empty");
        let next = open().status().expect("status").used;
        // The counter is past every key the child had; at most the one key it
        // was taking when killed is lost.
        assert!(next > last, "round {round}: next {next} <= printed {last}");
        assert!(
            next <= last + 2,
            "round {round}: next {next}, printed {last}"
        );
        check(next);
    }
    assert!(
        printed.windows(2).all(|w| w[0] < w[1]),
        "a key was handed out twice across crashes"
    );
    let mut m = open();
    let (i, k) = m.take_next().expect("a key");
    assert!(i > *printed.last().expect("some"));
    assert!(k == key_for(i));
}

/// Kills a child charging batches of 20 keys into `medium` once per round;
/// after each round, opens the medium with `open`, checks that every charge
/// the child saw return is there and the one it was making is there whole or
/// not at all, and calls `check` with the number of keys charged. At the end
/// the medium hands out every charged key, in order; it is returned, emptied.
pub fn sigkill_while_charging<M: Medium>(
    medium: &str,
    open: impl Fn() -> M,
    rounds: &[(usize, Duration)],
    mut check: impl FnMut(u64),
) -> M {
    let mut printed_end = 0;
    for (round, &(kill_after, delay)) in rounds.iter().enumerate() {
        let seen = run_and_kill("charge", medium, kill_after, delay);
        printed_end = *seen.last().expect("non-empty");
        let charged = open().status().expect("status").charged;
        assert!(
            charged == printed_end || charged == printed_end + 20,
            "round {round}: {charged} keys, the child had charged {printed_end}"
        );
        check(charged);
    }
    let mut m = open();
    let taken = indices(&take_all(&mut m));
    assert!(taken.len() as u64 >= printed_end);
    assert_eq!(taken, (0..taken.len() as u64).collect::<Vec<_>>());
    m
}
