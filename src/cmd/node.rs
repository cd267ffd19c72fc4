//! `qkdnet node run --config NODE.toml`: one trusted node (its QKD links, its
//! KME and its management endpoint) until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;

/// Node subcommands.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Run a node: its QKD links (simulated optics, real post-processing over
    /// TCP), its KME (ETSI 014 over mutual TLS) and /health, /status, /metrics
    /// on the management port. `qkdnet net up` writes the configuration.
    ///
    /// Example: qkdnet node run --config STATE/nodes/core/node.toml
    Run {
        /// The node's configuration (TOML; format in the qkdnet-net `node` module docs).
        #[arg(long)]
        config: PathBuf,
    },
}

/// Logs to stderr at info level (`QKDNET_LOG=debug` for more); never logs key material.
pub fn init_logging() {
    let level = match std::env::var("QKDNET_LOG").as_deref() {
        Ok("debug") => tracing::Level::DEBUG,
        Ok("warn") => tracing::Level::WARN,
        Ok("error") => tracing::Level::ERROR,
        _ => tracing::Level::INFO,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs a node subcommand.
pub fn run(c: NodeCommand) -> anyhow::Result<()> {
    match c {
        NodeCommand::Run { config } => {
            init_logging();
            let cfg = qkdnet_net::node::NodeConfig::from_file(&config)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("tokio runtime")?;
            rt.block_on(qkdnet_net::node::run(cfg, shutdown_signal()))?;
            // Link threads may still be finishing a block; the store is
            // transactional, so leaving now loses nothing.
            rt.shutdown_timeout(std::time::Duration::from_millis(500));
            Ok(())
        }
    }
}
