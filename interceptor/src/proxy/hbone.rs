//! HBONE, the tunnel protocol between agents: HTTP/2 `CONNECT` over mutual TLS 1.3 on port
//! 15008, one HTTP/2 stream per proxied connection, as Istio ambient's ztunnel speaks it.
//!
//! Every field and where it comes from (ztunnel's `src/proxy/outbound.rs`, `inbound.rs`,
//! `h2/client.rs`, `h2/server.rs`, `baggage.rs` and `config.rs`, read at commit 62d8265):
//!
//! | field | value | source |
//! |---|---|---|
//! | TLS | 1.3, both sides present SPIFFE certificates of the trust domain | ztunnel's mTLS |
//! | ALPN | `h2` ([`crate::tls::ALPN_PROTOCOL`]) | ztunnel's TLS configs offer and require `h2` |
//! | method | `CONNECT` (not the extended CONNECT of RFC 8441: no `:protocol`, `:scheme` or `:path`) | `create_hbone_request`; inbound answers 400 to anything else |
//! | `:authority` | the destination `ip:port`, the pod's own address | `hbone_target_destination`; inbound parses it as a socket address and checks the IP is the pod's |
//! | `forwarded` | `for="<source ip:port>"` (RFC 7239), the calling app's address | `build_forwarded` |
//! | `baggage` | `k8s.namespace.name=<ns>,k8s.pod.name=<pod>` (W3C baggage) | `baggage_header_val`; optional, used for telemetry |
//! | `traceparent` | not sent | ztunnel sends one per request for tracing; its inbound does not require it |
//! | response | `200` once the destination accepted; `400` for a malformed request; `503` when the destination cannot be reached | inbound's `InboundError` codes |
//! | pool key | (source identity, destination identity, destination address, source address) | `WorkloadKey` |
//! | settings | stream window 4 MiB, connection window 16 MiB, frame size 1 MiB, 100 streams per tunnel | `config.rs` defaults |
//!
//! What interceptor adds, still valid HTTP/2 a ztunnel peer accepts: a destination that refused
//! the connection is answered `503`, one that did not answer `504`, so the calling agent can
//! tell the two apart in its records (ztunnel answers `503` for both and reads any non-200 as a
//! failure). The source address the app sees is the calling pod's; its port is the delivery
//! socket's own, and the caller's original port is in the record (from `forwarded`).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use http::{HeaderValue, Method, Request, Response, StatusCode, request::Parts};

use crate::workloads::WorkloadKey;

/// Per-stream flow-control window: one stream can have this much in flight.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-tunnel window, a multiple of the stream window so one stream that is not read cannot
/// stall the tunnel's other streams.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame either side accepts.
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Largest header block accepted: HBONE requests carry a handful of short headers.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Streams a server accepts at once on one tunnel; clients open at most
/// `--tunnel-max-streams` (100) per tunnel, so this leaves room for a peer with a larger limit.
pub const SERVER_MAX_STREAMS: u32 = 256;

/// The HTTP/2 settings of a tunnel's client side, carrying at most `max_streams` at once.
pub fn client_builder(max_streams: usize) -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .initial_max_send_streams(max_streams)
        .enable_push(false);
    builder
}

/// The HTTP/2 settings of a tunnel's server side.
pub fn server_builder() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(SERVER_MAX_STREAMS);
    builder
}

/// The request asking the destination's agent to connect to `destination`, on behalf of
/// `source`, the calling app's address, in pod `workload`.
pub fn connect_request(
    destination: SocketAddrV4,
    source: SocketAddr,
    workload: &WorkloadKey,
) -> Request<()> {
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(destination.to_string())
        .version(http::Version::HTTP_2)
        .header(http::header::FORWARDED, format!("for=\"{source}\""));
    let baggage = format!(
        "k8s.namespace.name={},k8s.pod.name={}",
        workload.namespace, workload.name
    );
    // Names are DNS labels and subdomains, always valid header text; skip it otherwise.
    if let Ok(value) = HeaderValue::from_str(&baggage) {
        request = request.header("baggage", value);
    }
    request
        .body(())
        .expect("a CONNECT to a socket address is a valid request")
}

/// A tunnel request the server accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Where the caller asked to be connected: this pod, at a port.
    pub destination: SocketAddrV4,
    /// The calling app's address, from `forwarded`, when it names the tunnel's own source.
    pub forwarded_for: Option<SocketAddrV4>,
}

/// Why a tunnel request is refused before any connection is tried.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// Only CONNECT opens a stream.
    #[error("tunnel request with method {0}: only CONNECT is served")]
    NotConnect(String),
    /// CONNECT without `:authority`.
    #[error("tunnel request without an :authority (the destination ip:port)")]
    NoAuthority,
    /// `:authority` that is not an IPv4 socket address.
    #[error("tunnel request for {0:?}: the :authority must be the destination ip:port")]
    BadAuthority(String),
    /// A destination that is not the pod this tunnel port belongs to.
    #[error("tunnel request for {asked}, but this tunnel port serves {pod}")]
    NotThisPod {
        /// The address asked for.
        asked: SocketAddrV4,
        /// The pod's address.
        pod: Ipv4Addr,
    },
    /// Port 0 cannot be connected to.
    #[error("tunnel request for port 0")]
    PortZero,
}

