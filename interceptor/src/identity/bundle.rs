//! The trust bundle: mesh CA certificate(s) plus the trust domain they serve.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;

use super::IdentityError;
use super::files::read_pem_certificates;
use super::spiffe::{parse_certificate, trust_domain_from_uri, uri_sans};

/// The mesh CA certificate(s) every agent trusts, and the trust domain they
/// vouch for.
///
/// Each root must be a CA certificate whose only URI subject alternative name
/// is `spiffe://<trust-domain>` (as [`Ca::init`](super::Ca::init) writes it),
/// and all roots must name the same trust domain. Several roots are accepted so
/// a CA can be rotated by distributing old and new certificates together.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    trust_domain: String,
    roots: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
}

impl TrustBundle {
    /// Builds a bundle from DER CA certificates (at least one).
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<TrustBundle, IdentityError> {
        let invalid = |reason: String| IdentityError::InvalidCertificate { what: "CA", reason };
        let mut trust_domains = roots.iter().map(ca_trust_domain);
        let trust_domain = trust_domains
            .next()
            .ok_or_else(|| invalid("trust bundle has no certificate".into()))?
            .map_err(invalid)?;
        for other in trust_domains {
            let other = other.map_err(invalid)?;
            if other != trust_domain {
                return Err(invalid(format!(
                    "trust bundle mixes trust domains {trust_domain:?} and {other:?}"
                )));
            }
        }
        let store = root_store(&roots).map_err(invalid)?;
        Ok(TrustBundle {
            trust_domain,
            roots,
            store: Arc::new(store),
        })
    }

    /// Loads a bundle from a PEM file of CA certificates, typically `ca.pem`.
    pub fn load(path: &Path) -> Result<TrustBundle, IdentityError> {
        let roots = read_pem_certificates(path)?;
        TrustBundle::new(roots).map_err(|e| IdentityError::InvalidFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// The trust domain all mesh identities belong to.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificates, DER encoded.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The CA certificates as a rustls root store (shared, cheap to clone).
    pub fn root_store(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.store)
    }
}

/// The trust domain a mesh CA certificate serves: it must be a CA and carry
/// exactly one URI subject alternative name, `spiffe://<trust-domain>`.
pub(crate) fn ca_trust_domain(cert: &CertificateDer<'_>) -> Result<String, String> {
    let parsed = parse_certificate(cert)?;
    let is_ca = parsed
        .basic_constraints()
        .map_err(|e| format!("bad basic constraints: {e}"))?
        .is_some_and(|ext| ext.value.ca);
    if !is_ca {
        return Err("not a CA certificate (basic constraints CA:true missing)".into());
    }
    match uri_sans(&parsed)?.as_slice() {
        [uri] => trust_domain_from_uri(uri)
            .map(str::to_owned)
            .ok_or_else(|| {
                format!("URI subject alternative name {uri:?} is not spiffe://<trust-domain>")
            }),
        uris => Err(format!(
            "expected exactly one URI subject alternative name spiffe://<trust-domain>, found {uris:?}"
        )),
    }
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store
            .add(root.clone())
            .map_err(|e| format!("unusable as a trust anchor: {e}"))?;
    }
    Ok(store)
}
