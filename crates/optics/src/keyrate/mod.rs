//! Analytic key-rate models: what a link should yield, for planning and for
//! checking the simulator and the post-processing engine against.
//!
//! All models take the same [`LinkPhysics`] (so they agree with the event
//! simulator by construction) and return a rate per pulse sent:
//!
//! | model | assumptions |
//! |---|---|
//! | `gllp` | GLLP without decoys: every multi-photon pulse is assumed detected and known to Eve; asymptotic. |
//! | `decoy-inf` | Infinitely many decoys: Y₁ and e₁ known exactly; asymptotic; decoy pulses a vanishing fraction. |
//! | `decoy-vw` | Vacuum + one weak decoy ν, bounds of Ma, Qi, Zhao, Lo (PRA 72, 012326, 2005); asymptotic. |
//! | `finite` | Three intensities, finite block of n sifted key-basis bits, Lim et al. (PRA 89, 022307, 2014); counts are expectations. |
//! | `sps` | Single-photon source, GLLP with its multi-photon fraction; asymptotic. |
//!
//! Asymptotic models count key from both bases (sifting factor
//! q_A q_B + (1−q_A)(1−q_B)) and report per signal pulse; the finite model
//! draws key from Z only and reports per pulse of any class. Afterpulsing enters
//! the finite model as in Lim et al. (R_k = D_k(1 + p_ap), afterpulse errors ½);
//! dead time is not modelled analytically. The PLOB bound −log2(1−η_ch) is
//! reported beside every point.

pub mod finite;
pub mod optimize;

use serde::Serialize;

use crate::OpticsError;
use crate::detection::LinkPhysics;
use crate::device::{Channel, LinkConfig, Source};
use crate::entropy::h2;
use crate::units::transmittance_to_db;

/// PLOB repeaterless bound (Pirandola et al., Nat. Commun. 8, 15043, 2017):
/// −log2(1 − η) secret bits per channel use for a pure-loss channel of transmittance η.
pub fn plob(eta: f64) -> f64 {
    -(1.0 - eta).log2()
}

/// Which key-rate model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Model {
    /// GLLP without decoy states.
    Gllp,
    /// Infinite decoy states (asymptotic).
    DecoyInf,
    /// Vacuum + weak decoy (asymptotic).
    DecoyVw,
    /// Three-intensity finite-key (Lim et al. 2014).
    Finite,
    /// Single-photon source.
    Sps,
}

impl Model {
    /// Parses `gllp|decoy-inf|decoy-vw|finite|sps`.
    pub fn parse(s: &str) -> Result<Model, OpticsError> {
        Ok(match s {
            "gllp" => Model::Gllp,
            "decoy-inf" => Model::DecoyInf,
            "decoy-vw" => Model::DecoyVw,
            "finite" => Model::Finite,
            "sps" => Model::Sps,
            _ => {
                return Err(OpticsError::invalid(
                    "model",
                    format!("unknown model '{s}' (gllp, decoy-inf, decoy-vw, finite, sps)"),
                ));
            }
        })
    }

    /// The kebab-case name.
    pub fn name(self) -> &'static str {
        match self {
            Model::Gllp => "gllp",
            Model::DecoyInf => "decoy-inf",
            Model::DecoyVw => "decoy-vw",
            Model::Finite => "finite",
            Model::Sps => "sps",
        }
    }
}

/// How to evaluate a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelOptions {
    /// The model.
    pub model: Model,
    /// Block size: sifted key-basis bits per block (finite model only).
    pub block_bits: f64,
    /// Optimise intensities (and for `finite` probabilities and basis bias) at
    /// each point, instead of using the preset's settings.
    pub optimize: bool,
}

