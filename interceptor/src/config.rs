//! What `interceptor agent` is told on its command line, as the composition root and the
//! agent read it.

use std::{net::SocketAddr, path::PathBuf};

/// Everything `interceptor agent` is told on its command line.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Name of this node; names the bpffs pin directory by default.
    pub node_name: String,
    /// The cgroup (v2) that holds this node's pods; capture is attached here.
    pub pods_cgroup: PathBuf,
    /// Directory of the mesh CA (`interceptor ca init`).
    pub ca_dir: PathBuf,
    /// Where maps and links are pinned.
    pub bpf_dir: PathBuf,
    /// Where the agent keeps enrolled workloads and applied policies across restarts.
    pub state_dir: PathBuf,
    /// The admin unix socket.
    pub admin_socket: PathBuf,
    /// The mesh directory shared by all agents.
    pub mesh_dir: PathBuf,
    /// A directory of policy files loaded at start and watched for changes.
    pub policy_dir: Option<PathBuf>,
    /// Istio's root namespace: policies there without a selector apply mesh-wide.
    pub root_namespace: String,
    /// Address of the HTTP admin port (metrics, health).
    pub metrics_addr: Option<SocketAddr>,
    /// How many recent connection records to keep.
    pub record_capacity: usize,
    /// Lifetime of workload certificates; they are renewed at half-life.
    pub cert_lifetime: std::time::Duration,
    /// Kubernetes mode: where the API client's configuration comes from. `None` is the
    /// standalone mode (CLI enrolment, `--mesh-dir`).
    pub kubernetes: Option<crate::kube::ClientSource>,
    /// Deadlines and caps for unauthenticated connections on the tunnel ports.
    pub tunnel_limits: crate::proxy::admission::TunnelLimits,
    /// Streams per pooled tunnel and how long an idle one stays open.
    pub pool_limits: crate::proxy::pool::PoolLimits,
}
