//! The mesh certificate authority and the workload certificates it issues.

use std::fmt;
use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    Ia5String, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::bundle::TrustBundle;
use super::files::{io_error, read_pem_certificates, read_text, write_new_file};
use super::spiffe::{parse_certificate, trust_domain_uri, validate_trust_domain};
use super::{Identity, IdentityError};

/// File name of the CA certificate (PEM) inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key (PKCS#8 PEM, mode 0600) inside the CA directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of the optional trust bundle (PEM) inside the CA directory: the roots agents
/// trust while a CA is rotated, this CA's own among them. Without it, agents trust only
/// [`CA_CERT_FILE`].
pub const TRUST_BUNDLE_FILE: &str = "trust-bundle.pem";
/// How far in the past certificates start being valid, to tolerate clock skew
/// between nodes.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);
/// Lifetime of a freshly generated CA certificate.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Organization name put in every certificate subject.
const ORGANIZATION: &str = "interceptor";

/// A workload certificate (X.509 SVID) with its private key.
#[derive(Debug)]
pub struct WorkloadCert {
    /// The identity the certificate asserts (its URI subject alternative name).
    pub identity: Identity,
    /// The chain to present: leaf first, then the mesh CA certificate.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key (ECDSA P-256, PKCS#8).
    pub key: PrivateKeyDer<'static>,
    /// End of the leaf's validity (whole seconds, as encoded in the certificate).
    pub not_after: SystemTime,
}

impl WorkloadCert {
    /// The leaf (end-entity) certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The leaf's serial number, as [`super::certificate_serial`] writes it.
    pub fn serial(&self) -> Result<String, IdentityError> {
        super::certificate_serial(self.leaf())
    }

    /// Writes the chain (leaf first) and the PKCS#8 key as PEM files, for tools outside the
    /// mesh; the key file is 0600 and neither file may exist yet.
    pub fn write_pem(&self, cert_path: &Path, key_path: &Path) -> Result<(), IdentityError> {
        let chain: Vec<pem::Pem> = self
            .chain
            .iter()
            .map(|der| pem::Pem::new("CERTIFICATE", der.to_vec()))
            .collect();
        let key = pem::Pem::new("PRIVATE KEY", self.key.secret_der().to_vec());
        write_new_file(cert_path, pem::encode_many(&chain).as_bytes(), 0o644)
            .map_err(io_error("writing", cert_path))?;
        write_new_file(key_path, pem::encode(&key).as_bytes(), 0o600)
            .map_err(io_error("writing", key_path))
    }
}

impl Clone for WorkloadCert {
    fn clone(&self) -> WorkloadCert {
        WorkloadCert {
            identity: self.identity.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_after: self.not_after,
        }
    }
}

