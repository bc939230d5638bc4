//! The demo (`cargo xtask demo`): Istio's mutual-TLS walkthrough on the local lab.
//!
//! Two nodes; a `sleep` pod on node 1 and a `position-tracker` pod on node 2, both meshed.
//! A caller outside the mesh (a process on node 1, not in any pod) calls the tracker in
//! plaintext: accepted under PERMISSIVE, reset under STRICT, accepted again once the policy is
//! deleted. The meshed pod keeps working over mutual TLS throughout. At the end, node 2's
//! traffic graph: `status --graph`, and the page on its metrics port, saved as screenshots
//! (under `target/demo/`, paths printed) by headless Chromium.
//!
//! With `--kubernetes` the same cast comes from the lab's API server: the agents run in
//! Kubernetes mode, the pods are objects in namespaces labelled for the mesh, and the agents
//! enroll, mark and remove them by themselves; STRICT is turned on and off with a
//! PeerAuthentication object of the API server instead of the CLI.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use interceptor_tests::{
    browser::{Browser, chromium_bin, output_dir},
    fake_apiserver::{
        FakeApiServer, Kind,
        objects::{endpoint_slice, peer_authentication, service},
    },
    kube_lab::{
        Driver, ENROLLED, WITHIN, keep_alive, kube_pod, kubernetes_lab, wait_enrolled, wait_marked,
    },
    lab::{Lab, Pod},
    scenario::{start_fixture, walkthrough_lab},
};
use serde_json::Value;

/// The tracker Service's ClusterIP in the Kubernetes walkthrough.
const TRACKER_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 10);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => standalone(),
        ["--kubernetes"] => kubernetes(),
        _ => bail!("usage: lab-demo [--kubernetes]; got {args:?}"),
    }
}

fn policy_file() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/mesh-strict.yaml")
}

/// The walkthrough with pods enrolled through the CLI (standalone mode).
fn standalone() -> anyhow::Result<()> {
    let policy_file = policy_file();
    banner("Building the lab: two nodes, one agent each, pods in their own namespaces and cgroups");
    let (lab, sleep, tracker) = walkthrough_lab()?;
    println!("{}", lab.cli_ok(1, &["workload", "list"])?);
    println!("{}", lab.cli_ok(2, &["workload", "list"])?);
    let url = format!("http://{}:8080/vehicles/", tracker.ip);

    banner(
        "1. The meshed sleep pod calls the tracker: app -> agent 1 -> mutual TLS -> agent 2 -> app",
    );
    call(&lab, Caller::Pod(&sleep, "sleep"), &url)?;
    show_status(&lab, 1)?;

    banner("2. PERMISSIVE (no policy): a caller outside the mesh is accepted in plaintext");
    call(&lab, Caller::Outside, &url)?;
    show_status(&lab, 2)?;

    strict_then_permissive(&lab, (&sleep, &url), &url, Strict::Cli(&policy_file), 3)?;

    banner("5. The traffic graph: interceptor status --graph, and the page on the metrics port");
    println!("$ interceptor status --graph    # on node-2");
    println!("{}", lab.cli_ok(2, &["status", "--graph"])?);
    screenshots(&lab)?;

    banner("Done; the lab is torn down.");
    Ok(())
}

