//! The objects the agent watches, as plain Rust types, and their conversion from the API's.
//!
//! The watches do not decode k8s-openapi's full `Pod`, `Service`, … types but a slim one
//! (`api` below): the metadata and only the fields the agent reads, everything else skipped
//! while parsing. The reflector stores hold far less (a cluster-wide watch of enrolled pods
//! keeps no container specs), and the crate builds much faster: the full types' decoders
//! span hundreds of types, instantiated for every way kube-rs parses them (measured: the
//! interceptor crate's release build took 72 s with k8s-openapi's types, 20.5 s without
//! this module).

use std::{collections::BTreeMap, net::IpAddr};

use super::mesh;
use api::{EndpointSlice, Namespace, Pod, Service};

/// A pod as the agent needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// `metadata.uid`: names the pod's cgroup.
    pub uid: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.serviceAccountName` (`default` when unset, as the API server fills it).
    pub service_account: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `status.podIPs` (or `status.podIP`), in the API's order; empty until the pod has one.
    pub ips: Vec<IpAddr>,
    /// `spec.hostNetwork`: such a pod shares the node's network and is never enrolled.
    pub host_network: bool,
    /// `status.qosClass`: which kubelet QoS cgroup holds the pod; `None` until set.
    pub qos_class: Option<QosClass>,
    /// `status.phase`.
    pub phase: PodPhase,
    /// The `Ready` condition is `True`.
    pub ready: bool,
    /// `spec.nodeName`; `None` while unscheduled.
    pub node: Option<String>,
    /// `metadata.deletionTimestamp` is set: the pod is terminating.
    pub deleting: bool,
    /// The value of the [`mesh::ENROLLED_ANNOTATION`] an agent put on the pod (the SPIFFE
    /// identity it serves the pod under), when present.
    pub enrolled: Option<String>,
    /// `metadata.resourceVersion`.
    pub resource_version: String,
}

impl PodInfo {
    /// The pod's first IPv4 address.
    pub fn ipv4(&self) -> Option<std::net::Ipv4Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    }

    /// `namespace/name`, for logs.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub(super) fn from_api(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().filter_map(|ip| ip.ip.parse().ok()).collect())
            .unwrap_or_default();
        if ips.is_empty()
            && let Some(ip) = status
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse().ok())
        {
            ips.push(ip);
        }
        Some(Self {
            uid: meta.uid.clone()?,
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|sa| !sa.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            labels: meta.labels.clone().unwrap_or_default(),
            ips,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            qos_class: status
                .and_then(|s| s.qos_class.as_deref())
                .and_then(QosClass::parse),
            phase: PodPhase::parse(status.and_then(|s| s.phase.as_deref())),
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
            node: spec.and_then(|s| s.node_name.clone()),
            deleting: meta.deletion_timestamp.is_some(),
            enrolled: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(mesh::ENROLLED_ANNOTATION).cloned()),
            resource_version: meta.resource_version.clone().unwrap_or_default(),
        })
    }
}

/// A pod's quality-of-service class, which decides its kubelet cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QosClass {
    /// Requests equal limits for every container: the pod cgroup sits right under kubepods.
    Guaranteed,
    /// Under `burstable`.
    Burstable,
    /// Under `besteffort`.
    BestEffort,
}

impl QosClass {
    /// All classes, in the order a search should try them.
    pub const ALL: [QosClass; 3] = [Self::Burstable, Self::BestEffort, Self::Guaranteed];

    /// From `status.qosClass`.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "Guaranteed" => Some(Self::Guaranteed),
            "Burstable" => Some(Self::Burstable),
            "BestEffort" => Some(Self::BestEffort),
            _ => None,
        }
    }

    /// The kubelet's cgroup name for the class's level; `None` for Guaranteed, which has none.
    pub fn cgroup_level(self) -> Option<&'static str> {
        match self {
            Self::Guaranteed => None,
            Self::Burstable => Some("burstable"),
            Self::BestEffort => Some("besteffort"),
        }
    }
}

/// `status.phase`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodPhase {
    /// Accepted; containers not all started (the sandbox and its IP may already exist).
    Pending,
    /// Bound to a node, containers started.
    Running,
    /// All containers ended successfully and will not restart.
    Succeeded,
    /// All containers ended, at least one in failure.
    Failed,
    /// Missing or a value this agent does not know.
    Unknown,
}

impl PodPhase {
    fn parse(value: Option<&str>) -> Self {
        match value {
            Some("Pending") => Self::Pending,
            Some("Running") => Self::Running,
            Some("Succeeded") => Self::Succeeded,
            Some("Failed") => Self::Failed,
            _ => Self::Unknown,
        }
    }

    /// The pod's containers are done for good; its sandbox (and address) are being released.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// A namespace as the agent needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
}

impl NamespaceInfo {
    pub(super) fn from_api(namespace: &Namespace) -> Option<Self> {
        Some(Self {
            name: namespace.metadata.name.clone()?,
            labels: namespace.metadata.labels.clone().unwrap_or_default(),
        })
    }
}

/// A Service as the agent needs it (for traffic to its ClusterIP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.clusterIPs` (or `spec.clusterIP`); empty for headless services.
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.ports`.
    pub ports: Vec<ServicePortInfo>,
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    /// `name` (empty when the Service has a single unnamed port).
    pub name: String,
    /// `protocol` (`TCP` when unset).
    pub protocol: String,
    /// `port`: what callers connect to on the ClusterIP.
    pub port: u16,
}

impl ServiceInfo {
    pub(super) fn from_api(service: &Service) -> Option<Self> {
        let spec = service.spec.as_ref();
        let mut cluster_ips: Vec<IpAddr> = spec
            .and_then(|s| s.cluster_ips.as_ref())
            .map(|ips| ips.iter().filter_map(|ip| ip.parse().ok()).collect())
            .unwrap_or_default();
        if cluster_ips.is_empty()
            && let Some(ip) = spec
                .and_then(|s| s.cluster_ip.as_deref())
                .and_then(|ip| ip.parse().ok())
        {
            cluster_ips.push(ip);
        }
        Some(Self {
            namespace: service.metadata.namespace.clone()?,
            name: service.metadata.name.clone()?,
            cluster_ips,
            ports: spec
                .and_then(|s| s.ports.as_ref())
                .map(|ports| {
                    ports
                        .iter()
                        .filter_map(|p| {
                            Some(ServicePortInfo {
                                name: p.name.clone().unwrap_or_default(),
                                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                                port: u16::try_from(p.port).ok()?,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

/// An EndpointSlice as the agent needs it: a Service's backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSliceInfo {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The Service it belongs to (label `kubernetes.io/service-name`).
    pub service: Option<String>,
    /// `ports`: (name, port) as the endpoints listen.
    pub ports: Vec<(String, u16)>,
    /// `endpoints`.
    pub endpoints: Vec<EndpointInfo>,
}

/// One endpoint of a slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// `addresses`.
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready` (unset means ready, as the API defines it).
    pub ready: bool,
    /// `nodeName`.
    pub node: Option<String>,
    /// `targetRef` when it names a Pod: (namespace, name).
    pub pod: Option<(String, String)>,
}

