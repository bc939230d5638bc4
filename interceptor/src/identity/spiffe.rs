//! SPIFFE workload identities and their extraction from X.509 certificates.

use std::fmt;
use std::str::FromStr;

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::IdentityError;

/// The URI scheme of every SPIFFE id.
const SCHEME: &str = "spiffe://";
/// SPIFFE limits trust domain names to 255 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// SPIFFE limits whole ids to 2048 bytes.
const MAX_ID_LEN: usize = 2048;

/// A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Always valid once constructed (through [`Identity::new`], [`str::parse`] or
/// serde): the trust domain uses only `a-z 0-9 . - _`, the namespace and
/// service account only `a-z A-Z 0-9 . - _` (and are neither `.` nor `..`), as
/// the SPIFFE spec requires. [`Display`](fmt::Display) gives the canonical URI
/// and serde (de)serializes it as that URI string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl Identity {
    /// Builds an identity from its parts, validating each of them.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Identity, IdentityError> {
        let id = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        validate_parts(trust_domain, namespace, service_account)
            .map_err(|reason| invalid_id(&id, reason))?;
        Ok(Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace of the workload.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The Kubernetes service account of the workload.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// Extracts the identity from a workload (leaf) certificate: its one and
    /// only URI subject alternative name, which must be a valid identity.
    ///
    /// This only reads the certificate; it does not verify any signature.
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Result<Identity, IdentityError> {
        let invalid = |reason: String| IdentityError::InvalidCertificate {
            what: "workload",
            reason,
        };
        let parsed = parse_certificate(cert).map_err(invalid)?;
        match uri_sans(&parsed).map_err(invalid)?.as_slice() {
            [uri] => uri.parse(),
            [] => Err(invalid(
                "no URI subject alternative name (SPIFFE id)".into(),
            )),
            uris => Err(invalid(format!(
                "{} URI subject alternative names, expected exactly one: {uris:?}",
                uris.len()
            ))),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(id: &str) -> Result<Identity, IdentityError> {
        let (trust_domain, namespace, service_account) =
            split_id(id).map_err(|reason| invalid_id(id, reason))?;
        validate_parts(trust_domain, namespace, service_account)
            .map_err(|reason| invalid_id(id, reason))?;
        Ok(Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Identity, D::Error> {
        let id = String::deserialize(deserializer)?;
        id.parse().map_err(serde::de::Error::custom)
    }
}

fn invalid_id(id: &str, reason: String) -> IdentityError {
    IdentityError::InvalidSpiffeId {
        id: id.to_owned(),
        reason,
    }
}

/// Splits `spiffe://<td>/ns/<ns>/sa/<sa>` into its three variable parts.
fn split_id(id: &str) -> Result<(&str, &str, &str), String> {
    if id.len() > MAX_ID_LEN {
        return Err(format!("longer than {MAX_ID_LEN} bytes"));
    }
    let rest = id
        .strip_prefix(SCHEME)
        .ok_or_else(|| format!("scheme must be {SCHEME:?}"))?;
    let (trust_domain, path) = rest
        .split_once('/')
        .ok_or("missing path /ns/<namespace>/sa/<service-account>")?;
    match path.split('/').collect::<Vec<_>>().as_slice() {
        ["ns", namespace, "sa", service_account] => Ok((trust_domain, namespace, service_account)),
        _ => Err(format!(
            "path must be /ns/<namespace>/sa/<service-account>, got /{path}"
        )),
    }
}

fn validate_parts(
    trust_domain: &str,
    namespace: &str,
    service_account: &str,
) -> Result<(), String> {
    validate_trust_domain(trust_domain)?;
    validate_path_segment("namespace", namespace)?;
    validate_path_segment("service account", service_account)
}

/// Checks a trust domain name against the SPIFFE rules; the error names the problem.
pub(crate) fn validate_trust_domain(trust_domain: &str) -> Result<(), String> {
    if trust_domain.is_empty() {
        return Err("trust domain is empty".into());
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(format!(
            "trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes"
        ));
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c);
    match trust_domain.chars().find(|&c| !allowed(c)) {
        Some(c) => Err(format!(
            "trust domain contains {c:?} (allowed: a-z 0-9 . - _)"
        )),
        None => Ok(()),
    }
}

/// Checks a SPIFFE path segment (namespace or service account).
fn validate_path_segment(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field} is empty"));
    }
    if value == "." || value == ".." {
        return Err(format!("{field} must not be {value:?}"));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || ".-_".contains(c);
    match value.chars().find(|&c| !allowed(c)) {
        Some(c) => Err(format!(
            "{field} {value:?} contains {c:?} (allowed: a-z A-Z 0-9 . - _)"
        )),
        None => Ok(()),
    }
}

/// The URI naming a whole trust domain: `spiffe://<trust-domain>`.
pub(crate) fn trust_domain_uri(trust_domain: &str) -> String {
    format!("{SCHEME}{trust_domain}")
}

/// The trust domain named by a `spiffe://<trust-domain>` URI (no path), if any.
pub(crate) fn trust_domain_from_uri(uri: &str) -> Option<&str> {
    uri.strip_prefix(SCHEME)
        .filter(|trust_domain| validate_trust_domain(trust_domain).is_ok())
}

/// Parses DER, requiring that nothing trails the certificate.
pub(crate) fn parse_certificate<'a>(
    cert: &'a CertificateDer<'_>,
) -> Result<X509Certificate<'a>, String> {
    match x509_parser::parse_x509_certificate(cert) {
        Ok(([], parsed)) => Ok(parsed),
        Ok(_) => Err("trailing bytes after the certificate".into()),
        Err(e) => Err(format!("unparsable DER: {e}")),
    }
}

/// A certificate's serial number as lowercase hex (its DER bytes), as `openssl x509 -serial`
/// prints it but in lower case: what tells two certificates of one identity apart.
pub fn certificate_serial(cert: &CertificateDer<'_>) -> Result<String, IdentityError> {
    let parsed = parse_certificate(cert).map_err(|reason| IdentityError::InvalidCertificate {
        what: "workload",
        reason,
    })?;
    Ok(parsed
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

/// All URI subject alternative names of a certificate.
pub(crate) fn uri_sans<'a>(cert: &X509Certificate<'a>) -> Result<Vec<&'a str>, String> {
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subject alternative name extension: {e}"))?;
    let uris = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    Ok(uris)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_error(id: &str) -> String {
        match id.parse::<Identity>() {
            Ok(identity) => panic!("{id:?} parsed as {identity:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_and_displays_canonical_uri() {
        let id = "spiffe://cluster.local/ns/shop/sa/checkout-v2";
        let identity: Identity = id.parse().unwrap();
        assert_eq!(identity.trust_domain(), "cluster.local");
        assert_eq!(identity.namespace(), "shop");
        assert_eq!(identity.service_account(), "checkout-v2");
        assert_eq!(identity.to_string(), id);
        assert_eq!(
            Identity::new("cluster.local", "shop", "checkout-v2").unwrap(),
            identity
        );
    }

    #[test]
    fn serde_uses_the_uri_string() {
        let identity = Identity::new("td", "ns1", "sa.1").unwrap();
        let json = serde_json::to_string(&identity).unwrap();
        assert_eq!(json, r#""spiffe://td/ns/ns1/sa/sa.1""#);
        assert_eq!(serde_json::from_str::<Identity>(&json).unwrap(), identity);
        let err = serde_json::from_str::<Identity>(r#""spiffe://td/ns/x""#).unwrap_err();
        assert!(err.to_string().contains("path must be"), "{err}");
    }

    #[test]
    fn rejects_wrong_scheme() {
        assert!(parse_error("https://td/ns/a/sa/b").contains("scheme"));
        assert!(parse_error("SPIFFE://td/ns/a/sa/b").contains("scheme"));
    }

    #[test]
    fn rejects_missing_or_extra_segments() {
        for id in [
            "spiffe://td",
            "spiffe://td/",
            "spiffe://td/ns/a",
            "spiffe://td/ns/a/sa",
            "spiffe://td/sa/b/ns/a",
            "spiffe://td/ns/a/sa/b/",
            "spiffe://td/ns/a/sa/b/c",
        ] {
            let message = parse_error(id);
            assert!(message.contains("path"), "{id}: {message}");
        }
    }

    #[test]
    fn rejects_empty_or_dot_segments_naming_the_field() {
        assert!(parse_error("spiffe://td/ns//sa/b").contains("namespace is empty"));
        assert!(parse_error("spiffe://td/ns/a/sa/").contains("service account is empty"));
        assert!(parse_error("spiffe://td/ns/../sa/b").contains("namespace must not be"));
        assert!(parse_error("spiffe://td/ns/a/sa/b?x=1").contains("service account"));
    }

    #[test]
    fn rejects_bad_trust_domains() {
        assert!(parse_error("spiffe:///ns/a/sa/b").contains("trust domain is empty"));
        assert!(parse_error("spiffe://Cluster/ns/a/sa/b").contains("trust domain contains 'C'"));
        assert!(parse_error("spiffe://td:443/ns/a/sa/b").contains("trust domain contains ':'"));
        assert!(parse_error("spiffe://u@td/ns/a/sa/b").contains("trust domain contains '@'"));
    }

    #[test]
    fn new_validates_each_part() {
        let err = Identity::new("td", "a/b", "sa").unwrap_err().to_string();
        assert!(err.contains("namespace \"a/b\" contains '/'"), "{err}");
        assert!(Identity::new("td", "ns", "").is_err());
        assert!(Identity::new("", "ns", "sa").is_err());
    }

    #[test]
    fn trust_domain_uris_round_trip() {
        assert_eq!(trust_domain_from_uri(&trust_domain_uri("a.b")), Some("a.b"));
        assert_eq!(trust_domain_from_uri("spiffe://a.b/ns/x/sa/y"), None);
        assert_eq!(trust_domain_from_uri("https://a.b"), None);
    }
}
