//! Issue 9: what a hostile caller can do to the tunnel port, and the agent at its limits, on
//! the lab (root, real kernel). The full-size flood (20,000 idle connects) and the memory
//! rounds are in `cargo xtask soak`.

use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use interceptor_tests::{
    lab::{Lab, LabOptions, Pod, fixture_bin},
    scenario::{curl, metric_sum, metrics, records, start_fixture},
};
use serde_json::Value;

const HTTP_PORT: u16 = 8080;
const ECHO_ONCE_PORT: u16 = 7001;
const ECHO_PORT: u16 = 7002;

/// Two nodes with `agent_args` for both agents; pod `client` on node 1 and `server` on
/// node 2, enrolled, with an HTTP server, a one-shot echo server and an echo server.
fn lab_with(options: LabOptions) -> anyhow::Result<(Lab, Pod, Pod)> {
    let mut lab = Lab::new(options)?;
    let client = lab.add_pod(1, "client", "default")?;
    let server = lab.add_pod(2, "server", "default")?;
    lab.enroll(&client, "sleep", &[])?;
    lab.enroll(&server, "tracker", &[])?;
    start_fixture(&mut lab, &server, "http", HTTP_PORT)?;
    let mut once = lab.in_pod(&server, fixture_bin()?)?;
    once.args([
        "echo",
        "--port",
        &ECHO_ONCE_PORT.to_string(),
        "--once",
        "64",
    ])
    .stdout(Stdio::null());
    lab.spawn(once)?;
    interceptor_tests::scenario::wait_listening(&lab, &server, ECHO_ONCE_PORT)?;
    let mut echo = lab.in_pod(&server, fixture_bin()?)?;
    echo.args(["echo", "--port", &ECHO_PORT.to_string()])
        .stdout(Stdio::null());
    lab.spawn(echo)?;
    interceptor_tests::scenario::wait_listening(&lab, &server, ECHO_PORT)?;
    Ok((lab, client, server))
}

fn agent_args(args: &[&str]) -> LabOptions {
    LabOptions {
        agent_args: args.iter().map(|a| (*a).to_owned()).collect(),
        ..LabOptions::default()
    }
}

/// `lab-fixture idle` from node 1's namespace (outside the mesh), started in the background.
fn start_idle(lab: &Lab, to: &str, extra: &[&str]) -> anyhow::Result<Child> {
    let mut command = lab.on_node(1, fixture_bin()?)?;
    command
        .args(["idle", "--to", to])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(command.spawn()?)
}

fn json_output(child: Child) -> anyhow::Result<Value> {
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .with_context(|| format!("fixture printed {text:?}"))
}

fn number(value: &Value, key: &str) -> u64 {
    value[key].as_u64().unwrap_or(u64::MAX)
}

