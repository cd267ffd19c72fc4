//! `qkdnet crypto …`: SM3 digests and SM4 encryption of files.

use clap::Subcommand;

/// Crypto subcommands.
#[derive(Debug, Subcommand)]
pub enum CryptoCommand {}

/// Runs a crypto subcommand.
pub fn run(c: CryptoCommand) -> anyhow::Result<()> {
    match c {}
}
