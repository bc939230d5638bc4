//! Services from the API: how a ClusterIP and port become a ready backend.
//!
//! The chain, as kube-proxy follows it:
//! 1. the Service whose `spec.clusterIPs` holds the address, and its port (TCP) with that
//!    number, which gives the port's *name*;
//! 2. the Service's EndpointSlices (label `kubernetes.io/service-name`), and in each the port
//!    with that name, which gives the number the backends listen on (a named `targetPort` is
//!    already resolved there, per pod, by the endpoints controller);
//! 3. the slice's endpoints whose `conditions.ready` is not false, IPv4 addresses.
//!
//! Headless Services (no ClusterIP) are not looked up here: their callers connect to pod
//! addresses themselves, which the mesh resolves as any pod; [`KubeServices`] only names the
//! Service for records. Both watches must have listed once before any answer: until then
//! every lookup is [`ServiceLookup::Unknown`] and connections fail closed.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use super::{ApiClient, EndpointSliceInfo, ServiceInfo, View, Watch};
use crate::services::{ServiceKey, ServiceLookup, ServiceSource, rotated};

/// The Services and EndpointSlices of the cluster, watched.
pub struct KubeServices {
    services: Watch<ServiceInfo>,
    slices: Watch<EndpointSliceInfo>,
    /// Slice keys by Service and by endpoint address, rebuilt when the slices view changes.
    index: Mutex<SliceIndex>,
    /// Bumped per lookup: successive connections start at successive backends.
    turn: AtomicUsize,
}

/// The slices of one slices view version, indexed so a lookup does not scan them all.
#[derive(Default)]
struct SliceIndex {
    version: Option<u64>,
    keys: Arc<SliceKeys>,
}

/// Slice keys by Service (`namespace/name`) and by endpoint address.
#[derive(Default)]
struct SliceKeys {
    by_service: BTreeMap<String, Vec<String>>,
    by_address: BTreeMap<IpAddr, Vec<String>>,
}

impl KubeServices {
    /// Starts both watches (must run inside the runtime).
    pub fn start(client: &ApiClient) -> Self {
        Self {
            services: client.watch_services(),
            slices: client.watch_endpoint_slices(),
            index: Mutex::default(),
            turn: AtomicUsize::new(0),
        }
    }

    fn slice_keys(&self, slices: &View<EndpointSliceInfo>) -> Arc<SliceKeys> {
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        if index.version != Some(slices.status.version) {
            *index = SliceIndex {
                version: Some(slices.status.version),
                keys: Arc::new(index_slices(slices)),
            };
        }
        index.keys.clone()
    }
}

impl ServiceSource for KubeServices {
    fn lookup(&self, destination: SocketAddrV4) -> ServiceLookup {
        let services = self.services.current();
        let slices = self.slices.current();
        if !services.status.synced || !slices.status.synced {
            return ServiceLookup::Unknown(
                "the watches of Services and EndpointSlices have not listed them yet".into(),
            );
        }
        let keys = self.slice_keys(&slices);
        match resolve(&services, &slices, &keys.by_service, destination) {
            ServiceLookup::Service { service, backends } => ServiceLookup::Service {
                service,
                backends: rotated(backends, self.turn.fetch_add(1, Ordering::Relaxed)),
            },
            other => other,
        }
    }

    fn headless_service_of(&self, backend: SocketAddrV4) -> Option<ServiceKey> {
        let slices = self.slices.current();
        let keys = self.slice_keys(&slices);
        headless_service(&self.services.current(), &slices, &keys, backend)
    }
}

/// The headless Service (no ClusterIP) with a ready endpoint at `backend`.
fn headless_service(
    services: &View<ServiceInfo>,
    slices: &View<EndpointSliceInfo>,
    keys: &SliceKeys,
    backend: SocketAddrV4,
) -> Option<ServiceKey> {
    let address = IpAddr::V4(*backend.ip());
    let candidates = keys.by_address.get(&address).into_iter().flatten();
    candidates
        .filter_map(|k| slices.objects.get(k))
        .find_map(|slice| {
            let name = slice.service.as_ref()?;
            let service = services
                .objects
                .get(&format!("{}/{name}", slice.namespace))?;
            let serves = service.cluster_ips.is_empty()
                && slice.ports.iter().any(|(_, port)| *port == backend.port())
                && slice
                    .endpoints
                    .iter()
                    .any(|e| e.ready && e.addresses.contains(&address));
            serves.then(|| ServiceKey {
                namespace: slice.namespace.clone(),
                name: name.clone(),
            })
        })
}

