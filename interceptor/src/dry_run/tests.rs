use std::{net::SocketAddr, sync::Arc};

use super::*;
use crate::{
    policy::{PolicyChange, PolicyRef, PolicySources, parse_str},
    records::Connection,
};

const ROOT: &str = "istio-system";
const OUTSIDE: &str = "198.18.0.1";

fn yaml(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{spec}"
    )
}

fn mode(mode: &str) -> String {
    format!("  mtls:\n    mode: {mode}\n")
}

fn policies(text: &str) -> Vec<crate::policy::PeerAuthentication> {
    parse_str(text, "test.yaml").unwrap()
}

/// Sources holding `applied`, applied one batch after another (oldest first).
fn sources(applied: &[String]) -> PolicySources {
    let mut sources = PolicySources::new(ROOT);
    for text in applied {
        sources.apply(policies(text)).unwrap();
    }
    sources
}

/// The active set and the one `change` makes, by the agent's own path.
fn before_after(sources: &PolicySources, change: PolicyChange) -> (Arc<PolicySet>, Arc<PolicySet>) {
    let mut next = sources.clone();
    change.make(&mut next).unwrap();
    (sources.active(), next.active())
}

fn tracker() -> WorkloadSpec {
    WorkloadSpec {
        name: "position-tracker".into(),
        namespace: "vehicles".into(),
        service_account: "position-tracker".into(),
        labels: [("app".to_owned(), "position-tracker".to_owned())].into(),
        cgroup: "/sys/fs/cgroup/pods/tracker".into(),
        netns: "/run/netns/tracker".into(),
    }
}

fn record(
    id: u64,
    start_unix_ms: u64,
    from: &str,
    port: u16,
    security: Security,
    verdict: Verdict,
) -> ConnectionRecord {
    ConnectionRecord {
        id,
        start_unix_ms,
        connection: Connection {
            direction: Direction::Inbound,
            source: SocketAddr::new(from.parse().unwrap(), 40_000 + id as u16),
            source_identity: None,
            source_workload: None,
            destination: SocketAddr::new("198.19.2.10".parse().unwrap(), port),
            destination_identity: None,
            destination_workload: Some(tracker().key()),
            destination_service: None,
            peer_certificate_serial: None,
            security,
        },
        verdict,
        reason: None,
        bytes_sent: 0,
        bytes_received: 0,
        duration_ms: 0,
        open: false,
        count: 1,
    }
}

fn plaintext(id: u64, at: u64, from: &str, port: u16, verdict: Verdict) -> ConnectionRecord {
    record(id, at, from, port, Security::Plaintext, verdict)
}

fn dry_run(
    sources: &PolicySources,
    change: PolicyChange,
    records: &[ConnectionRecord],
    since_unix_ms: Option<u64>,
) -> DryRunReport {
    let (before, after) = before_after(sources, change);
    DryRunInput {
        before: &before,
        after: &after,
        workloads: &[tracker()],
        records,
        since_unix_ms,
    }
    .report("node-2".into(), "test".into())
}

fn apply(text: String) -> PolicyChange {
    PolicyChange::Apply {
        policies: policies(&text),
    }
}

fn by(mode: Mode, namespace: &str, name: &str) -> Decision {
    Decision {
        mode,
        policy: Some(PolicyRef {
            namespace: namespace.into(),
            name: name.into(),
        }),
    }
}

#[test]
fn mesh_strict_names_the_outside_caller_and_not_the_meshed_one() {
    let records = [
        record(
            1,
            1_000,
            "198.19.1.10",
            8080,
            Security::MutualTls,
            Verdict::Allowed,
        ),
        plaintext(2, 2_000, OUTSIDE, 8080, Verdict::Allowed),
        plaintext(3, 3_000, OUTSIDE, 8080, Verdict::Allowed),
    ];
    let report = dry_run(
        &sources(&[]),
        apply(yaml(ROOT, "default", &mode("STRICT"))),
        &records,
        None,
    );
    assert_eq!(report.would_refuse, 1);
    assert_eq!(report.callers.len(), 1, "{report:#?}");
    let caller = &report.callers[0];
    assert_eq!(caller.caller.to_string(), OUTSIDE);
    assert_eq!(
        (
            caller.port,
            caller.connections,
            caller.first_seen_unix_ms,
            caller.last_seen_unix_ms
        ),
        (8080, 2, 2_000, 3_000)
    );
    assert_eq!(caller.outcome, Outcome::CutOff);
    assert_eq!(caller.before.decision, Decision::builtin_default());
    assert_eq!(caller.after.decision, by(Mode::Strict, ROOT, "default"));
    assert_eq!(caller.after.verdict, DoorVerdict::Refused);
    assert_eq!(report.modes.len(), 1);
    assert!(report.modes[0].changed && report.modes[0].port.is_none());
    assert_eq!(report.window.plaintext_records, 2);
    assert_eq!(report.window.oldest_kept_unix_ms, Some(1_000));
}

