//! Who is meshed: the labels users set, the marker agents set, and the decisions on them.
//!
//! Names, next to Istio ambient's conventions:
//!
//! | interceptor | set by | Istio ambient equivalent |
//! |---|---|---|
//! | label [`MESH_LABEL`] `interceptor.io/mesh=enabled` on a namespace or a pod | the user: mesh it | `istio.io/dataplane-mode=ambient` |
//! | label `interceptor.io/mesh=disabled` on a pod | the user: opt this pod out of a meshed namespace | `istio.io/dataplane-mode=none` |
//! | annotation [`ENROLLED_ANNOTATION`] `interceptor.io/enrolled: spiffe://<td>/ns/<ns>/sa/<sa>` on a pod | the pod's node agent, once the pod's traffic is captured and its certificate issued | `ambient.istio.io/redirection: enabled` (istio-cni) |
//! | label [`ENROLLED_LABEL`] `interceptor.io/enrolled=true` on a pod | the node agent, with the annotation, in the same patch | none: ztunnel learns workloads from istiod; here peers select enrolled pods with it, because annotations cannot be selected |
//!
//! The pod label wins over the namespace label. A peer treats an address as meshed only when
//! a pod carrying it has the marker, so it never sends mutual TLS to a pod whose agent is not
//! ready for it, and never plaintext to one whose agent is; when it cannot tell (watch not
//! synced, two pods claim the address, the marker contradicts the pod), [`lookup`] says
//! [`MeshLookup::Unknown`] and the connection must fail rather than be downgraded.

use std::net::IpAddr;

use ::kube::api::{Api, Patch, PatchParams};

use super::{
    ApiClient, NamespaceInfo, PodInfo, View,
    objects::api::{ApiObject, Collection, resource},
};
use crate::identity::Identity;

/// Label on a namespace or pod that meshes it (`enabled`) or opts a pod out (`disabled`).
pub const MESH_LABEL: &str = "interceptor.io/mesh";
/// [`MESH_LABEL`] value that meshes.
pub const MESH_ENABLED: &str = "enabled";
/// [`MESH_LABEL`] value that opts a pod out.
pub const MESH_DISABLED: &str = "disabled";
/// Annotation the node agent sets on a pod it has enrolled: the pod's SPIFFE identity.
pub const ENROLLED_ANNOTATION: &str = "interceptor.io/enrolled";
/// Label the node agent sets (to [`ENROLLED_LABEL_VALUE`]) with [`ENROLLED_ANNOTATION`], so
/// that peers can watch enrolled pods only.
pub const ENROLLED_LABEL: &str = "interceptor.io/enrolled";
/// The value of [`ENROLLED_LABEL`].
pub const ENROLLED_LABEL_VALUE: &str = "true";

/// The label selector of enrolled pods.
pub fn enrolled_selector() -> String {
    format!("{ENROLLED_LABEL}={ENROLLED_LABEL_VALUE}")
}

/// What the node agent should do with a pod of its node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshDecision {
    /// Meshed and ready: enroll it (or keep it enrolled).
    Enroll,
    /// Meshed, but not yet enrollable: look again when the pod or namespace changes.
    Wait(WaitReason),
    /// Not meshed: do not enroll it, and remove it if it is enrolled.
    Skip(SkipReason),
}

/// Why a meshed pod cannot be enrolled yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitReason {
    /// No IP yet (the sandbox is not up).
    NoAddress,
    /// The pod has no mesh label of its own and its namespace has not been seen yet.
    NamespaceUnknown,
}

/// Why a pod is not meshed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// `hostNetwork` pods share the node's network namespace: never enrolled.
    HostNetwork,
    /// The pod has ended (Succeeded or Failed).
    Terminated,
    /// The pod carries `interceptor.io/mesh=disabled`.
    OptedOut,
    /// Neither the pod nor its namespace asks for the mesh.
    NotSelected,
    /// The pod or its namespace has [`MESH_LABEL`] with a value that is neither `enabled`
    /// nor `disabled`; it is not guessed at.
    InvalidLabel {
        /// `pod ns/name` or `namespace ns`.
        on: String,
        /// The value found.
        value: String,
    },
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::HostNetwork => f.write_str("hostNetwork pod"),
            Self::Terminated => f.write_str("pod has terminated"),
            Self::OptedOut => write!(f, "pod has {MESH_LABEL}={MESH_DISABLED}"),
            Self::NotSelected => write!(
                f,
                "neither the pod nor its namespace has {MESH_LABEL}={MESH_ENABLED}"
            ),
            Self::InvalidLabel { on, value } => write!(
                f,
                "{on} has {MESH_LABEL}={value:?}; use {MESH_ENABLED:?} or {MESH_DISABLED:?}"
            ),
        }
    }
}

