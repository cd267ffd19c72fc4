//! One block's life on each side: sifting, estimation, reconciliation,
//! verification, privacy amplification. Pure state machines: a message in,
//! messages out, randomness from the caller's generator.
//!
//! Each side is an enum of explicit states. `step` pairs the state with the
//! message and hands the pair to one transition function (`alice_sift_record`,
//! `estimate`, `alice_confirm`, `bob_estimate`, `bob_confirm`, ...), which
//! consumes the state and returns the next one, or the block's end, as a
//! `Next`. A message that does not fit the current state aborts the block
//! (the peer misbehaved), it is never ignored; so does any error of a
//! transition, whose [`crate::LinkError`] says whether the peer or this side's
//! own computation failed.
//!
//! The key leaves through [`DistilledKey`], whose only constructor takes a
//! `Verified` and an `Amplified`. Each is made in one private module and
//! nowhere else: `Verified` by `verification` (Bob: his tag of his key
//! matched Alice's; Alice: Bob's authenticated word that it did), and
//! `Amplified`, which holds the amplified key itself, by `amplification`
//! (the Toeplitz hash). Alice's state between amplification and Bob's verdict
//! holds her `Amplified`. Messages reach this module only as [`Received`]
//! values: [`Authenticated`], or provisional Cascade parity rounds that the
//! peer's next tag covers (see [`crate::auth`]); every message that moves a
//! block towards key arrives authenticated. So a key cannot be emitted
//! without authentication, verification and amplification having happened.
//!
//! Two sources of sifted bits share everything after sifting:
//! - **record mode**: Bob announces detections and bases, Alice answers bases
//!   and intensity classes, Z-basis matches form the key, X-basis matches are
//!   disclosed to count errors, and the secret length follows the decoy-state
//!   finite-key bounds of Lim et al. 2014 ([`qkdnet_optics::keyrate::finite`]);
//! - **offline mode** (equal-length sifted strings, no decoy data): Bob
//!   discloses a random sample to estimate the QBER; after reconciliation the
//!   phase-error rate is bounded by the observed bit-error rate plus the
//!   random-sampling correction γ of Lim et al. Eq. (5), i.e. assuming (as in
//!   symmetric BB84 with single photons) that phase errors mirror bit errors,
//!   and ℓ = n(1 − h(φᵁ)) − λ_EC − log₂(2/ε_cor) − 2·log₂(1/ε_sec).
//!
//! LDPC frames that fail to decode: in record mode both sides drop them (Bob
//! lists them in `Reconciled`) and the block goes on. The accounting stays
//! conservative. The finite-key bound is computed for all the block's key
//! bits. Each dropped bit then comes off it, because
//! H_min(X_S|E) ≥ H_min(X|E) − |X∖X_S|; this also covers the tail that fills no
//! frame. Every syndrome counts as leaked, the dropped frames' syndromes too.
//! The public list of failed frames counts one more bit per frame. In offline
//! mode the phase-error bound comes from the errors that the reconciliation
//! itself corrected, so it would be biased by which frames survived. There a
//! frame that fails still aborts the block.

use qkdnet_optics::entropy::{efficiency, h2};
use qkdnet_optics::keyrate::finite::{self, DecoyCounts};
use qkdnet_optics::record::{AliceRecord, Basis, Clicks, Detection};
use qkdnet_postproc::bits::BitVec;
use qkdnet_postproc::cascade::{CascadeAlice, CascadeBob, CascadeParams, ParityRequest, Schedule};
use qkdnet_postproc::ldpc::RateAdaptation;
use qkdnet_postproc::{pa, verify};
use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::Rng;
use zeroize::Zeroizing;

use crate::LinkError;
use crate::auth::{Authenticated, Received, may_travel_provisionally};
use crate::msg::{Msg, Reconciler};

/// The only code that makes a [`Verified`](verification::Verified): the
/// comparison of verification tags.
mod verification {
    use qkdnet_postproc::bits::BitVec;
    use qkdnet_postproc::verify::{self, VerifyKey, VerifyTag};

    use crate::LinkError;

    /// Proof that the reconciled keys of both ends hashed to the same
    /// verification tag. Zero-sized; its field is private to this module.
    #[derive(Debug)]
    pub(super) struct Verified(());

    /// Bob on `Confirm`: hashes his reconciled key with Alice's verification
    /// key and compares the result with her tag in constant time. `None`
    /// when they differ; an error when her tag length is out of range (her
    /// fault) or his tag cannot be computed.
    pub(super) fn check_tag(
        key: &BitVec,
        verify_key: [u8; 16],
        tag_bits: u32,
        tag: u128,
    ) -> Result<Option<Verified>, LinkError> {
        let theirs = VerifyTag::new(tag_bits, tag).map_err(LinkError::PeerTag)?;
        let mine = verify::verify_tag(VerifyKey::from_bytes(verify_key), key, theirs.bits())?;
        Ok(mine.matches(&theirs).then_some(Verified(())))
    }

    /// Alice on `Verified`: Bob's verdict on the comparison. The message
    /// reaches a block only authenticated (it may not travel provisionally,
    /// see `checked`), so his word is as good as his comparison.
    pub(super) fn confirmed_by_bob(ok: bool) -> Option<Verified> {
        ok.then_some(Verified(()))
    }
}

/// The only code that makes an [`Amplified`](amplification::Amplified):
/// privacy amplification.
mod amplification {
    use qkdnet_postproc::bits::BitVec;
    use qkdnet_postproc::pa::{self, PaError};

    /// A key out of privacy amplification: it holds the Toeplitz hash's
    /// output, and nothing outside this module can put other bits in one.
    pub(super) struct Amplified(BitVec);

    impl Amplified {
        /// The amplified key.
        pub(super) fn key(&self) -> &BitVec {
            &self.0
        }
    }

    /// Hashes `key` down to `len` bits with the Toeplitz matrix of `seed`.
    pub(super) fn amplify(seed: &BitVec, key: &BitVec, len: usize) -> Result<Amplified, PaError> {
        pa::toeplitz_hash(seed, key, len).map(Amplified)
    }
}

use amplification::Amplified;
use verification::Verified;

/// Protocol settings both ends must share.
#[derive(Debug, Clone)]
pub struct ProtocolConfig {
    /// Reconciliation algorithm (Alice's choice is announced per block).
    pub reconciler: Reconciler,
    /// Secrecy parameter ε_sec.
    pub eps_sec: f64,
    /// Correctness parameter ε_cor.
    pub eps_cor: f64,
    /// Offline mode: a QBER estimate to use instead of disclosing a sample.
    pub qber_hint: Option<f64>,
    /// Offline mode: fraction of bits disclosed to estimate the QBER.
    pub sample_fraction: f64,
    /// Abort when the estimated QBER exceeds this.
    pub max_qber: f64,
    /// LDPC codeword length (bits).
    pub ldpc_frame: usize,
    /// Record mode: the intensity classes (μ, probability), signal first.
    pub classes: Vec<(f64, f64)>,
}

