//! Kubernetes mode on the lab: agents started with `--kubeconfig` enroll the pods the API
//! server lists for their node, mark them enrolled, read the mesh from the API, and remove
//! pods whose object is deleted. The fake API server listens inside node 1's namespace, on
//! its underlay address, so both agents reach it over the lab's fabric.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use interceptor_tests::{
    fake_apiserver::{FakeApiServer, Kind, Outage},
    kube_lab::{Driver, WITHIN, keep_alive, kube_pod, kubernetes_lab, wait_enrolled, wait_marked},
    lab::{Lab, Pod},
    scenario::{curl, records, start_fixture},
};
use serde_json::Value;

const HTTP_PORT: u16 = 8080;

/// The lab for these tests: Kubernetes mode, with the meshed namespace `shop`.
fn shop_lab(driver: Driver) -> anyhow::Result<(Lab, FakeApiServer)> {
    kubernetes_lab(driver, &["shop"])
}

/// A pod in `shop`.
fn shop_pod(
    lab: &mut Lab,
    driver: Driver,
    node: u8,
    name: &str,
    qos: &str,
) -> anyhow::Result<(Pod, Value)> {
    kube_pod(lab, driver, node, "shop", name, qos)
}

#[test]
fn pods_from_the_api_are_enrolled_meshed_over_mutual_tls_and_removed() -> anyhow::Result<()> {
    let (mut lab, server) = shop_lab(Driver::Systemd)?;

    let (sleep_pod, sleep_object) = shop_pod(&mut lab, Driver::Systemd, 1, "sleep", "Burstable")?;
    let (web_pod, web_object) = shop_pod(&mut lab, Driver::Systemd, 2, "web", "BestEffort")?;
    keep_alive(&mut lab, &sleep_pod)?;
    start_fixture(&mut lab, &web_pod, "http", HTTP_PORT)?;

    // Added to the API: enrolled within 2 s, and marked enrolled on the object.
    server.apply(sleep_object)?;
    server.apply(web_object)?;
    wait_enrolled(&lab, 1, "sleep", true)?;
    wait_enrolled(&lab, 2, "web", true)?;
    for name in ["sleep", "web"] {
        let identity = wait_marked(&server, "shop", name)?;
        ensure!(
            identity == format!("spiffe://cluster.local/ns/shop/sa/{name}"),
            "{name} marked with {identity}"
        );
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
    let (mut lab, server) = shop_lab(Driver::Systemd)?;

    let (web_pod, web_object) = shop_pod(&mut lab, Driver::Systemd, 2, "web", "Guaranteed")?;
    let (old_pod, old_object) = shop_pod(&mut lab, Driver::Systemd, 2, "old", "Burstable")?;
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
    let (new_pod, new_object) = shop_pod(&mut lab, Driver::Systemd, 2, "new", "BestEffort")?;
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
    // The kubelet's other driver: plain cgroupfs directories.
    let (mut lab, server) = shop_lab(Driver::Cgroupfs)?;

    let (web_pod, web_object) = shop_pod(&mut lab, Driver::Cgroupfs, 2, "web", "Burstable")?;
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
    wait_marked(&server, "shop", "web")?;
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

#[test]
fn before_the_api_answers_a_restarted_agent_fails_closed_and_never_sends_plaintext()
-> anyhow::Result<()> {
    let (mut lab, server) = shop_lab(Driver::Systemd)?;

    let (sleep_pod, sleep_object) = shop_pod(&mut lab, Driver::Systemd, 1, "sleep", "Burstable")?;
    let (web_pod, web_object) = shop_pod(&mut lab, Driver::Systemd, 2, "web", "Guaranteed")?;
    keep_alive(&mut lab, &sleep_pod)?;
    start_fixture(&mut lab, &web_pod, "http", HTTP_PORT)?;
    server.apply(sleep_object)?;
    server.apply(web_object)?;
    wait_enrolled(&lab, 1, "sleep", true)?;
    wait_enrolled(&lab, 2, "web", true)?;
    let url = format!("http://{}:{HTTP_PORT}/", web_pod.ip);
    let call = |lab: &Lab| -> anyhow::Result<bool> {
        let out = curl(
            lab.in_pod(&sleep_pod, "curl")?,
            &url,
            &["-o", "/dev/null", "--max-time", "2"],
        )?;
        Ok(out.status.success())
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !call(&lab)? {
        ensure!(
            Instant::now() < deadline,
            "sleep → web never worked:\n{}",
            lab.agent_log(1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Node 1's agent restarts while the API server refuses every connection: it restores
    // `sleep` from its saved state, so `sleep` is captured, but the agent cannot tell whether
    // `web` is meshed. Every call fails, and none goes out in plaintext.
    lab.kill_agent(1)?;
    server.set_outage(Outage::Refuse);
    lab.start_agent(1)?;
    wait_enrolled(&lab, 1, "sleep", true)?;
    let inbound_before = records(&lab, 2)?.len();
    for attempt in 0..3 {
        ensure!(
            !call(&lab)?,
            "call {attempt} went through while the API was down:\n{}",
            lab.agent_log(1)
        );
    }
    let outbound = records(&lab, 1)?;
    let plaintext_allowed = |r: &Value| r["security"] == "plaintext" && r["verdict"] == "allowed";
    ensure!(
        !outbound.iter().any(plaintext_allowed),
        "plaintext while the mesh was unknown: {outbound:#?}"
    );
    ensure!(
        outbound.iter().any(|r| r["direction"] == "outbound"
            && r["verdict"] == "failed"
            && r["reason"]
                .as_str()
                .is_some_and(|why| why.contains("not listed"))),
        "the refused calls were not recorded as failed for an unknown mesh: {outbound:#?}"
    );
    let inbound = records(&lab, 2)?;
    ensure!(
        inbound.len() == inbound_before,
        "web's node saw connections while node 1 could not tell: {inbound:#?}"
    );

    // Once the API answers again, the same call is mutual TLS.
    server.set_outage(Outage::None);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !call(&lab)? {
        ensure!(
            Instant::now() < deadline,
            "sleep → web did not recover after the API came back:\n{}",
            lab.agent_log(1)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let outbound = records(&lab, 1)?;
    ensure!(
        outbound
            .iter()
            .any(|r| r["direction"] == "outbound" && r["security"] == "mutual_tls"),
        "no mutual TLS after recovery: {outbound:#?}"
    );
    ensure!(!outbound.iter().any(plaintext_allowed), "{outbound:#?}");
    Ok(())
}

#[test]
fn a_pod_is_sent_mutual_tls_only_once_its_agent_has_enrolled_and_marked_it() -> anyhow::Result<()> {
    let (mut lab, server) = shop_lab(Driver::Systemd)?;
    let (sleep_pod, sleep_object) = shop_pod(&mut lab, Driver::Systemd, 1, "sleep", "Burstable")?;
    let (web_pod, web_object) = shop_pod(&mut lab, Driver::Systemd, 2, "web", "BestEffort")?;
    keep_alive(&mut lab, &sleep_pod)?;
    start_fixture(&mut lab, &web_pod, "http", HTTP_PORT)?;
    server.apply(sleep_object)?;
    wait_enrolled(&lab, 1, "sleep", true)?;

    // web is Running with an address in a meshed namespace, but its node's agent is down:
    // nobody has enrolled it, so peers must not send it mutual TLS (no agent would answer).
    lab.kill_agent(2)?;
    server.apply(web_object)?;
    let url = format!("http://{}:{HTTP_PORT}/", web_pod.ip);
    let destination = format!("{}:{HTTP_PORT}", web_pod.ip);
    let newest_to_web = |lab: &Lab| -> anyhow::Result<Value> {
        let out = curl(lab.in_pod(&sleep_pod, "curl")?, &url, &["-o", "/dev/null"])?;
        ensure!(
            out.status.success(),
            "sleep → web failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            lab.agent_log(1)
        );
        records(lab, 1)?
            .into_iter()
            .find(|r| r["direction"] == "outbound" && r["destination"] == destination)
            .context("no outbound record to web")
    };
    let before = newest_to_web(&lab)?;
    ensure!(
        before["security"] == "plaintext" && before["destination_identity"].is_null(),
        "an unenrolled pod was not reached in plaintext: {before:#}"
    );
    ensure!(
        server
            .get(Kind::Pod, "shop", "web")
            .is_some_and(|p| p["metadata"]["annotations"]["interceptor.io/enrolled"].is_null()),
        "web is marked although its agent is down"
    );

    // Its agent comes up, enrolls and marks it: from then on it is reached over mutual TLS.
    lab.start_agent(2)?;
    wait_enrolled(&lab, 2, "web", true)?;
    wait_marked(&server, "shop", "web")?;
    let deadline = Instant::now() + WITHIN;
    loop {
        let after = newest_to_web(&lab)?;
        if after["security"] == "mutual_tls" {
            ensure!(
                after["destination_identity"] == "spiffe://cluster.local/ns/shop/sa/web",
                "{after:#}"
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "web still reached in plaintext {WITHIN:?} after it was marked: {after:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
