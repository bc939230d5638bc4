//! Kernel events: STRICT refusals and plaintext connections the pods accepted, turned into
//! connection records. Events written while the agent was down wait in the pinned ring buffer
//! and are recorded when it comes back.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::{Duration, SystemTime},
};

use interceptor_common::{
    EVENT_PLAINTEXT_CLOSE, EVENT_PLAINTEXT_OPEN, EVENT_STRICT_DROP, KernelEvent,
};
use tracing::warn;

use super::Agent;
use crate::{
    ebpf::EventReader,
    records::{Connection, Direction, Security, Verdict},
};

/// How many open plaintext connections to track before pruning ones whose records are gone.
const MAX_TRACKED_PLAINTEXT: usize = 65_536;

/// Records kernel events until the ring buffer fails (the task is aborted at shutdown).
pub(super) async fn serve(events: EventReader, agent: Arc<Agent>) {
    let mut open_plaintext: HashMap<u64, u64> = HashMap::new();
    let mut stream = match events.start() {
        Ok(stream) => stream,
        Err(e) => return warn!("kernel events unavailable: {e}"),
    };
    loop {
        match stream.next_batch().await {
            Ok(batch) => {
                for event in batch {
                    record(&agent, &event, &mut open_plaintext).await;
                }
            }
            Err(e) => return warn!("kernel events: {e}"),
        }
    }
}

async fn record(agent: &Agent, event: &KernelEvent, open_plaintext: &mut HashMap<u64, u64>) {
    let local = Ipv4Addr::from(u32::from_be(event.local_ip4));
    let remote = Ipv4Addr::from(u32::from_be(event.remote_ip4));
    let Some(workload) = agent.local.at(local) else {
        return;
    };
    // The decision the kernel applied, by the number it read with the mode; not today's
    // policy, which may have changed since (or while the agent was down).
    let decided = agent.decision(event.decision);
    let conn = Connection {
        direction: Direction::Inbound,
        source: SocketAddr::V4(SocketAddrV4::new(remote, event.remote_port)),
        source_identity: None,
        source_workload: None,
        destination: SocketAddr::V4(SocketAddrV4::new(local, event.local_port)),
        destination_identity: Some(workload.identity),
        destination_workload: Some(workload.key),
        destination_service: None,
        peer_certificate_serial: None,
        security: Security::Plaintext,
    };
    let records = agent.records();
    match event.kind {
        EVENT_STRICT_DROP => {
            let start = wall_time_of(event.monotonic_ns);
            let reason = match decided {
                Some(decision) => format!("plaintext refused: {decision}"),
                None => unknown_decision("plaintext refused: STRICT", event.decision),
            };
            records.refused_at(conn, Verdict::Dropped, reason, start);
        }
        EVENT_PLAINTEXT_OPEN => {
            let reason = match decided {
                Some(decision) => format!("plaintext allowed: {decision}"),
                None => unknown_decision("plaintext allowed", event.decision),
            };
            let id = records.open_observed(conn, reason);
            open_plaintext.insert(event.sock_cookie, id);
            if open_plaintext.len() > MAX_TRACKED_PLAINTEXT {
                // Close events can be lost (full ring buffer); forget connections whose
                // records have left the store.
                open_plaintext.retain(|_, id| records.is_open(*id));
            }
        }
        EVENT_PLAINTEXT_CLOSE => {
            if let Some(id) = open_plaintext.remove(&event.sock_cookie) {
                records.close(id, event.bytes_received, event.bytes_acked, None);
            }
        }
        other => warn!("unknown kernel event kind {other}"),
    }
}

/// A reason when the event's decision number is not in the book (written by an agent that
/// did not number decisions, or whose state directory was lost).
fn unknown_decision(what: &str, number: u32) -> String {
    format!("{what} (deciding policy unknown: decision {number} is not recorded)")
}

/// Wall-clock time of a CLOCK_MONOTONIC timestamp from the kernel.
fn wall_time_of(monotonic_ns: u64) -> SystemTime {
    let now_ns = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(monotonic_ns);
    SystemTime::now() - Duration::from_nanos(now_ns.saturating_sub(monotonic_ns))
}