impl EndpointSliceInfo {
    pub(super) fn from_api(slice: &EndpointSlice) -> Option<Self> {
        let namespace = slice.metadata.namespace.clone()?;
        Some(Self {
            name: slice.metadata.name.clone()?,
            service: slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name").cloned()),
            ports: slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    Some((
                        p.name.clone().unwrap_or_default(),
                        u16::try_from(p.port?).ok()?,
                    ))
                })
                .collect(),
            endpoints: slice
                .endpoints
                .iter()
                .flatten()
                .map(|e| EndpointInfo {
                    addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                    ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
                    node: e.node_name.clone(),
                    pod: e.target_ref.as_ref().and_then(|t| {
                        (t.kind.as_deref() == Some("Pod")).then(|| {
                            (
                                t.namespace.clone().unwrap_or_else(|| namespace.clone()),
                                t.name.clone().unwrap_or_default(),
                            )
                        })
                    }),
                })
                .collect(),
            namespace,
        })
    }
}

/// The slim API type the watches decode (see the module's documentation).
///
/// One type for every kind, with the fields the agent reads of each (a Pod's, a Service's,
/// an EndpointSlice's; a Namespace only has metadata): kube-rs's watcher, reflector and
/// client are generic over the object type, and each type costs the crate about 7 s of
/// build time. The aliases keep the conversions readable.
pub(super) mod api {
    use std::borrow::Cow;

