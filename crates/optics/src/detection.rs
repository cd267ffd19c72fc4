//! From photons at Bob's input to clicks: the one detector model every other
//! part of the crate uses.
//!
//! Bob chooses a basis actively and has two threshold detectors, D0 and D1.
//! Each arriving photon is detected with efficiency η_det and routed to D0 with
//! probability r₀ (to D1 otherwise): r₀ = 1 − e_d for a bit-0 photon measured in
//! its own basis (e_d the misalignment), e_d for a bit-1 photon, ½ in the other
//! basis. Each detector also fires on its own with the dark-count probability.
//! A dead detector neither fires nor counts photons. With the photon-number
//! generating function G of what arrives, the no-click probabilities are
//! closed-form, so the analytic models and the event simulator share them.

use crate::device::{LinkConfig, Source};
use crate::photon::PhotonDist;

/// No-click probabilities of one gate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClickProbs {
    /// P(D1 silent).
    pub no_d1: f64,
    /// P(D0 silent).
    pub no_d0: f64,
    /// P(both silent).
    pub none: f64,
}

impl ClickProbs {
    /// P(at least one click).
    pub fn any(&self) -> f64 {
        1.0 - self.none
    }
    /// P(only D0 clicks).
    pub fn d0_only(&self) -> f64 {
        (self.no_d1 - self.none).max(0.0)
    }
    /// P(only D1 clicks).
    pub fn d1_only(&self) -> f64 {
        (self.no_d0 - self.none).max(0.0)
    }
    /// P(both click).
    pub fn both(&self) -> f64 {
        (1.0 - self.no_d0 - self.no_d1 + self.none).max(0.0)
    }
}

/// Click probabilities for `arriving` photons (before detector efficiency),
/// routing fraction `r0` to D0, and which detectors are `alive`.
pub fn click_probs(
    arriving: &PhotonDist,
    eta_det: f64,
    pdc: f64,
    r0: f64,
    alive: [bool; 2],
) -> ClickProbs {
    let r = [r0, 1.0 - r0];
    let silent = |d: usize| -> (f64, f64) {
        // (dark factor, routed fraction) of detector d
        if alive[d] {
            (1.0 - pdc, r[d])
        } else {
            (1.0, 0.0)
        }
    };
    let (k0, f0) = silent(0);
    let (k1, f1) = silent(1);
    ClickProbs {
        no_d0: k0 * arriving.pgf(1.0 - eta_det * f0),
        no_d1: k1 * arriving.pgf(1.0 - eta_det * f1),
        none: k0 * k1 * arriving.pgf(1.0 - eta_det * (f0 + f1)),
    }
}

/// Gain and error rate of one class of pulses in the matched basis: a double
/// click is assigned a random bit, so it counts half an error.
pub fn gain_and_error(
    arriving: &PhotonDist,
    eta_det: f64,
    pdc: f64,
    misalignment: f64,
) -> (f64, f64) {
    // A bit-0 photon in its own basis: D0 is right, D1 is wrong.
    let c = click_probs(arriving, eta_det, pdc, 1.0 - misalignment, [true, true]);
    let q = c.any();
    if q <= 0.0 {
        return (0.0, 0.5);
    }
    let err = c.d1_only() + 0.5 * c.both();
    (q, err / q)
}

/// The physics of one link at one operating point, as the models need it.
#[derive(Debug, Clone)]
pub struct LinkPhysics {
    /// Channel transmittance (without Bob's efficiency).
    pub eta_ch: f64,
    /// Bob's detection efficiency.
    pub eta_det: f64,
    /// Dark-count probability per gate per detector.
    pub pdc: f64,
    /// Misalignment error.
    pub misalignment: f64,
    /// Afterpulse probability per click.
    pub afterpulse: f64,
    /// Dead time in gates.
    pub dead_gates: u64,
    /// Alice's and Bob's Z-basis probabilities.
    pub qz: (f64, f64),
    /// Repetition rate in Hz.
    pub rep_rate_hz: f64,
    /// For single-photon sources: (efficiency, two-photon probability).
    pub sps: Option<(f64, f64)>,
}

