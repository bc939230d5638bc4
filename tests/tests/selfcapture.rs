//! Issue 11 item 4: the agent never captures itself, even when it runs inside the pods cgroup
//! where connect4 is attached (as a DaemonSet's agent does). Root, real kernel, on the lab.

use std::path::Path;

use anyhow::ensure;
use interceptor_tests::{
    lab::{Lab, LabOptions, Pod, fixture_bin},
    scenario::{curl, fixture, records, start_fixture, status_json},
};
use serde_json::Value;

const HTTP_PORT: u16 = 8080;
const SINK_PORT: u16 = 9000;
/// Connections of the concurrent burst through the tunnel.
const BURST: u64 = 20;

/// Pods: `client` (node 1, meshed), `neighbour` (node 1, meshed, HTTP), `server` (node 2,
/// meshed, HTTP and sink) and `outsider` (node 2, not meshed, HTTP); both agents run inside
/// their node's pods cgroup.
struct Cast {
    lab: Lab,
    client: Pod,
    neighbour: Pod,
    server: Pod,
    outsider: Pod,
}

fn cast() -> anyhow::Result<Cast> {
    let mut lab = Lab::new(LabOptions {
        agents_in_pods_cgroup: true,
        ..LabOptions::default()
    })?;
    let client = lab.add_pod(1, "client", "default")?;
    let neighbour = lab.add_pod(1, "neighbour", "default")?;
    let server = lab.add_pod(2, "server", "default")?;
    let outsider = lab.add_pod(2, "outsider", "default")?;
    lab.enroll(&client, "sleep", &[])?;
    lab.enroll(&neighbour, "neighbour", &[])?;
    lab.enroll(&server, "tracker", &[])?;
    start_fixture(&mut lab, &neighbour, "http", HTTP_PORT)?;
    start_fixture(&mut lab, &server, "http", HTTP_PORT)?;
    start_fixture(&mut lab, &server, "sink", SINK_PORT)?;
    start_fixture(&mut lab, &outsider, "http", HTTP_PORT)?;
    for node in [1, 2] {
        ensure_agent_in_pods_cgroup(&lab, node)?;
    }
    Ok(Cast {
        lab,
        client,
        neighbour,
        server,
        outsider,
    })
}

/// The premise of every test here: the agent's process is in a cgroup below the pods
/// cgroup, where capture is attached.
fn ensure_agent_in_pods_cgroup(lab: &Lab, node: u8) -> anyhow::Result<()> {
    let n = lab.node(node)?;
    let cgroup = n.agent_cgroup.clone().unwrap_or_default();
    let pid = lab.agent_pid(node).unwrap_or(0).to_string();
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    ensure!(
        cgroup.starts_with(&n.pods_cgroup) && cgroup != n.pods_cgroup,
        "node {node}'s agent cgroup {} is not below the pods cgroup",
        cgroup.display()
    );
    ensure!(
        procs.lines().any(|line| line == pid),
        "node {node}'s agent (pid {pid}) is not in {}",
        cgroup.display()
    );
    Ok(())
}

/// (redirected, plaintext_accepted) of a node's kernel counters.
fn kernel_counters(lab: &Lab, node: u8) -> anyhow::Result<(u64, u64)> {
    let status = status_json(lab, node, &[])?;
    let count = |name: &str| status["kernel"][name].as_u64();
    match (count("redirected"), count("plaintext_accepted")) {
        (Some(redirected), Some(plaintext)) => Ok((redirected, plaintext)),
        _ => anyhow::bail!("no kernel counters in node {node}'s status: {status}"),
    }
}