/// The mesh certificate authority: a self-signed ECDSA P-256 CA certificate
/// (path length 0, so it only signs leaves) naming its trust domain as the URI
/// subject alternative name `spiffe://<trust-domain>`, and its key.
///
/// It only issues certificates for identities of its own trust domain.
pub struct Ca {
    /// The roots peers' certificates are checked against: this CA's own, and during a
    /// rotation the other CA's too.
    bundle: TrustBundle,
    /// This CA's certificate, exactly as stored in [`CA_CERT_FILE`].
    root: CertificateDer<'static>,
    issuer: rcgen::Certificate,
    key: KeyPair,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain())
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Generates a new CA in memory only (tests, labs). See [`Ca::init`] to
    /// create one on disk.
    pub fn generate(trust_domain: &str) -> Result<Ca, IdentityError> {
        validate_trust_domain(trust_domain).map_err(|reason| {
            IdentityError::InvalidTrustDomain {
                trust_domain: trust_domain.to_owned(),
                reason,
            }
        })?;
        let key = KeyPair::generate().map_err(generation_error("CA key"))?;
        let issuer = ca_params(trust_domain)?
            .self_signed(&key)
            .map_err(generation_error("CA certificate"))?;
        let root = issuer.der().clone();
        Ca::from_parts(root, issuer, key)
    }

    /// Creates a new CA in `dir` (created if missing): [`CA_CERT_FILE`] and
    /// [`CA_KEY_FILE`], the key with mode 0600.
    ///
    /// Refuses to overwrite: if either file already exists, fails with
    /// [`IdentityError::CaAlreadyExists`] naming it, and writes nothing.
    pub fn init(dir: &Path, trust_domain: &str) -> Result<Ca, IdentityError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        refuse_existing(&cert_path)?;
        refuse_existing(&key_path)?;
        let ca = Ca::generate(trust_domain)?;
        fs::create_dir_all(dir).map_err(io_error("creating directory", dir))?;
        write_new(&key_path, ca.key.serialize_pem().as_bytes(), 0o600)?;
        if let Err(e) = write_new(&cert_path, ca.issuer.pem().as_bytes(), 0o644) {
            // Do not leave a lone key behind that would block the next attempt.
            let _ = fs::remove_file(&key_path);
            return Err(e);
        }
        Ok(ca)
    }

    /// Loads the CA written by [`Ca::init`] from `dir`, checking that the key
    /// matches the certificate and recovering the trust domain from the
    /// certificate.
    pub fn load(dir: &Path) -> Result<Ca, IdentityError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let invalid_cert = |reason: String| IdentityError::InvalidFile {
            path: cert_path.clone(),
            reason,
        };
        let root = match read_pem_certificates(&cert_path)?.as_slice() {
            [root] => root.clone(),
            certs => {
                let count = certs.len();
                return Err(invalid_cert(format!(
                    "expected one certificate, found {count}"
                )));
            }
        };
        let key =
            KeyPair::from_pem(&read_text(&key_path)?).map_err(|e| IdentityError::InvalidFile {
                path: key_path.clone(),
                reason: format!("not a PEM private key: {e}"),
            })?;
        ensure_key_matches(&root, &key).map_err(|reason| IdentityError::InvalidFile {
            path: key_path.clone(),
            reason,
        })?;
        let issuer = CertificateParams::from_ca_cert_der(&root)
            .map_err(|e| invalid_cert(format!("not a usable CA certificate: {e}")))?
            .self_signed(&key)
            .map_err(generation_error("CA issuer from loaded certificate"))?;
        let ca = Ca::from_parts(root, issuer, key).map_err(|e| invalid_cert(e.to_string()))?;
        ca.with_trust_bundle_of(dir)
    }

    /// Trusts the roots of `dir`'s [`TRUST_BUNDLE_FILE`] when it has one. The bundle must
    /// hold this CA's own certificate and serve the same trust domain.
    fn with_trust_bundle_of(self, dir: &Path) -> Result<Ca, IdentityError> {
        let path = dir.join(TRUST_BUNDLE_FILE);
        if !path.exists() {
            return Ok(self);
        }
        let bundle = TrustBundle::load(&path)?;
        let invalid = |reason: String| IdentityError::InvalidFile {
            path: path.clone(),
            reason,
        };
        if !bundle.roots().contains(&self.root) {
            return Err(invalid(format!(
                "does not hold this CA's own certificate ({CA_CERT_FILE}); a trust bundle adds roots to it"
            )));
        }
        if bundle.trust_domain() != self.trust_domain() {
            return Err(invalid(format!(
                "serves trust domain {:?}, the CA serves {:?}",
                bundle.trust_domain(),
                self.trust_domain()
            )));
        }
        Ok(Ca { bundle, ..self })
    }

    /// Writes `roots` (PEM) as `dir`'s [`TRUST_BUNDLE_FILE`], atomically; they must form a
    /// valid bundle that holds this CA's own certificate.
    pub fn write_trust_bundle(
        &self,
        dir: &Path,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<(), IdentityError> {
        let path = dir.join(TRUST_BUNDLE_FILE);
        let invalid = |reason: String| IdentityError::InvalidFile {
            path: path.clone(),
            reason,
        };
        if !roots.contains(&self.root) {
            return Err(invalid("would not hold this CA's own certificate".into()));
        }
        let bundle = TrustBundle::new(roots).map_err(|e| invalid(e.to_string()))?;
        let pem: String = bundle
            .roots()
            .iter()
            .map(|root| pem::encode(&pem::Pem::new("CERTIFICATE", root.to_vec())))
            .collect();
        crate::fsutil::write_atomically(&path, pem.as_bytes()).map_err(io_error("writing", &path))
    }

    /// The trust domain this CA serves.
    pub fn trust_domain(&self) -> &str {
        self.bundle.trust_domain()
    }

    /// The CA certificate, DER encoded (exactly as stored in [`CA_CERT_FILE`]).
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// The trust bundle peers need to verify certificates issued by this CA.
    pub fn trust_bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// Issues a workload certificate for `identity`, valid from
    /// [`CLOCK_SKEW_ALLOWANCE`] ago until `validity` from now (capped at the
    /// CA's own expiry), with a fresh ECDSA P-256 key.
    ///
    /// The identity must belong to this CA's trust domain.
    pub fn issue(
        &self,
        identity: &Identity,
        validity: Duration,
    ) -> Result<WorkloadCert, IdentityError> {
        if identity.trust_domain() != self.trust_domain() {
            return Err(IdentityError::ForeignTrustDomain {
                identity: identity.to_string(),
                trust_domain: self.trust_domain().to_owned(),
            });
        }
        self.sign_leaf(identity, validity)
    }

    /// Signs a leaf for any identity, whatever its trust domain. Only
    /// [`Ca::issue`] and tests (which need foreign-domain certificates to check
    /// that peers reject them) call this.
    pub(crate) fn sign_leaf(
        &self,
        identity: &Identity,
        validity: Duration,
    ) -> Result<WorkloadCert, IdentityError> {
        let subject = identity.to_string();
        let key = KeyPair::generate().map_err(generation_error(format!("key for {subject}")))?;
        let params = leaf_params(&subject, validity, self.issuer.params().not_after)?;
        let not_after = SystemTime::from(params.not_after);
        let leaf = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(generation_error(format!("certificate for {subject}")))?;
        Ok(WorkloadCert {
            identity: identity.clone(),
            chain: vec![leaf.der().clone(), self.root_der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            not_after,
        })
    }

    /// Signs a leaf for `identity` after `edit` has changed its parameters (validity, names,
    /// CA flag): tests make the certificates a misbehaving CA or peer would present.
    #[cfg(test)]
    pub(crate) fn sign_crafted(
        &self,
        identity: &Identity,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> WorkloadCert {
        let key = KeyPair::generate().unwrap();
        let mut params = leaf_params(
            &identity.to_string(),
            Duration::from_secs(3600),
            self.issuer.params().not_after,
        )
        .unwrap();
        edit(&mut params);
        let not_after = SystemTime::from(params.not_after);
        let leaf = params.signed_by(&key, &self.issuer, &self.key).unwrap();
        WorkloadCert {
            identity: identity.clone(),
            chain: vec![leaf.der().clone(), self.root_der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            not_after,
        }
    }

    fn from_parts(
        root: CertificateDer<'static>,
        issuer: rcgen::Certificate,
        key: KeyPair,
    ) -> Result<Ca, IdentityError> {
        let bundle = TrustBundle::new(vec![root.clone()])?;
        Ok(Ca {
            bundle,
            root,
            issuer,
            key,
        })
    }
}

fn ca_params(trust_domain: &str) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = subject(Some(&format!("interceptor mesh CA ({trust_domain})")));
    params.subject_alt_names = vec![uri_san(&trust_domain_uri(trust_domain))?];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params.not_before, params.not_after) = validity_window(CA_VALIDITY)?;
    Ok(params)
}

fn leaf_params(
    spiffe_id: &str,
    validity: Duration,
    ca_not_after: OffsetDateTime,
) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::default();
    // The SPIFFE id may exceed the 64-character common-name limit; it lives in the SAN.
    params.distinguished_name = subject(None);
    params.subject_alt_names = vec![uri_san(spiffe_id)?];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let (not_before, not_after) = validity_window(validity)?;
    params.not_before = not_before;
    params.not_after = not_after.min(ca_not_after);
    Ok(params)
}

