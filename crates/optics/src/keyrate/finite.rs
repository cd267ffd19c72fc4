//! Finite-key decoy-state BB84 with three intensities: the bounds of Lim,
//! Curty, Walenta, Xu and Zbinden, "Concise security bounds for practical
//! decoy-state quantum key distribution", PRA 89, 022307 (2014), Eqs. (1)–(5).
//!
//! The same functions serve two callers: the analytic model (expected counts
//! from the device physics) and the post-processing engine's parameter
//! estimation (observed counts from a real block). Naming: Lim et al. draw key
//! from their X basis and test in Z; qkdnet draws key from **Z** and tests in
//! **X**, so their n_X is our `n_key` and their m_Z our `m_test`.
//!
//! Statistical fluctuations use Hoeffding's bound,
//! n±_k = (e^{μ_k}/p_k)(n_k ± √(n/2 · ln(21/ε_sec))), and the phase error the
//! random-sampling correction γ of their Eq. (5).

use crate::OpticsError;
use crate::entropy::h2;

/// Observed (or expected) counts of one block, per intensity class.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoyCounts {
    /// Mean photon numbers μ1 > μ2 + μ3, μ2 > μ3 ≥ 0.
    pub mu: [f64; 3],
    /// Probabilities of choosing each intensity.
    pub p: [f64; 3],
    /// Detections in the key basis (Z, both parties), per class.
    pub n_key: [f64; 3],
    /// Detections in the test basis (X, both parties), per class.
    pub n_test: [f64; 3],
    /// Bit errors in the test basis, per class.
    pub m_test: [f64; 3],
}

/// The bounds of one block and the resulting secret-key length.
#[derive(Debug, Clone, PartialEq)]
pub struct FiniteKeyEstimate {
    /// Lower bound on vacuum events in the key basis, s_Z,0.
    pub s0: f64,
    /// Lower bound on single-photon events in the key basis, s_Z,1.
    pub s1: f64,
    /// Lower bound on single-photon events in the test basis.
    pub s1_test: f64,
    /// Upper bound on single-photon errors in the test basis, v_X,1.
    pub v1_test: f64,
    /// Upper bound on the single-photon phase-error rate in the key basis, φ_Z.
    pub phase_error: f64,
    /// Secret key length ℓ in bits (≤ 0 means no key).
    pub length: f64,
}

/// γ(a, b, c, d) of Lim et al. Eq. (5): the random-sampling correction to an
/// error rate b observed on c samples, for a population of d (0 when undefined).
pub fn gamma(a: f64, b: f64, c: f64, d: f64) -> f64 {
    if b <= 0.0 || b >= 1.0 || c <= 0.0 || d <= 0.0 {
        return 0.0;
    }
    let inner = (c + d) / (c * d * (1.0 - b) * b) * (21.0 * 21.0) / (a * a);
    ((c + d) * (1.0 - b) * b / (c * d * std::f64::consts::LN_2) * inner.log2())
        .max(0.0)
        .sqrt()
}

/// Secret key length from counts, ε_sec, ε_cor, and the error-correction leakage
/// `lambda_ec` (bits actually disclosed, or f·n·h(e) for a prediction).
pub fn key_length(
    c: &DecoyCounts,
    eps_sec: f64,
    eps_cor: f64,
    lambda_ec: f64,
) -> Result<FiniteKeyEstimate, OpticsError> {
    let [m1, m2, m3] = c.mu;
    if !(m1 > m2 + m3 && m2 > m3 && m3 >= 0.0) {
        return Err(OpticsError::invalid(
            "intensities",
            format!(
                "the three-intensity bounds need μ1 > μ2 + μ3 and μ2 > μ3 >= 0, got {m1}, {m2}, {m3}"
            ),
        ));
    }
    if c.p.iter().any(|&p| p <= 0.0) {
        return Err(OpticsError::invalid(
            "intensity probabilities",
            "all three must be > 0",
        ));
    }
    let ln_term = (21.0 / eps_sec).ln();
    // τ_n = Σ_k p_k e^{-μ_k} μ_k^n / n!, needed for n = 0, 1 (n! = 1).
    let tau = |n: i32| -> f64 {
        (0..3)
            .map(|k| c.p[k] * (-c.mu[k]).exp() * c.mu[k].powi(n))
            .sum()
    };
    let (tau0, tau1) = (tau(0), tau(1));
    let bounds = |counts: &[f64; 3]| -> ([f64; 3], [f64; 3]) {
        let total: f64 = counts.iter().sum();
        let delta = (total / 2.0 * ln_term).sqrt();
        let mut lo = [0.0; 3];
        let mut hi = [0.0; 3];
        for k in 0..3 {
            let w = c.mu[k].exp() / c.p[k];
            lo[k] = w * (counts[k] - delta);
            hi[k] = w * (counts[k] + delta);
        }
        (lo, hi)
    };
    let s0_s1 = |counts: &[f64; 3]| -> (f64, f64) {
        let (lo, hi) = bounds(counts);
        let s0 = (tau0 * (m2 * lo[2] - m3 * hi[1]) / (m2 - m3)).max(0.0);
        let s1 =
            tau1 * m1 * (lo[1] - hi[2] - (m2 * m2 - m3 * m3) / (m1 * m1) * (hi[0] - s0 / tau0))
                / (m1 * (m2 - m3) - m2 * m2 + m3 * m3);
        (s0, s1.max(0.0))
    };
    let (s0, s1) = s0_s1(&c.n_key);
    let (_, s1_test) = s0_s1(&c.n_test);
    let (m_lo, m_hi) = bounds(&c.m_test);
    let v1_test = (tau1 * (m_hi[1] - m_lo[2]) / (m2 - m3)).max(0.0);
    let phase_error = if s1_test > 0.0 && s1 > 0.0 {
        let ratio = (v1_test / s1_test).min(0.5);
        (ratio + gamma(eps_sec, ratio, s1_test, s1)).min(0.5)
    } else {
        0.5
    };
    let length = s0 + s1 * (1.0 - h2(phase_error))
        - lambda_ec
        - 6.0 * (21.0 / eps_sec).log2()
        - (2.0 / eps_cor).log2();
    Ok(FiniteKeyEstimate {
        s0,
        s1,
        s1_test,
        v1_test,
        phase_error,
        length,
    })
}