/// Decides for a pod of this node, given its namespace (`None` when not seen yet).
pub fn decide(pod: &PodInfo, namespace: Option<&NamespaceInfo>) -> MeshDecision {
    if pod.host_network {
        return MeshDecision::Skip(SkipReason::HostNetwork);
    }
    if pod.phase.is_terminal() {
        return MeshDecision::Skip(SkipReason::Terminated);
    }
    match pod.labels.get(MESH_LABEL).map(String::as_str) {
        Some(MESH_DISABLED) => return MeshDecision::Skip(SkipReason::OptedOut),
        Some(MESH_ENABLED) => {}
        Some(other) => {
            return MeshDecision::Skip(SkipReason::InvalidLabel {
                on: format!("pod {}", pod.full_name()),
                value: other.to_owned(),
            });
        }
        None => {
            let Some(namespace) = namespace else {
                return MeshDecision::Wait(WaitReason::NamespaceUnknown);
            };
            match namespace.labels.get(MESH_LABEL).map(String::as_str) {
                Some(MESH_ENABLED) => {}
                None | Some(MESH_DISABLED) => return MeshDecision::Skip(SkipReason::NotSelected),
                Some(other) => {
                    return MeshDecision::Skip(SkipReason::InvalidLabel {
                        on: format!("namespace {}", namespace.name),
                        value: other.to_owned(),
                    });
                }
            }
        }
    }
    if pod.ips.is_empty() {
        return MeshDecision::Wait(WaitReason::NoAddress);
    }
    MeshDecision::Enroll
}

/// What the node agent should change so that its enrolled pods match the API.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Meshed pods to enroll (not enrolled yet).
    pub enroll: Vec<PodInfo>,
    /// Enrolled pods (UIDs) to remove: gone from the API, or no longer meshed.
    pub remove: Vec<String>,
    /// Enrolled pods whose marker is missing or wrong: set it ([`ApiClient::set_enrolled`]).
    pub mark: Vec<PodInfo>,
    /// Pods that carry a marker but are not meshed (an agent before a restart marked them):
    /// clear it.
    pub unmark: Vec<PodInfo>,
    /// Meshed pods that cannot be enrolled yet, and why.
    pub waiting: Vec<(PodInfo, WaitReason)>,
}

/// Compares the pods this agent has enrolled (`enrolled`, by UID: its saved state after a
/// restart, or its live state) with this node's pods and the namespaces from the API.
///
/// Nothing is removed before the node's pods have been listed once (an empty view at
/// start-up is not "all pods are gone"). A pod that waits (its namespace not seen yet)
/// stays enrolled if it is.
pub fn reconcile(
    enrolled: &std::collections::BTreeSet<String>,
    pods: &View<PodInfo>,
    namespaces: &View<NamespaceInfo>,
    trust_domain: &str,
) -> Plan {
    let mut plan = Plan::default();
    if !pods.status.synced {
        return plan;
    }
    for uid in enrolled {
        if !pods.objects.contains_key(uid) {
            plan.remove.push(uid.clone());
        }
    }
    for pod in pods.objects.values() {
        let namespace = if namespaces.status.synced {
            namespaces.objects.get(&pod.namespace)
        } else {
            None
        };
        let is_enrolled = enrolled.contains(&pod.uid);
        match decide(pod, namespace) {
            MeshDecision::Enroll => {
                let expected = Identity::new(trust_domain, &pod.namespace, &pod.service_account)
                    .map(|identity| identity.to_string())
                    .ok();
                if !is_enrolled {
                    plan.enroll.push(pod.clone());
                } else if pod.enrolled.is_none() || pod.enrolled != expected {
                    plan.mark.push(pod.clone());
                }
            }
            MeshDecision::Wait(reason) => {
                if !is_enrolled {
                    plan.waiting.push((pod.clone(), reason));
                }
            }
            MeshDecision::Skip(_) => {
                if is_enrolled {
                    plan.remove.push(pod.uid.clone());
                }
                if pod.enrolled.is_some() {
                    plan.unmark.push(pod.clone());
                }
            }
        }
    }
    plan
}

/// What a peer knows about a destination address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshLookup {
    /// An enrolled pod: use mutual TLS and expect this identity.
    Meshed {
        /// The identity the destination must present.
        identity: Identity,
        /// The pod (`namespace/name`).
        pod: String,
    },
    /// No enrolled pod has this address: plaintext.
    NotMeshed,
    /// Cannot tell: the connection must fail, never be downgraded.
    Unknown(String),
}

