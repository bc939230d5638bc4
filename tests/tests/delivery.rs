//! Issue 9, item 2: mesh traffic reaches the app at the pod's own address with the caller's
//! address, never over the pod's loopback; the STRICT door still refuses outside and spoofed
//! plaintext (root, real kernel).

use std::time::{Duration, Instant};

use anyhow::ensure;
use interceptor_tests::{
    lab::{Lab, LabOptions, Pod, fixture_bin},
    scenario::{curl, fixture, probe, records, start_fixture_with, status_json},
};
use serde_json::Value;

/// Pod `client` on node 1 and pod `server` on node 2, both enrolled, no servers yet.
fn two_pods() -> anyhow::Result<(Lab, Pod, Pod)> {
    let mut lab = Lab::new(LabOptions::default())?;
    let client = lab.add_pod(1, "client", "default")?;
    let server = lab.add_pod(2, "server", "default")?;
    lab.enroll(&client, "sleep", &[("app", "sleep")])?;
    lab.enroll(&server, "tracker", &[("app", "position-tracker")])?;
    Ok((lab, client, server))
}

/// Applies the mesh-wide STRICT example policy on the server's node.
fn mesh_strict(lab: &Lab) -> anyhow::Result<()> {
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/mesh-strict.yaml");
    lab.cli_ok(2, &["policy", "apply", file.to_str().unwrap_or_default()])?;
    Ok(())
}

