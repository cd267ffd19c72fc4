//! `qkdnet media init | status | charge | session | revoke`: quantum security
//! media (issue #20), the file backend. A medium holds numbered quantum keys
//! charged at a charging point (an SAE of the QKD network, with the key service
//! as the other end of its ETSI 014 keys) and spent two at a time by a terminal
//! to get session keys from the key service; see the `qkdnet-media` and
//! `qkdnet-keyservice` crates.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use qkdnet_crypto::SecretBytes;
use qkdnet_keyservice::client::{Charger, Connection, Terminal};
use qkdnet_kms::connect::ConnectFile;
use qkdnet_kms::store::pkcs11::PinSource;
use qkdnet_media::proto::{Identity, KeySource};
use qkdnet_media::{FileMedium, Medium, MediumSpec, Pkcs11Medium};

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
    pub(crate) fn read(&self) -> anyhow::Result<SecretBytes> {
        let source = match &self.pin_file {
            Some(f) => PinSource::File(f.clone()),
            None => PinSource::Env(self.pin_env.clone()),
        };
        let pin = source.read().map_err(|e| anyhow::anyhow!(e))?;
        Ok(SecretBytes::from_slice(&pin))
    }
}

/// Which medium: a file, or a PKCS#11 token (smart card, secure element, HSM).
#[derive(Debug, clap::Args)]
pub struct MediumArgs {
    /// The medium file.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "token",
        conflicts_with = "token"
    )]
    medium: Option<PathBuf>,
    /// Or: the label of the PKCS#11 token holding the medium (its user PIN is the PIN).
    #[arg(long, value_name = "LABEL", requires = "module")]
    token: Option<String>,
    /// The token's PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long, value_name = "PATH")]
    module: Option<PathBuf>,
    /// Which medium of the token, if it holds several.
    #[arg(long, value_name = "ID", requires = "token")]
    medium_id: Option<uuid::Uuid>,
}

impl MediumArgs {
    fn name(&self) -> String {
        match (&self.medium, &self.token) {
            (Some(f), _) => f.display().to_string(),
            (None, Some(t)) => format!("token {t:?}"),
            (None, None) => "(no medium)".into(),
        }
    }

    fn token(&self) -> anyhow::Result<(&Path, &str)> {
        match (&self.module, &self.token) {
            (Some(m), Some(t)) => Ok((m, t)),
            _ => anyhow::bail!("give --medium FILE, or --token LABEL with --module PATH"),
        }
    }

    fn create(
        &self,
        spec: &MediumSpec,
        pin: &SecretBytes,
    ) -> anyhow::Result<Box<dyn Medium + Send>> {
        let what = || format!("creating the medium {}", self.name());
        Ok(match &self.medium {
            Some(f) => Box::new(FileMedium::create(f, spec, pin).with_context(what)?),
            None => {
                let (module, token) = self.token()?;
                Box::new(Pkcs11Medium::create(module, token, pin, spec).with_context(what)?)
            }
        })
    }

    pub(crate) fn open(&self, pin: &SecretBytes) -> anyhow::Result<Box<dyn Medium + Send>> {
        let what = || format!("opening the medium {}", self.name());
        Ok(match &self.medium {
            Some(f) => Box::new(FileMedium::open(f, pin).with_context(what)?),
            None => {
                let (module, token) = self.token()?;
                Box::new(Pkcs11Medium::open(module, token, pin, self.medium_id).with_context(what)?)
            }
        })
    }
}

