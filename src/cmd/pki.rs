//! `qkdnet pki …`: a CA and certificates for KMEs and SAEs.
//!
//! Mutual TLS is how a KME knows who is calling (ETSI GS QKD 014 identifies the SAE
//! by its client certificate), so a test network needs a CA and one certificate per
//! KME and SAE before anything can talk. The identity goes in a `kme:ID` / `sae:ID`
//! URI SAN; DNS/IP SANs cover the addresses KMEs listen on (by default
//! `localhost`, `127.0.0.1`, `::1`). The logic lives in `qkdnet_kms::pki`; this
//! module only parses arguments and prints paths. Private keys are written with
//! mode 0600 and existing files are never overwritten.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;
use qkdnet_kms::identity::Identity;
use qkdnet_kms::ids::{KmeId, SaeId};
use qkdnet_kms::pki::Ca;

/// PKI subcommands.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a CA in DIR (ca.pem, ca.key); refuses to overwrite an existing one.
    ///
    /// Example: qkdnet pki init pki
    Init {
        /// Directory for the CA (created if missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// Common name of the CA.
        #[arg(long, default_value = "qkdnet CA")]
        name: String,
    },
    /// Issue a certificate for a KME or an SAE, signed by the CA in --dir; writes
    /// kme-ID.pem/.key or sae-ID.pem/.key there.
    ///
    /// Example: qkdnet pki issue --dir pki --kme kme-a ; qkdnet pki issue --dir pki --sae alice
    Issue {
        /// Directory holding the CA.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Issue for this KME ID.
        #[arg(
            long,
            value_name = "ID",
            conflicts_with = "sae",
            required_unless_present = "sae"
        )]
        kme: Option<String>,
        /// Issue for this SAE ID.
        #[arg(long, value_name = "ID")]
        sae: Option<String>,
        /// DNS name or IP address to include (repeatable); default localhost, 127.0.0.1, ::1.
        #[arg(long = "san", value_name = "NAME|IP")]
        sans: Vec<String>,
    },
}

/// Runs a PKI subcommand.
pub fn run(cmd: PkiCommand) -> anyhow::Result<()> {
    match cmd {
        PkiCommand::Init { dir, name } => {
            Ca::init_dir(&dir, &name)
                .with_context(|| format!("creating a CA in {}", dir.display()))?;
            println!("{}", dir.join(qkdnet_kms::pki::CA_CERT_FILE).display());
            Ok(())
        }
        PkiCommand::Issue {
            dir,
            kme,
            sae,
            sans,
        } => {
            let subject = match (kme, sae) {
                (Some(k), None) => Identity::Kme(KmeId::new(&k)?),
                (None, Some(s)) => Identity::Sae(SaeId::new(&s)?),
                _ => bail!("give exactly one of --kme ID and --sae ID"),
            };
            let ca = Ca::load_dir(&dir)
                .with_context(|| format!("loading the CA of {}", dir.display()))?;
            let (cert, key) = ca.issue_to_dir(&dir, &subject, &sans)?;
            println!("{}\n{}", cert.display(), key.display());
            Ok(())
        }
    }
}
