//! Outbound: connections a pod made, redirected by connect4 to the pod's 127.0.0.1:15001.
//!
//! The original destination comes from the kernel map. A destination in the mesh is reached
//! over mutual TLS to its agent's tunnel port, and only that way: as one HBONE stream on a
//! tunnel from this pod's pool ([`super::pool`]). A destination outside the mesh is reached in
//! plaintext. Sockets to the destination are made in the pod's network
//! namespace, so they leave with the pod's address.
//!
//! A Service's virtual address ([`crate::services`]) is resolved here first: its meshed ready
//! backends are tried in turn ([`MAX_BACKEND_ATTEMPTS`]), each over mutual TLS at its own
//! address and target port, with its own identity checked. A Service whose backends are all
//! outside the mesh is reached in plaintext at the address the caller asked for, which the
//! node's kube-proxy serves; one with a backend the mesh cannot vouch for, and no meshed one
//! that answers, fails, and is never downgraded to plaintext.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
};

use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    PodProxy, ProxyShared,
    relay::{self, Caller},
    stream::H2Stream,
};
use crate::{
    mesh::{Membership, MeshPeer},
    records::{Connection, Direction, Security, Verdict},
    services::{ServiceKey, ServiceLookup},
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
    let source = SocketAddr::V4(SocketAddrV4::new(pod.ip, peer.port()));
    let target = Target {
        source,
        destination,
        service: None,
    };
    match shared.services.lookup(destination) {
        ServiceLookup::NotAService => {
            let target = Target {
                service: shared.services.headless_service_of(destination),
                ..target
            };
            to_address(&mut client, target, &pod, &shared).await;
        }
        ServiceLookup::Service { service, backends } => {
            let target = Target {
                service: Some(service),
                ..target
            };
            to_service(&mut client, target, backends, &pod, &shared).await;
        }
        ServiceLookup::Unknown(why) => fail_closed(&client, target, &why, &pod, &shared),
    }
}

/// Where a connection goes, as the caller asked: what its record says.
struct Target {
    /// The caller, with the pod's address.
    source: SocketAddr,
    /// The original destination.
    destination: SocketAddrV4,
    /// The Service the destination belongs to, when it is one's.
    service: Option<ServiceKey>,
}

/// At most this many meshed backends of a Service are tried for one connection: each failed
/// attempt costs the caller up to a handshake deadline.
pub const MAX_BACKEND_ATTEMPTS: usize = 3;

/// A destination that is not a Service's virtual address: a pod or anything outside.
async fn to_address(client: &mut TcpStream, target: Target, pod: &PodProxy, shared: &ProxyShared) {
    match shared.mesh.resolve(*target.destination.ip()).await {
        Membership::Meshed(peer) => {
            let conn = new_connection(&target, pod, Some(&peer), Security::MutualTls);
            match stream_within_deadline(target.destination, target.source, &peer, pod, shared)
                .await
            {
                Ok(mut tunnel) => carry_meshed(conn, client, &mut tunnel, shared).await,
                Err(reason) => {
                    debug!(workload = %pod.workload, destination = %target.destination, "tunnel failed: {reason}");
                    shared.records.refused(conn, Verdict::Failed, reason);
                    relay::reset(client);
                }
            }
        }
        Membership::Outside => plaintext(client, &target, pod, shared).await,
        Membership::Unknown(why) => fail_closed(client, target, &why, pod, shared),
    }
}

/// Relays a meshed connection over its HBONE stream; the record names the certificate the
/// destination agent presented on the stream's tunnel.
async fn carry_meshed(
    mut conn: Connection,
    client: &mut TcpStream,
    tunnel: &mut H2Stream,
    shared: &ProxyShared,
) {
    conn.peer_certificate_serial = tunnel.peer_certificate_serial().map(str::to_owned);
    relay::carry_stream(shared.records.open(conn), client, tunnel, Caller::App).await;
}

