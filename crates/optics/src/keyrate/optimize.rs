//! Small derivative-free optimisers and a root bracket, written here because
//! the models need only a few dozen lines of each and no numeric crate of the
//! right size offers both: golden-section search in one dimension and
//! Nelder–Mead in a few, each bounded in iterations.

/// Maximises `f` on [lo, hi] (unimodal assumed) by golden-section search.
pub fn golden_max(mut lo: f64, mut hi: f64, iters: usize, f: impl Fn(f64) -> f64) -> (f64, f64) {
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let mut a = hi - g * (hi - lo);
    let mut b = lo + g * (hi - lo);
    let (mut fa, mut fb) = (f(a), f(b));
    for _ in 0..iters {
        if fa < fb {
            lo = a;
            a = b;
            fa = fb;
            b = lo + g * (hi - lo);
            fb = f(b);
        } else {
            hi = b;
            b = a;
            fb = fa;
            a = hi - g * (hi - lo);
            fa = f(a);
        }
    }
    if fa > fb { (a, fa) } else { (b, fb) }
}

/// Maximises `f` over R^n by Nelder–Mead from `start` with initial step `step`.
pub fn nelder_mead_max(
    start: &[f64],
    step: f64,
    iters: usize,
    f: impl Fn(&[f64]) -> f64,
) -> (Vec<f64>, f64) {
    let n = start.len();
    let mut simplex: Vec<(Vec<f64>, f64)> = (0..=n)
        .map(|i| {
            let mut x = start.to_vec();
            if i > 0 {
                x[i - 1] += step;
            }
            let v = f(&x);
            (x, v)
        })
        .collect();
    let by_value_desc = |a: &(Vec<f64>, f64), b: &(Vec<f64>, f64)| b.1.total_cmp(&a.1);
    for _ in 0..iters {
        simplex.sort_by(by_value_desc);
        let worst = simplex[n].clone();
        let centroid: Vec<f64> = (0..n)
            .map(|j| simplex[..n].iter().map(|(x, _)| x[j]).sum::<f64>() / n as f64)
            .collect();
        let along = |t: f64| -> Vec<f64> {
            (0..n)
                .map(|j| centroid[j] + t * (worst.0[j] - centroid[j]))
                .collect()
        };
        let xr = along(-1.0);
        let fr = f(&xr);
        if fr > simplex[0].1 {
            let xe = along(-2.0);
            let fe = f(&xe);
            simplex[n] = if fe > fr { (xe, fe) } else { (xr, fr) };
        } else if fr > simplex[n - 1].1 {
            simplex[n] = (xr, fr);
        } else {
            let xc = along(0.5);
            let fc = f(&xc);
            if fc > worst.1 {
                simplex[n] = (xc, fc);
            } else {
                let best = simplex[0].0.clone();
                for s in simplex.iter_mut().skip(1) {
                    let x: Vec<f64> = (0..n).map(|j| best[j] + 0.5 * (s.0[j] - best[j])).collect();
                    let v = f(&x);
                    *s = (x, v);
                }
            }
        }
    }
    simplex.sort_by(by_value_desc);
    simplex.swap_remove(0)
}

/// Finds where `positive(x)` switches from true (at `lo`) to false (at `hi`)
/// by bisection to within `tol`.
pub fn bisect_boundary(mut lo: f64, mut hi: f64, tol: f64, positive: impl Fn(f64) -> bool) -> f64 {
    while hi - lo > tol {
        let mid = 0.5 * (lo + hi);
        if positive(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_known_optima() {
        let (x, _) = golden_max(0.0, 5.0, 80, |x| -(x - 1.3) * (x - 1.3));
        assert!((x - 1.3).abs() < 1e-6);
        let (v, _) = nelder_mead_max(&[0.0, 0.0], 0.5, 400, |x| {
            -(x[0] - 1.0).powi(2) - 3.0 * (x[1] + 2.0).powi(2)
        });
        assert!(
            (v[0] - 1.0).abs() < 1e-4 && (v[1] + 2.0).abs() < 1e-4,
            "{v:?}"
        );
        let b = bisect_boundary(0.0, 10.0, 1e-9, |x| x < std::f64::consts::PI);
        assert!((b - std::f64::consts::PI).abs() < 1e-8);
    }
}
