//! Where the kubelet puts pods in the cgroup v2 tree, and how to read it back.
//!
//! The kubelet makes one cgroup per pod, named from the pod's UID, under a QoS level:
//!
//! | driver | pod cgroup (Burstable / BestEffort) | Guaranteed |
//! |---|---|---|
//! | systemd | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid, - as _>.slice` | `kubepods.slice/kubepods-pod<uid_>.slice` |
//! | cgroupfs | `kubepods/burstable/pod<uid>` | `kubepods/pod<uid>` |
//!
//! kind (and any kubelet with `--cgroup-root=/kubelet`) nests the tree one level down:
//! `kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/…` (systemd: a
//! slice's name spells its whole path) or `kubelet/kubepods/besteffort/pod<uid>`. The
//! containers are child cgroups of the pod's (`cri-containerd-<id>.scope`, `crio-<id>.scope`,
//! or `<id>`); on cgroup v2 the pod cgroup itself holds no process.

use std::{
    io,
    path::{Path, PathBuf},
};

use super::QosClass;

/// The kubelet's cgroup driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// `--cgroup-driver=systemd`: slices named after their path.
    Systemd,
    /// `--cgroup-driver=cgroupfs`: plain directories.
    Cgroupfs,
}

/// The cgroup that holds all pods of the node (`kubepods.slice`, `kubepods`, …).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodsRoot {
    /// Its directory in the cgroup v2 filesystem.
    pub dir: PathBuf,
    /// The layout of the cgroups under it.
    pub driver: Driver,
}

/// The layouts [`detect_pods_root`] tries, relative to the cgroup v2 mount, in order.
pub const LAYOUTS: [(&str, Driver); 4] = [
    ("kubepods.slice", Driver::Systemd),
    ("kubepods", Driver::Cgroupfs),
    ("kubelet.slice/kubelet-kubepods.slice", Driver::Systemd),
    ("kubelet/kubepods", Driver::Cgroupfs),
];

/// No pods cgroup was found.
#[derive(Debug, thiserror::Error)]
#[error(
    "no kubelet pods cgroup under {}: looked for {}; pass --pods-cgroup DIR to name it",
    mount.display(),
    LAYOUTS.map(|(p, _)| p).join(", ")
)]
pub struct NoPodsRoot {
    /// The cgroup v2 mount searched.
    pub mount: PathBuf,
}

/// Finds the node's pods cgroup under the cgroup v2 mount: the first of [`LAYOUTS`] that
/// holds a pod cgroup, else the first that exists.
pub fn detect_pods_root(cgroup2_mount: &Path) -> Result<PodsRoot, NoPodsRoot> {
    let existing: Vec<PodsRoot> = LAYOUTS
        .iter()
        .map(|(path, driver)| PodsRoot {
            dir: cgroup2_mount.join(path),
            driver: *driver,
        })
        .filter(|root| root.dir.is_dir())
        .collect();
    existing
        .iter()
        .find(|root| root.has_pods())
        .or(existing.first())
        .cloned()
        .ok_or_else(|| NoPodsRoot {
            mount: cgroup2_mount.to_owned(),
        })
}

impl PodsRoot {
    /// A pods cgroup given by hand (`--pods-cgroup`): systemd when its name ends in `.slice`.
    pub fn from_dir(dir: &Path) -> Self {
        let systemd = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".slice"));
        Self {
            dir: dir.to_owned(),
            driver: if systemd {
                Driver::Systemd
            } else {
                Driver::Cgroupfs
            },
        }
    }

    /// The cgroup paths the pod can have, most likely first: its QoS class's when known,
    /// then the other classes'.
    pub fn pod_cgroup_candidates(&self, uid: &str, qos: Option<QosClass>) -> Vec<PathBuf> {
        let mut classes: Vec<QosClass> = qos.into_iter().collect();
        classes.extend(QosClass::ALL.iter().filter(|c| Some(**c) != qos));
        classes
            .into_iter()
            .map(|class| self.pod_cgroup(uid, class))
            .collect()
    }

    /// The pod's cgroup for one QoS class.
    pub fn pod_cgroup(&self, uid: &str, qos: QosClass) -> PathBuf {
        match self.driver {
            Driver::Systemd => {
                // A slice's name is its path: `kubepods` or `kubelet-kubepods`.
                let base = self
                    .dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".slice"))
                    .unwrap_or("kubepods");
                let uid = uid.replace('-', "_");
                match qos.cgroup_level() {
                    Some(level) => self
                        .dir
                        .join(format!("{base}-{level}.slice"))
                        .join(format!("{base}-{level}-pod{uid}.slice")),
                    None => self.dir.join(format!("{base}-pod{uid}.slice")),
                }
            }
            Driver::Cgroupfs => match qos.cgroup_level() {
                Some(level) => self.dir.join(level).join(format!("pod{uid}")),
                None => self.dir.join(format!("pod{uid}")),
            },
        }
    }

    /// The pod's cgroup as it exists on this node, trying [`Self::pod_cgroup_candidates`].
    pub fn find_pod_cgroup(&self, uid: &str, qos: Option<QosClass>) -> Option<PathBuf> {
        self.pod_cgroup_candidates(uid, qos)
            .into_iter()
            .find(|path| path.is_dir())
    }

    /// Some pod cgroup exists under this root (directly, or one QoS level down).
    fn has_pods(&self) -> bool {
        let is_pod = |path: &Path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| pod_uid_from_component(n).is_some())
        };
        let children = |dir: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.is_dir())
                        .collect()
                })
                .unwrap_or_default()
        };
        children(&self.dir)
            .iter()
            .any(|child| is_pod(child) || children(child).iter().any(|c| is_pod(c)))
    }
}

