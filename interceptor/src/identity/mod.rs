//! Mesh CA and workload identities (SPIFFE).
//!
//! - [`Identity`]: a workload's SPIFFE id,
//!   `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//! - [`Ca`]: the mesh certificate authority. It lives in a directory holding
//!   [`CA_CERT_FILE`] and [`CA_KEY_FILE`] and issues short-lived
//!   [`WorkloadCert`]s (X.509 SVIDs).
//! - [`TrustBundle`]: what every agent needs to verify peers: the mesh CA
//!   certificate(s) and the trust domain. It can be loaded from `ca.pem` alone,
//!   without the CA key.
//!
//! The trust domain is stored inside the CA certificate itself, as its only URI
//! subject alternative name `spiffe://<trust-domain>`, so `ca.pem` is
//! self-describing and no side file can drift out of sync with it.

mod bundle;
mod ca;
mod error;
mod files;
mod spiffe;

pub use bundle::TrustBundle;
pub use ca::{
    CA_CERT_FILE, CA_KEY_FILE, CLOCK_SKEW_ALLOWANCE, Ca, TRUST_BUNDLE_FILE, WorkloadCert,
};
pub use error::IdentityError;
pub use spiffe::{Identity, certificate_serial};