impl Default for ProtocolConfig {
    fn default() -> Self {
        ProtocolConfig {
            reconciler: Reconciler::CascadeOpt,
            eps_sec: 1e-10,
            eps_cor: 1e-15,
            qber_hint: None,
            sample_fraction: 0.05,
            max_qber: 0.11,
            ldpc_frame: 1 << 14,
            classes: Vec::new(),
        }
    }
}

/// What happened to one block, as either side saw it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockReport {
    /// Block number.
    pub block: u64,
    /// Sifted key bits entering reconciliation.
    pub input_bits: u64,
    /// Bits disclosed for estimation (test basis or sample).
    pub disclosed_bits: u64,
    /// Errors among the disclosed bits.
    pub disclosed_errors: u64,
    /// QBER of the key bits (errors corrected / input bits), known after reconciliation.
    pub qber: f64,
    /// Bits disclosed by reconciliation.
    pub leaked_bits: u64,
    /// Verification tag bits (public).
    pub verify_bits: u64,
    /// Phase-error bound used for privacy amplification.
    pub phase_error: f64,
    /// Whether verification passed.
    pub verified: bool,
    /// Secret bits out of privacy amplification.
    pub final_key_bits: u64,
    /// Reconciliation rounds (Cascade) or frames (LDPC).
    pub rounds: u64,
    /// LDPC frames that did not decode and were dropped at both ends (record
    /// mode; offline mode aborts the block instead).
    pub frames_discarded: u64,
}

impl BlockReport {
    /// Reconciliation efficiency f = leaked / (n·h(QBER))
    /// ([`qkdnet_optics::entropy::efficiency`]); `None` where it is undefined
    /// (no key bits, or QBER 0).
    pub fn efficiency_f(&self) -> Option<f64> {
        efficiency(self.leaked_bits, self.input_bits, self.qber)
    }
}

/// A block's final key: both sides hold the same bits.
pub struct DistilledKey {
    /// Block number.
    pub block: u64,
    bytes: Zeroizing<Vec<u8>>,
    bits: u64,
}

impl std::fmt::Debug for DistilledKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DistilledKey {{ block: {}, bits: {} }}",
            self.block, self.bits
        )
    }
}

impl DistilledKey {
    /// The only way to make one: from a verification's proof and an amplified key.
    fn new(block: u64, _verified: Verified, key: Amplified) -> DistilledKey {
        DistilledKey {
            block,
            bytes: Zeroizing::new(key.key().to_bytes()),
            bits: key.key().len() as u64,
        }
    }
    /// Key length in bits.
    pub fn bits(&self) -> u64 {
        self.bits
    }
    /// The key bytes (LSB-first bit packing, last byte zero-padded).
    pub fn expose(&self) -> &[u8] {
        &self.bytes
    }
    /// Splits off the first `n` bytes (to refill authentication).
    pub fn take_front(&mut self, n: usize) -> Zeroizing<Vec<u8>> {
        let n = n.min(self.bytes.len());
        let front = Zeroizing::new(self.bytes[..n].to_vec());
        self.bytes.drain(..n);
        self.bits = self.bits.saturating_sub(8 * n as u64);
        front
    }
}

/// How a block ended.
#[derive(Debug)]
pub enum Outcome {
    /// Key distilled.
    Key(DistilledKey, BlockReport),
    /// No key leaves this block.
    Aborted {
        /// Block number.
        block: u64,
        /// Why.
        reason: String,
        /// What was measured before the abort.
        report: BlockReport,
    },
}

/// Estimation data: decoy counts (record mode) or the offline sample.
#[derive(Debug, Clone)]
enum Stats {
    Decoy(DecoyCounts),
    Offline { sample: u64, sample_errors: u64 },
}

/// After sifting, either side holds this.
#[derive(Debug)]
struct Sifted {
    key: BitVec,
    classes_key: Vec<u8>,
    test: BitVec,
    classes_test: Vec<u8>,
}

impl Sifted {
    fn empty() -> Sifted {
        Sifted {
            key: BitVec::zeros(0),
            classes_key: vec![],
            test: BitVec::zeros(0),
            classes_test: vec![],
        }
    }

    /// Offline mode: the key and the disclosed sample, one intensity class.
    fn offline(key: BitVec, test: BitVec) -> Sifted {
        Sifted {
            classes_key: vec![0; key.len()],
            classes_test: vec![0; test.len()],
            key,
            test,
        }
    }

    /// Files a bit both sides measured in the same basis: X-basis bits are
    /// disclosed to count errors, Z-basis bits form the key.
    fn push(&mut self, x_basis: bool, bit: bool, class: u8) {
        if x_basis {
            self.test.push(bit);
            self.classes_test.push(class);
        } else {
            self.key.push(bit);
            self.classes_key.push(class);
        }
    }
}

fn bits_from(iter: impl Iterator<Item = bool>) -> BitVec {
    let mut v = BitVec::zeros(0);
    for b in iter {
        v.push(b);
    }
    v
}

fn schedule(r: Reconciler) -> Schedule {
    match r {
        Reconciler::Cascade => Schedule::Original,
        _ => Schedule::Demystified7,
    }
}

fn qber_for_codes(e: f64) -> f64 {
    e.clamp(1e-3, 0.2)
}

fn ldpc_adaptation(
    cfg: &ProtocolConfig,
    qber: f64,
    seed: u64,
) -> Result<RateAdaptation, LinkError> {
    // Target efficiency from the decoder's measured convergence at 2^14-bit frames
    // (examples/ldpc_stats.rs, at most 2 of 50 frames failing: f = 1.5, 1.4, 1.25,
    // 1.2 at QBER 1, 2, 5, 8 %; 11 % is not measured and keeps 1.25).
    // Plus 0.1 of margin: in offline mode a frame that fails aborts the block; in
    // record mode it is dropped, but `link run` at 25 km (seeds 1-3) still gave
    // most key with the margin (median 1.36 Mbit/s, against 1.31 with 0.05 and
    // 1.11 with none, where 2-5 % of frames failed and decoding took longer).
    let table = [
        (0.01, 1.5),
        (0.02, 1.4),
        (0.05, 1.25),
        (0.08, 1.2),
        (0.11, 1.25),
    ];
    let q = qber_for_codes(qber);
    let f = match table.iter().position(|&(tq, _)| q <= tq) {
        Some(0) => table[0].1,
        Some(i) => {
            let ((q0, f0), (q1, f1)) = (table[i - 1], table[i]);
            f0 + (f1 - f0) * (q - q0) / (q1 - q0)
        }
        None => table[table.len() - 1].1,
    } + 0.1;
    RateAdaptation::for_qber(cfg.ldpc_frame, q, f.min(2.0), 0.1, seed).map_err(LinkError::from)
}

