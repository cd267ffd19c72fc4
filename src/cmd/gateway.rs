//! `qkdnet gateway run`: the quantum security gateway (issue #22): an SM4-GCM
//! tunnel between two sites over TUN and UDP, keyed from the QKD network over
//! ETSI GS QKD 014. See the `qkdnet-gateway` crate.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use qkdnet_gateway::config::GatewayConfig;

/// Gateway subcommands.
#[derive(Debug, Subcommand)]
pub enum GatewayCommand {
    /// Run a gateway: creates its TUN device (needs root), then carries IP
    /// packets routed to it to the peer gateway under SM4-GCM, with keys from
    /// its KME. Route the far site's prefix to the TUN device yourself
    /// (`ip route add 10.2.0.0/24 dev qkd0`). Stops on Ctrl-C or SIGTERM.
    ///
    /// Example: qkdnet gateway run --config gw-a.toml
    Run {
        /// The gateway's TOML configuration (see the crate docs or README).
        #[arg(long)]
        config: PathBuf,
    },
    /// Keep a WireGuard peer's preshared key fed with QKD keys (wireguard-go,
    /// through its UAPI socket). The agent adds the peer itself, with its
    /// first preshared key, so no handshake completes without one; it rotates
    /// the key on schedule and removes the peer if keys stop (fail closed).
    ///
    /// Example: qkdnet gateway wg-agent --config wg-a.toml
    WgAgent {
        /// The agent's TOML configuration (see the README).
        #[arg(long)]
        config: PathBuf,
    },
}

/// Runs a gateway subcommand.
pub fn run(c: GatewayCommand) -> anyhow::Result<()> {
    match c {
        GatewayCommand::Run { config } => {
            crate::cmd::node::init_logging();
            let cfg = GatewayConfig::from_file(&config)?;
            let name = cfg.sae.clone();
            let stats = qkdnet_gateway::run::run(cfg, async {
                crate::cmd::node::shutdown_signal().await;
            })
            .with_context(|| format!("gateway {name}"))?;
            eprintln!("{}", stats.render(&name));
            Ok(())
        }
        GatewayCommand::WgAgent { config } => {
            crate::cmd::node::init_logging();
            let cfg = qkdnet_gateway::config::WgAgentConfig::from_file(&config)?;
            let name = cfg.sae.clone();
            qkdnet_gateway::wg::run(cfg, async {
                crate::cmd::node::shutdown_signal().await;
            })
            .with_context(|| format!("WireGuard agent {name}"))
        }
    }
}
