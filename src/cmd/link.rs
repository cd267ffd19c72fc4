//! `qkdnet link …`: key-rate models and the event simulator of one QKD link.
//!
//! The optics are simulated; these commands say so in their output.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::Serialize;

use qkdnet_optics::detection::LinkPhysics;
use qkdnet_optics::device::{Channel, Eve, LinkConfig};
use qkdnet_optics::entropy::efficiency;
use qkdnet_optics::keyrate::{Evaluator, KeyRatePoint, Model, ModelOptions};
use qkdnet_optics::preset;
use qkdnet_optics::record::BobWriter;
use qkdnet_optics::sim::Simulator;

/// Link subcommands.
#[derive(Debug, Subcommand)]
pub enum LinkCommand {
    /// Key rate against distance from the analytic models, with the PLOB bound.
    ///
    /// Example: qkdnet link keyrate --preset gys2004 --model decoy-vw --distance 0:150:10
    Keyrate(KeyrateArgs),
    /// Simulate pulses through the link (simulated optics) and compare with the model.
    ///
    /// Example: qkdnet link simulate --preset metro-1ghz --distance 50 --pulses 1e8 --eve intercept-resend:0.5
    Simulate(SimulateArgs),
    /// Run a whole link: simulated optics plus the real post-processing engine,
    /// Alice and Bob as two parties over loopback TCP.
    ///
    /// Example: qkdnet link run --preset metro-1ghz --distance 25 --duration 2
    Run(RunArgs),
    /// List the built-in device presets, or print one as TOML to copy and edit.
    Presets {
        /// Print this preset's TOML.
        name: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct PresetArg {
    /// A built-in preset name (see `qkdnet link presets`) or a path to a TOML file.
    #[arg(long, default_value = "metro-1ghz")]
    preset: String,
}

/// Arguments of `link keyrate`.
#[derive(Debug, Args)]
pub struct KeyrateArgs {
    #[command(flatten)]
    preset: PresetArg,
    /// Distances in km: a single value or START:STOP:STEP (slant range for satellite presets).
    #[arg(long)]
    distance: Option<String>,
    /// Key-rate model: decoy-inf, decoy-vw, gllp, finite (three-intensity, finite block) or sps.
    #[arg(long, default_value = "finite")]
    model: String,
    /// Block size for the finite model: sifted key-basis bits per block (e.g. 1e6).
    #[arg(long, default_value = "1e8")]
    block: String,
    /// Use the preset's intensities and probabilities instead of optimising them at each distance.
    #[arg(long)]
    fixed_intensities: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also draw key rate against distance with the PLOB bound to FILE.svg or FILE.png.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
}

/// Arguments of `link simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    preset: PresetArg,
    /// Channel length in km (slant range for satellite presets); default: the preset's.
    #[arg(long)]
    distance: Option<f64>,
    /// Number of pulses (gates) to simulate, e.g. 1e8.
    #[arg(long, default_value = "1e7")]
    pulses: String,
    /// Eavesdropper: none, intercept-resend:FRACTION or pns.
    #[arg(long, default_value = "none")]
    eve: String,
    /// Seed of all random choices (same seed, same records).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write Alice's and Bob's detection records (alice.rec, bob.rec) to this directory.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Arguments of `link run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    preset: PresetArg,
    /// Fibre length in km; default: the preset's.
    #[arg(long)]
    distance: Option<f64>,
    /// Link time to simulate, in seconds of the source's clock (e.g. 0.5).
    #[arg(long, default_value_t = 1.0)]
    duration: f64,
    /// Gates (pulses) per block; default: enough for about 2e6 sifted key bits.
    #[arg(long)]
    block_gates: Option<String>,
    /// Reconciliation: cascade, cascade-opt or ldpc. cascade-opt leaks fewer
    /// bits but needs about ten times the round trips, each costing an
    /// authentication tag, so plain cascade nets more key.
    #[arg(long, default_value = "cascade")]
    reconciler: String,
    /// Eavesdropper: none, intercept-resend:FRACTION or pns.
    #[arg(long, default_value = "none")]
    eve: String,
    /// Seed of the simulated optics (reproducible runs).
    #[arg(long)]
    seed: Option<u64>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs a link subcommand.
pub fn run(c: LinkCommand) -> anyhow::Result<()> {
    match c {
        LinkCommand::Keyrate(a) => keyrate(a),
        LinkCommand::Simulate(a) => simulate(a),
        LinkCommand::Run(a) => run_link(a),
        LinkCommand::Presets { name } => presets(name),
    }
}

/// Loads a preset by name, or a TOML file by path.
pub fn load_link(arg: &str) -> anyhow::Result<LinkConfig> {
    if arg.ends_with(".toml") || arg.contains('/') {
        let text =
            std::fs::read_to_string(arg).with_context(|| format!("reading preset file {arg}"))?;
        LinkConfig::from_toml(&text).with_context(|| format!("in {arg}"))
    } else {
        Ok(preset::get(arg)?)
    }
}

/// Parses a count such as `1e8`, `250000` or `2_000_000`.
pub fn parse_count(what: &str, s: &str) -> anyhow::Result<u64> {
    let v: f64 = s
        .replace('_', "")
        .parse()
        .with_context(|| format!("{what} must be a number, got '{s}'"))?;
    if !(v.is_finite() && v >= 1.0 && v <= 1e15 && v.fract() == 0.0) {
        bail!("{what} must be a whole number from 1 to 1e15, got '{s}'");
    }
    Ok(v as u64)
}

fn parse_range(s: &str) -> anyhow::Result<Vec<f64>> {
    let parts: Vec<&str> = s.split(':').collect();
    let num = |p: &str| -> anyhow::Result<f64> {
        let v: f64 = p
            .trim()
            .parse()
            .with_context(|| format!("'{p}' in --distance {s} is not a number"))?;
        if !v.is_finite() || v < 0.0 {
            bail!("distances must be >= 0 km, got {v} in --distance {s}");
        }
        Ok(v)
    };
    match parts.as_slice() {
        [one] => Ok(vec![num(one)?]),
        [a, b, step] => {
            let (a, b, step) = (num(a)?, num(b)?, num(step)?);
            if b < a || step <= 0.0 {
                bail!("--distance START:STOP:STEP needs START <= STOP and STEP > 0, got {s}");
            }
            let n = ((b - a) / step + 1e-9).floor() as usize;
            if n > 10_000 {
                bail!("--distance {s} has {n} points; at most 10,000");
            }
            Ok((0..=n).map(|i| a + i as f64 * step).collect())
        }
        _ => bail!("--distance takes KM or START:STOP:STEP, got '{s}'"),
    }
}

#[derive(Serialize)]
struct KeyrateReport<'a> {
    preset: &'a str,
    model: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    block_bits: Option<f64>,
    optimized: bool,
    rep_rate_hz: f64,
    /// Largest distance with positive key, by bisection on the model.
    max_distance_km: Option<f64>,
    points: Vec<KeyRatePoint>,
    simulated: &'static str,
}

fn keyrate(a: KeyrateArgs) -> anyhow::Result<()> {
    let link = load_link(&a.preset.preset)?;
    let model = Model::parse(&a.model)?;
    let block: f64 = a
        .block
        .replace('_', "")
        .parse()
        .with_context(|| format!("--block must be a number, got '{}'", a.block))?;
    let is_sat = matches!(link.channel, Channel::Satellite(_));
    let default_range = if is_sat { "500:1500:50" } else { "0:200:10" };
    let distances = parse_range(a.distance.as_deref().unwrap_or(default_range))?;
    let opts = ModelOptions {
        model,
        block_bits: block,
        optimize: !a.fixed_intensities,
    };
    let mut ev = Evaluator::new(&link, opts)?;
    let mut points = Vec::with_capacity(distances.len());
    for &d in &distances {
        points.push(ev.at_distance(d)?);
    }
    let mut ev2 = Evaluator::new(&link, opts)?;
    let (from, limit) = if is_sat {
        (500.0, 2500.0)
    } else {
        (0.0, 500.0)
    };
    let max_distance_km = ev2.max_distance(from, limit)?;
    let report = KeyrateReport {
        preset: &link.name,
        model: model.name(),
        block_bits: (model == Model::Finite).then_some(block),
        optimized: opts.optimize,
        rep_rate_hz: link.source.rep_rate_hz(),
        max_distance_km,
        points,
        simulated: "analytic model of simulated optics; no physical link was measured",
    };
    if let Some(path) = &a.plot {
        let series = [
            crate::plot::Series {
                label: &format!("{} ({})", model.name(), link.name),
                points: report
                    .points
                    .iter()
                    .map(|p| (p.distance_km, p.key_rate_bps))
                    .collect(),
                dashed: false,
            },
            crate::plot::Series {
                label: "PLOB bound",
                points: report
                    .points
                    .iter()
                    .map(|p| (p.distance_km, p.plob_bps))
                    .collect(),
                dashed: true,
            },
        ];
        let x = if is_sat {
            "slant range (km)"
        } else {
            "fibre length (km)"
        };
        crate::plot::log_y(
            path,
            &format!("Secret key rate, {}", link.name),
            x,
            "bits per second",
            &series,
        )?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("{} — {}", link.name, link.description);
    println!(
        "model {}{}, {} intensities; simulated optics, analytic prediction",
        model.name(),
        if model == Model::Finite {
            format!(" (block {block:.0e} bits)")
        } else {
            String::new()
        },
        if opts.optimize { "optimised" } else { "preset" }
    );
    println!(
        "{:>9} {:>8} {:>10} {:>8} {:>12} {:>12} {:>12}",
        "km", "loss dB", "gain", "QBER %", "bits/pulse", "key bit/s", "PLOB bit/s"
    );
    for p in &report.points {
        println!(
            "{:>9.1} {:>8.2} {:>10.3e} {:>8.3} {:>12.3e} {:>12.3e} {:>12.3e}",
            p.distance_km,
            p.loss_db,
            p.gain,
            p.qber * 100.0,
            p.key_rate_per_pulse,
            p.key_rate_bps,
            p.plob_bps
        );
    }
    match report.max_distance_km {
        Some(d) => println!("maximum distance with positive key: {d:.2} km"),
        None => println!("no positive key at any distance"),
    }
    if let Some(p) = &a.plot {
        println!("plot written to {}", p.display());
    }
    Ok(())
}

#[derive(Serialize)]
struct ClassReport {
    label: String,
    mean_photons: f64,
    pulses_expected: f64,
    detections: u64,
    gain: f64,
    gain_expected: f64,
    sifted_z: u64,
    sifted_x: u64,
    qber_z: Option<f64>,
    qber_x: Option<f64>,
    qber_expected: f64,
    double_clicks: u64,
}

#[derive(Serialize)]
struct SimulateReport {
    preset: String,
    distance_km: Option<f64>,
    loss_db: f64,
    eve: String,
    seed: u64,
    pulses: u64,
    link_seconds: f64,
    wall_seconds: f64,
    pulses_per_second: f64,
    detections: u64,
    classes: Vec<ClassReport>,
    expectation_note: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    records: Option<Vec<String>>,
    simulated: &'static str,
}

fn simulate(a: SimulateArgs) -> anyhow::Result<()> {
    let mut link = load_link(&a.preset.preset)?;
    if let Some(d) = a.distance {
        link = link.at_distance(d)?;
    }
    let pulses = parse_count("--pulses", &a.pulses)?;
    let eve = Eve::parse(&a.eve)?;
    let mut sim = Simulator::new(&link, eve, a.seed)?;
    let start = Instant::now();
    let mut detections = 0u64;
    let mut files = None;
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (ap, bp) = (dir.join("alice.rec"), dir.join("bob.rec"));
        let alice = sim.alice_record(pulses)?;
        let mut af = std::io::BufWriter::new(
            std::fs::File::create(&ap).with_context(|| format!("creating {}", ap.display()))?,
        );
        alice.write_to(&mut af)?;
        af.flush()?;
        let bf = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&bp).with_context(|| format!("creating {}", bp.display()))?,
        );
        let mut w = BobWriter::new(bf, alice.span)?;
        sim.run(pulses, &mut |d| {
            detections += 1;
            w.push(d)
        })?;
        w.finish()?;
        files = Some(vec![ap.display().to_string(), bp.display().to_string()]);
    } else {
        sim.run(pulses, &mut |_| {
            detections += 1;
            Ok::<(), std::convert::Infallible>(())
        })
        .map_err(|e| match e {})?;
    }
    let wall = start.elapsed().as_secs_f64();
    let ph = LinkPhysics::from_config(&link);
    let classes = link
        .source
        .classes()
        .into_iter()
        .zip(sim.tallies())
        .map(|((label, mu, p), t)| {
            let (q, e) = ph.gain_error(mu);
            let n = pulses as f64 * p;
            let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
            ClassReport {
                label,
                mean_photons: mu,
                pulses_expected: n,
                detections: t.detections,
                gain: t.detections as f64 / n,
                gain_expected: q,
                sifted_z: t.sifted_z,
                sifted_x: t.sifted_x,
                qber_z: ratio(t.errors_z, t.sifted_z),
                qber_x: ratio(t.errors_x, t.sifted_x),
                qber_expected: e,
                double_clicks: t.double_clicks,
            }
        })
        .collect();
    let report = SimulateReport {
        preset: link.name.clone(),
        distance_km: a.distance,
        loss_db: link.channel.loss_db(),
        eve: a.eve.clone(),
        seed: a.seed,
        pulses,
        link_seconds: pulses as f64 / link.source.rep_rate_hz(),
        wall_seconds: wall,
        pulses_per_second: pulses as f64 / wall.max(1e-9),
        detections,
        classes,
        expectation_note: "expected values: honest channel, ideal gating (no dead time, no afterpulses); an eavesdropper or detector effects show as departures",
        records: files,
        simulated: "simulated optics: photons, channel and detectors are models",
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} at {:.2} dB channel loss, Eve: {} (simulated optics)",
        report.preset, report.loss_db, report.eve
    );
    println!(
        "{} pulses = {:.3} s of link time in {:.2} s wall ({:.3e} pulses/s); {} detections",
        pulses, report.link_seconds, wall, report.pulses_per_second, detections
    );
    println!(
        "{:>10} {:>7} {:>10} {:>11} {:>11} {:>9} {:>9} {:>9}",
        "class", "μ", "detections", "gain", "expected", "QBER Z %", "QBER X %", "expected"
    );
    let pct = |v: Option<f64>| {
        v.map(|x| format!("{:.3}", x * 100.0))
            .unwrap_or_else(|| "-".into())
    };
    for c in &report.classes {
        println!(
            "{:>10} {:>7.4} {:>10} {:>11.4e} {:>11.4e} {:>9} {:>9} {:>9.3}",
            c.label,
            c.mean_photons,
            c.detections,
            c.gain,
            c.gain_expected,
            pct(c.qber_z),
            pct(c.qber_x),
            c.qber_expected * 100.0
        );
    }
    println!("({})", report.expectation_note);
    if let Some(f) = &report.records {
        println!("records: {}", f.join(", "));
    }
    Ok(())
}