/// A Service's virtual address: its meshed backends over mutual TLS, in turn; plaintext to
/// the virtual address only when every backend is outside the mesh.
async fn to_service(
    client: &mut TcpStream,
    target: Target,
    backends: Vec<SocketAddrV4>,
    pod: &PodProxy,
    shared: &ProxyShared,
) {
    let mut failures = Vec::new();
    let mut unknown = None;
    let mut attempts = 0;
    for backend in backends {
        let peer = match shared.mesh.resolve(*backend.ip()).await {
            Membership::Meshed(peer) => peer,
            Membership::Outside => continue,
            Membership::Unknown(why) => {
                unknown.get_or_insert(format!("backend {backend}: {why}"));
                continue;
            }
        };
        if attempts == MAX_BACKEND_ATTEMPTS {
            break;
        }
        attempts += 1;
        match stream_within_deadline(backend, target.source, &peer, pod, shared).await {
            Ok(mut tunnel) => {
                let conn = new_connection(&target, pod, Some(&peer), Security::MutualTls);
                carry_meshed(conn, client, &mut tunnel, shared).await;
                return;
            }
            Err(reason) => {
                debug!(workload = %pod.workload, %backend, "backend failed, trying the next: {reason}");
                failures.push(format!("backend {backend} ({}): {reason}", peer.workload));
            }
        }
    }
    match (failures.is_empty(), unknown) {
        // Every backend is outside the mesh (or there is none): kube-proxy's business.
        (true, None) => plaintext(client, &target, pod, shared).await,
        (true, Some(why)) => fail_closed(client, target, &why, pod, shared),
        (false, _) => {
            let conn = new_connection(&target, pod, None, Security::MutualTls);
            shared
                .records
                .refused(conn, Verdict::Failed, failures.join("; "));
            relay::reset(client);
        }
    }
}

/// Fails a connection whose destination the agent cannot vouch for: it is not sent
/// plaintext.
fn fail_closed(
    client: &TcpStream,
    target: Target,
    why: &str,
    pod: &PodProxy,
    shared: &ProxyShared,
) {
    let conn = new_connection(&target, pod, None, Security::MutualTls);
    shared
        .records
        .refused(conn, Verdict::Failed, why.to_owned());
    relay::reset(client);
}

/// A stream to `destination` over a pooled tunnel, bounded: the destination agent answers
/// within its own deadlines; this one bounds an agent that does not answer at all.
async fn stream_within_deadline(
    destination: SocketAddrV4,
    source: SocketAddr,
    peer: &MeshPeer,
    pod: &PodProxy,
    shared: &ProxyShared,
) -> Result<H2Stream, String> {
    let limits = shared.admission.limits();
    let deadline = limits.handshake_timeout + limits.request_timeout;
    tokio::time::timeout(
        deadline,
        pod.pool.stream(pod, &peer.identity, destination, source),
    )
    .await
    .unwrap_or_else(|_| {
        Err(format!(
            "the destination agent did not open the tunnel within {} s",
            deadline.as_secs()
        ))
    })
}

async fn plaintext(client: &mut TcpStream, target: &Target, pod: &PodProxy, shared: &ProxyShared) {
    let conn = new_connection(target, pod, None, Security::Plaintext);
    let mut upstream = match pod.netns.connect(target.destination).await {
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
    target: &Target,
    pod: &PodProxy,
    peer: Option<&MeshPeer>,
    security: Security,
) -> Connection {
    Connection {
        direction: Direction::Outbound,
        source: target.source,
        source_identity: Some(pod.identity.to_string()),
        source_workload: Some(pod.workload.clone()),
        destination: SocketAddr::V4(target.destination),
        destination_identity: peer.map(|p| p.identity.to_string()),
        destination_workload: peer.map(|p| p.workload.clone()),
        destination_service: target.service.clone(),
        peer_certificate_serial: None,
        security,
    }
}
