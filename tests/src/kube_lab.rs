//! The lab in Kubernetes mode: agents started with `--kubeconfig` against a fake API server,
//! pods in cgroups laid out as the kubelet lays them out, and their objects. Shared by the
//! Kubernetes-mode tests and the demo (`cargo xtask demo --kubernetes`).

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::Value;

use crate::{
    fake_apiserver::{
        FakeApiServer, Kind,
        objects::{namespace, new_uid, pod},
    },
    lab::{Lab, LabOptions, Pod, netns_path},
};

/// How long an agent may take to enroll or remove a pod, or to mark it, after the API says so.
pub const WITHIN: Duration = Duration::from_secs(2);

/// The annotation an agent puts on a pod it has enrolled.
pub const ENROLLED: &str = "interceptor.io/enrolled";

/// How the kubelet lays out the pods cgroup (its `--cgroup-driver`).
#[derive(Clone, Copy, Debug)]
pub enum Driver {
    /// Slices named after their path, containers in `cri-containerd-<id>.scope`.
    Systemd,
    /// Plain directories, containers in `<id>`.
    Cgroupfs,
}

/// Restarts every agent of the lab in Kubernetes mode against `server`.
pub fn kubernetes_mode(lab: &mut Lab, server: &FakeApiServer) -> anyhow::Result<()> {
    let kubeconfig = server.kubeconfig().to_string_lossy().into_owned();
    for index in 1..=lab.nodes.len() as u8 {
        lab.kill_agent(index)?;
        lab.set_agent_args(index, vec!["--kubeconfig".into(), kubeconfig.clone()])?;
        lab.start_agent(index)?;
    }
    Ok(())
}

/// A two-node lab whose agents run in Kubernetes mode against a fake API server in node 1's
/// namespace (on its underlay address, so both agents reach it over the fabric), with each
/// node's pods cgroup named and laid out as the kubelet's under `driver`, and `namespaces`
/// published with the mesh label.
pub fn kubernetes_lab(driver: Driver, namespaces: &[&str]) -> anyhow::Result<(Lab, FakeApiServer)> {
    let mut lab = Lab::new(LabOptions {
        pods_cgroup_name: match driver {
            Driver::Systemd => "kubepods.slice",
            Driver::Cgroupfs => "kubepods",
        },
        ..LabOptions::default()
    })?;
    let node1 = lab.node(1)?;
    let api_addr = (node1.underlay_ip, 6443).into();
    let server = FakeApiServer::start_in_netns(&netns_path(&node1.netns), api_addr)
        .context("the fake API server in node 1's namespace")?;
    for name in namespaces {
        server.apply(namespace(name, &[("interceptor.io/mesh", "enabled")]))?;
    }
    kubernetes_mode(&mut lab, &server)?;
    Ok((lab, server))
}

/// Where the kubelet and the container runtime put a container of a pod, relative to the
/// pods cgroup. Spelled out here, not by the agent's code, so the tests check the agent's
/// reading of it. On cgroup v2 the processes live in the container's cgroup, a child of the
/// pod's.
pub fn container_cgroup(driver: Driver, uid: &str, qos: &str) -> String {
    let container = uid.replace('-', "").repeat(2);
    let uid_ = uid.replace('-', "_");
    let level = qos.to_lowercase();
    match (driver, qos) {
        (Driver::Systemd, "Guaranteed") => {
            format!("kubepods-pod{uid_}.slice/cri-containerd-{container}.scope")
        }
        (Driver::Systemd, _) => format!(
            "kubepods-{level}.slice/kubepods-{level}-pod{uid_}.slice/cri-containerd-{container}.scope"
        ),
        (Driver::Cgroupfs, "Guaranteed") => format!("pod{uid}/{container}"),
        (Driver::Cgroupfs, _) => format!("{level}/pod{uid}/{container}"),
    }
}

/// A lab pod in the cgroup where the kubelet (under `driver`) puts a pod of this QoS class,
/// and its Pod object (not applied yet) with a new UID, its address, a service account named
/// like the pod and the label `app=<name>`.
pub fn kube_pod(
    lab: &mut Lab,
    driver: Driver,
    node: u8,
    namespace: &str,
    name: &str,
    qos: &str,
) -> anyhow::Result<(Pod, Value)> {
    let uid = new_uid();
    let lab_pod = lab.add_pod(node, &container_cgroup(driver, &uid, qos), namespace)?;
    let mut object = pod(namespace, name, &format!("node-{node}"))
        .uid(&uid)
        .ip(lab_pod.ip)
        .service_account(name)
        .label("app", name);
    object.qos_class = qos.into();
    Ok((lab_pod, object.to_json()))
}

/// Starts a long-lived process in `pod`, so the agent finds the pod's network namespace.
pub fn keep_alive(lab: &mut Lab, pod: &Pod) -> anyhow::Result<()> {
    let mut sleeper = lab.in_pod(pod, "sleep")?;
    sleeper.arg("600");
    lab.spawn(sleeper)?;
    Ok(())
}

/// Waits until `node`'s workload list does (or does not) hold `name`; returns how long.
pub fn wait_enrolled(lab: &Lab, node: u8, name: &str, enrolled: bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let list: Vec<Value> =
            serde_json::from_str(&lab.cli_ok(node, &["workload", "list", "--json"])?)?;
        let found = list.iter().any(|w| w["spec"]["name"] == name);
        if found == enrolled {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < WITHIN,
            "{name} enrolled={found} on node {node} after {WITHIN:?}:\n{}",
            lab.agent_log(node)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the agent has marked the pod `namespace/name` enrolled on its object, with
/// its identity; returns the identity.
pub fn wait_marked(server: &FakeApiServer, namespace: &str, name: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + WITHIN;
    loop {
        let object = server.get(Kind::Pod, namespace, name);
        if let Some(identity) = object
            .as_ref()
            .and_then(|p| p["metadata"]["annotations"][ENROLLED].as_str())
        {
            return Ok(identity.to_owned());
        }
        ensure!(
            Instant::now() < deadline,
            "{namespace}/{name} not marked enrolled within {WITHIN:?}: {object:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