fn presets(name: Option<String>) -> anyhow::Result<()> {
    match name {
        Some(n) => {
            let text =
                preset::text(&n).ok_or_else(|| qkdnet_optics::OpticsError::UnknownPreset {
                    name: n.clone(),
                    available: preset::names().join(", "),
                })?;
            print!("{text}");
        }
        None => {
            for n in preset::names() {
                let l = preset::get(n)?;
                println!("{n:<14} {}", l.description);
            }
        }
    }
    Ok(())
}

/// Expected sifted key-basis (Z) bits per gate, from the detection model.
fn sifted_z_per_gate(link: &LinkConfig) -> f64 {
    let qz = link.source.basis_prob_z();
    qkdnet_optics::sim::expected_tallies(link, 1)
        .iter()
        .map(|(det, _, _)| det * qz * qz)
        .sum()
}

#[derive(Serialize)]
struct RunReport {
    preset: String,
    distance_km: Option<f64>,
    loss_db: f64,
    eve: String,
    reconciler: String,
    block_gates: u64,
    link_seconds: f64,
    #[serde(flatten)]
    run: qkdnet_net::local::LocalRunReport,
    efficiency_f: Option<f64>,
    secret_key_bps: f64,
    model: &'static str,
    model_key_bps: f64,
    fraction_of_model: Option<f64>,
    simulated: &'static str,
}