/// The message, if it may drive a block in the way it arrived: anything
/// authenticated, and provisionally only Cascade's parity rounds (the
/// channel already refuses others; checked again here because the rule is
/// what keeps key release behind a tag).
fn checked(m: Received) -> Result<Msg, LinkError> {
    match m {
        Received::Authenticated(a) => Ok(Authenticated::into_msg(a)),
        Received::Provisional(p) if may_travel_provisionally(p.msg()) => Ok(p.into_msg()),
        Received::Provisional(p) => Err(LinkError::Protocol(format!(
            "{} arrived unauthenticated",
            p.msg().name()
        ))),
    }
}

/// What Bob's reconciliation ended with (what `Reconciled` tells Alice).
struct Reconciliation {
    leaked: u64,
    corrected: u64,
    rounds: u64,
    failed_frames: Vec<u32>,
}

/// `key` without the frames `failed` (strictly increasing indices of frames of
/// `frame_len` bits). Refuses indices out of order or past the last frame.
fn drop_frames(key: &BitVec, frame_len: usize, failed: &[u32]) -> Result<BitVec, LinkError> {
    let frames = key.len().checked_div(frame_len).unwrap_or(0);
    let ordered = failed.windows(2).all(|w| w[0] < w[1]);
    if !ordered || failed.last().is_some_and(|&f| f as usize >= frames) {
        return Err(LinkError::Protocol(format!(
            "invalid list of failed frames for a block of {frames}"
        )));
    }
    if failed.is_empty() {
        return key.slice(0, frames * frame_len).map_err(LinkError::from);
    }
    let mut out = BitVec::zeros(0);
    let mut skip = failed.iter().peekable();
    for f in 0..frames {
        if skip.peek().is_some_and(|&&x| x as usize == f) {
            skip.next();
            continue;
        }
        let part = key.slice(f * frame_len, (f + 1) * frame_len)?;
        out.append(&part);
    }
    Ok(out)
}

/// Secret length and phase-error bound once leakage is known.
fn secret_length(
    cfg: &ProtocolConfig,
    stats: &Stats,
    n_key: u64,
    corrected: u64,
    leaked: u64,
) -> Result<(i64, f64), LinkError> {
    match stats {
        Stats::Decoy(c) => {
            let est = finite::key_length(c, cfg.eps_sec, cfg.eps_cor, leaked as f64)?;
            // The bound is for all the block's key bits (the counts); when fewer
            // go on (LDPC keeps whole frames and drops the tail), each dropped
            // bit can carry at most one bit of the min-entropy:
            // H_min(X_S|E) ≥ H_min(X|E) − |X \ X_S|.
            let counted: f64 = c.n_key.iter().sum();
            let dropped = (counted - n_key as f64).max(0.0);
            Ok(((est.length - dropped).floor() as i64, est.phase_error))
        }
        Stats::Offline {
            sample,
            sample_errors,
        } => {
            let total = (n_key + sample) as f64;
            let e = (corrected + sample_errors) as f64 / total.max(1.0);
            let phi = if e >= 0.5 {
                0.5
            } else {
                (e + finite::gamma(cfg.eps_sec, e.max(1.0 / total), total, n_key as f64)).min(0.5)
            };
            let l = n_key as f64 * (1.0 - h2(phi))
                - leaked as f64
                - (2.0 / cfg.eps_cor).log2()
                - 2.0 * (1.0 / cfg.eps_sec).log2();
            Ok((l.floor() as i64, phi))
        }
    }
}

fn decoy_counts(
    cfg: &ProtocolConfig,
    s: &Sifted,
    test_errors: &[u64],
) -> Result<DecoyCounts, LinkError> {
    if cfg.classes.len() != 3 {
        return Err(LinkError::Usage(format!(
            "decoy-state estimation needs three intensity classes, the link has {}",
            cfg.classes.len()
        )));
    }
    let mut c = DecoyCounts {
        mu: [0.0; 3],
        p: [0.0; 3],
        n_key: [0.0; 3],
        n_test: [0.0; 3],
        m_test: [0.0; 3],
    };
    for k in 0..3 {
        c.mu[k] = cfg.classes[k].0;
        c.p[k] = cfg.classes[k].1;
        c.m_test[k] = test_errors.get(k).copied().unwrap_or(0) as f64;
    }
    for &k in &s.classes_key {
        c.n_key[(k as usize).min(2)] += 1.0;
    }
    for &k in &s.classes_test {
        c.n_test[(k as usize).min(2)] += 1.0;
    }
    Ok(c)
}

fn sample_positions(n: u64, sample: u64, seed: u64) -> Vec<bool> {
    // partial Fisher–Yates from a seed both sides know
    let mut rng = <Xoshiro256PlusPlus as rand_xoshiro::rand_core::SeedableRng>::seed_from_u64(seed);
    let mut idx: Vec<u64> = (0..n).collect();
    let mut mark = vec![false; n as usize];
    for i in 0..sample.min(n) {
        let j = i + rng.next_u64() % (n - i);
        idx.swap(i as usize, j as usize);
        mark[idx[i as usize] as usize] = true;
    }
    mark
}

fn split_sample(bits: &BitVec, mark: &[bool]) -> (BitVec, BitVec) {
    let key = bits_from((0..bits.len()).filter(|&i| !mark[i]).map(|i| bits.get(i)));
    let sample = bits_from((0..bits.len()).filter(|&i| mark[i]).map(|i| bits.get(i)));
    (key, sample)
}

// ─────────────────────────── transitions ───────────────────────────

/// Where a transition leads: on, in a new state, or to the block's end.
enum Next<S> {
    /// The block goes on in state `S` once these messages are sent.
    Go(S, Vec<Msg>),
    /// The block ends: these messages go out and this is its outcome.
    End(Vec<Msg>, Outcome),
}

impl<S> Next<S> {
    /// The block ends without key and the peer is told why.
    fn abort(block: u64, reason: String, report: BlockReport) -> Next<S> {
        let (out, outcome) = aborted(block, reason, report, true);
        Next::End(out, outcome)
    }

    /// Puts the next state in `slot` (which holds `Done` during the
    /// transition) and returns what to send and maybe the outcome.
    fn apply(self, slot: &mut S) -> (Vec<Msg>, Option<Outcome>) {
        match self {
            Next::Go(state, out) => {
                *slot = state;
                (out, None)
            }
            Next::End(out, outcome) => (out, Some(outcome)),
        }
    }
}

/// An aborted block's outcome, and the `Abort` that tells the peer if `tell_peer`.
fn aborted(
    block: u64,
    reason: String,
    report: BlockReport,
    tell_peer: bool,
) -> (Vec<Msg>, Outcome) {
    let out = if tell_peer {
        vec![Msg::Abort {
            block,
            reason: reason.clone(),
        }]
    } else {
        vec![]
    };
    (
        out,
        Outcome::Aborted {
            block,
            reason,
            report,
        },
    )
}

/// The report of a block that ends before anything was measured.
fn blank_report(block: u64) -> BlockReport {
    BlockReport {
        block,
        ..Default::default()
    }
}

