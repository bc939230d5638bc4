//! Issue 13: pooled HBONE tunnels on the lab (root, real kernel, real TLS and HTTP/2).
//! Connections from one pod to another share pooled tunnels (busy ones spread over
//! `--tunnel-spread`), one stream each; a tunnel carries one pod's connections only; a killed
//! tunnel resets its streams at once; a renewed certificate retires the tunnels made with the
//! old one without cutting their connections, and new connections present the new one.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use interceptor_tests::{
    lab::{Lab, LabOptions, Pod, fixture_bin},
    scenario::{metric_sum, metrics, records, start_fixture, wait_listening},
};
use serde_json::Value;

const SINK_PORT: u16 = 9000;
/// The agent's default `--tunnel-spread`.
const SPREAD: u64 = 2;
const ECHO_PORT: u16 = 7002;

/// Two nodes; pods `client` (account sleep) and `other` (account other) on node 1, `server`
/// on node 2 with a sink and an echo server.
fn pool_lab(agent_args: &[&str]) -> anyhow::Result<(Lab, Pod, Pod, Pod)> {
    let mut lab = Lab::new(LabOptions {
        agent_args: agent_args.iter().map(|a| (*a).to_owned()).collect(),
        ..LabOptions::default()
    })?;
    let client = lab.add_pod(1, "client", "default")?;
    let other = lab.add_pod(1, "other", "default")?;
    let server = lab.add_pod(2, "server", "default")?;
    lab.enroll(&client, "sleep", &[])?;
    lab.enroll(&other, "other", &[])?;
    lab.enroll(&server, "tracker", &[])?;
    start_fixture(&mut lab, &server, "sink", SINK_PORT)?;
    let mut echo = lab.in_pod(&server, fixture_bin()?)?;
    echo.args(["echo", "--port", &ECHO_PORT.to_string()])
        .stdout(Stdio::null());
    lab.spawn(echo)?;
    wait_listening(&lab, &server, ECHO_PORT)?;
    Ok((lab, client, other, server))
}

