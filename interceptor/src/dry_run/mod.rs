//! What a policy change would do, before it is made: `interceptor policy apply --dry-run`
//! and `policy delete --dry-run`, and the plaintext callers `interceptor status` shows per
//! workload under PERMISSIVE.
//!
//! Nothing here resolves policy on its own. The agent builds the policy set a change would
//! make with the same [`crate::policy::PolicyChange::make`] as the real change, on a copy
//! of its sources; each workload's mode comes from [`PolicySet::effective`] (precedence, the
//! age rule, port-level settings, UNSET), and what the pod's door then does with plaintext
//! from [`DoorMode::for_mode`], the mapping the agent writes into the kernel. This module
//! only lays the recorded plaintext callers against the two answers.

pub mod render;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use crate::{
    ebpf::DoorMode,
    policy::{Decision, EffectivePolicy, Mode, PolicySet, WorkloadRef},
    records::{ConnectionRecord, Direction, Security, Verdict},
    workloads::{WorkloadKey, WorkloadSpec},
};

/// Exit status of a dry run after which some caller the current policy lets in would be
/// refused (0: none would; 1: the dry run itself failed; 2: bad command line).
pub const EXIT_WOULD_REFUSE: u8 = 3;

/// What the pod's door does with a plaintext connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DoorVerdict {
    /// Let in (PERMISSIVE, DISABLE).
    Allowed,
    /// Refused by the kernel with a reset (STRICT).
    Refused,
}

impl DoorVerdict {
    /// What the door does under `decision`, by the mapping the agent writes into the kernel.
    pub fn of(decision: &Decision) -> DoorVerdict {
        if DoorMode::for_mode(decision.mode).refuses_plaintext() {
            DoorVerdict::Refused
        } else {
            DoorVerdict::Allowed
        }
    }
}

/// The decision for one port of a workload under one policy set, and its verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortVerdict {
    /// The mode and the policy that decides it.
    pub decision: Decision,
    /// What the door does with plaintext.
    pub verdict: DoorVerdict,
}

impl PortVerdict {
    fn of(decision: &Decision) -> PortVerdict {
        PortVerdict {
            decision: decision.clone(),
            verdict: DoorVerdict::of(decision),
        }
    }
}

/// A workload's mode for one port (or its default) before and after the change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeChange {
    /// namespace/name.
    pub workload: String,
    /// The port; `None` for the workload's default (every port without its own entry).
    pub port: Option<u16>,
    /// Under the active policy.
    pub before: Decision,
    /// Under the policy after the change.
    pub after: Decision,
    /// The mode or the deciding policy differs.
    pub changed: bool,
}

/// How the change treats one caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Let in now, refused after the change: the change would cut it off.
    CutOff,
    /// Let in after the change only because of a port-level exception
    /// (`portLevelMtls`) while the workload's default would refuse it.
    AllowedByPortException,
    /// Refused now and after the change.
    StillRefused,
    /// Let in after the change by the workload's mode.
    Allowed,
}

/// One plaintext caller of one workload port, from the kept records, judged before and
/// after the change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerVerdict {
    /// The caller's address (its ports vary per connection).
    pub caller: IpAddr,
    /// Destination workload, namespace/name.
    pub workload: String,
    /// Destination (container) port.
    pub port: u16,
    /// Plaintext connections (let in or refused) from this caller to this port.
    pub connections: u64,
    /// Start of the first of them, ms since the Unix epoch.
    pub first_seen_unix_ms: u64,
    /// Start of the last of them, ms since the Unix epoch.
    pub last_seen_unix_ms: u64,
    /// Under the active policy.
    pub before: PortVerdict,
    /// Under the policy after the change.
    pub after: PortVerdict,
    /// What the change means for this caller.
    pub outcome: Outcome,
}

/// Which records the dry run looked at.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Records that started before this were left out (`--since`); `None`: all kept ones.
    pub since_unix_ms: Option<u64>,
    /// Start of the oldest record the agent still keeps: nothing older can be judged.
    pub oldest_kept_unix_ms: Option<u64>,
    /// Inbound plaintext records in the window.
    pub plaintext_records: u64,
    /// Of those, records of workloads no longer enrolled here (their labels are unknown,
    /// so they are not judged).
    pub unjudged_records: u64,
}