fn run_link(a: RunArgs) -> anyhow::Result<()> {
    use qkdnet_link::block::ProtocolConfig;
    use qkdnet_link::msg::Reconciler;
    use qkdnet_net::session::LinkParams;

    let mut link = load_link(&a.preset.preset)?;
    if let Some(d) = a.distance {
        link = link.at_distance(d)?;
    }
    if !(a.duration.is_finite() && a.duration > 0.0 && a.duration <= 3600.0) {
        bail!(
            "--duration must be in (0, 3600] seconds of link time, got {}",
            a.duration
        );
    }
    let eve = Eve::parse(&a.eve)?;
    let reconciler = Reconciler::parse(&a.reconciler)?;
    let classes = link.source.classes();
    if classes.len() != 3 {
        bail!(
            "link run needs a three-intensity decoy source (signal, decoy, vacuum); preset '{}' has {} classes",
            link.name,
            classes.len()
        );
    }
    let rep = link.source.rep_rate_hz();
    let total_gates = (a.duration * rep).round().max(1.0) as u64;
    let per_gate = sifted_z_per_gate(&link);
    let block_gates = match &a.block_gates {
        Some(s) => parse_count("--block-gates", s)?,
        None if per_gate > 0.0 => {
            ((2e6 / per_gate).ceil() as u64).clamp(1_000_000, total_gates.max(1_000_000))
        }
        None => total_gates,
    }
    .min(total_gates.max(1));
    let blocks = total_gates.div_ceil(block_gates);
    let mut bootstrap = vec![0u8; 4096];
    getrandom::fill(&mut bootstrap).map_err(|e| anyhow::anyhow!("random bootstrap secret: {e}"))?;
    let params = LinkParams {
        link_id: format!("{}-run", link.name),
        link: link.clone(),
        eve,
        proto: ProtocolConfig {
            reconciler,
            eps_sec: link.postproc.eps_sec.get(),
            eps_cor: link.postproc.eps_cor.get(),
            classes: classes.iter().map(|c| (c.1, c.2)).collect(),
            ..Default::default()
        },
        block_gates,
        window: 4,
        bootstrap: std::sync::Arc::new(zeroize::Zeroizing::new(bootstrap)),
        seed: a.seed,
        pass: None,
    };
    if !a.json {
        eprintln!(
            "running {} blocks of {} gates ({:.3} s of link time) through the simulated optics and the post-processing engine...",
            blocks,
            block_gates,
            (blocks * block_gates) as f64 / rep
        );
    }
    let run = qkdnet_net::local::run_local(params, blocks)?;
    let link_seconds = run.gates as f64 / rep;
    let secret_key_bps = run.final_key_bits as f64 / link_seconds.max(1e-12);
    let model_block = run.sifted_bits_per_block.max(1e3);
    let model_key_bps = Evaluator::new(
        &link,
        ModelOptions {
            model: Model::Finite,
            block_bits: model_block,
            optimize: false,
        },
    )
    .and_then(|mut ev| ev.at_link(&link))
    .map(|p| p.key_rate_bps)
    .unwrap_or(0.0);
    let report = RunReport {
        preset: link.name.clone(),
        distance_km: a.distance,
        loss_db: link.channel.loss_db(),
        eve: a.eve.clone(),
        reconciler: a.reconciler.clone(),
        block_gates,
        link_seconds,
        efficiency_f: efficiency(run.leaked_bits, run.sifted_bits, run.qber)
            .filter(|_| run.blocks_ok > 0),
        secret_key_bps,
        model: "finite (Lim et al. 2014), the preset's intensities, block = measured sifted bits per block",
        model_key_bps,
        fraction_of_model: (model_key_bps > 0.0).then(|| secret_key_bps / model_key_bps),
        run,
        simulated: "simulated optics (source, fibre, detectors); real post-processing over loopback TCP",
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let r = &report.run;
        println!(
            "{} at {:.2} dB, Eve: {} (simulated optics; real post-processing over TCP)",
            report.preset, report.loss_db, report.eve
        );
        println!(
            "blocks: {} distilled, {} aborted{}",
            r.blocks_ok,
            r.blocks_aborted,
            if r.abort_reasons.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.abort_reasons.join("; "))
            }
        );
        println!(
            "sifted {} bits ({:.0}/block), QBER {:.3} %, leaked {} bits, f = {}",
            r.sifted_bits,
            r.sifted_bits_per_block,
            r.qber * 100.0,
            r.leaked_bits,
            report
                .efficiency_f
                .map(|f| format!("{f:.3}"))
                .unwrap_or_else(|| "-".into())
        );
        println!(
            "secret key: {} bits in {:.3} s of link time = {:.4e} bit/s; model {:.4e} bit/s{}",
            r.final_key_bits,
            report.link_seconds,
            report.secret_key_bps,
            report.model_key_bps,
            report
                .fraction_of_model
                .map(|f| format!(" ({:.1} % of the model)", f * 100.0))
                .unwrap_or_default()
        );
        println!(
            "keys identical at both ends: {}; authentication key used: {} bits; wall time {:.2} s",
            if r.keys_equal { "yes" } else { "NO" },
            r.auth_key_bits_used,
            r.wall_seconds
        );
    }
    if !report.run.keys_equal {
        bail!("Alice's and Bob's keys differ");
    }
    if report.run.blocks_ok == 0 {
        bail!("no key: every block aborted");
    }
    Ok(())
}
