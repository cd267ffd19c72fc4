//! Cascade information reconciliation as a sans-IO state machine.
//!
//! # Why this shape
//!
//! Cascade is interactive: Bob repeatedly asks Alice for parities of ranges of
//! her key and corrects his own bits by binary search. Over a real network
//! the round trip, not the arithmetic, bounds throughput, so the protocol is
//! cut into *rounds*: [`CascadeBob::poll_request`] returns one
//! [`ParityRequest`] carrying every parity Bob currently needs (all top-level
//! blocks of a pass, or the next binary-search step of *every* block being
//! searched), Alice answers it with the pure function
//! [`CascadeAlice::answer`], and [`CascadeBob::handle_reply`] consumes the
//! [`ParityReply`]. No I/O, clock or threads: the `link` layer moves the
//! messages, and can run many `CascadeBob`s (frames) at once to fill the pipe.
//! No crate is used: no maintained Rust crate implements Cascade, and none
//! as a sans-IO, batched state machine with exact leakage accounting.
//!
//! The permutations of all passes form a [`CascadePlan`]; computing it is
//! the largest fixed cost of a frame, so a link computes one per parameter
//! set and shares it (`Arc`) across frames.
//!
//! BICONF is not implemented: the paper's recommended options (7) and (8)
//! reach lower leakage with plain extra passes of half-frame blocks plus
//! sub-block reuse, which is what [`Schedule::Demystified7`]/`8` do.
//!
//! # Algorithm
//!
//! * Pass `p` views the key through a permutation (identity for the first
//!   pass; a Fisher–Yates shuffle from the shared seed otherwise, see
//!   [`CascadeParams`]) and cuts it into consecutive blocks of `k_p` bits
//!   (the last one shorter).
//! * Bob compares Alice's block parities with his own. A block with odd
//!   disagreement contains an odd number of errors; BINARY halves it (left
//!   half `[s, s + ⌊len/2⌋)`), asking only the left half's parity — the right
//!   half's follows from the parent — until one bit is left, which Bob flips.
//! * Every parity Alice has ever revealed, of top blocks and of sub-blocks, is
//!   remembered. Flipping a bit toggles Bob's parity of every remembered
//!   range containing it in every pass; wherever that creates an odd
//!   disagreement, a new binary search starts from the *smallest* such range
//!   (the "cascade" effect, with sub-block reuse as recommended by
//!   Martinez-Mateo et al.). A parity already known is never asked again.
//! * Leakage is counted exactly: [`CascadeBob::leaked_bits`] is the number of
//!   parity bits Alice has sent, binary-search parities included. Inferred
//!   parities (right halves) are free.
//!
//! # Schedules
//!
//! * [`Schedule::Original`] — Brassard & Salvail (1993): 4 passes,
//!   `k1 = ⌈0.73/q⌉`, `k_i = 2·k_{i−1}`.
//! * [`Schedule::Demystified7`] — Martinez-Mateo, Pacher, Peev, Ciurana,
//!   Martin, "Demystifying the information reconciliation protocol Cascade",
//!   QIC 15 (2015), option (7): 14 passes, `k1 = 2^⌈log2(1/q)⌉`, `k2 = 4·k1`,
//!   `k_i = ⌈n/2⌉` for `i ≥ 3`, with sub-block reuse.
//! * [`Schedule::Demystified8`] — same paper, option (8), tuned for
//!   `n = 2^14`: `α = log2(1/q) − 1/2`, `k1 = 2^⌈α⌉`,
//!   `k2 = 2^⌈(α + 12)/2⌉`, `k3 = 4096`, `k_i = ⌈n/2⌉` for `i ≥ 4`; 14 passes.
//!
//! Block sizes are capped at `n`. Cascade can leave an even number of errors
//! in every block of every pass; that residual is not detectable here and is
//! caught by [`crate::verify`].
//!
//! # Peer input
//!
//! A reply with the wrong round number or the wrong number of parities is
//! rejected before any state changes; Alice rejects requests naming passes or
//! ranges that do not exist, or asking for more parities than an honest Bob
//! ever can. Inconsistent parities (a lying or
//! buggy Alice) cannot make Bob panic or loop: an honest run flips each bit
//! at most once, so more than `n` corrections is reported as
//! [`CascadeError::InconsistentPeer`] and the machine stops.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::bits::BitVec;

