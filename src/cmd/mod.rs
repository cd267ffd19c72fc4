//! Command-line surface. One module per command group; each module owns its
//! argument structs (the single source of their help text) and its `run`.

use clap::{Parser, Subcommand};

pub mod crypto;
pub mod link;

/// qkdnet: a quantum-secure network stack. Optics are simulated from physical
/// parameters; everything classical is real.
#[derive(Debug, Parser)]
#[command(name = "qkdnet", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// QKD links: key-rate models and the event simulator.
    #[command(subcommand)]
    Link(link::LinkCommand),
    /// National commercial cryptography tools (SM3, SM4), for interoperability checks.
    #[command(subcommand)]
    Crypto(crypto::CryptoCommand),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Link(c) => link::run(c),
        Command::Crypto(c) => crypto::run(c),
    }
}