    use ::kube::{
        Resource,
        core::{ApiResource, DynamicResourceScope, GroupVersionKind},
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use serde::Deserialize;

    /// Any object of the watched kinds, as far as the agent reads it.
    #[derive(Clone, Debug, Deserialize)]
    pub struct ApiObject {
        pub metadata: ObjectMeta,
        /// Pod and Service.
        pub spec: Option<Spec>,
        /// Pod (Namespace's and Service's have the same shape where they overlap).
        pub status: Option<Status>,
        /// EndpointSlice.
        pub ports: Option<Vec<EndpointPort>>,
        /// EndpointSlice.
        pub endpoints: Option<Vec<Endpoint>>,
    }

    pub type Pod = ApiObject;
    pub type Namespace = ApiObject;
    pub type Service = ApiObject;
    pub type EndpointSlice = ApiObject;

    /// The collections the watches read.
    #[derive(Clone, Copy, Debug)]
    pub enum Collection {
        Pods,
        Namespaces,
        Services,
        EndpointSlices,
    }

    /// A collection, for `Api::all_with` and the reflector.
    pub fn resource(collection: Collection) -> ApiResource {
        let (group, kind, plural) = match collection {
            Collection::Pods => ("", "Pod", "pods"),
            Collection::Namespaces => ("", "Namespace", "namespaces"),
            Collection::Services => ("", "Service", "services"),
            Collection::EndpointSlices => ("discovery.k8s.io", "EndpointSlice", "endpointslices"),
        };
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, "v1", kind), plural)
    }

    impl Resource for ApiObject {
        type DynamicType = ApiResource;
        type Scope = DynamicResourceScope;
        fn kind(resource: &ApiResource) -> Cow<'_, str> {
            Cow::Borrowed(&resource.kind)
        }
        fn group(resource: &ApiResource) -> Cow<'_, str> {
            Cow::Borrowed(&resource.group)
        }
        fn version(resource: &ApiResource) -> Cow<'_, str> {
            Cow::Borrowed(&resource.version)
        }
        fn api_version(resource: &ApiResource) -> Cow<'_, str> {
            Cow::Borrowed(&resource.api_version)
        }
        fn plural(resource: &ApiResource) -> Cow<'_, str> {
            Cow::Borrowed(&resource.plural)
        }
        fn meta(&self) -> &ObjectMeta {
            &self.metadata
        }
        fn meta_mut(&mut self) -> &mut ObjectMeta {
            &mut self.metadata
        }
    }

    /// `spec` of a Pod or a Service.
    #[derive(Clone, Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Spec {
        pub node_name: Option<String>,
        pub service_account_name: Option<String>,
        pub host_network: Option<bool>,
        #[serde(rename = "clusterIP")]
        pub cluster_ip: Option<String>,
        #[serde(rename = "clusterIPs")]
        pub cluster_ips: Option<Vec<String>>,
        pub ports: Option<Vec<ServicePort>>,
    }

    /// `status` of a Pod.
    #[derive(Clone, Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Status {
        pub phase: Option<String>,
        #[serde(rename = "podIP")]
        pub pod_ip: Option<String>,
        #[serde(rename = "podIPs")]
        pub pod_ips: Option<Vec<PodIp>>,
        pub qos_class: Option<String>,
        pub conditions: Option<Vec<Condition>>,
    }

    #[derive(Clone, Debug, Deserialize)]
    pub struct PodIp {
        pub ip: String,
    }

    #[derive(Clone, Debug, Deserialize)]
    pub struct Condition {
        #[serde(rename = "type")]
        pub type_: String,
        pub status: String,
    }

    #[derive(Clone, Debug, Deserialize)]
    pub struct ServicePort {
        pub name: Option<String>,
        pub protocol: Option<String>,
        pub port: i32,
    }

    #[derive(Clone, Debug, Deserialize)]
    pub struct EndpointPort {
        pub name: Option<String>,
        pub port: Option<i32>,
    }

    #[derive(Clone, Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Endpoint {
        #[serde(default)]
        pub addresses: Vec<String>,
        pub conditions: Option<EndpointConditions>,
        pub node_name: Option<String>,
        pub target_ref: Option<ObjectReference>,
    }

    #[derive(Clone, Debug, Deserialize)]
    pub struct EndpointConditions {
        pub ready: Option<bool>,
    }

    #[derive(Clone, Debug, Deserialize)]
    pub struct ObjectReference {
        pub kind: Option<String>,
        pub namespace: Option<String>,
        pub name: Option<String>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_object_becomes_pod_info() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "5f0c-11",
                         "resourceVersion": "42", "labels": {"app": "web"},
                         "annotations": {"interceptor.io/enrolled": "spiffe://td/ns/shop/sa/web"}},
            "spec": {"nodeName": "node-1", "serviceAccountName": "web", "containers": []},
            "status": {"phase": "Running", "qosClass": "Burstable", "podIP": "198.19.1.10",
                       "podIPs": [{"ip": "198.19.1.10"}, {"ip": "fd00::a"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let info = PodInfo::from_api(&pod).unwrap();
        assert_eq!(info.uid, "5f0c-11");
        assert_eq!(info.full_name(), "shop/web-1");
        assert_eq!(info.service_account, "web");
        assert_eq!(info.ipv4(), Some("198.19.1.10".parse().unwrap()));
        assert_eq!(info.ips.len(), 2);
        assert_eq!(info.qos_class, Some(QosClass::Burstable));
        assert_eq!(info.phase, PodPhase::Running);
        assert!(info.ready && !info.host_network && !info.deleting);
        assert_eq!(info.node.as_deref(), Some("node-1"));
        assert_eq!(info.enrolled.as_deref(), Some("spiffe://td/ns/shop/sa/web"));
        assert_eq!(info.labels["app"], "web");
    }

    #[test]
    fn a_fresh_pod_has_defaults() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u"},
            "spec": {"containers": [], "hostNetwork": true}
        }))
        .unwrap();
        let info = PodInfo::from_api(&pod).unwrap();
        assert_eq!(info.service_account, "default");
        assert!(info.ips.is_empty() && info.host_network);
        assert_eq!(info.phase, PodPhase::Unknown);
        assert_eq!(info.qos_class, None);
        assert!(!info.ready);
    }

    /// Objects as a real API server returns them, with the fields the slim type skips
    /// (containers, probes, managedFields, a Service's status, string target ports).
    #[test]
    fn full_objects_decode_through_the_slim_type() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": "web-7d9f", "namespace": "shop", "uid": "a1b2c3d4-0000-4000-8000-000000000001",
                "generateName": "web-", "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": "web", "uid": "x", "controller": true}],
                "managedFields": [{"manager": "kubelet", "operation": "Update", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:status": {}}}]},
            "spec": {"containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/", "port": "http"}},
                "resources": {"requests": {"cpu": "100m"}}}],
                "volumes": [{"name": "v", "projected": {"sources": []}}],
                "nodeName": "node-1", "serviceAccountName": "web", "tolerations": [],
                "securityContext": {}, "restartPolicy": "Always"},
            "status": {"phase": "Running", "hostIP": "10.0.0.1", "podIP": "198.19.1.10",
                "podIPs": [{"ip": "198.19.1.10"}], "qosClass": "Guaranteed", "startTime": "2026-11-30T05:00:00Z",
                "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "app:1",
                "imageID": "", "state": {"running": {"startedAt": "2026-11-30T05:00:01Z"}}}],
                "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True",
                "lastTransitionTime": "2026-11-30T05:00:02Z"}]}
        }))
        .unwrap();
        let info = PodInfo::from_api(&pod).unwrap();
        assert_eq!(info.qos_class, Some(QosClass::Guaranteed));
        assert!(info.ready);
        assert_eq!(info.node.as_deref(), Some("node-1"));

        let service: Service = serde_json::from_value(serde_json::json!({
            "kind": "Service", "apiVersion": "v1",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "ClusterIP", "clusterIP": "198.18.200.1", "clusterIPs": ["198.18.200.1"],
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                          {"port": 9090, "targetPort": 9090}],
                "selector": {"app": "web"}, "sessionAffinity": "None", "ipFamilies": ["IPv4"]},
            "status": {"loadBalancer": {}, "conditions": [{"type": "x", "status": "True", "reason": "r",
                "message": "", "lastTransitionTime": "2026-11-30T05:00:00Z"}]}
        }))
        .unwrap();
        let info = ServiceInfo::from_api(&service).unwrap();
        assert_eq!(
            info.cluster_ips,
            vec!["198.18.200.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(info.ports.len(), 2);
        assert_eq!(
            (info.ports[1].name.as_str(), info.ports[1].protocol.as_str()),
            ("", "TCP")
        );

        let headless: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 5432}]}
        }))
        .unwrap();
        assert!(
            ServiceInfo::from_api(&headless)
                .unwrap()
                .cluster_ips
                .is_empty()
        );

        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "kind": "Namespace", "apiVersion": "v1",
            "metadata": {"name": "shop", "labels": {"interceptor.io/mesh": "enabled",
                "kubernetes.io/metadata.name": "shop"}},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active", "conditions": [{"type": "NamespaceDeletionContentFailure", "status": "False"}]}
        }))
        .unwrap();
        let info = NamespaceInfo::from_api(&namespace).unwrap();
        assert_eq!(info.labels[mesh::MESH_LABEL], mesh::MESH_ENABLED);

        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1", "addressType": "IPv4",
            "metadata": {"name": "web-x1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "unset", "port": null}],
            "endpoints": [
                {"addresses": ["198.19.1.10"], "conditions": {"ready": true, "serving": true, "terminating": false},
                 "nodeName": "node-1", "zone": "a", "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-7d9f", "uid": "u"}},
                {"addresses": ["198.19.2.10"], "conditions": {"ready": false}},
                {"addresses": ["198.19.2.11"]}
            ]
        }))
        .unwrap();
        let info = EndpointSliceInfo::from_api(&slice).unwrap();
        assert_eq!(info.ports, vec![("http".to_owned(), 8080)]);
        assert_eq!(
            info.endpoints.iter().map(|e| e.ready).collect::<Vec<_>>(),
            vec![true, false, true],
            "an unset condition means ready"
        );
        assert_eq!(
            info.endpoints[0].pod,
            Some(("shop".into(), "web-7d9f".into()))
        );

        // A slice with no endpoints at all (null) is empty, not an error.
        let empty: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "e", "namespace": "shop"}, "endpoints": null
        }))
        .unwrap();
        assert!(
            EndpointSliceInfo::from_api(&empty)
                .unwrap()
                .endpoints
                .is_empty()
        );
    }
}