/// `GET /peer` from the meshed client: the caller's address as the server app saw it.
fn peer_seen_by_app(lab: &Lab, client: &Pod, to: &str) -> anyhow::Result<String> {
    let out = curl(
        lab.in_pod(client, "curl")?,
        &format!("http://{to}/peer"),
        &[],
    )?;
    ensure!(
        out.status.success(),
        "meshed call to {to} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Polls node's records until one matches, for up to 5 s (kernel events are asynchronous).
fn wait_for_record(
    lab: &Lab,
    node: u8,
    what: &str,
    matches: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let records = records(lab, node)?;
        if let Some(found) = records.iter().find(|r| matches(r)) {
            return Ok(found.clone());
        }
        ensure!(
            Instant::now() < deadline,
            "node {node} has no record of {what}: {records:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kernel_counter(lab: &Lab, node: u8, name: &str) -> anyhow::Result<u64> {
    Ok(status_json(lab, node, &[])?["kernel"][name]
        .as_u64()
        .unwrap_or(0))
}

#[test]
fn a_service_bound_only_to_loopback_is_unreachable_from_the_mesh() -> anyhow::Result<()> {
    let (mut lab, client, server) = two_pods()?;
    start_fixture_with(&mut lab, &server, "http", 7000, &["--bind", "127.0.0.1"])?;
    // The service is up: the pod itself reaches it over its loopback.
    let local = curl(
        lab.in_pod_netns(&server, "curl")?,
        "http://127.0.0.1:7000/vehicles/",
        &[],
    )?;
    ensure!(
        String::from_utf8_lossy(&local.stdout).contains("Vehicle 1"),
        "the loopback-only service is not up: {}",
        String::from_utf8_lossy(&local.stderr)
    );
    let target = format!("{}:7000", server.ip);
    for (round, mode) in ["PERMISSIVE", "STRICT"].into_iter().enumerate() {
        if mode == "STRICT" {
            mesh_strict(&lab)?;
        }
        let (outcome, millis) = probe(lab.in_pod(&client, fixture_bin()?)?, &target)?;
        ensure!(
            matches!(outcome.as_str(), "refused" | "reset"),
            "{mode}: the meshed caller reached a loopback-only service ({outcome})"
        );
        ensure!(millis < 1000, "{mode}: the refusal took {millis} ms");
        // The destination's agent says why, once per attempt.
        let refused = records(&lab, 2)?
            .into_iter()
            .filter(|r| {
                r["direction"] == "inbound"
                    && r["destination"] == target.as_str()
                    && r["verdict"] == "failed"
                    && r["reason"]
                        .as_str()
                        .unwrap_or("")
                        .contains("destination refused the connection")
            })
            .count();
        ensure!(
            refused == round + 1,
            "{mode}: expected {} refused deliveries on node 2, saw {refused}: {:#?}",
            round + 1,
            records(&lab, 2)?
        );
    }
    Ok(())
}

#[test]
fn an_app_bound_to_the_pod_ip_is_reached_over_mutual_tls_and_sees_the_caller() -> anyhow::Result<()>
{
    let (mut lab, client, server) = two_pods()?;
    let pod_ip = server.ip.to_string();
    start_fixture_with(&mut lab, &server, "http", 8080, &["--bind", &pod_ip])?;
    start_fixture_with(&mut lab, &server, "http", 8081, &["--bind", "0.0.0.0"])?;
    for port in [8080, 8081] {
        let peer = peer_seen_by_app(&lab, &client, &format!("{}:{port}", server.ip))?;
        ensure!(
            peer.starts_with(&format!("{}:", client.ip)),
            "the app on port {port} saw the caller as {peer}, not {}",
            client.ip
        );
        wait_for_record(&lab, 2, "the mutual TLS delivery", |r| {
            r["direction"] == "inbound"
                && r["security"] == "mutual_tls"
                && r["verdict"] == "allowed"
                && r["destination"] == format!("{}:{port}", server.ip)
                && r["source_identity"] == "spiffe://cluster.local/ns/default/sa/sleep"
        })?;
    }
    // A pod calling its own address goes through the mesh too, and sees itself.
    let own = peer_seen_by_app(&lab, &server, &format!("{}:8080", server.ip))?;
    ensure!(
        own.starts_with(&format!("{}:", server.ip)),
        "a pod calling itself was seen as {own}"
    );
    // The agent's own delivery to the pod's address is not mistaken for outside plaintext.
    std::thread::sleep(Duration::from_millis(300));
    let plaintext: Vec<Value> = records(&lab, 2)?
        .into_iter()
        .filter(|r| r["security"] == "plaintext")
        .collect();
    ensure!(
        plaintext.is_empty(),
        "deliveries recorded as plaintext: {plaintext:#?}"
    );
    let accepted = kernel_counter(&lab, 2, "plaintext_accepted")?;
    ensure!(
        accepted == 0,
        "the kernel counted {accepted} plaintext connections"
    );
    Ok(())
}

#[test]
fn strict_passes_the_mesh_but_refuses_outside_and_spoofed_plaintext() -> anyhow::Result<()> {
    let (mut lab, client, server) = two_pods()?;
    let pod_ip = server.ip.to_string();
    start_fixture_with(&mut lab, &server, "http", 8080, &["--bind", &pod_ip])?;
    mesh_strict(&lab)?;
    let target = format!("{}:8080", server.ip);

    let peer = peer_seen_by_app(&lab, &client, &target)?;
    ensure!(
        peer.starts_with(&format!("{}:", client.ip)),
        "STRICT: the app saw the meshed caller as {peer}"
    );

    let (outcome, _) = probe(lab.on_node(1, fixture_bin()?)?, &target)?;
    ensure!(
        matches!(outcome.as_str(), "refused" | "reset"),
        "STRICT: outside plaintext gave {outcome}"
    );

    // Forged sources, sent from the server's node as an attacker on the path would: a meshed
    // pod's address, then the pod's own address (with accept_local on, so the kernel's
    // martian-source check does not stop it before the door does).
    let drops_before = kernel_counter(&lab, 2, "strict_drops")?;
    let accept_local = lab
        .in_pod_netns(&server, "sh")?
        .args([
            "-c",
            "echo 1 > /proc/sys/net/ipv4/conf/all/accept_local && echo 1 > /proc/sys/net/ipv4/conf/eth0/accept_local",
        ])
        .status()?;
    ensure!(accept_local.success(), "setting accept_local in the pod");
    for forged in [client.ip, server.ip] {
        let out = fixture(
            lab.on_node(2, fixture_bin()?)?,
            &["spoof", "--from", &forged.to_string(), "--to", &target],
        )?;
        let outcome = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        ensure!(
            out.status.success() && outcome != "connected",
            "a SYN forged from {forged} got through: {outcome} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_for_record(&lab, 2, &format!("the refused SYN from {forged}"), |r| {
            r["verdict"] == "dropped"
                && r["security"] == "plaintext"
                && r["destination"] == target.as_str()
                && r["source"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(&format!("{forged}:")))
        })?;
    }
    let drops = kernel_counter(&lab, 2, "strict_drops")? - drops_before;
    ensure!(
        drops >= 2,
        "the door counted {drops} refusals of forged SYNs"
    );

    // The app served only the meshed caller: its first request and this one.
    let served = curl(
        lab.in_pod(&client, "curl")?,
        &format!("http://{target}/requests"),
        &[],
    )?;
    ensure!(
        String::from_utf8_lossy(&served.stdout).trim() == "2",
        "the app served {} requests, expected the meshed caller's two",
        String::from_utf8_lossy(&served.stdout)
    );
    Ok(())
}

#[test]
fn enrolling_sets_up_the_pod_routing_and_removing_restores_it() -> anyhow::Result<()> {
    let (lab, _client, server) = two_pods()?;
    let rules = || -> anyhow::Result<String> {
        let out = std::process::Command::new("ip")
            .args(["-n", &server.netns, "rule", "show"])
            .output()?;
        Ok(String::from_utf8(out.stdout)?)
    };
    let enrolled = rules()?;
    ensure!(
        enrolled.starts_with(
            "1:\tfrom all fwmark 0x15080000 lookup 15008\n2:\tfrom all lookup local\n"
        ),
        "enrolled pod's rules:\n{enrolled}"
    );
    lab.cli_ok(
        2,
        &["workload", "remove", "--name", "server", "-n", "default"],
    )?;
    let removed = rules()?;
    ensure!(
        removed.starts_with("0:\tfrom all lookup local\n32766:"),
        "removed pod's rules:\n{removed}"
    );
    Ok(())
}
