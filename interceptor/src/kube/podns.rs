//! Finding a pod's network namespace from its cgroup.
//!
//! Kubernetes does not tell a node agent where a pod's network namespace is. As istio-cni does
//! for pods that already run, look at the processes in the pod's cgroup (its child scopes: on
//! cgroup v2 the pod cgroup itself holds none) and take the namespace of the oldest one (the
//! sandbox's pause process, when there is one). Two safeguards:
//! - the node's own namespace (the agent's, and PID 1's) is never a pod's: a hostNetwork pod,
//!   or a privileged process passing through, would otherwise enroll the node;
//! - a namespace is accepted only if it holds one of the pod's IPs (read inside it), so a
//!   process that joined another namespace cannot give the pod a wrong one.
//!
//! Candidates are tried oldest first; the first that passes wins.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    net::IpAddr,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

use super::cgroup::{parse_proc_cgroup, pod_uid_from_cgroup_path, processes_below};

/// A pod's network namespace, held open.
#[derive(Debug)]
pub struct FoundNetns {
    /// The process it was found through.
    pub pid: u32,
    /// `/proc/<pid>/ns/net`: valid only while that process lives; prefer [`Self::file`].
    pub path: PathBuf,
    /// The namespace, open: it stays valid after the process exits.
    pub file: File,
    /// The namespace's inode number (what `ip netns identify` and `lsns` show).
    pub inode: u64,
    /// The addresses found inside it.
    pub addresses: Vec<IpAddr>,
}

/// Why no network namespace was found for a pod.
#[derive(Debug, thiserror::Error)]
pub enum PodNetnsError {
    /// No process in the pod's cgroup tree (not started yet, or CRI-O without an infra
    /// container between restarts): look again later.
    #[error("no process in pod cgroup {} or below it yet", cgroup.display())]
    NoProcess {
        /// The pod cgroup.
        cgroup: PathBuf,
    },
    /// Every process in the pod's cgroup is in the node's network namespace.
    #[error(
        "the processes in pod cgroup {} are all in the node's network namespace; a \
         hostNetwork pod is never enrolled",
        cgroup.display()
    )]
    HostNetns {
        /// The pod cgroup.
        cgroup: PathBuf,
    },
    /// The namespaces found hold none of the pod's addresses.
    #[error(
        "no network namespace of the processes in {} holds the pod's address {ips:?} (seen: \
         {seen:?}); not enrolling it with a wrong namespace",
        cgroup.display()
    )]
    NoMatchingAddress {
        /// The pod cgroup.
        cgroup: PathBuf,
        /// The pod's addresses from the API.
        ips: Vec<IpAddr>,
        /// (pid, addresses) of each candidate namespace.
        seen: Vec<(u32, Vec<IpAddr>)>,
    },
    /// Reading the cgroup tree or the node's namespace failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being read.
        context: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

