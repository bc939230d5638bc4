//! What the mesh looks like, as the connection path needs it: which addresses are meshed, and
//! which identity each must present.
//!
//! Two halves, so the connection path never blocks and never takes an agent-wide lock:
//! - [`MeshView`], an in-memory snapshot (an `Arc` swapped under a lock held only for the swap)
//!   that outbound and inbound read per connection;
//! - a [`MeshSource`] behind it that this node announces its own workloads to and that fills the
//!   view: today the shared directory ([`crate::directory::MeshDirectory`]), next the Kubernetes
//!   API.
//!
//! The fail-closed rule lives here: an address whose entry the source could not read is
//! [`Membership::Unknown`], and the connection fails; it is never taken for "outside the mesh".

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{Arc, RwLock},
};

use crate::{identity::Identity, workloads::WorkloadKey};

/// A meshed workload as every agent of the mesh sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshPeer {
    /// The SPIFFE identity its agent must present for it.
    pub identity: Identity,
    /// namespace/name of the workload.
    pub workload: WorkloadKey,
    /// The node whose agent serves it.
    pub node: String,
}

/// What the mesh says about one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Membership {
    /// A meshed workload: reach it over mutual TLS only, and it must be this peer.
    Meshed(Arc<MeshPeer>),
    /// Not in the mesh: plaintext.
    Outside,
    /// The source has an entry for it but cannot read it; the connection must fail.
    Unknown(Arc<str>),
}

/// Errors of a [`MeshSource`].
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The source's storage failed (the directory's files).
    #[error("mesh directory {path}: {source}")]
    Io {
        /// The file or directory at fault.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Where the mesh's membership comes from, and where this node announces its workloads.
pub trait MeshSource: Send + Sync + 'static {
    /// Says that this node serves `peer` at `ip`.
    fn announce(&self, ip: Ipv4Addr, peer: &MeshPeer) -> Result<(), MeshError>;
    /// Says that this node no longer serves `ip`.
    fn withdraw(&self, ip: Ipv4Addr) -> Result<(), MeshError>;
    /// Every address the source knows now, read from its storage. May block; the agent calls
    /// it off the async workers.
    fn snapshot(&self) -> HashMap<Ipv4Addr, Membership>;
    /// One address read from the source's storage now. May block; called off the async workers
    /// when the view does not list an address, so a workload announced a moment ago is never
    /// taken for outside the mesh.
    fn confirm(&self, ip: Ipv4Addr) -> Membership;
}

/// The in-memory view the connection path reads.
#[derive(Default)]
pub struct MeshView {
    entries: RwLock<Arc<HashMap<Ipv4Addr, Membership>>>,
}

impl MeshView {
    /// What the view says about `ip` (`Outside` when it lists nothing for it).
    pub fn lookup(&self, ip: Ipv4Addr) -> Membership {
        self.current()
            .get(&ip)
            .cloned()
            .unwrap_or(Membership::Outside)
    }

    /// Replaces the whole view.
    pub fn replace(&self, entries: HashMap<Ipv4Addr, Membership>) {
        *crate::sync::write(&self.entries) = Arc::new(entries);
    }

    /// Sets or clears (on `Outside`) one address.
    pub fn set(&self, ip: Ipv4Addr, membership: Membership) {
        let mut entries = crate::sync::write(&self.entries);
        let mut updated = HashMap::clone(&entries);
        match membership {
            Membership::Outside => updated.remove(&ip),
            other => updated.insert(ip, other),
        };
        *entries = Arc::new(updated);
    }

    fn current(&self) -> Arc<HashMap<Ipv4Addr, Membership>> {
        Arc::clone(&crate::sync::read(&self.entries))
    }
}

/// The view and its source together: what the proxies and the agent hold.
pub struct Mesh {
    view: MeshView,
    source: Arc<dyn MeshSource>,
}

impl Mesh {
    /// A mesh read from `source`, with the view filled from it once (this blocks).
    pub fn new(source: Arc<dyn MeshSource>) -> Self {
        let view = MeshView::default();
        view.replace(source.snapshot());
        Self { view, source }
    }

    /// The membership of `ip` for a new connection. The view answers at once for listed
    /// addresses; an unlisted one is confirmed with the source on a blocking thread, because
    /// "outside" means plaintext and must not come from a view that is a moment old.
    pub async fn resolve(self: &Arc<Self>, ip: Ipv4Addr) -> Membership {
        match self.view.lookup(ip) {
            Membership::Outside => {
                let mesh = Arc::clone(self);
                let confirmed = tokio::task::spawn_blocking(move || mesh.source.confirm(ip)).await;
                let membership = confirmed.unwrap_or_else(|e| {
                    Membership::Unknown(format!("mesh lookup of {ip} failed: {e}").into())
                });
                if membership != Membership::Outside {
                    self.view.set(ip, membership.clone());
                }
                membership
            }
            listed => listed,
        }
    }

