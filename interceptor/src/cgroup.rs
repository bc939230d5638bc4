//! Finding the cgroup v2 hierarchy.

use std::{io, path::PathBuf};

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
