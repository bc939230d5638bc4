//! Finding the cgroup v2 hierarchy, and the agent's own place in it.

use std::{io, os::unix::fs::MetadataExt, path::PathBuf};

/// The mount point of the cgroup v2 hierarchy, read from /proc/mounts (it is
/// `/sys/fs/cgroup` on unified hosts and `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(target))
        })
        .next()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup2 filesystem in /proc/mounts; interceptor needs cgroup v2",
            )
        })
}

/// The cgroup v2 group this process runs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnCgroup {
    /// Its directory under a cgroup2 mount.
    pub dir: PathBuf,
    /// Its id: the directory's inode number, which is what the kernel's
    /// `bpf_get_current_cgroup_id` returns for tasks in it.
    pub id: u64,
}

/// The agent's own cgroup could not be found.
#[derive(Debug, thiserror::Error)]
pub enum OwnCgroupError {
    /// A file under /proc or the cgroup directory could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file at fault.
        path: PathBuf,
        /// What the kernel said.
        source: io::Error,
    },
    /// `/proc/self/cgroup` has no `0::` line.
    #[error("/proc/self/cgroup has no cgroup v2 line (`0::`); interceptor needs cgroup v2")]
    NoV2Line,
    /// No cgroup2 mount shows the cgroup, or the directory found does not hold this process.
    #[error(
        "the agent's cgroup `{path}` (from /proc/self/cgroup) is not a directory holding this \
         process under any cgroup2 mount in /proc/self/mountinfo; run the agent in the host's \
         cgroup namespace (a privileged container does) with the host's cgroup2 filesystem \
         mounted"
    )]
    NotVisible {
        /// The path `/proc/self/cgroup` gave.
        path: String,
    },
}

/// Finds this process's cgroup v2 directory and id, from `/proc/self/cgroup` and the cgroup2
/// mounts of `/proc/self/mountinfo` (both are relative to the same cgroup namespace root).
/// The directory is accepted only if its `cgroup.procs` lists this process.
pub fn own_cgroup() -> Result<OwnCgroup, OwnCgroupError> {
    let read = |path: &str| {
        std::fs::read_to_string(path).map_err(|source| OwnCgroupError::Read {
            path: path.into(),
            source,
        })
    };
    let proc_cgroup = read("/proc/self/cgroup")?;
    let path = proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or(OwnCgroupError::NoV2Line)?;
    let pid = std::process::id().to_string();
    for dir in cgroup_dirs(path, &read("/proc/self/mountinfo")?) {
        let procs = dir.join("cgroup.procs");
        let Ok(members) = std::fs::read_to_string(&procs) else {
            continue;
        };
        if members.lines().any(|line| line == pid) {
            let meta = std::fs::metadata(&dir).map_err(|source| OwnCgroupError::Read {
                path: dir.clone(),
                source,
            })?;
            return Ok(OwnCgroup {
                dir,
                id: meta.ino(),
            });
        }
    }
    Err(OwnCgroupError::NotVisible {
        path: path.to_owned(),
    })
}

/// The directories that can be the cgroup `path` (a `0::` path of `/proc/self/cgroup`), one
/// per cgroup2 mount of `mountinfo` whose root is `path` or one of its ancestors. A mount
/// whose root lies outside the reader's cgroup namespace (`/../..`) cannot be mapped.
fn cgroup_dirs(path: &str, mountinfo: &str) -> Vec<PathBuf> {
    let components = |p: &str| -> Option<Vec<String>> {
        let parts: Vec<String> = p
            .split('/')
            .filter(|c| !c.is_empty())
            .map(unescape_mountinfo)
            .collect();
        (!parts.iter().any(|c| c == "..")).then_some(parts)
    };
    let Some(target) = components(path) else {
        return Vec::new();
    };
    mountinfo
        .lines()
        .filter_map(|line| {
            let (fields, fs) = line.split_once(" - ")?;
            if fs.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let mut fields = fields.split_whitespace().skip(3);
            let (root, mount_point) = (fields.next()?, fields.next()?);
            let root = components(root)?;
            let below = target.strip_prefix(root.as_slice())?;
            let mut dir = PathBuf::from(unescape_mountinfo(mount_point));
            dir.extend(below);
            Some(dir)
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape_mountinfo(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(digits) => {
                out.push(
                    digits
                        .iter()
                        .fold(0u8, |v, d| v.wrapping_mul(8) + (d - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIFIED: &str = "\
22 1 0:21 / / rw - ext4 /dev/sda1 rw
30 22 0:26 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
";
    const HYBRID: &str = "\
25 22 0:23 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/memory rw shared:11 - cgroup cgroup rw,memory
";

    #[test]
    fn the_cgroup_is_found_under_unified_and_hybrid_mounts() {
        let path = "/kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope";
        assert_eq!(
            cgroup_dirs(path, UNIFIED),
            [PathBuf::from("/sys/fs/cgroup").join(&path[1..])]
        );
        assert_eq!(
            cgroup_dirs(path, HYBRID),
            [PathBuf::from("/sys/fs/cgroup/unified").join(&path[1..])]
        );
        assert_eq!(cgroup_dirs("/", UNIFIED), [PathBuf::from("/sys/fs/cgroup")]);
    }

    #[test]
    fn a_mount_of_a_subtree_maps_only_the_paths_below_it() {
        let mountinfo = "\
40 22 0:26 /kubepods.slice /host/pods rw - cgroup2 cgroup2 rw
41 22 0:26 /system.slice /host/system rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup_dirs("/kubepods.slice/a/agent", mountinfo),
            [PathBuf::from("/host/pods/a/agent")]
        );
        // A sibling whose name starts the same is not below the mount's root.
        assert!(cgroup_dirs("/kubepods.slice-x/agent", mountinfo).is_empty());
    }

    #[test]
    fn mounts_from_outside_a_cgroup_namespace_cannot_be_mapped() {
        // A private cgroup namespace with the host's hierarchy bind-mounted: the mount's root
        // is above the namespace's root and the own path is `/`.
        let mountinfo = "50 22 0:26 /../../.. /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert!(cgroup_dirs("/", mountinfo).is_empty());
        assert!(cgroup_dirs("/../x", UNIFIED).is_empty());
        assert!(cgroup_dirs("/a", "").is_empty());
    }

    #[test]
    fn escaped_mount_points_are_decoded() {
        let mountinfo = "30 22 0:26 / /mnt/cgroup\\040two rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup_dirs("/a", mountinfo),
            [PathBuf::from("/mnt/cgroup two/a")]
        );
    }

    /// Needs cgroup v2, like the agent.
    #[test]
    fn this_process_finds_its_own_cgroup() {
        let own = own_cgroup().expect("own cgroup");
        assert!(own.dir.starts_with(cgroup2_mount().unwrap()), "{own:?}");
        let procs = std::fs::read_to_string(own.dir.join("cgroup.procs")).unwrap();
        assert!(procs.lines().any(|l| l == std::process::id().to_string()));
    }
}
