//! PeerAuthentication policies.
//!
//! Istio `PeerAuthentication` objects (`security.istio.io/v1` and `v1beta1`) are read from
//! YAML files exactly as Istio users write them ([`parse_str`], [`load_paths`]), with every
//! input bounded ([`input`], [`parse`] limits), collected into an immutable [`PolicySet`],
//! and resolved into the inbound mTLS mode of a workload and each of its ports
//! ([`PolicySet::effective`]). Objects of the Kubernetes API are read one by one with the
//! same parser ([`api::from_api`]); [`PolicySources`] merges files, CLI-applied batches and
//! the API's objects.
//!
//! Resolution follows Istio's sidecar implementation (`ComposePeerAuthentication`) and the
//! reference at <https://istio.io/latest/docs/reference/config/security/peer_authentication/>;
//! see [`PolicySet::effective`] for the rules.

pub mod api;
mod change;
mod decisions;
pub mod input;
mod locate;
pub mod parse;
mod resolve;
mod sources;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use api::{ApiSourceStatus, RejectedPolicy};
pub use change::PolicyChange;
pub use decisions::DecisionBook;
pub use parse::{load_paths, parse_str};
pub use resolve::{Decision, EffectivePolicy, PolicySet, WorkloadRef, validate};
pub use sources::{ApiPolicy, PolicySource, PolicySources, SavedAge, SavedSources};

/// Istio's default root namespace: selector-less policies there are mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The accepted `apiVersion` values.
pub const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// The accepted `kind`.
pub const KIND: &str = "PeerAuthentication";

/// Where an object came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// File name as given by the caller (or `<inline>`-style labels for text).
    pub file: String,
    /// 1-based line of the object's first content line (usually `apiVersion:`).
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// Mutual TLS mode, spelled exactly as Istio spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mode {
    /// Inherit from the parent scope; PERMISSIVE when there is no parent.
    Unset,
    /// Plain text only: connections are not tunnelled through mTLS.
    Disable,
    /// Both plain text and mTLS are accepted.
    Permissive,
    /// Only mTLS with a client certificate is accepted.
    Strict,
}

impl Mode {
    /// All modes, in Istio's enum order.
    pub const ALL: [Mode; 4] = [Mode::Unset, Mode::Disable, Mode::Permissive, Mode::Strict];

    /// The YAML spelling (`"STRICT"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Unset => "UNSET",
            Mode::Disable => "DISABLE",
            Mode::Permissive => "PERMISSIVE",
            Mode::Strict => "STRICT",
        }
    }

    /// Parses the exact (upper-case) Istio spelling.
    pub fn from_name(name: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|mode| mode.as_str() == name)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies a policy: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub struct PolicyRef {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One validated `PeerAuthentication` object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerAuthentication {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` (required: there is no kubectl context to default it).
    pub namespace: String,
    /// `spec.selector.matchLabels`; `None` when absent or empty (Istio treats an empty
    /// selector like no selector).
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.mtls.mode`; [`Mode::Unset`] when `spec`, `mtls` or `mode` is missing.
    pub mode: Mode,
    /// `spec.portLevelMtls`: workload (container) port → mode. Only with a selector.
    pub port_level: BTreeMap<u16, Mode>,
    /// Where the object was read from.
    pub origin: Origin,
}

/// `interceptor policy list`: the policies in force and what they mean for each workload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyReport {
    /// Istio's root namespace in force.
    pub root_namespace: String,
    /// Active policies, oldest first.
    pub policies: Vec<PeerAuthentication>,
    /// Effective mode per enrolled workload (`namespace/name`) and port.
    pub workloads: BTreeMap<String, EffectivePolicy>,
    /// Where each policy of `policies` comes from, by `namespace/name`.
    #[serde(default)]
    pub sources: BTreeMap<String, PolicySource>,
    /// Objects of the Kubernetes API that are invalid and not in force.
    #[serde(default)]
    pub rejected: Vec<RejectedPolicy>,
    /// The Kubernetes API as a source; `None` when the agent is standalone.
    #[serde(default)]
    pub api: Option<ApiSourceStatus>,
}

/// Which scope a policy applies at, given the root namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Root namespace, no selector: every workload in the mesh.
    Mesh,
    /// Other namespace, no selector: every workload in that namespace.
    Namespace,
    /// Other namespace, with selector: matching workloads of that namespace.
    Workload,
    /// Root namespace with a selector: Istio ignores these ("PeerAuthentication policies
    /// with workload selectors are ignored when deployed in the root namespace").
    Ignored,
}