/// Largest supported frame, in bits (ranges are packed in 29-bit fields).
pub const MAX_FRAME_BITS: usize = (1 << 29) - 1;
/// Largest supported number of passes.
pub const MAX_PASSES: usize = 32;

/// Binary entropy `h(q) = −q·log2 q − (1−q)·log2(1−q)`, with `h(0) = h(1) = 0`;
/// NaN for `q` outside `[0, 1]`.
pub fn h2(q: f64) -> f64 {
    if !(0.0..=1.0).contains(&q) {
        return f64::NAN;
    }
    if q == 0.0 || q == 1.0 {
        return 0.0;
    }
    -q * q.log2() - (1.0 - q) * (1.0 - q).log2()
}

/// Reconciliation efficiency `f = leaked / (n·h(q))` (1 is the Shannon limit).
pub fn efficiency(leaked_bits: u64, n: usize, qber: f64) -> f64 {
    leaked_bits as f64 / (n as f64 * h2(qber))
}

/// Errors from Cascade.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CascadeError {
    // --- the peer sent something inconsistent ---
    /// A reply arrived while no request was outstanding.
    #[error("parity reply received but no request is outstanding")]
    UnexpectedReply,
    /// The reply answers a different round.
    #[error("parity reply for round {got}, expected round {expected}")]
    RoundMismatch {
        /// Round of the outstanding request.
        expected: u64,
        /// Round in the reply.
        got: u64,
    },
    /// The reply carries the wrong number of parities.
    #[error("parity reply carries {got} parities, expected {expected}")]
    ReplyLength {
        /// Parities requested.
        expected: usize,
        /// Parities received.
        got: usize,
    },
    /// A request names a pass or range that does not exist.
    #[error("parity request names an invalid range: pass {pass}, {start}..{end}")]
    InvalidQuery {
        /// Pass index in the query.
        pass: u16,
        /// Range start.
        start: u32,
        /// Range end.
        end: u32,
    },
    /// A request asks for more parities than any honest Bob can (at most
    /// `n·(passes + 1)`: one pass's blocks plus one range per search).
    #[error("parity request asks for {parities} parities, limit {limit}")]
    RequestTooLarge {
        /// Parities requested (saturating).
        parities: usize,
        /// The limit.
        limit: usize,
    },
    /// The parities received contradict each other (more corrections than
    /// bits); the machine has stopped.
    #[error("peer parities are inconsistent: {corrections} corrections on {n} bits")]
    InconsistentPeer {
        /// Corrections made so far.
        corrections: u64,
        /// Frame length.
        n: usize,
    },
    // --- the caller misused the API ---
    /// Invalid parameters (QBER out of range, empty or oversized frame, bad
    /// block sizes, too many passes).
    #[error("invalid Cascade parameters: {0}")]
    InvalidParams(&'static str),
    /// The key length does not match the parameters.
    #[error("key has {got} bits, parameters say {expected}")]
    KeyLength {
        /// Length from the parameters.
        expected: usize,
        /// Length of the key.
        got: usize,
    },
    /// The corrected key was requested before the protocol finished, or the
    /// machine was used after it failed.
    #[error("Cascade is not finished or has failed")]
    NotFinished,
}

impl CascadeError {
    /// Whether the error is the peer's fault (as opposed to caller misuse).
    pub fn is_peer_fault(&self) -> bool {
        matches!(
            self,
            Self::UnexpectedReply
                | Self::RoundMismatch { .. }
                | Self::ReplyLength { .. }
                | Self::InvalidQuery { .. }
                | Self::RequestTooLarge { .. }
                | Self::InconsistentPeer { .. }
        )
    }
}

