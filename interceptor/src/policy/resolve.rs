//! The active policy set and the effective mode of a workload.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::parse::{duplicate_errors, object_problems};
use super::{DEFAULT_ROOT_NAMESPACE, Mode, PeerAuthentication, PolicyError, PolicyRef, Scope};

/// The validated, active set of policies, oldest first.
///
/// Age stands in for Kubernetes' `creationTimestamp`, which Istio uses to break ties
/// ("the oldest one wins"). [`super::PolicySources`] keeps the ages and builds the set;
/// the set itself is immutable and shared (`Arc`) by everyone who reads the policy.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicySet {
    root_namespace: String,
    policies: Vec<PeerAuthentication>,
}

impl Default for PolicySet {
    /// An empty set with Istio's default root namespace, `istio-system`.
    fn default() -> Self {
        PolicySet::new(DEFAULT_ROOT_NAMESPACE)
    }
}

/// The workload whose inbound mode is asked for.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadRef<'a> {
    /// The pod's namespace.
    pub namespace: &'a str,
    /// The pod's labels.
    pub labels: &'a BTreeMap<String, String>,
}

/// What decides one port or the workload default.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Decision {
    /// The resolved mode; never [`Mode::Unset`].
    pub mode: Mode,
    /// The policy that supplied `mode`; `None` for the built-in default PERMISSIVE.
    pub policy: Option<PolicyRef>,
}

impl fmt::Display for Decision {
    /// "STRICT by istio-system/default", or the built-in default when no policy decided.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.policy {
            Some(policy) => write!(f, "{} by {policy}", self.mode),
            None => write!(f, "{} (mesh default, no policy)", self.mode),
        }
    }
}

impl Decision {
    /// Istio's behaviour when no policy sets a mode: PERMISSIVE.
    pub fn builtin_default() -> Self {
        Decision {
            mode: Mode::Permissive,
            policy: None,
        }
    }
}

/// The inbound mTLS mode of one workload: a default and per-port exceptions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EffectivePolicy {
    /// For every port without an entry in `ports`.
    pub default: Decision,
    /// Ports listed in the deciding workload policy's `portLevelMtls`.
    pub ports: BTreeMap<u16, Decision>,
}

impl EffectivePolicy {
    /// The decision for a workload (container) port.
    pub fn for_port(&self, port: u16) -> &Decision {
        self.ports.get(&port).unwrap_or(&self.default)
    }
}

impl PolicySet {
    /// An empty set. Selector-less policies in `root_namespace` are mesh-wide
    /// (Istio's `meshConfig.rootNamespace`, `istio-system` by default).
    pub fn new(root_namespace: impl Into<String>) -> Self {
        PolicySet {
            root_namespace: root_namespace.into(),
            policies: Vec::new(),
        }
    }

