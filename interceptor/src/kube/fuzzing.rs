//! The entry point of the `kube_objects` fuzz target (`fuzz/`), built only under cargo-fuzz
//! (`--cfg fuzzing`): the agent's decoding of API objects is private to this module.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddrV4},
    sync::Arc,
};

use ::kube::api::DynamicObject;
use serde::Deserialize;

use super::{
    EndpointSliceInfo, NamespaceInfo, PodInfo, RawPeerAuthentication, ServiceInfo, View,
    WatchObject, WatchStatus, mesh, objects::api::ApiObject, services,
};

/// Decodes `bytes` as the watches would (one object, a JSON array of them, or a list with
/// `items`), converts every object to each kind the agent reads, and runs the pure functions
/// that read them: the mesh decision and reconciliation, the peer lookup, the Service chain
/// and the headless Service index. Any input must end without a panic.
pub fn decode_objects(bytes: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return;
    };
    let items = match value {
        serde_json::Value::Array(items) => items,
        serde_json::Value::Object(mut list) if list.contains_key("items") => {
            match list.remove("items") {
                Some(serde_json::Value::Array(items)) => items,
                _ => return,
            }
        }
        single => vec![single],
    };
    let (mut pods, mut namespaces, mut svcs, mut slices) = (vec![], vec![], vec![], vec![]);
    for item in items {
        if let Ok(object) = DynamicObject::deserialize(&item) {
            let _ = RawPeerAuthentication::from_api(&object);
        }
        let Ok(object) = ApiObject::deserialize(item) else {
            continue;
        };
        pods.extend(PodInfo::from_api(&object));
        namespaces.extend(NamespaceInfo::from_api(&object));
        svcs.extend(ServiceInfo::from_api(&object));
        slices.extend(EndpointSliceInfo::from_api(&object));
    }
    let pods = view(pods);
    let namespaces = view(namespaces);
    for pod in pods.objects.values() {
        let _ = mesh::decide(pod, namespaces.objects.get(&pod.namespace));
        let _ = pod.ipv4();
        for ip in &pod.ips {
            let _ = mesh::lookup(&pods, *ip, "cluster.local");
        }
    }
    let enrolled: BTreeSet<String> = pods.objects.keys().take(1).cloned().collect();
    let _ = mesh::reconcile(&enrolled, &pods, &namespaces, "cluster.local");
    let svcs = view(svcs);
    let slices = view(slices);
    let mut destinations = Vec::new();
    for service in svcs.objects.values() {
        for ip in &service.cluster_ips {
            if let IpAddr::V4(ip) = ip {
                destinations.extend(service.ports.iter().map(|p| SocketAddrV4::new(*ip, p.port)));
            }
        }
    }
    let mut backends = Vec::new();
    for slice in slices.objects.values() {
        for endpoint in &slice.endpoints {
            for address in &endpoint.addresses {
                if let IpAddr::V4(ip) = address {
                    backends.extend(slice.ports.iter().map(|(_, p)| SocketAddrV4::new(*ip, *p)));
                }
            }
        }
    }
    services::exercise(&svcs, &slices, &destinations, &backends);
}

/// A synced view of `objects`, as a watch publishes it.
fn view<T: WatchObject>(objects: Vec<T>) -> View<T> {
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
