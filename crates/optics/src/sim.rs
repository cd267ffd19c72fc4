//! The decoy-state BB84 event simulator: Alice's transmitter, the channel (and
//! Eve), Bob's receiver, gate by gate, without visiting every gate.
//!
//! At 1 GHz and 50 km about one gate in two hundred produces a click, so the
//! simulator jumps from click to click. Gates are thinned: candidates are drawn
//! by geometric skipping with the largest per-gate click probability p_max of
//! the current detector state, and a candidate becomes a click with probability
//! p(gate)/p_max, where p(gate) is the exact click probability given what Alice
//! sent there, Bob's basis and Eve's action. That is exact (a thinned Bernoulli
//! process), and each accepted gate costs a few dozen nanoseconds. Dead time
//! and afterpulses change the detector state; the skipping stops at every such
//! change, so they are exact too.
//!
//! Alice's choices come from her seeded log ([`crate::record::AliceLog::Seeded`]),
//! evaluated only where a candidate falls; Bob's basis and Eve's actions come
//! from their own generators; the channel and detectors from a fourth. All four
//! derive from one seed, so the same seed gives the same records.

use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::{Rng, SeedableRng};

use crate::OpticsError;
use crate::detection::{ClickProbs, LinkPhysics, click_probs};
use crate::device::{Eve, LinkConfig};
use crate::photon::PhotonDist;
use crate::record::{AliceLog, AliceRecord, Basis, Clicks, Detection, Span, splitmix64};

/// Per-class tallies of a simulation, joined with Alice's choices (a
/// simulator-only "god view" for reports and tests; the protocol never sees it).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClassTally {
    /// Gates with at least one click.
    pub detections: u64,
    /// Detections where both used Z.
    pub sifted_z: u64,
    /// Detections where both used X.
    pub sifted_x: u64,
    /// Bit errors among `sifted_z` (double clicks resolved at random).
    pub errors_z: u64,
    /// Bit errors among `sifted_x`.
    pub errors_x: u64,
    /// Double clicks.
    pub double_clicks: u64,
}

/// The event simulator of one link.
pub struct Simulator {
    phys: LinkPhysics,
    eve: Eve,
    alice: AliceRecord,
    bob_rng: Xoshiro256PlusPlus,
    eve_rng: Xoshiro256PlusPlus,
    rng: Xoshiro256PlusPlus,
    n_classes: usize,
    /// [alive state][class][mode: honest/pns][routing] → no-click probabilities.
    table: Vec<ClickProbs>,
    p_max: [f64; 3],
    ln_1m_pmax: [f64; 3],
    bob_z_threshold: u64,
    dead_until: [u64; 2],
    afterpulse_at: [Option<u64>; 2],
    next_gate: u64,
    /// A candidate gate drawn beyond the end of the previous `run`, kept so
    /// that running in pieces gives the same stream as one long run.
    pending: Option<u64>,
    tallies: Vec<ClassTally>,
}

const ROUTES: usize = 3;
const MODES: usize = 2;

impl Simulator {
    /// A simulator for `link` starting at gate 0, with `eve`, from `seed`.
    pub fn new(link: &LinkConfig, eve: Eve, seed: u64) -> Result<Simulator, OpticsError> {
        link.validate()?;
        let phys = LinkPhysics::from_config(link);
        let classes = link.source.classes();
        let span = Span {
            first_gate: 0,
            gates: u64::MAX,
            rep_rate_hz: phys.rep_rate_hz,
        };
        let alice = AliceRecord::new(
            span,
            classes.clone(),
            phys.qz.0,
            AliceLog::Seeded(splitmix64(seed ^ 0xA11C_E000)),
        )?;
        let mut sim = Simulator {
            eve,
            alice,
            bob_rng: Xoshiro256PlusPlus::seed_from_u64(splitmix64(seed ^ 0xB0B0_0000)),
            eve_rng: Xoshiro256PlusPlus::seed_from_u64(splitmix64(seed ^ 0xE7E0_0000)),
            rng: Xoshiro256PlusPlus::seed_from_u64(splitmix64(seed ^ 0xC4A7_0000)),
            n_classes: classes.len(),
            table: Vec::new(),
            p_max: [0.0; 3],
            ln_1m_pmax: [0.0; 3],
            bob_z_threshold: (phys.qz.1 * 2f64.powi(64)).min(u64::MAX as f64) as u64,
            dead_until: [0; 2],
            afterpulse_at: [None; 2],
            next_gate: 0,
            pending: None,
            tallies: vec![ClassTally::default(); classes.len()],
            phys,
        };
        if sim.phys.qz.1 >= 1.0 {
            sim.bob_z_threshold = u64::MAX;
        }
        sim.rebuild_tables();
        Ok(sim)
    }

    /// Alice's record of everything she sends (seeded form).
    pub fn alice_record(&self, gates: u64) -> Result<AliceRecord, OpticsError> {
        AliceRecord::new(
            Span {
                first_gate: 0,
                gates,
                rep_rate_hz: self.phys.rep_rate_hz,
            },
            self.alice.classes.clone(),
            self.alice.basis_prob_z,
            self.alice.log.clone(),
        )
    }

