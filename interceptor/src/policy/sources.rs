//! Where policies come from, and how the sources merge into the active [`PolicySet`].
//!
//! Three sources: the files of `--policy-dir`, batches applied through the CLI, and (in
//! Kubernetes mode) the PeerAuthentication objects of the API server. A policy is identified
//! by namespace/name; when several sources hold one, the applied object wins over the API's,
//! and the API's over a file's: the more deliberate and the more local, the stronger (an
//! operator's `policy apply` on this node overrides the cluster's object, which overrides a
//! file shipped with the agent).
//!
//! Istio breaks ties between policies of one scope by age: the oldest wins, by
//! `creationTimestamp` (then by name, then by namespace). Every age here is a time, in
//! microseconds since the Unix epoch, so that the sources compare:
//! - an object from the API is as old as its `metadata.creationTimestamp` (one without is
//!   the youngest of all);
//! - a file's or an applied policy gets the time at which some local source first held it,
//!   and keeps it for as long as one does: re-applying it, editing its file, or a reload that
//!   also brings in other files never makes it younger, just as updating a Kubernetes object
//!   keeps its `creationTimestamp`. Local ages are unique and increase in source order even
//!   if the clock steps back;
//! - a policy held by the API and a local source takes the older of the two ages.
//!
//! Ages are saved with the applied objects and the API's objects ([`SavedSources`]), so they
//! survive an agent restart. Ages saved by agents from before the API source were ranks
//! (0, 1, 2, …): read as times they keep their order and are older than any object created
//! since.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{PeerAuthentication, PolicyError, PolicyRef, PolicySet, resolve::validate};

/// The policy sources, their merge, and the active set built from them.
///
/// Every change is all-or-nothing: on error nothing changes.
#[derive(Clone, Debug)]
pub struct PolicySources {
    root_namespace: String,
    files: Vec<PeerAuthentication>,
    applied: Vec<PeerAuthentication>,
    api: Vec<ApiPolicy>,
    /// Age of every policy a local source (files, applied) holds, in microseconds since the
    /// Unix epoch: smaller is older.
    ages: BTreeMap<PolicyRef, u64>,
    active: Arc<PolicySet>,
}

/// What is saved across agent restarts: the CLI-applied objects, the API's objects as last
/// seen, and the age of every policy a local source holds (files are read again from the
/// directory).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SavedSources {
    /// Objects applied through the CLI, in the order they were first applied.
    pub applied: Vec<PeerAuthentication>,
    /// The age of each policy present when saved.
    pub ages: Vec<SavedAge>,
    /// The objects the Kubernetes API last listed: in force after a restart until the API
    /// answers again, so a restarted agent does not open a STRICT pod meanwhile.
    #[serde(default)]
    pub api: Vec<ApiPolicy>,
}

/// One policy's age.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedAge {
    /// The policy.
    #[serde(flatten)]
    pub policy: PolicyRef,
    /// When a local source first held it, in microseconds since the Unix epoch: smaller is
    /// older.
    pub age: u64,
}

/// A PeerAuthentication object of the Kubernetes API, checked and ready to merge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiPolicy {
    /// The object; its origin is the object's API path.
    pub policy: PeerAuthentication,
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.creationTimestamp` as the API wrote it (empty if absent).
    pub created: String,
    /// The same in milliseconds since the Unix epoch; `None` if absent.
    pub created_unix_ms: Option<i64>,
}

impl ApiPolicy {
    /// Its age in microseconds since the Unix epoch; without a creation time, the youngest.
    fn age(&self) -> u64 {
        self.created_unix_ms.map_or(u64::MAX, |ms| {
            u64::try_from(ms).unwrap_or(0).saturating_mul(1000)
        })
    }
}

/// Where a policy in force comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PolicySource {
    /// A file of `--policy-dir`.
    File {
        /// The file, as the agent read it.
        path: String,
        /// The object's first line in it.
        line: usize,
    },
    /// `interceptor policy apply`.
    Cli {
        /// The file the CLI read it from, as named on its command line.
        file: String,
        /// The object's first line in it.
        line: usize,
    },
    /// The Kubernetes API.
    Api {
        /// The object's API path (`/apis/security.istio.io/v1/namespaces/…/peerauthentications/…`).
        path: String,
        /// Its `metadata.creationTimestamp`.
        created: String,
    },
}

impl fmt::Display for PolicySource {
    /// `file <path>:<line>`, `cli <file>:<line>`, or `api <path> (created <time>)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicySource::File { path, line } => write!(f, "file {path}:{line}"),
            PolicySource::Cli { file, line } => write!(f, "cli {file}:{line}"),
            PolicySource::Api { path, created } => write!(f, "api {path} (created {created})"),
        }
    }
}

