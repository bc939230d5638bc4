//! The traffic graph: who talks to whom on this node, with how much protection.
//!
//! Built only from a [`StatusReport`] (its records and its totals), so the page served on the
//! metrics port (`/graph.json`), `interceptor status --graph` and `interceptor status` can
//! never disagree. Nodes are workloads and callers or destinations outside the mesh, grouped
//! by address; an edge aggregates the connections from one node to another with the same
//! security (mutual TLS or plaintext) and the same outcome (allowed or dropped). Failures of
//! allowed connections are counted on their edge. The schema is in ARCHITECTURE.md.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use crate::{
    admin::protocol::{StatusReport, WorkloadStatus},
    records::{ConnectionRecord, Direction, Security, Verdict, WorkloadTotals},
    workloads::WorkloadKey,
};

/// How many of an edge's connections it lists, newest first.
pub const RECENT_PER_EDGE: usize = 20;

/// The graph of one agent's records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Graph {
    /// The node whose agent saw these connections.
    pub node: String,
    /// Whose records these are: always `node` (one agent's view), so the page can say so.
    pub view: String,
    /// When the graph was built, milliseconds since the Unix epoch.
    pub generated_unix_ms: u64,
    /// Only connections that started within this many seconds; `None` for every record kept.
    pub window_secs: Option<u64>,
    /// How many records the agent keeps now (the graph draws those inside the window).
    pub records_kept: usize,
    /// Workloads, and callers and destinations outside the mesh.
    pub nodes: Vec<GraphNode>,
    /// Aggregated connections.
    pub edges: Vec<GraphEdge>,
    /// Sums over the edges.
    pub totals: GraphTotals,
}

/// What a graph node stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    /// A meshed workload (known by name, or only by its SPIFFE identity).
    Workload,
    /// A caller outside the mesh, by address.
    Unknown,
    /// A destination outside the mesh, by address.
    External,
}

/// One node of the graph.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphNode {
    /// Stable id: `workload:<ns>/<name>`, `identity:<spiffe id>`, `unknown:<ip>` or
    /// `external:<ip>`.
    pub id: String,
    /// What it is.
    pub kind: NodeKind,
    /// `namespace/name` of a workload, the short identity of a workload known only by
    /// identity, or the address outside the mesh.
    pub label: String,
    /// Kubernetes namespace, for workloads known by name.
    pub namespace: Option<String>,
    /// Pod name, for workloads known by name.
    pub name: Option<String>,
    /// SPIFFE identity, when known.
    pub identity: Option<String>,
    /// Address: the pod's for a workload of this node, the caller's or destination's outside
    /// the mesh.
    pub address: Option<IpAddr>,
    /// Enrolled on this node.
    pub local: bool,
    /// Pod labels of a workload of this node.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The workload's totals since the agent started (the `status` table's row).
    pub totals: Option<WorkloadTotals>,
}

/// One edge: the connections from `source` to `target` with one security and one outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphEdge {
    /// Stable id: `<source>><target>|<security>|<outcome>`.
    pub id: String,
    /// The caller's node id.
    pub source: String,
    /// The destination's node id.
    pub target: String,
    /// mutual_tls or plaintext.
    pub security: Security,
    /// `allowed` (failures counted in `failed`) or `dropped`.
    pub outcome: Verdict,
    /// Connections (aggregated refusals count each one).
    pub connections: u64,
    /// Of those, how many failed after policy allowed them.
    pub failed: u64,
    /// Of those, how many are still open.
    pub open: u64,
    /// Bytes from callers to the destination.
    pub bytes_sent: u64,
    /// Bytes from the destination to callers.
    pub bytes_received: u64,
    /// Destination ports.
    pub ports: Vec<u16>,
    /// What decided, as the records say it (the policy for plaintext and drops), most recent
    /// first.
    pub policies: Vec<String>,
    /// Start of the newest connection, milliseconds since the Unix epoch.
    pub last_unix_ms: u64,
    /// The newest connections (at most [`RECENT_PER_EDGE`]), newest first.
    pub recent: Vec<ConnectionRecord>,
}

/// Connection counts over all edges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphTotals {
    /// Allowed over mutual TLS.
    pub mutual_tls: u64,
    /// Allowed in plaintext.
    pub plaintext: u64,
    /// Dropped by policy.
    pub dropped: u64,
    /// Failed after policy allowed them.
    pub failed: u64,
}

