//! `qkdnet msg …`: seal a file for another SAE with keys from the QKD network, and
//! open it.
//!
//! The sender's KME and the recipient's KME share the keys; the file carries only
//! their IDs (format and guarantees: `qkdnet_apps::seal`). Both commands find the
//! SAE's KME and certificate in the `connect.json` a network launcher writes. This
//! module only parses arguments, loads files and prints; the logic lives in
//! `qkdnet-apps`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use qkdnet_apps::seal::{DEFAULT_REKEY_BYTES, OpenOptions, Report, SealOptions};
use qkdnet_apps::{Mode, open_with, seal};
use qkdnet_crypto::SecretKey;
use qkdnet_crypto::hybrid::{MLKEM_SEED_LEN, MlKemDecapsulationKey, MlKemEncapsulationKey};
use qkdnet_kms::client::EtsiClient;
use qkdnet_kms::connect::ConnectFile;
use zeroize::Zeroizing;

/// `msg` subcommands.
#[derive(Debug, Subcommand)]
pub enum MsgCommand {
    /// Seal a file for another SAE with fresh QKD keys (only that SAE can open it, once).
    ///
    /// Example: qkdnet msg seal --connect state/connect.json --from alice --to bob --in report.pdf --out report.pdf.sealed
    Seal(SealArgs),
    /// Open a sealed file addressed to this SAE (fetches its keys from the SAE's KME).
    ///
    /// Example: qkdnet msg open --connect state/connect.json --as bob --in report.pdf.sealed --out report.pdf
    Open(OpenArgs),
    /// Generate an ML-KEM-768 key pair for `--mode hybrid` (private key file mode 0600).
    ///
    /// Example: qkdnet msg mlkem-keygen --key bob.mlkem --pub bob.mlkem.pub
    MlkemKeygen(KeygenArgs),
}

/// Arguments of `msg seal`.
#[derive(Debug, Args)]
pub struct SealArgs {
    /// The connect file written by the network launcher.
    #[arg(long, value_name = "connect.json")]
    connect: PathBuf,
    /// The sealing SAE (its certificate is used to ask its KME for keys).
    #[arg(long, value_name = "SAE")]
    from: String,
    /// The SAE that will be able to open the file.
    #[arg(long, value_name = "SAE")]
    to: String,
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
    /// Seconds allowed for each call to the KME.
    #[arg(long, value_name = "S", default_value_t = 30)]
    timeout_secs: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `msg open`.
#[derive(Debug, Args)]
pub struct OpenArgs {
    /// The connect file written by the network launcher.
    #[arg(long, value_name = "connect.json")]
    connect: PathBuf,
    /// The SAE opening the file (the recipient named in it).
    #[arg(long = "as", value_name = "SAE")]
    as_sae: String,
    /// Sealed file.
    #[arg(long = "in", value_name = "FILE")]
    input: PathBuf,
    /// Where to write the plaintext (only once it is fully authenticated).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// This SAE's ML-KEM-768 private key (from `msg mlkem-keygen`), for hybrid files.
    #[arg(long, value_name = "FILE")]
    mlkem_key: Option<PathBuf>,
    /// Seconds allowed for each call to the KME.
    #[arg(long, value_name = "S", default_value_t = 30)]
    timeout_secs: u64,
    /// Print the report as JSON.
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
            let client = client(&a.connect, &a.from, a.timeout_secs)?;
            let rep = runtime()?
                .block_on(seal(&client, &a.from, &a.to, &a.input, &a.out, &opts))
                .with_context(|| format!("sealing {}", a.input.display()))?;
            print_report("sealed", &rep, &a.out, a.json)
        }
        MsgCommand::Open(a) => {
            let opts = OpenOptions {
                mlkem_key: a.mlkem_key.as_deref().map(read_private_key).transpose()?,
            };
            let client = client(&a.connect, &a.as_sae, a.timeout_secs)?;
            let rep = runtime()?
                .block_on(open_with(&client, &a.as_sae, &a.input, &a.out, &opts))
                .with_context(|| format!("opening {}", a.input.display()))?;
            print_report("opened", &rep, &a.out, a.json)
        }
        MsgCommand::MlkemKeygen(a) => keygen(&a),
    }
}

fn client(connect: &Path, sae: &str, timeout_secs: u64) -> anyhow::Result<EtsiClient> {
    let file = ConnectFile::load(connect)?;
    Ok(file.client(sae, Duration::from_secs(timeout_secs.max(1)))?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
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