fn subject(common_name: Option<&str>) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, ORGANIZATION);
    if let Some(common_name) = common_name {
        name.push(DnType::CommonName, common_name);
    }
    name
}

fn uri_san(uri: &str) -> Result<SanType, IdentityError> {
    let uri = Ia5String::try_from(uri).map_err(generation_error(format!("URI SAN {uri:?}")))?;
    Ok(SanType::URI(uri))
}

/// `(now - CLOCK_SKEW_ALLOWANCE, now + validity)`, in whole seconds.
fn validity_window(validity: Duration) -> Result<(OffsetDateTime, OffsetDateTime), IdentityError> {
    let invalid = |reason| IdentityError::InvalidValidity { validity, reason };
    if validity < Duration::from_secs(1) {
        return Err(invalid("must be at least one second"));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| invalid("system clock is before 1970"))?
        .as_secs();
    let not_before = now.saturating_sub(CLOCK_SKEW_ALLOWANCE.as_secs());
    let not_after = now.saturating_add(validity.as_secs());
    let to_time = |secs: u64| {
        i64::try_from(secs)
            .ok()
            .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
            .ok_or_else(|| invalid("ends beyond the year 9999"))
    };
    Ok((to_time(not_before)?, to_time(not_after)?))
}

fn ensure_key_matches(cert: &CertificateDer<'_>, key: &KeyPair) -> Result<(), String> {
    let parsed = parse_certificate(cert)
        .map_err(|e| format!("cannot check key against {CA_CERT_FILE}: {e}"))?;
    if parsed.public_key().raw != key.public_key_der().as_slice() {
        return Err(format!(
            "private key does not match the certificate in {CA_CERT_FILE}"
        ));
    }
    Ok(())
}

