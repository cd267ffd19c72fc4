//! Both ends of one link in one process, over loopback TCP: the same session
//! code the node daemon runs ([`crate::session`], [`crate::server`]), for
//! `qkdnet link run`, tests and the whole-chain benchmark.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use qkdnet_link::endpoint::Event;
use serde::Serialize;

use crate::NetError;
use crate::server::{self, BobLink};
use crate::session::{LinkParams, LinkStats, Pace, SessionEnd, Stop, alice_session};

/// What one side saw of a block.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Key { digest: [u8; 32], bits: u64 },
    Aborted(String),
}

/// Result of [`run_local`].
#[derive(Debug, Clone, Serialize)]
pub struct LocalRunReport {
    /// Blocks sent.
    pub blocks: u64,
    /// Blocks distilled at both ends.
    pub blocks_ok: u64,
    /// Blocks aborted.
    pub blocks_aborted: u64,
    /// Why blocks aborted (distinct reasons).
    pub abort_reasons: Vec<String>,
    /// Gates (pulses) simulated.
    pub gates: u64,
    /// Sifted key bits entering reconciliation (Bob's count).
    pub sifted_bits: u64,
    /// Mean sifted key bits per block.
    pub sifted_bits_per_block: f64,
    /// QBER over all blocks (errors corrected / sifted bits).
    pub qber: f64,
    /// Bits disclosed by reconciliation.
    pub leaked_bits: u64,
    /// LDPC frames that did not decode and were dropped at both ends.
    pub ldpc_frames_dropped: u64,
    /// Secret key bits handed on (after the authentication refill).
    pub final_key_bits: u64,
    /// Authentication key bits spent by both directions.
    pub auth_key_bits_used: u64,
    /// Whether Alice's and Bob's keys were identical for every block.
    pub keys_equal: bool,
    /// Wall-clock seconds.
    pub wall_seconds: f64,
}

fn collector() -> (
    Arc<Mutex<Vec<(u64, Outcome)>>>,
    Arc<dyn Fn(Event) + Send + Sync>,
) {
    let store: Arc<Mutex<Vec<(u64, Outcome)>>> = Arc::default();
    let s = store.clone();
    let sink = Arc::new(move |e: Event| {
        let item = match e {
            Event::Key { key, report, .. } => (
                report.block,
                Outcome::Key {
                    digest: qkdnet_crypto::sm3::sm3(key.expose()),
                    bits: key.bits(),
                },
            ),
            Event::Aborted { block, reason, .. } => (block, Outcome::Aborted(reason)),
        };
        if let Ok(mut v) = s.lock() {
            v.push(item);
        }
    });
    (store, sink)
}

/// Runs `blocks` blocks of a link with Alice and Bob in this process, talking
/// over loopback TCP exactly as two nodes do.
pub fn run_local(params: LinkParams, blocks: u64) -> Result<LocalRunReport, NetError> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let stop = Stop::new();
    let bob_stats = Arc::new(LinkStats::default());
    let (bob_events, bob_sink) = collector();
    let server = server::start(
        listener,
        vec![BobLink {
            params: params.clone(),
            stats: bob_stats.clone(),
            sink: bob_sink,
        }],
        stop.clone(),
    )?;
    let alice_stats = Arc::new(LinkStats::default());
    let (alice_events, alice_sink) = collector();
    let t0 = Instant::now();
    let session_stop = Stop::new();
    let r = alice_session(
        &params,
        addr,
        Pace::Unpaced,
        Some(blocks),
        &session_stop,
        &alice_stats,
        &mut |e| alice_sink(e),
    );
    let wall = t0.elapsed().as_secs_f64();
    stop.fire();
    let _ = server.join();
    match r? {
        SessionEnd::Finished => {}
        // nothing fires `session_stop`
        SessionEnd::Stopped => return Err(NetError::Internal("session stopped".into())),
    }
    let take = |m: &Arc<Mutex<Vec<(u64, Outcome)>>>| {
        let mut v = m.lock().map(|g| g.clone()).unwrap_or_default();
        v.sort_by_key(|x| x.0);
        v
    };
    let (a, b) = (take(&alice_events), take(&bob_events));
    let keys_equal = a.len() == b.len()
        && a.iter().zip(&b).all(|(x, y)| match (&x.1, &y.1) {
            (Outcome::Key { .. }, Outcome::Key { .. }) => x == y,
            (Outcome::Aborted(_), Outcome::Aborted(_)) => x.0 == y.0,
            _ => false,
        });
    let mut reasons: Vec<String> = a
        .iter()
        .filter_map(|x| match &x.1 {
            Outcome::Aborted(r) => Some(r.clone()),
            Outcome::Key { .. } => None,
        })
        .collect();
    reasons.sort();
    reasons.dedup();
    use std::sync::atomic::Ordering::Relaxed;
    let sifted = bob_stats.sifted_bits.load(Relaxed);
    let ok = a
        .iter()
        .filter(|x| matches!(x.1, Outcome::Key { .. }))
        .count() as u64;
    let final_bits = a
        .iter()
        .map(|x| match x.1 {
            Outcome::Key { bits, .. } => bits,
            Outcome::Aborted(_) => 0,
        })
        .sum();
    Ok(LocalRunReport {
        blocks,
        blocks_ok: ok,
        blocks_aborted: a.len() as u64 - ok,
        abort_reasons: reasons,
        gates: alice_stats.gates.load(Relaxed),
        sifted_bits: sifted,
        sifted_bits_per_block: sifted as f64 / blocks.max(1) as f64,
        qber: bob_stats.mean_qber(),
        leaked_bits: bob_stats.leaked_bits.load(Relaxed),
        ldpc_frames_dropped: bob_stats.frames_dropped.load(Relaxed),
        final_key_bits: final_bits,
        // Both ends spend the same shared key bits (Alice's sending pads are
        // Bob's receiving pads), so one end's count is the link's.
        auth_key_bits_used: alice_stats
            .auth_bits
            .load(Relaxed)
            .max(bob_stats.auth_bits.load(Relaxed)),
        keys_equal,
        wall_seconds: wall,
    })
}