    /// Per-class tallies so far.
    pub fn tallies(&self) -> &[ClassTally] {
        &self.tallies
    }

    /// The next gate to be simulated.
    pub fn next_gate(&self) -> u64 {
        self.next_gate
    }

    /// Changes the channel transmittance (a satellite pass moving on).
    pub fn set_channel_transmittance(&mut self, eta_ch: f64) {
        self.phys.eta_ch = eta_ch.clamp(0.0, 1.0);
        self.pending = None;
        self.rebuild_tables();
    }

    fn rebuild_tables(&mut self) {
        let ph = &self.phys;
        let ed = ph.misalignment;
        let routes = [1.0 - ed, ed, 0.5];
        let alive_sets = [[true, true], [true, false], [false, true]];
        let mut table = Vec::with_capacity(3 * self.n_classes * MODES * ROUTES);
        let mut p_max = [0.0f64; 3];
        for (s, alive) in alive_sets.iter().enumerate() {
            for (_, mu, _) in &self.alice.classes {
                let emitted = ph.emitted(*mu);
                let honest = emitted.thin(ph.eta_ch);
                let pns = if self.eve == Eve::Pns {
                    // Eve tunes her forwarding on the signal class (class 0).
                    let signal = ph.emitted(self.alice.classes[0].1);
                    let (fs, ft) = PhotonDist::pns_forwarding(&signal, ph.eta_ch, ph.eta_det);
                    emitted.after_pns(fs, ft)
                } else {
                    honest.clone()
                };
                for arriving in [&honest, &pns] {
                    for &r0 in &routes {
                        let c = click_probs(arriving, ph.eta_det, ph.pdc, r0, *alive);
                        p_max[s] = p_max[s].max(c.any());
                        table.push(c);
                    }
                }
            }
        }
        self.table = table;
        self.p_max = p_max;
        self.ln_1m_pmax = p_max.map(|p| (-p).ln_1p());
    }

    #[inline]
    fn probs(&self, alive: usize, class: usize, mode: usize, route: usize) -> &ClickProbs {
        &self.table[((alive * self.n_classes + class) * MODES + mode) * ROUTES + route]
    }

    #[inline]
    fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn alive_state(&self, gate: u64) -> Option<usize> {
        match (self.dead_until[0] <= gate, self.dead_until[1] <= gate) {
            (true, true) => Some(0),
            (true, false) => Some(1),
            (false, true) => Some(2),
            (false, false) => None,
        }
    }