/// Looks `ip` up among the enrolled pods ([`ApiClient::watch_enrolled_pods`]).
pub fn lookup(view: &View<PodInfo>, ip: IpAddr, trust_domain: &str) -> MeshLookup {
    if !view.status.synced {
        return MeshLookup::Unknown("the watch of enrolled pods has not listed them yet".into());
    }
    let mut found: Option<(Identity, String)> = None;
    for pod in view.with_ip(ip).filter(|p| !p.phase.is_terminal()) {
        let expected = match Identity::new(trust_domain, &pod.namespace, &pod.service_account) {
            Ok(identity) => identity,
            Err(error) => {
                return MeshLookup::Unknown(format!("pod {}: {error}", pod.full_name()));
            }
        };
        if pod.enrolled.as_deref() != Some(expected.to_string().as_str()) {
            return MeshLookup::Unknown(format!(
                "pod {} is labelled enrolled but its {ENROLLED_ANNOTATION} annotation is {:?}, \
                 not {expected}",
                pod.full_name(),
                pod.enrolled
            ));
        }
        match &found {
            Some((identity, other)) if *identity != expected => {
                return MeshLookup::Unknown(format!(
                    "{ip} is claimed by enrolled pods {other} ({identity}) and {} ({expected})",
                    pod.full_name()
                ));
            }
            Some(_) => {}
            None => found = Some((expected, pod.full_name())),
        }
    }
    match found {
        Some((identity, pod)) => MeshLookup::Meshed { identity, pod },
        None => MeshLookup::NotMeshed,
    }
}

/// The merge patch that marks a pod enrolled under `identity`, or unmarks it (`None`).
///
/// It carries the pod's UID, which the API server checks as a precondition: a pod that was
/// deleted and re-created under the same name is never marked by mistake.
pub fn enrolled_patch(uid: &str, identity: Option<&str>) -> serde_json::Value {
    let (label, annotation) = match identity {
        Some(identity) => (
            serde_json::Value::from(ENROLLED_LABEL_VALUE),
            serde_json::Value::from(identity),
        ),
        None => (serde_json::Value::Null, serde_json::Value::Null),
    };
    serde_json::json!({
        "metadata": {
            "uid": uid,
            "labels": { ENROLLED_LABEL: label },
            "annotations": { ENROLLED_ANNOTATION: annotation },
        }
    })
}

/// Why the enrolled marker could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The pod is gone, or was re-created under a new UID: nothing to mark.
    #[error("pod {pod} no longer exists (or was re-created)")]
    Gone {
        /// `namespace/name`.
        pod: String,
    },
    /// The API server refused or could not be reached; the caller retries.
    #[error("marking pod {pod} (annotation {ENROLLED_ANNOTATION}): {source}")]
    Api {
        /// `namespace/name`.
        pod: String,
        /// What the API said.
        #[source]
        source: ::kube::Error,
    },
}

