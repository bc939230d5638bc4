//! Requests and responses on the admin socket.

use serde::{Deserialize, Serialize};

use crate::{policy::PeerAuthentication, workloads::WorkloadSpec};

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
