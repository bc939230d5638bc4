//! `interceptor status --graph`: the traffic graph as an edge list that reads without colour.
//!
//! One edge a line, `caller ─mark─▶ destination  KIND`, then its counts, bytes, ports and what
//! decided it on the next line. The marks: `══🔒══▶` mutual TLS, `──────▶` plaintext,
//! `───✗` dropped.

use std::fmt::Write;

use crate::{
    graph::{Graph, GraphEdge, GraphNode, NodeKind},
    records::{Security, Verdict},
    status::render::{bytes, paint},
};

const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const RED: &str = "\x1b[31m";

/// The graph as text; `colour` adds ANSI colours to the marks and kinds.
pub fn render(graph: &Graph, colour: bool) -> String {
    let mut out = String::new();
    let window = match graph.window_secs {
        Some(secs) => format!("connections of the last {}", duration(secs)),
        None => format!("all {} records kept", graph.records_kept),
    };
    let _ = writeln!(
        out,
        "node {}: who talks to whom (this agent's view; {window})",
        graph.node
    );
    let t = &graph.totals;
    let _ = writeln!(
        out,
        "  {} mutual TLS · {} plaintext · {} dropped · {} failed\n",
        t.mutual_tls, t.plaintext, t.dropped, t.failed
    );
    if graph.edges.is_empty() {
        let _ = writeln!(out, "  no connections");
        return out;
    }
    let name = |id: &str| {
        graph
            .nodes
            .iter()
            .find(|n| n.id == id)
            .map_or_else(|| id.to_owned(), node_name)
    };
    let callers: Vec<String> = graph.edges.iter().map(|e| name(&e.source)).collect();
    let targets: Vec<String> = graph.edges.iter().map(|e| name(&e.target)).collect();
    let caller_width = callers.iter().map(|c| width(c)).max().unwrap_or(0);
    let target_width = targets.iter().map(|c| width(c)).max().unwrap_or(0);
    for ((edge, caller), target) in graph.edges.iter().zip(&callers).zip(&targets) {
        let (mark, kind, code) = look(edge);
        let _ = writeln!(
            out,
            "  {caller}{} {} {target}{}  {}",
            " ".repeat(caller_width - width(caller)),
            paint(mark, code, colour),
            " ".repeat(target_width - width(target)),
            paint(kind, code, colour),
        );
        let _ = writeln!(out, "      {}", details(edge, colour));
    }
    out
}

/// The mark, the kind's word and its colour.
fn look(edge: &GraphEdge) -> (&'static str, &'static str, &'static str) {
    match (edge.outcome, edge.security) {
        (Verdict::Dropped, _) => ("───✗   ", "DROPPED", RED),
        (_, Security::MutualTls) => ("══🔒══▶", "mutual TLS", GREEN),
        (_, Security::Plaintext) => ("──────▶", "plaintext", YELLOW),
    }
}

/// `1 connection, 90 B sent, 204 B received, port 8080; mutual TLS, both identities checked`.
fn details(edge: &GraphEdge, colour: bool) -> String {
    let mut text = match edge.outcome {
        Verdict::Dropped => format!("{} dropped", edge.connections),
        _ => format!(
            "{} connection{}, {} sent, {} received",
            edge.connections,
            if edge.connections == 1 { "" } else { "s" },
            bytes(edge.bytes_sent),
            bytes(edge.bytes_received)
        ),
    };
    if edge.open > 0 {
        let _ = write!(text, ", {} open", edge.open);
    }
    if edge.failed > 0 {
        let _ = write!(
            text,
            ", {}",
            paint(&format!("{} failed", edge.failed), RED, colour)
        );
    }
    let ports: Vec<String> = edge.ports.iter().map(u16::to_string).collect();
    let _ = write!(
        text,
        ", port{} {}; {}",
        if ports.len() == 1 { "" } else { "s" },
        ports.join(", "),
        edge.policies.join("; ")
    );
    text
}