fn index_slices(slices: &View<EndpointSliceInfo>) -> SliceKeys {
    let mut keys = SliceKeys::default();
    for (key, slice) in slices.objects.iter() {
        if let Some(service) = &slice.service {
            keys.by_service
                .entry(format!("{}/{service}", slice.namespace))
                .or_default()
                .push(key.clone());
        }
        let addresses: std::collections::BTreeSet<&IpAddr> =
            slice.endpoints.iter().flat_map(|e| &e.addresses).collect();
        for address in addresses {
            keys.by_address
                .entry(*address)
                .or_default()
                .push(key.clone());
        }
    }
    keys
}

/// The chain of the module's documentation, on one snapshot of each watch; backends in a
/// stable order (slice key, then position).
fn resolve(
    services: &View<ServiceInfo>,
    slices: &View<EndpointSliceInfo>,
    slices_by_service: &BTreeMap<String, Vec<String>>,
    destination: SocketAddrV4,
) -> ServiceLookup {
    let found = services
        .with_ip(IpAddr::V4(*destination.ip()))
        .find_map(|service| {
            service
                .ports
                .iter()
                .find(|p| p.port == destination.port() && p.protocol.eq_ignore_ascii_case("TCP"))
                .map(|port| (service, port.name.as_str()))
        });
    let Some((service, port_name)) = found else {
        return ServiceLookup::NotAService;
    };
    let key = format!("{}/{}", service.namespace, service.name);
    let mut backends = Vec::new();
    for slice in slices_by_service
        .get(&key)
        .into_iter()
        .flatten()
        .filter_map(|k| slices.objects.get(k))
    {
        let Some(target_port) = slice
            .ports
            .iter()
            .find(|(name, _)| name == port_name)
            .map(|(_, port)| *port)
        else {
            continue;
        };
        for endpoint in slice.endpoints.iter().filter(|e| e.ready) {
            for address in &endpoint.addresses {
                if let IpAddr::V4(ip) = address {
                    let backend = SocketAddrV4::new(*ip, target_port);
                    if !backends.contains(&backend) {
                        backends.push(backend);
                    }
                }
            }
        }
    }
    ServiceLookup::Service {
        service: ServiceKey {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
        },
        backends,
    }
}