/// A message that does not fit the state it arrived in.
fn unexpected(m: &Msg, block: u64, side: &str) -> LinkError {
    LinkError::Protocol(format!(
        "unexpected {} for block {block} at {side}",
        m.name()
    ))
}

// ───────────────────────────── Alice ─────────────────────────────

enum AliceState {
    /// Nothing heard about this block yet.
    AwaitStart,
    /// Sifted; Bob's disclosed test bits come next.
    AwaitTest(Sifted),
    /// Estimated and reconciliation announced: Alice answers Cascade's
    /// parity requests (`cascade`) or has sent her LDPC syndromes, until Bob
    /// reports `Reconciled`.
    Reconciling {
        held: Estimated,
        cascade: Option<CascadeAlice>,
    },
    /// Alice amplified her key and sent `Confirm`; the key waits for Bob's
    /// verdict on the verification tag.
    AwaitVerified {
        key: Amplified,
        report: BlockReport,
    },
    Done,
}

/// Alice's key after estimation, with what she knows about it.
struct Estimated {
    key: BitVec,
    stats: Stats,
    report: BlockReport,
}

/// Alice's side of one block.
pub struct AliceBlock {
    block: u64,
    /// Seed of the reconciliation's public structure (Cascade permutations,
    /// LDPC code and positions), announced in `Estimate`.
    seed: u64,
    state: AliceState,
}

