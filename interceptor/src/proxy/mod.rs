//! The agent's per-pod proxies.
//!
//! For every enrolled pod the agent opens, inside the pod's network namespace:
//! - `127.0.0.1:15001`, the outbound listener the connect4 program redirects the pod's connects
//!   to ([`outbound`]);
//! - `<pod ip>:15008`, the mutual-TLS tunnel listener other agents connect to ([`inbound`]).
//!
//! Both ends of a tunnel speak the small header in [`header`] after the TLS handshake; bytes
//! are then relayed by [`relay`].

pub mod header;
pub mod inbound;
pub mod outbound;
pub mod relay;

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
};

use interceptor_common::{OUTBOUND_PORT, TUNNEL_PORT};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tracing::warn;

use crate::{
    directory::MeshDirectory, ebpf::Kernel, identity::Identity, netns::PodNetns,
    records::RecordStore, tls::PodTls, workloads::WorkloadKey,
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
}

/// Agent-wide state the proxies use.
pub struct ProxyShared {
    /// The kernel maps (original destinations).
    pub kernel: Arc<Mutex<Kernel>>,
    /// Which destinations are in the mesh.
    pub directory: MeshDirectory,
    /// Where connections are recorded.
    pub records: Arc<RecordStore>,
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
            outbound::handle,
        )),
        tokio::spawn(accept_loop(tunnel_listener, pod, shared, inbound::handle)),
    ])
}

/// Accepts connections until the task is aborted, serving each in its own task.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    pod: Arc<PodProxy>,
    shared: Arc<ProxyShared>,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, Arc<PodProxy>, Arc<ProxyShared>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(handle(stream, peer, pod.clone(), shared.clone()));
            }
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning.
                warn!(workload = %pod.workload, "accept on {:?}: {e}", listener.local_addr());
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
