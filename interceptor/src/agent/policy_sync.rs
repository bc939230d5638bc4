//! The agent's policy: files from `--policy-dir` plus batches applied through the CLI, turned
//! into per-pod, per-port modes in the kernel.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Agent, AgentConfig};
use crate::{
    policy::{self, Decision, EffectivePolicy, Mode, PeerAuthentication, PolicySet, WorkloadRef},
    workloads::WorkloadSpec,
};

/// How often the policy directory is checked for changes.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Where the active policy came from.
pub(super) struct PolicyState {
    from_dir: Vec<PeerAuthentication>,
    applied: Vec<PeerAuthentication>,
    active: PolicySet,
    applied_file: PathBuf,
}

/// `interceptor policy list`: the policies and what they mean for each workload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyReport {
    /// Istio's root namespace in force.
    pub root_namespace: String,
    /// Active policies in application order.
    pub policies: Vec<PeerAuthentication>,
    /// Effective mode per enrolled workload and port.
    pub workloads: BTreeMap<String, EffectivePolicy>,
}

impl PolicyState {
    /// Loads the applied batches saved by an earlier run and the policy directory. A broken
    /// policy directory stops the agent at start, so it never runs with a policy nobody wrote.
    pub(super) fn load(config: &AgentConfig) -> anyhow::Result<Self> {
        let applied_file = config.state_dir.join("applied-policies.json");
        let applied: Vec<PeerAuthentication> = match std::fs::read(&applied_file) {
            Ok(bytes) => serde_json::from_slice(&bytes)?,
            Err(_) => Vec::new(),
        };
        let from_dir = match &config.policy_dir {
            Some(dir) => policy::load_paths(std::slice::from_ref(dir))?,
            None => Vec::new(),
        };
        let active = combine(&config.root_namespace, &from_dir, &applied)?;
        Ok(Self {
            from_dir,
            applied,
            active,
            applied_file,
        })
    }

    /// The policy in force.
    pub(super) fn active(&self) -> &PolicySet {
        &self.active
    }
}

/// Directory files first; CLI-applied objects replace directory objects of the same name.
fn combine(
    root_namespace: &str,
    from_dir: &[PeerAuthentication],
    applied: &[PeerAuthentication],
) -> Result<PolicySet, policy::PolicyError> {
    PolicySet::new(root_namespace)
        .replaced(from_dir.to_vec())?
        .with_applied(applied.to_vec())
}

/// The kernel's mode value for a resolved mode.
fn kernel_mode(decision: &Decision) -> u32 {
    match decision.mode {
        Mode::Disable => interceptor_common::MODE_DISABLE,
        Mode::Strict => interceptor_common::MODE_STRICT,
        Mode::Permissive | Mode::Unset => interceptor_common::MODE_PERMISSIVE,
    }
}

impl Agent {
    /// Effective policy of a workload under the active policy.
    pub fn effective_policy(&self, spec: &WorkloadSpec) -> EffectivePolicy {
        self.policy_set().effective(&WorkloadRef {
            namespace: &spec.namespace,
            labels: &spec.labels,
        })
    }

    /// (port, kernel mode) entries for a workload; port 0 is its default.
    pub(super) fn kernel_modes(&self, spec: &WorkloadSpec) -> Vec<(u16, u32)> {
        let effective = self.effective_policy(spec);
        std::iter::once((0, kernel_mode(&effective.default)))
            .chain(
                effective
                    .ports
                    .iter()
                    .map(|(port, d)| (*port, kernel_mode(d))),
            )
            .collect()
    }

    /// Applies a batch, all or nothing.
    pub async fn apply_policies(
        &self,
        batch: Vec<PeerAuthentication>,
    ) -> Result<PolicyReport, String> {
        {
            let mut state = self.policy.lock().map_err(|_| "policy lock poisoned")?;
            let mut applied = state.applied.clone();
            for object in batch.iter() {
                applied.retain(|p| (&p.namespace, &p.name) != (&object.namespace, &object.name));
            }
            // Duplicates inside the batch stay duplicates in `applied`, which `combine` refuses.
            applied.extend(batch);
            let active = combine(state.active.root_namespace(), &state.from_dir, &applied)
                .map_err(|e| e.to_string())?;
            save_applied(&state.applied_file, &applied)?;
            state.applied = applied;
            state.active = active;
        }
        self.sync_kernel().await;
        Ok(self.policy_report().await)
    }