/// Block-size schedule (see the module docs for citations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Schedule {
    /// Brassard–Salvail 1993: 4 passes, `k1 = ⌈0.73/q⌉`, doubling.
    Original,
    /// Martinez-Mateo et al. 2015, option (7): 14 passes,
    /// `k1 = 2^⌈log2(1/q)⌉`, `k2 = 4·k1`, then `⌈n/2⌉`.
    Demystified7,
    /// Martinez-Mateo et al. 2015, option (8) (tuned for 2^14-bit frames).
    Demystified8,
}

/// QBER floor used when computing block sizes (avoids infinite blocks).
const MIN_QBER: f64 = 1e-5;

impl Schedule {
    /// Block sizes per pass for a frame of `n` bits at estimated QBER `qber`.
    pub fn block_sizes(self, n: usize, qber: f64) -> Vec<usize> {
        let q = qber.max(MIN_QBER);
        let half = n.div_ceil(2).max(1);
        let cap = |k: f64| -> usize {
            if k >= n as f64 {
                n.max(1)
            } else {
                (k as usize).max(1)
            }
        };
        match self {
            Schedule::Original => {
                let k1 = (0.73 / q).ceil();
                (0..4).map(|i| cap(k1 * f64::from(1u32 << i))).collect()
            }
            Schedule::Demystified7 => {
                let k1 = 2f64.powf((1.0 / q).log2().ceil());
                let mut v = vec![cap(k1), cap(4.0 * k1)];
                v.extend(std::iter::repeat_n(half, 12));
                v
            }
            Schedule::Demystified8 => {
                let alpha = (1.0 / q).log2() - 0.5;
                let mut v = vec![
                    cap(2f64.powf(alpha.ceil())),
                    cap(2f64.powf(((alpha + 12.0) / 2.0).ceil())),
                    cap(4096.0),
                ];
                v.extend(std::iter::repeat_n(half, 11));
                v
            }
        }
    }
}

/// Parameters both parties must agree on (exchange them, authenticated,
/// before the first request): frame length, block sizes per pass, and the
/// shuffle seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CascadeParams {
    n: usize,
    block_sizes: Vec<usize>,
    seed: u64,
}

impl CascadeParams {
    /// Parameters from a named schedule and an estimated QBER in `(0, 0.5)`.
    pub fn new(schedule: Schedule, n: usize, qber: f64, seed: u64) -> Result<Self, CascadeError> {
        if !(qber > 0.0 && qber < 0.5) {
            return Err(CascadeError::InvalidParams("QBER must be in (0, 0.5)"));
        }
        Self::with_block_sizes(n, schedule.block_sizes(n, qber), seed)
    }

    /// Parameters with explicit block sizes (one per pass, each in `1..=n`).
    pub fn with_block_sizes(
        n: usize,
        block_sizes: Vec<usize>,
        seed: u64,
    ) -> Result<Self, CascadeError> {
        if n == 0 || n > MAX_FRAME_BITS {
            return Err(CascadeError::InvalidParams(
                "frame length must be in 1..=2^29-1",
            ));
        }
        if block_sizes.is_empty() || block_sizes.len() > MAX_PASSES {
            return Err(CascadeError::InvalidParams(
                "number of passes must be in 1..=32",
            ));
        }
        if block_sizes.iter().any(|&k| k == 0 || k > n) {
            return Err(CascadeError::InvalidParams("block sizes must be in 1..=n"));
        }
        Ok(Self {
            n,
            block_sizes,
            seed,
        })
    }

    /// Frame length in bits.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Block size of each pass.
    pub fn block_sizes(&self) -> &[usize] {
        &self.block_sizes
    }
    /// Shuffle seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// Number of passes.
    pub fn passes(&self) -> usize {
        self.block_sizes.len()
    }
    fn blocks_in(&self, pass: usize) -> usize {
        self.n.div_ceil(self.block_sizes[pass])
    }
    fn block_range(&self, pass: usize, b: usize) -> (usize, usize) {
        let k = self.block_sizes[pass];
        (b * k, ((b + 1) * k).min(self.n))
    }
}

