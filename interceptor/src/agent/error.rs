//! What can go wrong in the agent's operations, typed until it reaches the admin socket or a
//! log line, where it becomes text.

use std::{io, path::PathBuf};

use crate::{
    delivery::DeliveryError,
    ebpf::EbpfError,
    identity::IdentityError,
    mesh::MeshError,
    policy::PolicyError,
    tls::TlsError,
    workloads::{InvalidWorkload, WorkloadKey},
};

/// An enrolment, removal or policy change that did not happen; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A field of the workload is not acceptable.
    #[error(transparent)]
    InvalidWorkload(#[from] InvalidWorkload),
    /// A workload of that namespace/name is already enrolled.
    #[error("workload {0} is already enrolled; remove it first")]
    AlreadyEnrolled(WorkloadKey),
    /// No workload of that namespace/name is enrolled.
    #[error("workload {0} is not enrolled on this node")]
    NotEnrolled(WorkloadKey),
    /// The workload's cgroup cannot be used.
    #[error("cgroup {}: {source}", path.display())]
    Cgroup {
        /// The cgroup at fault.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The workload's cgroup is not where capture is attached.
    #[error(
        "cgroup {} is not inside the node's pods cgroup {}; its connections would not be captured",
        cgroup.display(),
        pods.display()
    )]
    OutsidePodsCgroup {
        /// The workload's cgroup.
        cgroup: PathBuf,
        /// The node's pods cgroup (`--pods-cgroup`).
        pods: PathBuf,
    },
    /// The workload's network namespace could not be used.
    #[error("network namespace of {key}: {source}")]
    Netns {
        /// The workload.
        key: WorkloadKey,
        /// Cause.
        source: io::Error,
    },
    /// Its identity or certificate could not be made.
    #[error("identity of {key}: {source}")]
    Identity {
        /// The workload.
        key: WorkloadKey,
        /// Cause.
        source: Box<IdentityError>,
    },
    /// Its TLS configuration could not be built.
    #[error("TLS configuration of {key}: {source}")]
    Tls {
        /// The workload.
        key: WorkloadKey,
        /// Cause (boxed: rustls errors are large).
        source: Box<TlsError>,
    },
    /// Its namespace could not be prepared for deliveries.
    #[error("preparing {key}'s network namespace for deliveries: {source}")]
    Delivery {
        /// The workload.
        key: WorkloadKey,
        /// Cause.
        source: Box<DeliveryError>,
    },
    /// The agent's listeners could not be opened in its namespace.
    #[error("opening the agent's listeners in {key}'s network namespace: {source}")]
    Listeners {
        /// The workload.
        key: WorkloadKey,
        /// Cause.
        source: io::Error,
    },
    /// The kernel programs could not be told about it.
    #[error("programming the kernel for {key}: {source}")]
    Kernel {
        /// The workload.
        key: WorkloadKey,
        /// Cause.
        source: Box<EbpfError>,
    },
    /// The mesh could not be told about it.
    #[error("announcing {key} to the mesh: {source}")]
    Mesh {
        /// The workload.
        key: WorkloadKey,
        /// Cause.
        source: Box<MeshError>,
    },
    /// A policy change was refused.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A file of `--state-dir` could not be written.
    #[error(
        "saving {}: {source}; make room in the state directory (--state-dir) or make it \
         writable, then retry",
        path.display()
    )]
    Save {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A task the change ran on failed (a bug: it panicked).
    #[error("{what} failed: {source}")]
    Task {
        /// What the task did.
        what: &'static str,
        /// Cause.
        source: tokio::task::JoinError,
    },
}

/// Why an admin request got an error answer; it becomes text on the admin socket.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The operation was refused or failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The answer could not be encoded (a bug).
    #[error("encoding the answer: {0}")]
    Encode(serde_json::Error),
    /// `watch` is served by the admin server itself, as a stream.
    #[error("watch is a streaming request")]
    Streaming,
}
