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
//! A tunnel is an HTTP/2 connection (HBONE, [`super::hbone`]); each CONNECT request on it is
//! one connection to the app, served in its own task, with its own record. A request that
//! fails (malformed, or for a port nobody listens on) is answered with its status and fails
//! alone; the tunnel and its other streams go on.
//!
//! Until a caller has completed the handshake and sent its first tunnel request it is
//! unauthenticated: [`admit`] caps such connections per source and per agent, each stage has
//! a deadline, a connection refused before its certificate is verified is reset (`SO_LINGER`
//! 0, so it leaves no state behind), and every refusal in this stage is recorded as
//! aggregated noise, so a flood cannot push the records of
//! real connections out of the store.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use tokio::{net::TcpStream, time::timeout};
use tracing::debug;

use super::{
    PodProxy, ProxyShared,
    admission::Permit,
    hbone::{self, Outcome},
    pool,
    relay::{self, Caller},
    stream::H2Stream,
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
        peer_certificate_serial: None,
        security: Security::MutualTls,
    }
}

/// Serves one admitted connection: the handshake, then its streams until the tunnel ends.
async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodProxy>,
    shared: Arc<ProxyShared>,
    permit: Permit,
) {
    let mut conn = tunnel_connection(peer, &pod);
    let limits = *shared.admission.limits();
    pool::keep_alive(&stream);
    let handshake = timeout(
        limits.handshake_timeout,
        tls::accept(pod.tls.server(), relay::ReadAhead::new(stream)),
    );
    let (tunnel, client) = match handshake.await {
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
    // Authenticated by its certificate: from here on the tunnel closes gracefully (the
    // HTTP/2 connection takes the socket, so this is the last chance to say so).
    graceful_close(tunnel.get_ref().0.get_ref());
    conn.source_identity = Some(client.to_string());
    conn.peer_certificate_serial = tls::peer_certificate_serial(tunnel.get_ref().1).ok();
    // The caller is authenticated; its workload name only labels the record.
    conn.source_workload = match shared.mesh.resolve(ip_of(peer)).await {
        Membership::Meshed(caller) => Some(caller.workload.clone()),
        _ => None,
    };
    let first = timeout(limits.request_timeout, async {
        let mut connection = hbone::server_builder()
            .handshake::<_, Bytes>(tunnel)
            .await?;
        let first = connection.accept().await.transpose()?;
        Ok::<_, h2::Error>((connection, first))
    });
    let (mut connection, first) = match first.await {
        Ok(Ok((connection, Some(first)))) => (connection, first),
        Ok(Ok((_, None))) => {
            shared.records.refused_noise(
                conn,
                Verdict::Failed,
                "request_failed",
                "tunnel closed before its first request".to_owned(),
            );
            return;
        }
        Ok(Err(e)) => {
            shared.records.refused_noise(
                conn,
                Verdict::Failed,
                "request_failed",
                format!("tunnel request: not HTTP/2 (HBONE): {e}"),
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
    // Authenticated and asked for a stream: it no longer counts as pending.
    drop(permit);
    let caller = ip_of(peer);
    let serve = |(request, respond)| {
        tokio::spawn(serve_stream(
            request,
            respond,
            conn.clone(),
            caller,
            pod.clone(),
            shared.clone(),
        ));
    };
    serve(first);
    loop {
        match connection.accept().await {
            Some(Ok(stream)) => serve(stream),
            Some(Err(e)) => {
                // Its streams fail with the same error, and their relays reset the apps.
                debug!(workload = %pod.workload, %peer, "tunnel failed: {e}");
                break;
            }
            None => break,
        }
    }
}

/// Serves one CONNECT request: connects to the app, answers, and relays. `conn` is the
/// tunnel's record template (caller and identities).
async fn serve_stream(
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    mut conn: Connection,
    caller: Ipv4Addr,
    pod: Arc<PodProxy>,
    shared: Arc<ProxyShared>,
) {
    let (parts, recv) = request.into_parts();
    let asked = match hbone::parse_request(&parts, pod.ip, caller) {
        Ok(asked) => asked,
        Err(e) => {
            let _ = respond.send_response(Outcome::BadRequest.response(), true);
            shared.records.refused(
                conn,
                Verdict::Failed,
                format!("tunnel request refused: {e}"),
            );
            return;
        }
    };
    conn.destination = SocketAddr::V4(asked.destination);
    if let Some(source) = asked.forwarded_for {
        conn.source = SocketAddr::V4(source);
    }
    let mut app = match delivery::connect(&pod.netns, caller, asked.destination).await {
        Ok(app) => app,
        Err(e) => {
            let outcome = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                Outcome::Refused
            } else {
                Outcome::Unreachable
            };
            let _ = respond.send_response(outcome.response(), true);
            shared.records.refused(
                conn,
                Verdict::Failed,
                format!("{}: {e}", Outcome::describe_status(outcome.status())),
            );
            return;
        }
    };
    let send = match respond.send_response(Outcome::Connected.response(), false) {
        Ok(send) => send,
        Err(e) => {
            relay::reset(&app);
            shared
                .records
                .refused(conn, Verdict::Failed, format!("tunnel response: {e}"));
            return;
        }
    };
    let mut stream = H2Stream::new(send, recv, None);
    relay::carry_stream(
        shared.records.open(conn),
        &mut app,
        &mut stream,
        Caller::Stream,
    )
    .await;
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
