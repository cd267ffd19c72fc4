//! `qkdnet msg …`: seal a file for another SAE with keys from the QKD network, and
//! open it; or send a live stream to another SAE over TCP, and listen for one.
//!
//! The sender's KME and the recipient's KME share the keys; the file or stream
//! carries only their IDs (format and guarantees: `qkdnet_apps::seal`,
//! `qkdnet_apps::stream`). Every command finds the SAE's KME and certificate in the
//! `connect.json` a network launcher writes. This module only parses arguments,
//! opens files and sockets and prints; the logic lives in `qkdnet-apps`.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use qkdnet_apps::seal::{DEFAULT_REKEY_BYTES, OpenOptions, Report, SealOptions};
use qkdnet_apps::stream::{
    self, Output, ReceiveOptions, SendOptions, SenderConfig, StreamReport, receive,
};
use qkdnet_apps::{KeyCache, Mode, open_with, seal};
use qkdnet_crypto::SecretKey;
use qkdnet_crypto::hybrid::{MLKEM_SEED_LEN, MlKemDecapsulationKey, MlKemEncapsulationKey};
use qkdnet_kms::client::EtsiClient;
use qkdnet_kms::connect::ConnectFile;
use qkdnet_kms::ids::SaeId;
use zeroize::Zeroizing;

/// `msg` subcommands.
#[derive(Debug, Subcommand)]
pub enum MsgCommand {
    /// Seal a file for another SAE with fresh QKD keys (only that SAE can open it).
    ///
    /// Example: qkdnet msg seal --connect state/connect.json --from alice --to bob --in report.pdf --out report.pdf.sealed
    Seal(SealArgs),
    /// Open a sealed file addressed to this SAE (its keys come from the SAE's key
    /// cache, or from its KME and are then kept in the cache for re-opening).
    ///
    /// Example: qkdnet msg open --connect state/connect.json --as bob --in report.pdf.sealed --out report.pdf
    Open(OpenArgs),
    /// Delete a sealed file's keys from this SAE's key cache (the file can then no
    /// longer be opened here), and expired entries.
    ///
    /// Example: qkdnet msg forget --connect state/connect.json --as bob --in report.pdf.sealed
    Forget(ForgetArgs),
    /// Send a live stream (standard input or a file) to another SAE over TCP: SM4-GCM
    /// frames under QKD keys, rekeyed as it runs; succeeds once the receiver confirms.
    ///
    /// Example: qkdnet msg send --connect state/connect.json --from alice --to bob --addr 127.0.0.1:7000 --in report.pdf
    Send(SendArgs),
    /// Listen for live streams addressed to this SAE and write their plaintext
    /// (standard output, or a file that appears only when the stream is complete).
    ///
    /// Example: qkdnet msg listen --connect state/connect.json --as bob --bind 127.0.0.1:7000 --out report.pdf --once
    Listen(ListenArgs),
    /// Generate an ML-KEM-768 key pair for `--mode hybrid` (private key file mode 0600).
    ///
    /// Example: qkdnet msg mlkem-keygen --key bob.mlkem --pub bob.mlkem.pub
    MlkemKeygen(KeygenArgs),
}

/// The sending SAE, its KME, and the recipient (`msg seal`, `msg send`).
#[derive(Debug, Args)]
pub struct SenderArgs {
    /// The connect file written by the network launcher.
    #[arg(long, value_name = "connect.json")]
    connect: PathBuf,
    /// The sending SAE (its certificate is used to ask its KME for keys).
    #[arg(long, value_name = "SAE")]
    from: String,
    /// The recipient SAE: the only one that can open the file or receive the stream.
    #[arg(long, value_name = "SAE")]
    to: String,
    /// Seconds allowed for each call to the KME (streams: also for the receiver's
    /// confirmation once everything is sent).
    #[arg(long, value_name = "S", default_value_t = 30)]
    timeout_secs: u64,
}

/// The receiving SAE and its KME (`msg open`, `msg listen`).
#[derive(Debug, Args)]
pub struct RecipientArgs {
    /// The connect file written by the network launcher.
    #[arg(long, value_name = "connect.json")]
    connect: PathBuf,
    /// The receiving SAE: the recipient named in the file or stream (its
    /// certificate is used to fetch the keys).
    #[arg(long = "as", value_name = "SAE")]
    as_sae: String,
    /// Seconds allowed for each call to the KME (streams: also for the sender's handshake).
    #[arg(long, value_name = "S", default_value_t = 30)]
    timeout_secs: u64,
}

