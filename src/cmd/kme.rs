//! `qkdnet kme …`: run a standalone key management entity.
//!
//! `qkdnet kme serve --config FILE.toml` starts one KME: its SQLite store, the
//! ETSI GS QKD 014 API over mutual TLS for its SAEs, and the KME-to-KME API for
//! its peers (configuration format: the documentation of `qkdnet_kms::config`).
//! It runs until Ctrl-C or SIGTERM. Key material normally arrives from the QKD
//! link layer; a `[test_keys]` section (explicit only) injects seeded **test**
//! blocks instead, and this command says so loudly.
//!
//! `qkdnet kme master-key` creates the node master key its store is encrypted
//! under: a 0600 file (`--file`, or the configuration's `store_key`), or a
//! non-extractable key in a PKCS#11 token (explicit `--pkcs11-module …`
//! options, or the configuration's `[store_key_pkcs11]`). An existing key is
//! kept and checked, never replaced.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{ArgGroup, Subcommand};
use qkdnet_kms::config::{KmeConfig, MasterKeySource, launch};
use qkdnet_kms::store::pkcs11::Pkcs11KeyConfig;

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
    /// Create the node master key: a 0600 file of 32 random bytes, or a
    /// non-extractable, sensitive HMAC key generated inside a PKCS#11 token. An
    /// existing key is kept (and checked), never replaced.
    ///
    /// Examples: qkdnet kme master-key --config kme-a.toml ;
    /// qkdnet kme master-key --file master.key ;
    /// qkdnet kme master-key --pkcs11-module /usr/lib/softhsm/libsofthsm2.so
    /// --token-label qkdnet-kme-a --key-label qkdnet-master --pin-file hsm-user.pin
    #[command(group(ArgGroup::new("source").required(true).args(["config", "file", "pkcs11_module"])))]
    MasterKey {
        /// The key the KME configuration names (`store_key` or `[store_key_pkcs11]`).
        #[arg(long, value_name = "FILE.toml")]
        config: Option<PathBuf>,
        /// A master key file (created with mode 0600).
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// The PKCS#11 module (absolute path) of the token to create the key in.
        #[arg(long, value_name = "PATH", requires_all = ["token_label", "key_label"])]
        pkcs11_module: Option<PathBuf>,
        /// Label of the token (with --pkcs11-module).
        #[arg(long, value_name = "LABEL", requires = "pkcs11_module")]
        token_label: Option<String>,
        /// Label of the key in the token (with --pkcs11-module).
        #[arg(long, value_name = "LABEL", requires = "pkcs11_module")]
        key_label: Option<String>,
        /// File holding the token's user PIN, mode 0600 (with --pkcs11-module).
        #[arg(
            long,
            value_name = "FILE",
            requires = "pkcs11_module",
            conflicts_with = "pin_env"
        )]
        pin_file: Option<PathBuf>,
        /// Environment variable holding the token's user PIN (with --pkcs11-module).
        #[arg(long, value_name = "VAR", requires = "pkcs11_module")]
        pin_env: Option<String>,
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
        KmeCommand::MasterKey {
            config,
            file,
            pkcs11_module,
            token_label,
            key_label,
            pin_file,
            pin_env,
        } => {
            let source = match (config, file, pkcs11_module) {
                (Some(config), None, None) => KmeConfig::from_file(&config)?
                    .master_key_source()?
                    .with_context(|| {
                    format!(
                        "{} names no node master key: set store_key (a file) or \
                             [store_key_pkcs11] (a PKCS#11 token)",
                        config.display()
                    )
                })?,
                (None, Some(file), None) => MasterKeySource::File(file),
                (None, None, Some(module)) => {
                    let p = Pkcs11KeyConfig {
                        module,
                        token_label: token_label.unwrap_or_default(),
                        key_label: key_label.unwrap_or_default(),
                        pin_file,
                        pin_env,
                    };
                    p.check()?;
                    MasterKeySource::Pkcs11(p)
                }
                _ => bail!("give one of --config, --file and --pkcs11-module"),
            };
            println!("{}", source.create()?);
            Ok(())
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
