//! The composition root: builds the agent's parts once and hands each server only the
//! handles it needs.
//!
//! ```text
//!                 ┌──────────── Agent (workloads, policy, kernel enrolment) ◄── admin socket
//! Kernel::load ───┤ OriginalDsts ──► proxies          (AdminHandler)
//!                 ├ CounterReader ─► metrics, status
//!                 └ EventReader ───► kernel-event task (records)
//! MeshDirectory or KubeMeshSource ──► Mesh (view + source) ──► proxies, enrolment, refresh
//! NodePods (Kubernetes mode) ──► Agent as `Enrolment`
//! PeerAuthentication watch (Kubernetes mode) ──► Agent's policy sources
//! RecordStore ────► proxies, kernel events, metrics, admin `watch`
//! ```
//!
//! No server imports the agent: the admin server serves any [`admin::AdminHandler`], the metrics port
//! reads [`MetricsSources`], the proxies read [`ProxyShared`].

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use tracing::{info, warn};

use crate::{
    admin,
    agent::Agent,
    config::AgentConfig,
    directory::MeshDirectory,
    ebpf::{Kernel, LoadedKernel},
    identity::Ca,
    kube::{ApiClient, KubeMeshSource, KubeServices, NodePods, cgroup::PodsRoot},
    limits::FdReserve,
    mesh::{Mesh, MeshSource},
    metrics::{self, MetricsSources},
    proxy::{ProxyShared, admission::Admission, pool::TunnelMetrics},
    records::RecordStore,
    services::{NoServices, ServiceSource},
};

/// How often the mesh view is re-read whole, to see other nodes' withdrawals and changes
/// (additions are confirmed at first use).
const MESH_REFRESH: Duration = Duration::from_secs(1);

/// Loads the kernel programs, builds the agent, restores saved workloads and serves until
/// SIGTERM or SIGINT; kernel enforcement stays pinned after it returns.
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
    let counters = Arc::new(counters);
    let records = Arc::new(RecordStore::new(config.record_capacity));
    let kube = match &config.kubernetes {
        Some(source) => Some(ApiClient::connect(source).await?),
        None => None,
    };
    let source: Arc<dyn MeshSource> = match &kube {
        Some(client) => Arc::new(KubeMeshSource::start(client, ca.trust_domain())),
        None => Arc::new(MeshDirectory::open(&config.mesh_dir).context("--mesh-dir")?),
    };
    let services: Arc<dyn ServiceSource> = match &kube {
        Some(client) => Arc::new(KubeServices::start(client)),
        None => Arc::new(NoServices),
    };
    let mesh = Arc::new(Mesh::new(source));
    let admission = Admission::new(config.tunnel_limits);
    let tunnels = Arc::new(TunnelMetrics::default());
    let shared = Arc::new(ProxyShared {
        original_dsts,
        mesh: mesh.clone(),
        services,
        records: records.clone(),
        admission: admission.clone(),
        fd_reserve: FdReserve::new().context("opening the reserve descriptor")?,
        pool_limits: config.pool_limits,
        tunnels: tunnels.clone(),
    });
    let admin_socket = config.admin_socket.clone();
    let metrics_addr = config.metrics_addr;
    let node = config.node_name.clone();
    let pods_root = PodsRoot::from_dir(&config.pods_cgroup);
    let trust_domain = ca.trust_domain().to_owned();
    let agent = Arc::new(Agent::new(config, ca, kernel, counters.clone(), shared)?);

    let admin_listener = admin::server::bind(&admin_socket)
        .with_context(|| format!("admin socket {}", admin_socket.display()))?;
    let mut tasks = agent.start(events).await;
    tasks.push(tokio::spawn(mesh.refresh(MESH_REFRESH)));
    if let Some(client) = kube {
        info!(
            origin = %client.origin(),
            "Kubernetes mode: pods, the mesh and PeerAuthentications come from the API"
        );
        let policies = client.watch_peer_authentications();
        tasks.push(tokio::spawn(agent.clone().follow_api_policies(policies)));
        let pods = NodePods {
            enrolment: agent.clone(),
            client,
            node: node.clone(),
            root: pods_root,
            trust_domain,
        };
        tasks.push(tokio::spawn(pods.run()));
    }
    if let Some(addr) = metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics address {addr} (--metrics-addr)"))?;
        let sources = Arc::new(MetricsSources {
            records,
            counters,
            admission,
            tunnels,
            status: agent.clone(),
        });
        tasks.push(tokio::spawn(metrics::serve(listener, sources)));
    }
    info!(node = %node, socket = %admin_socket.display(), "agent ready");
    tokio::select! {
        _ = admin::server::serve(admin_listener, agent) => {}
        _ = shutdown_signal() => info!("shutting down; kernel enforcement stays pinned"),
    }
    for task in tasks {
        task.abort();
    }
    Ok(())
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