/// One parity query, on the shuffled order of one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParityQuery {
    /// The parities of all top-level blocks of `pass`, in block order
    /// (`⌈n / k_pass⌉` parities).
    Blocks {
        /// Pass index (0-based).
        pass: u16,
    },
    /// The parity of positions `start..end` of the pass's shuffled key.
    Range {
        /// Pass index (0-based).
        pass: u16,
        /// First position (inclusive).
        start: u32,
        /// Last position (exclusive).
        end: u32,
    },
}

/// One round's worth of parity queries from Bob to Alice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParityRequest {
    /// Round number, echoed in the reply.
    pub round: u64,
    /// The queries; the reply answers them in order.
    pub queries: Vec<ParityQuery>,
}

/// Alice's answer: the requested parities, concatenated in query order.
///
/// Every parity sent is leakage; Alice's own count is the sum of
/// `parities.len()` over the replies she sent, which equals
/// [`CascadeBob::leaked_bits`] once Bob has accepted them all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParityReply {
    /// Round number of the request answered.
    pub round: u64,
    /// The parities (bit `i` = parity `i`).
    pub parities: BitVec,
}

/// Position maps of one pass: `fwd[pos]` = original index at shuffled
/// position `pos`, `inv[i]` = shuffled position of original index `i`.
/// `None` for the identity (first pass).
#[derive(Debug, Clone)]
struct Perm(Option<(Vec<u32>, Vec<u32>)>);

impl Perm {
    fn for_pass(n: usize, seed: u64, pass: usize) -> Self {
        if pass == 0 {
            return Perm(None);
        }
        // Seed layout (normative): seed LE ‖ pass LE ‖ domain constant.
        let mut s = [0u8; 32];
        s[..8].copy_from_slice(&seed.to_le_bytes());
        s[8..16].copy_from_slice(&(pass as u64).to_le_bytes());
        s[16..].copy_from_slice(b"qkdnet-cascade-p");
        let mut rng = Xoshiro256PlusPlus::from_seed(s);
        // n ≤ MAX_FRAME_BITS < 2^32, so indices fit in u32.
        let mut fwd: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            let j = below(&mut rng, i as u64 + 1) as usize;
            fwd.swap(i, j);
        }
        let mut inv = vec![0u32; n];
        for (pos, &orig) in fwd.iter().enumerate() {
            inv[orig as usize] = pos as u32;
        }
        Perm(Some((fwd, inv)))
    }
    #[inline]
    fn orig(&self, pos: usize) -> usize {
        match &self.0 {
            None => pos,
            Some((f, _)) => f[pos] as usize,
        }
    }
    #[inline]
    fn pos(&self, orig: usize) -> usize {
        match &self.0 {
            None => orig,
            Some((_, i)) => i[orig] as usize,
        }
    }
    fn shuffle(&self, key: &BitVec) -> BitVec {
        match &self.0 {
            None => key.clone(),
            Some((f, _)) => {
                let kw = key.as_words();
                let words = f
                    .chunks(64)
                    .map(|chunk| {
                        chunk.iter().enumerate().fold(0u64, |w, (k, &o)| {
                            w | (((kw[o as usize / 64] >> (o % 64)) & 1) << k)
                        })
                    })
                    .collect();
                BitVec::from_words_truncate(words, key.len())
            }
        }
    }
}

/// Uniform integer in `0..bound` (`bound ≥ 1`) by Lemire's multiply-shift
/// with rejection (normative: both parties must draw identical values, so
/// this does not depend on any library's sampling algorithm).
pub(crate) fn below(rng: &mut Xoshiro256PlusPlus, bound: u64) -> u64 {
    let mut m = u128::from(rng.next_u64()) * u128::from(bound);
    if (m as u64) < bound {
        let threshold = bound.wrapping_neg() % bound;
        while (m as u64) < threshold {
            m = u128::from(rng.next_u64()) * u128::from(bound);
        }
    }
    (m >> 64) as u64
}

