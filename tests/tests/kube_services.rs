//! Services in Kubernetes mode, on the lab: a pod's connect to a ClusterIP is carried by its
//! agent to a ready backend. The lab has no kube-proxy, so nothing but the agent makes a
//! meshed VIP work; the one test with a backend outside the mesh stands a kube-proxy rule in
//! for it (an nftables DNAT in node 1's namespace).

use std::{
    io::Write,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use interceptor_tests::{
    fake_apiserver::{
        FakeApiServer,
        objects::{endpoint_slice, namespace, service},
    },
    kube_lab::{Driver, keep_alive, kube_pod, kubernetes_lab, wait_enrolled},
    lab::{Lab, Pod},
    scenario::{curl, metrics, records, start_fixture},
};
use serde_json::{Value, json};

const WEB_PORT: u16 = 8080;
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);

/// A Kubernetes-mode lab with `sleep` (meshed, node 1) and meshed `web-<n>` pods on node 2,
/// each enrolled; `serving` says which of them run an HTTP server on 8080.
struct Cast {
    lab: Lab,
    server: FakeApiServer,
    sleep: Pod,
    webs: Vec<Pod>,
}

fn cast(serving: &[bool]) -> anyhow::Result<Cast> {
    let (mut lab, server) = kubernetes_lab(Driver::Systemd, &["shop"])?;
    let (sleep, sleep_object) =
        kube_pod(&mut lab, Driver::Systemd, 1, "shop", "sleep", "Burstable")?;
    keep_alive(&mut lab, &sleep)?;
    server.apply(sleep_object)?;
    let mut webs = Vec::new();
    for (index, serves) in serving.iter().enumerate() {
        let name = format!("web-{index}");
        let (web, mut object) = kube_pod(&mut lab, Driver::Systemd, 2, "shop", &name, "Burstable")?;
        // One service account for all replicas, as a Deployment's pods have.
        object["spec"]["serviceAccountName"] = "web".into();
        if *serves {
            start_fixture(&mut lab, &web, "http", WEB_PORT)?;
        } else {
            keep_alive(&mut lab, &web)?;
        }
        server.apply(object)?;
        webs.push(web);
    }
    wait_enrolled(&lab, 1, "sleep", true)?;
    for index in 0..serving.len() {
        wait_enrolled(&lab, 2, &format!("web-{index}"), true)?;
    }
    Ok(Cast {
        lab,
        server,
        sleep,
        webs,
    })
}

/// The `web` Service on [`WEB_VIP`]:80 (port `http`, targetPort the named port `web-http`)
/// and its slice, with the given endpoints (pod, ready).
fn publish_web_service(cast: &Cast, endpoints: &[(usize, bool)]) -> anyhow::Result<()> {
    let mut svc = service(
        "shop",
        "web",
        WEB_VIP,
        &[("http", 80, WEB_PORT)],
        &[("app", "web")],
    );
    svc["spec"]["ports"][0]["targetPort"] = "web-http".into();
    cast.server.apply(svc)?;
    let mut slice = endpoint_slice(
        "shop",
        "web-x7k2p",
        "web",
        &[("http", WEB_PORT)],
        &endpoints
            .iter()
            .map(|(i, _)| (cast.webs[*i].ip, "node-2", "web"))
            .collect::<Vec<_>>(),
    );
    for (position, (index, ready)) in endpoints.iter().enumerate() {
        slice["endpoints"][position]["conditions"]["ready"] = (*ready).into();
        slice["endpoints"][position]["targetRef"]["name"] = format!("web-{index}").into();
    }
    cast.server.apply(slice)?;
    Ok(())
}

/// `curl` from `sleep`; true when it got an answer.
fn call(cast: &Cast, url: &str) -> anyhow::Result<bool> {
    let out = curl(
        cast.lab.in_pod(&cast.sleep, "curl")?,
        url,
        &["-o", "/dev/null", "--max-time", "5"],
    )?;
    Ok(out.status.success())
}

