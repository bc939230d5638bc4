//! Enrolled workloads (pods) of this node.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, path::PathBuf};

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

    /// Checks the fields a user typed; the message names the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        for (field, value) in [
            ("name", &self.name),
            ("namespace", &self.namespace),
            ("service account", &self.service_account),
        ] {
            if !is_dns_label(value) {
                return Err(format!(
                    "workload {field} {value:?} must be a DNS label: lowercase letters, digits and '-', 1 to 63 characters"
                ));
            }
        }
        Ok(())
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
    fn names_must_be_dns_labels() {
        assert!(spec("web-1").validate().is_ok());
        let err = spec("Web_1").validate().unwrap_err();
        assert!(err.contains("workload name \"Web_1\""), "{err}");
        assert!(spec("").validate().is_err());
        assert!(spec("-a").validate().is_err());
    }
}