/// The permutations of every pass for one set of parameters. Computing them
/// dominates the cost of a frame, and they are public and need not be fresh
/// per frame (errors are independent of them), so a link may compute one plan
/// per parameter set and share it (`Arc`) across frames and across
/// [`CascadeAlice`]/[`CascadeBob`] instances.
#[derive(Debug)]
pub struct CascadePlan {
    params: CascadeParams,
    perms: Vec<Perm>,
}

impl CascadePlan {
    /// Computes the permutations of every pass of `params`.
    pub fn new(params: &CascadeParams) -> Self {
        let perms = (0..params.passes())
            .map(|p| Perm::for_pass(params.n, params.seed, p))
            .collect();
        Self {
            params: params.clone(),
            perms,
        }
    }

    /// The parameters this plan was built for.
    pub fn params(&self) -> &CascadeParams {
        &self.params
    }
}

/// Alice's side: her key seen through every pass's permutation. Answering is
/// a pure function of the request.
#[derive(Debug)]
pub struct CascadeAlice {
    plan: Arc<CascadePlan>,
    shuffled: Vec<BitVec>,
}

fn check_query(params: &CascadeParams, q: &ParityQuery) -> Result<usize, CascadeError> {
    match *q {
        ParityQuery::Blocks { pass } => {
            if usize::from(pass) >= params.passes() {
                return Err(CascadeError::InvalidQuery {
                    pass,
                    start: 0,
                    end: 0,
                });
            }
            Ok(params.blocks_in(pass.into()))
        }
        ParityQuery::Range { pass, start, end } => {
            if usize::from(pass) >= params.passes() || start >= end || end as usize > params.n {
                return Err(CascadeError::InvalidQuery { pass, start, end });
            }
            Ok(1)
        }
    }
}

impl CascadeAlice {
    /// Prepares Alice's side for `key` under `params` (computes a fresh
    /// [`CascadePlan`]).
    pub fn new(key: &BitVec, params: &CascadeParams) -> Result<Self, CascadeError> {
        Self::with_plan(key, Arc::new(CascadePlan::new(params)))
    }

    /// Prepares Alice's side for `key` with a precomputed, shared plan.
    pub fn with_plan(key: &BitVec, plan: Arc<CascadePlan>) -> Result<Self, CascadeError> {
        let params = &plan.params;
        if key.len() != params.n {
            return Err(CascadeError::KeyLength {
                expected: params.n,
                got: key.len(),
            });
        }
        let shuffled = plan.perms.iter().map(|perm| perm.shuffle(key)).collect();
        Ok(Self { plan, shuffled })
    }

    /// Answers one request. Fails (without panicking) on queries that name a
    /// pass or range that does not exist, or on oversized requests.
    pub fn answer(&self, req: &ParityRequest) -> Result<ParityReply, CascadeError> {
        let params = &self.plan.params;
        let limit = params.n.saturating_mul(params.passes() + 1);
        let mut total = 0usize;
        for q in &req.queries {
            total = total.saturating_add(check_query(params, q)?);
            if total > limit {
                return Err(CascadeError::RequestTooLarge {
                    parities: total,
                    limit,
                });
            }
        }
        let mut parities = BitVec::zeros(total);
        let mut at = 0;
        for q in &req.queries {
            match *q {
                ParityQuery::Blocks { pass } => {
                    let p = usize::from(pass);
                    for b in 0..self.plan.params.blocks_in(p) {
                        let (s, e) = self.plan.params.block_range(p, b);
                        parities.set(at, self.shuffled[p].parity_range_unchecked(s, e));
                        at += 1;
                    }
                }
                ParityQuery::Range { pass, start, end } => {
                    let v = self.shuffled[usize::from(pass)]
                        .parity_range_unchecked(start as usize, end as usize);
                    parities.set(at, v);
                    at += 1;
                }
            }
        }
        Ok(ParityReply {
            round: req.round,
            parities,
        })
    }
}

