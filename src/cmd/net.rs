//! `qkdnet net up | down | status`: a whole network on this machine, one
//! `qkdnet node` process per node on loopback.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use qkdnet_kms::tls::KeyExchange;
use qkdnet_net::launcher::{self, LaunchOptions, NetRecord, Prepared};
use qkdnet_net::node::{NodeStatus, Role};
use qkdnet_net::topology::{Topology, ValidTopology};

/// Network subcommands.
#[derive(Debug, Subcommand)]
pub enum NetCommand {
    /// Validate a topology, create its PKI, start one node process per node
    /// and show keys growing until Ctrl-C (which stops every node).
    ///
    /// Example: qkdnet net up topologies/demo.toml --dir state
    Up {
        /// Topology file (see topologies/).
        topology: PathBuf,
        /// State directory (PKI, key stores, logs, connect.json).
        #[arg(long, default_value = "qkdnet-state")]
        dir: PathBuf,
        /// First port of a contiguous range (3 per node); default: free ports chosen by the OS.
        #[arg(long)]
        base_port: Option<u16>,
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long, value_name = "SECONDS")]
        r#for: Option<f64>,
        /// Start the nodes, print where they are and return, leaving them running
        /// (stop them with `qkdnet net down`).
        #[arg(long, conflicts_with = "for")]
        detach: bool,
        /// Let SAEs connect to the KMEs with classical (non-post-quantum) TLS key
        /// exchange too, for clients whose TLS library has no X25519MLKEM768 yet
        /// (curl and Python on OpenSSL 3.0). Default: hybrid post-quantum only.
        #[arg(long)]
        allow_classical_tls: bool,
    },
    /// Stop the network started in DIR.
    Down {
        /// State directory.
        #[arg(long, default_value = "qkdnet-state")]
        dir: PathBuf,
    },
    /// Per link QBER, key rate and pool level of the network in DIR.
    Status {
        /// State directory.
        #[arg(long, default_value = "qkdnet-state")]
        dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a net subcommand.
pub fn run(c: NetCommand) -> anyhow::Result<()> {
    match c {
        NetCommand::Up {
            topology,
            dir,
            base_port,
            r#for,
            detach,
            allow_classical_tls,
        } => {
            let topo = Topology::from_file(&topology)?.validate()?;
            let opts = LaunchOptions {
                base_port,
                sae_key_exchange: if allow_classical_tls {
                    KeyExchange::AllowClassical
                } else {
                    KeyExchange::HybridOnly
                },
            };
            up(&topo, &dir, opts, r#for, detach)
        }
        NetCommand::Down { dir } => {
            let (n, killed) = launcher::down(&dir)?;
            println!("stopped {n} node process(es) in {}", dir.display());
            if !killed.is_empty() {
                println!("(had to kill: {})", killed.join(", "));
            }
            Ok(())
        }
        NetCommand::Status { dir, json } => status(&dir, json),
    }
}

/// Prints what is about to start.
pub fn describe(topo: &ValidTopology) {
    println!(
        "network '{}': {} nodes, {} SAEs, {} QKD links (simulated optics; real TCP, authentication, KMEs and TLS)",
        topo.meta.name,
        topo.nodes.len(),
        topo.saes.len(),
        topo.links.len()
    );
    for l in &topo.links {
        println!(
            "  {:<16} {:>8} -> {:<8} {:>6.1} km  {:<12} model {:>10.3e} bit/s",
            l.id, l.a, l.b, l.distance_km, l.preset, l.model_key_bps
        );
    }
}

/// Prepares the state directory and starts the nodes.
pub fn launch(
    topo: &ValidTopology,
    dir: &Path,
    opts: LaunchOptions,
) -> anyhow::Result<(Prepared, Vec<std::process::Child>)> {
    let mut prepared = launcher::prepare(topo, dir, opts)?;
    let exe = std::env::current_exe().context("locating the qkdnet executable")?;
    let children = launcher::start(&mut prepared, &exe, Duration::from_secs(30))?;
    Ok((prepared, children))
}

/// Live per-link progress, one bar per link (read from Alice's node); when
/// stdout is not a terminal (a pipe, a log file, CI), a plain line per link
/// every [`PLAIN_EVERY`] instead, as bars are not drawn there.
pub struct Progress {
    multi: MultiProgress,
    bars: Vec<(String, ProgressBar)>,
    plain: bool,
    started: Instant,
    seen: std::cell::RefCell<Seen>,
}

/// How often [`Progress`] prints plain lines.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// A link slower than this share of its `time_scale` is reported as one the
/// machine cannot keep up with (after [`SCALE_SETTLES`] of running).
const SLOW_SHARE: f64 = 0.5;
const SCALE_SETTLES: Duration = Duration::from_secs(20);

/// The live time scale is measured over this much wall time: link time
/// advances a block at a time, and a block can take seconds.
const SCALE_WINDOW: Duration = Duration::from_secs(30);

/// What [`Progress`] remembers between updates.
#[derive(Default)]
struct Seen {
    /// Per link: link seconds and when they were read, over the last
    /// [`SCALE_WINDOW`], for the live scale.
    last: std::collections::HashMap<String, std::collections::VecDeque<(f64, Instant)>>,
    /// Per link: link seconds per wall second over the last interval.
    live: std::collections::HashMap<String, f64>,
    last_plain: Option<Instant>,
    warned: bool,
}

impl Progress {
    /// Bars for the links of `topo`.
    pub fn new(topo: &ValidTopology) -> Progress {
        use std::io::IsTerminal;
        let plain = !std::io::stdout().is_terminal();
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template("{spinner} {prefix:<16} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        let bars = topo
            .links
            .iter()
            .map(|l| {
                let b = multi.add(ProgressBar::new_spinner());
                b.set_style(style.clone());
                b.set_prefix(l.id.clone());
                b.set_message("connecting");
                (l.id.clone(), b)
            })
            .collect();
        Progress {
            multi,
            bars,
            plain,
            started: Instant::now(),
            seen: Default::default(),
        }
    }

    /// Updates the bars (or prints plain lines) from the nodes' status.
    pub fn update(&self, statuses: &[(String, Result<NodeStatus, String>)]) {
        let now = Instant::now();
        let Ok(mut seen) = self.seen.try_borrow_mut() else {
            return;
        };
        let print_plain = self.plain
            && seen
                .last_plain
                .is_none_or(|t| now.duration_since(t) >= PLAIN_EVERY);
        if print_plain {
            seen.last_plain = Some(now);
        }
        let mut slow = Vec::new();
        for (id, bar) in &self.bars {
            let found = statuses.iter().find_map(|(_, s)| {
                s.as_ref()
                    .ok()?
                    .links
                    .iter()
                    .find(|l| &l.id == id && l.role == Role::Alice)
                    .cloned()
            });
            let Some(l) = found else {
                bar.set_message("no status");
                if print_plain {
                    println!("[{:>5.0} s] {id:<16} no status", self.elapsed(now));
                }
                continue;
            };
            // The live time scale: link seconds per wall second over the
            // last SCALE_WINDOW (or since the first reading).
            let samples = seen.last.entry(id.clone()).or_default();
            samples.push_back((l.link_seconds, now));
            while samples.len() > 2 && now.duration_since(samples[1].1) >= SCALE_WINDOW {
                samples.pop_front();
            }
            let rate = match (samples.front(), samples.back()) {
                (Some(a), Some(b)) if b.1.duration_since(a.1) >= Duration::from_secs(1) => {
                    Some(((b.0 - a.0) / b.1.duration_since(a.1).as_secs_f64()).max(0.0))
                }
                _ => None,
            };
            if let Some(rate) = rate {
                seen.live.insert(id.clone(), rate);
            }
            let live = seen.live.get(id).copied();
            if let Some(rate) = live
                && l.time_scale > 0.0
                && rate < SLOW_SHARE * l.time_scale
                && now.duration_since(self.started) >= SCALE_SETTLES
            {
                slow.push((id.clone(), rate, l.time_scale));
            }
            let line = format!(
                "{}  QBER {:>5.2} %  secret {:>9} bits  {:>9.3e} bit/s (model {:.3e})  pool {} units  time ×{}",
                if l.up { "up  " } else { "down" },
                l.qber * 100.0,
                l.secret_bits,
                l.key_rate_bps,
                l.model_key_bps,
                l.pool_units,
                live.map_or_else(|| "?".to_owned(), scale_text)
            );
            if print_plain {
                println!("[{:>5.0} s] {id:<16} {line}", self.elapsed(now));
            }
            bar.set_message(line);
            bar.tick();
        }
        if !slow.is_empty() && !seen.warned {
            seen.warned = true;
            let msg = slow_warning(&slow);
            if self.plain {
                println!("{msg}");
            } else {
                let _ = self.multi.println(msg);
            }
        }
    }

    fn elapsed(&self, now: Instant) -> f64 {
        now.duration_since(self.started).as_secs_f64()
    }

    /// Removes the bars.
    pub fn finish(&self) {
        for (_, b) in &self.bars {
            b.finish_and_clear();
        }
        let _ = self.multi.clear();
    }
}

/// A time scale with enough digits to tell a slow link from a stopped one.
fn scale_text(r: f64) -> String {
    if r <= 0.0 || !r.is_finite() {
        return "0".to_owned();
    }
    let decimals = if r >= 0.1 {
        2
    } else {
        (2 - r.log10().floor() as i32).clamp(2, 6) as usize
    };
    format!("{r:.decimals$}")
}

/// The warning for links (ID, link seconds per wall second, `time_scale`)
/// that run slower than their topology asks.
fn slow_warning(slow: &[(String, f64, f64)]) -> String {
    let worst = slow.iter().map(|s| s.1 / s.2).fold(f64::INFINITY, f64::min);
    let names: Vec<&str> = slow.iter().take(6).map(|s| s.0.as_str()).collect();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    format!(
        "warning: this machine cannot keep up with the topology's time_scale: {} link(s) ({}{}) \
         run at as little as {}× of it ({cores} CPU cores; every link simulates its optics in real \
         time on a CPU share). Key per link second is as modelled; per wall second it is that much \
         lower. Fewer links, or a smaller time_scale, run closer to it.",
        slow.len(),
        names.join(", "),
        if slow.len() > names.len() {
            ", …"
        } else {
            ""
        },
        scale_text(worst)
    )
}

fn up(
    topo: &ValidTopology,
    dir: &Path,
    opts: LaunchOptions,
    for_s: Option<f64>,
    detach: bool,
) -> anyhow::Result<()> {
    describe(topo);
    let classical = opts.sae_key_exchange == KeyExchange::AllowClassical;
    let (prepared, mut children) = launch(topo, dir, opts)?;
    let d = prepared.dir.display();
    println!("state: {d}  (applications: {d}/connect.json)");
    for n in &prepared.record.nodes {
        println!(
            "  node {:<10} pid {:<7} KME {}  metrics http://{}/metrics",
            n.id, n.pid, n.kme_url, n.mgmt
        );
    }
    // A ready-to-paste ETSI 014 call: the first SAE asks for the status of its
    // keys with an SAE on another node.
    let first_pair = topo.saes.iter().find_map(|(a, na)| {
        let (b, _) = topo.saes.iter().find(|(_, nb)| *nb != na)?;
        let node = prepared.record.nodes.iter().find(|n| n.id == na.as_str())?;
        Some((a, b, node))
    });
    if let Some((a, b, node)) = first_pair {
        println!(
            "try ETSI 014{}:\n  curl --cacert {d}/pki/ca.pem --cert {d}/pki/saes/{a}.pem --key {d}/pki/saes/{a}.key \\\n       \"{}/api/v1/keys/{b}/status\"",
            if classical {
                ""
            } else {
                " (curl with OpenSSL 3.0 has no ML-KEM: start with --allow-classical-tls for it)"
            },
            node.kme_url
        );
    }
    if detach {
        println!("nodes left running; stop them with: qkdnet net down --dir {d}");
        return Ok(());
    }
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupted.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    rt.spawn(async move {
        super::node::shutdown_signal().await;
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let progress = Progress::new(topo);
    let t0 = Instant::now();
    while !interrupted.load(std::sync::atomic::Ordering::SeqCst)
        && for_s.is_none_or(|s| t0.elapsed().as_secs_f64() < s)
    {
        progress.update(&launcher::status(&prepared.record));
        if prepared.record.running().len() < prepared.record.nodes.len() {
            progress.finish();
            let dead: Vec<_> = prepared
                .record
                .nodes
                .iter()
                .filter(|n| !launcher::alive(n.pid))
                .map(|n| n.id.clone())
                .collect();
            launcher::stop_all(&prepared.record, &mut children, Duration::from_secs(5));
            anyhow::bail!(
                "node(s) {} stopped unexpectedly; see their node.log",
                dead.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    progress.finish();
    print_status(&launcher::status(&prepared.record));
    let killed = launcher::stop_all(&prepared.record, &mut children, Duration::from_secs(5));
    println!(
        "network stopped{}",
        if killed.is_empty() {
            String::new()
        } else {
            format!(" (killed: {})", killed.join(", "))
        }
    );
    Ok(())
}

/// Prints a status table.
pub fn print_status(statuses: &[(String, Result<NodeStatus, String>)]) {
    println!(
        "{:<10} {:<16} {:>5} {:>4} {:>8} {:>7} {:>11} {:>10} {:>7} {:>11} {:>11} {:>10}",
        "node",
        "link",
        "role",
        "up",
        "QBER %",
        "blocks",
        "secret bits",
        "link s",
        "time ×",
        "bit/s",
        "model",
        "pool(256b)"
    );
    let mut slow = Vec::new();
    for (node, s) in statuses {
        match s {
            Ok(st) => {
                for l in &st.links {
                    if l.time_scale > 0.0
                        && st.uptime_s >= SCALE_SETTLES.as_secs_f64()
                        && l.time_scale_effective < SLOW_SHARE * l.time_scale
                        && !slow.iter().any(|s: &(String, f64, f64)| s.0 == l.id)
                    {
                        slow.push((l.id.clone(), l.time_scale_effective, l.time_scale));
                    }
                    println!(
                        "{:<10} {:<16} {:>5} {:>4} {:>8.3} {:>7} {:>11} {:>10.3} {:>7} {:>11.3e} {:>11.3e} {:>10}",
                        node,
                        l.id,
                        match l.role {
                            Role::Alice => "alice",
                            Role::Bob => "bob",
                        },
                        if l.up { "yes" } else { "no" },
                        l.qber_mean * 100.0,
                        l.blocks_ok,
                        l.secret_bits,
                        l.link_seconds,
                        scale_text(l.time_scale_effective),
                        l.key_rate_bps,
                        l.model_key_bps,
                        l.pool_units
                    );
                }
            }
            Err(e) => println!("{node:<10} not answering: {e}"),
        }
    }
    if !slow.is_empty() {
        println!("{}", slow_warning(&slow));
    }
    // The KMEs: what applications asked for, and the relays through each node.
    println!(
        "\n{:<10} {:>8} {:>8} {:>10} {:>7} {:>11} {:>10} {:>10} {:>8}",
        "kme", "enc", "dec", "delivered", "errors", "relayed", "forwarded", "ended", "failed"
    );
    for (node, s) in statuses {
        if let Ok(st) = s {
            let k = &st.kme;
            println!(
                "{:<10} {:>8} {:>8} {:>10} {:>7} {:>11} {:>10} {:>10} {:>8}",
                node,
                k.enc_requests,
                k.dec_requests,
                k.keys_delivered,
                k.errors,
                k.relay_requests,
                k.relay_forwarded,
                k.relay_delivered,
                k.relay_failures
            );
        }
    }
}

fn status(dir: &Path, json: bool) -> anyhow::Result<()> {
    let record = NetRecord::load(dir)?;
    if record.running().is_empty() {
        anyhow::bail!(
            "the network in {} is not running (no node process is alive); start it with `qkdnet net up TOPOLOGY --dir {}`",
            dir.display(),
            dir.display()
        );
    }
    let st = launcher::status(&record);
    if json {
        let v: Vec<_> = st
            .iter()
            .map(|(n, s)| match s {
                Ok(s) => serde_json::to_value(s).unwrap_or_default(),
                Err(e) => serde_json::json!({"node": n, "error": e}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_status(&st);
    }
    Ok(())
}