/// Arguments of `msg seal`.
#[derive(Debug, Args)]
pub struct SealArgs {
    #[command(flatten)]
    sender: SenderArgs,
    /// File to seal.
    #[arg(long = "in", value_name = "FILE")]
    input: PathBuf,
    /// Sealed file to write (replaced only on success).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// qkd: SM4-GCM with SM4 keys derived from QKD keys; hybrid: also from an
    /// ML-KEM-768 exchange (needs --recipient-pk); otp: one-time pad + HMAC-SM3,
    /// for messages up to 64 KiB.
    #[arg(long, default_value = "qkd", value_name = "qkd|hybrid|otp")]
    mode: Mode,
    /// MiB of plaintext per QKD key (qkd and hybrid modes).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_REKEY_BYTES >> 20)]
    rekey_mib: u64,
    /// The recipient's ML-KEM-768 public key (hex, from `msg mlkem-keygen`), for --mode hybrid.
    #[arg(long, value_name = "FILE")]
    recipient_pk: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Where the recipient's key cache is (`msg open`, `msg forget`, `msg listen`).
#[derive(Debug, Args)]
pub struct KeyCacheArgs {
    /// The SAE's key cache: keys fetched for sealed files, encrypted under a key
    /// derived from the SAE's TLS private key [default: keycache/SAE next to the
    /// connect file].
    #[arg(long, value_name = "DIR")]
    key_cache: Option<PathBuf>,
}

/// Arguments of `msg open`.
#[derive(Debug, Args)]
pub struct OpenArgs {
    #[command(flatten)]
    recipient: RecipientArgs,
    #[command(flatten)]
    cache: KeyCacheArgs,
    /// How long the file's keys stay in the key cache for re-opening, counted from
    /// when they were fetched: a number with s, m, h or d (expired entries are
    /// deleted at every open).
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_duration)]
    keep: Duration,
    /// Delete the file's keys from the key cache once it has opened (after a
    /// failure they stay, so that an intact copy can still be opened).
    #[arg(long)]
    forget: bool,
    /// Sealed file.
    #[arg(long = "in", value_name = "FILE")]
    input: PathBuf,
    /// Where to write the plaintext (only once it is fully authenticated).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// This SAE's ML-KEM-768 private key (from `msg mlkem-keygen`), for hybrid files.
    #[arg(long, value_name = "FILE")]
    mlkem_key: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `msg forget`.
#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// The connect file written by the network launcher.
    #[arg(long, value_name = "connect.json")]
    connect: PathBuf,
    /// The SAE whose key cache to clean.
    #[arg(long = "as", value_name = "SAE")]
    as_sae: String,
    #[command(flatten)]
    cache: KeyCacheArgs,
    /// Sealed files whose keys to delete (repeatable; none: only delete expired entries).
    #[arg(long = "in", value_name = "FILE")]
    input: Vec<PathBuf>,
}

/// Arguments of `msg send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    #[command(flatten)]
    sender: SenderArgs,
    /// Where the receiver listens (`qkdnet msg listen --bind`).
    #[arg(long, value_name = "HOST:PORT")]
    addr: String,
    /// What to send: a file, or `-` for standard input (sent as it arrives).
    #[arg(long = "in", value_name = "FILE|-", default_value = "-")]
    input: PathBuf,
    /// qkd: SM4-GCM with SM4 keys derived from QKD keys (SM3-based KDF). Streams
    /// support qkd only: hybrid and otp need the whole message up front (`msg seal`).
    #[arg(long, default_value = "qkd", value_name = "qkd")]
    mode: Mode,
    /// Plaintext bytes per QKD key: after this many the sender takes a new key from
    /// its KME and announces its ID in an authenticated rekey frame.
    #[arg(long, value_name = "N", default_value_t = stream::DEFAULT_REKEY_BYTES)]
    rekey_bytes: u64,
    /// Also take a new key once the current one has protected data for S seconds
    /// (checked as data flows: an idle stream spends no keys).
    #[arg(long, value_name = "S")]
    rekey_seconds: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `msg listen`.
