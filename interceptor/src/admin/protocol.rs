//! Requests and responses on the admin socket.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    dry_run::PlaintextCallers,
    policy::{PeerAuthentication, PolicyChange},
    records::{ConnectionRecord, WorkloadTotals},
    workloads::WorkloadSpec,
};

/// A request from the CLI.
#[derive(Clone, Debug, Serialize, Deserialize)]
// Externally tagged: internally tagged enums buffer their content, which loses integer map
// keys such as portLevelMtls ports.
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Enroll a pod.
    WorkloadAdd {
        /// The pod.
        spec: WorkloadSpec,
    },
    /// Remove a pod.
    WorkloadRemove {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// List enrolled pods.
    WorkloadList,
    /// Apply policies, all or nothing.
    PolicyApply {
        /// The batch.
        policies: Vec<PeerAuthentication>,
    },
    /// List policies and effective modes.
    PolicyList,
    /// Delete one policy.
    PolicyDelete {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// What a policy change would do, judged against the kept records; changes nothing.
    PolicyDryRun {
        /// The change, as `PolicyApply` or `PolicyDelete` would make it.
        change: PolicyChange,
        /// Only records that started at or after this (ms since the Unix epoch).
        since_unix_ms: Option<u64>,
    },
    /// Totals and recent connection records.
    Status,
    /// Stream records as they are written.
    Watch,
}

/// The agent's answer: exactly one of `ok` and `error`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// Success with a request-specific body.
    Ok(serde_json::Value),
    /// Failure; the message says what is wrong and what to do.
    Error(String),
}

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
    /// Per workload under PERMISSIVE, the plaintext callers in the kept records.
    #[serde(default)]
    pub plaintext_callers: Vec<PlaintextCallers>,
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
    /// Pod labels, when enrolled.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Connection and byte totals since the agent started.
    pub totals: WorkloadTotals,
}

/// Totals of the kernel programs' per-CPU counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelCounters {
    /// Connects redirected to the agent.
    pub redirected: u64,
    /// Plaintext SYNs refused under STRICT.
    pub strict_drops: u64,
    /// Events lost because the ring buffer was full.
    pub events_lost: u64,
    /// Plaintext connections accepted by pods from outside the mesh.
    pub plaintext_accepted: u64,
}
