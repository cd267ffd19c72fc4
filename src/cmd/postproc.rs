//! `qkdnet postproc`: offline post-processing of two sifted-key files, Alice and
//! Bob as two parties over loopback TCP, every message authenticated.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;

use qkdnet_link::block::ProtocolConfig;
use qkdnet_link::endpoint::{Endpoint, Event};
use qkdnet_link::msg::Reconciler;
use qkdnet_link::sifted;
use qkdnet_link::tcp::{BlockInput, Connection, drive_alice, drive_bob};
use qkdnet_optics::entropy::efficiency;
use qkdnet_postproc::bits::BitVec;

/// Arguments of `qkdnet postproc`.
#[derive(Debug, Args)]
pub struct PostprocArgs {
    /// Alice's sifted key (she reads only this file).
    #[arg(long)]
    alice: PathBuf,
    /// Bob's sifted key (he reads only this file).
    #[arg(long)]
    bob: PathBuf,
    /// Input format: bits (ASCII 0/1) or packed (see README).
    #[arg(long, default_value = "bits")]
    format: String,
    /// Reconciliation: cascade, cascade-opt or ldpc.
    #[arg(long, default_value = "cascade-opt")]
    reconciler: String,
    /// Use this QBER instead of disclosing a sample to estimate it.
    #[arg(long)]
    qber_hint: Option<f64>,
    /// Secrecy parameter ε_sec.
    #[arg(long, default_value_t = 1e-10)]
    eps_sec: f64,
    /// Correctness parameter ε_cor.
    #[arg(long, default_value_t = 1e-15)]
    eps_cor: f64,
    /// Bits per block (blocks are processed several at a time).
    #[arg(long, default_value_t = 1 << 20)]
    block: usize,
    /// Abort blocks whose estimated QBER is above this.
    #[arg(long, default_value_t = 0.11)]
    max_qber: f64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Write Alice's final key (raw bytes) here.
    #[arg(long)]
    out_alice: Option<PathBuf>,
    /// Write Bob's final key (raw bytes) here.
    #[arg(long)]
    out_bob: Option<PathBuf>,
}

/// Summary printed by `qkdnet postproc`.
#[derive(Debug, Serialize, Default)]
pub struct PostprocReport {
    input_bits: u64,
    blocks: u64,
    blocks_aborted: u64,
    abort_reasons: Vec<String>,
    qber: f64,
    disclosed_bits: u64,
    leaked_bits: u64,
    /// `None` (JSON null) where f is undefined: no key bits, or QBER 0.
    efficiency_f: Option<f64>,
    verified: bool,
    final_key_bits: u64,
    auth_key_bits_used: u64,
    net_key_bits: i64,
    seconds: f64,
    throughput_mbps: f64,
}

/// A fresh pre-shared authentication secret for a loopback pair (both parties
/// run under this command, so it is handed to both in memory).
pub fn fresh_preshared() -> anyhow::Result<Vec<u8>> {
    let mut k = vec![0u8; 64 * 1024];
    getrandom::fill(&mut k).map_err(|e| anyhow::anyhow!("OS random generator: {e}"))?;
    Ok(k)
}

/// Seeds the endpoints' generators from the OS.
pub fn os_seed() -> anyhow::Result<u64> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("OS random generator: {e}"))?;
    Ok(u64::from_le_bytes(b))
}

/// Connects two threads over 127.0.0.1 and runs `alice` and `bob` on them.
pub fn loopback_pair<A, B, RA, RB>(alice: A, bob: B) -> anyhow::Result<(RA, RB)>
where
    A: FnOnce(Connection) -> anyhow::Result<RA> + Send + 'static,
    B: FnOnce(Connection) -> anyhow::Result<RB> + Send + 'static,
    RA: Send + 'static,
    RB: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    let addr = listener.local_addr()?;
    let a = std::thread::spawn(move || -> anyhow::Result<RA> {
        let (s, _) = listener.accept()?;
        alice(Connection::new(s)?)
    });
    let b = std::thread::spawn(move || -> anyhow::Result<RB> {
        let s = TcpStream::connect(addr)?;
        bob(Connection::new(s)?)
    });
    let rb = b
        .join()
        .map_err(|_| anyhow::anyhow!("Bob's thread panicked"))?;
    let ra = a
        .join()
        .map_err(|_| anyhow::anyhow!("Alice's thread panicked"))?;
    Ok((ra?, rb?))
}

