//! `qkdnet media init | status`: quantum security media (issue #20), the file
//! backend. A medium holds numbered quantum keys charged at a charging point and
//! spent one at a time by a terminal; see the `qkdnet-media` crate. Charging
//! over ETSI 014 and the key service are not built yet.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use qkdnet_crypto::SecretBytes;
use qkdnet_kms::store::pkcs11::PinSource;
use qkdnet_media::{FileMedium, Medium, MediumSpec};

/// Default environment variable holding a medium's PIN.
const PIN_ENV: &str = "QKDNET_MEDIA_PIN";

/// Where the PIN comes from (never the command line: it would show in `ps`).
#[derive(Debug, clap::Args)]
pub struct PinArgs {
    /// A file holding the PIN (mode 0600, one trailing newline ignored).
    #[arg(long, value_name = "FILE", conflicts_with = "pin_env")]
    pin_file: Option<PathBuf>,
    /// An environment variable holding the PIN.
    #[arg(long, value_name = "VAR", default_value = PIN_ENV)]
    pin_env: String,
}

impl PinArgs {
    fn read(&self) -> anyhow::Result<SecretBytes> {
        let source = match &self.pin_file {
            Some(f) => PinSource::File(f.clone()),
            None => PinSource::Env(self.pin_env.clone()),
        };
        let pin = source.read().map_err(|e| anyhow::anyhow!(e))?;
        Ok(SecretBytes::from_slice(&pin))
    }
}

/// Media subcommands.
#[derive(Debug, Subcommand)]
pub enum MediaCommand {
    /// Create an empty medium file for an owner (a SIP URI, a device ID).
    ///
    /// Example: QKDNET_MEDIA_PIN=… qkdnet media init --medium alice.medium --owner sip:alice@example.net
    Init {
        /// The medium file to create (refused if it exists).
        #[arg(long, value_name = "FILE")]
        medium: PathBuf,
        /// Who the medium belongs to.
        #[arg(long)]
        owner: String,
        /// Most unused keys it holds at once (256 bits each).
        #[arg(long, default_value_t = 130_000)]
        capacity: u64,
        #[command(flatten)]
        pin: PinArgs,
    },
    /// Keys remaining and charges of a medium (never a key).
    Status {
        /// The medium file.
        #[arg(long, value_name = "FILE")]
        medium: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pin: PinArgs,
    },
}

/// Runs a media subcommand.
pub fn run(c: MediaCommand) -> anyhow::Result<()> {
    match c {
        MediaCommand::Init {
            medium,
            owner,
            capacity,
            pin,
        } => {
            let pin = pin.read()?;
            let spec = MediumSpec::new(owner, capacity);
            let m = FileMedium::create(&medium, &spec, &pin)
                .with_context(|| format!("creating the medium {}", medium.display()))?;
            println!(
                "medium {} for {} created in {} (room for {} keys of 256 bits; empty until charged)",
                m.id(),
                m.owner(),
                medium.display(),
                m.capacity()
            );
            Ok(())
        }
        MediaCommand::Status { medium, json, pin } => {
            let pin = pin.read()?;
            let m = FileMedium::open(&medium, &pin)
                .with_context(|| format!("opening the medium {}", medium.display()))?;
            let st = m.status()?;
            let charges: Vec<serde_json::Value> = st
                .charges
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "charger": c.record.charger(),
                        "charged_at": c.record.charged_at(),
                        "keys": c.count,
                        "first": c.first,
                        "last": c.last,
                    })
                })
                .collect();
            if json {
                let v = serde_json::json!({
                    "id": st.id.to_string(),
                    "owner": st.owner,
                    "capacity": st.capacity,
                    "charged": st.charged,
                    "used": st.used,
                    "remaining": st.remaining,
                    "free": st.free,
                    "charges": charges,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!("medium    {}", st.id);
            println!("owner     {}", st.owner);
            println!(
                "keys      {} remaining of {} charged ({} used); room for {} more",
                st.remaining, st.charged, st.used, st.free
            );
            if st.charges.is_empty() {
                println!("charges   none yet: charge it at a charging point");
            }
            for c in &st.charges {
                println!(
                    "charge    {} keys (#{}–#{}) by {} at {} (Unix s)",
                    c.count,
                    c.first,
                    c.last,
                    c.record.charger(),
                    c.record.charged_at()
                );
            }
            Ok(())
        }
    }
}
