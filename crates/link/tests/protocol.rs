//! Alice and Bob stepped in memory, deterministically: keys agree, attacks fail.

use qkdnet_link::LinkError;
use qkdnet_link::auth::{AuthChannel, Role};
use qkdnet_link::block::ProtocolConfig;
use qkdnet_link::endpoint::{Endpoint, Event};
use qkdnet_link::msg::{Msg, Reconciler};
use qkdnet_optics::device::Eve;
use qkdnet_optics::preset;
use qkdnet_optics::sim::Simulator;
use qkdnet_postproc::bits::BitVec;
use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::{Rng, SeedableRng};

fn psk(seed: u64) -> Vec<u8> {
    let mut r = Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..64 * 1024).map(|_| r.next_u64() as u8).collect()
}

/// Moves frames both ways until both are idle; `tamper` may alter Bob→Alice frames.
fn pump(
    a: &mut Endpoint,
    b: &mut Endpoint,
    tamper: &mut dyn FnMut(&mut Vec<u8>),
) -> Result<(), LinkError> {
    for _ in 0..1_000_000 {
        let mut moved = false;
        while let Some(f) = a.poll_transmit() {
            b.handle_frame(&f)?;
            moved = true;
        }
        while let Some(mut f) = b.poll_transmit() {
            tamper(&mut f);
            a.handle_frame(&f)?;
            moved = true;
        }
        if !moved {
            return Ok(());
        }
    }
    panic!("protocol did not settle");
}

