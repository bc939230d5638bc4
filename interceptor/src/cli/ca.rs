//! `interceptor ca`.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Subcommand;

use crate::identity::{Ca, Identity};

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
    /// Issue a workload certificate from the mesh CA and write it as PEM files: the chain
    /// (leaf, then the CA certificate) and the leaf's PKCS#8 private key. Tools outside the
    /// mesh (a TLS tunnel, a test client) can then present the same kind of certificate an
    /// agent presents for that workload.
    Issue {
        /// Directory of the mesh CA made by `interceptor ca init`.
        #[arg(long)]
        dir: PathBuf,
        /// Kubernetes namespace of the workload.
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Service account of the workload (the last part of its SPIFFE identity).
        #[arg(long)]
        service_account: String,
        /// Hours the certificate stays valid.
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=8760))]
        validity_hours: u64,
        /// Where to write the certificate chain (PEM); an existing file is never overwritten.
        #[arg(long)]
        cert_out: PathBuf,
        /// Where to write the private key (PEM, mode 0600); an existing file is never
        /// overwritten.
        #[arg(long)]
        key_out: PathBuf,
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
        CaCommand::Issue {
            dir,
            namespace,
            service_account,
            validity_hours,
            cert_out,
            key_out,
        } => {
            let ca = Ca::load(&dir)?;
            let identity = Identity::new(ca.trust_domain(), &namespace, &service_account)
                .context("--namespace/--service-account")?;
            let cert = ca.issue(&identity, Duration::from_secs(validity_hours * 3600))?;
            cert.write_pem(&cert_out, &key_out)
                .context("--cert-out/--key-out")?;
            println!(
                "issued {identity} to {} (key {})",
                cert_out.display(),
                key_out.display()
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_pem_parses_back_and_is_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("icpt-ca-issue-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Ca::init(&dir, "cluster.local").unwrap();
        let issue = || {
            run(CaCommand::Issue {
                dir: dir.clone(),
                namespace: "default".into(),
                service_account: "sleep".into(),
                validity_hours: 1,
                cert_out: dir.join("sleep.pem"),
                key_out: dir.join("sleep-key.pem"),
            })
        };
        issue().unwrap();
        let chain: Vec<_> =
            rustls_pemfile::certs(&mut &std::fs::read(dir.join("sleep.pem")).unwrap()[..])
                .collect::<Result<_, _>>()
                .unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(
            Identity::from_certificate(&chain[0]).unwrap().to_string(),
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        let key = std::fs::read(dir.join("sleep-key.pem")).unwrap();
        assert!(
            rustls_pemfile::private_key(&mut &key[..])
                .unwrap()
                .is_some()
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("sleep-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let error = format!("{:#}", issue().unwrap_err());
        assert!(error.contains("--cert-out"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
