//! The network planner (`qkdnet plan`): will this topology carry this demand?
//!
//! Why a planner and not the real network: `qkdnet net up` runs the real stack
//! (one process per node, real post-processing), which is right for checking
//! the software but cannot answer "how much of a day's demand does a national
//! network block, and where" in useful time. The planner replaces every link
//! by its key-rate model and every KME pool by a number, and simulates a day of
//! key generation, relaying and consumption in well under a minute of wall time.
//! It is a discrete-event simulation over simulated time, deterministic: no
//! clock, no randomness, the same inputs give the same report.
//!
//! # Model
//!
//! - **Key generation.** A fibre link fills its pool continuously at the
//!   finite-key model rate of [`ValidLink::model_key_bps`] (a fluid: the level
//!   is brought up to date in closed form whenever it is looked at, so there is
//!   no per-block or per-bit work). A satellite link produces nothing between
//!   passes; the key of a whole pass arrives at the pass's end (an event).
//!   A pool holds at most `pool_capacity_bits`; key generated into a full pool
//!   is counted as wasted.
//! - **Demand.** Each demand is an SAE pair and a rate. It asks for
//!   `rate × interval` bits every `interval` seconds of its active window
//!   (`start_s` to `end_s`), the phase of each demand staggered within the
//!   first interval so that demands do not all ask at the same instant.
//!   A request is all-or-nothing: served in full or blocked in full.
//! - **Relaying** (ETSI GS QKD 014 Annex B, trusted nodes): a key for an SAE
//!   pair whose nodes are `h` hops apart is one-time-padded across each hop, so
//!   a request of `n` bits consumes `n` bits from the pool of every link on its
//!   route (direct neighbours: `h = 1`).
//! - **Routing** (link-state, deterministic). Each demand has a *primary* route:
//!   fewest hops, ties broken by the larger bottleneck model rate, then by node
//!   name order (the one search of `qkdnet_kms::routing`, which the relay
//!   uses too, so the planner predicts the routes the network takes). A request tries the primary route, then the demand's
//!   cached detour; if neither has `n` bits on every hop, the planner computes
//!   a new detour from the current pool levels: fewest hops over links holding
//!   at least `n` bits, ties broken by the larger bottleneck pool (widest
//!   shortest path). No such path: the request is blocked, and the blocked
//!   bits are charged to the links of the primary route that were short. Until
//!   some link on the cut around the reachable part of the network could have
//!   filled, further requests of that demand are blocked without searching
//!   again (exact: consumption only lowers pools).
//!
//! # Demand file
//!
//! ```toml
//! [[demand]]
//! from = "sae-beijing-bank"   # SAE IDs of the topology, on different nodes
//! to = "sae-shanghai-bank"
//! rate_bps = 256.0            # key bits per second the pair wants (> 0)
//! # start_s = 0.0             # active from (default 0)
//! # end_s = 86400.0           # active until (default: the end of the run)
//! # interval_s = 10.0         # seconds between requests (default: the run's)
//! ```
//!
//! Without a demand file ([`default_demands`]) every pair of SAEs attached to
//! different nodes asks for the same rate (256 bit/s in `qkdnet plan`) for the
//! whole run: the all-to-all traffic matrix usual in network dimensioning.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use qkdnet_kms::routing::Router;

use crate::NetError;
use crate::topology::{ValidLink, ValidTopology};

/// When a link makes key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeySource {
    /// A fibre link: key at a steady rate.
    Continuous {
        /// Secret key, bits per second.
        bps: f64,
    },
    /// A satellite link: key only during passes, delivered at each pass end.
    Passes {
        /// Seconds from one pass start to the next.
        period_s: f64,
        /// Start of the first pass.
        offset_s: f64,
        /// Length of a pass.
        duration_s: f64,
        /// Secret key bits of one pass.
        key_bits_per_pass: f64,
    },
}

