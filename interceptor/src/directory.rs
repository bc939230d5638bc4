//! The mesh directory: which addresses belong to meshed workloads, and who they are.
//!
//! A client agent must know, before it connects, whether a destination is in the mesh (then it
//! must use mutual TLS, never plaintext) and which identity the destination must present. In
//! Kubernetes that comes from the API server; here agents share a directory (one JSON file per
//! workload address), which the lab places on the host and a DaemonSet would place on a shared
//! volume. Each agent publishes the workloads it enrolls and reads the others'.

use std::{
    collections::HashMap,
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::{
    fsutil,
    mesh::{Membership, MeshError, MeshPeer, MeshSource},
    workloads::WorkloadKey,
};

/// One meshed workload as published in the directory (`<ip>.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryEntry {
    /// The workload's address.
    pub ip: Ipv4Addr,
    /// SPIFFE identity the workload's agent presents for it.
    pub identity: String,
    /// namespace/name of the workload.
    pub workload: WorkloadKey,
    /// The node whose agent serves it.
    pub node: String,
}

/// A directory of [`DirectoryEntry`] files shared by the agents of a mesh.
#[derive(Clone, Debug)]
pub struct MeshDirectory {
    dir: PathBuf,
}

impl MeshDirectory {
    /// Opens (and creates) the directory.
    pub fn open(dir: &Path) -> Result<Self, MeshError> {
        std::fs::create_dir_all(dir).map_err(|source| MeshError::Io {
            path: dir.to_owned(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The membership one entry file gives: an unreadable or inconsistent entry is
    /// [`Membership::Unknown`], never "outside", so a meshed destination is never downgraded.
    fn read_entry(&self, ip: Ipv4Addr) -> Membership {
        match std::fs::read(self.entry_path(ip)) {
            Ok(bytes) => membership_of(ip, &bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Membership::Outside,
            Err(e) => Membership::Unknown(
                format!(
                    "mesh directory entry for {ip}: {}",
                    crate::limits::explain(e)
                )
                .into(),
            ),
        }
    }

    fn entry_path(&self, ip: Ipv4Addr) -> PathBuf {
        self.dir.join(format!("{ip}.json"))
    }
}

/// Decodes one entry file's bytes for `ip`.
pub fn membership_of(ip: Ipv4Addr, bytes: &[u8]) -> Membership {
    let unknown =
        |why: String| Membership::Unknown(format!("mesh directory entry for {ip}: {why}").into());
    let entry: DirectoryEntry = match serde_json::from_slice(bytes) {
        Ok(entry) => entry,
        Err(e) => return unknown(e.to_string()),
    };
    if entry.ip != ip {
        return unknown(format!("the file names {}", entry.ip));
    }
    match entry.identity.parse() {
        Ok(identity) => Membership::Meshed(Arc::new(MeshPeer {
            identity,
            workload: entry.workload,
            node: entry.node,
        })),
        Err(e) => unknown(format!("identity {:?}: {e}", entry.identity)),
    }
}

impl MeshSource for MeshDirectory {
    fn announce(&self, ip: Ipv4Addr, peer: &MeshPeer) -> Result<(), MeshError> {
        let entry = DirectoryEntry {
            ip,
            identity: peer.identity.to_string(),
            workload: peer.workload.clone(),
            node: peer.node.clone(),
        };
        let path = self.entry_path(ip);
        let bytes = serde_json::to_vec(&entry).map_err(io::Error::other);
        bytes
            .and_then(|bytes| fsutil::write_atomically(&path, &bytes))
            .map_err(|source| MeshError::Io { path, source })
    }

    fn withdraw(&self, ip: Ipv4Addr) -> Result<(), MeshError> {
        let path = self.entry_path(ip);
        match std::fs::remove_file(&path) {
            Err(source) if source.kind() != io::ErrorKind::NotFound => {
                Err(MeshError::Io { path, source })
            }
            _ => Ok(()),
        }
    }

    fn snapshot(&self) -> HashMap<Ipv4Addr, Membership> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return HashMap::new();
        };
        entries
            .filter_map(|entry| {
                let name = entry.ok()?.file_name();
                let ip: Ipv4Addr = name.to_str()?.strip_suffix(".json")?.parse().ok()?;
                Some((ip, self.read_entry(ip)))
            })
            .filter(|(_, membership)| *membership != Membership::Outside)
            .collect()
    }

    fn confirm(&self, ip: Ipv4Addr) -> Membership {
        self.read_entry(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announce_confirm_snapshot_withdraw() {
        let dir = std::env::temp_dir().join(format!("icpt-dir-{}", std::process::id()));
        let directory = MeshDirectory::open(&dir).unwrap();
        let ip = Ipv4Addr::new(198, 19, 1, 2);
        assert_eq!(directory.confirm(ip), Membership::Outside);
        let peer = MeshPeer {
            identity: "spiffe://cluster.local/ns/default/sa/web".parse().unwrap(),
            workload: WorkloadKey {
                namespace: "default".into(),
                name: "web".into(),
            },
            node: "node-1".into(),
        };
        directory.announce(ip, &peer).unwrap();
        let meshed = Membership::Meshed(Arc::new(peer));
        assert_eq!(directory.confirm(ip), meshed);

        // Unreadable, mislabelled and badly named entries are unknown, never outside.
        let broken = Ipv4Addr::new(198, 19, 1, 3);
        std::fs::write(dir.join("198.19.1.3.json"), b"{").unwrap();
        assert!(matches!(directory.confirm(broken), Membership::Unknown(_)));
        let mislabelled = Ipv4Addr::new(198, 19, 1, 4);
        let other = std::fs::read(dir.join("198.19.1.2.json")).unwrap();
        std::fs::write(dir.join("198.19.1.4.json"), other).unwrap();
        assert!(matches!(
            directory.confirm(mislabelled),
            Membership::Unknown(_)
        ));

        let snapshot = directory.snapshot();
        assert_eq!(snapshot.get(&ip), Some(&meshed));
        assert!(matches!(
            snapshot.get(&broken),
            Some(Membership::Unknown(_))
        ));
        assert_eq!(snapshot.len(), 3);

        directory.withdraw(ip).unwrap();
        directory.withdraw(ip).unwrap();
        assert_eq!(directory.confirm(ip), Membership::Outside);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
