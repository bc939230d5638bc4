//! The agent's side of `policy apply --dry-run` and `policy delete --dry-run`: the policy a
//! change would make (built by the real change's code on a copy of the sources), the
//! enrolled workloads and the kept records, handed to [`crate::dry_run`]. Read-only: nothing
//! is saved, and neither the kernel nor the sources change.

use super::{Agent, AgentError};
use crate::{
    dry_run::{DryRunInput, DryRunReport, PlaintextCallers, plaintext_callers},
    policy::PolicyChange,
    workloads::WorkloadSpec,
};

impl Agent {
    /// What `change` would do to the enrolled workloads' modes and to the plaintext callers
    /// in the records that started at or after `since_unix_ms`.
    pub async fn dry_run(
        &self,
        change: PolicyChange,
        since_unix_ms: Option<u64>,
    ) -> Result<DryRunReport, AgentError> {
        let description = change.describe();
        let (before, after) = self.preview_policy(change).await?;
        let workloads = self.workload_specs().await;
        let records = self.records().recent();
        let input = DryRunInput {
            before: &before,
            after: &after,
            workloads: &workloads,
            records: &records,
            since_unix_ms,
        };
        Ok(input.report(self.config.node_name.clone(), description))
    }

    /// Per workload under PERMISSIVE, the plaintext callers in `records` (for `status`).
    pub(super) fn plaintext_callers(
        &self,
        workloads: &[WorkloadSpec],
        records: &[crate::records::ConnectionRecord],
    ) -> Vec<PlaintextCallers> {
        plaintext_callers(&self.policy_set(), workloads, records)
    }

    /// The enrolled workloads' specs.
    pub(super) async fn workload_specs(&self) -> Vec<WorkloadSpec> {
        let workloads = self.workloads.lock().await;
        workloads
            .values()
            .map(|running| running.spec.clone())
            .collect()
    }
}