/// A pod's HTTP call that must answer within 10 s with the fixture's vehicles.
fn call(lab: &Lab, from: &Pod, to: &Pod) -> anyhow::Result<()> {
    let url = format!("http://{}:{HTTP_PORT}/vehicles/", to.ip);
    let out = curl(lab.in_pod(from, "curl")?, &url, &["--max-time", "10"])?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Vehicle 1"),
        "{} -> {} failed: {}{}",
        from.name,
        to.name,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn has(records: &[Value], wanted: impl Fn(&Value) -> bool) -> bool {
    records.iter().any(wanted)
}

#[test]
fn an_agent_inside_the_pods_cgroup_never_captures_its_own_sockets() -> anyhow::Result<()> {
    let Cast {
        lab,
        client,
        neighbour,
        server,
        outsider,
    } = cast()?;
    let before = [kernel_counters(&lab, 1)?, kernel_counters(&lab, 2)?];

    // Meshed across nodes and on the same node (the agent's tunnel connects and deliveries),
    // and plaintext to a pod outside the mesh (the agent's upstream connect).
    call(&lab, &client, &server)?;
    call(&lab, &client, &neighbour)?;
    call(&lab, &client, &outsider)?;
    let burst = fixture(
        lab.in_pod(&client, fixture_bin()?)?,
        &[
            "many",
            "--to",
            &format!("{}:{SINK_PORT}", server.ip),
            "--connections",
            &BURST.to_string(),
            "--bytes",
            "65536",
        ],
    )?;
    ensure!(
        String::from_utf8_lossy(&burst.stdout).trim() == format!("ok {BURST}"),
        "burst: {}{}",
        String::from_utf8_lossy(&burst.stdout),
        String::from_utf8_lossy(&burst.stderr)
    );

    // The kernel redirected exactly the client's connects: none of the agents' own.
    let after = [kernel_counters(&lab, 1)?, kernel_counters(&lab, 2)?];
    let redirected = [after[0].0 - before[0].0, after[1].0 - before[1].0];
    ensure!(
        redirected == [3 + BURST, 0],
        "redirects on (node 1, node 2): {redirected:?}, expected [{}, 0]: the agent captured \
         its own connects",
        3 + BURST
    );
    // The agents' tunnel listeners accept mesh traffic, not plaintext.
    let plaintext = [after[0].1 - before[0].1, after[1].1 - before[1].1];
    ensure!(
        plaintext == [0, 0],
        "plaintext accepted on (node 1, node 2): {plaintext:?}"
    );

    let sleep = "spiffe://cluster.local/ns/default/sa/sleep";
    let node1 = records(&lab, 1)?;
    let node2 = records(&lab, 2)?;
    ensure!(
        has(&node1, |r| r["direction"] == "outbound"
            && r["security"] == "mutual_tls"
            && r["verdict"] == "allowed"
            && r["destination"] == format!("{}:{HTTP_PORT}", server.ip)
            && r["destination_identity"]
                == "spiffe://cluster.local/ns/default/sa/tracker"),
        "no outbound mutual TLS record to the server: {node1:#?}"
    );
    ensure!(
        has(&node1, |r| r["direction"] == "outbound"
            && r["security"] == "mutual_tls"
            && r["destination"]
                == format!("{}:{HTTP_PORT}", neighbour.ip))
            && has(&node1, |r| r["direction"] == "inbound"
                && r["security"] == "mutual_tls"
                && r["source_identity"] == sleep
                && r["destination"] == format!("{}:{HTTP_PORT}", neighbour.ip)),
        "the same-node call is not mutual TLS both ways: {node1:#?}"
    );
    ensure!(
        has(&node1, |r| r["direction"] == "outbound"
            && r["security"] == "plaintext"
            && r["verdict"] == "allowed"
            && r["destination"]
                == format!("{}:{HTTP_PORT}", outsider.ip)),
        "no outbound plaintext record to the outsider: {node1:#?}"
    );
    let tunnels_in = node2
        .iter()
        .filter(|r| {
            r["direction"] == "inbound"
                && r["security"] == "mutual_tls"
                && r["verdict"] == "allowed"
                && r["source_identity"] == sleep
        })
        .count() as u64;
    ensure!(
        tunnels_in == 1 + BURST,
        "node 2 has {tunnels_in} inbound mutual TLS records, expected {}: {node2:#?}",
        1 + BURST
    );
    for (node, records) in [(1, &node1), (2, &node2)] {
        ensure!(
            !has(records, |r| r["verdict"] != "allowed"
                || (r["direction"] == "inbound"
                    && r["security"] == "plaintext")),
            "node {node} recorded a failure or inbound plaintext: {records:#?}"
        );
    }
    Ok(())
}

#[test]
fn a_restarted_agent_in_a_new_cgroup_is_not_captured_either() -> anyhow::Result<()> {
    // A DaemonSet's new container is a new cgroup, while the pinned capture link stays.
    let Cast {
        mut lab,
        client,
        server,
        ..
    } = cast()?;
    call(&lab, &client, &server)?;
    let mut old_ids = Vec::new();
    for node in [1, 2] {
        old_ids.push(cgroup_id(lab.node(node)?.agent_cgroup.as_deref())?);
        lab.kill_agent(node)?;
        lab.set_agent_cgroup(node, "agent-restarted")?;
        lab.start_agent(node)?;
        ensure_agent_in_pods_cgroup(&lab, node)?;
    }
    for (node, old) in [1, 2].into_iter().zip(old_ids) {
        ensure!(
            cgroup_id(lab.node(node)?.agent_cgroup.as_deref())? != old,
            "node {node}'s agent did not move to a new cgroup"
        );
    }
    let before = kernel_counters(&lab, 1)?.0;
    call(&lab, &client, &server)?;
    let redirected = kernel_counters(&lab, 1)?.0 - before;
    ensure!(
        redirected == 1,
        "node 1 redirected {redirected} connects for one call"
    );
    Ok(())
}

fn cgroup_id(dir: Option<&Path>) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let dir = dir.ok_or_else(|| anyhow::anyhow!("the agent has no cgroup of its own"))?;
    Ok(std::fs::metadata(dir)?.ino())
}
