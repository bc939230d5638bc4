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
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
};

use interceptor_common::{OUTBOUND_PORT, TUNNEL_PORT};
use rustls::{ClientConfig, ServerConfig};
use tokio::task::JoinHandle;

use crate::{
    directory::MeshDirectory, ebpf::Kernel, identity::Identity, netns::PodNetns,
    records::RecordStore, workloads::WorkloadKey,
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
    /// TLS client configuration with the pod's certificate (reused, so sessions resume).
    pub client_tls: Arc<ClientConfig>,
    /// TLS server configuration with the pod's certificate.
    pub server_tls: Arc<ServerConfig>,
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
        tokio::spawn(outbound::serve(
            outbound_listener,
            pod.clone(),
            shared.clone(),
        )),
        tokio::spawn(inbound::serve(tunnel_listener, pod, shared)),
    ])
}
