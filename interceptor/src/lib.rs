//! interceptor: sidecar-less mutual TLS for Kubernetes pods.
//!
//! See ARCHITECTURE.md for the map of modules, ports and kernel programs.

pub mod identity;
pub mod policy;
pub mod tls;