impl LinkPhysics {
    /// Extracts the physics of a link configuration.
    pub fn from_config(cfg: &LinkConfig) -> LinkPhysics {
        let rx = &cfg.receiver;
        let rep = cfg.source.rep_rate_hz();
        LinkPhysics {
            eta_ch: cfg.channel.transmittance(),
            eta_det: rx.efficiency.get(),
            pdc: rx.dark_count_prob.get(),
            misalignment: rx.misalignment.get(),
            afterpulse: rx.afterpulse_prob.get(),
            dead_gates: (rx.dead_time_s.get() * rep).round() as u64,
            qz: (cfg.source.basis_prob_z(), rx.basis_prob_z.get()),
            rep_rate_hz: rep,
            sps: match cfg.source {
                Source::SinglePhoton {
                    efficiency,
                    multi_photon_prob,
                    ..
                } => Some((efficiency.get(), multi_photon_prob.get())),
                Source::WeakCoherent { .. } => None,
            },
        }
    }

    /// Photon-number distribution emitted for a class of mean μ.
    pub fn emitted(&self, mu: f64) -> PhotonDist {
        match self.sps {
            Some((eff, p2)) => PhotonDist::single_photon(eff, p2),
            None => PhotonDist::poisson(mu),
        }
    }

    /// Gain Q and error rate E of pulses of mean μ (ideal gating: no dead time,
    /// no afterpulses).
    pub fn gain_error(&self, mu: f64) -> (f64, f64) {
        gain_and_error(
            &self.emitted(mu).thin(self.eta_ch),
            self.eta_det,
            self.pdc,
            self.misalignment,
        )
    }

    /// Yield Yₙ and error rate eₙ of n-photon pulses.
    pub fn yield_error_n(&self, n: usize) -> (f64, f64) {
        gain_and_error(
            &PhotonDist::fock(n).thin(self.eta_ch),
            self.eta_det,
            self.pdc,
            self.misalignment,
        )
    }

    /// Fraction of sent pulses whose bases match (both bases used for key, as in
    /// standard BB84): q_A q_B + (1 − q_A)(1 − q_B).
    pub fn sift_fraction(&self) -> f64 {
        let (a, b) = self.qz;
        a * b + (1.0 - a) * (1.0 - b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_textbook_gain_and_error_for_poisson() {
        // Ma et al. 2005 Eqs. (8)-(9) without the O(Y0²) terms:
        // Q = Y0 + 1 - exp(-ημ),  E Q = Y0/2 + e_d (1 - exp(-ημ)).
        let (mu, eta, pdc, ed) = (0.5, 1e-2, 1e-6, 0.03);
        let (q, e) = gain_and_error(&PhotonDist::poisson(mu), eta, pdc, ed);
        let y0 = 2.0 * pdc;
        let q_ref = y0 + 1.0 - (-eta * mu).exp();
        let eq_ref = y0 / 2.0 + ed * (1.0 - (-eta * mu).exp());
        assert!((q - q_ref).abs() / q_ref < 1e-3, "{q} vs {q_ref}");
        // double clicks shift the error by O(η²μ²e_d): small
        assert!(
            (e * q - eq_ref).abs() / eq_ref < 1e-2,
            "{} vs {eq_ref}",
            e * q
        );
    }

    #[test]
    fn vacuum_yield_is_two_dark_counts_with_half_errors() {
        let (q, e) = gain_and_error(&PhotonDist::fock(0), 0.1, 1e-5, 0.01);
        assert!((q - (1.0 - (1.0 - 1e-5f64).powi(2))).abs() < 1e-15);
        assert!((e - 0.5).abs() < 1e-12);
    }

    #[test]
    fn pattern_probabilities_sum_to_one() {
        let d = PhotonDist::poisson(0.8).thin(0.3);
        for alive in [[true, true], [true, false], [false, true], [false, false]] {
            for r0 in [0.0, 0.2, 0.5, 1.0] {
                let c = click_probs(&d, 0.5, 1e-3, r0, alive);
                let total = c.none + c.d0_only() + c.d1_only() + c.both();
                assert!((total - 1.0).abs() < 1e-12);
                if !alive[0] {
                    assert!(c.d0_only() + c.both() < 1e-15);
                }
            }
        }
    }
}
