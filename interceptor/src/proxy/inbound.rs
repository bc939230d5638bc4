//! Inbound: mutual TLS from other agents on the pod's tunnel port, delivered to the app at the
//! pod's own address, from the caller's address.
//!
//! The server certificate is the pod's; the client must present a certificate of the mesh's
//! trust domain, which [`crate::tls`] checks during the handshake. The delivery
//! ([`crate::delivery`]) reaches the app where an outside caller would, so a service bound
//! only to the pod's loopback stays private. It is made inside the pod's namespace and so
//! enters over the loopback device, which is how the kernel's door (sk_lookup) tells it from
//! plaintext arriving at the pod's address.
//!
//! Until a caller has completed the handshake and sent its tunnel request it is
//! unauthenticated: [`admit`] caps such connections per source and per agent, each stage has
//! a deadline, and a connection refused in this stage is reset (`SO_LINGER` 0, so it leaves
//! no state behind) and recorded as aggregated noise, so a flood cannot push the records of
//! real connections out of the store.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
};

use tokio::{net::TcpStream, time::timeout};
use tracing::debug;

use super::{
    PodProxy, ProxyShared,
    admission::Permit,
    header::{self, TunnelStatus},
    relay,
};
use crate::{
    delivery,
    mesh::Membership,
    records::{Connection, Direction, Security, Verdict},
    tls,
};

/// Admits a connection to the tunnel port, or resets and records it at once when its source
/// or the agent is over the cap of unauthenticated connections.
pub(super) fn admit(
    stream: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodProxy>,
    shared: Arc<ProxyShared>,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    // Until the request is read, any close is a reset: no FIN_WAIT or TIME_WAIT is left for
    // a caller that proved nothing.
    relay::reset(&stream);
    match shared.admission.admit(peer.ip()) {
        Ok(permit) => Some(handle(stream, peer, pod, shared, permit)),
        Err(refusal) => {
            drop(stream);
            shared.records.refused_noise(
                tunnel_connection(peer, &pod),
                Verdict::Dropped,
                refusal.label(),
                refusal.describe(),
            );
            None
        }
    }
}

/// The record of a connection to the pod's tunnel port, before anything is known of it.
pub(super) fn tunnel_connection(peer: SocketAddr, pod: &PodProxy) -> Connection {
    Connection {
        direction: Direction::Inbound,
        source: peer,
        source_identity: None,
        source_workload: None,
        destination: SocketAddr::V4(SocketAddrV4::new(pod.ip, interceptor_common::TUNNEL_PORT)),
        destination_identity: Some(pod.identity.to_string()),
        destination_workload: Some(pod.workload.clone()),
        destination_service: None,
        security: Security::MutualTls,
    }
}

/// Serves one admitted connection.
async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodProxy>,
    shared: Arc<ProxyShared>,
    permit: Permit,
) {
    let mut conn = tunnel_connection(peer, &pod);
    let limits = *shared.admission.limits();
    let handshake = timeout(
        limits.handshake_timeout,
        tls::accept(pod.tls.server(), relay::ReadAhead::new(stream)),
    );
    let (mut tunnel, client) = match handshake.await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(e)) => {
            debug!(workload = %pod.workload, %peer, "tunnel handshake refused: {e}");
            shared.records.refused_noise(
                conn,
                Verdict::Dropped,
                "handshake_failed",
                format!("mutual TLS handshake refused: {e}"),
            );
            return;
        }
        Err(_) => {
            shared.records.refused_noise(
                conn,
                Verdict::Dropped,
                "handshake_timeout",
                format!(
                    "reset: no mutual TLS handshake within {} s (--tunnel-handshake-timeout-secs)",
                    limits.handshake_timeout.as_secs()
                ),
            );
            return;
        }
    };
    conn.source_identity = Some(client.to_string());
    // The caller is authenticated; its workload name only labels the record.
    conn.source_workload = match shared.mesh.resolve(ip_of(peer)).await {
        Membership::Meshed(caller) => Some(caller.workload.clone()),
        _ => None,
    };
    let port = match timeout(limits.request_timeout, header::read_request(&mut tunnel)).await {
        Ok(Ok(port)) => port,
        Ok(Err(e)) => {
            shared.records.refused_noise(
                conn,
                Verdict::Failed,
                "request_failed",
                format!("tunnel request: {e}"),
            );
            return;
        }
        Err(_) => {
            shared.records.refused_noise(
                conn,
                Verdict::Failed,
                "request_timeout",
                format!(
                    "reset: no tunnel request within {} s of the handshake (--tunnel-request-timeout-secs)",
                    limits.request_timeout.as_secs()
                ),
            );
            return;
        }
    };
    // Authenticated and asked for a port: from here on the connection closes gracefully.
    drop(permit);
    graceful_close(tunnel.get_ref().0.get_ref());
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
    relay::carry(shared.records.open(conn), &mut tunnel, &mut app).await;
}

/// Clears the zero linger set at accept, so the connection ends with a FIN again.
fn graceful_close(stream: &TcpStream) {
    // Deprecated because a non-zero linger blocks on drop; `None` turns lingering off.
    #[allow(deprecated)]
    let _ = stream.set_linger(None);
}

fn ip_of(addr: SocketAddr) -> Ipv4Addr {
    match addr {
        SocketAddr::V4(v4) => *v4.ip(),
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
    }
}