fn read_bits(path: &PathBuf, format: &str) -> anyhow::Result<BitVec> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    match format {
        "bits" => sifted::parse_ascii(&data),
        "packed" => sifted::parse_packed(&data),
        f => bail!("unknown --format '{f}' (bits or packed)"),
    }
    .with_context(|| format!("in {}", path.display()))
}

/// Collected outcome of one side.
#[derive(Default)]
pub struct SideResult {
    /// Final key bytes, in block order.
    pub key: Vec<u8>,
    /// Reports of blocks that gave key.
    pub reports: Vec<qkdnet_link::block::BlockReport>,
    /// Aborted blocks: (block, reason).
    pub aborted: Vec<(u64, String)>,
    /// Authentication key consumed.
    pub auth_bits: u64,
    /// Key bits returned to authentication.
    pub refill_bits: u64,
}

/// Appends a finished block's outcome (keys in block order).
pub fn collect(
    res: &mut SideResult,
    keys: &mut std::collections::BTreeMap<u64, Vec<u8>>,
    e: Event,
) {
    match e {
        Event::Key {
            key,
            report,
            auth_refill_bits,
        } => {
            let whole = (key.bits() / 8) as usize;
            keys.insert(report.block, key.expose()[..whole].to_vec());
            res.refill_bits += auth_refill_bits;
            res.reports.push(report);
        }
        Event::Aborted { block, reason, .. } => res.aborted.push((block, reason)),
    }
}