/// The walkthrough in Kubernetes mode: objects in, mutual TLS out.
fn kubernetes() -> anyhow::Result<()> {
    banner(
        "Kubernetes mode: both agents run with --kubeconfig against the lab's API server; \
         pods live in kubelet-shaped cgroups (systemd driver)",
    );
    let (mut lab, server) = kubernetes_lab(Driver::Systemd, &["foo", "vehicles"])?;
    let (sleep, sleep_object) =
        kube_pod(&mut lab, Driver::Systemd, 1, "foo", "sleep", "Burstable")?;
    let (tracker, tracker_object) = kube_pod(
        &mut lab,
        Driver::Systemd,
        2,
        "vehicles",
        "position-tracker",
        "BestEffort",
    )?;
    keep_alive(&mut lab, &sleep)?;
    start_fixture(&mut lab, &tracker, "http", 8080)?;
    println!("{}", lab.cli_ok(1, &["workload", "list"])?);
    println!("No pod is enrolled yet: nothing was added through the CLI.\n");

    banner("1. kubectl apply: namespaces foo and vehicles carry interceptor.io/mesh=enabled");
    for object in [&sleep_object, &tracker_object] {
        describe_pod(object);
        server.apply(object.clone())?;
    }
    // The tracker's Service, and the slice the endpoints controller would write for it.
    println!(
        "$ kubectl apply -f -    # Service vehicles/position-tracker: ClusterIP {TRACKER_VIP}, port 80 -> 8080"
    );
    server.apply(service(
        "vehicles",
        "position-tracker",
        TRACKER_VIP,
        &[("http", 80, 8080)],
        &[("app", "position-tracker")],
    ))?;
    server.apply(endpoint_slice(
        "vehicles",
        "position-tracker-6xk2d",
        "position-tracker",
        &[("http", 8080)],
        &[(tracker.ip, "node-2", "position-tracker")],
    ))?;
    for (node, namespace, name) in [(1, "foo", "sleep"), (2, "vehicles", "position-tracker")] {
        let took = wait_enrolled(&lab, node, name, true)?;
        let identity = wait_marked(&server, namespace, name)?;
        println!(
            "node-{node}'s agent enrolled {}/{name} in {} ms and annotated it {ENROLLED}={identity}",
            namespace,
            took.as_millis()
        );
    }
    println!();
    println!("{}", lab.cli_ok(1, &["workload", "list"])?);
    println!("{}", lab.cli_ok(2, &["workload", "list"])?);
    let service_url = format!("http://{TRACKER_VIP}/vehicles/");
    let pod_url = format!("http://{}:8080/vehicles/", tracker.ip);

    banner(
        "2. sleep calls the tracker's Service: agent 1 picks a ready backend, mutual TLS to it \
         (the lab has no kube-proxy: only the agent makes the ClusterIP work)",
    );
    call(&lab, Caller::Pod(&sleep, "sleep"), &service_url)?;
    show_status(&lab, 1)?;

    banner("3. PERMISSIVE (no policy): a caller outside the mesh is accepted in plaintext");
    call(&lab, Caller::Outside, &pod_url)?;
    show_status(&lab, 2)?;

    strict_then_permissive(
        &lab,
        (&sleep, &service_url),
        &pod_url,
        Strict::Api(&server),
        4,
    )?;

    banner("6. kubectl delete pod position-tracker: node-2's agent removes it by itself");
    server
        .delete(Kind::Pod, "vehicles", "position-tracker")
        .context("the tracker's object")?;
    let took = wait_enrolled(&lab, 2, "position-tracker", false)?;
    println!("removed in {} ms", took.as_millis());
    println!("{}", lab.cli_ok(2, &["workload", "list"])?);

    banner("Done; the lab and its API server are torn down.");
    Ok(())
}

/// One line per pod object, as `kubectl get pod -o wide` would show it.
fn describe_pod(object: &Value) {
    let text = |pointer: &str| {
        object
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or("-")
    };
    println!(
        "$ kubectl apply -f -    # Pod {}/{} on {}: IP {}, serviceAccount {}, QoS {}",
        text("/metadata/namespace"),
        text("/metadata/name"),
        text("/spec/nodeName"),
        text("/status/podIP"),
        text("/spec/serviceAccountName"),
        text("/status/qosClass"),
    );
}