impl KeySource {
    /// Long-run average key rate, bits per second.
    pub fn mean_bps(&self) -> f64 {
        match *self {
            KeySource::Continuous { bps } => bps,
            KeySource::Passes {
                period_s,
                key_bits_per_pass,
                ..
            } => key_bits_per_pass / period_s,
        }
    }

    fn check(&self, link: &str) -> Result<(), NetError> {
        let bad = |m: String| Err(NetError::Config(format!("link '{link}': {m}")));
        match *self {
            KeySource::Continuous { bps } if !(bps.is_finite() && bps >= 0.0) => {
                bad(format!("key rate must be a finite number >= 0, got {bps}"))
            }
            KeySource::Passes {
                period_s,
                offset_s,
                duration_s,
                key_bits_per_pass,
            } => {
                if !(period_s.is_finite() && period_s > 0.0) {
                    bad(format!("pass period must be > 0 s, got {period_s}"))
                } else if !(offset_s.is_finite() && offset_s >= 0.0) {
                    bad(format!("pass offset must be >= 0 s, got {offset_s}"))
                } else if !(duration_s.is_finite() && (0.0..=period_s).contains(&duration_s)) {
                    bad(format!(
                        "pass duration must be from 0 to the period ({period_s} s), got {duration_s}"
                    ))
                } else if !(key_bits_per_pass.is_finite() && key_bits_per_pass >= 0.0) {
                    bad(format!(
                        "key per pass must be a finite number >= 0, got {key_bits_per_pass}"
                    ))
                } else {
                    Ok(())
                }
            }
            KeySource::Continuous { .. } => Ok(()),
        }
    }
}

/// How a validated link makes key: continuously at the model rate for
/// fibre, at pass ends for a satellite link.
pub fn link_source(l: &ValidLink) -> KeySource {
    match &l.pass {
        Some(p) => KeySource::Passes {
            period_s: p.period_s,
            offset_s: p.offset_s,
            duration_s: p.duration_s,
            key_bits_per_pass: p.key_bits_per_pass,
        },
        None => KeySource::Continuous {
            bps: l.model_key_bps,
        },
    }
}

/// One link as the planner sees it.
#[derive(Debug, Clone)]
pub struct PlanLink {
    /// Link ID.
    pub id: String,
    /// Index of one end in [`PlanNetwork::nodes`].
    pub a: usize,
    /// Index of the other end.
    pub b: usize,
    /// How it makes key.
    pub source: KeySource,
    /// Fibre length, km (none for a satellite link), for the report.
    pub distance_km: Option<f64>,
    /// Device preset as written, for the report.
    pub preset: String,
}

/// The network as the planner sees it: nodes, where SAEs attach, links.
#[derive(Debug, Clone)]
pub struct PlanNetwork {
    /// Network name.
    pub name: String,
    /// Node IDs.
    pub nodes: Vec<String>,
    /// SAE ID → index in `nodes`.
    pub saes: BTreeMap<String, usize>,
    /// Links.
    pub links: Vec<PlanLink>,
}

impl PlanNetwork {
    /// The planner's view of a validated topology.
    pub fn from_topology(t: &ValidTopology) -> PlanNetwork {
        let index: BTreeMap<&str, usize> = t
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        // Invariant (ValidTopology): every SAE's node and every link end is in `nodes`.
        let at = |n: &str| *index.get(n).expect("validated topology: known node");
        PlanNetwork {
            name: t.meta.name.clone(),
            nodes: t.nodes.iter().map(|n| n.as_str().to_owned()).collect(),
            saes: t
                .saes
                .iter()
                .map(|(s, n)| (s.as_str().to_owned(), at(n.as_str())))
                .collect(),
            links: t
                .links
                .iter()
                .map(|l| PlanLink {
                    id: l.id.clone(),
                    a: at(l.a.as_str()),
                    b: at(l.b.as_str()),
                    source: link_source(l),
                    distance_km: l.pass.is_none().then_some(l.distance_km),
                    preset: l.preset.clone(),
                })
                .collect(),
        }
    }
}