#[test]
fn a_port_exception_is_listed_apart_and_refusals_already_made_do_not_count() {
    let before = sources(&[yaml("vehicles", "ns-strict", &mode("STRICT"))]);
    let records = [
        plaintext(1, 1_000, "198.18.0.2", 8080, Verdict::Dropped),
        plaintext(2, 2_000, OUTSIDE, 8081, Verdict::Dropped),
    ];
    let workload = yaml(
        "vehicles",
        "tracker",
        "  selector:\n    matchLabels:\n      app: position-tracker\n  mtls:\n    mode: UNSET\n  portLevelMtls:\n    8081:\n      mode: PERMISSIVE\n",
    );
    let report = dry_run(&before, apply(workload), &records, None);
    assert_eq!(report.would_refuse, 0, "{report:#?}");
    let outcome = |port: u16| {
        report
            .callers
            .iter()
            .find(|c| c.port == port)
            .map(|c| (c.outcome, c.after.decision.clone()))
    };
    assert_eq!(
        outcome(8080),
        Some((
            Outcome::StillRefused,
            by(Mode::Strict, "vehicles", "ns-strict")
        ))
    );
    assert_eq!(
        outcome(8081),
        Some((
            Outcome::AllowedByPortException,
            by(Mode::Permissive, "vehicles", "tracker")
        ))
    );
    let port_row = report.modes.iter().find(|m| m.port == Some(8081)).unwrap();
    assert!(port_row.changed);
    let default_row = report.modes.iter().find(|m| m.port.is_none()).unwrap();
    assert!(
        !default_row.changed,
        "UNSET inherits the namespace's STRICT"
    );
}

#[test]
fn the_age_rule_decides_as_in_the_real_apply() {
    // `first` is older than `second`; re-applying it changed keeps it the oldest.
    let before = sources(&[
        yaml("vehicles", "first", &mode("STRICT")),
        yaml("vehicles", "second", &mode("DISABLE")),
    ]);
    let records = [plaintext(1, 1_000, OUTSIDE, 8080, Verdict::Dropped)];
    let report = dry_run(
        &before,
        apply(yaml("vehicles", "first", &mode("PERMISSIVE"))),
        &records,
        None,
    );
    assert_eq!(
        report.callers[0].after.decision,
        by(Mode::Permissive, "vehicles", "first")
    );
    assert_eq!(report.callers[0].outcome, Outcome::Allowed);
    // A new namespace policy is younger and changes nothing.
    let report = dry_run(
        &before,
        apply(yaml("vehicles", "third", &mode("PERMISSIVE"))),
        &records,
        None,
    );
    assert_eq!(report.callers[0].outcome, Outcome::StillRefused);
    assert!(report.modes.iter().all(|m| !m.changed));
    // Deleting `first` lets `second` decide.
    let report = dry_run(
        &before,
        PolicyChange::Delete {
            namespace: "vehicles".into(),
            name: "first".into(),
        },
        &records,
        None,
    );
    assert_eq!(
        report.callers[0].after.decision,
        by(Mode::Disable, "vehicles", "second")
    );
}

#[test]
fn the_window_leaves_out_older_records_and_unknown_workloads_are_not_judged() {
    let mut gone = plaintext(3, 3_000, OUTSIDE, 8080, Verdict::Allowed);
    gone.connection.destination_workload = Some(WorkloadKey {
        namespace: "vehicles".into(),
        name: "removed".into(),
    });
    let records = [
        plaintext(1, 1_000, "198.18.0.9", 8080, Verdict::Allowed),
        plaintext(2, 2_000, OUTSIDE, 8080, Verdict::Allowed),
        gone,
    ];
    let report = dry_run(
        &sources(&[]),
        apply(yaml(ROOT, "default", &mode("STRICT"))),
        &records,
        Some(2_000),
    );
    assert_eq!(report.callers.len(), 1);
    assert_eq!(report.callers[0].caller.to_string(), OUTSIDE);
    assert_eq!(
        (
            report.window.plaintext_records,
            report.window.unjudged_records
        ),
        (2, 1)
    );
}

#[test]
fn status_counts_distinct_plaintext_callers_of_permissive_workloads() {
    let records = [
        plaintext(1, 1_000, OUTSIDE, 8080, Verdict::Allowed),
        plaintext(2, 2_000, OUTSIDE, 8081, Verdict::Allowed),
        plaintext(3, 3_000, "198.18.0.2", 8080, Verdict::Allowed),
        // Refused: not something STRICT would cut.
        plaintext(4, 4_000, "198.18.0.3", 8080, Verdict::Dropped),
        record(
            5,
            5_000,
            "198.19.1.10",
            8080,
            Security::MutualTls,
            Verdict::Allowed,
        ),
    ];
    let rows = plaintext_callers(&sources(&[]).active(), &[tracker()], &records);
    assert_eq!(
        rows,
        vec![PlaintextCallers {
            workload: "vehicles/position-tracker".into(),
            default_mode: Mode::Permissive,
            permissive_ports: vec![],
            callers: 2,
            connections: 3,
            last_seen_unix_ms: Some(3_000),
        }]
    );
    // Under STRICT with a PERMISSIVE port, only that port's callers count.
    let strict_but_8081 = sources(&[
        yaml(ROOT, "default", &mode("STRICT")),
        yaml(
            "vehicles",
            "tracker",
            "  selector:\n    matchLabels:\n      app: position-tracker\n  portLevelMtls:\n    8081:\n      mode: PERMISSIVE\n",
        ),
    ]);
    let rows = plaintext_callers(&strict_but_8081.active(), &[tracker()], &records);
    assert_eq!(rows[0].permissive_ports, vec![8081]);
    assert_eq!(
        (rows[0].callers, rows[0].last_seen_unix_ms),
        (1, Some(2_000))
    );
    // Under STRICT alone the workload is not listed.
    let strict = sources(&[yaml(ROOT, "default", &mode("STRICT"))]);
    assert!(plaintext_callers(&strict.active(), &[tracker()], &records).is_empty());
}
