//! `interceptor ca`.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Subcommand;

use crate::identity::{Ca, Identity, TRUST_BUNDLE_FILE};

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
    /// Start rotating the mesh CA: create a new CA for the same trust domain in --new-dir,
    /// and make both directories trust both CAs (trust-bundle.pem). Then restart every agent
    /// on the old directory (they sign with the old CA and trust both), then on the new one
    /// (they sign with the new CA), then run `ca finish-rotation`. No connection is refused
    /// on the way: at every step each agent trusts the CA of every other.
    Rotate {
        /// Directory of the CA in use.
        #[arg(long)]
        dir: PathBuf,
        /// Directory to create the new CA in; an existing CA there is never overwritten.
        #[arg(long)]
        new_dir: PathBuf,
    },
    /// End a rotation once every agent signs with the new CA: it trusts only itself again
    /// (its trust-bundle.pem is removed). Restart the agents once more afterwards.
    FinishRotation {
        /// Directory of the new CA.
        #[arg(long)]
        dir: PathBuf,
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
        CaCommand::Rotate { dir, new_dir } => {
            let old = Ca::load(&dir).context("--dir")?;
            let new = Ca::init(&new_dir, old.trust_domain()).context("--new-dir")?;
            let both = vec![old.root_der().clone(), new.root_der().clone()];
            new.write_trust_bundle(&new_dir, both.clone())?;
            old.write_trust_bundle(&dir, both)?;
            println!(
                "new mesh CA for trust domain {} created in {}; both directories now trust both CAs ({TRUST_BUNDLE_FILE})",
                new.trust_domain(),
                new_dir.display()
            );
            println!(
                "next: restart every agent on {}, then every agent on {}, then run `interceptor ca finish-rotation --dir {}`",
                dir.display(),
                new_dir.display(),
                new_dir.display()
            );
            Ok(())
        }
        CaCommand::FinishRotation { dir } => {
            let ca = Ca::load(&dir).context("--dir")?;
            let bundle = dir.join(TRUST_BUNDLE_FILE);
            match std::fs::remove_file(&bundle) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    anyhow::bail!(
                        "{} has no {TRUST_BUNDLE_FILE}: no rotation to finish",
                        dir.display()
                    )
                }
                Err(e) => return Err(e).with_context(|| format!("removing {}", bundle.display())),
            }
            println!(
                "the CA in {} trusts only itself again (trust domain {}); restart every agent",
                dir.display(),
                ca.trust_domain()
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

    #[test]
    fn rotation_trusts_both_cas_then_only_the_new_one() {
        let base = std::env::temp_dir().join(format!("icpt-ca-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (old_dir, new_dir) = (base.join("old"), base.join("new"));
        let old = Ca::init(&old_dir, "cluster.local").unwrap();
        run(CaCommand::Rotate {
            dir: old_dir.clone(),
            new_dir: new_dir.clone(),
        })
        .unwrap();
        let (old_loaded, new) = (Ca::load(&old_dir).unwrap(), Ca::load(&new_dir).unwrap());
        assert_eq!(
            old_loaded.root_der(),
            old.root_der(),
            "the old CA still signs"
        );
        assert_ne!(new.root_der(), old.root_der());
        for ca in [&old_loaded, &new] {
            let roots = ca.trust_bundle().roots();
            assert!(roots.contains(old.root_der()) && roots.contains(new.root_der()));
        }
        // A second rotation into the same directory never overwrites the new CA.
        let again = run(CaCommand::Rotate {
            dir: old_dir.clone(),
            new_dir: new_dir.clone(),
        });
        assert!(format!("{:#}", again.unwrap_err()).contains("--new-dir"));

        run(CaCommand::FinishRotation {
            dir: new_dir.clone(),
        })
        .unwrap();
        let finished = Ca::load(&new_dir).unwrap();
        assert_eq!(finished.trust_bundle().roots(), [new.root_der().clone()]);
        let twice = run(CaCommand::FinishRotation { dir: new_dir }).unwrap_err();
        assert!(
            twice.to_string().contains("no rotation to finish"),
            "{twice}"
        );

        // A bundle that leaves out the CA's own certificate is refused, naming the file.
        std::fs::copy(
            base.join("new").join("ca.pem"),
            old_dir.join(TRUST_BUNDLE_FILE),
        )
        .unwrap();
        let error = Ca::load(&old_dir).unwrap_err().to_string();
        assert!(
            error.contains(TRUST_BUNDLE_FILE) && error.contains("own certificate"),
            "{error}"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