/// A `[[demand]]` of a demand file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DemandSpec {
    /// SAE asking for keys.
    pub from: String,
    /// SAE it shares them with.
    pub to: String,
    /// Key bits per second wanted.
    pub rate_bps: f64,
    /// Active from, seconds (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_s: Option<f64>,
    /// Active until, seconds (default: end of the run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_s: Option<f64>,
    /// Seconds between requests (default: [`PlanOptions::request_interval_s`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_s: Option<f64>,
}

/// A demand file: `[[demand]]` entries.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DemandFile {
    /// The demands, in file order.
    #[serde(rename = "demand", default)]
    pub demands: Vec<DemandSpec>,
}

impl DemandFile {
    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<DemandFile, NetError> {
        toml::from_str(text).map_err(|e| NetError::Config(format!("demand file: {e}")))
    }

    /// Reads and parses a file.
    pub fn from_file(path: &Path) -> Result<DemandFile, NetError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NetError::Config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| NetError::Config(format!("{}: {e}", path.display())))
    }
}

/// The default demand: every pair of SAEs on different nodes at `rate_bps`,
/// for the whole run, in SAE-ID order.
pub fn default_demands(net: &PlanNetwork, rate_bps: f64) -> Vec<DemandSpec> {
    let saes: Vec<(&String, &usize)> = net.saes.iter().collect();
    let mut out = Vec::new();
    for (i, (s1, n1)) in saes.iter().enumerate() {
        for (s2, n2) in &saes[i + 1..] {
            if n1 != n2 {
                out.push(DemandSpec {
                    from: (*s1).clone(),
                    to: (*s2).clone(),
                    rate_bps,
                    start_s: None,
                    end_s: None,
                    interval_s: None,
                });
            }
        }
    }
    out
}

/// Knobs of a planning run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PlanOptions {
    /// Simulated time, seconds.
    pub duration_s: f64,
    /// Default seconds between a demand's requests.
    pub request_interval_s: f64,
    /// Largest pool of a link, bits.
    pub pool_capacity_bits: f64,
    /// Pool level of every link at time 0, bits.
    pub initial_pool_bits: f64,
    /// Seconds between samples of the pool levels.
    pub sample_interval_s: f64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            duration_s: 86_400.0,
            request_interval_s: 10.0,
            pool_capacity_bits: 1e9,
            initial_pool_bits: 0.0,
            sample_interval_s: 300.0,
        }
    }
}

/// At most this many requests in one run (demands × duration / interval).
pub const MAX_REQUESTS: f64 = 5e8;
/// At most this many pool-level samples per link.
pub const MAX_SAMPLES: f64 = 1e5;

impl PlanOptions {
    fn check(&self) -> Result<(), NetError> {
        let bad = |m: String| Err(NetError::Config(m));
        let o = self;
        if !(o.duration_s.is_finite() && o.duration_s > 0.0 && o.duration_s <= 1e9) {
            return bad(format!(
                "duration must be from 0 to 1e9 s, got {}",
                o.duration_s
            ));
        }
        if !(o.request_interval_s.is_finite() && o.request_interval_s > 0.0) {
            return bad(format!(
                "request interval must be > 0 s, got {}",
                o.request_interval_s
            ));
        }
        if !(o.pool_capacity_bits.is_finite() && o.pool_capacity_bits > 0.0) {
            return bad(format!(
                "pool capacity must be > 0 bits, got {}",
                o.pool_capacity_bits
            ));
        }
        if !(o.initial_pool_bits.is_finite()
            && (0.0..=o.pool_capacity_bits).contains(&o.initial_pool_bits))
        {
            return bad(format!(
                "initial pool level must be from 0 to the capacity ({} bits), got {}",
                o.pool_capacity_bits, o.initial_pool_bits
            ));
        }
        if !(o.sample_interval_s.is_finite()
            && o.sample_interval_s > 0.0
            && o.duration_s / o.sample_interval_s <= MAX_SAMPLES)
        {
            return bad(format!(
                "sample interval must be > 0 s and give at most {MAX_SAMPLES:.0} samples, got {} s over {} s",
                o.sample_interval_s, o.duration_s
            ));
        }
        Ok(())
    }
}