#[test]
fn idle_and_slow_callers_on_the_tunnel_port_are_capped_and_cut_off_while_meshed_calls_work()
-> anyhow::Result<()> {
    const IDLE: u64 = 1500;
    const SLOW: u64 = 200;
    const PER_SOURCE: u64 = 300;
    let (lab, client, server) = lab_with(agent_args(&[
        "--tunnel-handshake-timeout-secs",
        "2",
        "--tunnel-max-pending-per-source",
        &PER_SOURCE.to_string(),
    ]))?;
    let tunnel = format!("{}:15008", server.ip);
    // Callers outside the mesh: idle connects, and slow ones sending a byte every 500 ms.
    let slow = start_idle(
        &lab,
        &tunnel,
        &[
            "--connections",
            &SLOW.to_string(),
            "--trickle-ms",
            "500",
            "--watch-ms",
            "8000",
        ],
    )?;
    std::thread::sleep(Duration::from_millis(200));
    let idle = start_idle(
        &lab,
        &tunnel,
        &["--connections", &IDLE.to_string(), "--watch-ms", "8000"],
    )?;
    // Meshed calls p1 -> p2, each a new connection (so a new tunnel), during the flood.
    let probes = lab
        .in_pod(&client, fixture_bin()?)?
        .args([
            "conn-rate",
            "--to",
            &format!("{}:{ECHO_ONCE_PORT}", server.ip),
            "--size",
            "64",
            "--threads",
            "1",
            "--duration-ms",
            "6000",
            "--max",
            "3000",
        ])
        .stdin(Stdio::null())
        .output()?;
    let slow = json_output(slow)?;
    let idle = json_output(idle)?;
    let text = String::from_utf8_lossy(&probes.stdout);
    let probes: Value =
        serde_json::from_str(text.trim()).with_context(|| format!("conn-rate printed {text:?}"))?;
    ensure!(
        number(&probes, "errors") == 0 && number(&probes, "connections") >= 50,
        "meshed calls failed during the flood: {probes}"
    );
    for (name, result, total) in [("idle", &idle, IDLE), ("slow", &slow, SLOW)] {
        ensure!(
            number(result, "connected") == total,
            "{name}: not every connect was accepted by the kernel: {result}"
        );
        ensure!(
            number(result, "open_at_end") == 0,
            "{name}: connections still open 8 s after the last connect: {result}"
        );
        ensure!(
            number(result, "closed_ms_max") < 4000,
            "{name}: a connection outlived the 2 s handshake deadline: {result}"
        );
    }
    // Over the per-source cap, connections were reset at once.
    ensure!(
        number(&idle, "reset") >= IDLE + SLOW - PER_SOURCE,
        "fewer resets than connections over the cap: {idle}"
    );
    ensure!(
        number(&idle, "closed_ms_min") < 500,
        "over-cap connections were not reset at once: {idle}"
    );
    // Every refusal is counted, and the records aggregate them per source.
    let text = metrics(&lab, 2)?;
    let refused = metric_sum(
        &text,
        "interceptor_refused_connections_total",
        &["listener=\"tunnel\""],
    );
    ensure!(
        refused == IDLE + SLOW,
        "refusals counted {refused}, expected {}:\n{text}",
        IDLE + SLOW
    );
    ensure!(
        metric_sum(
            &text,
            "interceptor_refused_connections_total",
            &["reason=\"pending_limit_source\""]
        ) >= IDLE + SLOW - PER_SOURCE,
        "no per-source cap refusals counted:\n{text}"
    );
    ensure!(
        metric_sum(
            &text,
            "interceptor_refused_connections_total",
            &["reason=\"handshake_timeout\""]
        ) >= 1,
        "no handshake timeouts counted:\n{text}"
    );
    let noise: Vec<Value> = records(&lab, 2)?
        .into_iter()
        .filter(|r| {
            r["source"]
                .as_str()
                .is_some_and(|s| s.starts_with("198.18.0.11:"))
        })
        .collect();
    let counted: u64 = noise.iter().map(|r| number(r, "count")).sum();
    ensure!(
        counted == IDLE + SLOW && noise.len() <= 6,
        "expected a few aggregated records counting {}, got {} records counting {counted}: {noise:#?}",
        IDLE + SLOW,
        noise.len()
    );
    Ok(())
}

#[test]
fn the_records_of_real_connections_survive_a_flood_of_refused_handshakes() -> anyhow::Result<()> {
    const FLOOD: u64 = 2000;
    let (lab, client, server) = lab_with(agent_args(&["--record-capacity", "200"]))?;
    let url = format!("http://{}:{HTTP_PORT}/vehicles/", server.ip);
    for _ in 0..20 {
        let out = curl(lab.in_pod(&client, "curl")?, &url, &[])?;
        ensure!(
            String::from_utf8_lossy(&out.stdout).contains("Vehicle 1"),
            "meshed call failed: {out:?}"
        );
    }
    // Plaintext HTTP at the tunnel port: each handshake fails at once.
    let flood = start_idle(
        &lab,
        &format!("{}:15008", server.ip),
        &[
            "--connections",
            &FLOOD.to_string(),
            "--payload",
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "--watch-ms",
            "5000",
        ],
    )?;
    let flood = json_output(flood)?;
    ensure!(
        number(&flood, "open_at_end") == 0,
        "flood connections left open: {flood}"
    );
    let records = records(&lab, 2)?;
    let real = records
        .iter()
        .filter(|r| {
            r["direction"] == "inbound"
                && r["verdict"] == "allowed"
                && r["source_identity"] == "spiffe://cluster.local/ns/default/sa/sleep"
        })
        .count();
    ensure!(
        real == 20,
        "{real} of 20 real connections left in the records after the flood"
    );
    let refused: u64 = records
        .iter()
        .filter(|r| r["verdict"] == "dropped")
        .map(|r| number(r, "count"))
        .sum();
    ensure!(
        refused == FLOOD,
        "the aggregated records count {refused} refusals, expected {FLOOD}"
    );
    let text = metrics(&lab, 2)?;
    ensure!(
        metric_sum(
            &text,
            "interceptor_refused_connections_total",
            &["reason=\"handshake_failed\""]
        ) == FLOOD,
        "metrics do not count every refused handshake:\n{text}"
    );
    Ok(())
}