/// Multiplicative hasher for the packed node keys (they are not
/// attacker-chosen beyond what the parameters allow).
#[derive(Default)]
struct NodeHasher(u64);

impl Hasher for NodeHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type NodeMap<V> = HashMap<u64, V, BuildHasherDefault<NodeHasher>>;

/// A range `start..end` of pass `pass`'s shuffled key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Node {
    pass: usize,
    start: usize,
    end: usize,
}

impl Node {
    fn id(self) -> u64 {
        ((self.pass as u64) << 58) | ((self.start as u64) << 29) | self.end as u64
    }
    fn mid(self) -> usize {
        self.start + (self.end - self.start) / 2
    }
    fn left(self) -> Node {
        Node {
            end: self.mid(),
            ..self
        }
    }
    fn right(self) -> Node {
        Node {
            start: self.mid(),
            ..self
        }
    }
    fn len(self) -> usize {
        self.end - self.start
    }
}

/// Alice's and Bob's current parity of a known range.
#[derive(Debug, Clone, Copy)]
struct Known {
    alice: bool,
    bob: bool,
}

impl Known {
    fn odd(self) -> bool {
        self.alice != self.bob
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Done,
    Failed,
}

/// Bob's side of Cascade: owns his key and corrects it in place.
///
/// Drive it with `while let Some(req) = bob.poll_request() { … send, receive
/// reply …; bob.handle_reply(&reply)? }`; then [`is_done`](Self::is_done)
/// is true and [`into_key`](Self::into_key) yields the corrected key.
#[derive(Debug)]
pub struct CascadeBob {
    plan: Arc<CascadePlan>,
    /// Passes started so far.
    started: usize,
    key: BitVec,
    shuffled: Vec<BitVec>,
    known: NodeMap<Known>,
    /// Nodes whose left child's parity has been requested.
    awaiting: NodeMap<()>,
    worklist: Vec<Node>,
    /// Queries collected for the next request.
    next: Vec<ParityQuery>,
    /// The request in flight: its round and what each query was for.
    outstanding: Option<(u64, Vec<ParityQuery>, usize)>,
    round: u64,
    leaked: u64,
    corrections: u64,
    phase: Phase,
}

impl CascadeBob {
    /// Prepares Bob's side for his noisy `key` under `params` (computes a
    /// fresh [`CascadePlan`]).
    pub fn new(key: BitVec, params: &CascadeParams) -> Result<Self, CascadeError> {
        Self::with_plan(key, Arc::new(CascadePlan::new(params)))
    }

    /// Prepares Bob's side with a precomputed, shared plan.
    pub fn with_plan(key: BitVec, plan: Arc<CascadePlan>) -> Result<Self, CascadeError> {
        let params = &plan.params;
        if key.len() != params.n {
            return Err(CascadeError::KeyLength {
                expected: params.n,
                got: key.len(),
            });
        }
        // Sized up front (growing the map was 7 % of a frame's time): every top
        // block of every pass, plus two entries per binary-search level for the
        // ≈ n/k₁ errors the first pass's block size is chosen for.
        let blocks: usize = (0..params.passes()).map(|p| params.blocks_in(p)).sum();
        let k1 = params.block_sizes.first().copied().unwrap_or(1).max(1);
        let searches = (params.n / k1) * 2 * (k1.ilog2() as usize + 2);
        let known = NodeMap::with_capacity_and_hasher(blocks + searches, Default::default());
        let mut bob = Self {
            plan,
            started: 0,
            key,
            shuffled: Vec::new(),
            known,
            awaiting: NodeMap::default(),
            worklist: Vec::new(),
            next: Vec::new(),
            outstanding: None,
            round: 0,
            leaked: 0,
            corrections: 0,
            phase: Phase::Running,
        };
        bob.start_pass();
        Ok(bob)
    }

