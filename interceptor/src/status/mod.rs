//! `interceptor status`: what the agent reports, and how the CLI shows it.

pub mod render;

use serde::{Deserialize, Serialize};

use crate::{
    ebpf::KernelCounters,
    records::{ConnectionRecord, WorkloadTotals},
};

/// The agent's answer to a status request. Part of the `status --output json` schema.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    /// The node the agent serves.
    pub node: String,
    /// One entry per enrolled workload (and per workload seen in records since start).
    pub workloads: Vec<WorkloadStatus>,
    /// Totals kept by the kernel programs, which count also while the agent is down.
    pub kernel: KernelCounters,
    /// Recent connections, oldest first.
    pub records: Vec<ConnectionRecord>,
}

/// Totals for one workload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkloadStatus {
    /// namespace/name.
    pub workload: String,
    /// SPIFFE identity, when enrolled.
    pub identity: Option<String>,
    /// Address, when enrolled.
    pub ip: Option<std::net::Ipv4Addr>,
    /// Connection and byte totals since the agent started.
    pub totals: WorkloadTotals,
}
