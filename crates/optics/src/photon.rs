//! Photon-number distributions and what the channel (and Eve) do to them.
//!
//! Every model in this crate works on the distribution of the number of photons
//! in a pulse, as a truncated probability vector. That one representation covers
//! Poisson (phase-randomised weak coherent pulses), sub-Poissonian single-photon
//! sources, loss (binomial thinning) and photon-number-splitting attacks, and the
//! detector model only ever needs its generating function G(z) = Σ pₙ zⁿ.

/// Probability of n photons in a pulse, for n = 0..len.
#[derive(Debug, Clone, PartialEq)]
pub struct PhotonDist {
    p: Vec<f64>,
}

impl PhotonDist {
    /// Poisson(μ), truncated where the tail falls below 1e-18.
    pub fn poisson(mu: f64) -> PhotonDist {
        let mut p = Vec::with_capacity(32);
        let mut term = (-mu).exp();
        let mut n = 0usize;
        let mut cum = 0.0;
        loop {
            p.push(term);
            cum += term;
            n += 1;
            if (n as f64 > mu && 1.0 - cum < 1e-18) || n > 200 {
                break;
            }
            term *= mu / n as f64;
        }
        PhotonDist { p }
    }

    /// A triggered single-photon source: a photon with probability `eff`, of
    /// which a fraction `p2` are two-photon pulses.
    pub fn single_photon(eff: f64, p2: f64) -> PhotonDist {
        PhotonDist {
            p: vec![1.0 - eff, eff * (1.0 - p2), eff * p2],
        }
    }

    /// Exactly n photons.
    pub fn fock(n: usize) -> PhotonDist {
        let mut p = vec![0.0; n + 1];
        p[n] = 1.0;
        PhotonDist { p }
    }

    /// Probability of exactly n photons.
    pub fn prob(&self, n: usize) -> f64 {
        self.p.get(n).copied().unwrap_or(0.0)
    }

    /// Probability of two or more photons.
    pub fn multi_photon_prob(&self) -> f64 {
        self.p.iter().skip(2).sum()
    }

    /// The generating function G(z) = Σ pₙ zⁿ (Horner).
    pub fn pgf(&self, z: f64) -> f64 {
        self.p.iter().rev().fold(0.0, |acc, &pn| acc * z + pn)
    }

    /// Each photon survives independently with probability `t` (loss).
    pub fn thin(&self, t: f64) -> PhotonDist {
        let n_max = self.p.len();
        let mut q = vec![0.0; n_max];
        for (n, &pn) in self.p.iter().enumerate() {
            if pn == 0.0 {
                continue;
            }
            // Binomial(n, t) pmf by the multiplicative recurrence.
            let mut b = (1.0 - t).powi(n as i32);
            for (m, qm) in q.iter_mut().enumerate().take(n + 1) {
                *qm += pn * b;
                if m < n {
                    b = if t < 1.0 {
                        b * (n - m) as f64 / (m + 1) as f64 * t / (1.0 - t)
                    } else {
                        // t == 1: all mass at m == n
                        if m + 1 == n { 1.0 } else { 0.0 }
                    };
                }
            }
        }
        PhotonDist { p: q }
    }

    /// What reaches Bob under the photon-number-splitting attack tuned so that
    /// the pulses of `reference` (the signal) arrive as often as through an
    /// honest channel of transmittance `eta_ch` seen by detectors of efficiency
    /// `eta_det`. Eve keeps one photon of each multi-photon pulse, forwards the
    /// remaining n−1 losslessly with probability `t`, forwards single photons
    /// with probability `s`, and blocks everything else. Returns (s, t).
    pub fn pns_forwarding(reference: &PhotonDist, eta_ch: f64, eta_det: f64) -> (f64, f64) {
        let honest = 1.0 - reference.thin(eta_ch).pgf(1.0 - eta_det);
        let p1 = reference.prob(1);
        let multi: f64 = reference
            .p
            .iter()
            .enumerate()
            .skip(2)
            .map(|(n, &pn)| pn * (1.0 - (1.0 - eta_det).powi(n as i32 - 1)))
            .sum();
        if multi >= honest {
            (0.0, if multi > 0.0 { honest / multi } else { 0.0 })
        } else if p1 * eta_det > 0.0 {
            (((honest - multi) / (p1 * eta_det)).min(1.0), 1.0)
        } else {
            (0.0, 1.0)
        }
    }

    /// The distribution Bob receives under PNS with forwarding probabilities (s, t).
    pub fn after_pns(&self, s: f64, t: f64) -> PhotonDist {
        let mut q = vec![0.0; self.p.len().max(2)];
        q[0] += self.prob(0) + self.prob(1) * (1.0 - s);
        q[1] += self.prob(1) * s;
        for (n, &pn) in self.p.iter().enumerate().skip(2) {
            q[n - 1] += pn * t;
            q[0] += pn * (1.0 - t);
        }
        PhotonDist { p: q }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_sums_to_one_and_has_mean_mu() {
        for mu in [0.0, 0.1, 0.5, 1.0, 5.0] {
            let d = PhotonDist::poisson(mu);
            let sum: f64 = d.p.iter().sum();
            let mean: f64 = d.p.iter().enumerate().map(|(n, p)| n as f64 * p).sum();
            assert!((sum - 1.0).abs() < 1e-12, "mu {mu}");
            assert!((mean - mu).abs() < 1e-10, "mu {mu}");
        }
    }

    #[test]
    fn thinning_poisson_is_poisson() {
        let d = PhotonDist::poisson(0.7).thin(0.3);
        let e = PhotonDist::poisson(0.21);
        for n in 0..10 {
            assert!((d.prob(n) - e.prob(n)).abs() < 1e-12);
        }
        // the generating function of thinned Poisson is exp(-μ t (1-z))
        assert!((d.pgf(0.4) - (-0.21f64 * 0.6).exp()).abs() < 1e-12);
        // thinning by 1 and by 0
        assert_eq!(
            PhotonDist::poisson(0.5).thin(1.0).prob(1),
            PhotonDist::poisson(0.5).prob(1)
        );
        assert!((PhotonDist::poisson(0.5).thin(0.0).prob(0) - 1.0).abs() < 1e-15);
    }

    #[test]
    fn pns_matches_honest_signal_gain() {
        let sig = PhotonDist::poisson(0.5);
        for eta_ch in [0.5, 0.1, 0.01, 1e-4] {
            let eta_det = 0.1;
            let (s, t) = PhotonDist::pns_forwarding(&sig, eta_ch, eta_det);
            let honest = 1.0 - sig.thin(eta_ch).pgf(1.0 - eta_det);
            let pns = 1.0 - sig.after_pns(s, t).pgf(1.0 - eta_det);
            assert!(
                (honest - pns).abs() / honest < 1e-9,
                "eta {eta_ch}: {honest} vs {pns}"
            );
        }
    }
}
