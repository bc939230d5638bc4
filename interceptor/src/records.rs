//! Connection records: one per connection the agent proxied, refused or observed.
//!
//! Memory is bounded: the store keeps the most recent `capacity` records in a ring; totals per
//! workload are kept apart and never reset while the agent runs. Every new or updated record is
//! also broadcast, for `interceptor status --watch` and the metrics.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::workloads::WorkloadKey;

/// Which side of the pod the connection is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Into an enrolled pod.
    Inbound,
    /// Out of an enrolled pod.
    Outbound,
}

/// Whether the bytes crossed the network encrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// Agent-to-agent mutual TLS.
    MutualTls,
    /// Plaintext.
    Plaintext,
}

/// What happened to the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Policy allowed it and it was delivered.
    Allowed,
    /// Policy refused it.
    Dropped,
    /// Policy allowed it but it could not be delivered (refused, reset, bad handshake).
    Failed,
}

/// Who connected to what, and how: the part of a record known when the connection starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// Inbound or outbound, from the enrolled pod's point of view.
    pub direction: Direction,
    /// Caller address.
    pub source: SocketAddr,
    /// Caller identity (`spiffe://...`), `None` when unknown (plaintext).
    pub source_identity: Option<String>,
    /// Caller workload when it is a meshed workload.
    pub source_workload: Option<WorkloadKey>,
    /// Destination address and port as the caller asked for it.
    pub destination: SocketAddr,
    /// Destination identity when it is in the mesh.
    pub destination_identity: Option<String>,
    /// Destination workload when it is in the mesh.
    pub destination_workload: Option<WorkloadKey>,
    /// mutual_tls or plaintext.
    pub security: Security,
}

/// One connection. This is the `status --output json` schema (see ARCHITECTURE.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    /// Unique per agent run, increasing.
    pub id: u64,
    /// Start time, milliseconds since the Unix epoch.
    pub start_unix_ms: u64,
    /// Who, to what, how; flattened into the record's JSON.
    #[serde(flatten)]
    pub connection: Connection,
    /// allowed, dropped or failed.
    pub verdict: Verdict,
    /// Why it was dropped or failed, or which policy allowed plaintext.
    pub reason: Option<String>,
    /// Bytes from the caller to the destination.
    pub bytes_sent: u64,
    /// Bytes from the destination to the caller.
    pub bytes_received: u64,
    /// How long it was (or has been) open, in milliseconds.
    pub duration_ms: u64,
    /// Still open.
    pub open: bool,
}

/// Totals for one workload since the agent started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadTotals {
    /// Connections carried over mutual TLS.
    pub mutual_tls: u64,
    /// Plaintext connections allowed.
    pub plaintext: u64,
    /// Connections dropped by policy.
    pub dropped: u64,
    /// Connections that failed.
    pub failed: u64,
    /// Bytes sent by callers.
    pub bytes_sent: u64,
    /// Bytes received by callers.
    pub bytes_received: u64,
}

/// Istio's standard TCP metric labels for one edge of the graph.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EdgeLabels {
    /// `source` for outbound records, `destination` for inbound ones.
    pub reporter: &'static str,
    /// Caller workload name or `unknown`.
    pub source_workload: String,
    /// Caller namespace or `unknown`.
    pub source_workload_namespace: String,
    /// Caller SPIFFE identity or `unknown`.
    pub source_principal: String,
    /// Destination workload name or `unknown`.
    pub destination_workload: String,
    /// Destination namespace or `unknown`.
    pub destination_workload_namespace: String,
    /// Destination SPIFFE identity or `unknown`.
    pub destination_principal: String,
    /// `mutual_tls` or `unknown` (plaintext), as Istio reports it.
    pub connection_security_policy: &'static str,
}

/// Counters of one edge; they only grow while the agent runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeCounters {
    /// Connections opened.
    pub opened: u64,
    /// Connections closed.
    pub closed: u64,
    /// Bytes from caller to destination.
    pub sent_bytes: u64,
    /// Bytes from destination to caller.
    pub received_bytes: u64,
}

/// Labels of the dropped-connections counter: a bounded reason and the destination.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DropLabels {
    /// `plaintext_refused`, `handshake_refused` or `failed`.
    pub reason: &'static str,
    /// Destination workload name or `unknown`.
    pub destination_workload: String,
    /// Destination namespace or `unknown`.
    pub destination_workload_namespace: String,
}

/// What /metrics serves.
#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    /// Per-edge TCP counters.
    pub edges: BTreeMap<EdgeLabels, EdgeCounters>,
    /// Dropped or failed connections by reason.
    pub drops: BTreeMap<DropLabels, u64>,
}

struct Inner {
    ring: VecDeque<ConnectionRecord>,
    next_id: u64,
    started: BTreeMap<u64, Instant>,
    totals: BTreeMap<WorkloadKey, WorkloadTotals>,
    metrics: MetricsSnapshot,
}