/// Runs `qkdnet postproc`.
pub fn run(a: PostprocArgs) -> anyhow::Result<()> {
    let reconciler = Reconciler::parse(&a.reconciler)?;
    if let Some(q) = a.qber_hint {
        if !(q > 0.0 && q < 0.5) {
            bail!("--qber-hint must be in (0, 0.5), got {q}");
        }
    }
    if a.block < 10_000 {
        bail!("--block must be at least 10000 bits");
    }
    // Each party reads only its own file, in its own thread.
    let cfg = ProtocolConfig {
        reconciler,
        eps_sec: a.eps_sec,
        eps_cor: a.eps_cor,
        qber_hint: a.qber_hint,
        max_qber: a.max_qber,
        ..Default::default()
    };
    let psk = fresh_preshared()?;
    let (fa, fb, fmt) = (a.alice.clone(), a.bob.clone(), a.format.clone());
    let fmt_b = fmt.clone();
    let (cfg_a, psk_a, block) = (cfg.clone(), psk.clone(), a.block);
    let (seed_a, seed_b) = (os_seed()?, os_seed()?);
    let start = Instant::now();
    let (ra, rb) = loopback_pair(
        move |mut conn| -> anyhow::Result<(SideResult, u64)> {
            let bits = read_bits(&fa, &fmt)?;
            let mut ep = Endpoint::alice(cfg_a, &psk_a, seed_a, None)?;
            let n = bits.len();
            for (i, s) in (0..n).step_by(block).enumerate() {
                ep.add_offline_block(i as u64, bits.slice(s, (s + block).min(n))?)?;
            }
            let mut res = SideResult::default();
            let mut keys = std::collections::BTreeMap::new();
            drive_alice(&mut conn, &mut ep, &mut |e| collect(&mut res, &mut keys, e))?;
            res.key = keys.into_values().flatten().collect();
            res.auth_bits = ep.auth_key_bits_used();
            Ok((res, n as u64))
        },
        move |mut conn| -> anyhow::Result<(SideResult, u64)> {
            let bits = read_bits(&fb, &fmt_b)?;
            let mut ep = Endpoint::bob(cfg, &psk, seed_b)?;
            let n = bits.len();
            let mut blocks = (0..n).step_by(block).enumerate().map(|(i, s)| {
                // Invariant: the range lies within the bit string.
                (
                    i as u64,
                    BlockInput::Offline(
                        bits.slice(s, (s + block).min(n))
                            .expect("range within input"),
                    ),
                )
            });
            let mut res = SideResult::default();
            let mut keys = std::collections::BTreeMap::new();
            drive_bob(&mut conn, &mut ep, &mut blocks, 8, &mut |e| {
                collect(&mut res, &mut keys, e)
            })?;
            res.key = keys.into_values().flatten().collect();
            res.auth_bits = ep.auth_key_bits_used();
            Ok((res, n as u64))
        },
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let ((alice, na), (bob, nb)) = (ra, rb);
    let mut rep = PostprocReport {
        input_bits: nb,
        seconds,
        ..Default::default()
    };
    if na != nb {
        rep.abort_reasons
            .push(format!("unequal lengths: Alice has {na} bits, Bob {nb}"));
    }
    rep.blocks = (bob.reports.len() + bob.aborted.len()) as u64;
    rep.blocks_aborted = bob.aborted.len() as u64;
    rep.abort_reasons
        .extend(bob.aborted.iter().map(|(b, r)| format!("block {b}: {r}")));
    let key_bits: u64 = bob.reports.iter().map(|r| r.input_bits).sum();
    let errors: f64 = bob
        .reports
        .iter()
        .map(|r| r.qber * r.input_bits as f64)
        .sum();
    rep.qber = if key_bits > 0 {
        errors / key_bits as f64
    } else {
        0.0
    };
    rep.disclosed_bits = bob.reports.iter().map(|r| r.disclosed_bits).sum();
    rep.leaked_bits = bob.reports.iter().map(|r| r.leaked_bits).sum();
    rep.efficiency_f = efficiency(rep.leaked_bits, key_bits, rep.qber);
    rep.verified =
        !bob.reports.is_empty() && bob.reports.iter().all(|r| r.verified) && alice.key == bob.key;
    rep.final_key_bits = 8 * bob.key.len() as u64;
    rep.auth_key_bits_used = bob.auth_bits;
    rep.net_key_bits = rep.final_key_bits as i64 - rep.auth_key_bits_used as i64;
    rep.throughput_mbps = nb as f64 / seconds / 1e6;
    if na != nb {
        bail!(
            "no key: unequal lengths: Alice's file holds {na} bits, Bob's {nb}; nothing was written"
        );
    }
    if alice.key != bob.key {
        bail!("internal error: the two final keys differ although verification passed");
    }
    for (path, key) in [(&a.out_alice, &alice.key), (&a.out_bob, &bob.key)] {
        if let Some(p) = path {
            std::fs::write(p, key).with_context(|| format!("writing {}", p.display()))?;
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "{} sifted bits in {} block(s), {} aborted",
            rep.input_bits, rep.blocks, rep.blocks_aborted
        );
        for r in &rep.abort_reasons {
            println!("  aborted: {r}");
        }
        println!(
            "QBER {:.3} %, disclosed {} bits for estimation, leaked {} bits in reconciliation (f = {})",
            rep.qber * 100.0,
            rep.disclosed_bits,
            rep.leaked_bits,
            rep.efficiency_f
                .map(|f| format!("{f:.3}"))
                .unwrap_or_else(|| "-".into())
        );
        println!(
            "verified: {}; final key {} bits; authentication used {} bits; net {} bits",
            rep.verified, rep.final_key_bits, rep.auth_key_bits_used, rep.net_key_bits
        );
        println!(
            "{:.3} s, {:.2} Mbit/s of sifted key",
            rep.seconds, rep.throughput_mbps
        );
    }
    if rep.final_key_bits == 0 {
        bail!(
            "no key: {}",
            rep.abort_reasons
                .first()
                .cloned()
                .unwrap_or_else(|| "every block aborted".into())
        );
    }
    Ok(())
}