/// One evaluated operating point.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyRatePoint {
    /// Channel length (fibre) or slant range (satellite), km.
    pub distance_km: f64,
    /// Channel loss in dB (without Bob's efficiency).
    pub loss_db: f64,
    /// Gain of the signal class.
    pub gain: f64,
    /// QBER of the signal class (finite: of the key basis over all classes).
    pub qber: f64,
    /// Secret bits per pulse sent (0 when no key).
    pub key_rate_per_pulse: f64,
    /// Secret bits per second.
    pub key_rate_bps: f64,
    /// PLOB bound, bits per pulse.
    pub plob_per_pulse: f64,
    /// PLOB bound, bits per second at the same pulse rate.
    pub plob_bps: f64,
    /// Intensities used (signal first).
    pub intensities: Vec<f64>,
    /// For `finite`: class probabilities used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probabilities: Option<Vec<f64>>,
    /// For `finite`: the Z-basis probability used by both parties.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub basis_prob_z: Option<f64>,
    /// For `finite`: pulses needed to fill one block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pulses_per_block: Option<f64>,
}

/// Asymptotic rate per signal pulse: returns (gain, QBER, rate), rate < 0 past the cut-off.
fn asymptotic_rate(ph: &LinkPhysics, model: Model, f_ec: f64, mu: f64, nu: f64) -> (f64, f64, f64) {
    let (q, e) = ph.gain_error(mu);
    let dist = ph.emitted(mu);
    let (q1, e1) = match model {
        Model::DecoyInf => {
            let (y1, e1) = ph.yield_error_n(1);
            (y1 * dist.prob(1), e1)
        }
        Model::DecoyVw => {
            // Ma, Qi, Zhao, Lo 2005: vacuum + weak decoy lower bound on Y1 and upper bound on e1.
            let (qv, ev) = ph.gain_error(nu);
            let (y0, _) = ph.gain_error(0.0);
            let y1 = mu / (mu * nu - nu * nu)
                * (qv * nu.exp()
                    - q * mu.exp() * nu * nu / (mu * mu)
                    - (mu * mu - nu * nu) / (mu * mu) * y0);
            let e1 = if y1 > 0.0 {
                ((ev * qv * nu.exp() - 0.5 * y0) / (y1 * nu)).clamp(0.0, 0.5)
            } else {
                0.5
            };
            (y1.max(0.0) * mu * (-mu).exp(), e1)
        }
        Model::Gllp | Model::Sps | Model::Finite => {
            // GLLP: all multi-photon pulses assumed detected and insecure.
            let q1 = (q - dist.multi_photon_prob()).max(0.0);
            let e1 = if q1 > 0.0 { (e * q / q1).min(0.5) } else { 0.5 };
            (q1, e1)
        }
    };
    let rate = ph.sift_fraction() * (q1 * (1.0 - h2(e1)) - f_ec * q * h2(e));
    (q, e, rate)
}

/// Expected counts of a block of `n_pulses` for the finite model: per class
/// (detections in Z, detections in X, errors in X, errors in Z).
fn expected_counts(
    ph: &LinkPhysics,
    mu: [f64; 3],
    p: [f64; 3],
    qz: f64,
    n_pulses: f64,
) -> (finite::DecoyCounts, [f64; 3]) {
    let mut c = finite::DecoyCounts {
        mu,
        p,
        n_key: [0.0; 3],
        n_test: [0.0; 3],
        m_test: [0.0; 3],
    };
    let mut m_key = [0.0; 3];
    for k in 0..3 {
        let (d, e) = ph.gain_error(mu[k]);
        // Lim et al.'s afterpulse convention: R_k = D_k (1 + p_ap), afterpulse errors ½.
        let r = d * (1.0 + ph.afterpulse);
        let err = (d * e + 0.5 * ph.afterpulse * d) / r.max(f64::MIN_POSITIVE);
        c.n_key[k] = n_pulses * p[k] * qz * qz * r;
        c.n_test[k] = n_pulses * p[k] * (1.0 - qz) * (1.0 - qz) * r;
        c.m_test[k] = c.n_test[k] * err;
        m_key[k] = c.n_key[k] * err;
    }
    (c, m_key)
}