    /// The next request to send, or `None` if a reply is awaited or the
    /// protocol is finished. At most one request is outstanding.
    pub fn poll_request(&mut self) -> Option<ParityRequest> {
        if self.phase != Phase::Running || self.outstanding.is_some() || self.next.is_empty() {
            return None;
        }
        let queries = std::mem::take(&mut self.next);
        let expected = queries
            .iter()
            .map(|q| match *q {
                ParityQuery::Blocks { pass } => self.plan.params.blocks_in(pass.into()),
                ParityQuery::Range { .. } => 1,
            })
            .sum();
        let round = self.round;
        self.round += 1;
        self.outstanding = Some((round, queries.clone(), expected));
        Some(ParityRequest { round, queries })
    }

    /// Consumes Alice's reply to the outstanding request. Malformed replies
    /// are rejected before any state changes.
    pub fn handle_reply(&mut self, reply: &ParityReply) -> Result<(), CascadeError> {
        if self.phase == Phase::Failed {
            return Err(CascadeError::NotFinished);
        }
        let Some((round, _, expected)) = &self.outstanding else {
            return Err(CascadeError::UnexpectedReply);
        };
        if reply.round != *round {
            return Err(CascadeError::RoundMismatch {
                expected: *round,
                got: reply.round,
            });
        }
        if reply.parities.len() != *expected {
            return Err(CascadeError::ReplyLength {
                expected: *expected,
                got: reply.parities.len(),
            });
        }
        // Invariant: checked just above that it is Some.
        let (_, queries, _) = self
            .outstanding
            .take()
            .expect("outstanding request checked above");
        self.leaked += reply.parities.len() as u64;
        let mut at = 0;
        for q in queries {
            match q {
                ParityQuery::Blocks { pass } => {
                    let p = usize::from(pass);
                    for b in 0..self.plan.params.blocks_in(p) {
                        let (start, end) = self.plan.params.block_range(p, b);
                        let node = Node {
                            pass: p,
                            start,
                            end,
                        };
                        let k = Known {
                            alice: reply.parities.get(at),
                            bob: self.shuffled[p].parity_range_unchecked(start, end),
                        };
                        at += 1;
                        self.known.insert(node.id(), k);
                        if k.odd() {
                            self.worklist.push(node);
                        }
                    }
                }
                ParityQuery::Range { pass, start, end } => {
                    let alice_left = reply.parities.get(at);
                    at += 1;
                    // Our own Range queries are always the left half of an
                    // awaited parent: start..end = parent.start..parent.mid().
                    self.resolve_left(usize::from(pass), start as usize, end as usize, alice_left);
                }
            }
        }
        self.run()
    }

    /// Whether reconciliation has finished.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Parity bits disclosed by Alice so far (the exact leakage).
    pub fn leaked_bits(&self) -> u64 {
        self.leaked
    }

    /// Request/reply round trips so far.
    pub fn rounds(&self) -> u64 {
        self.round
    }

    /// Bits flipped so far.
    pub fn corrections(&self) -> u64 {
        self.corrections
    }

    /// The parameters in use.
    pub fn params(&self) -> &CascadeParams {
        &self.plan.params
    }

    /// Bob's key as corrected so far.
    pub fn key(&self) -> &BitVec {
        &self.key
    }

    /// The corrected key, once [`is_done`](Self::is_done).
    pub fn into_key(self) -> Result<BitVec, CascadeError> {
        if self.phase != Phase::Done {
            return Err(CascadeError::NotFinished);
        }
        Ok(self.key)
    }

    fn start_pass(&mut self) {
        let p = self.started;
        self.shuffled.push(self.plan.perms[p].shuffle(&self.key));
        self.started += 1;
        self.next.push(ParityQuery::Blocks { pass: p as u16 });
    }

