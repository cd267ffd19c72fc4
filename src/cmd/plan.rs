//! `qkdnet plan`: the network planner. Reads a topology (and a demand file),
//! runs [`qkdnet_net::plan`] over simulated time and prints what is blocked
//! and where the bottlenecks are; optionally JSON and plots of pool levels.
//!
//! The planner works on the key-rate models of the simulated optics; no key
//! is made. The output says so.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;

use qkdnet_net::plan::{
    DemandFile, DemandSpec, PlanNetwork, PlanOptions, PlanReport, default_demands, plan,
};
use qkdnet_net::topology::Topology;

/// Arguments of `qkdnet plan`.
///
/// Example: qkdnet plan topologies/china-national.toml --duration 24h --plot plots/
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Topology file (see topologies/*.toml).
    topology: PathBuf,
    /// Demand file: `[[demand]]` from = "SAE", to = "SAE", rate_bps = 256.0,
    /// optional start_s, end_s, interval_s. Default: every pair of SAEs on
    /// different nodes at --rate, for the whole run.
    #[arg(long, value_name = "FILE")]
    demand: Option<PathBuf>,
    /// Simulated time: 24h, 90m, 3600s or 3600 (seconds); also 1d.
    #[arg(long, default_value = "24h")]
    duration: String,
    /// Rate of each default demand (no --demand), key bits per second.
    #[arg(long, default_value_t = 256.0)]
    rate: f64,
    /// Time between a demand's requests (each asks for rate × interval bits).
    #[arg(long, default_value = "10s")]
    interval: String,
    /// Largest pool of key per link, bits.
    #[arg(long, default_value = "1e9")]
    pool_capacity: String,
    /// Pool level of every link at the start, bits.
    #[arg(long, default_value = "0")]
    initial_pool: String,
    /// Time between samples of the pool levels; default: 288 samples over the run.
    #[arg(long)]
    sample: Option<String>,
    /// Links and demands listed in the text report, series in the JSON, links in the plots.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Put every link's pool-level series in the JSON, not only the top links'.
    #[arg(long)]
    all_series: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Write plots of pool levels over time (SVG and PNG) for the worst links to DIR.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
}

/// Parses a duration: `24h`, `90m`, `3600s`, `3600` (seconds) or `1d`.
pub fn parse_duration(what: &str, s: &str) -> anyhow::Result<f64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.as_str();
    let (num, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c),
        _ => (t, 's'),
    };
    let scale = match unit {
        's' => 1.0,
        'm' => 60.0,
        'h' => 3600.0,
        'd' => 86_400.0,
        _ => bail!("{what}: unknown unit in '{s}' (use s, m, h or d, e.g. 24h)"),
    };
    let v: f64 = num.trim().replace('_', "").parse().with_context(|| {
        format!("{what} must be a duration such as 24h, 90m or 3600s, got '{s}'")
    })?;
    let secs = v * scale;
    if !(secs.is_finite() && secs > 0.0) {
        bail!("{what} must be a time > 0, got '{s}'");
    }
    Ok(secs)
}

fn parse_bits(what: &str, s: &str) -> anyhow::Result<f64> {
    let v: f64 = s
        .trim()
        .replace('_', "")
        .parse()
        .with_context(|| format!("{what} must be a number of bits, got '{s}'"))?;
    if !(v.is_finite() && v >= 0.0) {
        bail!("{what} must be a number of bits >= 0, got '{s}'");
    }
    Ok(v)
}

#[derive(Serialize)]
struct JsonOut<'a> {
    topology: String,
    /// Where the demand came from.
    demand: String,
    #[serde(flatten)]
    report: &'a PlanReport,
    wall_seconds: f64,
}

/// Runs `qkdnet plan`.
pub fn run(a: PlanArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let duration_s = parse_duration("--duration", &a.duration)?;
    let opts = PlanOptions {
        duration_s,
        request_interval_s: parse_duration("--interval", &a.interval)?,
        pool_capacity_bits: parse_bits("--pool-capacity", &a.pool_capacity)?,
        initial_pool_bits: parse_bits("--initial-pool", &a.initial_pool)?,
        sample_interval_s: match &a.sample {
            Some(s) => parse_duration("--sample", s)?,
            None => duration_s / 288.0,
        },
    };
    let topo = Topology::from_file(&a.topology)?
        .validate()
        .with_context(|| format!("in {}", a.topology.display()))?;
    let net = PlanNetwork::from_topology(&topo);
    let (demands, source): (Vec<DemandSpec>, String) = match &a.demand {
        Some(path) => {
            let f = DemandFile::from_file(path)?;
            let n = f.demands.len();
            (f.demands, format!("{} ({n} demands)", path.display()))
        }
        None => {
            if !(a.rate.is_finite() && a.rate > 0.0) {
                bail!(
                    "--rate must be a number of bits per second > 0, got {}",
                    a.rate
                );
            }
            let d = default_demands(&net, a.rate);
            if d.is_empty() {
                bail!(
                    "{} has no two SAEs on different nodes, so there is no default demand: give --demand FILE",
                    a.topology.display()
                );
            }
            let n = d.len();
            (
                d,
                format!(
                    "default: every pair of SAEs on different nodes at {} bit/s ({n} demands)",
                    a.rate
                ),
            )
        }
    };
    let mut report = plan(&net, &demands, &opts).with_context(|| match &a.demand {
        Some(p) => format!("in {}", p.display()),
        None => "default demand".into(),
    })?;
    if let Some(dir) = &a.plot {
        plot(dir, &report, a.top)?;
    }
    let wall = started.elapsed().as_secs_f64();
    if a.json {
        if !a.all_series {
            let keep: Vec<usize> = report.bottlenecks.iter().take(a.top).copied().collect();
            for (i, l) in report.links.iter_mut().enumerate() {
                if !keep.contains(&i) {
                    l.pool_bits = Vec::new();
                }
            }
        }
        let out = JsonOut {
            topology: a.topology.display().to_string(),
            demand: source,
            report: &report,
            wall_seconds: wall,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    text(&a, &report, &source, topo.saes.len(), wall);
    Ok(())
}

fn human_time(s: f64) -> String {
    let (v, unit) = if s >= 86_400.0 && s % 86_400.0 == 0.0 {
        (s / 86_400.0, "d")
    } else if s >= 3600.0 {
        (s / 3600.0, "h")
    } else if s >= 60.0 {
        (s / 60.0, "min")
    } else {
        (s, "s")
    };
    let v = format!("{v:.3}");
    format!("{} {unit}", v.trim_end_matches('0').trim_end_matches('.'))
}

fn text(a: &PlanArgs, r: &PlanReport, source: &str, saes: usize, wall: f64) {
    let o = &r.options;
    println!(
        "network {}: {} nodes, {} links, {saes} SAEs ({})",
        r.network,
        r.nodes,
        r.links.len(),
        a.topology.display()
    );
    println!("demand: {source}");
    println!(
        "simulated {} ({} s): requests every {} s, pools of {:.3e} bits starting at {:.3e}",
        human_time(o.duration_s),
        o.duration_s,
        o.request_interval_s,
        o.pool_capacity_bits,
        o.initial_pool_bits
    );
    println!("({})", r.simulated);
    let t = &r.totals;
    println!(
        "requested {:.4e} bits, served {:.4e}, blocked {:.4e} ({:.3} %); {} requests, {} blocked, {} served on a detour",
        t.requested_bits,
        t.served_bits,
        t.blocked_bits,
        100.0 * t.blocked_fraction,
        t.requests,
        t.blocked_requests,
        t.rerouted_requests
    );
    println!();
    println!("bottleneck links (most blocked key, then most detours, then utilisation):");
    // Columns as wide as the longest name shown (long link names stay aligned).
    let shown: Vec<usize> = r.bottlenecks.iter().take(a.top).copied().collect();
    let w = shown
        .iter()
        .map(|&i| r.links[i].id.chars().count())
        .max()
        .unwrap_or(0)
        .max(4);
    println!(
        "  {:<w$} {:>7} {:>11} {:>7} {:>11} {:>9} {:>9} {:>11}",
        "link", "km", "key bit/s", "util %", "blocked b", "blk req", "detours", "min pool b"
    );
    for &i in &shown {
        let l = &r.links[i];
        println!(
            "  {:<w$} {:>7} {:>11.3e} {:>7.2} {:>11.3e} {:>9} {:>9} {:>11.3e}",
            l.id,
            l.distance_km
                .map(|d| format!("{d:.1}"))
                .unwrap_or_else(|| l.kind.into()),
            l.mean_key_bps,
            100.0 * l.utilisation,
            l.blocked_bits,
            l.blocked_requests,
            l.detoured_requests,
            l.min_sampled_pool_bits
        );
    }
    if r.bottlenecks.is_empty() {
        println!("  (no link carried key)");
    }
    let mut worst: Vec<usize> = (0..r.demands.len())
        .filter(|&i| r.demands[i].totals.blocked_bits > 0.0)
        .collect();
    worst.sort_by(|&i, &j| {
        r.demands[j]
            .totals
            .blocked_fraction
            .total_cmp(&r.demands[i].totals.blocked_fraction)
            .then(i.cmp(&j))
    });
    println!();
    if worst.is_empty() {
        println!("no demand was blocked");
    } else {
        println!(
            "most-blocked demands ({} of {} demands blocked at some point):",
            worst.len(),
            r.demands.len()
        );
        let pair = |i: usize| format!("{} → {}", r.demands[i].from, r.demands[i].to);
        let w = worst
            .iter()
            .take(a.top)
            .map(|&i| pair(i).chars().count())
            .max()
            .unwrap_or(0)
            .max(9);
        println!(
            "  {:<w$} {:>9} {:>5} {:>9} {:>9}",
            "from → to", "bit/s", "hops", "blocked %", "detour %"
        );
        for &i in worst.iter().take(a.top) {
            let d = &r.demands[i];
            println!(
                "  {:<w$} {:>9.1} {:>5} {:>9.2} {:>9.2}",
                pair(i),
                d.rate_bps,
                d.primary_hops,
                100.0 * d.totals.blocked_fraction,
                100.0 * d.totals.rerouted_requests as f64 / d.totals.requests.max(1) as f64
            );
        }
    }
    if let Some(dir) = &a.plot {
        println!();
        println!("plots of pool levels written to {}", dir.display());
    }
    println!("wall time {wall:.2} s");
}

/// Pool levels over time: one plot of the worst links together, and one per
/// link for each of the `top` worst (cropped to when the pool was drawn on),
/// each as SVG and PNG.
fn plot(dir: &Path, r: &PlanReport, top: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let worst: Vec<usize> = r.bottlenecks.iter().take(top).copied().collect();
    if worst.is_empty() {
        bail!("nothing to plot: no link carried key");
    }
    let hours = r.options.duration_s >= 7200.0;
    let (scale, x_label) = if hours {
        (1.0 / 3600.0, "simulated time (h)")
    } else {
        (1.0, "simulated time (s)")
    };
    let series = |i: usize| -> Vec<(f64, f64)> {
        r.samples_s
            .iter()
            .zip(&r.links[i].pool_bits)
            .map(|(t, v)| (t * scale, *v))
            .collect()
    };
    let labels: Vec<String> = worst
        .iter()
        .map(|&i| {
            let l = &r.links[i];
            format!("{} ({:.0} % used)", l.id, 100.0 * l.utilisation)
        })
        .collect();
    let together: Vec<crate::plot::Series<'_>> = worst
        .iter()
        .zip(&labels)
        .take(6)
        .map(|(&i, label)| crate::plot::Series {
            label,
            points: series(i),
            dashed: false,
        })
        .collect();
    let title = format!("Key pools of the busiest links, {}", r.network);
    for ext in ["svg", "png"] {
        crate::plot::linear_y(
            &dir.join(format!("pool-levels.{ext}")),
            &title,
            x_label,
            "key in pool (bits)",
            &together,
        )?;
    }
    for (&i, label) in worst.iter().zip(&labels) {
        let id: String = r.links[i]
            .id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let (points, cropped) = busy_window(series(i));
        let title = if cropped {
            format!("Key pool of link {} (when it was drawn on)", r.links[i].id)
        } else {
            format!("Key pool of link {}", r.links[i].id)
        };
        for ext in ["svg", "png"] {
            crate::plot::linear_y(
                &dir.join(format!("pool-{id}.{ext}")),
                &title,
                x_label,
                "key in pool (bits)",
                &[crate::plot::Series {
                    label,
                    points: points.clone(),
                    dashed: false,
                }],
            )?;
        }
    }
    Ok(())
}

/// The part of a pool's curve where something happens: a pool sits at its cap
/// for most of a day and is drawn on in a few busy hours, so the plot keeps the
/// span from the first to the last sample below 99 % of the highest level,
/// with a tenth of that span (at least one sample) on either side. A pool that
/// never leaves its top keeps the whole curve. Returns whether it cropped.
fn busy_window(points: Vec<(f64, f64)>) -> (Vec<(f64, f64)>, bool) {
    let top = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let below = |p: &(f64, f64)| p.1 < 0.99 * top;
    let (Some(first), Some(last)) = (
        points.iter().position(below),
        points.iter().rposition(below),
    ) else {
        return (points, false);
    };
    let pad = ((last - first) / 10).max(1);
    let (from, to) = (
        first.saturating_sub(pad),
        (last + pad).min(points.len() - 1),
    );
    if from == 0 && to == points.len() - 1 {
        return (points, false);
    }
    (points[from..=to].to_vec(), true)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn a_pool_curve_is_cropped_to_where_it_was_drawn_on() {
        use super::busy_window;
        // Full (100) for hours 0-9 and 16-23, drawn down in 10-15.
        let day: Vec<(f64, f64)> = (0..24)
            .map(|h| {
                (
                    f64::from(h),
                    if (10..16).contains(&h) { 40.0 } else { 100.0 },
                )
            })
            .collect();
        let (cut, cropped) = busy_window(day.clone());
        assert!(cropped);
        assert_eq!(cut.first().map(|p| p.0), Some(9.0));
        assert_eq!(cut.last().map(|p| p.0), Some(16.0));
        // Never drawn on: the whole, flat curve.
        let flat: Vec<(f64, f64)> = (0..24).map(|h| (f64::from(h), 100.0)).collect();
        assert_eq!(busy_window(flat.clone()), (flat, false));
        // Drawn on all day: nothing to crop.
        let busy: Vec<(f64, f64)> = (0..24).map(|h| (f64::from(h), f64::from(h % 5))).collect();
        assert!(!busy_window(busy).1);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("d", "24h").unwrap(), 86_400.0);
        assert_eq!(parse_duration("d", "90m").unwrap(), 5400.0);
        assert_eq!(parse_duration("d", "3600s").unwrap(), 3600.0);
        assert_eq!(parse_duration("d", "3600").unwrap(), 3600.0);
        assert_eq!(parse_duration("d", "1d").unwrap(), 86_400.0);
        assert_eq!(parse_duration("d", "1.5h").unwrap(), 5400.0);
        for bad in ["", "h", "-1h", "0", "3x", "nan", "inf", "1e400"] {
            assert!(parse_duration("--duration", bad).is_err(), "{bad}");
        }
    }
}