/// The cgroup v2 path in the text of `/proc/PID/cgroup` (its `0::` line). Under a cgroup
/// namespace it is relative to the reader's namespace root and may start with `/../..`.
pub fn parse_proc_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|line| line.strip_prefix("0::"))
}

/// The pod UID a cgroup path belongs to (with dashes), if it is inside a kubelet pod cgroup
/// of either driver. `..` components (cgroup namespaces) are fine.
pub fn pod_uid_from_cgroup_path(path: &str) -> Option<String> {
    path.split('/').find_map(pod_uid_from_component)
}

/// `kubepods-besteffort-pod<uid_>.slice`, `kubelet-kubepods-pod<uid_>.slice` or `pod<uid>`.
fn pod_uid_from_component(component: &str) -> Option<String> {
    let uid = match component.strip_suffix(".slice") {
        Some(slice) => slice.rsplit_once("-pod")?.1.replace('_', "-"),
        None => component.strip_prefix("pod")?.to_owned(),
    };
    is_pod_uid(&uid).then_some(uid)
}

/// A UUID (`8-4-4-4-12` hex digits), or the 32 hex digits the kubelet uses for static pods.
fn is_pod_uid(uid: &str) -> bool {
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    match uid.len() {
        32 => hex(uid),
        36 => {
            let groups: Vec<&str> = uid.split('-').collect();
            groups.len() == 5
                && groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
                && groups.iter().all(|g| hex(g))
        }
        _ => false,
    }
}