#[test]
fn an_agent_at_its_open_file_limit_resets_what_it_cannot_serve_and_recovers() -> anyhow::Result<()>
{
    const LIMIT: u64 = 192;
    const CONNECTIONS: u64 = 300;
    let (lab, client, server) = lab_with(LabOptions {
        agent_nofile: Some(LIMIT),
        ..LabOptions::default()
    })?;
    for node in [1, 2] {
        let log = lab.agent_log(node);
        ensure!(
            log.contains("open-file limit is low: 192"),
            "node {node} did not warn about its open-file limit:\n{log}"
        );
    }
    let echo = format!("{}:{ECHO_PORT}", server.ip);
    let started = Instant::now();
    let out = lab
        .in_pod(&client, fixture_bin()?)?
        .args([
            "attempt",
            "--to",
            &echo,
            "--connections",
            &CONNECTIONS.to_string(),
            "--threads",
            "8",
        ])
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let outcome: Value = serde_json::from_str(text.trim()).with_context(|| {
        format!(
            "attempt printed {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    ensure!(
        number(&outcome, "timeout") == 0,
        "connections hung at the limit instead of being reset: {outcome}"
    );
    ensure!(
        number(&outcome, "ok") >= 40,
        "too few connections served below the limit: {outcome}"
    );
    ensure!(
        number(&outcome, "reset") + number(&outcome, "eof") + number(&outcome, "refused") >= 1,
        "{CONNECTIONS} connections fit under an open-file limit of {LIMIT}: {outcome}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(60),
        "the attempts took {:?}",
        started.elapsed()
    );
    // Each agent that ran out says so, naming the limit.
    let clear = |node: u8| -> anyhow::Result<bool> {
        Ok(records(&lab, node)?.iter().any(|r| {
            r["reason"].as_str().is_some_and(|s| {
                s.contains("no free file descriptor") && s.contains("RLIMIT_NOFILE 192")
            })
        }))
    };
    ensure!(
        clear(1)? || clear(2)?,
        "no record names the open-file limit: {:#?}",
        records(&lab, 2)?
    );
    // The load is gone (the client exited): the mesh serves again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let url = format!("http://{}:{HTTP_PORT}/vehicles/", server.ip);
    loop {
        let out = curl(lab.in_pod(&client, "curl")?, &url, &[])?;
        if String::from_utf8_lossy(&out.stdout).contains("Vehicle 1") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the mesh did not recover after the load: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = lab
        .in_pod(&client, fixture_bin()?)?
        .args([
            "attempt",
            "--to",
            &echo,
            "--connections",
            "30",
            "--threads",
            "4",
        ])
        .stdin(Stdio::null())
        .output()?;
    let after: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        number(&after, "ok") == 30,
        "after the load, not every connection worked: {after}"
    );
    Ok(())
}

/// Issue 13 item 4: the agents' runtime threads run at niceness -5 by default (`--nice`), so
/// their relays preempt CPU-bound work on wake-up; and calls through the mesh work at it.
#[test]
fn the_agents_runtime_threads_run_at_the_default_niceness() -> anyhow::Result<()> {
    let (lab, client, server) = lab_with(LabOptions::default())?;
    for node in [1, 2] {
        let pid = lab.agent_pid(node).context("agent is not running")?;
        let mut runtime_threads = 0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let task = task?.path();
            let name = std::fs::read_to_string(task.join("comm"))?;
            let name = name.trim();
            // jemalloc's purging threads start before main and keep the inherited niceness.
            if name.starts_with("jemalloc") {
                continue;
            }
            let stat = std::fs::read_to_string(task.join("stat"))?;
            // Fields after the command name (in parentheses): niceness is field 19, the
            // 17th after it.
            let after_name = stat.rsplit_once(')').context("stat has no command name")?.1;
            let nice: i32 = after_name
                .split_whitespace()
                .nth(16)
                .context("stat too short")?
                .parse()?;
            ensure!(
                nice == -5,
                "node {node}: thread {name} ({}) runs at niceness {nice}, not -5",
                task.display()
            );
            runtime_threads += usize::from(name == "tokio-rt-worker");
        }
        ensure!(runtime_threads > 0, "node {node}: no runtime thread found");
        ensure!(
            lab.agent_log(node)
                .contains("scheduling niceness of the agent's threads"),
            "node {node} did not log its niceness"
        );
    }
    let url = format!("http://{}:{HTTP_PORT}/", server.ip);
    let out = curl(lab.in_pod(&client, "curl")?, &url, &[])?;
    ensure!(
        out.status.success(),
        "call through the mesh failed: {out:?}"
    );
    Ok(())
}