/// Where Alice's bits come from.
pub enum AliceSource<'a> {
    /// Her transmitter log.
    Record(&'a AliceRecord),
    /// An offline sifted string for this block.
    Offline(&'a BitVec),
}

impl AliceBlock {
    /// A block Alice waits to hear about. `seed` fixes the reconciliation's
    /// public structure (Cascade permutations, LDPC code and positions). It
    /// need not be fresh per block — that structure is public, and the
    /// errors it corrects are independent of it — and an endpoint keeps one
    /// per session, so that Cascade's permutations, the largest fixed cost
    /// of a block, are made once per session ([`qkdnet_postproc::cascade`]).
    pub fn new(block: u64, seed: u64) -> AliceBlock {
        AliceBlock {
            block,
            seed,
            state: AliceState::AwaitStart,
        }
    }

    /// Handles one message; returns what to send and maybe the outcome.
    pub fn handle(
        &mut self,
        m: Received,
        src: &AliceSource<'_>,
        cfg: &ProtocolConfig,
        rng: &mut Xoshiro256PlusPlus,
    ) -> (Vec<Msg>, Option<Outcome>) {
        let m = match checked(m) {
            Ok(m) => m,
            Err(e) => return self.abort(e.to_string(), true),
        };
        match self.step(m, src, cfg, rng) {
            Ok(r) => r,
            Err(e) => self.abort(e.to_string(), true),
        }
    }

    /// Ends the block from whatever state it is in, keeping the report
    /// measured so far.
    fn abort(&mut self, reason: String, tell_peer: bool) -> (Vec<Msg>, Option<Outcome>) {
        let report = match &self.state {
            AliceState::Reconciling { held, .. } => held.report.clone(),
            AliceState::AwaitVerified { report, .. } => report.clone(),
            _ => blank_report(self.block),
        };
        self.state = AliceState::Done;
        let (out, outcome) = aborted(self.block, reason, report, tell_peer);
        (out, Some(outcome))
    }

    /// Hands (state, message) to its transition. A transition that fails
    /// leaves the block in `Done`; `handle` then aborts it.
    fn step(
        &mut self,
        m: Msg,
        src: &AliceSource<'_>,
        cfg: &ProtocolConfig,
        rng: &mut Xoshiro256PlusPlus,
    ) -> Result<(Vec<Msg>, Option<Outcome>), LinkError> {
        let block = self.block;
        if let Msg::Abort { reason, .. } = &m {
            return Ok(self.abort(format!("Bob aborted: {reason}"), false));
        }
        let state = std::mem::replace(&mut self.state, AliceState::Done);
        let next = match (state, m, src) {
            (
                AliceState::AwaitStart,
                Msg::Detections { gates, bases, .. },
                AliceSource::Record(rec),
            ) => alice_sift_record(block, rec, &gates, &bases)?,
            (
                AliceState::AwaitStart,
                Msg::Start {
                    n, sample, seed, ..
                },
                AliceSource::Offline(bits),
            ) => alice_sift_offline(bits, n, sample, seed)?,
            (AliceState::AwaitTest(sifted), Msg::TestBits { bits, .. }, _) => {
                self.estimate(sifted, &bits, src, cfg, rng)?
            }
            (
                AliceState::Reconciling {
                    held,
                    cascade: Some(c),
                },
                Msg::Parities { request, .. },
                _,
            ) => answer_parities(block, held, c, &request)?,
            (
                AliceState::Reconciling { held, .. },
                Msg::Reconciled {
                    leaked_bits,
                    corrected,
                    failed_frames,
                    ..
                },
                _,
            ) => alice_confirm(
                block,
                held,
                leaked_bits,
                corrected,
                &failed_frames,
                cfg,
                rng,
            )?,
            (AliceState::AwaitVerified { key, report }, Msg::Verified { ok, .. }, _) => {
                alice_release(block, key, report, ok)
            }
            (_, m, _) => return Err(unexpected(&m, block, "Alice")),
        };
        Ok(next.apply(&mut self.state))
    }

    /// On `TestBits`: counts the errors among the disclosed bits, estimates,
    /// decides go / no-go and starts reconciliation.
    fn estimate(
        &self,
        sifted: Sifted,
        bits: &BitVec,
        src: &AliceSource<'_>,
        cfg: &ProtocolConfig,
        rng: &mut Xoshiro256PlusPlus,
    ) -> Result<Next<AliceState>, LinkError> {
        let block = self.block;
        if bits.len() != sifted.test.len() {
            return Err(LinkError::Protocol(format!(
                "Bob disclosed {} bits, {} expected",
                bits.len(),
                sifted.test.len()
            )));
        }
        let mut errors = vec![0u64; 3];
        for i in 0..bits.len() {
            if bits.get(i) != sifted.test.get(i) {
                errors[(sifted.classes_test[i] as usize).min(2)] += 1;
            }
        }
        let total_err: u64 = errors.iter().sum();
        let est = match (src, cfg.qber_hint) {
            (AliceSource::Offline(_), Some(h)) if bits.is_empty() => h,
            _ => total_err as f64 / (bits.len().max(1)) as f64,
        };
        let stats = match src {
            AliceSource::Record(_) => Stats::Decoy(decoy_counts(cfg, &sifted, &errors)?),
            AliceSource::Offline(_) => Stats::Offline {
                sample: bits.len() as u64,
                sample_errors: total_err,
            },
        };
        let mut report = BlockReport {
            block,
            input_bits: sifted.key.len() as u64,
            disclosed_bits: bits.len() as u64,
            disclosed_errors: total_err,
            ..Default::default()
        };
        if est > cfg.max_qber {
            let reason = format!(
                "estimated QBER {:.2} % is above the abort threshold {:.2} %",
                est * 100.0,
                cfg.max_qber * 100.0
            );
            return Ok(Next::abort(block, reason, report));
        }
        if sifted.key.is_empty() {
            // not the peer's doing: no detection of this block fell in the key basis
            return Ok(Next::abort(
                block,
                "no key bits in this block".into(),
                blank_report(block),
            ));
        }
        // go / no-go before spending reconciliation: predicted leakage f = 1.2
        let predicted = (1.2 * sifted.key.len() as f64 * h2(qber_for_codes(est))) as u64;
        let (l, _) = secret_length(
            cfg,
            &stats,
            sifted.key.len() as u64,
            (est * sifted.key.len() as f64) as u64,
            predicted,
        )?;
        if l <= 0 {
            let reason = "parameter estimation leaves no positive key".into();
            return Ok(Next::abort(block, reason, report));
        }
        let seed = self.seed;
        // Offline LDPC has one shot at each frame and a frame that
        // fails aborts the block, so its code is chosen for an upper
        // confidence bound of the QBER (two standard errors of the
        // disclosed sample above the estimate). Record mode drops a
        // failed frame instead, and its efficiency table already
        // carries a measured margin (`ldpc_adaptation`): adding this
        // one too cost 6 % of the key at 25 km (f 1.54 -> 1.62).
        // Cascade adapts as it goes and is tuned for the estimate.
        let q_code = match (cfg.reconciler, src) {
            (Reconciler::Ldpc, AliceSource::Offline(_)) if !bits.is_empty() => {
                est + 2.0 * (est * (1.0 - est) / bits.len() as f64).sqrt()
            }
            _ => est,
        };
        let qber_ppm = (qber_for_codes(q_code) * 1e6).round() as u32;
        let q = f64::from(qber_ppm) / 1e6;
        let mut out = vec![Msg::Estimate {
            block,
            errors,
            reconciler: cfg.reconciler,
            qber_ppm,
            seed,
        }];
        let (cascade, key) = match cfg.reconciler {
            Reconciler::Ldpc => {
                let ad = ldpc_adaptation(cfg, q, seed)?;
                let (syndromes, key) = ldpc_syndromes(&sifted.key, &ad, rng)?;
                report.rounds = syndromes.len() as u64;
                report.input_bits = key.len() as u64;
                out.push(Msg::Syndromes { block, syndromes });
                (None, key)
            }
            r => {
                let params = CascadeParams::new(schedule(r), sifted.key.len(), q, seed)?;
                let c = CascadeAlice::new(&sifted.key, &params)?;
                (Some(c), sifted.key)
            }
        };
        let held = Estimated { key, stats, report };
        Ok(Next::Go(AliceState::Reconciling { held, cascade }, out))
    }
}

/// Alice's LDPC syndromes, one per whole frame of `key`, and the key they
/// cover: the tail that fills no frame is dropped at both ends.
fn ldpc_syndromes(
    key: &BitVec,
    ad: &RateAdaptation,
    rng: &mut Xoshiro256PlusPlus,
) -> Result<(Vec<BitVec>, BitVec), LinkError> {
    let frames = key.len() / ad.key_len();
    let mut syndromes = Vec::with_capacity(frames);
    for f in 0..frames {
        let part = key.slice(f * ad.key_len(), (f + 1) * ad.key_len())?;
        syndromes.push(ad.encode(&part, rng)?);
    }
    Ok((syndromes, key.slice(0, frames * ad.key_len())?))
}

/// Alice (record mode) on `Detections`: answers her bases and intensity
/// classes and sifts her log against Bob's bases.
fn alice_sift_record(
    block: u64,
    rec: &AliceRecord,
    gates: &[u64],
    bases: &BitVec,
) -> Result<Next<AliceState>, LinkError> {
    let mut a_bases = BitVec::zeros(0);
    let mut classes = Vec::with_capacity(gates.len());
    let mut s = Sifted::empty();
    // The decoder gives Detections one basis per gate.
    for (i, &g) in gates.iter().enumerate() {
        let c = rec.choice(g).ok_or_else(|| {
            LinkError::Protocol(format!("Bob announced gate {g}, outside Alice's record"))
        })?;
        let ax = c.basis == Basis::X;
        a_bases.push(ax);
        classes.push(c.class);
        if ax == bases.get(i) {
            s.push(ax, c.bit == 1, c.class);
        }
    }
    let reply = Msg::SiftReply {
        block,
        bases: a_bases,
        classes,
    };
    Ok(Next::Go(AliceState::AwaitTest(s), vec![reply]))
}

/// Alice (offline mode) on `Start`: takes out the sample Bob chose.
fn alice_sift_offline(
    bits: &BitVec,
    n: u64,
    sample: u64,
    seed: u64,
) -> Result<Next<AliceState>, LinkError> {
    if n != bits.len() as u64 {
        return Err(LinkError::Protocol(format!(
            "unequal lengths: Alice has {} sifted bits, Bob {n}",
            bits.len()
        )));
    }
    if sample >= n {
        return Err(LinkError::Protocol("sample as large as the block".into()));
    }
    let (key, test) = split_sample(bits, &sample_positions(n, sample, seed));
    Ok(Next::Go(
        AliceState::AwaitTest(Sifted::offline(key, test)),
        vec![],
    ))
}

/// Alice on `Parities`: answers one round of Cascade's parity requests.
fn answer_parities(
    block: u64,
    held: Estimated,
    c: CascadeAlice,
    request: &ParityRequest,
) -> Result<Next<AliceState>, LinkError> {
    let reply = c.answer(request).map_err(LinkError::PeerCascade)?;
    Ok(Next::Go(
        AliceState::Reconciling {
            held,
            cascade: Some(c),
        },
        vec![Msg::ParityAnswers { block, reply }],
    ))
}

/// Alice on `Reconciled`: drops the frames Bob could not decode, tags her
/// key for verification, sizes the secret and amplifies. The amplified key
/// waits in `AwaitVerified` for Bob's verdict.
fn alice_confirm(
    block: u64,
    held: Estimated,
    leaked_bits: u64,
    corrected: u64,
    failed_frames: &[u32],
    cfg: &ProtocolConfig,
    rng: &mut Xoshiro256PlusPlus,
) -> Result<Next<AliceState>, LinkError> {
    let Estimated {
        key,
        stats,
        mut report,
    } = held;
    let key = if failed_frames.is_empty() {
        key
    } else {
        // Only an LDPC block of record mode may drop frames.
        let frames = report.rounds as usize;
        if cfg.reconciler != Reconciler::Ldpc
            || !matches!(stats, Stats::Decoy(_))
            || frames == 0
            || key.len() % frames != 0
        {
            return Err(LinkError::Protocol(
                "Bob drops frames of a block that has none to drop".into(),
            ));
        }
        report.frames_discarded = failed_frames.len() as u64;
        drop_frames(&key, key.len() / frames, failed_frames)?
    };
    if key.is_empty() {
        return Err(LinkError::Protocol("Bob drops every frame".into()));
    }
    if corrected > key.len() as u64 {
        return Err(LinkError::Protocol(
            "Bob reports more corrections than key bits".into(),
        ));
    }
    report.leaked_bits = leaked_bits;
    report.qber = corrected as f64 / key.len().max(1) as f64;
    let tag_bits = verify::tag_bits_for(cfg.eps_cor, key.len())?;
    let mut vk = [0u8; 16];
    rng.fill_bytes(&mut vk);
    let tag = verify::verify_tag(verify::VerifyKey::from_bytes(vk), &key, tag_bits)?;
    report.verify_bits = u64::from(tag_bits);
    let (l, phi) = secret_length(
        cfg,
        &stats,
        key.len() as u64,
        corrected,
        leaked_bits.saturating_add(u64::from(tag_bits)),
    )?;
    report.phase_error = phi;
    if l <= 0 {
        let reason =
            format!("after reconciliation (leaked {leaked_bits} bits) no positive key remains");
        return Ok(Next::abort(block, reason, report));
    }
    let l = (l as usize).min(key.len());
    let seed = BitVec::random(pa::seed_len(key.len(), l), rng);
    // amplify now; the key is released only when Bob confirms verification
    let amplified = amplification::amplify(&seed, &key, l)?;
    let out = vec![Msg::Confirm {
        block,
        verify_key: vk,
        tag_bits,
        tag: tag.value(),
        key_bits: l as u64,
        pa_seed: seed,
    }];
    report.final_key_bits = l as u64;
    Ok(Next::Go(
        AliceState::AwaitVerified {
            key: amplified,
            report,
        },
        out,
    ))
}

/// Alice on `Verified`: releases the amplified key if Bob's tag matched hers.
fn alice_release(
    block: u64,
    key: Amplified,
    mut report: BlockReport,
    ok: bool,
) -> Next<AliceState> {
    let Some(verified) = verification::confirmed_by_bob(ok) else {
        report.verified = false;
        return Next::End(
            vec![],
            Outcome::Aborted {
                block,
                reason: "verification failed: the reconciled keys differ".into(),
                report,
            },
        );
    };
    report.verified = true;
    let dk = DistilledKey::new(block, verified, key);
    Next::End(vec![], Outcome::Key(dk, report))
}

// ────────────────────────────── Bob ──────────────────────────────

enum BobState {
    /// Record mode: Bob announced his detections; Alice's bases come next.
    AwaitSift {
        dets: Vec<Detection>,
        bits: BitVec,
    },
    /// Sifted and test bits disclosed; Alice's estimate comes next.
    AwaitEstimate(BobSifted),
    /// Bob reconciles: Cascade rounds with Alice, or her LDPC syndromes.
    Reconciling {
        pending: Pending,
        rec: BobRec,
    },
    /// Reconciled; Alice's `Confirm` (tag, length, PA seed) comes next.
    AwaitConfirm(BobReconciled),
    Done,
}

/// Bob's sifted bits, and whether they came from an offline string.
struct BobSifted {
    sifted: Sifted,
    offline: bool,
}

/// What Bob carries through reconciliation besides the key.
struct Pending {
    stats: Stats,
    report: BlockReport,
    /// The QBER Alice announced for the codes.
    q: f64,
}

enum BobRec {
    Cascade(Box<CascadeBob>, BitVec),
    Ldpc {
        key: BitVec,
        ad: Box<RateAdaptation>,
    },
}

/// Bob's reconciled key, with what he knows about it.
struct BobReconciled {
    key: BitVec,
    stats: Stats,
    report: BlockReport,
    corrected: u64,
}

/// Bob's side of one block.
pub struct BobBlock {
    block: u64,
    state: BobState,
}

impl BobBlock {
    /// Starts a record-mode block from Bob's detections; returns the first message.
    pub fn start_record(
        block: u64,
        dets: Vec<Detection>,
        rng: &mut Xoshiro256PlusPlus,
    ) -> (BobBlock, Msg) {
        let gates = dets.iter().map(|d| d.gate).collect();
        let bases = bits_from(dets.iter().map(|d| d.basis == Basis::X));
        // Bob's raw bits: D0 → 0, D1 → 1, double click → random (squashing)
        let bits = bits_from(dets.iter().map(|d| match d.clicks {
            Clicks::D0 => false,
            Clicks::D1 => true,
            Clicks::Both => rng.next_u64() & 1 == 1,
        }));
        (
            BobBlock {
                block,
                state: BobState::AwaitSift { dets, bits },
            },
            Msg::Detections {
                block,
                gates,
                bases,
            },
        )
    }

    /// Starts an offline block from Bob's sifted bits; returns the messages to send.
    pub fn start_offline(
        block: u64,
        bits: &BitVec,
        cfg: &ProtocolConfig,
        rng: &mut Xoshiro256PlusPlus,
    ) -> (BobBlock, Vec<Msg>) {
        let n = bits.len() as u64;
        let sample = if cfg.qber_hint.is_some() {
            0
        } else {
            // at least one bit where the block can spare it (n ≥ 2), never more than half
            ((n as f64 * cfg.sample_fraction).ceil() as u64).clamp(1.min(n / 2), n / 2)
        };
        let seed = rng.next_u64();
        let (key, test) = split_sample(bits, &sample_positions(n, sample, seed));
        let msgs = vec![
            Msg::Start {
                block,
                n,
                sample,
                seed,
            },
            Msg::TestBits {
                block,
                bits: test.clone(),
            },
        ];
        (
            BobBlock {
                block,
                state: BobState::AwaitEstimate(BobSifted {
                    sifted: Sifted::offline(key, test),
                    offline: true,
                }),
            },
            msgs,
        )
    }

    /// Handles one message.
    pub fn handle(
        &mut self,
        m: Received,
        cfg: &ProtocolConfig,
        rng: &mut Xoshiro256PlusPlus,
    ) -> (Vec<Msg>, Option<Outcome>) {
        let _ = rng;
        let m = match checked(m) {
            Ok(m) => m,
            Err(e) => return self.abort(e.to_string(), true),
        };
        match self.step(m, cfg) {
            Ok(r) => r,
            Err(e) => self.abort(e.to_string(), true),
        }
    }

    /// Ends the block from whatever state it is in, keeping the report
    /// measured so far.
    fn abort(&mut self, reason: String, tell_peer: bool) -> (Vec<Msg>, Option<Outcome>) {
        let report = match &self.state {
            BobState::Reconciling { pending, .. } => pending.report.clone(),
            BobState::AwaitConfirm(r) => r.report.clone(),
            _ => blank_report(self.block),
        };
        self.state = BobState::Done;
        let (out, outcome) = aborted(self.block, reason, report, tell_peer);
        (out, Some(outcome))
    }

    /// Hands (state, message) to its transition. A transition that fails
    /// leaves the block in `Done`; `handle` then aborts it.
    fn step(
        &mut self,
        m: Msg,
        cfg: &ProtocolConfig,
    ) -> Result<(Vec<Msg>, Option<Outcome>), LinkError> {
        let block = self.block;
        if let Msg::Abort { reason, .. } = &m {
            return Ok(self.abort(format!("Alice aborted: {reason}"), false));
        }
        let state = std::mem::replace(&mut self.state, BobState::Done);
        let next = match (state, m) {
            (BobState::AwaitSift { dets, bits }, Msg::SiftReply { bases, classes, .. }) => {
                bob_sift(block, &dets, &bits, &bases, &classes)?
            }
            (
                BobState::AwaitEstimate(sifted),
                Msg::Estimate {
                    errors,
                    reconciler,
                    qber_ppm,
                    seed,
                    ..
                },
            ) => bob_estimate(block, sifted, &errors, reconciler, qber_ppm, seed, cfg)?,
            (
                BobState::Reconciling {
                    pending,
                    rec: BobRec::Cascade(mut c, original),
                },
                Msg::ParityAnswers { reply, .. },
            ) => {
                c.handle_reply(&reply).map_err(LinkError::PeerCascade)?;
                cascade_step(block, pending, c, original)?
            }
            (
                BobState::Reconciling {
                    pending,
                    rec: BobRec::Ldpc { key, ad },
                },
                Msg::Syndromes { syndromes, .. },
            ) => decode_syndromes(block, pending, &key, &ad, &syndromes)?,
            (
                BobState::AwaitConfirm(r),
                Msg::Confirm {
                    verify_key,
                    tag_bits,
                    tag,
                    key_bits,
                    pa_seed,
                    ..
                },
            ) => {
                let verified = verification::check_tag(&r.key, verify_key, tag_bits, tag)?;
                bob_confirm(block, r, verified, tag_bits, key_bits, &pa_seed, cfg)?
            }
            (_, m) => return Err(unexpected(&m, block, "Bob")),
        };
        Ok(next.apply(&mut self.state))
    }
}

/// Bob (record mode) on `SiftReply`: sifts his detections against Alice's
/// bases and discloses his test-basis bits.
fn bob_sift(
    block: u64,
    dets: &[Detection],
    bits: &BitVec,
    bases: &BitVec,
    classes: &[u8],
) -> Result<Next<BobState>, LinkError> {
    if bases.len() != dets.len() {
        return Err(LinkError::Protocol(format!(
            "Alice answered {} bases for {} detections",
            bases.len(),
            dets.len()
        )));
    }
    let mut s = Sifted::empty();
    // The decoder gives SiftReply one class per basis, and there is one basis per detection.
    for (i, d) in dets.iter().enumerate() {
        let bx = d.basis == Basis::X;
        if bases.get(i) == bx {
            s.push(bx, bits.get(i), classes[i]);
        }
    }
    let out = vec![Msg::TestBits {
        block,
        bits: s.test.clone(),
    }];
    Ok(Next::Go(
        BobState::AwaitEstimate(BobSifted {
            sifted: s,
            offline: false,
        }),
        out,
    ))
}

/// Bob on `Estimate`: takes Alice's error counts and code choice and starts
/// reconciling.
fn bob_estimate(
    block: u64,
    sifted: BobSifted,
    errors: &[u64],
    reconciler: Reconciler,
    qber_ppm: u32,
    seed: u64,
    cfg: &ProtocolConfig,
) -> Result<Next<BobState>, LinkError> {
    let BobSifted { sifted, offline } = sifted;
    // Alice's counts are hers to get right; a sum past u64 is as wrong as one past the sample.
    let total = errors
        .iter()
        .try_fold(0u64, |t, &e| t.checked_add(e))
        .filter(|&t| t <= sifted.test.len() as u64 && errors.len() <= 3);
    let Some(total) = total else {
        return Err(LinkError::Protocol(
            "Alice reported more errors than disclosed bits".into(),
        ));
    };
    let stats = if offline {
        Stats::Offline {
            sample: sifted.test.len() as u64,
            sample_errors: total,
        }
    } else {
        Stats::Decoy(decoy_counts(cfg, &sifted, errors)?)
    };
    let report = BlockReport {
        block,
        input_bits: sifted.key.len() as u64,
        disclosed_bits: sifted.test.len() as u64,
        disclosed_errors: total,
        ..Default::default()
    };
    let q = f64::from(qber_ppm) / 1e6;
    if !(q > 0.0 && q < 0.5) {
        return Err(LinkError::Protocol(format!(
            "QBER estimate {q} out of range"
        )));
    }
    match reconciler {
        Reconciler::Ldpc => {
            let ad = ldpc_adaptation(cfg, q, seed)?;
            let keep = sifted.key.len() / ad.key_len() * ad.key_len();
            let key = sifted.key.slice(0, keep)?;
            let report = BlockReport {
                input_bits: keep as u64,
                ..report
            };
            let pending = Pending { stats, report, q };
            let rec = BobRec::Ldpc {
                key,
                ad: Box::new(ad),
            };
            Ok(Next::Go(BobState::Reconciling { pending, rec }, vec![]))
        }
        r => {
            let params = CascadeParams::new(schedule(r), sifted.key.len(), q, seed)?;
            let original = sifted.key.clone();
            let c = CascadeBob::new(sifted.key, &params)?;
            let pending = Pending { stats, report, q };
            cascade_step(block, pending, Box::new(c), original)
        }
    }
}

/// Sends Cascade's next request, or finishes reconciliation when it has none.
fn cascade_step(
    block: u64,
    pending: Pending,
    mut c: Box<CascadeBob>,
    original: BitVec,
) -> Result<Next<BobState>, LinkError> {
    if let Some(request) = c.poll_request() {
        let rec = BobRec::Cascade(c, original);
        return Ok(Next::Go(
            BobState::Reconciling { pending, rec },
            vec![Msg::Parities { block, request }],
        ));
    }
    let (leaked, rounds) = (c.leaked_bits(), c.rounds());
    let key = c.into_key()?;
    let corrected = key.hamming_distance(&original)? as u64;
    Ok(finish_reconciliation(
        block,
        key,
        pending,
        Reconciliation {
            leaked,
            corrected,
            rounds,
            failed_frames: Vec::new(),
        },
    ))
}

/// Bob on `Syndromes`: decodes every LDPC frame. Record mode drops a frame
/// that does not decode (both ends, see `drop_frames`); offline mode, whose
/// error estimate comes from the corrected bits themselves, aborts the block
/// instead.
fn decode_syndromes(
    block: u64,
    pending: Pending,
    key: &BitVec,
    ad: &RateAdaptation,
    syndromes: &[BitVec],
) -> Result<Next<BobState>, LinkError> {
    let frames = key.len() / ad.key_len().max(1);
    if syndromes.len() != frames {
        return Err(LinkError::Protocol(format!(
            "{} syndromes for {frames} frames",
            syndromes.len()
        )));
    }
    let may_drop = matches!(pending.stats, Stats::Decoy(_));
    let mut out = BitVec::zeros(0);
    let mut failed = Vec::new();
    for (f, s) in syndromes.iter().enumerate() {
        let part = key.slice(f * ad.key_len(), (f + 1) * ad.key_len())?;
        match ad.decode(&part, pending.q, s, 200) {
            Ok(dec) => out.append(&dec),
            Err(_) if may_drop => failed.push(f as u32),
            Err(source) => return Err(LinkError::LdpcFrame { frame: f, source }),
        }
    }
    if out.is_empty() {
        let reason = "no LDPC frame of the block decoded".into();
        return Ok(Next::abort(block, reason, blank_report(block)));
    }
    let kept = drop_frames(key, ad.key_len(), &failed)?;
    let corrected = out.hamming_distance(&kept)? as u64;
    // Every syndrome counts, dropped frames' too, and in record mode
    // the public list of failed frames (at most one bit per frame).
    let leaked = ad.leaked_bits() * frames as u64 + if may_drop { frames as u64 } else { 0 };
    Ok(finish_reconciliation(
        block,
        out,
        pending,
        Reconciliation {
            leaked,
            corrected,
            rounds: frames as u64,
            failed_frames: failed,
        },
    ))
}

/// Bob's reconciled key goes to `AwaitConfirm`; `Reconciled` tells Alice.
fn finish_reconciliation(
    block: u64,
    key: BitVec,
    pending: Pending,
    r: Reconciliation,
) -> Next<BobState> {
    let Pending {
        stats, mut report, ..
    } = pending;
    report.leaked_bits = r.leaked;
    report.rounds = r.rounds;
    report.frames_discarded = r.failed_frames.len() as u64;
    report.qber = r.corrected as f64 / key.len().max(1) as f64;
    let out = vec![Msg::Reconciled {
        block,
        leaked_bits: r.leaked,
        corrected: r.corrected,
        failed_frames: r.failed_frames,
    }];
    Next::Go(
        BobState::AwaitConfirm(BobReconciled {
            key,
            stats,
            report,
            corrected: r.corrected,
        }),
        out,
    )
}

/// Bob on `Confirm`, after the tag comparison: aborts if the tags differ;
/// otherwise checks Alice's secret length against his own bound and
/// amplifies to it.
fn bob_confirm(
    block: u64,
    r: BobReconciled,
    verified: Option<Verified>,
    tag_bits: u32,
    key_bits: u64,
    pa_seed: &BitVec,
    cfg: &ProtocolConfig,
) -> Result<Next<BobState>, LinkError> {
    let BobReconciled {
        key,
        stats,
        mut report,
        corrected,
    } = r;
    report.verify_bits = u64::from(tag_bits);
    let Some(verified) = verified else {
        report.verified = false;
        return Ok(Next::End(
            vec![Msg::Verified { block, ok: false }],
            Outcome::Aborted {
                block,
                reason: "verification failed: the reconciled keys differ".into(),
                report,
            },
        ));
    };
    // Bob recomputes the length with his exact error count; Alice's may not exceed it
    let (l, phi) = secret_length(
        cfg,
        &stats,
        key.len() as u64,
        corrected,
        report.leaked_bits + u64::from(tag_bits),
    )?;
    report.phase_error = phi;
    if key_bits as i64 > l
        || key_bits as usize > key.len()
        || pa_seed.len() != pa::seed_len(key.len(), key_bits as usize)
    {
        return Err(LinkError::Protocol(format!(
            "Alice asked for {key_bits} secret bits; Bob's estimate allows {l}"
        )));
    }
    let amplified = amplification::amplify(pa_seed, &key, key_bits as usize)?;
    report.verified = true;
    report.final_key_bits = key_bits;
    let dk = DistilledKey::new(block, verified, amplified);
    Ok(Next::End(
        vec![Msg::Verified { block, ok: true }],
        Outcome::Key(dk, report),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_frames_are_dropped_at_both_ends_alike_and_bad_lists_refused() {
        let key: BitVec = (0..40).map(|i| i % 3 == 0).collect();
        let kept = drop_frames(&key, 10, &[1, 3]).expect("valid list");
        let naive: BitVec = (0..40)
            .filter(|i| !(10..20).contains(i) && !(30..40).contains(i))
            .map(|i| key.get(i))
            .collect();
        assert_eq!(kept, naive);
        assert_eq!(drop_frames(&key, 10, &[]).expect("none"), key);
        for bad in [&[3u32, 1][..], &[1, 1], &[4], &[0, 9]] {
            assert!(drop_frames(&key, 10, bad).is_err(), "{bad:?}");
        }
    }

    /// #19: a failure of this side's own computation is not reported as
    /// the peer's protocol error, and it keeps the kernel's error.
    #[test]
    fn local_failures_keep_their_layer_and_are_not_blamed_on_the_peer() {
        let cfg = ProtocolConfig {
            ldpc_frame: 1000,
            ..Default::default()
        };
        let e = ldpc_adaptation(&cfg, 0.02, 1).expect_err("no code of 1000 bits");
        assert!(matches!(e, LinkError::Ldpc(_)), "{e:?}");
        // decoy-state estimation with intensities the bounds refuse (μ2 > μ1)
        let c = DecoyCounts {
            mu: [0.1, 0.5, 0.0002],
            ..metro_counts()
        };
        let e = secret_length(&cfg, &Stats::Decoy(c), 1000, 0, 0).expect_err("μ2 > μ1");
        assert!(matches!(e, LinkError::Estimation(_)), "{e:?}");
        // record mode without the link's three intensity classes: a bad option
        let e = decoy_counts(&ProtocolConfig::default(), &Sifted::empty(), &[])
            .expect_err("no classes");
        assert!(matches!(e, LinkError::Usage(_)), "{e:?}");
    }

    /// Counts of a 25 km metro block (signal, decoy, vacuum), 1 % test errors.
    fn metro_counts() -> DecoyCounts {
        DecoyCounts {
            mu: [0.5, 0.1, 0.0002],
            p: [0.8, 0.15, 0.05],
            n_key: [3.0e6, 2.0e5, 300.0],
            n_test: [3.0e5, 2.0e4, 30.0],
            m_test: [3.0e3, 400.0, 15.0],
        }
    }

    #[test]
    fn key_bits_dropped_after_estimation_come_off_the_secret_length() {
        let cfg = ProtocolConfig::default();
        let c = metro_counts();
        let total: f64 = c.n_key.iter().sum();
        let stats = Stats::Decoy(c);
        let (full, phi) = secret_length(&cfg, &stats, total as u64, 0, 100_000).expect("bound");
        assert!(full > 100_000, "a positive key to compare: {full}");
        let (kept, phi2) =
            secret_length(&cfg, &stats, total as u64 - 12_345, 0, 100_000).expect("bound");
        assert_eq!(phi, phi2);
        assert!(
            (full - 12_345 - kept).abs() <= 1,
            "{full} - 12345 vs {kept}"
        );
    }
}
