//! `qkdnet link …`: key-rate models and the event simulator.

use clap::Subcommand;

/// Link subcommands.
#[derive(Debug, Subcommand)]
pub enum LinkCommand {}

/// Runs a link subcommand.
pub fn run(c: LinkCommand) -> anyhow::Result<()> {
    match c {}
}