/// The graph of `report`'s records that started at or after `since_unix_ms` (all when
/// `None`); `window_secs` only labels it. The records may come in any order.
pub fn build(
    report: &StatusReport,
    window_secs: Option<u64>,
    since_unix_ms: Option<u64>,
    now_unix_ms: u64,
) -> Graph {
    let mut nodes: BTreeMap<String, GraphNode> = BTreeMap::new();
    for workload in &report.workloads {
        let node = local_node(workload);
        nodes.insert(node.id.clone(), node);
    }
    let mut records: Vec<&ConnectionRecord> = report
        .records
        .iter()
        .filter(|r| since_unix_ms.is_none_or(|since| r.start_unix_ms >= since))
        .collect();
    records.sort_by_key(|r| std::cmp::Reverse(r.id));

    let mut edges: BTreeMap<String, GraphEdge> = BTreeMap::new();
    let mut totals = GraphTotals::default();
    for record in records {
        let c = &record.connection;
        let source = endpoint_node(
            c.source_workload.as_ref(),
            c.source_identity.as_deref(),
            c.source,
            NodeKind::Unknown,
        );
        let target = endpoint_node(
            c.destination_workload.as_ref(),
            c.destination_identity.as_deref(),
            c.destination,
            NodeKind::External,
        );
        let outcome = match record.verdict {
            Verdict::Dropped => Verdict::Dropped,
            Verdict::Allowed | Verdict::Failed => Verdict::Allowed,
        };
        let id = format!(
            "{}>{}|{}|{}",
            source.id,
            target.id,
            security_name(c.security),
            verdict_name(outcome)
        );
        let edge = edges.entry(id.clone()).or_insert_with(|| GraphEdge {
            id,
            source: source.id.clone(),
            target: target.id.clone(),
            security: c.security,
            outcome,
            connections: 0,
            failed: 0,
            open: 0,
            bytes_sent: 0,
            bytes_received: 0,
            ports: Vec::new(),
            policies: Vec::new(),
            last_unix_ms: record.start_unix_ms,
            recent: Vec::new(),
        });
        edge.connections += record.count;
        edge.bytes_sent += record.bytes_sent;
        edge.bytes_received += record.bytes_received;
        edge.last_unix_ms = edge.last_unix_ms.max(record.start_unix_ms);
        if record.open {
            edge.open += 1;
        }
        match (record.verdict, c.security) {
            (Verdict::Dropped, _) => totals.dropped += record.count,
            (Verdict::Failed, _) => {
                edge.failed += record.count;
                totals.failed += record.count;
            }
            (Verdict::Allowed, Security::MutualTls) => totals.mutual_tls += record.count,
            (Verdict::Allowed, Security::Plaintext) => totals.plaintext += record.count,
        }
        if !edge.ports.contains(&c.destination.port()) {
            edge.ports.push(c.destination.port());
        }
        let policy = decided_by(record);
        if !edge.policies.contains(&policy) {
            edge.policies.push(policy);
        }
        if edge.recent.len() < RECENT_PER_EDGE {
            edge.recent.push(record.clone());
        }
        for node in [source, target] {
            nodes.entry(node.id.clone()).or_insert(node);
        }
    }
    for edge in edges.values_mut() {
        edge.ports.sort_unstable();
    }
    let mut nodes: Vec<GraphNode> = nodes.into_values().collect();
    nodes.sort_by(|a, b| (a.kind, &a.label).cmp(&(b.kind, &b.label)));
    Graph {
        node: report.node.clone(),
        view: "node".to_owned(),
        generated_unix_ms: now_unix_ms,
        window_secs,
        records_kept: report.records.len(),
        nodes,
        edges: edges.into_values().collect(),
        totals,
    }
}

/// A workload of this node, from its `status` row.
fn local_node(workload: &WorkloadStatus) -> GraphNode {
    let (namespace, name) = workload
        .workload
        .split_once('/')
        .map_or((None, None), |(ns, name)| {
            (Some(ns.to_owned()), Some(name.to_owned()))
        });
    GraphNode {
        id: format!("workload:{}", workload.workload),
        kind: NodeKind::Workload,
        label: workload.workload.clone(),
        namespace,
        name,
        identity: workload.identity.clone(),
        address: workload.ip.map(IpAddr::V4),
        local: workload.ip.is_some(),
        labels: workload.labels.clone(),
        totals: Some(workload.totals),
    }
}

