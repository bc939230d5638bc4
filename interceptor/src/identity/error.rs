//! Errors of the identity module.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while parsing identities or running the mesh CA.
///
/// Messages name the file, field or value at fault and include the
/// underlying cause (I/O, certificate generation), so `{}` alone gives the
/// whole story; causes are kept as fields rather than
/// [`std::error::Error::source`] so chains printed by anyhow do not repeat them.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A SPIFFE id (or one of its parts) is malformed.
    #[error("invalid SPIFFE id {id:?}: {reason}")]
    InvalidSpiffeId {
        /// The offending id, as given (or as it would have been built).
        id: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A trust domain name is malformed.
    #[error("invalid trust domain {trust_domain:?}: {reason}")]
    InvalidTrustDomain {
        /// The offending trust domain.
        trust_domain: String,
        /// What is wrong with it.
        reason: String,
    },

    /// `Ca::init` found an existing CA file and refused to overwrite it.
    #[error("refusing to overwrite existing CA file {}", path.display())]
    CaAlreadyExists {
        /// The file that already exists.
        path: PathBuf,
    },

    /// A file or directory operation failed.
    #[error("{action} {}: {cause}", path.display())]
    Io {
        /// What was being done, e.g. "reading".
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        cause: io::Error,
    },

    /// A file exists but its content is unusable.
    #[error("{}: {reason}", path.display())]
    InvalidFile {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with its content.
        reason: String,
    },

    /// A certificate could not be parsed or lacks a required property.
    #[error("invalid {what} certificate: {reason}")]
    InvalidCertificate {
        /// Which certificate, e.g. "CA" or "workload".
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// rcgen failed to generate a key or certificate.
    #[error("generating {what}: {cause}")]
    Generation {
        /// What was being generated, e.g. "CA certificate".
        what: String,
        /// The underlying rcgen error.
        cause: rcgen::Error,
    },

    /// An identity belongs to a trust domain other than the expected one.
    #[error("identity {identity} is outside trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        /// The identity (as a URI).
        identity: String,
        /// The trust domain it should have belonged to.
        trust_domain: String,
    },

    /// A requested certificate validity is unusable (zero, sub-second or too large).
    #[error("invalid certificate validity {validity:?}: {reason}")]
    InvalidValidity {
        /// The requested validity.
        validity: Duration,
        /// Why it is unusable.
        reason: &'static str,
    },
}
