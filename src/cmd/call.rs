//! `qkdnet call edge`: quantum secret calls (issue #21). The edge runs beside
//! an unmodified softphone as its outbound SIP proxy and RTP relay; every call
//! it places or receives is keyed by the key service with the subscriber's
//! security medium. See the `qkdnet-call` crate.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Subcommand;
use qkdnet_call::edge::{Edge, EdgeConfig, Mode};

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
        } => {
            crate::cmd::node::init_logging();
            let m = medium.open(&pin.read()?)?;
            let cfg = EdgeConfig {
                listen,
                ua,
                domain,
                keyservice,
                mode: match mode {
                    ModeArg::Srtp => Mode::Srtp,
                    ModeArg::Sm4 => Mode::Sm4,
                },
                media_ip: listen.ip(),
                local_ip: ua.ip(),
                registrar,
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
