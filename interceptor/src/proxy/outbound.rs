//! Outbound: connections a pod made, redirected by connect4 to the pod's 127.0.0.1:15001.
//!
//! The original destination comes from the kernel map. A destination in the mesh is reached
//! over mutual TLS to its agent's tunnel port, and only that way; a destination outside the
//! mesh is reached in plaintext. Sockets to the destination are made in the pod's network
//! namespace, so they leave with the pod's address.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
};

use interceptor_common::TUNNEL_PORT;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    PodProxy, ProxyShared,
    header::{self, TunnelStatus},
    relay,
};
use crate::{
    mesh::{Membership, MeshPeer},
    records::{Connection, Direction, Security, Verdict},
    tls,
};

/// Serves one accepted connection.
pub(super) async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodProxy>,
    shared: Arc<ProxyShared>,
) {
    let Some(destination) = shared.original_dsts.take(pod.netns.cookie(), peer.port()) else {
        // Only connects the kernel redirected have an entry; anything else is not ours to carry.
        warn!(workload = %pod.workload, %peer, "no original destination for redirected connection");
        relay::reset(&client);
        return;
    };
    let ip = *destination.ip();
    let source = SocketAddr::V4(SocketAddrV4::new(pod.ip, peer.port()));
    match shared.mesh.resolve(ip).await {
        Membership::Meshed(peer) => {
            mutual_tls(&mut client, source, destination, &peer, &pod, &shared).await
        }
        Membership::Outside => plaintext(&mut client, source, destination, &pod, &shared).await,
        Membership::Unknown(why) => {
            // Fail closed: a destination the mesh cannot vouch for is not sent plaintext.
            let conn = new_connection(source, destination, &pod, None, Security::MutualTls);
            shared
                .records
                .refused(conn, Verdict::Failed, why.to_string());
            relay::reset(&client);
        }
    }
}

async fn mutual_tls(
    client: &mut TcpStream,
    source: SocketAddr,
    destination: SocketAddrV4,
    peer: &MeshPeer,
    pod: &PodProxy,
    shared: &ProxyShared,
) {
    let conn = new_connection(source, destination, pod, Some(peer), Security::MutualTls);
    // The destination agent answers within its own deadlines; this one bounds an agent that
    // does not answer at all.
    let limits = shared.admission.limits();
    let deadline = limits.handshake_timeout + limits.request_timeout;
    let opened = tokio::time::timeout(deadline, open_tunnel(destination, peer, pod))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the destination agent did not open the tunnel within {} s",
                deadline.as_secs()
            ))
        });
    let tunnel = match opened {
        Ok(tunnel) => tunnel,
        Err(reason) => {
            debug!(workload = %pod.workload, %destination, "tunnel failed: {reason}");
            shared.records.refused(conn, Verdict::Failed, reason);
            relay::reset(client);
            return;
        }
    };
    let mut tunnel = tunnel;
    relay::carry(shared.records.open(conn), client, &mut tunnel).await;
}

/// Connects to the destination agent, verifies it is the destination workload, and asks it to
/// connect to the destination port.
async fn open_tunnel(
    destination: SocketAddrV4,
    peer: &MeshPeer,
    pod: &PodProxy,
) -> Result<tokio_rustls::client::TlsStream<relay::ReadAhead<TcpStream>>, String> {
    let tcp = pod
        .netns
        .connect(SocketAddrV4::new(*destination.ip(), TUNNEL_PORT))
        .await
        .map_err(|e| format!("connecting to the destination agent: {e}"))?;
    let (mut tunnel, _server) =
        tls::connect(pod.tls.client(), &peer.identity, relay::ReadAhead::new(tcp))
            .await
            .map_err(|e| format!("mutual TLS with the destination agent: {e}"))?;
    header::write_request(&mut tunnel, destination.port())
        .await
        .map_err(|e| format!("tunnel request: {e}"))?;
    match header::read_status(&mut tunnel).await {
        Ok(TunnelStatus::Connected) => Ok(tunnel),
        Ok(status) => Err(status.describe().to_owned()),
        Err(e) => Err(format!("tunnel status: {e}")),
    }
}

async fn plaintext(
    client: &mut TcpStream,
    source: SocketAddr,
    destination: SocketAddrV4,
    pod: &PodProxy,
    shared: &ProxyShared,
) {
    let conn = new_connection(source, destination, pod, None, Security::Plaintext);
    let mut upstream = match pod.netns.connect(destination).await {
        Ok(upstream) => upstream,
        Err(e) => {
            shared.records.refused(
                conn,
                Verdict::Failed,
                format!("destination outside the mesh: {e}"),
            );
            relay::reset(client);
            return;
        }
    };
    relay::carry(shared.records.open(conn), client, &mut upstream).await;
}

fn new_connection(
    source: SocketAddr,
    destination: SocketAddrV4,
    pod: &PodProxy,
    peer: Option<&MeshPeer>,
    security: Security,
) -> Connection {
    Connection {
        direction: Direction::Outbound,
        source,
        source_identity: Some(pod.identity.to_string()),
        source_workload: Some(pod.workload.clone()),
        destination: SocketAddr::V4(destination),
        destination_identity: peer.map(|p| p.identity.to_string()),
        destination_workload: peer.map(|p| p.workload.clone()),
        security,
    }
}