/// Totals over all demands.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// Requests issued.
    pub requests: u64,
    /// Requests blocked.
    pub blocked_requests: u64,
    /// Requests served on a detour (not the primary route).
    pub rerouted_requests: u64,
    /// Key bits asked for.
    pub requested_bits: f64,
    /// Key bits delivered.
    pub served_bits: f64,
    /// Key bits refused.
    pub blocked_bits: f64,
    /// `blocked_bits / requested_bits` (0 when nothing was asked).
    pub blocked_fraction: f64,
}

/// One demand's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct DemandReport {
    /// SAE asking.
    pub from: String,
    /// SAE served with it.
    pub to: String,
    /// Node of `from`.
    pub from_node: String,
    /// Node of `to`.
    pub to_node: String,
    /// Rate asked for, bit/s.
    pub rate_bps: f64,
    /// Hops of the primary route.
    pub primary_hops: usize,
    /// Link IDs of the primary route, `from` to `to`.
    pub primary_route: Vec<String>,
    /// Requests, blocked requests, requests on a detour, bits.
    #[serde(flatten)]
    pub totals: Totals,
    /// Mean hops of the served requests (0 when none).
    pub mean_served_hops: f64,
}

/// One link's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct LinkReport {
    /// Link ID.
    pub id: String,
    /// One end.
    pub a: String,
    /// Other end.
    pub b: String,
    /// `fibre` (continuous key) or `satellite` (key at pass ends).
    pub kind: &'static str,
    /// Device preset as written.
    pub preset: String,
    /// Length as written, km.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distance_km: Option<f64>,
    /// Long-run model key rate, bit/s.
    pub mean_key_bps: f64,
    /// Key generated over the run (including what a full pool wasted), bits.
    pub generated_bits: f64,
    /// Key consumed by relaying, bits.
    pub consumed_bits: f64,
    /// Key generated into a full pool, bits.
    pub wasted_bits: f64,
    /// `consumed / generated` (0 when nothing was generated).
    pub utilisation: f64,
    /// Pool level at the end, bits.
    pub final_pool_bits: f64,
    /// Lowest pool level sampled after time 0, bits (the run's final level
    /// when no sample fell after 0).
    pub min_sampled_pool_bits: f64,
    /// Requests whose primary route this link was too short for, then served on a detour.
    pub detoured_requests: u64,
    /// Requests blocked while this link was short on their primary route.
    pub blocked_requests: u64,
    /// Key bits of those blocked requests.
    pub blocked_bits: f64,
    /// Pool level at each of [`PlanReport::samples_s`], bits.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pool_bits: Vec<f64>,
}

/// The outcome of a planning run.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    /// Network name.
    pub network: String,
    /// Node count.
    pub nodes: usize,
    /// The options of the run.
    pub options: PlanOptions,
    /// All demands together.
    pub totals: Totals,
    /// Per demand, in input order.
    pub demands: Vec<DemandReport>,
    /// Per link, in topology order.
    pub links: Vec<LinkReport>,
    /// Link indices, worst first: most blocked bits charged, then most
    /// detoured requests, then highest utilisation. Only links that blocked,
    /// detoured or carried key.
    pub bottlenecks: Vec<usize>,
    /// Times of the pool-level samples, seconds.
    pub samples_s: Vec<f64>,
    /// What was simulated.
    pub simulated: &'static str,
}