    /// Deletes a policy by namespace and name.
    pub async fn delete_policy(&self, namespace: &str, name: &str) -> Result<(), String> {
        {
            let mut state = self.policy.lock().map_err(|_| "policy lock poisoned")?;
            let mut applied = state.applied.clone();
            let mut from_dir = state.from_dir.clone();
            let before = applied.len() + from_dir.len();
            applied.retain(|p| (p.namespace.as_str(), p.name.as_str()) != (namespace, name));
            from_dir.retain(|p| (p.namespace.as_str(), p.name.as_str()) != (namespace, name));
            if applied.len() + from_dir.len() == before {
                return Err(format!(
                    "no policy {namespace}/{name}; `interceptor policy list` shows the active ones"
                ));
            }
            let active = combine(state.active.root_namespace(), &from_dir, &applied)
                .map_err(|e| e.to_string())?;
            save_applied(&state.applied_file, &applied)?;
            state.applied = applied;
            state.from_dir = from_dir;
            state.active = active;
        }
        self.sync_kernel().await;
        Ok(())
    }

    /// Policies and effective modes of every enrolled workload.
    pub async fn policy_report(&self) -> PolicyReport {
        let set = self.policy_set();
        let workloads = self.workloads.lock().await;
        PolicyReport {
            root_namespace: set.root_namespace().to_owned(),
            policies: set.policies().cloned().collect(),
            workloads: workloads
                .iter()
                .map(|(key, running)| (key.to_string(), self.effective_policy(&running.spec)))
                .collect(),
        }
    }

    /// Writes the current modes of every workload into the kernel map. Established
    /// connections are untouched: the kernel only judges new SYNs.
    async fn sync_kernel(&self) {
        let workloads = self.workloads.lock().await;
        let Ok(mut kernel) = self.kernel.lock() else {
            return;
        };
        for running in workloads.values() {
            if let Err(e) =
                kernel.replace_inbound_modes(running.ip, &self.kernel_modes(&running.spec))
            {
                warn!(workload = %running.spec.key(), "updating kernel modes: {e}");
            }
        }
    }
}

fn save_applied(path: &std::path::Path, applied: &[PeerAuthentication]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    serde_json::to_vec_pretty(applied)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("saving applied policies to {}: {e}", path.display()))
}

/// Reloads `--policy-dir` when a file in it changes; a broken change is refused whole and the
/// previous policy stays.
pub(super) async fn watch_policy_dir(agent: Arc<Agent>) {
    let Some(dir) = agent.config.policy_dir.clone() else {
        return;
    };
    let mut seen = fingerprint(&dir);
    loop {
        tokio::time::sleep(POLL_INTERVAL).await;
        let now = fingerprint(&dir);
        if now == seen {
            continue;
        }
        seen = now;
        let loaded = policy::load_paths(std::slice::from_ref(&dir));
        let changed = loaded.map_err(|e| e.to_string()).and_then(|from_dir| {
            let mut state = agent
                .policy
                .lock()
                .map_err(|_| "policy lock poisoned".to_owned())?;
            let active = combine(state.active.root_namespace(), &from_dir, &state.applied)
                .map_err(|e| e.to_string())?;
            state.from_dir = from_dir;
            state.active = active;
            Ok(())
        });
        match changed {
            Ok(()) => {
                info!(dir = %dir.display(), "policy directory reloaded");
                agent.sync_kernel().await;
            }
            Err(e) => {
                warn!(dir = %dir.display(), "policy directory change refused, previous policy kept: {e}")
            }
        }
    }
}

/// Names, sizes and modification times of the directory's files.
fn fingerprint(dir: &std::path::Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let meta = entry.metadata().ok()?;
            Some((entry.path(), meta.len(), meta.modified().ok()))
        })
        .collect();
    files.sort();
    files
}
