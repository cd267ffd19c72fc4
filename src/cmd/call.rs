//! `qkdnet call edge`: quantum secret calls (issue #21). The edge runs beside
//! an unmodified softphone as its outbound SIP proxy and RTP relay; every call
//! it places or receives is keyed by the key service with the subscriber's
//! security medium. See the `qkdnet-call` crate.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Subcommand;
use qkdnet_call::edge::{Edge, EdgeConfig, KmeLink, Mode};

use crate::cmd::media::{MediumArgs, PinArgs};

/// Call subcommands.
#[derive(Debug, Subcommand)]
pub enum CallCommand {
    /// Run the edge beside a softphone: its outbound proxy (`outbound=` in
    /// baresip) and media relay. Prints one JSON line per finished call.
    ///
    /// Example: QKDNET_MEDIA_PIN=… qkdnet call edge --medium alice.medium --listen 127.0.0.1:5080 --ua 127.0.0.1:15060 --keyservice 127.0.0.1:7700 --domain qkd.example
    Edge {
        #[command(flatten)]
        medium: MediumArgs,
        #[command(flatten)]
        pin: PinArgs,
        /// SIP (UDP) address for the softphone and for other edges.
        #[arg(long, default_value = "127.0.0.1:5080")]
        listen: SocketAddr,
        /// The softphone's SIP address (requests from it are its calls).
        #[arg(long)]
        ua: SocketAddr,
        /// The key service (host:port).
        #[arg(long, default_value = "127.0.0.1:7700")]
        keyservice: String,
        /// Domain of subscribers' identities: a call to USER@EDGE is keyed
        /// for sip:USER@DOMAIN.
        #[arg(long)]
        domain: String,
        /// A registrar/proxy (e.g. kamailio) for REGISTER and for calls to
        /// sip:USER@DOMAIN; without it, callers dial USER@EDGE-ADDRESS.
        #[arg(long, value_name = "ADDR")]
        registrar: Option<SocketAddr>,
        /// Media protection of the calls this edge places.
        #[arg(long, value_enum, default_value = "srtp")]
        mode: ModeArg,
        /// `otp` pad: connect.json of the QKD network this edge's SAE belongs
        /// to (needed to place or receive otp calls).
        #[arg(long, value_name = "FILE", requires = "sae")]
        connect: Option<std::path::PathBuf>,
        /// `otp` pad: this edge's SAE ID in that network.
        #[arg(long = "as", value_name = "SAE", requires = "connect")]
        sae: Option<String>,
        /// `otp` pad: keys per enc_keys request (one pad segment).
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=64))]
        otp_keys: u64,
        /// `sm4`: move the calls this edge places to a new session key from
        /// the key service this often, seconds (0: never).
        #[arg(long, default_value_t = 600)]
        rekey_seconds: u64,
        /// `otp` pad: bits per key (a multiple of 8, at most 8192).
        #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(128..=8192))]
        otp_key_bits: u64,
    },
}

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// The softphone's own SRTP (SDES, `mediaenc=srtp-mand` in baresip) with
    /// quantum-derived keys; the edge re-protects what its softphone sends.
    Srtp,
    /// SM4-GCM between the edges; the softphone sends plain RTP to its edge on loopback.
    Sm4,
    /// One-time pad of QKD keys from the edges' KMEs (both edges SAEs:
    /// --connect, --as) with a Wegman–Carter MAC; plain RTP on loopback.
    Otp,
}

/// Runs a call subcommand.
pub fn run(c: CallCommand) -> anyhow::Result<()> {
    match c {
        CallCommand::Edge {
            medium,
            pin,
            listen,
            ua,
            keyservice,
            domain,
            registrar,
            mode,
            connect,
            sae,
            otp_keys,
            otp_key_bits,
            rekey_seconds,
        } => {
            crate::cmd::node::init_logging();
            if otp_key_bits % 8 != 0 {
                anyhow::bail!("--otp-key-bits must be a multiple of 8");
            }
            if otp_keys * otp_key_bits / 8 < 4096 {
                anyhow::bail!(
                    "--otp-keys × --otp-key-bits must make a pad segment of at least 4096 bytes \
                     (a few dozen packets), not {} bytes",
                    otp_keys * otp_key_bits / 8
                );
            }
            let kme = match (connect, sae) {
                (Some(c), Some(sae)) => {
                    let file = qkdnet_etsi::connect::ConnectFile::load(&c)?;
                    let client = file
                        .client(&sae, std::time::Duration::from_secs(10))
                        .with_context(|| format!("SAE {sae} of {}", c.display()))?;
                    Some(KmeLink {
                        client: std::sync::Arc::new(client),
                        sae,
                        keys_per_fetch: otp_keys,
                        key_bits: otp_key_bits,
                    })
                }
                _ => None,
            };
            if mode == ModeArg::Otp && kme.is_none() {
                anyhow::bail!(
                    "--mode otp takes its pad from the QKD network: give --connect STATE/connect.json --as SAE"
                );
            }
            let m = medium.open(&pin.read()?)?;
            let cfg = EdgeConfig {
                listen,
                ua,
                domain,
                keyservice,
                mode: match mode {
                    ModeArg::Srtp => Mode::Srtp,
                    ModeArg::Sm4 => Mode::Sm4,
                    ModeArg::Otp => Mode::Otp,
                },
                media_ip: listen.ip(),
                local_ip: ua.ip(),
                registrar,
                kme,
                rekey: (rekey_seconds > 0).then(|| std::time::Duration::from_secs(rekey_seconds)),
            };
            crate::cmd::msg::runtime()?.block_on(async move {
                let edge = Edge::bind(
                    cfg,
                    m,
                    Box::new(|r| {
                        if let Ok(line) = serde_json::to_string(r) {
                            println!("{line}");
                        }
                    }),
                )
                .await
                .with_context(|| format!("binding {listen}"))?;
                eprintln!("call edge: SIP on {}, softphone at {ua}", edge.local_addr());
                tokio::select! {
                    r = edge.run() => r.context("the edge's SIP socket failed"),
                    _ = crate::cmd::node::shutdown_signal() => Ok(()),
                }
            })
        }
    }
}
