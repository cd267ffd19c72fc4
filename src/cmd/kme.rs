//! `qkdnet kme …`: run a standalone key management entity.
//!
//! `qkdnet kme serve --config FILE.toml` starts one KME: its SQLite store, the
//! ETSI GS QKD 014 API over mutual TLS for its SAEs, and the KME-to-KME API for
//! its peers (configuration format: the documentation of `qkdnet_kms::config`).
//! It runs until Ctrl-C or SIGTERM. Key material normally arrives from the QKD
//! link layer; a `[test_keys]` section (explicit only) injects seeded **test**
//! blocks instead, and this command says so loudly.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use qkdnet_kms::config::{KmeConfig, launch};

/// KME subcommands.
#[derive(Debug, Subcommand)]
pub enum KmeCommand {
    /// Serve a KME (ETSI GS QKD 014 over mutual TLS) until Ctrl-C or SIGTERM.
    ///
    /// Example: qkdnet kme serve --config kme-a.toml
    Serve {
        /// Configuration file (TOML); relative paths in it are relative to it.
        #[arg(long, value_name = "FILE.toml")]
        config: PathBuf,
    },
}

/// Runs a KME subcommand.
pub fn run(cmd: KmeCommand) -> anyhow::Result<()> {
    match cmd {
        KmeCommand::Serve { config } => {
            let cfg = KmeConfig::from_file(&config)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?;
            rt.block_on(serve(cfg))
        }
    }
}

async fn serve(cfg: KmeConfig) -> anyhow::Result<()> {
    if let Some(t) = &cfg.test_keys {
        eprintln!(
            "WARNING: [test_keys] is configured: injecting {} seeded TEST key blocks for peer {} (link {}). \
             This material is NOT SECRET; never use it to protect anything.",
            t.blocks,
            t.peer,
            t.link_id()
        );
    }
    let running = launch(&cfg, None)
        .await
        .with_context(|| format!("starting KME {}", cfg.kme_id))?;
    // One machine-readable line, so scripts and tests know when and where the KME listens.
    println!(
        "{}",
        serde_json::json!({
            "kme_id": cfg.kme_id.as_str(),
            "listen": running.server.local_addr().to_string(),
            "test_blocks_ingested": running.test_blocks_ingested,
        })
    );
    wait_for_signal().await;
    running.server.shutdown().await;
    running.kme.settle(std::time::Duration::from_secs(2)).await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
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
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