    /// What the view lists for `ip` now, without confirming a miss; never blocks (for
    /// labelling records).
    pub fn cached(&self, ip: Ipv4Addr) -> Membership {
        self.view.lookup(ip)
    }

    /// Announces a workload of this node and lists it in the view.
    pub fn announce(&self, ip: Ipv4Addr, peer: MeshPeer) -> Result<(), MeshError> {
        self.source.announce(ip, &peer)?;
        self.view.set(ip, Membership::Meshed(Arc::new(peer)));
        Ok(())
    }

    /// Withdraws a workload of this node from the source and the view.
    pub fn withdraw(&self, ip: Ipv4Addr) -> Result<(), MeshError> {
        self.view.set(ip, Membership::Outside);
        self.source.withdraw(ip)
    }

    /// Refreshes the view from the source every `period`, so withdrawn and changed entries of
    /// other nodes are seen; runs until the task is aborted.
    pub async fn refresh(self: Arc<Self>, period: std::time::Duration) {
        loop {
            tokio::time::sleep(period).await;
            let mesh = Arc::clone(&self);
            if let Ok(entries) = tokio::task::spawn_blocking(move || mesh.source.snapshot()).await {
                self.view.replace(entries);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A source kept in memory, to test the view's rules without files.
    #[derive(Default)]
    struct Memory(Mutex<HashMap<Ipv4Addr, Membership>>);

    impl MeshSource for Memory {
        fn announce(&self, ip: Ipv4Addr, peer: &MeshPeer) -> Result<(), MeshError> {
            let peer = Membership::Meshed(Arc::new(peer.clone()));
            self.0.lock().unwrap().insert(ip, peer);
            Ok(())
        }
        fn withdraw(&self, ip: Ipv4Addr) -> Result<(), MeshError> {
            self.0.lock().unwrap().remove(&ip);
            Ok(())
        }
        fn snapshot(&self) -> HashMap<Ipv4Addr, Membership> {
            self.0.lock().unwrap().clone()
        }
        fn confirm(&self, ip: Ipv4Addr) -> Membership {
            self.0
                .lock()
                .unwrap()
                .get(&ip)
                .cloned()
                .unwrap_or(Membership::Outside)
        }
    }

    fn peer(name: &str) -> MeshPeer {
        MeshPeer {
            identity: "spiffe://cluster.local/ns/default/sa/web".parse().unwrap(),
            workload: WorkloadKey {
                namespace: "default".into(),
                name: name.into(),
            },
            node: "node-2".into(),
        }
    }

    #[tokio::test]
    async fn an_address_announced_after_the_last_refresh_is_never_taken_for_outside() {
        let source = Arc::new(Memory::default());
        let mesh = Arc::new(Mesh::new(source.clone()));
        let ip = Ipv4Addr::new(198, 19, 2, 2);
        assert_eq!(mesh.resolve(ip).await, Membership::Outside);
        // Another node announces it; this node's view has not been refreshed.
        source.announce(ip, &peer("web")).unwrap();
        assert_eq!(mesh.cached(ip), Membership::Outside, "the view is stale");
        assert_eq!(
            mesh.resolve(ip).await,
            Membership::Meshed(Arc::new(peer("web")))
        );
        assert!(
            matches!(mesh.cached(ip), Membership::Meshed(_)),
            "the confirmed entry is now listed"
        );
    }

    #[tokio::test]
    async fn an_unreadable_entry_stays_unknown() {
        let source = Arc::new(Memory::default());
        let ip = Ipv4Addr::new(198, 19, 2, 3);
        source
            .0
            .lock()
            .unwrap()
            .insert(ip, Membership::Unknown("bad entry".into()));
        let mesh = Arc::new(Mesh::new(source));
        assert!(matches!(mesh.resolve(ip).await, Membership::Unknown(_)));
    }

    #[tokio::test]
    async fn withdraw_clears_the_view() {
        let source = Arc::new(Memory::default());
        let mesh = Arc::new(Mesh::new(source));
        let ip = Ipv4Addr::new(198, 19, 1, 2);
        mesh.announce(ip, peer("api")).unwrap();
        assert!(matches!(mesh.cached(ip), Membership::Meshed(_)));
        mesh.withdraw(ip).unwrap();
        assert_eq!(mesh.resolve(ip).await, Membership::Outside);
    }
}
