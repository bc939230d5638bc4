//! interceptor: sidecar-less mutual TLS for Kubernetes pods.
//!
//! See ARCHITECTURE.md for the map of modules, ports and kernel programs.

pub mod admin;
pub mod agent;
pub mod cgroup;
pub mod cli;
pub mod directory;
pub mod ebpf;
pub mod identity;
pub mod kube;
pub mod limits;
pub mod metrics;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod records;
pub mod status;
pub mod tls;
pub mod workloads;
