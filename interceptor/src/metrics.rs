//! The HTTP admin port: Prometheus metrics with Istio's names and labels, the DaemonSet's
//! probes, and the traffic graph page ([`crate::web`]). Read-only. Readiness
//! (`/healthz/ready`) is served only once the agent has loaded its kernel programs, restored
//! its workloads and bound its admin socket (this server starts last). Liveness
//! (`/healthz/live`) asks only that the runtime still answers: restarting helps a wedged
//! agent, never one that waits for something else.

use std::{fmt::Write as _, future::Future, pin::Pin, sync::Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    admin::protocol::StatusReport,
    ebpf::CounterReader,
    memory::MemoryFigures,
    proxy::{
        admission::Admission,
        pool::{TunnelFigures, TunnelMetrics},
    },
    records::{MetricsSnapshot, RecordStore},
    web,
};

/// Where the traffic graph's data comes from: the same report `interceptor status` gets, so
/// the page and the CLI can never disagree. Implemented by the agent; read-only.
pub trait StatusSource: Send + Sync {
    /// Totals per workload, kernel counters and recent records, as `status` reports them.
    fn status(&self) -> Pin<Box<dyn Future<Output = StatusReport> + Send + '_>>;
}

/// What the metrics port reads: narrow handles, not the agent.
pub struct MetricsSources {
    /// Connection records and their counters.
    pub records: Arc<RecordStore>,
    /// The kernel programs' counters.
    pub counters: Arc<CounterReader>,
    /// Unauthenticated tunnel connections.
    pub admission: Arc<Admission>,
    /// Pooled tunnels per pod.
    pub tunnels: Arc<TunnelMetrics>,
    /// The status report behind the traffic graph page.
    pub status: Arc<dyn StatusSource>,
}

/// Serves until the task is aborted.
pub async fn serve(listener: TcpListener, sources: Arc<MetricsSources>) {
    loop {
        if let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(handle(stream, sources.clone()));
        }
    }
}

