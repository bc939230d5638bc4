//! Connection records: one per connection the agent proxied, refused or observed.
//!
//! Memory is bounded: the store keeps the most recent `capacity` records in a ring; totals per
//! workload are kept apart and never reset while the agent runs. Every new or updated record is
//! also broadcast, for `interceptor status --watch` and the metrics.
//!
//! Refusals before a caller authenticated (tunnel-port noise: failed or timed-out handshakes,
//! connections over the caps, resets for lack of descriptors) are kept apart from the records
//! of real connections, in a small ring of their own, and aggregated: one record per source
//! address and reason per [`NOISE_INTERVAL`], whose `count` grows. A flood from anywhere
//! therefore never pushes real connections out of the store, while the counters and /metrics
//! still count every refusal.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::{services::ServiceKey, workloads::WorkloadKey};

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
    /// The Service the caller addressed (its ClusterIP, or a headless Service's endpoint),
    /// when the agent knows Services (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<ServiceKey>,
    /// Serial number (hex) of the certificate the other agent presented on the tunnel that
    /// carried this connection: the caller's on inbound records, the destination's on
    /// outbound ones. It tells which certificate a connection rode on across renewals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_certificate_serial: Option<String>,
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
    /// How many connections this record stands for: 1, or for aggregated refusals before
    /// authentication, how many came from this source for this reason in the interval.
    #[serde(default = "one")]
    pub count: u64,
}

fn one() -> u64 {
    1
}

/// The open record of a connection the agent carries; see [`RecordStore::open`].
#[must_use = "dropping the guard closes the record as failed"]
pub struct OpenRecord {
    store: Arc<RecordStore>,
    id: u64,
    closed: bool,
}

impl OpenRecord {
    /// The record's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Closes the record with the bytes moved and, if it failed, why.
    pub fn close(mut self, bytes_sent: u64, bytes_received: u64, failure: Option<String>) {
        self.closed = true;
        self.store
            .close(self.id, bytes_sent, bytes_received, failure);
    }
}

impl Drop for OpenRecord {
    fn drop(&mut self) {
        if !self.closed {
            self.store.close(
                self.id,
                0,
                0,
                Some("the agent stopped carrying it (its task ended: aborted or panicked)".into()),
            );
        }
    }
}

/// Refusals before authentication from one source address and for one reason within this
/// interval share one record.
pub const NOISE_INTERVAL: Duration = Duration::from_secs(10);

/// At most this many aggregated noise records are kept (fewer when the store is smaller).
pub const NOISE_CAPACITY: usize = 1000;

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
    /// The Service's host (`<name>.<namespace>.svc.cluster.local`) or `unknown`.
    pub destination_service: String,
    /// The Service's name or `unknown`.
    pub destination_service_name: String,
    /// The Service's namespace or `unknown`.
    pub destination_service_namespace: String,
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

/// Labels of the counter of connections refused before they were authenticated and served.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RefusalLabels {
    /// `tunnel` (a pod's tunnel port) or `outbound` (a pod's redirected connects).
    pub listener: &'static str,
    /// `handshake_failed`, `handshake_timeout`, `request_failed`, `request_timeout`,
    /// `pending_limit_source`, `pending_limit_agent` or `fd_limit`.
    pub reason: &'static str,
    /// The pod whose listener it was: workload name.
    pub workload: String,
    /// The pod whose listener it was: namespace.
    pub workload_namespace: String,
}

/// What /metrics serves.
#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    /// Per-edge TCP counters.
    pub edges: BTreeMap<EdgeLabels, EdgeCounters>,
    /// Dropped or failed connections by reason.
    pub drops: BTreeMap<DropLabels, u64>,
    /// Connections refused before authentication (every one, also when their records were
    /// aggregated).
    pub refusals: BTreeMap<RefusalLabels, u64>,
}

/// The record that aggregates one source's refusals for one reason.
struct NoiseWindow {
    id: u64,
    since: Instant,
}

