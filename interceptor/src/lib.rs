//! interceptor: sidecar-less mutual TLS for Kubernetes pods.
//!
//! See ARCHITECTURE.md for the map of modules, ports and kernel programs.
//!
//! `unsafe` is denied except in the modules that call kernel or C interfaces: the eBPF maps
//! and events ([`ebpf`]), network namespaces ([`netns`]), the delivery sockets and routing
//! netlink ([`delivery`]), the descriptor limits ([`limits`]) and the allocator's statistics
//! ([`memory`]).
#![deny(unsafe_code)]

/// Unit tests run on the agent's allocator, so [`memory`]'s figures are the ones it serves.
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

pub mod admin;
pub mod agent;
pub mod app;
pub mod cgroup;
pub mod cli;
pub mod config;
#[allow(unsafe_code)]
pub mod delivery;
pub mod directory;
pub mod dry_run;
#[allow(unsafe_code)]
pub mod ebpf;
pub mod fsutil;
pub mod graph;
pub mod identity;
pub mod kube;
#[allow(unsafe_code)]
pub mod limits;
#[allow(unsafe_code)]
pub mod memory;
pub mod mesh;
pub mod metrics;
#[allow(unsafe_code)]
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod records;
pub mod services;
pub mod status;
pub mod sync;
pub mod tls;
pub mod web;
pub mod workloads;