async fn handle(mut stream: TcpStream, sources: Arc<MetricsSources>) {
    let mut request = vec![0u8; 4096];
    let Ok(n) = stream.read(&mut request).await else {
        return;
    };
    let request = String::from_utf8_lossy(&request[..n]);
    let mut words = request.split_whitespace();
    let method = words.next().unwrap_or("");
    let target = words.next().unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers = String::new();
    let (status, content_type, body) = if method != "GET" && method != "HEAD" {
        // Read-only: nothing on this port changes the agent.
        headers.push_str("Allow: GET, HEAD\r\n");
        (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "this port is read-only: only GET and HEAD\n".to_owned(),
        )
    } else {
        match path {
            "/metrics" => ("200 OK", "text/plain; version=0.0.4", {
                let mut text = render(
                    &sources.records.metrics(),
                    &sources.counters.read(),
                    sources.admission.pending(),
                    &sources.tunnels.snapshot(),
                );
                // Without the allocator's figures the rest is still worth serving.
                match MemoryFigures::read() {
                    Ok(memory) => memory.render(&mut text),
                    Err(error) => tracing::warn!("{error}"),
                }
                text
            }),
            "/healthz/ready" => ("200 OK", "text/plain", "ready\n".to_owned()),
            "/healthz/live" => ("200 OK", "text/plain", "alive\n".to_owned()),
            _ => match web::route(path, query, sources.status.as_ref()).await {
                Some(reply) => {
                    let _ = write!(
                        headers,
                        "Content-Security-Policy: {}\r\nCache-Control: no-store\r\n",
                        web::CONTENT_SECURITY_POLICY
                    );
                    (reply.status, reply.content_type, reply.body)
                }
                None => ("404 Not Found", "text/plain", "not found\n".to_owned()),
            },
        }
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nX-Content-Type-Options: nosniff\r\n{headers}Connection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    if method != "HEAD" {
        let _ = stream.write_all(body.as_bytes()).await;
    }
}

/// Picks one counter out of an edge's counters.
type CounterOf = fn(&crate::records::EdgeCounters) -> u64;
/// Picks one figure out of a pod's tunnel figures.
type FigureOf = fn(&TunnelFigures) -> u64;

/// The Prometheus text exposition of the agent's counters; `pending_tunnels` is the number of
/// unauthenticated tunnel connections now, `tunnels` each pod's pooled tunnels.
pub fn render(
    metrics: &MetricsSnapshot,
    kernel: &crate::admin::protocol::KernelCounters,
    pending_tunnels: usize,
    tunnels: &[TunnelFigures],
) -> String {
    let mut out = String::new();
    let families: [(&str, &str, CounterOf); 4] = [
        (
            "istio_tcp_connections_opened_total",
            "TCP connections opened",
            |c| c.opened,
        ),
        (
            "istio_tcp_connections_closed_total",
            "TCP connections closed",
            |c| c.closed,
        ),
        (
            "istio_tcp_sent_bytes_total",
            "Bytes sent by the caller",
            |c| c.sent_bytes,
        ),
        (
            "istio_tcp_received_bytes_total",
            "Bytes received by the caller",
            |c| c.received_bytes,
        ),
    ];
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} counter");
        for (labels, counters) in &metrics.edges {
            let _ = writeln!(
                out,
                "{name}{{reporter=\"{}\",source_workload=\"{}\",source_workload_namespace=\"{}\",source_principal=\"{}\",destination_workload=\"{}\",destination_workload_namespace=\"{}\",destination_principal=\"{}\",destination_service=\"{}\",destination_service_name=\"{}\",destination_service_namespace=\"{}\",connection_security_policy=\"{}\"}} {}",
                labels.reporter,
                escape(&labels.source_workload),
                escape(&labels.source_workload_namespace),
                escape(&labels.source_principal),
                escape(&labels.destination_workload),
                escape(&labels.destination_workload_namespace),
                escape(&labels.destination_principal),
                escape(&labels.destination_service),
                escape(&labels.destination_service_name),
                escape(&labels.destination_service_namespace),
                labels.connection_security_policy,
                value(counters)
            );
        }
    }
    let name = "interceptor_dropped_connections_total";
    let _ = writeln!(
        out,
        "# HELP {name} Connections dropped by policy or failed, by reason.\n# TYPE {name} counter"
    );
    for (labels, count) in &metrics.drops {
        let _ = writeln!(
            out,
            "{name}{{reason=\"{}\",destination_workload=\"{}\",destination_workload_namespace=\"{}\"}} {count}",
            labels.reason,
            escape(&labels.destination_workload),
            escape(&labels.destination_workload_namespace)
        );
    }
    let name = "interceptor_refused_connections_total";
    let _ = writeln!(
        out,
        "# HELP {name} Connections reset or refused before they were authenticated and served, by listener and reason; every one is counted, also when its records were aggregated.\n# TYPE {name} counter"
    );
    for (labels, count) in &metrics.refusals {
        let _ = writeln!(
            out,
            "{name}{{listener=\"{}\",reason=\"{}\",workload=\"{}\",workload_namespace=\"{}\"}} {count}",
            labels.listener,
            labels.reason,
            escape(&labels.workload),
            escape(&labels.workload_namespace)
        );
    }
    let name = "interceptor_tunnel_pending_connections";
    let _ = writeln!(
        out,
        "# HELP {name} Tunnel connections not yet authenticated (handshake or request pending).\n# TYPE {name} gauge\n{name} {pending_tunnels}"
    );
    let tunnel_families: [(&str, &str, &str, FigureOf); 3] = [
        (
            "interceptor_hbone_tunnels_opened_total",
            "counter",
            "Pooled HBONE tunnels (mutual-TLS HTTP/2 connections) opened for the pod's outbound connections",
            |f| f.opened,
        ),
        (
            "interceptor_hbone_streams_opened_total",
            "counter",
            "HBONE streams (one per meshed outbound connection) opened over the pod's tunnels",
            |f| f.streams,
        ),
        (
            "interceptor_hbone_tunnels_open",
            "gauge",
            "The pod's pooled HBONE tunnels open now",
            |f| f.open,
        ),
    ];
    for (name, kind, help, value) in tunnel_families {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} {kind}");
        for figures in tunnels {
            let _ = writeln!(
                out,
                "{name}{{workload=\"{}\",workload_namespace=\"{}\"}} {}",
                escape(&figures.workload.name),
                escape(&figures.workload.namespace),
                value(figures)
            );
        }
    }
    let kernel_counters = [
        (
            "interceptor_kernel_redirected_connects_total",
            "Pod connects redirected to the agent by the kernel",
            kernel.redirected,
        ),
        (
            "interceptor_kernel_plaintext_refused_total",
            "Plaintext SYNs refused by the kernel under STRICT, also while the agent was down",
            kernel.strict_drops,
        ),
        (
            "interceptor_kernel_plaintext_accepted_total",
            "Plaintext connections accepted by pods from outside the mesh",
            kernel.plaintext_accepted,
        ),
        (
            "interceptor_kernel_events_lost_total",
            "Kernel events lost because the ring buffer was full",
            kernel.events_lost,
        ),
    ];
    for (name, help, value) in kernel_counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}.\n# TYPE {name} counter\n{name} {value}"
        );
    }
    out
}

/// Escapes a label value for the text format.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
