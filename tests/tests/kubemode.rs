//! Kubernetes mode on the lab: agents started with `--kubeconfig` enroll the pods the API
//! server lists for their node, mark them enrolled, read the mesh from the API, and remove
//! pods whose object is deleted. The fake API server listens inside node 1's namespace, on
//! its underlay address, so both agents reach it over the lab's fabric.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use interceptor_tests::{
    fake_apiserver::{
        FakeApiServer, Kind,
        objects::{namespace, new_uid, pod},
    },
    lab::{Lab, LabOptions, Pod, netns_path},
    scenario::{curl, records, start_fixture},
};
use serde_json::Value;

const WITHIN: Duration = Duration::from_secs(2);
const HTTP_PORT: u16 = 8080;

/// Restarts every agent of the lab in Kubernetes mode against `server`.
fn kubernetes_mode(lab: &mut Lab, server: &FakeApiServer) -> anyhow::Result<()> {
    let kubeconfig = server.kubeconfig().to_string_lossy().into_owned();
    for index in 1..=2 {
        lab.kill_agent(index)?;
        lab.set_agent_args(index, vec!["--kubeconfig".into(), kubeconfig.clone()])?;
        lab.start_agent(index)?;
    }
    Ok(())
}

/// A lab whose agents run in Kubernetes mode against a fake API server in node 1's namespace
/// (on its underlay address, so both agents reach it over the fabric), with the meshed
/// namespace `shop` already published.
fn kubernetes_lab() -> anyhow::Result<(Lab, FakeApiServer)> {
    let mut lab = Lab::new(LabOptions::default())?;
    let node1 = lab.node(1)?;
    let api_addr = (node1.underlay_ip, 6443).into();
    let server = FakeApiServer::start_in_netns(&netns_path(&node1.netns), api_addr)
        .context("the fake API server in node 1's namespace")?;
    server.apply(namespace("shop", &[("interceptor.io/mesh", "enabled")]))?;
    kubernetes_mode(&mut lab, &server)?;
    Ok((lab, server))
}

/// A lab pod whose cgroup is where the kubelet (cgroupfs driver) puts a Guaranteed pod with
/// this UID, with a process in it, and its Pod object (not applied yet).
fn kube_pod(
    lab: &mut Lab,
    node: u8,
    uid: &str,
    name: &str,
    service_account: &str,
) -> anyhow::Result<(Pod, Value)> {
    let lab_pod = lab.add_pod(node, &format!("pod{uid}"), "shop")?;
    let mut object = pod("shop", name, &format!("node-{node}"))
        .uid(uid)
        .ip(lab_pod.ip)
        .service_account(service_account)
        .label("app", name);
    object.qos_class = "Guaranteed".into();
    Ok((lab_pod, object.to_json()))
}

/// Starts a long-lived process in `pod`, so the agent finds the pod's network namespace.
fn keep_alive(lab: &mut Lab, pod: &Pod) -> anyhow::Result<()> {
    let mut sleeper = lab.in_pod(pod, "sleep")?;
    sleeper.arg("600");
    lab.spawn(sleeper)?;
    Ok(())
}