/// A demand after checking, with its routes.
struct Demand {
    from_node: usize,
    to_node: usize,
    rate: f64,
    start: f64,
    end: f64,
    interval: f64,
    /// Time of the previous request (the next one asks for the key since then).
    last: f64,
    primary: Vec<u32>,
    detour: Vec<u32>,
    /// After a failed search for `blocked_need` bits: the links that cut
    /// the part of the network reachable from `from_node` off from the rest.
    /// While all of them stay short of a request of at least that size, no
    /// route can exist, whatever the other pools hold.
    cut: Vec<u32>,
    /// Requests of at least `blocked_need` bits before this time cannot be
    /// served: no link of `cut` can have filled by then.
    blocked_until: f64,
    blocked_need: f64,
    totals: Totals,
    served_hops: f64,
}

struct Pool {
    source: KeySource,
    level: f64,
    t: f64,
    generated: f64,
    consumed: f64,
    wasted: f64,
    min_sampled: f64,
    detoured: u64,
    blocked_requests: u64,
    blocked_bits: f64,
    series: Vec<f64>,
}

impl Pool {
    /// Brings the level up to time `t` (fibre: closed form; satellite: pass
    /// ends are events, nothing to do here). Returns the level.
    #[inline]
    fn advance(&mut self, t: f64, cap: f64) -> f64 {
        if let KeySource::Continuous { bps } = self.source {
            let dt = t - self.t;
            if dt > 0.0 {
                self.add(bps * dt, cap);
            }
        }
        self.t = self.t.max(t);
        self.level
    }

    #[inline]
    fn add(&mut self, bits: f64, cap: f64) {
        self.generated += bits;
        self.level += bits;
        if self.level > cap {
            self.wasted += self.level - cap;
            self.level = cap;
        }
    }

    /// The earliest time ≥ `t` at which the level could reach `need`.
    fn fill_time(&self, t: f64, need: f64, cap: f64) -> f64 {
        if need > cap {
            return f64::INFINITY;
        }
        match self.source {
            KeySource::Continuous { bps } if bps > 0.0 => t + (need - self.level).max(0.0) / bps,
            KeySource::Continuous { .. } => f64::INFINITY,
            KeySource::Passes {
                period_s,
                offset_s,
                duration_s,
                key_bits_per_pass,
            } => {
                if key_bits_per_pass <= 0.0 {
                    return f64::INFINITY;
                }
                let first = offset_s + duration_s;
                if t < first {
                    first
                } else {
                    first + ((t - first) / period_s).floor() * period_s + period_s
                }
            }
        }
    }
}

/// An event; ordered by time, then class (key arrivals before requests
/// before samples), then index, so runs are deterministic.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Event {
    t: f64,
    class: u8,
    index: u32,
}

const PASS_END: u8 = 0;
const REQUEST: u8 = 1;
const SAMPLE: u8 = 2;

impl Eq for Event {}

impl Ord for Event {
    fn cmp(&self, o: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap and we want the earliest first.
        o.t.total_cmp(&self.t)
            .then(o.class.cmp(&self.class))
            .then(o.index.cmp(&self.index))
    }
}