/// Finite-key rate per pulse for one setting; returns (rate, QBER_Z, gain_signal, pulses_per_block).
fn finite_rate(
    ph: &LinkPhysics,
    pp: &crate::device::PostprocAssumptions,
    block: f64,
    mu: [f64; 3],
    p: [f64; 3],
    qz: f64,
) -> Result<(f64, f64, f64, f64), OpticsError> {
    let (per_pulse, _) = expected_counts(ph, mu, p, qz, 1.0);
    let key_per_pulse: f64 = per_pulse.n_key.iter().sum();
    if key_per_pulse <= 0.0 {
        return Ok((0.0, 0.5, 0.0, f64::INFINITY));
    }
    let n_pulses = block / key_per_pulse;
    let (c, m_key) = expected_counts(ph, mu, p, qz, n_pulses);
    let n_key: f64 = c.n_key.iter().sum();
    let qber = m_key.iter().sum::<f64>() / n_key;
    let lambda = pp.ec_efficiency * n_key * h2(qber);
    let est = finite::key_length(&c, pp.eps_sec.get(), pp.eps_cor.get(), lambda)?;
    Ok((
        est.length / n_pulses,
        qber,
        ph.gain_error(mu[0]).0,
        n_pulses,
    ))
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}
fn logit(p: f64) -> f64 {
    let p = p.clamp(1e-9, 1.0 - 1e-9);
    (p / (1.0 - p)).ln()
}

/// A model evaluated on a link; keeps the last optimum as the next start.
pub struct Evaluator<'a> {
    link: &'a LinkConfig,
    opts: ModelOptions,
    warm: Option<Vec<f64>>,
}