/// Media subcommands.
#[derive(Debug, Subcommand)]
pub enum MediaCommand {
    /// Create an empty medium (a file, or in a PKCS#11 token) for an owner (a SIP URI, a device ID).
    ///
    /// Example: QKDNET_MEDIA_PIN=… qkdnet media init --medium alice.medium --owner sip:alice@example.net
    Init {
        #[command(flatten)]
        medium: MediumArgs,
        /// Who the medium belongs to.
        #[arg(long)]
        owner: String,
        /// Most unused keys it holds at once (256 bits each).
        #[arg(long, default_value_t = 130_000)]
        capacity: u64,
        #[command(flatten)]
        pin: PinArgs,
    },
    /// Charge a medium with keys from the QKD network at a charging point.
    ///
    /// Example: qkdnet media charge --connect STATE/connect.json --as sae-north --medium alice.medium --keys 1000 --service 127.0.0.1:7700 --service-sae sae-core
    Charge {
        /// The network's connect file.
        #[arg(long, value_name = "FILE")]
        connect: PathBuf,
        /// The charging point's SAE ID.
        #[arg(long = "as", value_name = "SAE")]
        as_sae: String,
        #[command(flatten)]
        medium: MediumArgs,
        /// Keys to charge (256 bits each).
        #[arg(long)]
        keys: u64,
        /// The key service (host:port).
        #[arg(long, value_name = "ADDR")]
        service: String,
        /// The key service's SAE ID.
        #[arg(long, value_name = "SAE")]
        service_sae: String,
        /// Keys per offer to the service (1..=256).
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Seconds to wait for key when the link has none before giving up.
        #[arg(long, default_value_t = 120)]
        wait: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pin: PinArgs,
    },
    /// As a terminal: open a session with a peer (--peer) or join one (--join),
    /// spending two keys of the medium; prints the session ID, the key's source
    /// and a fingerprint of the key (SM3, not the key).
    ///
    /// Example: qkdnet media session --medium alice.medium --service 127.0.0.1:7700 --peer sip:bob@example.net
    Session {
        #[command(flatten)]
        medium: MediumArgs,
        /// The key service (host:port).
        #[arg(long, value_name = "ADDR")]
        service: String,
        /// Open a session with this peer.
        #[arg(long, conflicts_with = "join", required_unless_present = "join")]
        peer: Option<String>,
        /// Session ID (32 hex digits) to open; random if not given.
        #[arg(long, value_name = "HEX", requires = "peer")]
        session: Option<String>,
        /// Join the session with this ID (32 hex digits).
        #[arg(long, value_name = "HEX")]
        join: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        pin: PinArgs,
    },
    /// At the key service: revoke a medium (lost, stolen, retired). Its keys
    /// there are destroyed; its owner can be charged a new medium.
    Revoke {
        #[command(flatten)]
        store: crate::cmd::keyservice::StoreArgs,
        /// The medium's ID.
        #[arg(long, value_name = "ID")]
        medium: uuid::Uuid,
        /// Why (for the audit trail).
        #[arg(long, default_value = "reported lost")]
        reason: String,
    },
    /// Keys remaining and charges of a medium (never a key).
    Status {
        #[command(flatten)]
        medium: MediumArgs,
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
            let m = medium.create(&spec, &pin)?;
            println!(
                "medium {} for {} created in {} (room for {} keys of 256 bits; empty until charged)",
                m.id(),
                m.owner(),
                medium.name(),
                m.capacity()
            );
            Ok(())
        }
        MediaCommand::Charge {
            connect,
            as_sae,
            medium,
            keys,
            service,
            service_sae,
            batch,
            wait,
            json,
            pin,
        } => charge(
            &ChargeArgs {
                connect,
                as_sae,
                service,
                service_sae,
                batch,
                wait,
                json,
            },
            &medium,
            keys,
            &pin,
        ),
        MediaCommand::Session {
            medium,
            service,
            peer,
            session,
            join,
            json,
            pin,
        } => session_cmd(&medium, &service, peer, session, join, json, &pin),
        MediaCommand::Revoke {
            store,
            medium,
            reason,
        } => {
            let r = store.open()?.revoke(&medium, &reason)?;
            println!(
                "medium {medium} of {} revoked ({reason}); {} unused keys destroyed at the key service",
                r.identity, r.destroyed
            );
            Ok(())
        }
        MediaCommand::Status { medium, json, pin } => {
            let pin = pin.read()?;
            let m = medium.open(&pin)?;
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

struct ChargeArgs {
    connect: PathBuf,
    as_sae: String,
    service: String,
    service_sae: String,
    batch: usize,
    wait: u64,
    json: bool,
}

fn charge(a: &ChargeArgs, medium: &MediumArgs, keys: u64, pin: &PinArgs) -> anyhow::Result<()> {
    let pin = pin.read()?;
    let mut m = medium.open(&pin)?;
    let client = ConnectFile::load(&a.connect)?.client(&a.as_sae, Duration::from_secs(30))?;
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(keys)
    };
    bar.set_style(
        ProgressStyle::with_template("charging {bar:30} {pos}/{len} keys  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let report = crate::cmd::msg::runtime()?.block_on(async {
        let mut conn = Connection::connect(&a.service, Duration::from_secs(30)).await?;
        Charger {
            kme: &client,
            charger_sae: &a.as_sae,
            service_sae: &a.service_sae,
            batch: a.batch,
            max_wait: Duration::from_secs(a.wait),
        }
        .charge(&mut conn, m.as_mut(), keys, |done| bar.set_position(done))
        .await
    });
    bar.finish_and_clear();
    let report = report.with_context(|| format!("charging {}", medium.name()))?;
    let rate = report.charged as f64 / report.seconds.max(1e-9);
    let st = m.status()?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"medium": st.id.to_string(), "charged": report.charged,
                "first_index": report.first_index, "seconds": report.seconds,
                "keys_per_second": rate, "remaining": st.remaining})
        );
    } else {
        println!(
            "charged {} keys into {} (#{}–#{}) in {:.1} s: {:.0} keys/s ({:.0} bit/s of QKD key); {} remaining",
            report.charged,
            st.id,
            report.first_index,
            report.first_index + report.charged.saturating_sub(1),
            report.seconds,
            rate,
            rate * 256.0,
            st.remaining
        );
    }
    Ok(())
}