impl PartialOrd for Event {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// Runs the planner over `net` with `demands` (checked here; errors name the
/// demand at fault by its position in the list and its SAEs).
pub fn plan(
    net: &PlanNetwork,
    demands: &[DemandSpec],
    opts: &PlanOptions,
) -> Result<PlanReport, NetError> {
    opts.check()?;
    for l in &net.links {
        l.source.check(&l.id)?;
        if l.a >= net.nodes.len() || l.b >= net.nodes.len() || l.a == l.b {
            return Err(NetError::Config(format!(
                "link '{}': ends must be two different known nodes",
                l.id
            )));
        }
    }
    if demands.is_empty() {
        return Err(NetError::Config("no demand to plan for".into()));
    }
    let cap = opts.pool_capacity_bits;
    let ends: Vec<(usize, usize)> = net.links.iter().map(|l| (l.a, l.b)).collect();
    let mut search = Search {
        router: Router::new(&net.nodes, &ends).map_err(|e| NetError::Config(e.to_string()))?,
        short: Vec::new(),
    };
    let mut pools: Vec<Pool> = net
        .links
        .iter()
        .map(|l| Pool {
            source: l.source,
            level: opts.initial_pool_bits,
            t: 0.0,
            generated: 0.0,
            consumed: 0.0,
            wasted: 0.0,
            min_sampled: f64::INFINITY,
            detoured: 0,
            blocked_requests: 0,
            blocked_bits: 0.0,
            series: Vec::new(),
        })
        .collect();

    // Check the demands and give each its primary route.
    let mut ds = Vec::with_capacity(demands.len());
    let mut request_count = 0.0;
    for (i, d) in demands.iter().enumerate() {
        let what = format!("demand {} ('{}' to '{}')", i + 1, d.from, d.to);
        let bad = |m: String| Err(NetError::Config(format!("{what}: {m}")));
        let node = |s: &str| {
            net.saes
                .get(s)
                .copied()
                .ok_or_else(|| NetError::Config(format!("{what}: unknown SAE '{s}'")))
        };
        let (from_node, to_node) = (node(&d.from)?, node(&d.to)?);
        if d.from == d.to {
            return bad("an SAE cannot share keys with itself".into());
        }
        if from_node == to_node {
            return bad(format!(
                "both SAEs are on node '{}': their keys cross no QKD link",
                net.nodes[from_node]
            ));
        }
        if !(d.rate_bps.is_finite() && d.rate_bps > 0.0) {
            return bad(format!("rate_bps must be a number > 0, got {}", d.rate_bps));
        }
        let start = d.start_s.unwrap_or(0.0);
        let end = d.end_s.unwrap_or(opts.duration_s).min(opts.duration_s);
        if !(start.is_finite() && start >= 0.0) {
            return bad(format!("start_s must be >= 0, got {start}"));
        }
        if let Some(e) = d.end_s
            && !(e.is_finite() && e > start)
        {
            return bad(format!("end_s must be after start_s ({start} s), got {e}"));
        }
        let interval = d.interval_s.unwrap_or(opts.request_interval_s);
        if !(interval.is_finite() && interval > 0.0) {
            return bad(format!("interval_s must be > 0, got {interval}"));
        }
        // Primary route: fewest hops, then the largest bottleneck model rate.
        let primary = match search.router.route(from_node, to_node, 0.0, |l, _, _| {
            net.links[l].source.mean_bps()
        }) {
            Ok(r) => r,
            Err(_) => {
                return bad(format!(
                    "no chain of QKD links joins node '{}' to node '{}'",
                    net.nodes[from_node], net.nodes[to_node]
                ));
            }
        };
        if end > start {
            request_count += ((end - start) / interval).ceil();
        }
        if request_count > MAX_REQUESTS {
            return Err(NetError::Config(format!(
                "the demands make more than {MAX_REQUESTS:.0e} requests over {} s: use a longer request interval",
                opts.duration_s
            )));
        }
        ds.push(Demand {
            from_node,
            to_node,
            rate: d.rate_bps,
            start,
            end,
            interval,
            last: start,
            primary,
            detour: Vec::new(),
            cut: Vec::new(),
            blocked_until: f64::NEG_INFINITY,
            blocked_need: f64::INFINITY,
            totals: Totals::default(),
            served_hops: 0.0,
        });
    }

    // The event queue: first requests (staggered by the golden ratio within
    // the first interval, so demands do not ask in lockstep), pass ends, samples.
    let mut queue = BinaryHeap::with_capacity(ds.len() + pools.len() + 1);
    const PHI: f64 = 0.618_033_988_749_894_9;
    for (i, d) in ds.iter().enumerate() {
        if d.end > d.start {
            let phase = ((i as f64 + 1.0) * PHI).fract().max(1e-6);
            queue.push(Event {
                t: (d.start + phase * d.interval).min(d.end),
                class: REQUEST,
                index: i as u32,
            });
        }
    }
    for (i, p) in pools.iter().enumerate() {
        if let KeySource::Passes {
            offset_s,
            duration_s,
            ..
        } = p.source
        {
            queue.push(Event {
                t: offset_s + duration_s,
                class: PASS_END,
                index: i as u32,
            });
        }
    }
    queue.push(Event {
        t: 0.0,
        class: SAMPLE,
        index: 0,
    });
    let mut samples = Vec::new();

    while let Some(ev) = queue.pop() {
        let t = ev.t;
        if t > opts.duration_s {
            break;
        }
        match ev.class {
            PASS_END => {
                let p = &mut pools[ev.index as usize];
                if let KeySource::Passes {
                    period_s,
                    key_bits_per_pass,
                    ..
                } = p.source
                {
                    p.add(key_bits_per_pass, cap);
                    p.t = t;
                    queue.push(Event {
                        t: t + period_s,
                        ..ev
                    });
                }
            }
            SAMPLE => {
                samples.push(t);
                for p in &mut pools {
                    let level = p.advance(t, cap);
                    p.series.push(level);
                    if t > 0.0 {
                        p.min_sampled = p.min_sampled.min(level);
                    }
                }
                let k = samples.len() as f64;
                let next = (k * opts.sample_interval_s).min(opts.duration_s);
                if next > t {
                    queue.push(Event { t: next, ..ev });
                }
            }
            _ => {
                let d = &mut ds[ev.index as usize];
                let need = d.rate * (t - d.last);
                d.last = t;
                serve(d, need, t, cap, &mut pools, &mut search);
                if t < d.end {
                    queue.push(Event {
                        t: (t + d.interval).min(d.end),
                        ..ev
                    });
                }
            }
        }
    }
    for p in &mut pools {
        p.advance(opts.duration_s, cap);
    }

    let mut totals = Totals::default();
    let demands_out: Vec<DemandReport> = ds
        .iter()
        .zip(demands)
        .map(|(d, spec)| {
            let mut t = d.totals.clone();
            t.blocked_fraction = fraction(t.blocked_bits, t.requested_bits);
            totals.requests += t.requests;
            totals.blocked_requests += t.blocked_requests;
            totals.rerouted_requests += t.rerouted_requests;
            totals.requested_bits += t.requested_bits;
            totals.served_bits += t.served_bits;
            totals.blocked_bits += t.blocked_bits;
            let served = t.requests - t.blocked_requests;
            DemandReport {
                from: spec.from.clone(),
                to: spec.to.clone(),
                from_node: net.nodes[d.from_node].clone(),
                to_node: net.nodes[d.to_node].clone(),
                rate_bps: d.rate,
                primary_hops: d.primary.len(),
                primary_route: d
                    .primary
                    .iter()
                    .map(|&l| net.links[l as usize].id.clone())
                    .collect(),
                totals: t,
                mean_served_hops: if served > 0 {
                    d.served_hops / served as f64
                } else {
                    0.0
                },
            }
        })
        .collect();
    totals.blocked_fraction = fraction(totals.blocked_bits, totals.requested_bits);
    let links: Vec<LinkReport> = net
        .links
        .iter()
        .zip(pools)
        .map(|(l, p)| LinkReport {
            id: l.id.clone(),
            a: net.nodes[l.a].clone(),
            b: net.nodes[l.b].clone(),
            kind: match l.source {
                KeySource::Continuous { .. } => "fibre",
                KeySource::Passes { .. } => "satellite",
            },
            preset: l.preset.clone(),
            distance_km: l.distance_km,
            mean_key_bps: l.source.mean_bps(),
            generated_bits: p.generated,
            consumed_bits: p.consumed,
            wasted_bits: p.wasted,
            utilisation: fraction(p.consumed, p.generated),
            final_pool_bits: p.level,
            min_sampled_pool_bits: p.min_sampled.min(p.level),
            detoured_requests: p.detoured,
            blocked_requests: p.blocked_requests,
            blocked_bits: p.blocked_bits,
            pool_bits: p.series,
        })
        .collect();
    let mut bottlenecks: Vec<usize> = (0..links.len())
        .filter(|&i| {
            let l = &links[i];
            l.blocked_requests > 0 || l.detoured_requests > 0 || l.consumed_bits > 0.0
        })
        .collect();
    bottlenecks.sort_by(|&i, &j| {
        let (x, y) = (&links[i], &links[j]);
        y.blocked_bits
            .total_cmp(&x.blocked_bits)
            .then(y.detoured_requests.cmp(&x.detoured_requests))
            .then(y.utilisation.total_cmp(&x.utilisation))
            .then(i.cmp(&j))
    });
    Ok(PlanReport {
        network: net.name.clone(),
        nodes: net.nodes.len(),
        options: *opts,
        totals,
        demands: demands_out,
        links,
        bottlenecks,
        samples_s: samples,
        simulated: "planning model: links at their finite-key model rates (simulated optics), pools as numbers; no key was made",
    })
}

fn fraction(x: f64, of: f64) -> f64 {
    if of > 0.0 { x / of } else { 0.0 }
}

/// A route can serve `need` bits when every hop holds them (a relative slack
/// of 1e-12 absorbs rounding of the fluid levels).
#[inline]
fn can_serve(route: &[u32], need: f64, t: f64, cap: f64, pools: &mut [Pool]) -> bool {
    let need = need * (1.0 - 1e-12);
    route
        .iter()
        .all(|&l| pools[l as usize].advance(t, cap) >= need)
}

fn consume(route: &[u32], need: f64, pools: &mut [Pool]) {
    for &l in route {
        let p = &mut pools[l as usize];
        p.level = (p.level - need).max(0.0);
        p.consumed += need;
    }
}

/// The route search and the scratch of [`serve`].
struct Search {
    router: Router,
    /// Links of a primary route found short.
    short: Vec<u32>,
}

/// One request of `need` bits at time `t`.
fn serve(d: &mut Demand, need: f64, t: f64, cap: f64, pools: &mut [Pool], search: &mut Search) {
    if need <= 0.0 {
        return;
    }
    d.totals.requests += 1;
    d.totals.requested_bits += need;
    if can_serve(&d.primary, need, t, cap, pools) {
        consume(&d.primary, need, pools);
        d.totals.served_bits += need;
        d.served_hops += d.primary.len() as f64;
        return;
    }
    let slack = need * (1.0 - 1e-12);
    // The primary route's short links, before a detour consumes anything.
    search.short.clear();
    for &l in &d.primary {
        if pools[l as usize].advance(t, cap) < slack {
            search.short.push(l);
        }
    }
    let mut served = false;
    let still_cut = need >= d.blocked_need
        && (t < d.blocked_until
            || d.cut
                .iter()
                .all(|&l| pools[l as usize].advance(t, cap) < slack));
    if !still_cut {
        if d.detour.is_empty() || !can_serve(&d.detour, need, t, cap, pools) {
            d.detour.clear();
            match search
                .router
                .route(d.from_node, d.to_node, slack, |l, _, _| {
                    pools[l].advance(t, cap)
                }) {
                Ok(r) => {
                    d.detour = r;
                    d.blocked_need = f64::INFINITY;
                }
                Err(cut) => {
                    d.blocked_until = cut
                        .iter()
                        .map(|&l| pools[l as usize].fill_time(t, slack, cap))
                        .fold(f64::INFINITY, f64::min);
                    d.blocked_need = need;
                    d.cut = cut;
                }
            }
        }
        if !d.detour.is_empty() {
            consume(&d.detour, need, pools);
            d.totals.served_bits += need;
            d.totals.rerouted_requests += 1;
            d.served_hops += d.detour.len() as f64;
            served = true;
        }
    }
    if !served {
        d.totals.blocked_requests += 1;
        d.totals.blocked_bits += need;
    }
    for &l in &search.short {
        let p = &mut pools[l as usize];
        if served {
            p.detoured += 1;
        } else {
            p.blocked_requests += 1;
            p.blocked_bits += need;
        }
    }
}
