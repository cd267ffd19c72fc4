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
    }
}
