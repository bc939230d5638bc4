//! Kubernetes mode: what the node agent learns from the API server, as plain Rust types.
//!
//! Nothing outside this module sees a `kube` or `k8s-openapi` type: the agent asks for
//! [`ApiClient`]s, starts watches that publish [`View`]s of plain objects ([`PodInfo`],
//! [`NamespaceInfo`], [`ServiceInfo`], [`EndpointSliceInfo`]), decides with pure functions
//! ([`mesh`]), finds a pod's cgroup and network namespace on the node ([`cgroup`],
//! [`podns`]) and says on the pod object that it enrolled it ([`ApiClient::set_enrolled`]).
//!
//! | piece | file |
//! |---|---|
//! | client from the in-cluster service account or `--kubeconfig` | `client.rs` |
//! | reflector-backed watches that survive errors, published as snapshots | `watch.rs` |
//! | pods, namespaces, services, endpoint slices as plain types | `objects.rs` |
//! | mesh labels, the enrolled marker, the decision and the peer lookup | `mesh.rs` |
//! | PeerAuthentication objects, absent CRD included | `peer_auth.rs` |
//! | kubelet cgroup layouts, `/proc/PID/cgroup` | `cgroup.rs` |
//! | a pod's network namespace from its cgroup | `podns.rs` |
//! | the mesh from the enrolled pods, as the agent's `MeshSource` | `mesh_source.rs` |
//! | the pod source: enrolls and removes this node's pods | `node_pods.rs` |
//! | a Service's ClusterIP and port → its ready backends | `services.rs` |
//!
//! Every API call this module makes is listed in [`API_CALLS`], from which the RBAC in
//! `deploy/` is checked (tests/tests/manifests.rs), so the two cannot drift.

pub mod cgroup;
mod client;
/// Entry point of the `kube_objects` fuzz target; built only by cargo-fuzz.
#[cfg(fuzzing)]
pub mod fuzzing;
pub mod mesh;
mod mesh_source;
pub mod node_pods;
mod objects;
mod peer_auth;
pub mod podns;
mod services;
mod watch;

pub use client::{ApiClient, ClientError, ClientSource};
pub use mesh_source::KubeMeshSource;
pub use node_pods::NodePods;
pub use objects::{
    EndpointInfo, EndpointSliceInfo, NamespaceInfo, PodInfo, PodPhase, QosClass, ServiceInfo,
    ServicePortInfo,
};
pub use peer_auth::{ABSENT_RECHECK, PeerAuthError, PeerAuthentications, RawPeerAuthentication};
pub use services::KubeServices;
pub use watch::{View, Watch, WatchObject, WatchStatus};

/// One kind of object the agent reads or writes, with the verbs it uses on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiCall {
    /// API group ("" for the core group).
    pub group: &'static str,
    /// Resource (plural, lower case), as RBAC names it.
    pub resource: &'static str,
    /// Verbs, as RBAC names them.
    pub verbs: &'static [&'static str],
}

/// Every call the agent makes to the API server. `deploy/base/rbac.yaml` grants exactly these.
pub const API_CALLS: &[ApiCall] = &[
    // Watches of this node's pods and of the enrolled pods of all nodes; the enrolled marker.
    ApiCall {
        group: "",
        resource: "pods",
        verbs: &["list", "watch", "patch"],
    },
    // Namespace labels decide who is meshed.
    ApiCall {
        group: "",
        resource: "namespaces",
        verbs: &["list", "watch"],
    },
    // ClusterIP → endpoints, so traffic to a Service's VIP is meshed.
    ApiCall {
        group: "",
        resource: "services",
        verbs: &["list", "watch"],
    },
    ApiCall {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
    },
    // Istio's policy objects; the CRD may be absent.
    ApiCall {
        group: "security.istio.io",
        resource: "peerauthentications",
        verbs: &["list", "watch"],
    },
];