/// The processes in a cgroup and all cgroups below it (`cgroup.procs` of each).
pub fn processes_below(cgroup: &Path) -> io::Result<Vec<u32>> {
    let mut pids = Vec::new();
    let mut stack = vec![cgroup.to_owned()];
    while let Some(dir) = stack.pop() {
        let procs = dir.join("cgroup.procs");
        match std::fs::read_to_string(&procs) {
            Ok(text) => pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok())),
            // A child that went away while we walked.
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir != cgroup => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{}: {e}", procs.display()),
                ));
            }
        }
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir != cgroup => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    Ok(pids)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f2a9c3e-51b4-4c1e-9a8d-2b7e6f1c0d3a";
    const UID_: &str = "0f2a9c3e_51b4_4c1e_9a8d_2b7e6f1c0d3a";

    #[test]
    fn systemd_paths_spell_the_uid_with_underscores() {
        let root = PodsRoot::from_dir(Path::new("/sys/fs/cgroup/kubepods.slice"));
        assert_eq!(root.driver, Driver::Systemd);
        assert_eq!(
            root.pod_cgroup(UID, QosClass::Burstable),
            PathBuf::from(format!(
                "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
            ))
        );
        assert_eq!(
            root.pod_cgroup(UID, QosClass::BestEffort),
            PathBuf::from(format!(
                "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
            ))
        );
        // Guaranteed pods have no QoS level.
        assert_eq!(
            root.pod_cgroup(UID, QosClass::Guaranteed),
            PathBuf::from(format!(
                "/sys/fs/cgroup/kubepods.slice/kubepods-pod{UID_}.slice"
            ))
        );
    }

    #[test]
    fn cgroupfs_paths_keep_the_uid() {
        let root = PodsRoot::from_dir(Path::new("/sys/fs/cgroup/kubepods"));
        assert_eq!(root.driver, Driver::Cgroupfs);
        assert_eq!(
            root.pod_cgroup(UID, QosClass::BestEffort),
            PathBuf::from(format!("/sys/fs/cgroup/kubepods/besteffort/pod{UID}"))
        );
        assert_eq!(
            root.pod_cgroup(UID, QosClass::Guaranteed),
            PathBuf::from(format!("/sys/fs/cgroup/kubepods/pod{UID}"))
        );
    }

    #[test]
    fn kind_nests_both_layouts_under_kubelet() {
        let systemd = PodsRoot::from_dir(Path::new("/c/kubelet.slice/kubelet-kubepods.slice"));
        assert_eq!(
            systemd.pod_cgroup(UID, QosClass::BestEffort),
            PathBuf::from(format!(
                "/c/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice"
            ))
        );
        assert_eq!(
            systemd.pod_cgroup(UID, QosClass::Guaranteed),
            PathBuf::from(format!(
                "/c/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice"
            ))
        );
        let cgroupfs = PodsRoot::from_dir(Path::new("/c/kubelet/kubepods"));
        assert_eq!(
            cgroupfs.pod_cgroup(UID, QosClass::Burstable),
            PathBuf::from(format!("/c/kubelet/kubepods/burstable/pod{UID}"))
        );
    }

    #[test]
    fn candidates_try_the_known_class_first_then_the_others() {
        let root = PodsRoot::from_dir(Path::new("/k/kubepods"));
        let candidates = root.pod_cgroup_candidates(UID, Some(QosClass::Guaranteed));
        assert_eq!(candidates.len(), 3);
        assert_eq!(
            candidates[0],
            PathBuf::from(format!("/k/kubepods/pod{UID}"))
        );
        let unknown = root.pod_cgroup_candidates(UID, None);
        assert_eq!(unknown.len(), 3);
        assert_eq!(
            unknown[0],
            PathBuf::from(format!("/k/kubepods/burstable/pod{UID}"))
        );
    }

    #[test]
    fn proc_cgroup_gives_the_v2_path_also_under_a_cgroup_namespace() {
        // Hybrid host: v1 controllers first, the unified line last.
        let hybrid = format!(
            "12:memory:/kubepods.slice/x\n1:name=systemd:/x\n0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-0a1b.scope\n"
        );
        let path = parse_proc_cgroup(&hybrid).unwrap();
        assert!(path.ends_with("cri-containerd-0a1b.scope"));
        assert_eq!(pod_uid_from_cgroup_path(path).as_deref(), Some(UID));
        // Read from inside a cgroup namespace rooted elsewhere (an agent in its own pod).
        let namespaced = format!(
            "0::/../../kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-77.scope\n"
        );
        let path = parse_proc_cgroup(&namespaced).unwrap();
        assert!(path.starts_with("/../.."));
        assert_eq!(pod_uid_from_cgroup_path(path).as_deref(), Some(UID));
        // The namespace's own root.
        assert_eq!(parse_proc_cgroup("0::/\n"), Some("/"));
        assert_eq!(pod_uid_from_cgroup_path("/"), None);
        assert_eq!(pod_uid_from_cgroup_path("/../.."), None);
        // cgroupfs, kind-nested, and a Guaranteed pod.
        assert_eq!(
            pod_uid_from_cgroup_path(&format!("/kubelet/kubepods/pod{UID}/0a1b2c")).as_deref(),
            Some(UID)
        );
        assert_eq!(
            pod_uid_from_cgroup_path(&format!(
                "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice/cri-containerd-1.scope"
            ))
            .as_deref(),
            Some(UID)
        );
        // Static pods have 32 hex digits.
        assert_eq!(
            pod_uid_from_cgroup_path("/kubepods/besteffort/pod0123456789abcdef0123456789abcdef/c")
                .as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        assert_eq!(parse_proc_cgroup("1:cpu:/x\n"), None);
    }

    #[test]
    fn things_that_look_like_pods_but_are_not() {
        for path in [
            "/interceptor-lab/icpt-1-0/node-1/pods/web",
            "/kubepods.slice/kubepods-besteffort.slice",
            "/system.slice/podman-1234.scope",
            "/kubepods/podnot-a-uid",
            "/kubepods.slice/kubepods-burstable-pod12_34.slice",
        ] {
            assert_eq!(pod_uid_from_cgroup_path(path), None, "{path}");
        }
    }

    #[test]
    fn detection_prefers_a_layout_that_holds_pods() {
        let base = std::env::temp_dir().join(format!("interceptor-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        // An empty kubepods.slice (left by an old kubelet) and a kind tree with a pod.
        std::fs::create_dir_all(base.join("kubepods.slice")).unwrap();
        let kind = base.join("kubelet/kubepods");
        std::fs::create_dir_all(kind.join(format!("besteffort/pod{UID}"))).unwrap();
        let root = detect_pods_root(&base).unwrap();
        assert_eq!(
            root,
            PodsRoot {
                dir: kind.clone(),
                driver: Driver::Cgroupfs
            }
        );
        assert_eq!(
            root.find_pod_cgroup(UID, None),
            Some(kind.join(format!("besteffort/pod{UID}")))
        );
        assert_eq!(
            root.find_pod_cgroup("00000000-0000-0000-0000-000000000000", None),
            None
        );
        std::fs::remove_dir_all(base.join("kubelet")).unwrap();
        assert_eq!(
            detect_pods_root(&base).unwrap().dir,
            base.join("kubepods.slice")
        );
        std::fs::remove_dir_all(base.join("kubepods.slice")).unwrap();
        let error = detect_pods_root(&base).unwrap_err().to_string();
        assert!(error.contains("--pods-cgroup"), "{error}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
