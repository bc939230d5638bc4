//! The agent's side of policy: saving the sources across restarts, watching `--policy-dir`,
//! following the Kubernetes API's PeerAuthentications, and writing effective modes into the
//! kernel, each with the number of the decision behind it (see [`DecisionBook`]). The
//! sources and their merge are [`PolicySources`]'s.
//!
//! Parsing and saving never run on the async runtime's worker threads: the directory is read
//! and parsed on the blocking pool, and changes are merged and saved there too, so a huge or
//! hostile policy file cannot stall the data path or the admin socket.

use std::{
    collections::BTreeMap,
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
    kube::{RawPeerAuthentication, View, Watch},
    policy::{
        self, ApiSourceStatus, Decision, DecisionBook, EffectivePolicy, PeerAuthentication,
        PolicyChange, PolicyError, PolicyReport, PolicySet, PolicySources, RejectedPolicy,
        SavedSources, WorkloadRef,
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
    /// The Kubernetes API as a source; `None` when standalone.
    api_status: Option<ApiSourceStatus>,
    /// The API's objects that are invalid, as of the last list.
    rejected: Vec<RejectedPolicy>,
}

/// Names, sizes and modification times of a directory's entries.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

impl PolicyState {
    /// Loads what an earlier run saved and the policy directory. A broken policy directory
    /// stops the agent at start, so it never runs with a policy nobody wrote. Runs before the
    /// agent serves anything.
    pub(super) fn load(config: &AgentConfig) -> anyhow::Result<SharedPolicy> {
        let state_dir = config.state_dir.clone();
        let mut saved: SavedSources = match read_json(&state_dir.join(SOURCES_FILE))? {
            Some(saved) => saved,
            None => SavedSources {
                applied: read_json(&state_dir.join(OLD_APPLIED_FILE))?.unwrap_or_default(),
                ..SavedSources::default()
            },
        };
        // The API's objects of an earlier run in Kubernetes mode mean nothing standalone.
        if config.kubernetes.is_none() {
            saved.api.clear();
        }
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
            api_status: config.kubernetes.is_some().then(ApiSourceStatus::default),
            rejected: Vec::new(),
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

    /// Policies, where each comes from, and effective modes of every enrolled workload.
    pub async fn policy_report(&self) -> PolicyReport {
        let (set, sources, rejected, api) = {
            let state = lock(&self.policy);
            (
                state.sources.active(),
                state.sources.sources(),
                state.rejected.clone(),
                state.api_status.clone(),
            )
        };
        let workloads = self.workloads.lock().await;
        PolicyReport {
            root_namespace: set.root_namespace().to_owned(),
            policies: set.policies().cloned().collect(),
            workloads: workloads
                .iter()
                .map(|(key, running)| (key.to_string(), self.effective_policy(&running.spec)))
                .collect(),
            sources: sources
                .into_iter()
                .map(|(reference, source)| (reference.to_string(), source))
                .collect(),
            rejected,
            api,
        }
    }

    /// Follows the API server's PeerAuthentications (Kubernetes mode): every complete list
    /// the watch publishes replaces the API source, and the kernel gets the new modes at
    /// once. Until the first list, the objects saved by the previous run stay in force; a
    /// missing CRD is an empty list. Each object is read alone, on the blocking pool: an
    /// invalid one is refused, logged and shown by `policy list`, and the others apply. If
    /// an earlier version of the same object (same UID) was valid, that version stays in
    /// force until the object is fixed or deleted, so a typo never opens a STRICT pod.
    pub async fn follow_api_policies(self: Arc<Self>, watch: Watch<RawPeerAuthentication>) {
        let mut views = watch.subscribe();
        let mut done: Option<Arc<View<RawPeerAuthentication>>> = None;
        loop {
            let view = views.borrow_and_update().clone();
            lock(&self.policy).api_status = Some(ApiSourceStatus {
                listed: view.status.synced,
                crd_absent: view.status.absent,
                objects: view.objects.len(),
                errors: view.status.errors,
                last_error: view.status.last_error.clone(),
            });
            let fresh = done.as_ref().is_none_or(|done| {
                !(Arc::ptr_eq(&done.objects, &view.objects) || done.objects == view.objects)
            });
            if view.status.synced && fresh {
                done = Some(view.clone());
                let state = self.policy.clone();
                match tokio::task::spawn_blocking(move || follow_api(&state, &view.objects)).await {
                    Ok(true) => self.sync_kernel().await,
                    Ok(false) => {}
                    Err(e) => warn!("reading the API's PeerAuthentications failed: {e}"),
                }
            }
            if views.changed().await.is_err() {
                warn!(
                    "the PeerAuthentication watch stopped; policies from the API stay as they are"
                );
                return;
            }
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

/// Makes `objects` (the API's complete list) the API source; says whether anything changed.
fn follow_api(state: &SharedPolicy, objects: &BTreeMap<String, RawPeerAuthentication>) -> bool {
    let mut valid = Vec::new();
    let mut rejected = Vec::new();
    let mut uids = Vec::new();
    for raw in objects.values() {
        match policy::api::from_api(&raw.object, raw.created_unix_ms) {
            Ok(object) => valid.push(object),
            Err(refusal) => {
                let uid = raw.object["metadata"]["uid"].as_str().unwrap_or_default();
                rejected.push(*refusal);
                uids.push(uid.to_owned());
            }
        }
    }
    let mut state = lock(state);
    for (refusal, uid) in rejected.iter_mut().zip(&uids) {
        let previous = state
            .sources
            .api()
            .iter()
            .find(|old| old.policy.reference() == refusal.policy && &old.uid == uid);
        if let Some(previous) = previous {
            valid.push(previous.clone());
            refusal.previous_in_force = true;
        }
    }
    for refusal in &rejected {
        if !state.rejected.contains(refusal) {
            warn!(
                policy = %refusal.policy,
                "PeerAuthentication from the API refused, the others apply: {}: {}{}",
                refusal.source,
                refusal.reason,
                if refusal.previous_in_force {
                    "; its previous version stays in force"
                } else {
                    ""
                }
            );
        }
    }
    if state.sources.api() == valid.as_slice() && state.rejected == rejected {
        return false;
    }
    let mut next = state.sources.clone();
    // Cannot fail: each object was checked alone, and the API holds one per namespace/name.
    if let Err(e) = next.set_api(valid) {
        warn!("policies from the API refused, previous ones kept: {e}");
        return false;
    }
    if let Err(e) = state.save_sources(&next) {
        warn!("{e}; the API's policies apply, but a restarted agent starts without them");
    }
    info!(
        in_force = next.api().len(),
        refused = rejected.len(),
        "policies from the Kubernetes API updated"
    );
    state.sources = next;
    state.rejected = rejected;
    true
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
