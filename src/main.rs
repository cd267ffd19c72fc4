//! `qkdnet`: the management layer. Every subcommand parses its arguments,
//! calls the library crates and prints; business logic lives in the crates.

mod cmd;
mod plot;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cmd::Cli::parse();
    match cmd::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
