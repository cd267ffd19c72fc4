//! `qkdnet`: the management layer. Every subcommand parses its arguments,
//! calls the library crates and prints; business logic lives in the crates.

mod cmd;
mod plot;

use clap::Parser;

/// mimalloc instead of glibc's malloc: the KME's request path allocates many
/// short-lived buffers (TLS records, HTTP, JSON), and glibc's malloc took 17 % of
/// its CPU under load (`perf`, kme_bench at 64 SAEs); see BENCHMARKS.md, KME.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