impl PolicySource {
    /// The source of an object from the API.
    pub fn api(policy: &ApiPolicy) -> Self {
        PolicySource::Api {
            path: policy.policy.origin.file.clone(),
            created: policy.created.clone(),
        }
    }
}

/// Now, in microseconds since the Unix epoch.
fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
        })
}

impl PolicySources {
    /// No policies; `root_namespace` is Istio's root namespace.
    pub fn new(root_namespace: impl Into<String>) -> Self {
        let root_namespace = root_namespace.into();
        PolicySources {
            active: Arc::new(PolicySet::new(root_namespace.clone())),
            root_namespace,
            files: Vec::new(),
            applied: Vec::new(),
            api: Vec::new(),
            ages: BTreeMap::new(),
        }
    }

    /// Sources as saved by an earlier run, with the files read now. Policies that were
    /// present then keep their age; new ones get the present time, in file order.
    pub fn restore(
        root_namespace: impl Into<String>,
        saved: SavedSources,
        files: Vec<PeerAuthentication>,
    ) -> Result<Self, PolicyError> {
        let mut sources = PolicySources::new(root_namespace);
        sources.ages = saved
            .ages
            .into_iter()
            .map(|saved| (saved.policy, saved.age))
            .collect();
        sources.change(|next| {
            validate(&saved.applied)?;
            validate(&files)?;
            validate_api(&saved.api)?;
            next.applied = saved.applied;
            next.files = files;
            next.api = saved.api;
            Ok(())
        })?;
        Ok(sources)
    }

    /// The active set: shared, never changed in place.
    pub fn active(&self) -> Arc<PolicySet> {
        self.active.clone()
    }

    /// Replaces the file source with exactly `files` (a reload of the policy directory).
    pub fn set_files(&mut self, files: Vec<PeerAuthentication>) -> Result<(), PolicyError> {
        self.change(|next| {
            validate(&files)?;
            next.files = files;
            Ok(())
        })
    }

    /// Replaces the API source with exactly `objects` (the API server's current list).
    pub fn set_api(&mut self, objects: Vec<ApiPolicy>) -> Result<(), PolicyError> {
        self.change(|next| {
            validate_api(&objects)?;
            next.api = objects;
            Ok(())
        })
    }

    /// The API source: the objects as last set.
    pub fn api(&self) -> &[ApiPolicy] {
        &self.api
    }

    /// Where each policy in force comes from: the source whose object is in force.
    pub fn sources(&self) -> BTreeMap<PolicyRef, PolicySource> {
        let mut sources = BTreeMap::new();
        for policy in &self.files {
            sources.insert(
                policy.reference(),
                PolicySource::File {
                    path: policy.origin.file.clone(),
                    line: policy.origin.line,
                },
            );
        }
        for object in &self.api {
            sources.insert(object.policy.reference(), PolicySource::api(object));
        }
        for policy in &self.applied {
            sources.insert(
                policy.reference(),
                PolicySource::Cli {
                    file: policy.origin.file.clone(),
                    line: policy.origin.line,
                },
            );
        }
        sources
    }

    /// Applies a batch, checked as a whole: an object with the namespace/name of an
    /// applied one replaces it in place; others are added after.
    pub fn apply(&mut self, batch: Vec<PeerAuthentication>) -> Result<(), PolicyError> {
        self.change(|next| {
            validate(&batch)?;
            for incoming in batch {
                let reference = incoming.reference();
                match next
                    .applied
                    .iter_mut()
                    .find(|old| old.reference() == reference)
                {
                    Some(slot) => *slot = incoming,
                    None => next.applied.push(incoming),
                }
            }
            Ok(())
        })
    }

