//! The node agent: owns the kernel programs, the enrolled workloads, the policy and the
//! records, and serves the admin socket.

mod events;
mod policy_sync;
mod workload;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::Context;
use tokio::sync::Mutex as AsyncMutex;
use tracing::{info, warn};

use crate::{
    admin::{self, protocol::Request},
    directory::MeshDirectory,
    ebpf::{CounterReader, Kernel, LoadedKernel},
    identity::Ca,
    limits::FdReserve,
    mesh::Mesh,
    proxy::{ProxyShared, admission::Admission},
    records::RecordStore,
    workloads::{WorkloadKey, WorkloadSpec},
};

pub use workload::RunningWorkload;

/// How often the mesh view is re-read whole, to see other nodes' withdrawals and changes
/// (additions are confirmed at first use).
const MESH_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

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
    /// Deadlines and caps for unauthenticated connections on the tunnel ports.
    pub tunnel_limits: crate::proxy::admission::TunnelLimits,
}

/// The running agent.
pub struct Agent {
    config: AgentConfig,
    ca: Ca,
    shared: Arc<ProxyShared>,
    /// Enrolment and inbound modes in the kernel; never taken on the connection path.
    kernel: Mutex<Kernel>,
    counters: CounterReader,
    workloads: AsyncMutex<BTreeMap<WorkloadKey, RunningWorkload>>,
    policy: policy_sync::SharedPolicy,
}

impl Agent {
    /// Loads the kernel programs, restores saved workloads and serves until the process ends.
    pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
        let ca = Ca::load(&config.ca_dir).context("loading the mesh CA (--ca-dir)")?;
        let LoadedKernel {
            kernel,
            original_dsts,
            counters,
            events,
        } = Kernel::load(&config.bpf_dir, &config.pods_cgroup).with_context(|| {
            format!(
                "attaching to the pods cgroup {}",
                config.pods_cgroup.display()
            )
        })?;
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("state directory {}", config.state_dir.display()))?;
        let shared = Arc::new(ProxyShared {
            original_dsts,
            mesh: Arc::new(Mesh::new(Arc::new(MeshDirectory::open(&config.mesh_dir)?))),
            records: Arc::new(RecordStore::new(config.record_capacity)),
            admission: Admission::new(config.tunnel_limits),
            fd_reserve: FdReserve::new().context("opening the reserve descriptor")?,
        });
        let policy = policy_sync::PolicyState::load(&config)?;
        let agent = Arc::new(Agent {
            ca,
            shared,
            kernel: Mutex::new(kernel),
            counters,
            workloads: AsyncMutex::new(BTreeMap::new()),
            policy,
            config,
        });
        let admin_listener = admin::server::bind(&agent.config.admin_socket)
            .with_context(|| format!("admin socket {}", agent.config.admin_socket.display()))?;
        agent.restore_workloads().await;
        tokio::spawn(events::serve(events, agent.clone()));
        tokio::spawn(rotate_certificates(agent.clone()));
        tokio::spawn(agent.shared.mesh.clone().refresh(MESH_REFRESH));
        if agent.config.policy_dir.is_some() {
            tokio::spawn(policy_sync::watch_policy_dir(agent.clone()));
        }
        if let Some(addr) = agent.config.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics address {addr} (--metrics-addr)"))?;
            tokio::spawn(crate::metrics::serve(listener, agent.clone()));
        }
        info!(node = %agent.config.node_name, socket = %agent.config.admin_socket.display(), "agent ready");
        tokio::select! {
            _ = admin::server::serve(admin_listener, agent.clone()) => {}
            _ = shutdown_signal() => info!("shutting down; kernel enforcement stays pinned"),
        }
        Ok(())
    }

    /// The connection records.
    pub fn records(&self) -> &RecordStore {
        &self.shared.records
    }

    /// Unauthenticated tunnel connections now.
    pub fn pending_tunnels(&self) -> usize {
        self.shared.admission.pending()
    }

    /// Kernel counters.
    pub fn kernel_counters(&self) -> crate::ebpf::KernelCounters {
        self.counters.read()
    }

    /// Answers an admin request.
    pub async fn handle(&self, request: Request) -> Result<serde_json::Value, String> {
        let json = |value: serde_json::Result<serde_json::Value>| value.map_err(|e| e.to_string());
        match request {
            Request::WorkloadAdd { spec } => {
                json(serde_json::to_value(self.add_workload(spec).await?))
            }
            Request::WorkloadRemove { namespace, name } => {
                self.remove_workload(&WorkloadKey { namespace, name })
                    .await?;
                Ok(serde_json::Value::Null)
            }
            Request::WorkloadList => json(serde_json::to_value(self.list_workloads().await)),
            Request::PolicyApply { policies } => {
                json(serde_json::to_value(self.apply_policies(policies).await?))
            }
            Request::PolicyList => json(serde_json::to_value(self.policy_report().await)),
            Request::PolicyDelete { namespace, name } => {
                self.delete_policy(&namespace, &name).await?;
                Ok(serde_json::Value::Null)
            }
            Request::Status => json(serde_json::to_value(self.status().await)),
            Request::Watch => Err("watch is a streaming request".into()),
        }
    }

    /// The enrolled workload that owns `ip`, if any, with its identity.
    pub async fn workload_at(&self, ip: Ipv4Addr) -> Option<(WorkloadSpec, String)> {
        self.workloads
            .lock()
            .await
            .values()
            .find(|running| running.ip == ip)
            .map(|running| (running.spec.clone(), running.identity.to_string()))
    }
}

/// Checks certificates often enough to renew each well before it expires.
async fn rotate_certificates(agent: Arc<Agent>) {
    let period = (agent.config.cert_lifetime / 8).min(std::time::Duration::from_secs(60));
    loop {
        tokio::time::sleep(period).await;
        agent.rotate_certificates().await;
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

impl Agent {
    /// Totals per workload, kernel counters and recent records.
    pub async fn status(&self) -> crate::status::StatusReport {
        let totals = self.records().totals();
        let workloads = self.workloads.lock().await;
        let mut rows: Vec<crate::status::WorkloadStatus> = workloads
            .iter()
            .map(|(key, running)| crate::status::WorkloadStatus {
                workload: key.to_string(),
                identity: Some(running.identity.to_string()),
                ip: Some(running.ip),
                totals: totals.get(key).copied().unwrap_or_default(),
            })
            .collect();
        rows.extend(
            totals
                .iter()
                .filter(|(key, _)| !workloads.contains_key(*key))
                .map(|(key, totals)| crate::status::WorkloadStatus {
                    workload: key.to_string(),
                    identity: None,
                    ip: None,
                    totals: *totals,
                }),
        );
        crate::status::StatusReport {
            node: self.config.node_name.clone(),
            workloads: rows,
            kernel: self.kernel_counters(),
            records: self.records().recent(),
        }
    }
}