/// `lab-fixture many` from inside `pod`: concurrent connections, each sending `bytes` and
/// checking the sink's byte count and SHA-256 of them.
fn many(lab: &Lab, pod: &Pod, server: &Pod, connections: u64, bytes: u64) -> anyhow::Result<Child> {
    let mut command = lab.in_pod(pod, fixture_bin()?)?;
    command
        .args(["many", "--to", &format!("{}:{SINK_PORT}", server.ip)])
        .args(["--connections", &connections.to_string()])
        .args(["--bytes", &bytes.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(command.spawn()?)
}

fn succeeded(child: Child, what: &str) -> anyhow::Result<()> {
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Connections held by `lab-fixture hold` in a pod, checked on request.
struct Held {
    child: Child,
    stdin: ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Held {
    fn open(lab: &Lab, pod: &Pod, server: &Pod, connections: usize) -> anyhow::Result<Held> {
        let mut command = lab.in_pod(pod, fixture_bin()?)?;
        command
            .args(["hold", "--to", &format!("{}:{ECHO_PORT}", server.ip)])
            .args([
                "--connections",
                &connections.to_string(),
                "--max-ms",
                "60000",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = command.spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let ready = lines.next().context("hold ended")??;
        ensure!(
            ready == format!("ready {connections}"),
            "hold said {ready:?}"
        );
        Ok(Held {
            child,
            stdin,
            lines,
        })
    }

    /// One round trip on every held connection.
    fn check(&mut self) -> anyhow::Result<Value> {
        writeln!(self.stdin, "check")?;
        self.stdin.flush()?;
        let line = self.lines.next().context("hold ended")??;
        Ok(serde_json::from_str(&line)?)
    }

    fn close(self) -> anyhow::Result<()> {
        drop(self.stdin);
        let mut child = self.child;
        child.wait()?;
        Ok(())
    }
}

fn tunnel_metric(lab: &Lab, node: u8, family: &str, pod: &Pod) -> anyhow::Result<u64> {
    Ok(metric_sum(
        &metrics(lab, node)?,
        family,
        &[&format!("workload=\"{}\"", pod.name)],
    ))
}

/// Waits until `check` holds, for at most `limit`.
fn eventually(
    limit: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<bool> {
    let deadline = Instant::now() + limit;
    loop {
        if check()? {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Established TCP connections in `pod`'s namespace to `server`'s tunnel port.
fn tunnels_in(pod: &Pod, server: &Pod) -> anyhow::Result<usize> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.netns,
            "ss",
            "-Htn",
            "state",
            "established",
        ])
        .args(["dst", &format!("{}:15008", server.ip)])
        .output()?;
    ensure!(out.status.success(), "ss: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

#[test]
fn concurrent_connections_from_one_pod_share_pooled_tunnels_byte_exact() -> anyhow::Result<()> {
    let (lab, client, _other, server) = pool_lab(&["--tunnel-idle-timeout-secs", "2"])?;
    // 50 connections at once, 2 MB each, every byte checked by the sink's SHA-256.
    succeeded(
        many(&lab, &client, &server, 50, 2_000_000)?,
        "50 pooled connections",
    )?;
    let opened = tunnel_metric(&lab, 1, "interceptor_hbone_tunnels_opened_total", &client)?;
    let streams = tunnel_metric(&lab, 1, "interceptor_hbone_streams_opened_total", &client)?;
    // Busy streams spread over --tunnel-spread tunnels, and no more.
    ensure!(
        opened == SPREAD && streams == 50,
        "expected 50 streams over {SPREAD} tunnels, got {streams} over {opened}"
    );
    ensure!(
        tunnels_in(&client, &server)? == SPREAD as usize,
        "{SPREAD} TCP tunnels expected"
    );
    // Each stream is its own connection on the destination, with the caller's own port and
    // its own byte count.
    let sink = format!("{}:{SINK_PORT}", server.ip);
    let mut inbound = Vec::new();
    eventually(Duration::from_secs(3), || {
        inbound = records(&lab, 2)?
            .into_iter()
            .filter(|r| r["direction"] == "inbound" && r["destination"] == sink.as_str())
            .filter(|r| r["open"] == false)
            .collect();
        Ok(inbound.len() >= 50)
    })?;
    let mut callers: Vec<&str> = inbound
        .iter()
        .filter_map(|r| r["source"].as_str())
        .collect();
    callers.sort_unstable();
    callers.dedup();
    ensure!(
        inbound.len() == 50 && callers.len() == 50,
        "50 closed inbound records with distinct callers expected: {} records, {} callers",
        inbound.len(),
        callers.len()
    );
    ensure!(
        inbound
            .iter()
            .all(|r| r["bytes_sent"] == 2_000_000 && r["verdict"] == "allowed"),
        "every stream's bytes are recorded: {inbound:#?}"
    );
    // Idle past --tunnel-idle-timeout-secs: the tunnel closes.
    ensure!(
        eventually(Duration::from_secs(6), || Ok(tunnels_in(&client, &server)?
            == 0
            && tunnel_metric(
                &lab,
                1,
                "interceptor_hbone_tunnels_open",
                &client
            )? == 0))?,
        "the idle tunnel was not closed"
    );
    Ok(())
}

#[test]
fn a_tunnel_never_carries_another_pods_connections() -> anyhow::Result<()> {
    let (lab, client, other, server) = pool_lab(&[])?;
    let first = many(&lab, &client, &server, 30, 200_000)?;
    let second = many(&lab, &other, &server, 30, 200_000)?;
    succeeded(first, "client's connections")?;
    succeeded(second, "other's connections")?;
    for pod in [&client, &other] {
        let opened = tunnel_metric(&lab, 1, "interceptor_hbone_tunnels_opened_total", pod)?;
        ensure!(opened == SPREAD, "{}: {opened} tunnels opened", pod.name);
        ensure!(
            tunnels_in(pod, &server)? == SPREAD as usize,
            "{}: its own {SPREAD} TCP tunnels",
            pod.name
        );
    }
    // The destination learns the caller's identity from the tunnel's certificate alone: every
    // stream from one pod's address carried that pod's identity.
    let inbound: Vec<Value> = records(&lab, 2)?
        .into_iter()
        .filter(|r| r["direction"] == "inbound" && r["verdict"] != "dropped")
        .collect();
    let from = |pod: &Pod, account: &str| {
        inbound
            .iter()
            .filter(|r| {
                r["source"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(&format!("{}:", pod.ip)))
            })
            .map(|r| {
                r["source_identity"]
                    == format!("spiffe://cluster.local/ns/default/sa/{account}").as_str()
            })
            .collect::<Vec<bool>>()
    };
    for (pod, account) in [(&client, "sleep"), (&other, "other")] {
        let streams = from(pod, account);
        ensure!(
            streams.len() == 30 && streams.iter().all(|ok| *ok),
            "{}: {} streams, identities right: {:?}",
            pod.name,
            streams.len(),
            streams
        );
    }
    Ok(())
}

#[test]
fn killed_tunnels_reset_their_streams_at_once_and_the_next_connection_opens_a_new_one()
-> anyhow::Result<()> {
    let (lab, client, _other, server) = pool_lab(&[])?;
    let mut held = Held::open(&lab, &client, &server, 20)?;
    let before = held.check()?;
    ensure!(before["ok"] == 20, "held connections work: {before}");
    ensure!(
        tunnels_in(&client, &server)? == SPREAD as usize,
        "{SPREAD} TCP tunnels expected"
    );
    // Kill the tunnels' TCP connections in the client pod (a reset to the peer agent too).
    let out = Command::new("ip")
        .args(["netns", "exec", &client.netns, "ss", "-K", "-tn"])
        .args(["dst", &server.ip.to_string(), "dport", "=", "15008"])
        .output()?;
    ensure!(out.status.success(), "ss -K: {out:?}");
    ensure!(
        tunnels_in(&client, &server)? == 0,
        "the tunnel is still there"
    );
    let after = held.check()?;
    let ended = after["reset"].as_u64().unwrap_or(0) + after["eof"].as_u64().unwrap_or(0);
    ensure!(
        ended == 20 && after["timeout"] == 0,
        "every stream of the killed tunnel must end, none hang: {after}"
    );
    ensure!(
        after["slowest_ms"].as_u64().unwrap_or(u64::MAX) < 1000,
        "streams took too long to end: {after}"
    );
    held.close()?;
    // The next connection opens a new tunnel.
    succeeded(many(&lab, &client, &server, 1, 1000)?, "a new connection")?;
    let opened = tunnel_metric(&lab, 1, "interceptor_hbone_tunnels_opened_total", &client)?;
    ensure!(
        opened == SPREAD + 1,
        "a new tunnel expected, {opened} opened in all"
    );
    Ok(())
}

#[test]
fn after_certificate_renewal_new_streams_use_a_new_tunnel_and_old_ones_finish() -> anyhow::Result<()>
{
    // 8 s certificates: renewed after 4 s, checked every second.
    let (lab, client, _other, server) = pool_lab(&["--cert-lifetime-secs", "8"])?;
    let mut held = Held::open(&lab, &client, &server, 1)?;
    ensure!(tunnel_metric(&lab, 1, "interceptor_hbone_tunnels_opened_total", &client)? == 1);
    ensure!(
        eventually(Duration::from_secs(10), || Ok(lab
            .agent_log(1)
            .contains("certificate rotated")))?,
        "node 1 did not renew its certificates"
    );
    succeeded(
        many(&lab, &client, &server, 1, 1000)?,
        "a connection after renewal",
    )?;
    let opened = tunnel_metric(&lab, 1, "interceptor_hbone_tunnels_opened_total", &client)?;
    ensure!(
        opened == 2,
        "a tunnel with the new certificate expected, {opened} opened"
    );
    // The destination saw which certificate each tunnel presented: the new connection's is
    // one node 1 renewed, the held connection's the one from before.
    let renewed: Vec<String> = lab
        .agent_log(1)
        .lines()
        .filter(|line| line.contains("certificate rotated") && line.contains("/sa/sleep"))
        .filter_map(|line| {
            let serial = line.split("serial=").nth(1)?;
            Some(serial.chars().take_while(char::is_ascii_hexdigit).collect())
        })
        .collect();
    let serial_of = |node: u8, direction: &str, port: u16| -> anyhow::Result<String> {
        let record = records(&lab, node)?
            .into_iter()
            .rev()
            .find(|r| {
                r["direction"] == direction
                    && r["destination"] == format!("{}:{port}", server.ip).as_str()
            })
            .with_context(|| format!("no {direction} record to port {port} on node {node}"))?;
        Ok(record["peer_certificate_serial"]
            .as_str()
            .with_context(|| format!("no certificate serial in {record}"))?
            .to_owned())
    };
    let (old, new) = (
        serial_of(2, "inbound", ECHO_PORT)?,
        serial_of(2, "inbound", SINK_PORT)?,
    );
    ensure!(
        renewed.contains(&new) && !renewed.contains(&old) && !old.is_empty(),
        "the new connection rode on certificate {new}, the held one on {old}; node 1 renewed \
         {renewed:?}"
    );
    // Node 1's record names the certificate the destination presented.
    let destination = serial_of(1, "outbound", SINK_PORT)?;
    ensure!(
        destination.len() >= 16 && destination.chars().all(|c| c.is_ascii_hexdigit()),
        "the destination's certificate serial: {destination:?}"
    );
    // The old tunnel still carries its connection...
    let check = held.check()?;
    ensure!(
        check["ok"] == 1,
        "the connection on the old tunnel broke: {check}"
    );
    // ...and closes once that connection ends (the new one is idle but within its timeout).
    held.close()?;
    ensure!(
        eventually(Duration::from_secs(3), || Ok(tunnel_metric(
            &lab,
            1,
            "interceptor_hbone_tunnels_open",
            &client
        )? == 1))?,
        "the retired tunnel did not close after its last stream"
    );
    Ok(())
}