    /// The namespace whose selector-less policies are mesh-wide.
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// All policies, oldest first.
    pub fn policies(&self) -> impl Iterator<Item = &PeerAuthentication> {
        self.policies.iter()
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether there are no policies.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policy `namespace/name`, if present.
    pub fn get(&self, namespace: &str, name: &str) -> Option<&PeerAuthentication> {
        self.policies
            .iter()
            .find(|policy| policy.namespace == namespace && policy.name == name)
    }

    /// A set of `policies`, given oldest first, after checking each and refusing
    /// namespace/name twice (see [`validate`]).
    pub fn from_oldest_first(
        root_namespace: impl Into<String>,
        policies: Vec<PeerAuthentication>,
    ) -> Result<PolicySet, PolicyError> {
        validate(&policies)?;
        Ok(PolicySet {
            root_namespace: root_namespace.into(),
            policies,
        })
    }

    /// Effective inbound mode for a workload, as Istio's sidecar implementation
    /// (`ComposePeerAuthentication`) computes it:
    ///
    /// 1. Candidates, at most one per scope (see [`Scope`]):
    ///    - mesh: a policy without selector in the root namespace;
    ///    - namespace: a policy without selector in the workload's namespace (none when
    ///      that is the root namespace: its selector-less policy is the mesh policy);
    ///    - workload: a policy with a selector in the workload's namespace whose
    ///      `matchLabels` are all among the workload's labels.
    ///
    ///    Policies with a selector in the root namespace apply to nothing ("ignored
    ///    when deployed in the root namespace", per Istio's reference).
    /// 2. Several candidates for one scope: Istio keeps the oldest (several mesh- or
    ///    namespace-wide policies: "Istio ignores the newer policies"; several matching
    ///    workload policies: "picks the oldest one"). Here the oldest is the first in
    ///    application order (see [`PolicySet`]).
    /// 3. Precedence workload > namespace > mesh: the narrowest candidate whose mode is
    ///    not UNSET decides the default; UNSET inherits from the next wider scope; with
    ///    nothing set the mode is PERMISSIVE ([`Decision::builtin_default`]).
    /// 4. Only the workload candidate's `portLevelMtls` counts: a port entry overrides
    ///    the default for that port, and a port entry with UNSET inherits the default
    ///    (which may itself come from the namespace or mesh policy).
    ///
    /// [`Decision::policy`] names the policy whose mode was taken, e.g. the namespace
    /// policy when the workload policy says UNSET.
    pub fn effective(&self, workload: &WorkloadRef<'_>) -> EffectivePolicy {
        let mesh = self.oldest(|policy| self.scope(policy) == Scope::Mesh);
        let namespace = self.oldest(|policy| {
            self.scope(policy) == Scope::Namespace && policy.namespace == workload.namespace
        });
        let selected = self.oldest(|policy| {
            self.scope(policy) == Scope::Workload
                && policy.namespace == workload.namespace
                && selects(policy, workload.labels)
        });
        let default = [mesh, namespace, selected]
            .into_iter()
            .flatten()
            .fold(Decision::builtin_default(), |inherited, policy| {
                decide(policy, policy.mode, inherited)
            });
        let ports = selected
            .map(|policy| {
                policy
                    .port_level
                    .iter()
                    .map(|(port, mode)| (*port, decide(policy, *mode, default.clone())))
                    .collect()
            })
            .unwrap_or_default();
        EffectivePolicy { default, ports }
    }

    fn scope(&self, policy: &PeerAuthentication) -> Scope {
        policy.scope(&self.root_namespace)
    }

    fn oldest(
        &self,
        mut applies: impl FnMut(&PeerAuthentication) -> bool,
    ) -> Option<&PeerAuthentication> {
        self.policies.iter().find(|policy| applies(policy))
    }
}

/// `policy` decides with `mode` unless that is UNSET, which keeps the inherited decision.
fn decide(policy: &PeerAuthentication, mode: Mode, inherited: Decision) -> Decision {
    if mode == Mode::Unset {
        inherited
    } else {
        Decision {
            mode,
            policy: Some(policy.reference()),
        }
    }
}

/// All of the selector's labels are on the workload, with the same values.
fn selects(policy: &PeerAuthentication, labels: &BTreeMap<String, String>) -> bool {
    policy.match_labels().is_some_and(|wanted| {
        wanted
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    })
}

/// Checks objects built by any caller (the parser already did, with precise lines), such
/// as a batch received over the admin socket: value problems are reported at the object's
/// origin, then namespace/name given twice.
pub fn validate(batch: &[PeerAuthentication]) -> Result<(), PolicyError> {
    let mut errors: Vec<PolicyError> = batch
        .iter()
        .flat_map(|policy| {
            object_problems(policy)
                .into_iter()
                .map(|problem| PolicyError::Invalid {
                    origin: policy.origin.clone(),
                    field: problem.field(),
                    message: problem.message,
                })
        })
        .collect();
    errors.extend(duplicate_errors(batch));
    PolicyError::check(errors)
}

#[cfg(test)]
mod tests;