struct Inner {
    ring: VecDeque<ConnectionRecord>,
    noise: VecDeque<ConnectionRecord>,
    noise_windows: HashMap<(IpAddr, &'static str), NoiseWindow>,
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
                noise: VecDeque::new(),
                noise_windows: HashMap::new(),
                next_id: 1,
                started: BTreeMap::new(),
                totals: BTreeMap::new(),
                metrics: MetricsSnapshot::default(),
            }),
            updates: broadcast::channel(1024).0,
        }
    }

    /// Records a connection the agent now carries. The record closes when the returned guard
    /// is closed, or, if the task carrying it ends first (aborted, panicked), when it drops.
    pub fn open(self: &Arc<Self>, conn: Connection) -> OpenRecord {
        let id = self.insert(conn, Verdict::Allowed, None, true, SystemTime::now());
        OpenRecord {
            store: Arc::clone(self),
            id,
            closed: false,
        }
    }

    /// Records a plaintext connection the kernel saw accepted (allowed by `reason`); a later
    /// kernel event closes it by id with [`RecordStore::close`].
    pub fn open_observed(&self, conn: Connection, reason: String) -> u64 {
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

    /// Records a connection refused before its caller authenticated (`label` names the reason
    /// in /metrics). Counters count it; its record is aggregated with the others from the same
    /// source address for the same reason in the last [`NOISE_INTERVAL`], and kept apart from
    /// the records of real connections.
    pub fn refused_noise(
        &self,
        conn: Connection,
        verdict: Verdict,
        label: &'static str,
        reason: String,
    ) {
        let mut inner = self.lock();
        let refusal = RefusalLabels {
            listener: match conn.direction {
                Direction::Inbound => "tunnel",
                Direction::Outbound => "outbound",
            },
            reason: label,
            workload: String::new(),
            workload_namespace: String::new(),
        };
        let key = (conn.source.ip(), label);
        let now = Instant::now();
        let window = inner
            .noise_windows
            .get(&key)
            .filter(|w| now.duration_since(w.since) < NOISE_INTERVAL)
            .map(|w| w.id);
        let counted = window.and_then(|id| {
            let record = find(&mut inner.noise, id)?;
            record.count += 1;
            Some(record.clone())
        });
        let record = match counted {
            Some(record) => {
                count_new(&mut inner, &record);
                record
            }
            None => {
                let record = new_record(
                    &mut inner,
                    conn,
                    verdict,
                    Some(reason),
                    false,
                    SystemTime::now(),
                );
                count_new(&mut inner, &record);
                let capacity = self.capacity.min(NOISE_CAPACITY);
                if inner.noise.len() >= capacity {
                    inner.noise.pop_front();
                }
                inner.noise.push_back(record.clone());
                if inner.noise_windows.len() >= capacity {
                    let oldest = inner.noise.front().map_or(0, |r| r.id);
                    inner.noise_windows.retain(|_, w| {
                        w.id >= oldest && now.duration_since(w.since) < NOISE_INTERVAL
                    });
                }
                inner.noise_windows.insert(
                    key,
                    NoiseWindow {
                        id: record.id,
                        since: now,
                    },
                );
                // Only the first of a window is broadcast, so watchers see a flood as one line
                // per source and reason per interval.
                let _ = self.updates.send(record.clone());
                record
            }
        };
        let (workload, workload_namespace) = workload_labels(own_workload(&record).as_ref());
        *inner
            .metrics
            .refusals
            .entry(RefusalLabels {
                workload,
                workload_namespace,
                ..refusal
            })
            .or_default() += 1;
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

    /// Recent records, oldest first, with durations of open ones brought up to date; the
    /// aggregated noise records are merged in by id.
    pub fn recent(&self) -> Vec<ConnectionRecord> {
        let inner = self.lock();
        let mut real = inner.ring.iter().peekable();
        let mut noise = inner.noise.iter().peekable();
        let mut out = Vec::with_capacity(inner.ring.len() + inner.noise.len());
        loop {
            let next = match (real.peek(), noise.peek()) {
                (Some(r), Some(n)) if n.id < r.id => noise.next(),
                (Some(_), _) => real.next(),
                (None, _) => noise.next(),
            };
            let Some(record) = next else { break };
            let mut record = record.clone();
            if let Some(start) = inner.started.get(&record.id) {
                record.duration_ms = start.elapsed().as_millis() as u64;
            }
            out.push(record);
        }
        out
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
        let record = new_record(&mut inner, conn, verdict, reason, open, start);
        let id = record.id;
        count_new(&mut inner, &record);
        if open {
            inner.started.insert(id, Instant::now());
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
        crate::sync::lock(&self.inner)
    }
}

/// A record with the next id.
fn new_record(
    inner: &mut Inner,
    conn: Connection,
    verdict: Verdict,
    reason: Option<String>,
    open: bool,
    start: SystemTime,
) -> ConnectionRecord {
    let id = inner.next_id;
    inner.next_id += 1;
    ConnectionRecord {
        id,
        start_unix_ms: unix_ms(start),
        connection: conn,
        verdict,
        reason,
        bytes_sent: 0,
        bytes_received: 0,
        duration_ms: 0,
        open,
        count: 1,
    }
}

/// Counts one new connection (a new record, or one more in an aggregated record) in the
/// totals and the metrics.
fn count_new(inner: &mut Inner, record: &ConnectionRecord) {
    if let Some(key) = own_workload(record) {
        let totals = inner.totals.entry(key).or_default();
        match (record.verdict, record.connection.security) {
            (Verdict::Dropped, _) => totals.dropped += 1,
            (Verdict::Failed, _) => totals.failed += 1,
            (Verdict::Allowed, Security::MutualTls) => totals.mutual_tls += 1,
            (Verdict::Allowed, Security::Plaintext) => totals.plaintext += 1,
        }
    }
    if record.open {
        inner
            .metrics
            .edges
            .entry(edge_labels(record))
            .or_default()
            .opened += 1;
    } else {
        *inner.metrics.drops.entry(drop_labels(record)).or_default() += 1;
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
    let service = record.connection.destination_service.as_ref();
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
        destination_service: service.map_or_else(unknown, ServiceKey::host),
        destination_service_name: service.map_or_else(unknown, |s| s.name.clone()),
        destination_service_namespace: service.map_or_else(unknown, |s| s.namespace.clone()),
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

/// The record with `id`, if still kept (ids increase along the ring).
fn find(ring: &mut VecDeque<ConnectionRecord>, id: u64) -> Option<&mut ConnectionRecord> {
    let index = ring.binary_search_by_key(&id, |record| record.id).ok()?;
    ring.get_mut(index)
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
            destination_service: None,
            peer_certificate_serial: None,
            security: Security::Plaintext,
        }
    }

    #[test]
    fn ring_is_bounded_and_totals_are_not() {
        let store = Arc::new(RecordStore::new(2));
        for _ in 0..5 {
            store.open(conn()).close(10, 20, None);
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

    #[tokio::test]
    async fn a_record_whose_task_is_aborted_or_panics_is_closed() {
        let store = Arc::new(RecordStore::new(10));
        let (opened, wait) = tokio::sync::oneshot::channel();
        let carrier = {
            let store = store.clone();
            tokio::spawn(async move {
                let _record = store.open(conn());
                let _ = opened.send(());
                std::future::pending::<()>().await;
            })
        };
        wait.await.unwrap();
        assert!(store.recent()[0].open);
        carrier.abort();
        let _ = carrier.await;
        let panicking = {
            let store = store.clone();
            tokio::spawn(async move {
                let _record = store.open(conn());
                panic!("a bug while carrying the connection");
            })
        };
        assert!(panicking.await.is_err());
        let recent = store.recent();
        assert_eq!(recent.len(), 2);
        for record in recent {
            assert!(!record.open, "{record:?}");
            assert_eq!(record.verdict, Verdict::Failed);
            assert!(record.reason.unwrap().contains("stopped carrying"));
        }
    }

    #[test]
    fn close_updates_record_and_failures_count() {
        let store = Arc::new(RecordStore::new(10));
        let mut updates = store.subscribe();
        let record = store.open(conn());
        let id = record.id();
        assert!(store.recent()[0].open);
        assert!(store.is_open(id));
        record.close(1, 2, Some("destination reset".into()));
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

    #[test]
    fn a_flood_of_refusals_keeps_the_real_records_and_counts_every_one() {
        let store = Arc::new(RecordStore::new(100));
        let real: Vec<u64> = (0..10)
            .map(|_| {
                let record = store.open(conn());
                let id = record.id();
                record.close(1, 1, None);
                id
            })
            .collect();
        let mut attacker = conn();
        attacker.source = "198.18.0.11:50000".parse().unwrap();
        attacker.security = Security::MutualTls;
        for i in 0..5000u32 {
            let mut c = attacker.clone();
            c.source.set_port(1024 + (i % 60000) as u16);
            // One other address now and then.
            if i % 1000 == 0 {
                c.source = "198.18.0.12:1".parse().unwrap();
            }
            store.refused_noise(
                c,
                Verdict::Dropped,
                "handshake_timeout",
                "no handshake".into(),
            );
        }
        let recent = store.recent();
        for id in &real {
            assert!(recent.iter().any(|r| r.id == *id), "real record {id} lost");
        }
        let noise: Vec<&ConnectionRecord> =
            recent.iter().filter(|r| r.count > 1 || r.id > 10).collect();
        assert_eq!(noise.len(), 2, "one record per source: {noise:?}");
        assert_eq!(noise.iter().map(|r| r.count).sum::<u64>(), 5000);
        assert!(recent.windows(2).all(|w| w[0].id < w[1].id), "merged by id");
        let metrics = store.metrics();
        let refused: u64 = metrics.refusals.values().sum();
        assert_eq!(refused, 5000);
        let label = metrics.refusals.keys().next().unwrap();
        assert_eq!(
            (label.listener, label.reason),
            ("tunnel", "handshake_timeout")
        );
        assert_eq!(store.totals().values().next().unwrap().dropped, 5000);
    }
}