impl PeerAuthentication {
    /// `namespace/name` of this policy.
    pub fn reference(&self) -> PolicyRef {
        PolicyRef {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// The non-empty `matchLabels`, if any.
    pub fn match_labels(&self) -> Option<&BTreeMap<String, String>> {
        self.selector.as_ref().filter(|labels| !labels.is_empty())
    }

    /// The scope this policy applies at when `root_namespace` is the mesh root.
    pub fn scope(&self, root_namespace: &str) -> Scope {
        match (
            self.namespace == root_namespace,
            self.match_labels().is_some(),
        ) {
            (true, false) => Scope::Mesh,
            (true, true) => Scope::Ignored,
            (false, false) => Scope::Namespace,
            (false, true) => Scope::Workload,
        }
    }
}

/// Errors from reading, validating or editing policies.
///
/// Every variant about file content names the file, the 1-based line and the field.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file or directory could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The path as given.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not well-formed YAML.
    #[error("{file}:{line}:{column}: YAML syntax error: {message}")]
    Syntax {
        /// File name.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message, without its own position.
        message: String,
    },
    /// A field is missing, unknown, or has an invalid value.
    #[error("{origin}: field `{field}`: {message}")]
    Invalid {
        /// File and line of the offending field (or object).
        origin: Origin,
        /// Dotted path of the field, e.g. `spec.mtls.mode`.
        field: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// Two objects of one batch have the same namespace/name.
    #[error(
        "{second}: field `metadata.name`: duplicate PeerAuthentication {policy}; first defined at {first}"
    )]
    Duplicate {
        /// The shared namespace/name.
        policy: PolicyRef,
        /// Where it was defined first.
        first: Origin,
        /// Where it was defined again.
        second: Origin,
    },
    /// Input beyond a size, count or depth limit; refused before or while parsing.
    #[error("{}: {message}", at(file, *line))]
    Limit {
        /// File name.
        file: String,
        /// 1-based line, when the limit was crossed at a known place.
        line: Option<usize>,
        /// Which limit, and what to do.
        message: String,
    },
    /// A policy to delete is not there.
    #[error("PeerAuthentication {0} not found; `interceptor policy list` shows the active ones")]
    NotFound(PolicyRef),
    /// A policy to delete comes from the Kubernetes API only.
    #[error(
        "PeerAuthentication {0} comes from the Kubernetes API; delete it there \
         (kubectl delete peerauthentication -n {ns} {name})",
        ns = .0.namespace,
        name = .0.name
    )]
    FromApi(PolicyRef),
    /// Errors left out of a long report.
    #[error("... and {0} more errors; fix the ones above first")]
    More(usize),
    /// Several errors of one batch, in file order (never empty, never nested).
    #[error("{}", join_lines(.0))]
    Several(Vec<PolicyError>),
}

impl PolicyError {
    /// A [`PolicyError::Limit`].
    pub fn limit(file: String, line: Option<usize>, message: impl Into<String>) -> Self {
        PolicyError::Limit {
            file,
            line,
            message: message.into(),
        }
    }

    /// The individual errors: the list of [`PolicyError::Several`], or just `self`.
    pub fn errors(&self) -> &[PolicyError] {
        match self {
            PolicyError::Several(errors) => errors,
            single => std::slice::from_ref(single),
        }
    }

    /// `Ok` for no errors, the error itself for one, [`PolicyError::Several`] otherwise.
    pub fn check(errors: Vec<PolicyError>) -> Result<(), PolicyError> {
        let mut flat: Vec<PolicyError> = Vec::with_capacity(errors.len());
        for error in errors {
            match error {
                PolicyError::Several(inner) => flat.extend(inner),
                single => flat.push(single),
            }
        }
        match flat.len() {
            0 => Ok(()),
            1 => Err(flat.remove(0)),
            _ => Err(PolicyError::Several(flat)),
        }
    }
}

fn at(file: &str, line: Option<usize>) -> String {
    match line {
        Some(line) => format!("{file}:{line}"),
        None => file.to_owned(),
    }
}

fn join_lines(errors: &[PolicyError]) -> String {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

#[cfg(test)]
impl PolicyError {
    /// The field of every error, all of which must be `Invalid`.
    pub(crate) fn invalid_fields(&self) -> Vec<&str> {
        self.errors()
            .iter()
            .map(|error| match error {
                PolicyError::Invalid { field, .. } => field.as_str(),
                other => panic!("{other}"),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_names_round_trip_exactly() {
        for mode in Mode::ALL {
            assert_eq!(Mode::from_name(mode.as_str()), Some(mode));
            let json = serde_json::to_string(&mode).unwrap();
            assert_eq!(json, format!("\"{mode}\""));
        }
        assert_eq!(Mode::from_name("strict"), None);
    }

    #[test]
    fn policy_ref_displays_namespace_slash_name() {
        let policy = PolicyRef {
            namespace: "foo".into(),
            name: "default".into(),
        };
        assert_eq!(policy.to_string(), "foo/default");
    }

    #[test]
    fn check_flattens_and_unwraps_single_errors() {
        assert!(PolicyError::check(vec![]).is_ok());
        let one = PolicyError::NotFound(PolicyRef {
            namespace: "a".into(),
            name: "b".into(),
        });
        let err = PolicyError::check(vec![one]).unwrap_err();
        assert!(matches!(err, PolicyError::NotFound(_)));
        assert_eq!(err.errors().len(), 1);
    }
}