/// Waits until `node`'s workload list does (or does not) hold `name`; returns how long.
fn wait_enrolled(lab: &Lab, node: u8, name: &str, enrolled: bool) -> anyhow::Result<Duration> {
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

#[test]
fn pods_from_the_api_are_enrolled_meshed_over_mutual_tls_and_removed() -> anyhow::Result<()> {
    let (mut lab, server) = kubernetes_lab()?;

    let (sleep_pod, sleep_object) = kube_pod(&mut lab, 1, &new_uid(), "sleep", "sleep")?;
    let (web_pod, web_object) = kube_pod(&mut lab, 2, &new_uid(), "web", "web")?;
    keep_alive(&mut lab, &sleep_pod)?;
    start_fixture(&mut lab, &web_pod, "http", HTTP_PORT)?;

    // Added to the API: enrolled within 2 s, and marked enrolled on the object.
    server.apply(sleep_object)?;
    server.apply(web_object)?;
    wait_enrolled(&lab, 1, "sleep", true)?;
    wait_enrolled(&lab, 2, "web", true)?;
    let deadline = Instant::now() + WITHIN;
    while ["sleep", "web"].iter().any(|name| {
        server.get(Kind::Pod, "shop", name).is_none_or(|p| {
            p["metadata"]["annotations"]["interceptor.io/enrolled"]
                != format!("spiffe://cluster.local/ns/shop/sa/{name}").as_str()
        })
    }) {
        ensure!(
            Instant::now() < deadline,
            "pods not marked enrolled within {WITHIN:?}: {:?} {:?}",
            server.get(Kind::Pod, "shop", "sleep"),
            server.get(Kind::Pod, "shop", "web")
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A call across nodes is mutual TLS, with the identities from the API.
    let url = format!("http://{}:{HTTP_PORT}/", web_pod.ip);
    let deadline = Instant::now() + Duration::from_secs(5);
    let out = loop {
        let out = curl(lab.in_pod(&sleep_pod, "curl")?, &url, &["-o", "/dev/null"])?;
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        out.status.success(),
        "sleep → web failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lab.agent_log(1)
    );
    let outbound = records(&lab, 1)?;
    ensure!(
        outbound.iter().any(|r| r["direction"] == "outbound"
            && r["security"] == "mutual_tls"
            && r["source_identity"] == "spiffe://cluster.local/ns/shop/sa/sleep"
            && r["destination_identity"] == "spiffe://cluster.local/ns/shop/sa/web"),
        "no outbound mutual TLS record on node 1: {outbound:#?}"
    );
    let inbound = records(&lab, 2)?;
    ensure!(
        inbound.iter().any(|r| r["direction"] == "inbound"
            && r["security"] == "mutual_tls"
            && r["source_identity"] == "spiffe://cluster.local/ns/shop/sa/sleep"),
        "no inbound mutual TLS record on node 2: {inbound:#?}"
    );

    // Deleted from the API: removed within 2 s.
    ensure!(server.delete(Kind::Pod, "shop", "web").is_some());
    wait_enrolled(&lab, 2, "web", false)?;
    wait_enrolled(&lab, 1, "sleep", true)?;
    Ok(())
}

#[test]
fn a_restarted_agent_reconciles_its_saved_pods_with_the_api() -> anyhow::Result<()> {
    let (mut lab, server) = kubernetes_lab()?;

    let (web_pod, web_object) = kube_pod(&mut lab, 2, &new_uid(), "web", "web")?;
    let (old_pod, old_object) = kube_pod(&mut lab, 2, &new_uid(), "old", "old")?;
    for (pod, name) in [(&web_pod, "web"), (&old_pod, "old")] {
        keep_alive(&mut lab, pod).with_context(|| format!("a process in {name}"))?;
    }
    server.apply(web_object)?;
    server.apply(old_object)?;
    wait_enrolled(&lab, 2, "web", true)?;
    wait_enrolled(&lab, 2, "old", true)?;

    // While node 2's agent is down, one pod goes away and another arrives.
    lab.kill_agent(2)?;
    ensure!(server.delete(Kind::Pod, "shop", "old").is_some());
    let (new_pod, new_object) = kube_pod(&mut lab, 2, &new_uid(), "new", "new")?;
    keep_alive(&mut lab, &new_pod)?;
    server.apply(new_object)?;
    lab.start_agent(2)?;

    // The restarted agent keeps the pod that is still listed, forgets the gone one and
    // enrolls the new one.
    wait_enrolled(&lab, 2, "new", true)?;
    wait_enrolled(&lab, 2, "old", false)?;
    wait_enrolled(&lab, 2, "web", true)?;
    let list: Vec<Value> = serde_json::from_str(&lab.cli_ok(2, &["workload", "list", "--json"])?)?;
    let mut names: Vec<&str> = list
        .iter()
        .filter_map(|w| w["spec"]["name"].as_str())
        .collect();
    names.sort_unstable();
    ensure!(names == ["new", "web"], "node 2 serves {names:?}");
    Ok(())
}

#[test]
fn a_pod_that_opts_out_is_not_enrolled_and_opting_out_later_removes_and_unmarks_it()
-> anyhow::Result<()> {
    let (mut lab, server) = kubernetes_lab()?;

    let (web_pod, web_object) = kube_pod(&mut lab, 2, &new_uid(), "web", "web")?;
    keep_alive(&mut lab, &web_pod)?;
    let with_label = |value: &str| {
        let mut object = web_object.clone();
        object["metadata"]["labels"]["interceptor.io/mesh"] = value.into();
        object
    };
    let marked = || {
        server
            .get(Kind::Pod, "shop", "web")
            .is_some_and(|p| !p["metadata"]["annotations"]["interceptor.io/enrolled"].is_null())
    };

    // Opted out from the start, in a meshed namespace: never enrolled, never marked.
    server.apply(with_label("disabled"))?;
    std::thread::sleep(Duration::from_millis(1500));
    wait_enrolled(&lab, 2, "web", false)?;
    ensure!(!marked(), "an opted-out pod was marked enrolled");

    // Opting in enrolls it; opting out again removes it and takes the mark away.
    server.apply(with_label("enabled"))?;
    wait_enrolled(&lab, 2, "web", true)?;
    let deadline = Instant::now() + WITHIN;
    while !marked() {
        ensure!(Instant::now() < deadline, "the enrolled pod was not marked");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Only the label changes: the object (read after it was marked) keeps the agent's mark
    // until the agent takes it away.
    let mut current = server
        .get(Kind::Pod, "shop", "web")
        .context("the pod object")?;
    current["metadata"]["labels"]["interceptor.io/mesh"] = "disabled".into();
    ensure!(
        !current["metadata"]["annotations"]["interceptor.io/enrolled"].is_null(),
        "{current}"
    );
    server.apply(current)?;
    wait_enrolled(&lab, 2, "web", false)?;
    let deadline = Instant::now() + WITHIN;
    while marked() {
        ensure!(
            Instant::now() < deadline,
            "the mark stayed after opting out: {:?}",
            server.get(Kind::Pod, "shop", "web")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