impl<'a> Evaluator<'a> {
    /// Checks that the model fits the link's source and prepares to evaluate it.
    pub fn new(link: &'a LinkConfig, opts: ModelOptions) -> Result<Evaluator<'a>, OpticsError> {
        let classes = link.source.classes();
        match (&link.source, opts.model) {
            (Source::SinglePhoton { .. }, Model::Sps)
            | (Source::WeakCoherent { .. }, Model::Gllp | Model::DecoyInf) => {}
            (Source::WeakCoherent { .. }, Model::DecoyVw)
                if opts.optimize || classes.len() >= 2 => {}
            (Source::WeakCoherent { .. }, Model::Finite) if classes.len() == 3 => {}
            (Source::WeakCoherent { .. }, Model::DecoyVw) => {
                return Err(OpticsError::invalid(
                    "model",
                    "decoy-vw needs a decoy class in the preset, or --optimize",
                ));
            }
            (Source::WeakCoherent { .. }, Model::Finite) => {
                return Err(OpticsError::invalid(
                    "model",
                    format!(
                        "the finite-key model needs exactly three intensity classes; this source has {}",
                        classes.len()
                    ),
                ));
            }
            (Source::SinglePhoton { .. }, m) => {
                return Err(OpticsError::invalid(
                    "model",
                    format!(
                        "'{}' is a weak-coherent-pulse model; use 'sps' for a single-photon source",
                        m.name()
                    ),
                ));
            }
            (Source::WeakCoherent { .. }, Model::Sps) => {
                return Err(OpticsError::invalid(
                    "model",
                    "'sps' needs a single-photon source",
                ));
            }
        }
        if opts.model == Model::Finite && !(opts.block_bits.is_finite() && opts.block_bits >= 1e3) {
            return Err(OpticsError::invalid(
                "block",
                format!("block size must be >= 1000 bits, got {}", opts.block_bits),
            ));
        }
        Ok(Evaluator {
            link,
            opts,
            warm: None,
        })
    }

    /// Evaluates the model at `km` (fibre length or satellite slant range).
    pub fn at_distance(&mut self, km: f64) -> Result<KeyRatePoint, OpticsError> {
        let (channel, loss_db) = self.link.channel.at_distance(km)?;
        let cfg = LinkConfig {
            channel,
            ..self.link.clone()
        };
        let mut pt = self.at_link(&cfg)?;
        pt.distance_km = km;
        pt.loss_db = loss_db;
        Ok(pt)
    }

    /// Evaluates the model on a link as configured.
    pub fn at_link(&mut self, cfg: &LinkConfig) -> Result<KeyRatePoint, OpticsError> {
        let ph = LinkPhysics::from_config(cfg);
        let classes = cfg.source.classes();
        let f_ec = cfg.postproc.ec_efficiency;
        let eta = ph.eta_ch;
        let mut pt = KeyRatePoint {
            distance_km: 0.0,
            loss_db: transmittance_to_db(eta),
            gain: 0.0,
            qber: 0.0,
            key_rate_per_pulse: 0.0,
            key_rate_bps: 0.0,
            plob_per_pulse: plob(eta),
            plob_bps: plob(eta) * ph.rep_rate_hz,
            intensities: vec![],
            probabilities: None,
            basis_prob_z: None,
            pulses_per_block: None,
        };
        match self.opts.model {
            Model::Gllp | Model::DecoyInf | Model::Sps => {
                let mu = if self.opts.optimize && self.opts.model != Model::Sps {
                    let start = self.warm.as_ref().map(|w| w[0]).unwrap_or(classes[0].1);
                    let (m, _) =
                        optimize::golden_max(0.0, (start * 4.0).clamp(0.05, 2.0), 60, |m| {
                            asymptotic_rate(&ph, self.opts.model, f_ec, m.max(1e-9), 0.0).2
                        });
                    self.warm = Some(vec![m]);
                    m.max(1e-9)
                } else {
                    classes[0].1
                };
                let (q, e, r) = asymptotic_rate(&ph, self.opts.model, f_ec, mu, 0.0);
                pt.gain = q;
                pt.qber = e;
                pt.key_rate_per_pulse = r.max(0.0);
                pt.intensities = vec![mu];
                pt.probabilities = None;
            }
            Model::DecoyVw => {
                // The weak decoy ν is a device setting (the preset's second
                // class, 0.1 if it has none); only the signal μ is optimised,
                // since ν → 0 would merely recover the infinite-decoy limit.
                let nu = classes
                    .get(1)
                    .map(|c| c.1)
                    .filter(|&n| n > 0.0)
                    .unwrap_or(0.1);
                let mu = if self.opts.optimize {
                    let (m, _) = optimize::golden_max(nu * 1.01, 2.0, 80, |m| {
                        asymptotic_rate(&ph, Model::DecoyVw, f_ec, m, nu).2
                    });
                    m
                } else {
                    classes[0].1
                };
                let (q, e, r) = asymptotic_rate(&ph, Model::DecoyVw, f_ec, mu, nu);
                pt.gain = q;
                pt.qber = e;
                pt.key_rate_per_pulse = r.max(0.0);
                pt.intensities = vec![mu, nu, 0.0];
            }
            Model::Finite => {
                let block = self.opts.block_bits;
                let pp = &cfg.postproc;
                let mu3 = classes[2].1;
                let preset_mu = [classes[0].1, classes[1].1, mu3];
                let preset_p = [classes[0].2, classes[1].2, classes[2].2];
                let qz = cfg.source.basis_prob_z();
                let (mu, p, qz) = if self.opts.optimize {
                    // x = [ln(μ1 − μ2 − μ3), ln(μ2 − μ3), logit p1, logit p2/(1−p1), logit qz]
                    let decode = |x: &[f64]| -> ([f64; 3], [f64; 3], f64) {
                        let mu2 = mu3 + x[1].exp();
                        let mu1 = (mu2 + mu3 + x[0].exp()).min(3.0);
                        let p1 = sigmoid(x[2]);
                        let p2 = (1.0 - p1) * sigmoid(x[3]);
                        (
                            [mu1, mu2, mu3],
                            [p1, p2, 1.0 - p1 - p2],
                            sigmoid(x[4]).clamp(0.01, 0.999),
                        )
                    };
                    let start = self.warm.clone().unwrap_or_else(|| {
                        vec![
                            (preset_mu[0] - preset_mu[1] - mu3).max(0.01).ln(),
                            (preset_mu[1] - mu3).max(0.01).ln(),
                            logit(preset_p[0]),
                            logit(preset_p[1] / (1.0 - preset_p[0])),
                            logit(qz),
                        ]
                    });
                    let objective = |x: &[f64]| -> f64 {
                        let (mu, p, qz) = decode(x);
                        match finite_rate(&ph, pp, block, mu, p, qz) {
                            Ok((r, ..)) if r > 0.0 => r.ln(),
                            // below zero, climb the (negative) key length per block bit
                            Ok((r, _, _, n)) => -100.0 + (r * n / block).max(-50.0),
                            Err(_) => -200.0,
                        }
                    };
                    // Cold start: seed Nelder–Mead from the best points of a coarse
                    // grid (small blocks are feasible only in a narrow region).
                    let mut starts = vec![start];
                    if self.warm.is_none() {
                        let mut grid = Vec::new();
                        for mu1 in [0.3, 0.6] {
                            for mu2 in [0.1, 0.2] {
                                for p1 in [0.2, 0.5] {
                                    for qz in [0.3, 0.5, 0.7, 0.9] {
                                        let x = vec![
                                            (mu1 - mu2 - mu3).max(0.01f64).ln(),
                                            (mu2 - mu3).max(0.01f64).ln(),
                                            logit(p1),
                                            logit(0.5),
                                            logit(qz),
                                        ];
                                        let v = objective(&x);
                                        grid.push((x, v));
                                    }
                                }
                            }
                        }
                        grid.sort_by(|a, b| b.1.total_cmp(&a.1));
                        starts.extend(grid.into_iter().take(2).map(|(x, _)| x));
                    }
                    let mut best = (starts[0].clone(), f64::NEG_INFINITY);
                    for s0 in &starts {
                        let mut cand = optimize::nelder_mead_max(s0, 0.5, 250, objective);
                        let again = optimize::nelder_mead_max(&cand.0, 0.2, 150, objective);
                        if again.1 > cand.1 {
                            cand = again;
                        }
                        if cand.1 > best.1 {
                            best = cand;
                        }
                        if self.warm.is_some() && best.1 > -100.0 {
                            break; // warm start succeeded
                        }
                    }
                    if best.1 > -100.0 {
                        self.warm = Some(best.0.clone());
                    }
                    decode(&best.0)
                } else {
                    (preset_mu, preset_p, qz)
                };
                let (r, qber, gain, n) = finite_rate(&ph, pp, block, mu, p, qz)?;
                pt.gain = gain;
                pt.qber = qber;
                pt.key_rate_per_pulse = r.max(0.0);
                pt.intensities = mu.to_vec();
                pt.probabilities = Some(p.to_vec());
                pt.basis_prob_z = Some(qz);
                pt.pulses_per_block = Some(n);
            }
        }
        pt.key_rate_bps = pt.key_rate_per_pulse * ph.rep_rate_hz;
        Ok(pt)
    }

    /// The largest distance with positive key, by bisection on the model (not
    /// read off a grid), searched up to `limit_km`. `None` if even the
    /// shortest distance gives no key.
    pub fn max_distance(
        &mut self,
        from_km: f64,
        limit_km: f64,
    ) -> Result<Option<f64>, OpticsError> {
        let positive = |ev: &mut Self, km: f64| -> Result<bool, OpticsError> {
            Ok(ev.at_distance(km)?.key_rate_per_pulse > 0.0)
        };
        if !positive(self, from_km)? {
            return Ok(None);
        }
        // walk out in steps to bracket the cut-off, warm-starting the optimiser as we go
        let step = ((limit_km - from_km) / 40.0).max(1.0);
        let mut lo = from_km;
        let mut hi = None;
        let mut d = from_km + step;
        while d <= limit_km + 1e-9 {
            if positive(self, d)? {
                lo = d;
            } else {
                hi = Some(d);
                break;
            }
            d += step;
        }
        let Some(mut hi) = hi else {
            return Ok(Some(limit_km));
        };
        let warm = self.warm.clone();
        while hi - lo > 0.01 {
            let mid = 0.5 * (lo + hi);
            self.warm = warm.clone();
            if positive(self, mid)? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(Some(0.5 * (lo + hi)))
    }
}

/// What one satellite pass is expected to yield, with the preset's settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PassSummary {
    /// Usable pass duration, seconds.
    pub duration_s: f64,
    /// Lowest and highest channel loss over the pass, dB.
    pub loss_db_range: (f64, f64),
    /// Expected detections (all bases, all classes).
    pub detections: f64,
    /// Expected sifted bits (matching bases, both bases).
    pub sifted_bits: f64,
    /// Expected QBER of the signal class.
    pub qber: f64,
    /// Final key of the whole pass processed as one finite block (Lim et al.
    /// bounds, key from Z only, X for testing), bits.
    pub final_key_bits: f64,
    /// The pass sampled once per step: (t, range, elevation, loss, detections per second).
    pub profile: Vec<(f64, f64, f64, f64, f64)>,
}

/// Expected yield of one pass of a satellite preset, integrated in `step_s` steps.
pub fn pass_summary(link: &LinkConfig, step_s: f64) -> Result<PassSummary, OpticsError> {
    let Channel::Satellite(pass) = &link.channel else {
        return Err(OpticsError::invalid(
            "preset",
            format!("'{}' has no satellite channel", link.name),
        ));
    };
    let classes = link.source.classes();
    if classes.len() != 3 {
        return Err(OpticsError::invalid(
            "preset",
            "a pass summary needs three intensity classes",
        ));
    }
    let mu = [classes[0].1, classes[1].1, classes[2].1];
    let p = [classes[0].2, classes[1].2, classes[2].2];
    let base = LinkPhysics::from_config(link);
    let step = step_s.clamp(0.1, 60.0);
    let points = pass.profile(step);
    let mut total = finite::DecoyCounts {
        mu,
        p,
        n_key: [0.0; 3],
        n_test: [0.0; 3],
        m_test: [0.0; 3],
    };
    let (mut m_key, mut detections, mut sifted, mut sig_err, mut sig_sift) =
        (0.0, 0.0, 0.0, 0.0, 0.0);
    let mut profile = Vec::with_capacity(points.len());
    let (qa, qb) = base.qz;
    for pt in &points {
        let ph = LinkPhysics {
            eta_ch: crate::units::db_to_transmittance(pt.loss_db),
            ..base.clone()
        };
        let pulses = ph.rep_rate_hz * step;
        let mut det_rate = 0.0;
        for k in 0..3 {
            let (q, e) = ph.gain_error(mu[k]);
            let n = pulses * p[k] * q;
            det_rate += ph.rep_rate_hz * p[k] * q;
            detections += n;
            let sz = n * qa * qb;
            let sx = n * (1.0 - qa) * (1.0 - qb);
            sifted += sz + sx;
            total.n_key[k] += sz;
            total.n_test[k] += sx;
            total.m_test[k] += sx * e;
            m_key += sz * e;
            if k == 0 {
                sig_err += (sz + sx) * e;
                sig_sift += sz + sx;
            }
        }
        profile.push((pt.t_s, pt.range_km, pt.elevation_deg, pt.loss_db, det_rate));
    }
    let n_key: f64 = total.n_key.iter().sum();
    let lambda = link.postproc.ec_efficiency * n_key * h2(m_key / n_key.max(1.0));
    let est = finite::key_length(
        &total,
        link.postproc.eps_sec.get(),
        link.postproc.eps_cor.get(),
        lambda,
    )?;
    let losses = points.iter().map(|x| x.loss_db);
    Ok(PassSummary {
        duration_s: pass.duration_s(),
        loss_db_range: (
            losses.clone().fold(f64::INFINITY, f64::min),
            losses.fold(0.0, f64::max),
        ),
        detections,
        sifted_bits: sifted,
        qber: sig_err / sig_sift.max(1.0),
        final_key_bits: est.length.max(0.0),
        profile,
    })
}
