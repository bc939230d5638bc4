//! The agent's per-pod proxies.
//!
//! For every enrolled pod the agent opens, inside the pod's network namespace:
//! - `127.0.0.1:15001`, the outbound listener the connect4 program redirects the pod's connects
//!   to ([`outbound`]);
//! - `<pod ip>:15008`, the mutual-TLS tunnel listener other agents connect to ([`inbound`]).
//!
//! Tunnels between agents speak HBONE ([`hbone`]): HTTP/2 CONNECT over mutual TLS, one
//! stream ([`stream`]) per proxied connection, on tunnels pooled per pod ([`pool`]); bytes are
//! relayed by [`relay`]. Who may be unauthenticated on a tunnel port, and for how long, is
//! [`admission`]'s business.

pub mod admission;
pub mod hbone;
pub mod inbound;
pub mod outbound;
pub mod pool;
pub mod relay;
pub mod stream;

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use interceptor_common::{OUTBOUND_PORT, TUNNEL_PORT};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tracing::warn;

use crate::{
    ebpf::OriginalDsts,
    identity::Identity,
    limits::{self, FdReserve},
    mesh::{Membership, Mesh},
    netns::PodNetns,
    records::{Connection, Direction, RecordStore, Security, Verdict},
    services::ServiceSource,
    tls::PodTls,
    workloads::WorkloadKey,
};

/// What the proxies know about the pod they serve.
pub struct PodProxy {
    /// namespace/name of the pod.
    pub workload: WorkloadKey,
    /// The pod's SPIFFE identity.
    pub identity: Identity,
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// The pod's network namespace.
    pub netns: Arc<PodNetns>,
    /// TLS configurations with the pod's certificate (reused, so sessions resume).
    pub tls: Arc<PodTls>,
    /// The pod's tunnels to other pods' agents.
    pub pool: pool::TunnelPool,
}

/// Agent-wide state the proxies use.
pub struct ProxyShared {
    /// Original destinations of redirected connects.
    pub original_dsts: OriginalDsts,
    /// Which destinations are in the mesh.
    pub mesh: Arc<Mesh>,
    /// Which destinations are Services' virtual addresses, and their backends.
    pub services: Arc<dyn ServiceSource>,
    /// Where connections are recorded.
    pub records: Arc<RecordStore>,
    /// Caps and deadlines for unauthenticated tunnel connections.
    pub admission: Arc<admission::Admission>,
    /// The descriptor kept aside to reset connections while descriptors are exhausted.
    pub fd_reserve: FdReserve,
    /// Limits of every pod's tunnel pool.
    pub pool_limits: pool::PoolLimits,
    /// Every pod's tunnel counters.
    pub tunnels: Arc<pool::TunnelMetrics>,
}

/// Which of a pod's listeners an accept loop serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listener {
    /// `127.0.0.1:15001`, the pod's redirected connects.
    Outbound,
    /// `<pod ip>:15008`, tunnels from other agents.
    Tunnel,
}

/// Binds the pod's listeners and starts serving them; the tasks stop when aborted.
pub fn start(pod: Arc<PodProxy>, shared: Arc<ProxyShared>) -> std::io::Result<Vec<JoinHandle<()>>> {
    let outbound_listener = pod
        .netns
        .listen(SocketAddrV4::new(Ipv4Addr::LOCALHOST, OUTBOUND_PORT))?;
    let tunnel_listener = pod.netns.listen(SocketAddrV4::new(pod.ip, TUNNEL_PORT))?;
    Ok(vec![
        tokio::spawn(accept_loop(
            outbound_listener,
            pod.clone(),
            shared.clone(),
            Listener::Outbound,
            |stream, peer, pod, shared| Some(outbound::handle(stream, peer, pod, shared)),
        )),
        tokio::spawn(accept_loop(
            tunnel_listener,
            pod,
            shared,
            Listener::Tunnel,
            inbound::admit,
        )),
    ])
}

/// Accepts connections until the task is aborted, serving each in its own task; `serve`
/// returns `None` for a connection it refused at once.
///
/// When descriptors run out, accept fails while the connection waits in the kernel's queue;
/// rather than leave it hanging (and spin on the error), the loop frees its reserve
/// descriptor, accepts the connection, resets it and records why.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    pod: Arc<PodProxy>,
    shared: Arc<ProxyShared>,
    kind: Listener,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<PodProxy>, Arc<ProxyShared>) -> Option<Fut>,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut last_warning: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                if let Some(task) = serve(stream, peer, pod.clone(), shared.clone()) {
                    tokio::spawn(task);
                }
            }
            Err(e) if limits::is_fd_exhaustion(&e) => {
                let message = limits::fd_exhaustion_message(&e);
                if last_warning.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
                    warn!(workload = %pod.workload, "{kind:?} listener: {message}; resetting new connections until descriptors are free");
                    last_warning = Some(Instant::now());
                }
                match shared.fd_reserve.reset_one(&listener) {
                    Some(Ok(peer)) => {
                        refused_for_lack_of_descriptors(kind, peer, &pod, &shared, message);
                        tokio::task::yield_now().await;
                    }
                    // The connection went away before it could be taken.
                    Some(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    // The reserve is in use by another listener, or itself lost: back off.
                    Some(Err(_)) | None => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            Err(e) => {
                // Out of memory or buffers: back off instead of spinning.
                warn!(workload = %pod.workload, "accept on {:?}: {e}", listener.local_addr());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Records a connection reset because the agent had no descriptor to serve it.
fn refused_for_lack_of_descriptors(
    kind: Listener,
    peer: SocketAddr,
    pod: &PodProxy,
    shared: &ProxyShared,
    message: String,
) {
    let conn = match kind {
        Listener::Tunnel => inbound::tunnel_connection(peer, pod),
        Listener::Outbound => {
            let destination = shared
                .original_dsts
                .take(pod.netns.cookie(), peer.port())
                .unwrap_or(SocketAddrV4::new(Ipv4Addr::LOCALHOST, OUTBOUND_PORT));
            let meshed = !matches!(shared.mesh.cached(*destination.ip()), Membership::Outside);
            Connection {
                direction: Direction::Outbound,
                source: SocketAddr::V4(SocketAddrV4::new(pod.ip, peer.port())),
                source_identity: Some(pod.identity.to_string()),
                source_workload: Some(pod.workload.clone()),
                destination: SocketAddr::V4(destination),
                destination_identity: None,
                destination_workload: None,
                destination_service: None,
                peer_certificate_serial: None,
                security: if meshed {
                    Security::MutualTls
                } else {
                    Security::Plaintext
                },
            }
        }
    };
    shared.records.refused_noise(
        conn,
        Verdict::Failed,
        "fd_limit",
        format!("reset on accept: {message}"),
    );
}
