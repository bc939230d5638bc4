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
            let chain: String = cert
                .chain
                .iter()
                .map(|der| pem("CERTIFICATE", der.as_ref()))
                .collect();
            write_new(&cert_out, chain.as_bytes(), 0o644)
                .with_context(|| format!("--cert-out {}", cert_out.display()))?;
            write_new(
                &key_out,
                pem("PRIVATE KEY", cert.key.secret_der()).as_bytes(),
                0o600,
            )
            .with_context(|| format!("--key-out {}", key_out.display()))?;
            println!(
                "issued {identity} to {} (key {})",
                cert_out.display(),
                key_out.display()
            );
            Ok(())
        }
    }
}

/// Creates `path` with `mode` and writes `contents`, refusing to overwrite anything.
fn write_new(path: &std::path::Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// One PEM block: the label and the base64 of `der` in 64-column lines.
fn pem(label: &str, der: &[u8]) -> String {
    let encoded = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Standard base64 with padding (RFC 4648 section 4).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in cases {
            assert_eq!(base64(input.as_bytes()), expected, "{input:?}");
        }
    }

    #[test]
    fn issued_pem_parses_back() {
        let ca = Ca::generate("cluster.local").unwrap();
        let identity = Identity::new("cluster.local", "default", "sleep").unwrap();
        let cert = ca.issue(&identity, Duration::from_secs(3600)).unwrap();
        let chain: String = cert
            .chain
            .iter()
            .map(|der| pem("CERTIFICATE", der.as_ref()))
            .collect();
        let parsed: Vec<_> = rustls_pemfile::certs(&mut chain.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(parsed, cert.chain);
        let key_pem = pem("PRIVATE KEY", cert.key.secret_der());
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(key.secret_der(), cert.key.secret_der());
        assert!(key_pem.lines().all(|line| line.len() <= 64));
    }
}