fn noisy_pair(n: usize, qber: f64, seed: u64) -> (BitVec, BitVec) {
    let mut r = Xoshiro256PlusPlus::seed_from_u64(seed);
    let a = BitVec::random(n, &mut r);
    let mut b = a.clone();
    for i in 0..n {
        if ((r.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < qber {
            b.flip(i);
        }
    }
    (a, b)
}

fn offline(n: usize, qber: f64, reconciler: Reconciler) -> (Option<Event>, Option<Event>, u64) {
    let cfg = ProtocolConfig {
        reconciler,
        ..Default::default()
    };
    let key = psk(1);
    let mut alice = Endpoint::alice(cfg.clone(), &key, 11, None).unwrap();
    let mut bob = Endpoint::bob(cfg, &key, 12).unwrap();
    let (a, b) = noisy_pair(n, qber, 99);
    alice.add_offline_block(0, a).unwrap();
    bob.start_offline_block(0, &b).unwrap();
    pump(&mut alice, &mut bob, &mut |_| {}).unwrap();
    (
        alice.poll_output(),
        bob.poll_output(),
        alice.auth_key_bits_used(),
    )
}

fn keys(a: Option<Event>, b: Option<Event>) -> (Vec<u8>, Vec<u8>, qkdnet_link::block::BlockReport) {
    match (a, b) {
        (
            Some(Event::Key { key: ka, .. }),
            Some(Event::Key {
                key: kb, report, ..
            }),
        ) => (ka.expose().to_vec(), kb.expose().to_vec(), report),
        other => panic!("expected keys at both ends, got {other:?}"),
    }
}

#[test]
fn offline_blocks_give_identical_keys_across_qber_and_cascade_schedules() {
    for reconciler in [Reconciler::Cascade, Reconciler::CascadeOpt] {
        for q in [0.005, 0.02, 0.05] {
            let (a, b, auth) = offline(1_000_000, q, reconciler);
            let (ka, kb, r) = keys(a, b);
            let f = r.efficiency_f().expect("key bits at QBER > 0");
            println!(
                "{reconciler:?} q {q}: in {} leaked {} f {f:.3} final {} auth {auth}",
                r.input_bits, r.leaked_bits, r.final_key_bits
            );
            assert_eq!(ka, kb);
            assert!(!ka.is_empty());
            assert!(r.verified);
            assert!((r.qber - q).abs() < 0.01);
            assert!(f < 1.5, "{reconciler:?} f = {f}");
            assert!(auth > 0);
            // Cascade's parity rounds travel in provisional frames: the
            // block spends a handful of tags per direction (here: both
            // hash keys and at most 8 pads each way), not one per round.
            assert!(
                auth <= 2 * 128 + 16 * 128,
                "{reconciler:?} spent {auth} authentication bits over {} rounds",
                r.rounds
            );
        }
    }
}

/// The LDPC path end to end on a few frames (seeded data).
#[test]
fn offline_ldpc_block_gives_identical_keys() {
    for q in [0.02, 0.05] {
        let (a, b, auth) = offline(120_000, q, Reconciler::Ldpc);
        let (ka, kb, r) = keys(a, b);
        println!(
            "Ldpc q {q}: in {} leaked {} f {:?} final {} auth {auth}",
            r.input_bits,
            r.leaked_bits,
            r.efficiency_f(),
            r.final_key_bits
        );
        assert_eq!(ka, kb);
        assert!(r.verified && r.final_key_bits > 0);
    }
}

#[test]
fn high_qber_aborts_cleanly_with_no_key() {
    for q in [0.15, 0.3] {
        let (a, b, _) = offline(50_000, q, Reconciler::CascadeOpt);
        assert!(matches!(a, Some(Event::Aborted { .. })), "{a:?}");
        assert!(matches!(b, Some(Event::Aborted { .. })), "{b:?}");
        if let Some(Event::Aborted { reason, .. }) = a {
            assert!(reason.contains("QBER"), "{reason}");
        }
    }
}

#[test]
fn unequal_lengths_abort() {
    let cfg = ProtocolConfig::default();
    let key = psk(1);
    let mut alice = Endpoint::alice(cfg.clone(), &key, 1, None).unwrap();
    let mut bob = Endpoint::bob(cfg, &key, 2).unwrap();
    let (a, _) = noisy_pair(10_000, 0.01, 1);
    let (b, _) = noisy_pair(9_000, 0.01, 2);
    alice.add_offline_block(0, a).unwrap();
    bob.start_offline_block(0, &b).unwrap();
    pump(&mut alice, &mut bob, &mut |_| {}).unwrap();
    match alice.poll_output() {
        Some(Event::Aborted { reason, .. }) => {
            assert!(reason.contains("unequal lengths"), "{reason}")
        }
        e => panic!("{e:?}"),
    }
    assert!(matches!(bob.poll_output(), Some(Event::Aborted { .. })));
}

/// Alice and Bob (default settings, the same pre-shared key) with one
/// 20 000-bit offline block at QBER 2 % queued.
fn one_offline_block() -> (Endpoint, Endpoint) {
    let cfg = ProtocolConfig::default();
    let key = psk(1);
    let mut alice = Endpoint::alice(cfg.clone(), &key, 1, None).unwrap();
    let mut bob = Endpoint::bob(cfg, &key, 2).unwrap();
    let (a, b) = noisy_pair(20_000, 0.02, 3);
    alice.add_offline_block(0, a).unwrap();
    bob.start_offline_block(0, &b).unwrap();
    (alice, bob)
}

/// Frame layout (see `qkdnet_link::auth`): seq (8), kind (1), len (4), body, tag (16) if tagged.
const KIND_AT: usize = 8;

#[test]
fn an_altered_message_is_rejected_and_no_key_leaves() {
    let (mut alice, mut bob) = one_offline_block();
    let mut n = 0;
    // flip one bit in the last body byte of Bob's second tagged frame
    let r = pump(&mut alice, &mut bob, &mut |f| {
        if f[KIND_AT] == 1 {
            n += 1;
            if n == 2 {
                let at = f.len() - 17;
                f[at] ^= 0x01;
            }
        }
    });
    assert_eq!(n, 2, "Bob sent a second tagged frame");
    assert!(matches!(r, Err(LinkError::Authentication(_))), "{r:?}");
    assert!(alice.failure().is_some());
    assert!(
        alice.poll_output().is_none(),
        "no key after a rejected frame"
    );
}

/// Provisional frames carry no tag, so a man in the middle can swap one
/// for another well-formed frame: here Bob's second parity request is
/// replaced by his first (renumbered). Alice answers it, but Bob's next
/// tagged frame covers the frames Bob really sent, its tag fails at Alice,
/// and no key leaves either side.
#[test]
fn a_substituted_provisional_frame_is_caught_by_the_next_tag() {
    let (mut alice, mut bob) = one_offline_block();
    let mut first: Option<Vec<u8>> = None;
    let mut swapped = false;
    let r = pump(&mut alice, &mut bob, &mut |f| {
        if f[KIND_AT] != 0 || swapped {
            return;
        }
        match &first {
            None => first = Some(f.clone()),
            Some(old) => {
                let seq = f[..KIND_AT].to_vec();
                *f = old.clone();
                f[..KIND_AT].copy_from_slice(&seq);
                swapped = true;
            }
        }
    });
    assert!(swapped, "Bob sent two provisional frames");
    assert!(matches!(r, Err(LinkError::Authentication(_))), "{r:?}");
    assert!(alice.failure().is_some());
    assert!(alice.poll_output().is_none(), "no key at Alice");
    assert!(
        !matches!(bob.poll_output(), Some(Event::Key { .. })),
        "no key at Bob"
    );
}

#[test]
fn replayed_or_dropped_frames_are_rejected() {
    let (mut alice, mut bob) = one_offline_block();
    let first = bob.poll_transmit().unwrap();
    alice.handle_frame(&first).unwrap();
    let e = alice.handle_frame(&first).unwrap_err();
    assert!(e.to_string().contains("frame number 0"), "{e}");
}

/// A man in the middle who does not hold the authentication key: he runs his
/// own endpoint (with a guessed key) towards Alice, pretending to be Bob.
#[test]
fn a_man_in_the_middle_without_the_key_cannot_make_alice_accept() {
    let cfg = ProtocolConfig::default();
    let mut alice = Endpoint::alice(cfg.clone(), &psk(1), 1, None).unwrap();
    let mut mallory = Endpoint::bob(cfg, &psk(666), 2).unwrap();
    let (a, b) = noisy_pair(20_000, 0.02, 3);
    alice.add_offline_block(0, a).unwrap();
    mallory.start_offline_block(0, &b).unwrap();
    let r = pump(&mut alice, &mut mallory, &mut |_| {});
    assert!(matches!(r, Err(LinkError::Authentication(_))), "{r:?}");
    assert!(alice.poll_output().is_none());
    // and forging a frame by hand with a random tag fails too
    let mut alice = Endpoint::alice(ProtocolConfig::default(), &psk(1), 1, None).unwrap();
    let mut body = Vec::new();
    Msg::Start {
        block: 0,
        n: 20_000,
        sample: 10,
        seed: 1,
    }
    .encode(&mut body);
    let mut frame = 0u64.to_le_bytes().to_vec();
    frame.push(1); // tagged
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    frame.extend_from_slice(&[0x5A; 16]);
    assert!(matches!(
        alice.handle_frame(&frame),
        Err(LinkError::Authentication(_))
    ));
}

fn record_run(
    eve: Eve,
    km: f64,
    blocks: u64,
    gates_per_block: u64,
    reconciler: Reconciler,
) -> (Vec<Event>, Vec<Event>) {
    let link = preset::get("metro-1ghz").unwrap().at_distance(km).unwrap();
    let cfg = ProtocolConfig {
        reconciler,
        eps_sec: link.postproc.eps_sec.get(),
        eps_cor: link.postproc.eps_cor.get(),
        classes: link.source.classes().iter().map(|c| (c.1, c.2)).collect(),
        ..Default::default()
    };
    let mut sim = Simulator::new(&link, eve, 5).unwrap();
    let key = psk(2);
    let mut alice = Endpoint::alice(
        cfg.clone(),
        &key,
        1,
        Some(sim.alice_record(blocks * gates_per_block).unwrap()),
    )
    .unwrap();
    let mut bob = Endpoint::bob(cfg, &key, 2).unwrap();
    for blk in 0..blocks {
        let mut dets = Vec::new();
        sim.run(gates_per_block, &mut |d| {
            dets.push(d);
            Ok::<(), ()>(())
        })
        .unwrap();
        bob.start_record_block(blk, dets).unwrap();
    }
    pump(&mut alice, &mut bob, &mut |_| {}).unwrap();
    let mut ea = vec![];
    let mut eb = vec![];
    while let Some(e) = alice.poll_output() {
        ea.push(e);
    }
    while let Some(e) = bob.poll_output() {
        eb.push(e);
    }
    (ea, eb)
}

#[test]
fn simulated_link_blocks_distil_identical_keys() {
    let (ea, eb) = record_run(Eve::None, 20.0, 2, 150_000_000, Reconciler::CascadeOpt);
    assert_eq!(ea.len(), 2);
    let mut total = 0;
    for (a, b) in ea.into_iter().zip(eb) {
        let (ka, kb, r) = keys(Some(a), Some(b));
        println!(
            "block {}: sifted {} disclosed {} (errors {}), qber {:.4}, leaked {}, phase err {:.4}, final {}",
            r.block,
            r.input_bits,
            r.disclosed_bits,
            r.disclosed_errors,
            r.qber,
            r.leaked_bits,
            r.phase_error,
            r.final_key_bits
        );
        assert_eq!(ka, kb);
        total += r.final_key_bits;
    }
    assert!(total > 10_000, "{total}");
}

#[test]
fn intercept_resend_attack_leads_to_abort_with_no_key() {
    let (ea, eb) = record_run(
        Eve::parse("intercept-resend:1.0").unwrap(),
        20.0,
        2,
        150_000_000,
        Reconciler::CascadeOpt,
    );
    for e in ea.iter().chain(eb.iter()) {
        match e {
            Event::Aborted { reason, .. } => assert!(
                reason.contains("QBER") || reason.contains("no positive key"),
                "{reason}"
            ),
            Event::Key { .. } => panic!("key distilled under a full intercept-resend attack"),
        }
    }
    assert_eq!(ea.len(), 2);
}

/// Record mode with LDPC: frames that fail to decode are dropped at both ends
/// (the two reports agree on how many), the keys stay identical, and the block
/// still yields key.
#[test]
fn simulated_link_ldpc_blocks_distil_identical_keys() {
    let (ea, eb) = record_run(Eve::None, 20.0, 2, 150_000_000, Reconciler::Ldpc);
    assert_eq!(ea.len(), 2);
    let mut total = 0;
    for (a, b) in ea.into_iter().zip(eb) {
        let ra = match &a {
            Event::Key { report, .. } => report.clone(),
            Event::Aborted { reason, .. } => panic!("Alice aborted: {reason}"),
        };
        let (ka, kb, rb) = keys(Some(a), Some(b));
        println!(
            "block {}: frames {} dropped {} leaked {} f {:?} final {}",
            rb.block,
            rb.rounds,
            rb.frames_discarded,
            rb.leaked_bits,
            rb.efficiency_f(),
            rb.final_key_bits
        );
        assert_eq!(ka, kb);
        assert_eq!(ra.frames_discarded, rb.frames_discarded);
        assert!(rb.frames_discarded < rb.rounds);
        total += rb.final_key_bits;
    }
    assert!(total > 10_000, "{total}");
}

/// `qkdnet postproc` cuts a file into blocks, so the last block can hold a
/// single bit (a 20 001-bit file with `--block 10000`): Bob's sample size
/// was `clamp(1, 0)`, which panics. Now the block ends without key.
#[test]
fn a_one_bit_offline_block_aborts_without_panicking() {
    let cfg = ProtocolConfig::default();
    let key = psk(1);
    let mut alice = Endpoint::alice(cfg.clone(), &key, 1, None).expect("valid settings");
    let mut bob = Endpoint::bob(cfg, &key, 2).expect("valid settings");
    let (a, b) = noisy_pair(1, 0.0, 4);
    alice.add_offline_block(0, a).expect("Alice adds blocks");
    bob.start_offline_block(0, &b).expect("Bob starts blocks");
    pump(&mut alice, &mut bob, &mut |_| {}).expect("an honest exchange");
    assert!(matches!(alice.poll_output(), Some(Event::Aborted { .. })));
    assert!(matches!(bob.poll_output(), Some(Event::Aborted { .. })));
}

/// One frame sealed by a peer that holds the authentication key.
fn forged(role: Role, channel: &mut AuthChannel, msgs: &[Msg]) -> Vec<u8> {
    let (frame, tagged) = channel.seal(msgs).expect("pads left");
    assert!(tagged, "{role:?}'s forged frame carries a tag");
    frame
}

/// A peer that holds the authentication key but sends counts whose sum
/// overflows a u64 (Alice's test-error counts, Bob's leakage): the block
/// ends without key, nothing panics.
#[test]
fn overflowing_counts_from_an_authenticated_peer_end_the_block() {
    let key = psk(1);
    // Alice's error counts in `Estimate`
    let mut bob = Endpoint::bob(ProtocolConfig::default(), &key, 2).expect("valid settings");
    let (_, b) = noisy_pair(20_000, 0.02, 3);
    bob.start_offline_block(0, &b).expect("Bob starts blocks");
    let mut fake_alice = AuthChannel::from_preshared(Role::Alice, &key).expect("long enough");
    let estimate = Msg::Estimate {
        block: 0,
        errors: vec![u64::MAX, 2],
        reconciler: Reconciler::Cascade,
        qber_ppm: 20_000,
        seed: 7,
    };
    bob.handle_frame(&forged(Role::Alice, &mut fake_alice, &[estimate]))
        .expect("the frame authenticates");
    match bob.poll_output() {
        Some(Event::Aborted { reason, .. }) => assert!(reason.contains("more errors"), "{reason}"),
        e => panic!("{e:?}"),
    }
    // Bob's leakage in `Reconciled`
    let cfg = ProtocolConfig {
        qber_hint: Some(0.02),
        ..Default::default()
    };
    let mut alice = Endpoint::alice(cfg, &key, 1, None).expect("valid settings");
    let (a, _) = noisy_pair(20_000, 0.02, 3);
    alice.add_offline_block(0, a).expect("Alice adds blocks");
    let mut fake_bob = AuthChannel::from_preshared(Role::Bob, &key).expect("long enough");
    let start = [
        Msg::Start {
            block: 0,
            n: 20_000,
            sample: 0,
            seed: 5,
        },
        Msg::TestBits {
            block: 0,
            bits: BitVec::zeros(0),
        },
    ];
    alice
        .handle_frame(&forged(Role::Bob, &mut fake_bob, &start))
        .expect("the frame authenticates");
    let reconciled = Msg::Reconciled {
        block: 0,
        leaked_bits: u64::MAX,
        corrected: 0,
        failed_frames: vec![],
    };
    alice
        .handle_frame(&forged(Role::Bob, &mut fake_bob, &[reconciled]))
        .expect("the frame authenticates");
    match alice.poll_output() {
        Some(Event::Aborted { reason, .. }) => {
            assert!(reason.contains("no positive key"), "{reason}")
        }
        e => panic!("{e:?}"),
    }
}