    fn resolve_left(&mut self, pass: usize, start: usize, end: usize, alice_left: bool) {
        // The parent is the node whose left half is start..end; with our
        // split rule the parent end is not recoverable from the query alone,
        // so it is looked up among awaited nodes: candidates have
        // mid = end, i.e. len ∈ {2(end-start), 2(end-start)+1}.
        let half = end - start;
        let parent = [2 * half, 2 * half + 1]
            .into_iter()
            .map(|len| Node {
                pass,
                start,
                end: start + len,
            })
            .find(|n| self.awaiting.contains_key(&n.id()) && n.mid() == end);
        let Some(parent) = parent else {
            // Unreachable with our own queries; ignore defensively.
            return;
        };
        self.awaiting.remove(&parent.id());
        let Some(pk) = self.known.get(&parent.id()).copied() else {
            return;
        };
        let (l, r) = (parent.left(), parent.right());
        let lk = Known {
            alice: alice_left,
            bob: self.shuffled[pass].parity_range_unchecked(l.start, l.end),
        };
        let rk = Known {
            alice: pk.alice ^ alice_left,
            bob: pk.bob ^ lk.bob,
        };
        self.known.insert(l.id(), lk);
        self.known.insert(r.id(), rk);
        self.worklist.push(parent);
    }

    /// Processes the worklist; advances passes when nothing is pending.
    fn run(&mut self) -> Result<(), CascadeError> {
        loop {
            while let Some(node) = self.worklist.pop() {
                self.descend(node)?;
            }
            if !self.next.is_empty() || !self.awaiting.is_empty() {
                return Ok(());
            }
            // Safety sweep: any odd known range without known odd children
            // must be searched (normally already covered by `flip`).
            self.sweep();
            if !self.worklist.is_empty() {
                continue;
            }
            if self.started < self.plan.params.passes() {
                self.start_pass();
                return Ok(());
            }
            self.phase = Phase::Done;
            return Ok(());
        }
    }

    fn sweep(&mut self) {
        let mut found = Vec::new();
        for (&id, &k) in &self.known {
            if !k.odd() || self.awaiting.contains_key(&id) {
                continue;
            }
            let node = Node {
                pass: (id >> 58) as usize,
                start: ((id >> 29) & ((1 << 29) - 1)) as usize,
                end: (id & ((1 << 29) - 1)) as usize,
            };
            if node.len() == 1 || !self.known.contains_key(&node.left().id()) {
                found.push(node);
            }
        }
        self.worklist.extend(found);
    }

    /// Binary search from `node` as far as known parities allow.
    fn descend(&mut self, mut node: Node) -> Result<(), CascadeError> {
        loop {
            let Some(k) = self.known.get(&node.id()).copied() else {
                return Ok(());
            };
            if !k.odd() {
                return Ok(());
            }
            if node.len() == 1 {
                let orig = self.plan.perms[node.pass].orig(node.start);
                return self.flip(orig);
            }
            let l = node.left();
            match self.known.get(&l.id()).copied() {
                Some(lk) => node = if lk.odd() { l } else { node.right() },
                None => {
                    if self.awaiting.insert(node.id(), ()).is_none() {
                        self.next.push(ParityQuery::Range {
                            pass: node.pass as u16,
                            start: l.start as u32,
                            end: l.end as u32,
                        });
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Flips original bit `i` and propagates to every known range holding it.
    fn flip(&mut self, i: usize) -> Result<(), CascadeError> {
        self.corrections += 1;
        if self.corrections > self.plan.params.n as u64 {
            self.phase = Phase::Failed;
            return Err(CascadeError::InconsistentPeer {
                corrections: self.corrections,
                n: self.plan.params.n,
            });
        }
        self.key.flip(i);
        for p in 0..self.started {
            let q = self.plan.perms[p].pos(i);
            self.shuffled[p].flip(q);
            let (start, end) = self
                .plan
                .params
                .block_range(p, q / self.plan.params.block_sizes[p]);
            let mut node = Node {
                pass: p,
                start,
                end,
            };
            let mut deepest_odd = None;
            while let Some(k) = self.known.get_mut(&node.id()) {
                k.bob = !k.bob;
                if k.odd() {
                    deepest_odd = Some(node);
                }
                if node.len() == 1 {
                    break;
                }
                node = if q < node.mid() {
                    node.left()
                } else {
                    node.right()
                };
            }
            if let Some(n) = deepest_odd {
                self.worklist.push(n);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
