//! The demo (`cargo xtask demo`): Istio's mutual-TLS walkthrough on the local lab.
//!
//! Two nodes; a `sleep` pod on node 1 and a `position-tracker` pod on node 2, both meshed.
//! A caller outside the mesh (a process on node 1, not in any pod) calls the tracker in
//! plaintext: accepted under PERMISSIVE, reset under STRICT, accepted again once the policy is
//! deleted. The meshed pod keeps working over mutual TLS throughout. At the end, node 2's
//! traffic graph: `status --graph`, and the page on its metrics port, saved as screenshots
//! (under `target/demo/`, paths printed) by headless Chromium.

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context;
use interceptor_tests::{
    browser::{Browser, chromium_bin, output_dir},
    lab::{Lab, Pod},
    scenario::walkthrough_lab,
};

fn main() -> anyhow::Result<()> {
    let policy_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/mesh-strict.yaml");
    banner("Building the lab: two nodes, one agent each, pods in their own namespaces and cgroups");
    let (lab, sleep, tracker) = walkthrough_lab()?;
    println!("{}", lab.cli_ok(1, &["workload", "list"])?);
    println!("{}", lab.cli_ok(2, &["workload", "list"])?);
    let url = format!("http://{}:8080/vehicles/", tracker.ip);

    banner(
        "1. The meshed sleep pod calls the tracker: app -> agent 1 -> mutual TLS -> agent 2 -> app",
    );
    call(&lab, Caller::Pod(&sleep), &url)?;
    show_status(&lab, 1)?;

    banner("2. PERMISSIVE (no policy): a caller outside the mesh is accepted in plaintext");
    call(&lab, Caller::Outside, &url)?;
    show_status(&lab, 2)?;

    banner("3. interceptor policy apply policies/mesh-strict.yaml: plaintext is refused");
    println!("{}", std::fs::read_to_string(&policy_file)?);
    println!(
        "{}",
        lab.cli_ok(
            2,
            &["policy", "apply", policy_file.to_str().context("path")?]
        )?
    );
    println!("{}", lab.cli_ok(2, &["policy", "list"])?);
    call(&lab, Caller::Outside, &url)?;
    println!("...while the meshed pod still gets through over mutual TLS:");
    call(&lab, Caller::Pod(&sleep), &url)?;
    show_status(&lab, 2)?;

    banner("4. interceptor policy delete default -n istio-system: back to PERMISSIVE");
    println!(
        "{}",
        lab.cli_ok(2, &["policy", "delete", "default", "-n", "istio-system"])?
    );
    call(&lab, Caller::Outside, &url)?;
    show_status(&lab, 2)?;

    banner("5. The traffic graph: interceptor status --graph, and the page on the metrics port");
    println!("$ interceptor status --graph    # on node-2");
    println!("{}", lab.cli_ok(2, &["status", "--graph"])?);
    screenshots(&lab)?;

    banner("Done; the lab is torn down.");
    Ok(())
}

enum Caller<'a> {
    Pod(&'a Pod),
    Outside,
}

fn call(lab: &Lab, caller: Caller<'_>, url: &str) -> anyhow::Result<()> {
    let (mut command, who) = match caller {
        Caller::Pod(pod) => (
            lab.in_pod(pod, "curl")?,
            format!("pod {}/{}", pod.namespace, pod.name),
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