/// How an end is named: `namespace/name`, `unknown <address>` or `outside <address>`.
fn node_name(node: &GraphNode) -> String {
    match node.kind {
        NodeKind::Workload => node.label.clone(),
        NodeKind::Unknown => format!("unknown {}", node.label),
        NodeKind::External => format!("outside {}", node.label),
    }
}

/// Terminal columns of `text`: the padlock and other pictographs take two.
fn width(text: &str) -> usize {
    text.chars()
        .map(|c| if c as u32 >= 0x1F300 { 2 } else { 1 })
        .sum()
}

/// 300 → `5m`, 90 → `90s`.
fn duration(secs: u64) -> String {
    match secs {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::GraphTotals;

    fn node(id: &str, kind: NodeKind, label: &str) -> GraphNode {
        GraphNode {
            id: id.into(),
            kind,
            label: label.into(),
            namespace: None,
            name: None,
            identity: None,
            address: None,
            local: false,
            labels: Default::default(),
            totals: None,
        }
    }

    fn edge(source: &str, security: Security, outcome: Verdict, policy: &str) -> GraphEdge {
        GraphEdge {
            id: format!("{source}>{outcome:?}"),
            source: source.into(),
            target: "workload:vehicles/position-tracker".into(),
            security,
            outcome,
            connections: 1,
            failed: 0,
            open: 0,
            bytes_sent: 90,
            bytes_received: 204,
            ports: vec![8080],
            policies: vec![policy.into()],
            last_unix_ms: 0,
            recent: vec![],
        }
    }

    #[test]
    fn one_line_per_edge_with_marks_that_need_no_colour() {
        let graph = Graph {
            node: "node-2".into(),
            view: "node".into(),
            generated_unix_ms: 0,
            window_secs: Some(300),
            records_kept: 3,
            nodes: vec![
                node("workload:foo/sleep", NodeKind::Workload, "foo/sleep"),
                node(
                    "workload:vehicles/position-tracker",
                    NodeKind::Workload,
                    "vehicles/position-tracker",
                ),
                node("unknown:198.18.0.11", NodeKind::Unknown, "198.18.0.11"),
            ],
            edges: vec![
                edge(
                    "workload:foo/sleep",
                    Security::MutualTls,
                    Verdict::Allowed,
                    "mutual TLS, both identities checked",
                ),
                edge(
                    "unknown:198.18.0.11",
                    Security::Plaintext,
                    Verdict::Allowed,
                    "plaintext allowed: PERMISSIVE (mesh default, no policy)",
                ),
                edge(
                    "unknown:198.18.0.11",
                    Security::Plaintext,
                    Verdict::Dropped,
                    "plaintext refused: STRICT by istio-system/default",
                ),
            ],
            totals: GraphTotals {
                mutual_tls: 1,
                plaintext: 1,
                dropped: 1,
                failed: 0,
            },
        };
        let text = render(&graph, false);
        assert!(!text.contains('\x1b'));
        assert!(text.contains("connections of the last 5m"), "{text}");
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("position-tracker"))
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].contains("foo/sleep") && lines[0].contains('🔒'),
            "{text}"
        );
        assert!(lines[0].ends_with("mutual TLS"), "{text}");
        assert!(!lines[1].contains('🔒') && lines[1].ends_with("plaintext"));
        assert!(lines[2].contains('✗') && lines[2].ends_with("DROPPED"));
        // The destinations line up although the padlock is two columns wide.
        let column = |line: &str| width(&line[..line.find("vehicles").unwrap()]);
        assert_eq!(column(lines[0]), column(lines[1]), "{text}");
        assert_eq!(column(lines[1]), column(lines[2]), "{text}");
        assert!(text.contains("STRICT by istio-system/default"));
        assert!(text.contains("1 connection, 90 B sent, 204 B received, port 8080"));
        assert!(render(&graph, true).contains("\x1b[32m══🔒══▶"));
    }
}