#[derive(Debug, Args)]
pub struct ListenArgs {
    #[command(flatten)]
    recipient: RecipientArgs,
    #[command(flatten)]
    cache: KeyCacheArgs,
    /// Address to listen on.
    #[arg(long, value_name = "HOST:PORT")]
    bind: String,
    /// Where to write the plaintext: `-` for standard output (each frame as soon as it
    /// authenticates), or a file (written only once the whole stream is authenticated;
    /// each stream replaces it).
    #[arg(long, value_name = "FILE|-", default_value = "-")]
    out: PathBuf,
    /// Accept streams only from this SAE (repeatable; by default from any SAE
    /// whose keys this SAE's KME delivers).
    #[arg(long = "from", value_name = "SAE")]
    senders: Vec<String>,
    /// Exit after the first stream that ends, with its result (otherwise keep
    /// listening and report failed streams on standard error). With `--out FILE`
    /// up to 16 streams are received at once, each bounded by the handshake
    /// timeout until its sender is authenticated; with `--out -` one at a time.
    #[arg(long)]
    once: bool,
    /// Print reports as JSON (on standard error when the plaintext goes to standard output).
    #[arg(long)]
    json: bool,
}

/// Arguments of `msg mlkem-keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Private key file to create (hex seed, mode 0600; never overwritten).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Public key file to create (hex).
    #[arg(long = "pub", value_name = "FILE")]
    public: PathBuf,
}

/// Runs a `msg` subcommand.
pub fn run(cmd: MsgCommand) -> anyhow::Result<()> {
    match cmd {
        MsgCommand::Seal(a) => {
            let opts = SealOptions {
                mode: a.mode,
                rekey_bytes: a
                    .rekey_mib
                    .checked_mul(1 << 20)
                    .filter(|&b| b > 0)
                    .context("--rekey-mib must be at least 1")?,
                recipient_mlkem: a.recipient_pk.as_deref().map(read_public_key).transpose()?,
                ..SealOptions::default()
            };
            let (client, f) = (a.sender.client()?, &a.sender);
            let rep = runtime()?
                .block_on(seal(&client, &f.from, &f.to, &a.input, &a.out, &opts))
                .with_context(|| format!("sealing {}", a.input.display()))?;
            print_report("sealed", &rep, &a.out, a.json)
        }
        MsgCommand::Open(a) => {
            let r = &a.recipient;
            let opts = OpenOptions {
                mlkem_key: a.mlkem_key.as_deref().map(read_private_key).transpose()?,
                key_cache: Some(key_cache(&r.connect, &r.as_sae, &a.cache, a.keep)?),
                forget_keys: a.forget,
            };
            let client = r.client()?;
            let rep = runtime()?
                .block_on(open_with(&client, &r.as_sae, &a.input, &a.out, &opts))
                .with_context(|| format!("opening {}", a.input.display()))?;
            for w in &rep.warnings {
                eprintln!("warning: {w}");
            }
            if a.json {
                let mut v = serde_json::to_value(&rep)?;
                v["output"] = serde_json::Value::String(a.out.display().to_string());
                println!("{v}");
                return Ok(());
            }
            print_report("opened", &rep.file, &a.out, false)?;
            let kept = match rep.keys_cached_until {
                Some(t) => format!(
                    "kept in the key cache until Unix time {t} for re-opening \
                     (qkdnet msg forget discards them)"
                ),
                None => "not kept".to_owned(),
            };
            println!(
                "keys: {} from the key cache, {} from the KME; {kept}",
                rep.keys_from_cache, rep.keys_from_kme
            );
            Ok(())
        }
        MsgCommand::Forget(a) => {
            let cache = key_cache(&a.connect, &a.as_sae, &a.cache, Duration::ZERO)?;
            let swept = cache.sweep(std::time::SystemTime::now());
            for w in &swept.warnings {
                eprintln!("warning: {w}");
            }
            let mut n = 0;
            for f in &a.input {
                n += qkdnet_apps::seal::forget_sealed(&cache, f)
                    .with_context(|| format!("forgetting the keys of {}", f.display()))?;
            }
            println!(
                "deleted {n} cached keys of {} file(s) and {} expired entries from {}",
                a.input.len(),
                swept.removed,
                cache.dir().display()
            );
            Ok(())
        }
        MsgCommand::Send(a) => send_stream(a),
        MsgCommand::Listen(a) => listen(a),
        MsgCommand::MlkemKeygen(a) => keygen(&a),
    }
}

/// The key cache of SAE `sae`: `--key-cache`, or `keycache/SAE` next to the
/// connect file; its key is derived from the SAE's TLS private key.
fn key_cache(
    connect: &Path,
    sae: &str,
    a: &KeyCacheArgs,
    lifetime: Duration,
) -> anyhow::Result<KeyCache> {
    let file = ConnectFile::load(connect)?;
    let entry = file.sae(sae)?;
    let dir = match &a.key_cache {
        Some(d) => d.clone(),
        None => KeyCache::default_dir(connect.parent().unwrap_or(Path::new(".")), sae),
    };
    Ok(KeyCache::with_tls_key_file(dir, sae, &entry.key, lifetime)?)
}