impl ApiClient {
    /// Marks `pod` enrolled under `identity` (the identity its certificate carries), or
    /// removes the mark (`None`): [`ENROLLED_LABEL`] and [`ENROLLED_ANNOTATION`] in one merge
    /// patch.
    pub async fn set_enrolled(
        &self,
        pod: &PodInfo,
        identity: Option<&Identity>,
    ) -> Result<(), PatchError> {
        let api: Api<ApiObject> = Api::namespaced_with(
            self.client.clone(),
            &pod.namespace,
            &resource(Collection::Pods),
        );
        let identity = identity.map(Identity::to_string);
        let patch = Patch::Merge(enrolled_patch(&pod.uid, identity.as_deref()));
        match api.patch(&pod.name, &PatchParams::default(), &patch).await {
            Ok(_) => Ok(()),
            Err(::kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {
                Err(PatchError::Gone {
                    pod: pod.full_name(),
                })
            }
            Err(source) => Err(PatchError::Api {
                pod: pod.full_name(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use super::*;
    use crate::kube::{PodPhase, QosClass, WatchStatus};

    fn pod(labels: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            uid: "uid-1".into(),
            namespace: "shop".into(),
            name: "web".into(),
            service_account: "web-sa".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ips: vec!["198.19.1.10".parse().unwrap()],
            host_network: false,
            qos_class: Some(QosClass::Burstable),
            phase: PodPhase::Running,
            ready: true,
            node: Some("node-1".into()),
            deleting: false,
            enrolled: None,
            resource_version: "1".into(),
        }
    }

    fn namespace(labels: &[(&str, &str)]) -> NamespaceInfo {
        NamespaceInfo {
            name: "shop".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn the_namespace_label_meshes_its_pods() {
        let meshed = namespace(&[(MESH_LABEL, MESH_ENABLED)]);
        assert_eq!(decide(&pod(&[]), Some(&meshed)), MeshDecision::Enroll);
        assert_eq!(
            decide(&pod(&[]), Some(&namespace(&[]))),
            MeshDecision::Skip(SkipReason::NotSelected)
        );
        assert_eq!(
            decide(&pod(&[]), Some(&namespace(&[(MESH_LABEL, MESH_DISABLED)]))),
            MeshDecision::Skip(SkipReason::NotSelected)
        );
    }

    #[test]
    fn the_pod_label_wins_over_the_namespace() {
        let meshed = namespace(&[(MESH_LABEL, MESH_ENABLED)]);
        let opted_out = pod(&[(MESH_LABEL, MESH_DISABLED)]);
        assert_eq!(
            decide(&opted_out, Some(&meshed)),
            MeshDecision::Skip(SkipReason::OptedOut)
        );
        let opted_in = pod(&[(MESH_LABEL, MESH_ENABLED)]);
        assert_eq!(
            decide(&opted_in, Some(&namespace(&[]))),
            MeshDecision::Enroll
        );
        // A pod that says what it wants needs no namespace.
        assert_eq!(decide(&opted_in, None), MeshDecision::Enroll);
        assert_eq!(
            decide(&pod(&[]), None),
            MeshDecision::Wait(WaitReason::NamespaceUnknown)
        );
    }

    #[test]
    fn host_network_terminated_and_addressless_pods_are_not_enrolled() {
        let meshed = namespace(&[(MESH_LABEL, MESH_ENABLED)]);
        let mut host = pod(&[(MESH_LABEL, MESH_ENABLED)]);
        host.host_network = true;
        assert_eq!(
            decide(&host, Some(&meshed)),
            MeshDecision::Skip(SkipReason::HostNetwork)
        );
        let mut done = pod(&[]);
        done.phase = PodPhase::Succeeded;
        assert_eq!(
            decide(&done, Some(&meshed)),
            MeshDecision::Skip(SkipReason::Terminated)
        );
        let mut pending = pod(&[]);
        pending.phase = PodPhase::Pending;
        pending.ips.clear();
        assert_eq!(
            decide(&pending, Some(&meshed)),
            MeshDecision::Wait(WaitReason::NoAddress)
        );
        // Pending with an address: the sandbox is up, enroll before the app starts.
        pending.ips.push("198.19.1.11".parse().unwrap());
        assert_eq!(decide(&pending, Some(&meshed)), MeshDecision::Enroll);
    }

    #[test]
    fn an_unknown_label_value_is_not_guessed() {
        let decision = decide(&pod(&[(MESH_LABEL, "yes")]), None);
        let MeshDecision::Skip(reason) = decision else {
            panic!("{decision:?}")
        };
        assert_eq!(
            reason.to_string(),
            "pod shop/web has interceptor.io/mesh=\"yes\"; use \"enabled\" or \"disabled\""
        );
        let ns = namespace(&[(MESH_LABEL, "Enabled")]);
        assert!(matches!(
            decide(&pod(&[]), Some(&ns)),
            MeshDecision::Skip(SkipReason::InvalidLabel { .. })
        ));
    }

    #[test]
    fn the_enrolled_patch_sets_and_clears_both_marks_with_the_uid() {
        let set = enrolled_patch("u-1", Some("spiffe://td/ns/a/sa/b"));
        assert_eq!(set["metadata"]["uid"], "u-1");
        assert_eq!(set["metadata"]["labels"][ENROLLED_LABEL], "true");
        assert_eq!(
            set["metadata"]["annotations"][ENROLLED_ANNOTATION],
            "spiffe://td/ns/a/sa/b"
        );
        let clear = enrolled_patch("u-1", None);
        assert!(clear["metadata"]["labels"][ENROLLED_LABEL].is_null());
        assert!(
            clear["metadata"]["annotations"]
                .as_object()
                .unwrap()
                .contains_key(ENROLLED_ANNOTATION)
        );
    }

    fn view(pods: Vec<PodInfo>, synced: bool) -> View<PodInfo> {
        let mut by_ip: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
        let mut objects = BTreeMap::new();
        for p in pods {
            for ip in &p.ips {
                by_ip.entry(*ip).or_default().push(p.uid.clone());
            }
            objects.insert(p.uid.clone(), p);
        }
        View {
            objects: Arc::new(objects),
            by_ip: Arc::new(by_ip),
            status: WatchStatus {
                synced,
                ..WatchStatus::default()
            },
        }
    }

    #[test]
    fn a_peer_meshes_only_pods_whose_agent_marked_them() {
        let ip: IpAddr = "198.19.1.10".parse().unwrap();
        let mut enrolled = pod(&[]);
        enrolled.enrolled = Some("spiffe://td/ns/shop/sa/web-sa".into());
        assert_eq!(
            lookup(&view(vec![enrolled.clone()], true), ip, "td"),
            MeshLookup::Meshed {
                identity: Identity::new("td", "shop", "web-sa").unwrap(),
                pod: "shop/web".into()
            }
        );
        assert_eq!(
            lookup(
                &view(vec![enrolled.clone()], true),
                "198.19.1.99".parse().unwrap(),
                "td"
            ),
            MeshLookup::NotMeshed
        );
        assert!(matches!(
            lookup(&view(vec![enrolled.clone()], false), ip, "td"),
            MeshLookup::Unknown(_)
        ));
        // A marker that does not match the pod's own identity is not trusted.
        let mut forged = enrolled.clone();
        forged.enrolled = Some("spiffe://td/ns/kube-system/sa/admin".into());
        assert!(matches!(
            lookup(&view(vec![forged], true), ip, "td"),
            MeshLookup::Unknown(_)
        ));
        // Two live pods with one address and different identities: cannot tell.
        let mut other = enrolled.clone();
        other.uid = "uid-2".into();
        other.service_account = "other".into();
        other.enrolled = Some("spiffe://td/ns/shop/sa/other".into());
        assert!(matches!(
            lookup(&view(vec![enrolled.clone(), other.clone()], true), ip, "td"),
            MeshLookup::Unknown(_)
        ));
        // ...unless one of them has terminated.
        other.phase = PodPhase::Failed;
        assert!(matches!(
            lookup(&view(vec![enrolled, other], true), ip, "td"),
            MeshLookup::Meshed { .. }
        ));
    }

    fn synced<T>(objects: Vec<(String, T)>) -> View<T> {
        View {
            objects: Arc::new(objects.into_iter().collect()),
            by_ip: Arc::default(),
            status: WatchStatus {
                synced: true,
                ..WatchStatus::default()
            },
        }
    }

    #[test]
    fn a_restarted_agent_forgets_gone_pods_and_enrolls_new_ones() {
        let mut kept = pod(&[]);
        kept.uid = "kept".into();
        kept.enrolled = Some("spiffe://td/ns/shop/sa/web-sa".into());
        let mut unmarked = pod(&[]);
        unmarked.uid = "unmarked".into();
        let mut opted_out = pod(&[(MESH_LABEL, MESH_DISABLED)]);
        opted_out.uid = "opted-out".into();
        opted_out.enrolled = Some("spiffe://td/ns/shop/sa/web-sa".into());
        let mut new = pod(&[]);
        new.uid = "new".into();
        let mut starting = pod(&[]);
        starting.uid = "starting".into();
        starting.ips.clear();
        let pods = synced(
            [&kept, &unmarked, &opted_out, &new, &starting]
                .into_iter()
                .map(|p| (p.uid.clone(), p.clone()))
                .collect(),
        );
        let namespaces = synced(vec![(
            "shop".to_owned(),
            namespace(&[(MESH_LABEL, MESH_ENABLED)]),
        )]);
        let saved: std::collections::BTreeSet<String> = ["kept", "unmarked", "opted-out", "gone"]
            .into_iter()
            .map(String::from)
            .collect();
        let plan = reconcile(&saved, &pods, &namespaces, "td");
        assert_eq!(plan.enroll, vec![new]);
        assert_eq!(plan.remove, vec!["gone".to_owned(), "opted-out".to_owned()]);
        assert_eq!(plan.mark, vec![unmarked]);
        assert_eq!(plan.unmark, vec![opted_out]);
        assert_eq!(plan.waiting, vec![(starting, WaitReason::NoAddress)]);
    }

    #[test]
    fn nothing_is_removed_before_the_first_list() {
        let saved: std::collections::BTreeSet<String> = ["a".to_owned()].into();
        let mut pods = synced(Vec::<(String, PodInfo)>::new());
        pods.status.synced = false;
        let namespaces = synced(Vec::new());
        assert_eq!(reconcile(&saved, &pods, &namespaces, "td"), Plan::default());
        // With the pods listed but the namespaces not yet, an enrolled pod that relies on its
        // namespace label waits and stays.
        let mut web = pod(&[]);
        web.uid = "a".into();
        let pods = synced(vec![("a".to_owned(), web)]);
        let mut namespaces = synced(Vec::new());
        namespaces.status.synced = false;
        assert_eq!(reconcile(&saved, &pods, &namespaces, "td"), Plan::default());
    }
}