    /// Deletes `namespace/name` from every local source that holds it. A policy from a
    /// file comes back when the directory changes next. An object of the API is not the
    /// agent's to delete: if only the API holds it, that is an error naming what to do; if
    /// a local source holds it too, the API's object is in force afterwards.
    pub fn delete(&mut self, namespace: &str, name: &str) -> Result<(), PolicyError> {
        let reference = PolicyRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        if !self.ages.contains_key(&reference) {
            let in_api = self
                .api
                .iter()
                .any(|object| object.policy.reference() == reference);
            return Err(if in_api {
                PolicyError::FromApi(reference)
            } else {
                PolicyError::NotFound(reference)
            });
        }
        self.change(|next| {
            next.files.retain(|policy| policy.reference() != reference);
            next.applied
                .retain(|policy| policy.reference() != reference);
            Ok(())
        })
    }

    /// What to save so that a restarted agent comes back to the same policy.
    pub fn saved(&self) -> SavedSources {
        SavedSources {
            applied: self.applied.clone(),
            api: self.api.clone(),
            ages: self
                .ages
                .iter()
                .map(|(policy, age)| SavedAge {
                    policy: policy.clone(),
                    age: *age,
                })
                .collect(),
        }
    }

    /// Runs `edit` on a copy, merges, and keeps the result only if all of it worked.
    fn change(
        &mut self,
        edit: impl FnOnce(&mut PolicySources) -> Result<(), PolicyError>,
    ) -> Result<(), PolicyError> {
        let mut next = self.clone();
        edit(&mut next)?;
        next.merge()?;
        *self = next;
        Ok(())
    }

    /// Rebuilds the active set: one object per namespace/name (applied over the API's over
    /// files); local ages kept for policies a local source still holds, given to new ones
    /// in source order, forgotten for policies gone from the local sources; ordered by
    /// age, then name, then namespace, as Istio orders by `creationTimestamp`.
    fn merge(&mut self) -> Result<(), PolicyError> {
        let mut next_age = self
            .ages
            .values()
            .max()
            .map_or(0, |age| age.saturating_add(1))
            .max(now_micros());
        for policy in self.files.iter().chain(&self.applied) {
            self.ages.entry(policy.reference()).or_insert_with(|| {
                next_age = next_age.saturating_add(1);
                next_age - 1
            });
        }
        let mut merged: BTreeMap<PolicyRef, &PeerAuthentication> = BTreeMap::new();
        let mut ages: BTreeMap<PolicyRef, u64> = BTreeMap::new();
        for policy in &self.files {
            merged.insert(policy.reference(), policy);
        }
        for object in &self.api {
            let reference = object.policy.reference();
            ages.insert(reference.clone(), object.age());
            merged.insert(reference, &object.policy);
        }
        for policy in &self.applied {
            merged.insert(policy.reference(), policy);
        }
        let local: BTreeSet<PolicyRef> = self
            .files
            .iter()
            .chain(&self.applied)
            .map(PeerAuthentication::reference)
            .collect();
        self.ages.retain(|reference, _| local.contains(reference));
        for (reference, age) in &self.ages {
            let entry = ages.entry(reference.clone()).or_insert(*age);
            *entry = (*entry).min(*age);
        }
        let mut by_age: Vec<(u64, PeerAuthentication)> = merged
            .into_iter()
            .map(|(reference, policy)| (ages[&reference], policy.clone()))
            .collect();
        by_age.sort_by(|(a, first), (b, second)| {
            (a, &first.name, &first.namespace).cmp(&(b, &second.name, &second.namespace))
        });
        let policies = by_age.into_iter().map(|(_, policy)| policy).collect();
        self.active = Arc::new(PolicySet::from_oldest_first(
            self.root_namespace.clone(),
            policies,
        )?);
        Ok(())
    }
}

/// Checks the API's objects as a batch.
fn validate_api(objects: &[ApiPolicy]) -> Result<(), PolicyError> {
    let policies: Vec<PeerAuthentication> =
        objects.iter().map(|object| object.policy.clone()).collect();
    validate(&policies)
}

#[cfg(test)]
mod tests;
