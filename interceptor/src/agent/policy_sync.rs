//! The agent's side of policy: saving the sources across restarts, watching `--policy-dir`,
//! and writing effective modes into the kernel, each with the number of the decision behind
//! it (see [`DecisionBook`]). The sources and their merge are [`PolicySources`]'s.
//!
//! Parsing and saving never run on the async runtime's worker threads: the directory is read
//! and parsed on the blocking pool, and changes are merged and saved there too, so a huge or
//! hostile policy file cannot stall the data path or the admin socket.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::{Serialize, de::DeserializeOwned};
use tracing::{info, warn};

use super::{Agent, AgentError};
use crate::config::AgentConfig;
use crate::{
    ebpf::{DoorMode, DoorRule},
    policy::{
        self, Decision, DecisionBook, EffectivePolicy, PeerAuthentication, PolicyChange,
        PolicyError, PolicyReport, PolicySet, PolicySources, SavedSources, WorkloadRef,
    },
    sync::lock,
    workloads::WorkloadSpec,
};

/// How often the policy directory is checked for changes.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Applied policies and the age of every policy, in `--state-dir`.
const SOURCES_FILE: &str = "policies.json";
/// What earlier versions saved instead: the applied policies only.
const OLD_APPLIED_FILE: &str = "applied-policies.json";
/// The decision numbers written into the kernel, in `--state-dir`.
const DECISIONS_FILE: &str = "decisions.json";

/// The policy sources and the decision numbers, shared by the agent's tasks.
pub(super) type SharedPolicy = Arc<Mutex<PolicyState>>;

/// Where the active policy came from, and the numbers of the decisions in the kernel.
pub(super) struct PolicyState {
    sources: PolicySources,
    book: DecisionBook,
    /// How many of the book's numbers are saved: only those may reach the kernel.
    book_saved: usize,
    state_dir: PathBuf,
    /// The policy directory as last read, to notice changes.
    dir_fingerprint: Fingerprint,
}

/// Names, sizes and modification times of a directory's entries.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

impl PolicyState {
    /// Loads what an earlier run saved and the policy directory. A broken policy directory
    /// stops the agent at start, so it never runs with a policy nobody wrote. Runs before the
    /// agent serves anything.
    pub(super) fn load(config: &AgentConfig) -> anyhow::Result<SharedPolicy> {
        let state_dir = config.state_dir.clone();
        let saved: SavedSources = match read_json(&state_dir.join(SOURCES_FILE))? {
            Some(saved) => saved,
            None => SavedSources {
                applied: read_json(&state_dir.join(OLD_APPLIED_FILE))?.unwrap_or_default(),
                ages: Vec::new(),
            },
        };
        let book: DecisionBook = read_json(&state_dir.join(DECISIONS_FILE))?.unwrap_or_default();
        let (files, dir_fingerprint) = match &config.policy_dir {
            Some(dir) => {
                let seen = fingerprint(dir);
                (policy::load_paths(std::slice::from_ref(dir))?, seen)
            }
            None => (Vec::new(), Fingerprint::new()),
        };
        let sources = PolicySources::restore(&config.root_namespace, saved, files)?;
        let state = PolicyState {
            sources,
            book_saved: book.len(),
            book,
            state_dir,
            dir_fingerprint,
        };
        // The ages given to the directory's policies just now must outlive this run.
        state.save_sources(&state.sources)?;
        Ok(Arc::new(Mutex::new(state)))
    }

    /// Makes a change to the sources and saves it; on any error nothing changes.
    fn change(
        &mut self,
        edit: impl FnOnce(&mut PolicySources) -> Result<(), PolicyError>,
    ) -> Result<(), AgentError> {
        let mut next = self.sources.clone();
        edit(&mut next)?;
        self.save_sources(&next)?;
        self.sources = next;
        Ok(())
    }

    fn save_sources(&self, sources: &PolicySources) -> Result<(), AgentError> {
        save_json(&self.state_dir.join(SOURCES_FILE), &sources.saved())
    }

    /// The door rule for `port` under a decision: its mode and its number. The book is saved
    /// before a new number is handed out for the kernel, so every number the kernel holds can
    /// be read back, also by a restarted agent.
    fn door_rule(&mut self, port: u16, decision: &Decision) -> DoorRule {
        let mut number = self.book.number(decision);
        if number as usize > self.book_saved {
            match save_json(&self.state_dir.join(DECISIONS_FILE), &self.book) {
                Ok(()) => self.book_saved = self.book.len(),
                Err(e) => {
                    warn!("{e}; kernel events of this decision will not name its policy");
                    number = 0;
                }
            }
        }
        DoorRule {
            port,
            mode: DoorMode::for_mode(decision.mode),
            decision: number,
        }
    }
}

impl Agent {
    /// The active policy set (shared, not copied).
    pub(super) fn policy_set(&self) -> Arc<PolicySet> {
        lock(&self.policy).sources.active()
    }

    /// Effective policy of a workload under the active policy.
    pub fn effective_policy(&self, spec: &WorkloadSpec) -> EffectivePolicy {
        self.policy_set().effective(&WorkloadRef {
            namespace: &spec.namespace,
            labels: &spec.labels,
        })
    }