fn refuse_existing(path: &Path) -> Result<(), IdentityError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Err(IdentityError::CaAlreadyExists {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("checking", path)(e)),
    }
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    write_new_file(path, contents, mode).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => IdentityError::CaAlreadyExists {
            path: path.to_owned(),
        },
        _ => io_error("writing", path)(e),
    })
}

fn generation_error(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> IdentityError {
    let what = what.into();
    move |cause| IdentityError::Generation { what, cause }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use x509_parser::extensions::GeneralName;

    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new() -> TestDir {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("interceptor-ca-test-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            TestDir(dir)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn identity(trust_domain: &str) -> Identity {
        Identity::new(trust_domain, "shop", "checkout").unwrap()
    }

    #[test]
    fn init_creates_cert_and_private_key_files() {
        let dir = TestDir::new();
        let ca = Ca::init(&dir.0.join("nested"), "mesh.test").unwrap();
        let key_path = dir.0.join("nested").join(CA_KEY_FILE);
        let mode = fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let pem = fs::read_to_string(dir.0.join("nested").join(CA_CERT_FILE)).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(ca.trust_domain(), "mesh.test");
    }

    #[test]
    fn init_refuses_to_overwrite_either_file() {
        let dir = TestDir::new();
        Ca::init(&dir.0, "mesh.test").unwrap();
        let before = fs::read(dir.0.join(CA_CERT_FILE)).unwrap();
        let err = Ca::init(&dir.0, "mesh.test").unwrap_err();
        assert!(
            matches!(err, IdentityError::CaAlreadyExists { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(CA_CERT_FILE), "{err}");
        assert_eq!(fs::read(dir.0.join(CA_CERT_FILE)).unwrap(), before);

        fs::remove_file(dir.0.join(CA_CERT_FILE)).unwrap();
        let err = Ca::init(&dir.0, "mesh.test").unwrap_err();
        assert!(err.to_string().contains(CA_KEY_FILE), "{err}");
        assert!(!dir.0.join(CA_CERT_FILE).exists());
    }

    #[test]
    fn load_round_trips() {
        let dir = TestDir::new();
        let created = Ca::init(&dir.0, "mesh.test").unwrap();
        let loaded = Ca::load(&dir.0).unwrap();
        assert_eq!(loaded.trust_domain(), "mesh.test");
        assert_eq!(loaded.root_der(), created.root_der());
        let bundle = TrustBundle::load(&dir.0.join(CA_CERT_FILE)).unwrap();
        assert_eq!(bundle.trust_domain(), "mesh.test");
        assert_eq!(bundle.roots(), [created.root_der().clone()]);
        let issued = loaded
            .issue(&identity("mesh.test"), Duration::from_secs(60))
            .unwrap();
        assert_chains_to(&issued, &bundle);
    }

    /// webpki path validation of a leaf against the bundle (as a TLS peer would).
    fn assert_chains_to(issued: &WorkloadCert, bundle: &TrustBundle) {
        let leaf = rustls::server::ParsedCertificate::try_from(issued.leaf()).unwrap();
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &leaf,
            &bundle.root_store(),
            &issued.chain[1..],
            rustls::pki_types::UnixTime::now(),
            algorithms.all,
        )
        .unwrap();
    }

    #[test]
    fn load_names_the_missing_or_mismatched_file() {
        let dir = TestDir::new();
        let err = Ca::load(&dir.0).unwrap_err();
        assert!(err.to_string().contains(CA_CERT_FILE), "{err}");

        Ca::init(&dir.0, "mesh.test").unwrap();
        let other = TestDir::new();
        Ca::init(&other.0, "mesh.test").unwrap();
        fs::remove_file(dir.0.join(CA_KEY_FILE)).unwrap();
        fs::copy(other.0.join(CA_KEY_FILE), dir.0.join(CA_KEY_FILE)).unwrap();
        let err = Ca::load(&dir.0).unwrap_err().to_string();
        assert!(
            err.contains(CA_KEY_FILE) && err.contains("does not match"),
            "{err}"
        );
    }

    #[test]
    fn generate_rejects_invalid_trust_domain() {
        let err = Ca::generate("Mesh.Test").unwrap_err().to_string();
        assert!(err.contains("trust domain"), "{err}");
    }

    #[test]
    fn ca_certificate_is_a_self_signed_ca_naming_its_trust_domain() {
        let ca = Ca::generate("mesh.test").unwrap();
        let cert = parse_certificate(ca.root_der()).unwrap();
        assert!(cert.basic_constraints().unwrap().unwrap().value.ca);
        assert_eq!(cert.subject(), cert.issuer());
        assert!(cert.subject().to_string().contains("mesh.test"));
    }

    #[test]
    fn issued_leaf_carries_the_spiffe_id_and_leaf_properties() {
        let ca = Ca::generate("mesh.test").unwrap();
        let id = identity("mesh.test");
        let issued = ca.issue(&id, Duration::from_secs(3600)).unwrap();
        assert_eq!(issued.chain.len(), 2);
        assert_eq!(&issued.chain[1], ca.root_der());
        assert_eq!(Identity::from_certificate(issued.leaf()).unwrap(), id);

        let leaf = parse_certificate(issued.leaf()).unwrap();
        assert!(!leaf.basic_constraints().unwrap().unwrap().value.ca);
        let usage = leaf.key_usage().unwrap().unwrap().value;
        assert!(usage.digital_signature() && !usage.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let sans = &leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(
            sans,
            &[GeneralName::URI("spiffe://mesh.test/ns/shop/sa/checkout")]
        );
        assert_eq!(
            leaf.issuer(),
            parse_certificate(ca.root_der()).unwrap().subject()
        );

        let now = OffsetDateTime::now_utc().unix_timestamp();
        let not_before = leaf.validity().not_before.timestamp();
        let not_after = leaf.validity().not_after.timestamp();
        assert!(
            not_before <= now - 299,
            "not_before should allow for clock skew"
        );
        assert!((now + 3599..=now + 3600).contains(&not_after));
        let expected_not_after = UNIX_EPOCH + Duration::from_secs(not_after as u64);
        assert_eq!(issued.not_after, expected_not_after);
    }

    #[test]
    fn issue_refuses_other_trust_domains_and_empty_validity() {
        let ca = Ca::generate("mesh.test").unwrap();
        let err = ca
            .issue(&identity("other.test"), Duration::from_secs(60))
            .unwrap_err();
        assert!(
            matches!(err, IdentityError::ForeignTrustDomain { .. }),
            "{err:?}"
        );
        let err = ca
            .issue(&identity("mesh.test"), Duration::ZERO)
            .unwrap_err();
        assert!(
            matches!(err, IdentityError::InvalidValidity { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn cloned_workload_cert_keeps_the_key() {
        let ca = Ca::generate("mesh.test").unwrap();
        let issued = ca
            .issue(&identity("mesh.test"), Duration::from_secs(60))
            .unwrap();
        let copy = issued.clone();
        assert_eq!(copy.key, issued.key);
        assert_eq!(copy.chain, issued.chain);
    }
}