    /// What happens in `gate` apart from forced afterpulses: (class, Alice
    /// basis, Alice bit, Bob basis, probabilities of the gate).
    #[inline]
    fn gate_setup(&mut self, gate: u64, alive: usize) -> (usize, Basis, u8, Basis, ClickProbs) {
        let c = self
            .alice
            .choice(gate)
            .unwrap_or(crate::record::PulseChoice {
                class: 0,
                basis: Basis::Z,
                bit: 0,
            });
        let bob = if self.bob_rng.next_u64() < self.bob_z_threshold {
            Basis::Z
        } else {
            Basis::X
        };
        let (mode, state_basis, state_bit) = match self.eve {
            Eve::None => (0, c.basis, c.bit),
            Eve::Pns => (1, c.basis, c.bit),
            Eve::InterceptResend { fraction } => {
                let u = (self.eve_rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                if u < fraction.get() {
                    let r = self.eve_rng.next_u64();
                    let e = if r & 1 == 0 { Basis::Z } else { Basis::X };
                    let y = if e == c.basis {
                        c.bit
                    } else {
                        ((r >> 1) & 1) as u8
                    };
                    (0, e, y)
                } else {
                    (0, c.basis, c.bit)
                }
            }
        };
        let route = if state_basis == bob {
            usize::from(state_bit)
        } else {
            2
        };
        let p = *self.probs(alive, c.class as usize, mode, route);
        (c.class as usize, c.basis, c.bit, bob, p)
    }

    /// Simulates `gates` more gates, handing each detection to `sink` in gate order.
    pub fn run<E>(
        &mut self,
        gates: u64,
        sink: &mut impl FnMut(Detection) -> Result<(), E>,
    ) -> Result<(), E> {
        let end = self.next_gate.saturating_add(gates);
        let mut g = self.next_gate;
        while g < end {
            // The detector state is constant until the next revival or afterpulse.
            let mut state_limit = u64::MAX;
            for d in 0..2 {
                if self.dead_until[d] > g {
                    state_limit = state_limit.min(self.dead_until[d]);
                }
                if let Some(a) = self.afterpulse_at[d] {
                    state_limit = state_limit.min(a.max(g));
                }
            }
            let Some(alive) = self.alive_state(g) else {
                self.pending = None;
                g = state_limit.min(end);
                continue;
            };
            if self.afterpulse_at.contains(&Some(g)) {
                self.pending = None;
                self.single_gate(g, alive, sink)?;
                g += 1;
                continue;
            }
            let p = self.p_max[alive];
            if p <= 0.0 {
                g = state_limit.min(end);
                continue;
            }
            let cand = match self.pending.take() {
                Some(c) if c >= g => c,
                _ if p >= 1.0 => g,
                _ => {
                    let u = 1.0 - self.uniform(); // (0, 1]
                    let x = u.ln() / self.ln_1m_pmax[alive];
                    if x >= (u64::MAX - g) as f64 {
                        u64::MAX
                    } else {
                        g + x as u64
                    }
                }
            };
            if cand >= end && state_limit >= end {
                // keep the draw for the next run; it is checked against the
                // state limit there exactly as it would be here
                self.pending = Some(cand);
                break;
            }
            if cand >= state_limit {
                // the detector state changes first: redraw from there (memoryless)
                g = state_limit;
                continue;
            }
            let (class, a_basis, a_bit, b_basis, probs) = self.gate_setup(cand, alive);
            let pc = probs.any();
            let u = self.uniform() * p;
            if u < pc {
                // u is uniform on [0, pc): reuse it to pick the click pattern
                let clicks = if u < probs.d0_only() {
                    Clicks::D0
                } else if u < probs.d0_only() + probs.d1_only() {
                    Clicks::D1
                } else {
                    Clicks::Both
                };
                self.detected(cand, class, a_basis, a_bit, b_basis, clicks, sink)?;
            }
            g = cand + 1;
        }
        self.next_gate = end;
        Ok(())
    }

    /// One gate sampled on its own (it carries a forced afterpulse).
    fn single_gate<E>(
        &mut self,
        g: u64,
        alive: usize,
        sink: &mut impl FnMut(Detection) -> Result<(), E>,
    ) -> Result<(), E> {
        let (class, a_basis, a_bit, b_basis, probs) = self.gate_setup(g, alive);
        let u = self.uniform();
        let (d0, d1, both) = (probs.d0_only(), probs.d1_only(), probs.both());
        let (mut c0, mut c1) = if u < d0 {
            (true, false)
        } else if u < d0 + d1 {
            (false, true)
        } else if u < d0 + d1 + both {
            (true, true)
        } else {
            (false, false)
        };
        for d in 0..2 {
            if self.afterpulse_at[d] == Some(g) {
                self.afterpulse_at[d] = None;
                if d == 0 {
                    c0 = true;
                } else {
                    c1 = true;
                }
            }
        }
        let clicks = match (c0, c1) {
            (true, false) => Clicks::D0,
            (false, true) => Clicks::D1,
            (true, true) => Clicks::Both,
            (false, false) => return Ok(()),
        };
        self.detected(g, class, a_basis, a_bit, b_basis, clicks, sink)
    }

    #[allow(clippy::too_many_arguments)] // one call site per path; a struct would only rename them
    fn detected<E>(
        &mut self,
        gate: u64,
        class: usize,
        a_basis: Basis,
        a_bit: u8,
        b_basis: Basis,
        clicks: Clicks,
        sink: &mut impl FnMut(Detection) -> Result<(), E>,
    ) -> Result<(), E> {
        let fired = match clicks {
            Clicks::D0 => [true, false],
            Clicks::D1 => [false, true],
            Clicks::Both => [true, true],
        };
        for d in 0..2 {
            if fired[d] {
                self.dead_until[d] = gate + 1 + self.phys.dead_gates;
                if self.phys.afterpulse > 0.0 && self.uniform() < self.phys.afterpulse {
                    self.afterpulse_at[d] = Some(self.dead_until[d]);
                }
            }
        }
        // god-view tallies
        let bob_bit = match clicks {
            Clicks::D0 => 0,
            Clicks::D1 => 1,
            Clicks::Both => (self.rng.next_u64() & 1) as u8,
        };
        let t = &mut self.tallies[class];
        t.detections += 1;
        if clicks == Clicks::Both {
            t.double_clicks += 1;
        }
        if a_basis == b_basis {
            let err = u64::from(bob_bit != a_bit);
            match a_basis {
                Basis::Z => {
                    t.sifted_z += 1;
                    t.errors_z += err;
                }
                Basis::X => {
                    t.sifted_x += 1;
                    t.errors_x += err;
                }
            }
        }
        sink(Detection {
            gate,
            basis: b_basis,
            clicks,
        })
    }
}

/// Expected per-class tallies of `gates` gates (ideal gating: no dead time or
/// afterpulses; those are reported as corrections by the caller).
pub fn expected_tallies(link: &LinkConfig, gates: u64) -> Vec<(f64, f64, f64)> {
    // (expected detections, expected matched-basis QBER, P(class))
    let ph = LinkPhysics::from_config(link);
    link.source
        .classes()
        .iter()
        .map(|(_, mu, p)| {
            let (q, e) = ph.gain_error(*mu);
            (gates as f64 * p * q, e, *p)
        })
        .collect()
}
