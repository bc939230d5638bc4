//! The mesh directory: which addresses belong to meshed workloads, and who they are.
//!
//! A client agent must know, before it connects, whether a destination is in the mesh (then it
//! must use mutual TLS, never plaintext) and which identity the destination must present. In
//! Kubernetes that comes from the API server; here agents share a directory (one JSON file per
//! workload address), which the lab places on the host and a DaemonSet would place on a shared
//! volume. Each agent publishes the workloads it enrolls and reads the others'.

use std::{
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::workloads::WorkloadKey;

/// One meshed workload as published in the directory.
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
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            io::Error::new(e.kind(), format!("mesh directory {}: {e}", dir.display()))
        })?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Publishes a workload of this node.
    pub fn publish(&self, entry: &DirectoryEntry) -> io::Result<()> {
        let path = self.entry_path(entry.ip);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(entry)?)?;
        // Rename so readers never see a half-written file.
        std::fs::rename(&tmp, &path)
    }

    /// Withdraws a workload.
    pub fn withdraw(&self, ip: Ipv4Addr) -> io::Result<()> {
        match std::fs::remove_file(self.entry_path(ip)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The meshed workload at `ip`, if any. An unreadable entry is an error, not "not meshed",
    /// so a destination in the mesh is never downgraded to plaintext by accident.
    pub fn lookup(&self, ip: Ipv4Addr) -> io::Result<Option<DirectoryEntry>> {
        match std::fs::read(self.entry_path(ip)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io::Error::other(format!("mesh directory entry for {ip}: {e}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn entry_path(&self, ip: Ipv4Addr) -> PathBuf {
        self.dir.join(format!("{ip}.json"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_lookup_withdraw() {
        let dir = std::env::temp_dir().join(format!("icpt-dir-{}", std::process::id()));
        let directory = MeshDirectory::open(&dir).unwrap();
        let ip = Ipv4Addr::new(198, 19, 1, 2);
        assert_eq!(directory.lookup(ip).unwrap(), None);
        let entry = DirectoryEntry {
            ip,
            identity: "spiffe://cluster.local/ns/default/sa/web".into(),
            workload: WorkloadKey {
                namespace: "default".into(),
                name: "web".into(),
            },
            node: "node-1".into(),
        };
        directory.publish(&entry).unwrap();
        assert_eq!(directory.lookup(ip).unwrap(), Some(entry));
        std::fs::write(dir.join("198.19.1.3.json"), b"{").unwrap();
        assert!(directory.lookup(Ipv4Addr::new(198, 19, 1, 3)).is_err());
        directory.withdraw(ip).unwrap();
        assert_eq!(directory.lookup(ip).unwrap(), None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