/// Runs the lookups of [`KubeServices`] on one snapshot of each watch, for the
/// `kube_objects` fuzz target (`super::fuzzing`).
#[cfg(fuzzing)]
pub(super) fn exercise(
    services: &View<ServiceInfo>,
    slices: &View<EndpointSliceInfo>,
    destinations: &[SocketAddrV4],
    backends: &[SocketAddrV4],
) {
    let keys = index_slices(slices);
    for destination in destinations {
        let _ = resolve(services, slices, &keys.by_service, *destination);
    }
    for backend in backends {
        let _ = headless_service(services, slices, &keys, *backend);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::{EndpointInfo, ServicePortInfo, WatchStatus};

    fn view<T: super::super::WatchObject>(objects: Vec<T>) -> View<T> {
        let mut by_ip: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
        for object in &objects {
            for ip in object.ips() {
                by_ip.entry(*ip).or_default().push(object.key());
            }
        }
        View {
            objects: Arc::new(objects.into_iter().map(|o| (o.key(), o)).collect()),
            by_ip: Arc::new(by_ip),
            status: WatchStatus {
                synced: true,
                ..WatchStatus::default()
            },
        }
    }

    fn service(name: &str, vip: Option<[u8; 4]>, ports: &[(&str, u16)]) -> ServiceInfo {
        ServiceInfo {
            namespace: "shop".into(),
            name: name.into(),
            cluster_ips: vip.map(IpAddr::from).into_iter().collect(),
            ports: ports
                .iter()
                .map(|(name, port)| ServicePortInfo {
                    name: (*name).into(),
                    protocol: "TCP".into(),
                    port: *port,
                })
                .collect(),
        }
    }

    fn endpoint(last: u8, ready: bool) -> EndpointInfo {
        EndpointInfo {
            addresses: vec![IpAddr::from([198, 19, 2, last])],
            ready,
            node: Some("node-2".into()),
            pod: None,
        }
    }

    fn slice(
        name: &str,
        service: &str,
        ports: &[(&str, u16)],
        endpoints: Vec<EndpointInfo>,
    ) -> EndpointSliceInfo {
        EndpointSliceInfo {
            namespace: "shop".into(),
            name: name.into(),
            service: Some(service.into()),
            ports: ports.iter().map(|(n, p)| ((*n).into(), *p)).collect(),
            endpoints,
        }
    }

    fn lookup(
        services: Vec<ServiceInfo>,
        slices: Vec<EndpointSliceInfo>,
        to: &str,
    ) -> ServiceLookup {
        let services = view(services);
        let slices = view(slices);
        let keys = index_slices(&slices);
        resolve(&services, &slices, &keys.by_service, to.parse().unwrap())
    }

    fn backends(lookup: ServiceLookup) -> Vec<String> {
        match lookup {
            ServiceLookup::Service { backends, .. } => {
                backends.iter().map(|b| b.to_string()).collect()
            }
            other => panic!("not a service: {other:?}"),
        }
    }

    #[test]
    fn a_vip_port_becomes_the_ready_endpoints_on_the_slice_port_of_the_same_name() {
        let services = vec![service(
            "web",
            Some([198, 18, 100, 1]),
            &[("http", 80), ("admin", 9000)],
        )];
        let slices = vec![
            slice(
                "web-a",
                "web",
                &[("http", 8080), ("admin", 9090)],
                vec![endpoint(10, true), endpoint(11, false)],
            ),
            // A named targetPort resolves per pod: another slice may carry another number.
            slice("web-b", "web", &[("http", 8081)], vec![endpoint(12, true)]),
            slice(
                "other",
                "other",
                &[("http", 7000)],
                vec![endpoint(13, true)],
            ),
        ];
        assert_eq!(
            backends(lookup(services.clone(), slices.clone(), "198.18.100.1:80")),
            ["198.19.2.10:8080", "198.19.2.12:8081"]
        );
        assert_eq!(
            backends(lookup(
                services.clone(),
                slices.clone(),
                "198.18.100.1:9000"
            )),
            ["198.19.2.10:9090"]
        );
        match lookup(services.clone(), slices.clone(), "198.18.100.1:80") {
            ServiceLookup::Service { service, .. } => assert_eq!(service.to_string(), "shop/web"),
            other => panic!("{other:?}"),
        }
        // Another port of the VIP, or another address: not a Service.
        assert_eq!(
            lookup(services.clone(), slices.clone(), "198.18.100.1:81"),
            ServiceLookup::NotAService
        );
        assert_eq!(
            lookup(services, slices, "198.19.2.10:8080"),
            ServiceLookup::NotAService
        );
    }

    #[test]
    fn a_single_unnamed_port_and_a_service_without_endpoints() {
        let services = vec![service("web", Some([198, 18, 100, 1]), &[("", 80)])];
        let slices = vec![slice(
            "web-a",
            "web",
            &[("", 8080)],
            vec![endpoint(10, true)],
        )];
        assert_eq!(
            backends(lookup(services.clone(), slices, "198.18.100.1:80")),
            ["198.19.2.10:8080"]
        );
        assert!(backends(lookup(services, Vec::new(), "198.18.100.1:80")).is_empty());
    }

    #[test]
    fn headless_services_are_not_vips_but_are_named_for_their_endpoints() {
        let services = vec![
            service("db", None, &[("sql", 5432)]),
            service("web", Some([198, 18, 100, 1]), &[("http", 80)]),
        ];
        let slices = vec![
            slice(
                "db-a",
                "db",
                &[("sql", 5432)],
                vec![endpoint(10, true), endpoint(11, false)],
            ),
            slice("web-a", "web", &[("http", 8080)], vec![endpoint(12, true)]),
        ];
        assert_eq!(
            lookup(services.clone(), slices.clone(), "198.19.2.10:5432"),
            ServiceLookup::NotAService
        );
        let (services, slices) = (view(services), view(slices));
        let keys = index_slices(&slices);
        let named = |to: &str| headless_service(&services, &slices, &keys, to.parse().unwrap());
        assert_eq!(
            named("198.19.2.10:5432").map(|k| k.to_string()).as_deref(),
            Some("shop/db")
        );
        // Not ready, another port, or an endpoint of a Service with a ClusterIP: no name.
        assert_eq!(named("198.19.2.11:5432"), None);
        assert_eq!(named("198.19.2.10:5433"), None);
        assert_eq!(named("198.19.2.12:8080"), None);
    }
}