/// `90s`, `30m`, `12h`, `7d` (or a bare number of seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let mul: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is not a duration such as 90s, 30m, 12h or 7d"))
}

fn client(connect: &Path, sae: &str, timeout_secs: u64) -> anyhow::Result<EtsiClient> {
    let file = ConnectFile::load(connect)?;
    Ok(file.client(sae, Duration::from_secs(timeout_secs.max(1)))?)
}

impl SenderArgs {
    fn client(&self) -> anyhow::Result<EtsiClient> {
        client(&self.connect, &self.from, self.timeout_secs)
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs.max(1))
    }
}

impl RecipientArgs {
    fn client(&self) -> anyhow::Result<EtsiClient> {
        client(&self.connect, &self.as_sae, self.timeout_secs)
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs.max(1))
    }
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")
}

fn print_report(verb: &str, r: &Report, out: &Path, json: bool) -> anyhow::Result<()> {
    if json {
        let mut v = serde_json::to_value(r)?;
        v["output"] = serde_json::Value::String(out.display().to_string());
        println!("{v}");
    } else {
        println!(
            "{verb} {} ({} bytes, {} -> {}, mode {}): {} QKD keys, {} key bits consumed ({} used), \
             {} segments, {} chunks, {} sealed bytes",
            out.display(),
            r.plaintext_bytes,
            r.sender,
            r.recipient,
            r.mode,
            r.key_ids.len(),
            r.key_bits_consumed,
            r.key_bits_used,
            r.segments,
            r.chunks,
            r.sealed_bytes,
        );
    }
    Ok(())
}

fn is_stdio(p: &Path) -> bool {
    p.as_os_str() == "-"
}

fn send_stream(a: SendArgs) -> anyhow::Result<()> {
    let opts = SendOptions {
        mode: a.mode,
        sender: SenderConfig {
            rekey_bytes: a.rekey_bytes,
            rekey_interval: a.rekey_seconds.map(Duration::from_secs),
            ..SenderConfig::default()
        },
        ack_timeout: a.sender.timeout(),
        ..SendOptions::default()
    };
    let input: Box<dyn Read + Send> = if is_stdio(&a.input) {
        Box::new(std::io::stdin())
    } else {
        Box::new(
            std::fs::File::open(&a.input)
                .with_context(|| format!("cannot read {}", a.input.display()))?,
        )
    };
    let (client, f) = (a.sender.client()?, &a.sender);
    let rep = runtime()?.block_on(async {
        let to = || format!("streaming to {} at {}", f.to, a.addr);
        // Key supply first, so that no key is taken for a stream that cannot start.
        let ready = stream::prepare(&client, &f.from, &f.to, &opts)
            .await
            .with_context(to)?;
        let conn = tokio::net::TcpStream::connect(&a.addr)
            .await
            .with_context(|| format!("cannot connect to {}", a.addr))?;
        // Frames are written whole; do not hold small ones back.
        conn.set_nodelay(true).context("TCP_NODELAY")?;
        ready.send(input, conn).await.with_context(to)
    })?;
    let line = stream_report("sent", &rep, None, a.json)?;
    println!("{line}");
    Ok(())
}

/// How long `msg listen` keeps the keys of a stream that did not end (its
/// sender may still come back with the same handshake).
const STREAM_KEY_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Streams `msg listen` receives at once when writing to a file.
const MAX_PARALLEL_STREAMS: usize = 16;