    /// The door rules of a workload; port 0 is its default.
    pub(super) fn kernel_modes(&self, spec: &WorkloadSpec) -> Vec<DoorRule> {
        let effective = self.effective_policy(spec);
        let mut state = lock(&self.policy);
        std::iter::once((0, &effective.default))
            .chain(effective.ports.iter().map(|(port, d)| (*port, d)))
            .map(|(port, decision)| state.door_rule(port, decision))
            .collect()
    }

    /// The decision the kernel applied, from the number in one of its events.
    pub(super) fn decision(&self, number: u32) -> Option<Decision> {
        lock(&self.policy).book.get(number).cloned()
    }

    /// Applies a batch, all or nothing.
    pub async fn apply_policies(
        &self,
        batch: Vec<PeerAuthentication>,
    ) -> Result<PolicyReport, AgentError> {
        self.change_policy(PolicyChange::Apply { policies: batch })
            .await?;
        Ok(self.policy_report().await)
    }

    /// Deletes a policy by namespace and name.
    pub async fn delete_policy(&self, namespace: &str, name: &str) -> Result<(), AgentError> {
        self.change_policy(PolicyChange::Delete {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
        .await
    }

    /// Runs a change on the blocking pool (checking a batch and saving are not for the
    /// runtime's workers), then writes the new modes into the kernel.
    async fn change_policy(&self, change: PolicyChange) -> Result<(), AgentError> {
        let state = self.policy.clone();
        tokio::task::spawn_blocking(move || lock(&state).change(|sources| change.make(sources)))
            .await
            .map_err(|source| AgentError::Task {
                what: "the policy change",
                source,
            })??;
        self.sync_kernel().await;
        Ok(())
    }

    /// The active set and the one `change` would make, changing and saving nothing: the
    /// same [`PolicyChange::make`] as [`Agent::change_policy`], on a copy of the sources.
    /// Runs on the blocking pool, like the real change.
    pub(super) async fn preview_policy(
        &self,
        change: PolicyChange,
    ) -> Result<(Arc<PolicySet>, Arc<PolicySet>), AgentError> {
        let state = self.policy.clone();
        let preview = tokio::task::spawn_blocking(move || {
            let mut next = lock(&state).sources.clone();
            let before = next.active();
            change.make(&mut next).map(|()| (before, next.active()))
        });
        Ok(preview.await.map_err(|source| AgentError::Task {
            what: "the policy dry run",
            source,
        })??)
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
        let modes: Vec<_> = workloads
            .values()
            .map(|running| (running, self.kernel_modes(&running.spec)))
            .collect();
        let mut kernel = lock(&self.kernel);
        for (running, modes) in modes {
            if let Err(e) = kernel.replace_inbound_modes(running.ip, &modes) {
                warn!(workload = %running.spec.key(), "updating kernel modes: {e}");
            }
        }
    }
}

/// Reloads `--policy-dir` when a file in it changes; a broken change is refused whole and the
/// previous policy stays. Reading and parsing run on the blocking pool.
pub(super) async fn watch_policy_dir(agent: Arc<Agent>) {
    let Some(dir) = agent.config.policy_dir.clone() else {
        return;
    };
    loop {
        tokio::time::sleep(POLL_INTERVAL).await;
        let (state, dir) = (agent.policy.clone(), dir.clone());
        match tokio::task::spawn_blocking(move || reload(&state, &dir)).await {
            Ok(Reload::Unchanged) => {}
            Ok(Reload::Done) => {
                info!(dir = %agent_dir(&agent), "policy directory reloaded");
                agent.sync_kernel().await;
            }
            Ok(Reload::Refused(e)) => warn!(
                dir = %agent_dir(&agent),
                "policy directory change refused, previous policy kept: {e}"
            ),
            Err(e) => warn!("policy directory reload failed: {e}"),
        }
    }
}

fn agent_dir(agent: &Agent) -> String {
    agent
        .config
        .policy_dir
        .as_deref()
        .map(|dir| dir.display().to_string())
        .unwrap_or_default()
}

/// What one look at the policy directory did.
enum Reload {
    Unchanged,
    Done,
    Refused(AgentError),
}

/// Reads and applies the directory if it changed. Parsing happens without the policy lock.
fn reload(state: &SharedPolicy, dir: &Path) -> Reload {
    let now = fingerprint(dir);
    if lock(state).dir_fingerprint == now {
        return Reload::Unchanged;
    }
    let loaded = policy::load_paths(&[dir.to_path_buf()]);
    let mut state = lock(state);
    state.dir_fingerprint = now;
    let changed = loaded
        .map_err(AgentError::from)
        .and_then(|files| state.change(|sources| sources.set_files(files)));
    match changed {
        Ok(()) => Reload::Done,
        Err(e) => Reload::Refused(e),
    }
}

/// Names, sizes and modification times of the directory's entries.
fn fingerprint(dir: &Path) -> Fingerprint {
    let mut files: Fingerprint = std::fs::read_dir(dir)
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

/// A JSON file of `--state-dir`; `None` if there is none yet.
fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
            anyhow::anyhow!("{}: {e}; fix or remove the file", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

/// Writes a file of `--state-dir` whole or not at all (temporary file, then rename).
fn save_json(path: &Path, value: &impl Serialize) -> Result<(), AgentError> {
    serde_json::to_vec_pretty(value)
        .map_err(std::io::Error::other)
        .and_then(|bytes| crate::fsutil::write_atomically(path, &bytes))
        .map_err(|source| AgentError::Save {
            path: path.to_owned(),
            source,
        })
}