/// The answer to a dry run. This is the `policy apply --dry-run -o json` schema
/// (ARCHITECTURE.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRunReport {
    /// The node whose agent answered.
    pub node: String,
    /// The change, for people: "apply of 1 PeerAuthentication object(s)".
    pub change: String,
    /// Istio's root namespace in force.
    pub root_namespace: String,
    /// The records judged.
    pub window: Window,
    /// Every enrolled workload's default and listed ports, before and after.
    pub modes: Vec<ModeChange>,
    /// Every plaintext caller in the window, the cut-off ones first.
    pub callers: Vec<CallerVerdict>,
    /// How many callers would be cut off ([`Outcome::CutOff`]); non-zero gives
    /// [`EXIT_WOULD_REFUSE`].
    pub would_refuse: usize,
}

/// What a dry run compares.
pub struct DryRunInput<'a> {
    /// The active policy.
    pub before: &'a PolicySet,
    /// The policy the change would make.
    pub after: &'a PolicySet,
    /// The enrolled workloads.
    pub workloads: &'a [WorkloadSpec],
    /// The kept records, oldest first.
    pub records: &'a [ConnectionRecord],
    /// Leave out records that started earlier (ms since the Unix epoch).
    pub since_unix_ms: Option<u64>,
}

impl DryRunInput<'_> {
    /// The report for `node` about `change` (its description).
    pub fn report(&self, node: String, change: String) -> DryRunReport {
        let effective = |set: &PolicySet| -> BTreeMap<WorkloadKey, EffectivePolicy> {
            self.workloads
                .iter()
                .map(|spec| (spec.key(), effective(set, spec)))
                .collect()
        };
        let (before, after) = (effective(self.before), effective(self.after));
        let modes = before
            .iter()
            .flat_map(|(key, then)| mode_changes(key, then, &after[key]))
            .collect();
        let attempts = PlaintextAttempts::gather(self.records, self.since_unix_ms);
        let mut unjudged = 0;
        let mut callers: Vec<CallerVerdict> = Vec::new();
        for ((key, port, caller), seen) in &attempts.by_caller {
            let (Some(then), Some(next)) = (before.get(key), after.get(key)) else {
                unjudged += seen.records;
                continue;
            };
            let (was, will) = (PortVerdict::of(then.for_port(*port)), next.for_port(*port));
            let will_default = DoorVerdict::of(&next.default);
            let after = PortVerdict::of(will);
            let outcome = match (was.verdict, after.verdict) {
                (DoorVerdict::Allowed, DoorVerdict::Refused) => Outcome::CutOff,
                (DoorVerdict::Refused, DoorVerdict::Refused) => Outcome::StillRefused,
                (_, DoorVerdict::Allowed)
                    if next.ports.contains_key(port) && will_default == DoorVerdict::Refused =>
                {
                    Outcome::AllowedByPortException
                }
                (_, DoorVerdict::Allowed) => Outcome::Allowed,
            };
            callers.push(CallerVerdict {
                caller: *caller,
                workload: key.to_string(),
                port: *port,
                connections: seen.connections,
                first_seen_unix_ms: seen.first_unix_ms,
                last_seen_unix_ms: seen.last_unix_ms,
                before: was,
                after,
                outcome,
            });
        }
        callers.sort_by_key(|c| c.outcome);
        DryRunReport {
            node,
            change,
            root_namespace: self.after.root_namespace().to_owned(),
            window: Window {
                since_unix_ms: self.since_unix_ms,
                oldest_kept_unix_ms: self.records.iter().map(|r| r.start_unix_ms).min(),
                plaintext_records: attempts.records,
                unjudged_records: unjudged,
            },
            modes,
            would_refuse: callers
                .iter()
                .filter(|c| c.outcome == Outcome::CutOff)
                .count(),
            callers,
        }
    }
}

/// The workload's effective policy, by the resolution the agent writes into the kernel.
fn effective(set: &PolicySet, spec: &WorkloadSpec) -> EffectivePolicy {
    set.effective(&WorkloadRef {
        namespace: &spec.namespace,
        labels: &spec.labels,
    })
}

/// The default and every port either policy lists, before and after.
fn mode_changes(
    key: &WorkloadKey,
    before: &EffectivePolicy,
    after: &EffectivePolicy,
) -> Vec<ModeChange> {
    let ports: BTreeSet<u16> = before
        .ports
        .keys()
        .chain(after.ports.keys())
        .copied()
        .collect();
    std::iter::once(None)
        .chain(ports.into_iter().map(Some))
        .map(|port| {
            let pick = |effective: &EffectivePolicy| match port {
                Some(port) => effective.for_port(port).clone(),
                None => effective.default.clone(),
            };
            let (before, after) = (pick(before), pick(after));
            ModeChange {
                workload: key.to_string(),
                port,
                changed: before != after,
                before,
                after,
            }
        })
        .collect()
}

