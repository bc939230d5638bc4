//! Inbound: mutual TLS from other agents on the pod's tunnel port, delivered to the app at the
//! pod's own address, from the caller's address.
//!
//! The server certificate is the pod's; the client must present a certificate of the mesh's
//! trust domain, which [`crate::tls`] checks during the handshake. The delivery
//! ([`crate::delivery`]) reaches the app where an outside caller would, so a service bound
//! only to the pod's loopback stays private. It is made inside the pod's namespace and so
//! enters over the loopback device, which is how the kernel's door (sk_lookup) tells it from
//! plaintext arriving at the pod's address.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
};

use tokio::net::TcpStream;
use tracing::debug;

use super::{
    PodProxy, ProxyShared,
    header::{self, TunnelStatus},
    relay,
};
use crate::{
    delivery,
    records::{Connection, Direction, Security, Verdict},
    tls,
};

/// Serves one accepted connection.
pub(super) async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodProxy>,
    shared: Arc<ProxyShared>,
) {
    let mut conn = Connection {
        direction: Direction::Inbound,
        source: peer,
        source_identity: None,
        source_workload: None,
        destination: SocketAddr::V4(SocketAddrV4::new(pod.ip, interceptor_common::TUNNEL_PORT)),
        destination_identity: Some(pod.identity.to_string()),
        destination_workload: Some(pod.workload.clone()),
        security: Security::MutualTls,
    };
    let (mut tunnel, client) =
        match tls::accept(pod.tls.server(), relay::ReadAhead::new(stream)).await {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!(workload = %pod.workload, %peer, "tunnel handshake refused: {e}");
                shared.records.refused(
                    conn,
                    Verdict::Dropped,
                    format!("mutual TLS handshake refused: {e}"),
                );
                return;
            }
        };
    conn.source_identity = Some(client.to_string());
    conn.source_workload = shared
        .directory
        .lookup(ip_of(peer))
        .ok()
        .flatten()
        .map(|entry| entry.workload);
    let port = match header::read_request(&mut tunnel).await {
        Ok(port) => port,
        Err(e) => {
            shared
                .records
                .refused(conn, Verdict::Failed, format!("tunnel request: {e}"));
            return;
        }
    };
    conn.destination = SocketAddr::V4(SocketAddrV4::new(pod.ip, port));
    let app_addr = SocketAddrV4::new(pod.ip, port);
    let mut app = match delivery::connect(&pod.netns, ip_of(peer), app_addr).await {
        Ok(app) => app,
        Err(e) => {
            let status = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                TunnelStatus::Refused
            } else {
                TunnelStatus::Unreachable
            };
            let _ = header::write_status(&mut tunnel, status).await;
            shared
                .records
                .refused(conn, Verdict::Failed, format!("{}: {e}", status.describe()));
            return;
        }
    };
    if let Err(e) = header::write_status(&mut tunnel, TunnelStatus::Connected).await {
        relay::reset(&app);
        shared
            .records
            .refused(conn, Verdict::Failed, format!("tunnel status: {e}"));
        return;
    }
    let id = shared.records.open(conn);
    match relay::relay(&mut tunnel, &mut app).await {
        Ok(moved) => shared
            .records
            .close(id, moved.to_destination, moved.to_caller, None),
        Err(e) => {
            relay::reset(&app);
            relay::reset(tunnel.get_ref().0.get_ref());
            shared.records.close(id, 0, 0, Some(format!("relay: {e}")));
        }
    }
}

fn ip_of(addr: SocketAddr) -> Ipv4Addr {
    match addr {
        SocketAddr::V4(v4) => *v4.ip(),
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
    }
}