/// Finds the network namespace of the pod whose cgroup is `pod_cgroup` and whose addresses
/// (from the API) are `pod_ips`.
pub fn find_pod_netns(pod_cgroup: &Path, pod_ips: &[IpAddr]) -> Result<FoundNetns, PodNetnsError> {
    let io_error = |context: String| move |source| PodNetnsError::Io { context, source };
    // The node's namespace: the agent's own (it runs with hostNetwork), and PID 1's when this
    // process may look at it (with hostPID; a sandbox may forbid it).
    let own = std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .map_err(io_error(
            "the agent's network namespace (/proc/self/ns/net)".into(),
        ))?;
    let mut host = vec![own];
    match std::fs::metadata("/proc/1/ns/net") {
        Ok(init) => host.push(init.ino()),
        Err(e) => tracing::debug!("PID 1's network namespace: {e}; using the agent's only"),
    }
    let pids = processes_below(pod_cgroup)
        .map_err(io_error(format!("pod cgroup {}", pod_cgroup.display())))?;
    if pids.is_empty() {
        return Err(PodNetnsError::NoProcess {
            cgroup: pod_cgroup.to_owned(),
        });
    }
    // The pod UID the cgroup names, to check each process is still the pod's after its
    // namespace is opened (a PID can be reused in between).
    let uid = pod_cgroup.to_str().and_then(pod_uid_from_cgroup_path);
    // Oldest process per namespace.
    let mut oldest: BTreeMap<u64, (u64, u32, File)> = BTreeMap::new();
    for pid in pids {
        let Some((start, file)) = open_netns(pid, uid.as_deref()) else {
            continue; // exited meanwhile
        };
        let Ok(inode) = file.metadata().map(|m| m.ino()) else {
            continue;
        };
        if oldest.get(&inode).is_none_or(|(s, _, _)| start < *s) {
            oldest.insert(inode, (start, pid, file));
        }
    }
    let mut candidates: Vec<(u64, u64, u32, File)> = oldest
        .into_iter()
        .filter(|(inode, _)| !host.contains(inode))
        .map(|(inode, (start, pid, file))| (start, inode, pid, file))
        .collect();
    if candidates.is_empty() {
        return Err(PodNetnsError::HostNetns {
            cgroup: pod_cgroup.to_owned(),
        });
    }
    candidates.sort_by_key(|(start, inode, ..)| (*start, *inode));
    let mut seen = Vec::new();
    for (_, inode, pid, file) in candidates {
        let addresses = match netns_addresses(&file) {
            Ok(addresses) => addresses,
            Err(e) => {
                tracing::debug!(pid, "reading the addresses of its network namespace: {e}");
                continue;
            }
        };
        if addresses.iter().any(|a| pod_ips.contains(a)) {
            return Ok(FoundNetns {
                pid,
                path: PathBuf::from(format!("/proc/{pid}/ns/net")),
                file,
                inode,
                addresses,
            });
        }
        seen.push((pid, addresses));
    }
    Err(PodNetnsError::NoMatchingAddress {
        cgroup: pod_cgroup.to_owned(),
        ips: pod_ips.to_vec(),
        seen,
    })
}

/// Opens a process's network namespace; with its start time (clock ticks since boot). `None`
/// if the process is gone, or no longer in the pod `uid`'s cgroup.
fn open_netns(pid: u32, uid: Option<&str>) -> Option<(u64, File)> {
    let start = start_time(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let file = File::open(format!("/proc/{pid}/ns/net")).ok()?;
    // Read after opening: if the PID was reused before the open, this is the new process's
    // cgroup (or its start time differs), and it is skipped.
    if let Some(uid) = uid {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let path = parse_proc_cgroup(&cgroup)?;
        if pod_uid_from_cgroup_path(path).as_deref() != Some(uid) {
            return None;
        }
    }
    let again = start_time(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    (again == start).then_some((start, file))
}

/// Field 22 (`starttime`) of `/proc/PID/stat`. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted after its last `)`.
fn start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // rest starts with field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The addresses of all interfaces in a network namespace, read from inside it (on a
/// short-lived thread, so no other thread changes namespace).
pub fn netns_addresses(netns: &File) -> io::Result<Vec<IpAddr>> {
    let netns = netns.try_clone()?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> io::Result<Vec<IpAddr>> {
                setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                let addresses = nix::ifaddrs::getifaddrs()
                    .map_err(io::Error::from)?
                    .filter_map(|ifaddr| {
                        let address = ifaddr.address?;
                        if let Some(v4) = address.as_sockaddr_in() {
                            Some(IpAddr::V4(v4.ip()))
                        } else {
                            address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                        }
                    })
                    .collect();
                Ok(addresses)
            })
            .join()
            .map_err(|_| io::Error::other("the thread reading a namespace's addresses panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat =
            "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time(stat), Some(987_654));
        assert_eq!(start_time("12 (x) S 1"), None);
    }

    #[test]
    fn own_start_time_is_readable() {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(start_time(&stat).is_some_and(|t| t > 0));
    }
}