/// Checks a request arriving on `pod`'s tunnel port; `peer` is the tunnel's source address,
/// which a `forwarded` address must match to be believed.
pub fn parse_request(
    parts: &Parts,
    pod: Ipv4Addr,
    peer: Ipv4Addr,
) -> Result<ConnectRequest, RequestError> {
    if parts.method != Method::CONNECT {
        return Err(RequestError::NotConnect(parts.method.to_string()));
    }
    let authority = parts
        .uri
        .authority()
        .ok_or(RequestError::NoAuthority)?
        .as_str();
    let destination: SocketAddrV4 = authority
        .parse()
        .map_err(|_| RequestError::BadAuthority(authority.to_owned()))?;
    if *destination.ip() != pod {
        return Err(RequestError::NotThisPod {
            asked: destination,
            pod,
        });
    }
    if destination.port() == 0 {
        return Err(RequestError::PortZero);
    }
    let forwarded_for = parts
        .headers
        .get(http::header::FORWARDED)
        .and_then(|value| value.to_str().ok())
        .and_then(forwarded_for)
        .filter(|source| *source.ip() == peer);
    Ok(ConnectRequest {
        destination,
        forwarded_for,
    })
}

/// The first `for=` address of a `forwarded` header, quoted or not.
fn forwarded_for(header: &str) -> Option<SocketAddrV4> {
    header
        .split([';', ','])
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("for"))
        .and_then(|(_, value)| value.trim().trim_matches('"').parse().ok())
}

/// How a tunnel request ended on the server, as its response status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Connected to the destination: the stream carries the connection.
    Connected,
    /// The request itself was malformed or not for this pod.
    BadRequest,
    /// The destination refused the connection.
    Refused,
    /// The destination could not be reached in time.
    Unreachable,
}

impl Outcome {
    /// The response status for this outcome.
    pub fn status(self) -> StatusCode {
        match self {
            Self::Connected => StatusCode::OK,
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Refused => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unreachable => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The response carrying this outcome.
    pub fn response(self) -> Response<()> {
        Response::builder()
            .status(self.status())
            .body(())
            .expect("a status-only response is valid")
    }

    /// What the calling agent's record says for a response status other than 200.
    pub fn describe_status(status: StatusCode) -> String {
        match status {
            StatusCode::SERVICE_UNAVAILABLE => "destination refused the connection".to_owned(),
            StatusCode::GATEWAY_TIMEOUT => "destination unreachable from its agent".to_owned(),
            StatusCode::BAD_REQUEST => {
                "the destination agent refused the tunnel request (400)".to_owned()
            }
            other => format!("the destination agent answered {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(request: Request<()>) -> Parts {
        request.into_parts().0
    }

    const POD: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
    const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);

    #[test]
    fn the_request_a_client_sends_is_the_one_the_server_accepts() {
        let workload = WorkloadKey {
            namespace: "default".into(),
            name: "sleep".into(),
        };
        let source = SocketAddr::V4(SocketAddrV4::new(PEER, 40_000));
        let request = connect_request(SocketAddrV4::new(POD, 8080), source, &workload);
        assert_eq!(request.method(), Method::CONNECT);
        assert_eq!(request.uri().to_string(), "198.18.0.20:8080");
        assert_eq!(request.headers()["forwarded"], "for=\"198.18.0.10:40000\"");
        assert_eq!(
            request.headers()["baggage"],
            "k8s.namespace.name=default,k8s.pod.name=sleep"
        );
        let accepted = parse_request(&parts(request), POD, PEER).unwrap();
        assert_eq!(accepted.destination, SocketAddrV4::new(POD, 8080));
        assert_eq!(
            accepted.forwarded_for,
            Some(SocketAddrV4::new(PEER, 40_000))
        );
    }

    #[test]
    fn a_request_shaped_like_ztunnels_is_accepted() {
        // ztunnel's CONNECT: authority, baggage, forwarded and traceparent.
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri("198.18.0.20:9090")
            .header("baggage", "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep,service.version=v1")
            .header("forwarded", "for=\"198.18.0.10:51234\"")
            .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .body(())
            .unwrap();
        let accepted = parse_request(&parts(request), POD, PEER).unwrap();
        assert_eq!(accepted.destination.port(), 9090);
        assert_eq!(accepted.forwarded_for, Some(SocketAddrV4::new(PEER, 51234)));
    }

    #[test]
    fn bad_requests_name_what_is_wrong() {
        let request = |method: Method, uri: &str| {
            parts(Request::builder().method(method).uri(uri).body(()).unwrap())
        };
        assert_eq!(
            parse_request(&request(Method::GET, "http://198.18.0.20/"), POD, PEER),
            Err(RequestError::NotConnect("GET".into()))
        );
        assert_eq!(
            parse_request(&request(Method::CONNECT, "example.com:80"), POD, PEER),
            Err(RequestError::BadAuthority("example.com:80".into()))
        );
        assert_eq!(
            parse_request(&request(Method::CONNECT, "198.18.0.99:80"), POD, PEER),
            Err(RequestError::NotThisPod {
                asked: "198.18.0.99:80".parse().unwrap(),
                pod: POD
            })
        );
        assert_eq!(
            parse_request(&request(Method::CONNECT, "198.18.0.20:0"), POD, PEER),
            Err(RequestError::PortZero)
        );
    }

    #[test]
    fn a_forwarded_address_of_another_host_is_not_believed() {
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri("198.18.0.20:80")
            .header("forwarded", "for=\"10.0.0.1:1234\"")
            .body(())
            .unwrap();
        let accepted = parse_request(&parts(request), POD, PEER).unwrap();
        assert_eq!(accepted.forwarded_for, None);
        assert_eq!(
            forwarded_for("by=x;For=198.18.0.10:7"),
            Some("198.18.0.10:7".parse().unwrap())
        );
    }
}