fn parse_session(s: &str) -> anyhow::Result<[u8; 16]> {
    let b = hex::decode(s).map_err(|_| anyhow::anyhow!("{s:?} is not hex"))?;
    b.try_into()
        .map_err(|_| anyhow::anyhow!("a session ID is 32 hex digits (16 bytes)"))
}

fn session_cmd(
    medium: &MediumArgs,
    service: &str,
    peer: Option<String>,
    session: Option<String>,
    join: Option<String>,
    json: bool,
    pin: &PinArgs,
) -> anyhow::Result<()> {
    let pin = pin.read()?;
    let mut m = medium.open(&pin)?;
    let key = crate::cmd::msg::runtime()?.block_on(async {
        let mut conn = Connection::connect(service, Duration::from_secs(30)).await?;
        let mut t = Terminal::new(m.as_mut())?;
        match (peer, join) {
            (Some(p), _) => {
                let peer = Identity::new(p.clone()).map_err(|e| anyhow::anyhow!("{p:?}: {e}"))?;
                let sid = match session {
                    Some(s) => parse_session(&s)?,
                    None => {
                        let mut b = [0u8; 16];
                        getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("CSPRNG: {e}"))?;
                        b
                    }
                };
                anyhow::Ok(t.open(&mut conn, &peer, sid).await?)
            }
            (None, Some(j)) => Ok(t.join(&mut conn, parse_session(&j)?).await?),
            (None, None) => anyhow::bail!("give --peer or --join"),
        }
    })?;
    // Streamed into the hash: no unzeroized copy of the key.
    let mut h = qkdnet_crypto::sm3::Sm3Hasher::new();
    h.update(b"qkdnet/media/fingerprint/v1");
    h.update(key.key.expose_secret());
    let fp = h.finalize();
    let source = match key.source {
        KeySource::Qkd => "qkd",
        _ => "csprng",
    };
    let remaining = m.status()?.remaining;
    if json {
        println!(
            "{}",
            serde_json::json!({"session": hex::encode(key.session_id), "peer": key.peer.as_str(),
                "source": source, "fingerprint": hex::encode(&fp[..8]), "remaining": remaining})
        );
    } else {
        println!(
            "session {} with {}: 256-bit key from {}, fingerprint {} ({} keys left in the medium)",
            hex::encode(key.session_id),
            key.peer,
            if source == "qkd" {
                "the QKD network"
            } else {
                "the key service's CSPRNG"
            },
            hex::encode(&fp[..8]),
            remaining
        );
    }
    Ok(())
}