fn listen(a: ListenArgs) -> anyhow::Result<()> {
    let output = if is_stdio(&a.out) {
        Output::Stdout
    } else {
        Output::File(a.out.clone())
    };
    // Reports go where the plaintext does not.
    let report = |line: String| match output {
        Output::Stdout => eprintln!("{line}"),
        Output::File(_) => println!("{line}"),
    };
    let opts = ReceiveOptions {
        handshake_timeout: a.recipient.timeout(),
        senders: a
            .senders
            .iter()
            .map(|s| SaeId::new(s).with_context(|| format!("--from {s:?}")))
            .collect::<anyhow::Result<_>>()?,
        // Keys of a stream stay here until it ends, so that a copied handshake
        // on a connection that never authenticates costs the real stream nothing.
        key_cache: Some(std::sync::Arc::new(key_cache(
            &a.recipient.connect,
            &a.recipient.as_sae,
            &a.cache,
            STREAM_KEY_LIFETIME,
        )?)),
    };
    let client = a.recipient.client()?;
    runtime()?.block_on(async {
        let l = tokio::net::TcpListener::bind(&a.bind)
            .await
            .with_context(|| format!("cannot listen on {}", a.bind))?;
        eprintln!(
            "listening on {} as SAE {}",
            l.local_addr().context("listening address")?,
            a.recipient.as_sae
        );
        // Streams to a file are received side by side, so that a connection
        // that stalls (or never authenticates) does not hold up the others;
        // standard output takes one stream at a time (two would interleave).
        let parallel = match output {
            Output::Stdout => 1,
            Output::File(_) => MAX_PARALLEL_STREAMS,
        };
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(parallel));
        let mut streams = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                acc = l.accept(), if permits.available_permits() > 0 => {
                    let (conn, peer) = acc.context("accepting a connection")?;
                    let _ = conn.set_nodelay(true);
                    let permit = permits.clone().acquire_owned().await?;
                    let (client, me, output, opts) =
                        (client.clone(), a.recipient.as_sae.clone(), output.clone(), opts.clone());
                    streams.spawn(async move {
                        let r = receive(&client, &me, conn, &output, &opts).await;
                        drop(permit);
                        (peer, r)
                    });
                }
                Some(done) = streams.join_next() => {
                    let (peer, r) = done.context("stream task")?;
                    match r {
                        Ok(rep) => {
                            report(stream_report("received", &rep, Some(peer), a.json)?);
                            if a.once {
                                return Ok(());
                            }
                        }
                        Err(e) => {
                            let e = anyhow::Error::new(e).context(format!("stream from {peer}"));
                            if a.once {
                                return Err(e);
                            }
                            eprintln!("error: {e:#}");
                        }
                    }
                }
            }
        }
    })
}

fn stream_report(
    verb: &str,
    r: &StreamReport,
    peer: Option<SocketAddr>,
    json: bool,
) -> anyhow::Result<String> {
    if json {
        let mut v = serde_json::to_value(r)?;
        if let Some(p) = peer {
            v["peer"] = serde_json::Value::String(p.to_string());
        }
        return Ok(v.to_string());
    }
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    Ok(format!(
        "{verb} {} bytes, {} -> {}{} (mode {}): {} QKD keys, {} key bits consumed, {} frames, \
         {} bytes on the wire",
        r.plaintext_bytes,
        r.sender,
        r.recipient,
        peer.map(|p| format!(" from {p}")).unwrap_or_default(),
        r.mode,
        r.key_ids.len(),
        r.key_bits_consumed,
        r.frames,
        r.wire_bytes,
    ))
}

fn read_hex(path: &Path, what: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {what} {}", path.display()))?,
    );
    hex::decode(text.trim())
        .map(Zeroizing::new)
        .map_err(|_| anyhow::anyhow!("{what} {} is not hex", path.display()))
}

fn read_public_key(path: &Path) -> anyhow::Result<MlKemEncapsulationKey> {
    let bytes = read_hex(path, "ML-KEM public key")?;
    MlKemEncapsulationKey::from_bytes(&bytes)
        .with_context(|| format!("ML-KEM-768 public key {}", path.display()))
}

fn read_private_key(path: &Path) -> anyhow::Result<MlKemDecapsulationKey> {
    let bytes = read_hex(path, "ML-KEM private key")?;
    let seed = SecretKey::<MLKEM_SEED_LEN>::from_slice(&bytes)
        .with_context(|| format!("ML-KEM-768 private key {}", path.display()))?;
    Ok(MlKemDecapsulationKey::from_seed(&seed))
}

fn keygen(a: &KeygenArgs) -> anyhow::Result<()> {
    use std::io::Write;
    for p in [&a.key, &a.public] {
        if p.exists() {
            bail!("{} exists; not overwriting it", p.display());
        }
    }
    let dk = MlKemDecapsulationKey::generate();
    let seed = Zeroizing::new(hex::encode(dk.to_seed().expose_secret()));
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o
        .open(&a.key)
        .with_context(|| format!("cannot create {}", a.key.display()))?;
    f.write_all(seed.as_bytes())
        .and_then(|()| f.write_all(b"\n"))
        .with_context(|| format!("writing {}", a.key.display()))?;
    let public = hex::encode(dk.encapsulation_key().to_bytes());
    std::fs::write(&a.public, format!("{public}\n"))
        .with_context(|| format!("writing {}", a.public.display()))?;
    println!(
        "wrote ML-KEM-768 private key {} and public key {}",
        a.key.display(),
        a.public.display()
    );
    Ok(())
}