/// The node of one end of a record: its workload, else its identity, else its address.
fn endpoint_node(
    workload: Option<&WorkloadKey>,
    identity: Option<&str>,
    address: SocketAddr,
    outside: NodeKind,
) -> GraphNode {
    let blank = |id: String, kind, label: String| GraphNode {
        id,
        kind,
        label,
        namespace: None,
        name: None,
        identity: identity.map(str::to_owned),
        address: None,
        local: false,
        labels: BTreeMap::new(),
        totals: None,
    };
    match (workload, identity) {
        (Some(key), _) => GraphNode {
            namespace: Some(key.namespace.clone()),
            name: Some(key.name.clone()),
            ..blank(
                format!("workload:{key}"),
                NodeKind::Workload,
                key.to_string(),
            )
        },
        (None, Some(identity)) => blank(
            format!("identity:{identity}"),
            NodeKind::Workload,
            short_identity(identity),
        ),
        (None, None) => GraphNode {
            address: Some(address.ip()),
            ..blank(
                format!(
                    "{}:{}",
                    match outside {
                        NodeKind::External => "external",
                        _ => "unknown",
                    },
                    address.ip()
                ),
                outside,
                address.ip().to_string(),
            )
        },
    }
}

/// What decided a record: its reason for plaintext and refusals, mutual TLS otherwise.
fn decided_by(record: &ConnectionRecord) -> String {
    match (&record.reason, record.verdict, record.connection.security) {
        (Some(reason), Verdict::Allowed | Verdict::Dropped, _) => reason.clone(),
        (_, _, Security::MutualTls) => "mutual TLS, both identities checked".to_owned(),
        (_, _, Security::Plaintext) => match record.connection.direction {
            Direction::Outbound => "destination outside the mesh".to_owned(),
            Direction::Inbound => "plaintext".to_owned(),
        },
    }
}

/// `spiffe://td/ns/foo/sa/sleep` → `foo/sa/sleep`; anything else unchanged.
pub fn short_identity(identity: &str) -> String {
    identity
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .map(|(_, path)| path.strip_prefix("ns/").unwrap_or(path).to_owned())
        .unwrap_or_else(|| identity.to_owned())
}

/// The JSON name of a security.
pub fn security_name(security: Security) -> &'static str {
    match security {
        Security::MutualTls => "mutual_tls",
        Security::Plaintext => "plaintext",
    }
}

fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Allowed => "allowed",
        Verdict::Dropped => "dropped",
        Verdict::Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        admin::protocol::KernelCounters,
        records::{Connection, RecordStore},
    };
    use std::sync::Arc;

    fn tracker() -> WorkloadKey {
        WorkloadKey {
            namespace: "vehicles".into(),
            name: "position-tracker".into(),
        }
    }

    fn inbound(source: &str, security: Security, from: Option<WorkloadKey>) -> Connection {
        Connection {
            direction: Direction::Inbound,
            source: source.parse().unwrap(),
            source_identity: from
                .as_ref()
                .map(|w| format!("spiffe://cluster.local/ns/{}/sa/{}", w.namespace, w.name)),
            source_workload: from,
            destination: "198.19.2.10:8080".parse().unwrap(),
            destination_identity: Some("spiffe://cluster.local/ns/vehicles/sa/tracker".into()),
            destination_workload: Some(tracker()),
            destination_service: None,
            peer_certificate_serial: None,
            security,
        }
    }

    /// The walkthrough's three calls, plus one more refusal, as the agent's store holds them.
    fn walkthrough() -> StatusReport {
        let store = Arc::new(RecordStore::new(100));
        let sleep = WorkloadKey {
            namespace: "foo".into(),
            name: "sleep".into(),
        };
        store
            .open(inbound(
                "198.19.1.10:40000",
                Security::MutualTls,
                Some(sleep),
            ))
            .close(90, 204, None);
        let id = store.open_observed(
            inbound("198.18.0.11:40001", Security::Plaintext, None),
            "plaintext allowed: PERMISSIVE (mesh default, no policy)".into(),
        );
        store.close(id, 80, 200, None);
        for port in [40002, 40003] {
            store.refused(
                inbound(&format!("198.18.0.11:{port}"), Security::Plaintext, None),
                Verdict::Dropped,
                "plaintext refused: STRICT by istio-system/default".into(),
            );
        }
        let totals = store.totals();
        StatusReport {
            node: "node-2".into(),
            workloads: vec![WorkloadStatus {
                workload: "vehicles/position-tracker".into(),
                identity: Some("spiffe://cluster.local/ns/vehicles/sa/tracker".into()),
                ip: Some("198.19.2.10".parse().unwrap()),
                labels: BTreeMap::from([("app".into(), "<b>x</b>".into())]),
                totals: totals[&tracker()],
            }],
            kernel: KernelCounters::default(),
            records: store.recent(),
            plaintext_callers: Vec::new(),
        }
    }

    #[test]
    fn the_walkthrough_is_three_edges_from_two_callers() {
        let report = walkthrough();
        let graph = build(&report, None, None, 0);
        let ids: Vec<&str> = graph.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "workload:foo/sleep",
                "workload:vehicles/position-tracker",
                "unknown:198.18.0.11"
            ]
        );
        assert_eq!(graph.edges.len(), 3, "{:#?}", graph.edges);
        let edge = |security, outcome| {
            graph
                .edges
                .iter()
                .find(|e| e.security == security && e.outcome == outcome)
                .unwrap()
        };
        let mtls = edge(Security::MutualTls, Verdict::Allowed);
        assert_eq!(mtls.source, "workload:foo/sleep");
        assert_eq!(
            (mtls.connections, mtls.bytes_sent, mtls.bytes_received),
            (1, 90, 204)
        );
        let plain = edge(Security::Plaintext, Verdict::Allowed);
        assert_eq!(plain.source, "unknown:198.18.0.11");
        assert_eq!(
            plain.policies,
            ["plaintext allowed: PERMISSIVE (mesh default, no policy)"]
        );
        let dropped = edge(Security::Plaintext, Verdict::Dropped);
        assert_eq!(dropped.connections, 2);
        assert_eq!(dropped.ports, [8080]);
        assert_eq!(dropped.recent.len(), 2);
        assert!(dropped.recent[0].id > dropped.recent[1].id, "newest first");
        let tracker = &graph.nodes[1];
        assert!(tracker.local);
        assert_eq!(
            tracker.labels["app"], "<b>x</b>",
            "kept as text, not markup"
        );
    }

    #[test]
    fn totals_agree_with_the_status_totals() {
        let report = walkthrough();
        let graph = build(&report, None, None, 0);
        let status = report.workloads[0].totals;
        assert_eq!(
            (
                graph.totals.mutual_tls,
                graph.totals.plaintext,
                graph.totals.dropped,
                graph.totals.failed
            ),
            (
                status.mutual_tls,
                status.plaintext,
                status.dropped,
                status.failed
            )
        );
        assert_eq!(graph.nodes[1].totals, Some(status));
    }

    #[test]
    fn the_window_leaves_out_older_records_and_failures_stay_on_their_edge() {
        let mut report = walkthrough();
        let newest = report
            .records
            .iter()
            .map(|r| r.start_unix_ms)
            .max()
            .unwrap();
        for (i, record) in report.records.iter_mut().enumerate() {
            record.start_unix_ms = newest - 1000 * (3 - i as u64);
        }
        report.records[0].verdict = Verdict::Failed;
        let graph = build(&report, None, None, newest);
        let mtls = graph
            .edges
            .iter()
            .find(|e| e.security == Security::MutualTls)
            .unwrap();
        assert_eq!((mtls.outcome, mtls.failed), (Verdict::Allowed, 1));
        assert_eq!(graph.totals.failed, 1);
        let recent = build(&report, Some(2), Some(newest - 1500), newest);
        assert_eq!(recent.edges.len(), 1, "{:#?}", recent.edges);
        assert_eq!(recent.edges[0].outcome, Verdict::Dropped);
        assert_eq!(recent.window_secs, Some(2));
    }

    #[test]
    fn identities_are_shortened() {
        assert_eq!(
            short_identity("spiffe://cluster.local/ns/foo/sa/sleep"),
            "foo/sa/sleep"
        );
        assert_eq!(short_identity("not-spiffe"), "not-spiffe");
    }
}
