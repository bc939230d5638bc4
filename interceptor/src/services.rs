//! Services as the outbound path sees them: a captured connect to a Service's virtual address
//! (a Kubernetes ClusterIP and port) stands for one of the Service's ready backends.
//!
//! Nothing else on the path turns a VIP into a pod: there is no kube-proxy rule the agent
//! relies on for meshed traffic, and a meshed backend must be reached over mutual TLS at its
//! own address, with its own identity checked. The outbound path asks a [`ServiceSource`]
//! first ([`ServiceSource::lookup`]); the standalone mode has none ([`NoServices`]), the
//! Kubernetes mode reads Services and EndpointSlices ([`crate::kube::KubeServices`]).

use std::{fmt, net::SocketAddrV4, sync::Arc};

use serde::{Deserialize, Serialize};

/// The cluster's DNS domain, as Istio's `destination_service` label spells a Service's host.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// A Service, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
}

impl ServiceKey {
    /// The Service's host name, `<name>.<namespace>.svc.cluster.local`.
    pub fn host(&self) -> String {
        format!("{}.{}.svc.{CLUSTER_DOMAIN}", self.name, self.namespace)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a destination address is, as far as Services go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceLookup {
    /// Not a Service's virtual address and port: the destination is what the caller asked.
    NotAService,
    /// A Service's port: its ready backends (address and target port), in the order to try.
    Service {
        /// Which Service.
        service: ServiceKey,
        /// Ready backends; empty when it has none.
        backends: Vec<SocketAddrV4>,
    },
    /// The source cannot tell yet (it has not listed the Services): the connection fails,
    /// as for an address the mesh cannot vouch for.
    Unknown(Arc<str>),
}

/// Where Services come from.
pub trait ServiceSource: Send + Sync {
    /// What `destination` is. Must not block: it runs on the connection path.
    fn lookup(&self, destination: SocketAddrV4) -> ServiceLookup;

    /// The headless Service whose ready endpoint `backend` is, to name it in records: a
    /// caller of a headless Service connects to a pod address itself.
    fn headless_service_of(&self, backend: SocketAddrV4) -> Option<ServiceKey>;
}

/// The standalone mode: there are no Services, every destination is what it says.
pub struct NoServices;

impl ServiceSource for NoServices {
    fn lookup(&self, _destination: SocketAddrV4) -> ServiceLookup {
        ServiceLookup::NotAService
    }

    fn headless_service_of(&self, _backend: SocketAddrV4) -> Option<ServiceKey> {
        None
    }
}

/// `backends` rotated to start at `turn` (modulo their number), so that successive
/// connections spread over them and a failed one is followed by the next.
pub fn rotated(mut backends: Vec<SocketAddrV4>, turn: usize) -> Vec<SocketAddrV4> {
    if !backends.is_empty() {
        let start = turn % backends.len();
        backends.rotate_left(start);
    }
    backends
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn hosts_follow_the_cluster_dns() {
        let key = ServiceKey {
            namespace: "vehicles".into(),
            name: "tracker".into(),
        };
        assert_eq!(key.host(), "tracker.vehicles.svc.cluster.local");
        assert_eq!(key.to_string(), "vehicles/tracker");
    }

    #[test]
    fn rotation_starts_at_the_turn_and_keeps_every_backend() {
        let backends: Vec<SocketAddrV4> = (1..=3)
            .map(|i| SocketAddrV4::new(Ipv4Addr::new(198, 19, 2, i), 8080))
            .collect();
        let firsts: Vec<u8> = (0..4)
            .map(|turn| rotated(backends.clone(), turn)[0].ip().octets()[3])
            .collect();
        assert_eq!(firsts, [1, 2, 3, 1]);
        let mut all = rotated(backends.clone(), 5);
        all.sort();
        assert_eq!(all, backends);
        assert!(rotated(Vec::new(), 3).is_empty());
    }
}