/// Connections of one caller to one workload port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    records: u64,
    connections: u64,
    first_unix_ms: u64,
    last_unix_ms: u64,
}

/// The inbound plaintext records of this node's workloads, by (workload, port, caller).
struct PlaintextAttempts {
    by_caller: BTreeMap<(WorkloadKey, u16, IpAddr), Seen>,
    records: u64,
}

impl PlaintextAttempts {
    /// Gathers the records that started at or after `since_unix_ms`.
    fn gather(records: &[ConnectionRecord], since_unix_ms: Option<u64>) -> Self {
        Self::gather_where(records, |record| {
            since_unix_ms.is_none_or(|since| record.start_unix_ms >= since)
        })
    }

    /// Gathers the records `keep` accepts.
    fn gather_where(
        records: &[ConnectionRecord],
        keep: impl Fn(&ConnectionRecord) -> bool,
    ) -> Self {
        let mut attempts = PlaintextAttempts {
            by_caller: BTreeMap::new(),
            records: 0,
        };
        for record in records.iter().filter(|record| keep(record)) {
            let connection = &record.connection;
            let Some(workload) = &connection.destination_workload else {
                continue;
            };
            if connection.direction != Direction::Inbound
                || connection.security != Security::Plaintext
            {
                continue;
            }
            attempts.records += 1;
            let key = (
                workload.clone(),
                connection.destination.port(),
                connection.source.ip(),
            );
            let start = record.start_unix_ms;
            attempts
                .by_caller
                .entry(key)
                .and_modify(|seen| {
                    seen.records += 1;
                    seen.connections += record.count;
                    seen.first_unix_ms = seen.first_unix_ms.min(start);
                    seen.last_unix_ms = seen.last_unix_ms.max(start);
                })
                .or_insert(Seen {
                    records: 1,
                    connections: record.count,
                    first_unix_ms: start,
                    last_unix_ms: start,
                });
        }
        attempts
    }
}

/// A workload that takes plaintext under PERMISSIVE, and who sent it: what a switch to
/// STRICT would cut. Part of the `status --output json` schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaintextCallers {
    /// namespace/name.
    pub workload: String,
    /// Its default mode now.
    pub default_mode: Mode,
    /// Ports with their own PERMISSIVE entry (when the default is not PERMISSIVE).
    pub permissive_ports: Vec<u16>,
    /// Distinct caller addresses whose plaintext a PERMISSIVE port let in.
    pub callers: u64,
    /// Their connections.
    pub connections: u64,
    /// Start of the last one, ms since the Unix epoch.
    pub last_seen_unix_ms: Option<u64>,
}

/// For every enrolled workload with a PERMISSIVE default or port: the distinct callers, in
/// the kept records, that a PERMISSIVE port let in plaintext.
pub fn plaintext_callers(
    set: &PolicySet,
    workloads: &[WorkloadSpec],
    records: &[ConnectionRecord],
) -> Vec<PlaintextCallers> {
    let attempts =
        PlaintextAttempts::gather_where(records, |record| record.verdict == Verdict::Allowed);
    workloads
        .iter()
        .filter_map(|spec| {
            let key = spec.key();
            let policy = effective(set, spec);
            let permissive = |port: u16| policy.for_port(port).mode == Mode::Permissive;
            let permissive_ports: Vec<u16> = policy
                .ports
                .iter()
                .filter(|(_, d)| {
                    d.mode == Mode::Permissive && policy.default.mode != Mode::Permissive
                })
                .map(|(port, _)| *port)
                .collect();
            if policy.default.mode != Mode::Permissive && permissive_ports.is_empty() {
                return None;
            }
            let seen: Vec<(&IpAddr, &Seen)> = attempts
                .by_caller
                .iter()
                .filter(|((workload, port, _), _)| *workload == key && permissive(*port))
                .map(|((_, _, caller), seen)| (caller, seen))
                .collect();
            let distinct: BTreeSet<&IpAddr> = seen.iter().map(|(caller, _)| *caller).collect();
            Some(PlaintextCallers {
                workload: key.to_string(),
                default_mode: policy.default.mode,
                permissive_ports,
                callers: distinct.len() as u64,
                connections: seen.iter().map(|(_, s)| s.connections).sum(),
                last_seen_unix_ms: seen.iter().map(|(_, s)| s.last_unix_ms).max(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
