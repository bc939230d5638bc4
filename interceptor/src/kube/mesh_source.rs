//! The mesh as the API server tells it: a [`MeshSource`] over the watch of enrolled pods.
//!
//! Peers' entries come from [`ApiClient::watch_enrolled_pods`] through [`lookup`]: an address
//! is meshed once a pod carrying it holds the enrolled marker that its node's agent wrote
//! ([`super::node_pods`] writes it after enrolling). Until the watch has listed the enrolled
//! pods once, and whenever the marker is contradictory, an address is
//! [`Membership::Unknown`]: the connection fails, it is never downgraded to plaintext.
//!
//! This node's own workloads are listed from `announce` at once, before their marker has
//! made the round trip through the API server, so local calls need not wait for it.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
};

use super::{
    ApiClient, PodInfo, View, Watch,
    mesh::{MeshLookup, lookup},
};
use crate::{
    mesh::{Membership, MeshError, MeshPeer, MeshSource},
    sync::lock,
    workloads::WorkloadKey,
};

/// A [`MeshSource`] fed by the API server.
pub struct KubeMeshSource {
    enrolled: Watch<PodInfo>,
    trust_domain: String,
    /// This node's workloads, as announced.
    local: Mutex<HashMap<Ipv4Addr, MeshPeer>>,
}

impl KubeMeshSource {
    /// Starts the watch of enrolled pods (must run inside the runtime); addresses are
    /// `Unknown` until it has listed them.
    pub fn start(client: &ApiClient, trust_domain: &str) -> Self {
        Self {
            enrolled: client.watch_enrolled_pods(),
            trust_domain: trust_domain.to_owned(),
            local: Mutex::default(),
        }
    }

    fn membership(&self, view: &View<PodInfo>, ip: Ipv4Addr) -> Membership {
        match lookup(view, IpAddr::V4(ip), &self.trust_domain) {
            MeshLookup::NotMeshed => Membership::Outside,
            MeshLookup::Unknown(reason) => Membership::Unknown(reason.into()),
            MeshLookup::Meshed { identity, pod } => {
                let found = view.with_ip(IpAddr::V4(ip)).find(|p| p.full_name() == pod);
                let Some(found) = found else {
                    return Membership::Unknown(format!("{pod} left the view").into());
                };
                Membership::Meshed(Arc::new(MeshPeer {
                    identity,
                    workload: WorkloadKey {
                        namespace: found.namespace.clone(),
                        name: found.name.clone(),
                    },
                    node: found.node.clone().unwrap_or_default(),
                }))
            }
        }
    }
}

impl MeshSource for KubeMeshSource {
    /// Lists the workload at once; its marker on the pod object is written by the pod source,
    /// which holds the object (UID precondition) the patch needs.
    fn announce(&self, ip: Ipv4Addr, peer: &MeshPeer) -> Result<(), MeshError> {
        lock(&self.local).insert(ip, peer.clone());
        Ok(())
    }

    fn withdraw(&self, ip: Ipv4Addr) -> Result<(), MeshError> {
        lock(&self.local).remove(&ip);
        Ok(())
    }

    fn snapshot(&self) -> HashMap<Ipv4Addr, Membership> {
        let view = self.enrolled.current();
        let mut entries = HashMap::new();
        if view.status.synced {
            for ip in view.by_ip.keys() {
                if let IpAddr::V4(v4) = ip {
                    entries.insert(*v4, self.membership(&view, *v4));
                }
            }
        }
        // Unlisted addresses are confirmed one by one, and stay Unknown before the first sync.
        entries.retain(|_, m| *m != Membership::Outside);
        for (ip, peer) in lock(&self.local).iter() {
            entries.insert(*ip, Membership::Meshed(Arc::new(peer.clone())));
        }
        entries
    }

    fn confirm(&self, ip: Ipv4Addr) -> Membership {
        if let Some(peer) = lock(&self.local).get(&ip) {
            return Membership::Meshed(Arc::new(peer.clone()));
        }
        self.membership(&self.enrolled.current(), ip)
    }
}
