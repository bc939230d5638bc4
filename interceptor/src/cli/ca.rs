//! `interceptor ca`.

use std::path::PathBuf;

use clap::Subcommand;

use crate::identity::Ca;

/// Mesh CA commands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create the mesh CA (ca.pem, ca-key.pem) in a new directory. Agents load it with
    /// --ca-dir and issue each workload a SPIFFE certificate from it.
    Init {
        /// Directory to create the CA in; an existing CA there is never overwritten.
        #[arg(long)]
        dir: PathBuf,
        /// The mesh's trust domain, the host part of every SPIFFE identity.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

/// Runs a CA command.
pub fn run(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init { dir, trust_domain } => {
            let ca = Ca::init(&dir, &trust_domain)?;
            println!(
                "mesh CA for trust domain {} created in {}",
                ca.trust_domain(),
                dir.display()
            );
            Ok(())
        }
    }
}
