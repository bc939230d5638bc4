//! Enrolled workloads (pods) of this node.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, RwLock},
};

use serde::{Deserialize, Serialize};

/// What a user gives to enroll a pod (`interceptor workload add`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account; part of the SPIFFE identity.
    pub service_account: String,
    /// Pod labels, matched by policy selectors.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pod's cgroup (v2); must be under the node's pods cgroup to be captured.
    pub cgroup: PathBuf,
    /// The pod's network namespace (`/run/netns/NAME` or `/proc/PID/ns/net`).
    pub netns: PathBuf,
}

impl WorkloadSpec {
    /// The key that names this workload on the node.
    pub fn key(&self) -> WorkloadKey {
        WorkloadKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// Checks the fields a user typed against the names Kubernetes allows (a namespace is a
    /// DNS label; a pod and a service account are DNS subdomains); the error names the field
    /// at fault.
    pub fn validate(&self) -> Result<(), InvalidWorkload> {
        for (field, value, rule) in [
            ("name", &self.name, NameRule::DnsSubdomain),
            ("namespace", &self.namespace, NameRule::DnsLabel),
            (
                "service account",
                &self.service_account,
                NameRule::DnsSubdomain,
            ),
        ] {
            if !rule.allows(value) {
                return Err(InvalidWorkload {
                    field,
                    value: value.clone(),
                    rule,
                });
            }
        }
        Ok(())
    }
}

/// The Kubernetes name rules a workload field follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    /// RFC 1123 label: lowercase letters, digits and '-', 1 to 63 characters.
    DnsLabel,
    /// RFC 1123 subdomain: labels joined by '.', at most 253 characters.
    DnsSubdomain,
}

impl NameRule {
    fn allows(self, value: &str) -> bool {
        match self {
            Self::DnsLabel => is_dns_label(value),
            Self::DnsSubdomain => value.len() <= 253 && value.split('.').all(is_dns_label),
        }
    }
}

impl fmt::Display for NameRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::DnsLabel => {
                "a DNS label: lowercase letters, digits and '-', 1 to 63 characters"
            }
            Self::DnsSubdomain => {
                "a DNS subdomain: DNS labels (lowercase letters, digits and '-', 1 to 63 characters) joined by '.', at most 253 characters"
            }
        })
    }
}

/// A workload field that breaks its Kubernetes name rule.
#[derive(Debug, thiserror::Error)]
#[error("workload {field} {value:?} must be {rule}")]
pub struct InvalidWorkload {
    /// Which field.
    pub field: &'static str,
    /// What it held.
    pub value: String,
    /// The rule it breaks.
    pub rule: NameRule,
}

/// Where this node's workloads come from: the CLI through the admin socket today, the
/// Kubernetes API next. A source enrolls and removes through this interface and never sees
/// how enrolment is done.
pub trait Enrolment: Send + Sync {
    /// Why an enrolment or removal did not happen.
    type Error: std::error::Error;

    /// Enrolls a pod: capture, listeners, certificate, policy, mesh.
    fn enroll(
        &self,
        spec: WorkloadSpec,
    ) -> impl Future<Output = Result<WorkloadInfo, Self::Error>> + Send;

    /// Removes a pod.
    fn remove(&self, key: WorkloadKey) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The enrolled pods.
    fn enrolled(&self) -> impl Future<Output = Vec<WorkloadInfo>> + Send;
}

/// An enrolled workload as the connection path and the kernel-event reader see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalWorkload {
    /// namespace/name.
    pub key: WorkloadKey,
    /// Its SPIFFE identity.
    pub identity: String,
}

/// This node's enrolled workloads by address: an in-memory snapshot, replaced whole on every
/// enrolment change, that readers take without waiting for enrolment.
#[derive(Default)]
pub struct LocalWorkloads {
    by_ip: RwLock<Arc<HashMap<Ipv4Addr, LocalWorkload>>>,
}

impl LocalWorkloads {
    /// The enrolled workload at `ip`, if any.
    pub fn at(&self, ip: Ipv4Addr) -> Option<LocalWorkload> {
        Arc::clone(&crate::sync::read(&self.by_ip))
            .get(&ip)
            .cloned()
    }

    /// Replaces the snapshot.
    pub fn replace(&self, workloads: impl IntoIterator<Item = (Ipv4Addr, LocalWorkload)>) {
        *crate::sync::write(&self.by_ip) = Arc::new(workloads.into_iter().collect());
    }
}

/// namespace/name of a workload.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkloadKey {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
}

impl fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An enrolled workload as the agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    /// What was enrolled.
    pub spec: WorkloadSpec,
    /// The pod address found in its network namespace.
    pub ip: Ipv4Addr,
    /// The SPIFFE identity its certificate carries.
    pub identity: String,
}

fn is_dns_label(value: &str) -> bool {
    (1..=63).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> WorkloadSpec {
        WorkloadSpec {
            name: name.into(),
            namespace: "default".into(),
            service_account: "sleep".into(),
            labels: BTreeMap::new(),
            cgroup: "/sys/fs/cgroup/pods/a".into(),
            netns: "/run/netns/a".into(),
        }
    }

    #[test]
    fn the_local_view_answers_by_address() {
        let view = LocalWorkloads::default();
        let ip = Ipv4Addr::new(198, 19, 1, 2);
        assert_eq!(view.at(ip), None);
        let web = LocalWorkload {
            key: spec("web").key(),
            identity: "spiffe://cluster.local/ns/default/sa/sleep".into(),
        };
        view.replace([(ip, web.clone())]);
        assert_eq!(view.at(ip), Some(web));
        view.replace([]);
        assert_eq!(view.at(ip), None);
    }

    #[test]
    fn names_follow_the_kubernetes_rules() {
        assert!(spec("web-1").validate().is_ok());
        let err = spec("Web_1").validate().unwrap_err().to_string();
        assert!(err.contains("workload name \"Web_1\""), "{err}");
        assert!(err.contains("DNS subdomain"), "{err}");
        assert!(spec("").validate().is_err());
        assert!(spec("-a").validate().is_err());
        assert!(spec("a..b").validate().is_err());
        assert!(spec("a.").validate().is_err());

        // A pod name is a DNS subdomain: dots, and up to 253 characters.
        let long = format!("{}.{}-7d9f8b6c5-x2k4p", "a".repeat(63), "b".repeat(40));
        assert!(long.len() > 63);
        assert!(spec(&long).validate().is_ok(), "{long}");
        assert!(spec(&"a".repeat(254)).validate().is_err());
        let mut dotted_account = spec("web");
        dotted_account.service_account = "build.robot".into();
        assert!(dotted_account.validate().is_ok());

        // A namespace stays a DNS label.
        let mut dotted = spec("web");
        dotted.namespace = "a.b".into();
        let err = dotted.validate().unwrap_err().to_string();
        assert!(
            err.contains("namespace") && err.contains("DNS label"),
            "{err}"
        );
    }
}
