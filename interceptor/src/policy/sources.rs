//! Where policies come from, and how the sources merge into the active [`PolicySet`].
//!
//! Two sources today: the files of `--policy-dir` and batches applied through the CLI
//! (later the Kubernetes API). A policy is identified by namespace/name; when both sources
//! hold one, the applied object wins (an operator's `policy apply` overrides a file).
//!
//! Istio breaks ties between policies of one scope by age: the oldest wins, by
//! `creationTimestamp`. Here every policy gets an age the first time any source holds it
//! and keeps it for as long as some source does: re-applying it, editing its file, or a
//! reload that also brings in other files never makes it younger, just as updating a
//! Kubernetes object keeps its `creationTimestamp`. Ages are saved with the applied
//! objects ([`SavedSources`]), so they also survive an agent restart.

use std::collections::BTreeMap;
use std::sync::Arc;

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
    /// Age of every policy some source holds: smaller is older.
    ages: BTreeMap<PolicyRef, u64>,
    active: Arc<PolicySet>,
}

/// What is saved across agent restarts: the CLI-applied objects and every policy's age
/// (files are read again from the directory).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SavedSources {
    /// Objects applied through the CLI, in the order they were first applied.
    pub applied: Vec<PeerAuthentication>,
    /// The age of each policy present when saved.
    pub ages: Vec<SavedAge>,
}

/// One policy's age.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedAge {
    /// The policy.
    #[serde(flatten)]
    pub policy: PolicyRef,
    /// Its rank: smaller is older.
    pub age: u64,
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
            ages: BTreeMap::new(),
        }
    }

    /// Sources as saved by an earlier run, with the files read now. Policies that were
    /// present then keep their age; new ones are younger, in file order.
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
            next.applied = saved.applied;
            next.files = files;
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

    /// Deletes `namespace/name` from every source that holds it. A policy from a file
    /// comes back when the directory changes next.
    pub fn delete(&mut self, namespace: &str, name: &str) -> Result<(), PolicyError> {
        let reference = PolicyRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        if !self.ages.contains_key(&reference) {
            return Err(PolicyError::NotFound(reference));
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

    /// Rebuilds the active set: one object per namespace/name (applied over files), ages
    /// kept for policies still present, given to new ones in source order, forgotten for
    /// policies gone from every source.
    fn merge(&mut self) -> Result<(), PolicyError> {
        let mut merged: BTreeMap<PolicyRef, &PeerAuthentication> = BTreeMap::new();
        let mut next_age = self.ages.values().max().map_or(0, |age| age + 1);
        for policy in self.files.iter().chain(&self.applied) {
            let reference = policy.reference();
            self.ages.entry(reference.clone()).or_insert_with(|| {
                next_age += 1;
                next_age - 1
            });
            merged.insert(reference, policy);
        }
        self.ages
            .retain(|reference, _| merged.contains_key(reference));
        let mut by_age: Vec<(u64, PeerAuthentication)> = merged
            .into_iter()
            .map(|(reference, policy)| (self.ages[&reference], policy.clone()))
            .collect();
        by_age.sort_by_key(|(age, _)| *age);
        let policies = by_age.into_iter().map(|(_, policy)| policy).collect();
        self.active = Arc::new(PolicySet::from_oldest_first(
            self.root_namespace.clone(),
            policies,
        )?);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