/// The bounded store of records.
pub struct RecordStore {
    capacity: usize,
    inner: Mutex<Inner>,
    updates: broadcast::Sender<ConnectionRecord>,
}

impl RecordStore {
    /// A store keeping at most `capacity` recent records.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner {
                ring: VecDeque::new(),
                next_id: 1,
                started: BTreeMap::new(),
                totals: BTreeMap::new(),
                metrics: MetricsSnapshot::default(),
            }),
            updates: broadcast::channel(1024).0,
        }
    }

    /// Records a connection that is now open; returns its id for [`RecordStore::close`].
    pub fn open(&self, conn: Connection) -> u64 {
        self.insert(conn, Verdict::Allowed, None, true, SystemTime::now())
    }

    /// Like [`RecordStore::open`], with the reason it was allowed (plaintext under a policy).
    pub fn open_with_reason(&self, conn: Connection, reason: String) -> u64 {
        self.insert(
            conn,
            Verdict::Allowed,
            Some(reason),
            true,
            SystemTime::now(),
        )
    }

    /// Records a connection that ended before it carried data (dropped or failed).
    pub fn refused(&self, conn: Connection, verdict: Verdict, reason: String) -> u64 {
        self.refused_at(conn, verdict, reason, SystemTime::now())
    }

    /// Like [`RecordStore::refused`], for an event that happened at `start` (kernel events
    /// read after the agent was down).
    pub fn refused_at(
        &self,
        conn: Connection,
        verdict: Verdict,
        reason: String,
        start: SystemTime,
    ) -> u64 {
        self.insert(conn, verdict, Some(reason), false, start)
    }

    /// Marks an open connection closed with its byte counts, and a failure reason if any.
    pub fn close(&self, id: u64, bytes_sent: u64, bytes_received: u64, failure: Option<String>) {
        let mut inner = self.lock();
        let elapsed = inner.started.remove(&id).map(|t| t.elapsed());
        let Some(record) = find(&mut inner.ring, id) else {
            return;
        };
        record.open = false;
        record.bytes_sent = bytes_sent;
        record.bytes_received = bytes_received;
        record.duration_ms = elapsed.map_or(0, |d| d.as_millis() as u64);
        if let Some(reason) = failure {
            record.verdict = Verdict::Failed;
            record.reason = Some(reason);
        }
        let record = record.clone();
        let edge = inner.metrics.edges.entry(edge_labels(&record)).or_default();
        edge.closed += 1;
        edge.sent_bytes += bytes_sent;
        edge.received_bytes += bytes_received;
        let failed = record.verdict == Verdict::Failed;
        if let Some(key) = own_workload(&record) {
            let totals = inner.totals.entry(key).or_default();
            totals.bytes_sent += bytes_sent;
            totals.bytes_received += bytes_received;
            if failed {
                totals.failed += 1;
            }
        }
        let _ = self.updates.send(record);
    }

    /// Recent records, oldest first, with durations of open ones brought up to date.
    pub fn recent(&self) -> Vec<ConnectionRecord> {
        let inner = self.lock();
        inner
            .ring
            .iter()
            .map(|record| {
                let mut record = record.clone();
                if let Some(start) = inner.started.get(&record.id) {
                    record.duration_ms = start.elapsed().as_millis() as u64;
                }
                record
            })
            .collect()
    }

    /// Totals per workload since the agent started.
    pub fn totals(&self) -> BTreeMap<WorkloadKey, WorkloadTotals> {
        self.lock().totals.clone()
    }

    /// Whether a record is still in the store and open.
    pub fn is_open(&self, id: u64) -> bool {
        self.lock().started.contains_key(&id)
    }

    /// Counters for /metrics.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.lock().metrics.clone()
    }

    /// New and updated records from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ConnectionRecord> {
        self.updates.subscribe()
    }

    fn insert(
        &self,
        conn: Connection,
        verdict: Verdict,
        reason: Option<String>,
        open: bool,
        start: SystemTime,
    ) -> u64 {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        let record = ConnectionRecord {
            id,
            start_unix_ms: unix_ms(start),
            connection: conn,
            verdict,
            reason,
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: 0,
            open,
        };
        if let Some(key) = own_workload(&record) {
            let totals = inner.totals.entry(key).or_default();
            match (verdict, record.connection.security) {
                (Verdict::Dropped, _) => totals.dropped += 1,
                (Verdict::Failed, _) => totals.failed += 1,
                (Verdict::Allowed, Security::MutualTls) => totals.mutual_tls += 1,
                (Verdict::Allowed, Security::Plaintext) => totals.plaintext += 1,
            }
        }
        if open {
            inner.started.insert(id, Instant::now());
            inner
                .metrics
                .edges
                .entry(edge_labels(&record))
                .or_default()
                .opened += 1;
        } else {
            *inner.metrics.drops.entry(drop_labels(&record)).or_default() += 1;
        }
        if inner.ring.len() == self.capacity
            && let Some(evicted) = inner.ring.pop_front()
        {
            inner.started.remove(&evicted.id);
        }
        inner.ring.push_back(record.clone());
        drop(inner);
        let _ = self.updates.send(record);
        id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The record's own workload on this node: the destination of inbound connections, the source
/// of outbound ones.
fn own_workload(record: &ConnectionRecord) -> Option<WorkloadKey> {
    match record.connection.direction {
        Direction::Inbound => record.connection.destination_workload.clone(),
        Direction::Outbound => record.connection.source_workload.clone(),
    }
}

fn edge_labels(record: &ConnectionRecord) -> EdgeLabels {
    let (source_workload, source_workload_namespace) =
        workload_labels(record.connection.source_workload.as_ref());
    let (destination_workload, destination_workload_namespace) =
        workload_labels(record.connection.destination_workload.as_ref());
    EdgeLabels {
        reporter: match record.connection.direction {
            Direction::Inbound => "destination",
            Direction::Outbound => "source",
        },
        source_workload,
        source_workload_namespace,
        source_principal: record
            .connection
            .source_identity
            .clone()
            .unwrap_or_else(unknown),
        destination_workload,
        destination_workload_namespace,
        destination_principal: record
            .connection
            .destination_identity
            .clone()
            .unwrap_or_else(unknown),
        connection_security_policy: match record.connection.security {
            Security::MutualTls => "mutual_tls",
            Security::Plaintext => "unknown",
        },
    }
}

fn drop_labels(record: &ConnectionRecord) -> DropLabels {
    let reason = match (record.verdict, record.connection.security) {
        (Verdict::Dropped, Security::Plaintext) => "plaintext_refused",
        (Verdict::Dropped, Security::MutualTls) => "handshake_refused",
        _ => "failed",
    };
    let (destination_workload, destination_workload_namespace) =
        workload_labels(record.connection.destination_workload.as_ref());
    DropLabels {
        reason,
        destination_workload,
        destination_workload_namespace,
    }
}

/// (workload name, namespace) label values, `unknown` outside the mesh.
fn workload_labels(workload: Option<&WorkloadKey>) -> (String, String) {
    workload.map_or_else(
        || (unknown(), unknown()),
        |w| (w.name.clone(), w.namespace.clone()),
    )
}

fn unknown() -> String {
    "unknown".to_owned()
}

/// Ids increase by one, so the record with `id` is at a computable position when present.
fn find(ring: &mut VecDeque<ConnectionRecord>, id: u64) -> Option<&mut ConnectionRecord> {
    let first = ring.front()?.id;
    let index = usize::try_from(id.checked_sub(first)?).ok()?;
    ring.get_mut(index).filter(|record| record.id == id)
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        Connection {
            direction: Direction::Inbound,
            source: "198.19.1.1:40000".parse().unwrap(),
            source_identity: None,
            source_workload: None,
            destination: "198.19.2.2:8080".parse().unwrap(),
            destination_identity: None,
            destination_workload: Some(WorkloadKey {
                namespace: "default".into(),
                name: "web".into(),
            }),
            security: Security::Plaintext,
        }
    }

    #[test]
    fn ring_is_bounded_and_totals_are_not() {
        let store = RecordStore::new(2);
        for _ in 0..5 {
            let id = store.open(conn());
            store.close(id, 10, 20, None);
        }
        let recent = store.recent();
        assert_eq!(recent.iter().map(|r| r.id).collect::<Vec<_>>(), vec![4, 5]);
        let totals = store.totals();
        let web = totals.values().next().unwrap();
        assert_eq!(
            (web.plaintext, web.bytes_sent, web.bytes_received),
            (5, 50, 100)
        );
    }

    #[test]
    fn close_updates_record_and_failures_count() {
        let store = RecordStore::new(10);
        let mut updates = store.subscribe();
        let id = store.open(conn());
        assert!(store.recent()[0].open);
        assert!(store.is_open(id));
        store.close(id, 1, 2, Some("destination reset".into()));
        assert!(!store.is_open(id));
        let record = &store.recent()[0];
        assert!(!record.open);
        assert_eq!(record.verdict, Verdict::Failed);
        assert_eq!(record.reason.as_deref(), Some("destination reset"));
        assert_eq!(updates.try_recv().unwrap().id, id);
        assert!(!updates.try_recv().unwrap().open);
        store.refused(
            conn(),
            Verdict::Dropped,
            "STRICT by istio-system/default".into(),
        );
        let totals = store.totals();
        let web = totals.values().next().unwrap();
        assert_eq!((web.failed, web.dropped), (1, 1));
    }
}
