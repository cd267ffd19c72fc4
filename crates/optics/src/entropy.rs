//! Binary entropy and reconciliation efficiency: the two information
//! quantities that the key-rate models here, the reconciliation kernels of
//! `qkdnet-postproc` and the link reports all use.
//!
//! They live in the lowest crate that needs them so that the workspace holds
//! one definition of each (`qkdnet-postproc` depends on this crate for them).
//! The efficiency is the measured counterpart of
//! [`crate::device::PostprocAssumptions::ec_efficiency`]: the models assume
//! a reconciliation leaks `f·n·h(e)` bits, [`efficiency`] reads `f` off what
//! one actually leaked.
//!
//! Out-of-range inputs are answered with NaN, not with a number: an error rate
//! outside `[0, 1]` is a bug upstream, and the convenient-looking `h = 0`
//! would read as "no errors" and overstate the key in `1 − h(e)`. NaN instead
//! propagates into the result, where the caller's check of the final figure
//! (`l > 0`, `rate > 0`) is false for it.

/// Binary Shannon entropy `h(p) = −p·log2 p − (1−p)·log2(1−p)` in bits, with
/// `h(0) = h(1) = 0`.
///
/// NaN for `p` outside `[0, 1]` and for NaN (see the module documentation).
pub fn h2(p: f64) -> f64 {
    if !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    if p == 0.0 || p == 1.0 {
        return 0.0;
    }
    -p * p.log2() - (1.0 - p) * (1.0 - p).log2()
}

/// Reconciliation efficiency `f = leaked / (n·h(qber))`: the bits a
/// reconciliation disclosed over the Shannon limit for `n` bits at that error
/// rate (1 is the limit; Cascade reaches about 1.04, LDPC 1.2–1.5).
///
/// `None` where `f` is undefined: no bits, an error rate of 0 or 1 (the limit
/// is zero), or an error rate outside `[0, 1]`.
pub fn efficiency(leaked_bits: u64, n: u64, qber: f64) -> Option<f64> {
    let ideal = n as f64 * h2(qber);
    (ideal > 0.0).then(|| leaked_bits as f64 / ideal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2_at_known_points_and_symmetric() {
        assert_eq!(h2(0.0), 0.0);
        assert_eq!(h2(1.0), 0.0);
        assert_eq!(h2(0.5), 1.0);
        // h(0.11) ≈ 0.5: the BB84 one-way threshold (Shor–Preskill).
        assert!((h2(0.11) - 0.499_915_958_2).abs() < 1e-9, "{}", h2(0.11));
        for i in 1..100 {
            let p = f64::from(i) / 100.0;
            assert!((h2(p) - h2(1.0 - p)).abs() < 1e-12, "{p}");
            assert!(h2(p) > 0.0 && h2(p) <= 1.0, "{p}");
        }
    }

    #[test]
    fn h2_is_nan_outside_the_unit_interval() {
        for p in [
            -1e-12,
            -0.3,
            1.0 + 1e-12,
            1.5,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ] {
            assert!(h2(p).is_nan(), "h2({p}) = {}", h2(p));
        }
    }

    #[test]
    fn efficiency_is_leakage_over_the_shannon_limit_and_none_where_undefined() {
        // 10^6 bits at QBER 0.11 have a limit of ≈ 499,916 bits.
        let f = efficiency(600_000, 1_000_000, 0.11).expect("defined");
        assert!((f - 600_000.0 / (1e6 * h2(0.11))).abs() < 1e-12, "{f}");
        assert_eq!(efficiency(1000, 0, 0.02), None);
        assert_eq!(efficiency(1000, 1000, 0.0), None);
        assert_eq!(efficiency(1000, 1000, 1.0), None);
        assert_eq!(efficiency(1000, 1000, -0.1), None);
        assert_eq!(efficiency(1000, 1000, f64::NAN), None);
    }
}
