//! Command-line surface. One module per command group; each module owns its
//! argument structs (the single source of their help text) and its `run`.

use clap::{Parser, Subcommand};

pub mod call;
pub mod crypto;
pub mod demo;
pub mod gateway;
pub mod keyservice;
pub mod kme;
pub mod link;
pub mod media;
pub mod msg;
pub mod net;
pub mod node;
pub mod pki;
pub mod plan;
pub mod postproc;

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
    /// The main job: bring up a small QKD network on this machine, watch keys
    /// grow, move an SM4-GCM message with quantum keys, report, stop.
    ///
    /// Example: qkdnet demo
    Demo(demo::DemoArgs),
    /// A whole network on this machine: up, down, status.
    #[command(subcommand)]
    Net(net::NetCommand),
    /// Sealed files and live streams for another SAE with keys from the QKD network (ETSI 014).
    #[command(subcommand)]
    Msg(msg::MsgCommand),
    /// Plan a network before building it: a simulated day of key generation,
    /// relaying and demand over the key-rate models (no key is made).
    ///
    /// Example: qkdnet plan topologies/china-national.toml --duration 24h --plot plots/
    Plan(plan::PlanArgs),
    /// One trusted node: its QKD links, its KME, metrics.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// QKD links: key-rate models and the event simulator.
    #[command(subcommand)]
    Link(link::LinkCommand),
    /// Post-process two sifted-key files into identical secret keys (Alice and Bob over loopback TCP).
    ///
    /// Example: qkdnet postproc --alice a.txt --bob b.txt --reconciler cascade-opt --json
    Postproc(postproc::PostprocArgs),
    /// National commercial cryptography tools (SM3, SM4), for interoperability checks.
    #[command(subcommand)]
    Crypto(crypto::CryptoCommand),
    /// Key management entity: ETSI GS QKD 014 over mutual TLS.
    #[command(subcommand)]
    Kme(kme::KmeCommand),
    /// Certificates for KMEs and SAEs (mutual TLS).
    #[command(subcommand)]
    Pki(pki::PkiCommand),
    /// Quantum security media: files or PKCS#11 tokens charged with quantum keys for terminals.
    #[command(subcommand)]
    Media(media::MediaCommand),
    /// The key service of quantum security media: subscribers, session keys, charging.
    #[command(subcommand)]
    Keyservice(keyservice::KeyserviceCommand),
    /// Quantum secret calls: the SIP edge beside a softphone.
    #[command(subcommand)]
    Call(call::CallCommand),
    /// Quantum security gateway: an SM4-GCM site-to-site tunnel keyed from the QKD network.
    #[command(subcommand)]
    Gateway(gateway::GatewayCommand),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Net(c) => net::run(c),
        Command::Node(c) => node::run(c),
        Command::Msg(c) => msg::run(c),
        Command::Plan(a) => plan::run(a),
        Command::Link(c) => link::run(c),
        Command::Postproc(a) => postproc::run(a),
        Command::Crypto(c) => crypto::run(c),
        Command::Kme(c) => kme::run(c),
        Command::Pki(c) => pki::run(c),
        Command::Media(c) => media::run(c),
        Command::Keyservice(c) => keyservice::run(c),
        Command::Call(c) => call::run(c),
        Command::Gateway(c) => gateway::run(c),
    }
}