/// How STRICT is turned on and off.
enum Strict<'a> {
    /// `interceptor policy apply <file>`, then `policy delete` (standalone).
    Cli(&'a Path),
    /// A PeerAuthentication object of the lab's API server, then its deletion (Kubernetes).
    Api(&'a FakeApiServer),
}

/// Steps `first` and `first + 1` of both walkthroughs: the mesh-wide STRICT policy refuses
/// the outside caller (calling `outside_url`) while the meshed pod (calling its URL) gets
/// through; deleting it lets the caller in again.
fn strict_then_permissive(
    lab: &Lab,
    (sleep, sleep_url): (&Pod, &str),
    outside_url: &str,
    strict: Strict<'_>,
    first: u8,
) -> anyhow::Result<()> {
    let policy_file = policy_file();
    match strict {
        Strict::Cli(policy_file) => {
            banner(&format!(
                "{first}. interceptor policy apply policies/mesh-strict.yaml: plaintext is refused"
            ));
            println!("{}", std::fs::read_to_string(policy_file)?);
            println!(
                "{}",
                lab.cli_ok(
                    2,
                    &["policy", "apply", policy_file.to_str().context("path")?]
                )?
            );
        }
        Strict::Api(server) => {
            banner(&format!(
                "{first}. kubectl apply -f policies/mesh-strict.yaml: the agents read the \
                 PeerAuthentication from the API server, plaintext is refused"
            ));
            println!("{}", std::fs::read_to_string(&policy_file)?);
            server.apply(peer_authentication(
                "istio-system",
                "default",
                "STRICT",
                &[],
            ))?;
            let took = wait_policy(lab, true)?;
            println!(
                "node-2's agent applied it {} ms after it was created\n",
                took.as_millis()
            );
            println!("$ interceptor policy list    # on node-2: the policy's source is the API");
        }
    }
    println!("{}", lab.cli_ok(2, &["policy", "list"])?);
    call(lab, Caller::Outside, outside_url)?;
    println!("...while the meshed pod still gets through over mutual TLS:");
    call(lab, Caller::Pod(sleep, "sleep"), sleep_url)?;
    show_status(lab, 2)?;

    match strict {
        Strict::Cli(_) => {
            banner(&format!(
                "{}. interceptor policy delete default -n istio-system: back to PERMISSIVE",
                first + 1
            ));
            println!(
                "{}",
                lab.cli_ok(2, &["policy", "delete", "default", "-n", "istio-system"])?
            );
        }
        Strict::Api(server) => {
            banner(&format!(
                "{}. kubectl delete peerauthentication default -n istio-system: back to PERMISSIVE",
                first + 1
            ));
            server
                .delete(Kind::PeerAuthentication, "istio-system", "default")
                .context("the PeerAuthentication object")?;
            let took = wait_policy(lab, false)?;
            println!("node-2's agent dropped it after {} ms\n", took.as_millis());
        }
    }
    call(lab, Caller::Outside, outside_url)?;
    show_status(lab, 2)?;
    Ok(())
}

/// Waits until node 2's agent does (or does not) hold `istio-system/default` from the API;
/// returns how long that took.
fn wait_policy(lab: &Lab, present: bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let report: Value = serde_json::from_str(&lab.cli_ok(2, &["policy", "list", "--json"])?)?;
        if (report["sources"]["istio-system/default"]["kind"] == "api") == present {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < WITHIN,
            "node-2's agent did not follow the API within {WITHIN:?}:\n{}",
            lab.agent_log(2)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

enum Caller<'a> {
    /// A pod, and its name.
    Pod(&'a Pod, &'a str),
    Outside,
}

fn call(lab: &Lab, caller: Caller<'_>, url: &str) -> anyhow::Result<()> {
    let (mut command, who) = match caller {
        Caller::Pod(pod, name) => (
            lab.in_pod(pod, "curl")?,
            format!("pod {}/{name}", pod.namespace),
        ),
        Caller::Outside => (
            lab.on_node(1, "curl")?,
            "node-1, outside the mesh".to_owned(),
        ),
    };
    println!("$ curl {url}    # from {who}");
    let started = Instant::now();
    let out = command
        .args(["-sS", "--max-time", "10", url])
        .stdin(Stdio::null())
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    print!("{}", String::from_utf8_lossy(&out.stderr));
    println!(
        "  [{} in {} ms]\n",
        if out.status.success() { "ok" } else { "failed" },
        started.elapsed().as_millis()
    );
    Ok(())
}

fn show_status(lab: &Lab, node: u8) -> anyhow::Result<()> {
    println!("$ interceptor status    # on node-{node}");
    println!("{}", lab.cli_ok(node, &["status"])?);
    Ok(())
}

/// Loads node 2's traffic page in headless Chromium and saves it at desktop and phone size.
fn screenshots(lab: &Lab) -> anyhow::Result<()> {
    let url = format!("http://{}/", lab.node(2)?.metrics_addr);
    let dir = output_dir("demo")?;
    let mut browser = Browser::launch(lab.on_node(2, chromium_bin()?)?, 1280, 800)?;
    browser.set_viewport(1280, 800, 1.0, false)?;
    browser.navigate(&url)?;
    browser.wait_for(
        "document.body.dataset.state === 'live'",
        Duration::from_secs(10),
    )?;
    let desktop = dir.join("traffic-graph.png");
    browser.screenshot(&desktop)?;
    browser.set_viewport(390, 844, 2.0, true)?;
    let phone = dir.join("traffic-graph-phone.png");
    browser.screenshot(&phone)?;
    println!("The page {url} (served by node-2's agent), as headless Chromium drew it:");
    println!("  1280x800: {}", desktop.display());
    println!("  phone (390x844): {}", phone.display());
    Ok(())
}

fn banner(text: &str) {
    println!("\n=== {text} ===\n");
}