/// Calls until one is answered, for at most 5 s (the agent's watches see a new object within
/// moments, but not before the call is made).
fn first_answer(cast: &Cast, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !call(cast, url)? {
        ensure!(
            Instant::now() < deadline,
            "{url} never answered from sleep:\n{}",
            cast.lab.agent_log(1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Node 1's outbound records to `destination`, newest first.
fn outbound_to(lab: &Lab, destination: &str) -> anyhow::Result<Vec<Value>> {
    Ok(records(lab, 1)?
        .into_iter()
        .filter(|r| r["direction"] == "outbound" && r["destination"] == destination)
        .collect())
}

#[test]
fn a_call_to_a_service_vip_is_mutual_tls_to_a_ready_backend_and_names_the_service()
-> anyhow::Result<()> {
    let cast = cast(&[true])?;
    publish_web_service(&cast, &[(0, true)])?;
    let vip = format!("{WEB_VIP}:80");
    first_answer(&cast, &format!("http://{vip}/"))?;

    let to_vip = outbound_to(&cast.lab, &vip)?;
    let served = to_vip
        .iter()
        .find(|r| r["verdict"] == "allowed")
        .with_context(|| format!("no allowed record to {vip}: {to_vip:#?}"))?;
    ensure!(
        served["security"] == "mutual_tls"
            && served["destination_identity"] == "spiffe://cluster.local/ns/shop/sa/web"
            && served["destination_workload"] == json!({"namespace": "shop", "name": "web-0"})
            && served["destination_service"] == json!({"namespace": "shop", "name": "web"}),
        "{served:#}"
    );
    // The backend's agent saw mutual TLS from sleep, on the target port of the named port.
    let inbound = records(&cast.lab, 2)?;
    ensure!(
        inbound.iter().any(|r| r["direction"] == "inbound"
            && r["security"] == "mutual_tls"
            && r["destination"] == format!("{}:{WEB_PORT}", cast.webs[0].ip)
            && r["source_identity"] == "spiffe://cluster.local/ns/shop/sa/sleep"),
        "{inbound:#?}"
    );
    // Istio's service labels on the source's metrics.
    let metrics = metrics(&cast.lab, 1)?;
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("destination_service=\"web.shop.svc.cluster.local\"")
                && l.contains("destination_service_name=\"web\"")
                && l.contains("destination_service_namespace=\"shop\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")),
        "{metrics}"
    );

    // A headless Service: the caller connects to the pod itself, and the record names it.
    let mut headless = service(
        "shop",
        "web-pods",
        WEB_VIP,
        &[("http", WEB_PORT, WEB_PORT)],
        &[],
    );
    headless["spec"]["clusterIP"] = "None".into();
    headless["spec"]["clusterIPs"] = json!(["None"]);
    cast.server.apply(headless)?;
    cast.server.apply(endpoint_slice(
        "shop",
        "web-pods-abcde",
        "web-pods",
        &[("http", WEB_PORT)],
        &[(cast.webs[0].ip, "node-2", "web-0")],
    ))?;
    let pod_address = format!("{}:{WEB_PORT}", cast.webs[0].ip);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        ensure!(
            call(&cast, &format!("http://{pod_address}/"))?,
            "pod call failed"
        );
        let named = outbound_to(&cast.lab, &pod_address)?.first().cloned();
        if let Some(r) = named.filter(|r| r["destination_service"]["name"] == "web-pods") {
            ensure!(r["security"] == "mutual_tls", "{r:#}");
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the headless Service is not named within 2 s: {:#?}",
            outbound_to(&cast.lab, &pod_address)?
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn a_backend_that_refuses_makes_the_agent_try_another_ready_endpoint() -> anyhow::Result<()> {
    // web-0 is enrolled but nothing listens on its port; web-1 serves.
    let cast = cast(&[false, true])?;
    publish_web_service(&cast, &[(0, true), (1, true)])?;
    let url = format!("http://{WEB_VIP}/");
    first_answer(&cast, &url)?;
    // Successive connections start at successive backends, so half of them try web-0 first.
    for attempt in 0..6 {
        ensure!(
            call(&cast, &url)?,
            "call {attempt} failed although web-1 serves:\n{}",
            cast.lab.agent_log(1)
        );
    }
    let to_vip = outbound_to(&cast.lab, &format!("{WEB_VIP}:80"))?;
    let served: Vec<&Value> = to_vip
        .iter()
        .filter(|r| r["verdict"] == "allowed")
        .collect();
    ensure!(served.len() >= 7, "{to_vip:#?}");
    ensure!(
        served
            .iter()
            .all(|r| r["destination_workload"]["name"] == "web-1" && r["security"] == "mutual_tls"),
        "{served:#?}"
    );
    Ok(())
}

#[test]
fn endpoints_that_become_unready_stop_receiving_new_connections_within_2_s() -> anyhow::Result<()> {
    let cast = cast(&[true, true])?;
    publish_web_service(&cast, &[(0, true), (1, true)])?;
    let url = format!("http://{WEB_VIP}/");
    first_answer(&cast, &url)?;
    let reached = |cast: &Cast| -> anyhow::Result<String> {
        ensure!(call(cast, &url)?, "call failed:\n{}", cast.lab.agent_log(1));
        let newest = outbound_to(&cast.lab, &format!("{WEB_VIP}:80"))?;
        Ok(newest
            .first()
            .and_then(|r| r["destination_workload"]["name"].as_str())
            .unwrap_or("none")
            .to_owned())
    };
    let mut seen: Vec<String> = (0..4).map(|_| reached(&cast)).collect::<Result<_, _>>()?;
    seen.sort();
    seen.dedup();
    ensure!(
        seen == ["web-0", "web-1"],
        "both backends serve at first: {seen:?}"
    );

    // web-0 turns unready: within 2 s, four calls in a row all go to web-1.
    publish_web_service(&cast, &[(0, false), (1, true)])?;
    let changed = Instant::now();
    let mut in_a_row = 0;
    while in_a_row < 4 {
        in_a_row = if reached(&cast)? == "web-1" {
            in_a_row + 1
        } else {
            0
        };
        ensure!(
            changed.elapsed() < Duration::from_secs(2) || in_a_row > 0,
            "web-0 still receives connections 2 s after it became unready"
        );
    }
    Ok(())
}

#[test]
fn a_service_whose_backends_are_outside_the_mesh_goes_out_in_plaintext_to_the_vip()
-> anyhow::Result<()> {
    let cast = cast(&[])?;
    // A pod in a namespace without the mesh label: never enrolled.
    let mut lab = cast.lab;
    let (legacy, legacy_object) =
        kube_pod(&mut lab, Driver::Systemd, 2, "legacy", "old", "BestEffort")?;
    start_fixture(&mut lab, &legacy, "http", WEB_PORT)?;
    let cast = Cast { lab, ..cast };
    cast.server.apply(namespace("legacy", &[]))?;
    cast.server.apply(legacy_object)?;
    let vip = Ipv4Addr::new(198, 18, 100, 2);
    cast.server.apply(service(
        "legacy",
        "old",
        vip,
        &[("http", 80, WEB_PORT)],
        &[("app", "old")],
    ))?;
    cast.server.apply(endpoint_slice(
        "legacy",
        "old-q9w8e",
        "old",
        &[("http", WEB_PORT)],
        &[(legacy.ip, "node-2", "old")],
    ))?;
    // kube-proxy's part, which the agent leaves to it for Services outside the mesh.
    let node1 = cast.lab.node(1)?.netns.clone();
    let rules = format!(
        "table ip kube-proxy-standin {{\n chain prerouting {{\n  \
         type nat hook prerouting priority dstnat;\n  \
         ip daddr {vip} tcp dport 80 dnat to {}:{WEB_PORT}\n }}\n}}\n",
        legacy.ip
    );
    let mut nft = std::process::Command::new("ip")
        .args(["netns", "exec", &node1, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("nft")?;
    nft.stdin
        .take()
        .context("nft's stdin")?
        .write_all(rules.as_bytes())?;
    let status = nft.wait()?;
    ensure!(status.success(), "nft refused the kube-proxy stand-in");

    first_answer(&cast, &format!("http://{vip}/"))?;
    let to_vip = outbound_to(&cast.lab, &format!("{vip}:80"))?;
    let served = to_vip
        .iter()
        .find(|r| r["verdict"] == "allowed")
        .with_context(|| format!("{to_vip:#?}"))?;
    ensure!(
        served["security"] == "plaintext"
            && served["destination_service"] == json!({"namespace": "legacy", "name": "old"})
            && served["destination_identity"].is_null(),
        "{served:#}"
    );
    Ok(())
}
