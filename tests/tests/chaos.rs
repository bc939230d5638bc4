//! Agents killed under load (bounded: 300 new connections per second for 10 s, lab
//! addresses only). A STRICT pod never takes plaintext, nothing crosses the underlay in
//! plaintext, callers see refusals or resets and never hang, and service comes back within
//! 2 s of the restart. A killed source agent resets what it carried, and its pods fail closed.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use interceptor_tests::{
    lab::{Lab, fixture_bin},
    scenario::{probe, records, start_fixture, walkthrough_lab},
};
use serde_json::Value;

const LOAD_MS: u64 = 10_000;

/// Starts `lab-fixture steady` from `command`'s place against `to`.
fn steady(
    mut command: std::process::Command,
    to: &str,
    rate: u64,
    timeout_ms: u64,
) -> anyhow::Result<Child> {
    command
        .args(["steady", "--to", to, "--rate", &rate.to_string()])
        .args(["--duration-ms", &LOAD_MS.to_string()])
        .args(["--timeout-ms", &timeout_ms.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    Ok(command.spawn()?)
}

/// The per-connection lines of a finished `steady` run: (started at ms, outcome, ms taken).
fn outcomes(child: Child) -> anyhow::Result<Vec<(u64, String, u64)>> {
    let out = child.wait_with_output()?;
    String::from_utf8(out.stdout)?
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)?;
            Ok((
                v["at_ms"].as_u64().context("at_ms")?,
                v["outcome"].as_str().context("outcome")?.to_owned(),
                v["ms"].as_u64().context("ms")?,
            ))
        })
        .collect()
}

/// tcpdump on node 2's underlay link, printing every TCP segment with a payload to or from
/// port 8080: plaintext of the tracker's service crossing the network.
fn capture_plaintext(lab: &Lab, file: &Path) -> anyhow::Result<Child> {
    let mut command = lab.on_node(2, "tcpdump")?;
    command
        .args(["-i", "eth0", "-nn", "-l", "-U", "-c", "1000"])
        .arg("tcp port 8080 and (((ip[2:2] - ((ip[0]&0xf)<<2)) - ((tcp[12]&0xf0)>>2)) != 0)")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(file)?)
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .context("starting tcpdump (cargo xtask setup installs it)")?;
    let stderr = child.stderr.take().context("tcpdump stderr")?;
    let mut reader = BufReader::new(stderr);
    // It says "listening on" once the capture is open (after a line about verbosity).
    let mut said = String::new();
    while !said.contains("listening") {
        ensure!(
            reader.read_line(&mut said)? > 0,
            "tcpdump did not start: {said}"
        );
    }
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    Ok(child)
}

#[test]
fn the_destination_agent_killed_under_load_lets_no_plaintext_in_and_service_resumes_within_2_s()
-> anyhow::Result<()> {
    let (mut lab, sleep, tracker) = walkthrough_lab()?;
    let strict = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/mesh-strict.yaml");
    lab.cli_ok(2, &["policy", "apply", strict.to_str().context("path")?])?;
    let capture_file = lab.dir.join("underlay-8080.txt");
    let mut capture = capture_plaintext(&lab, &capture_file)?;

    let to = format!("{}:8080", tracker.ip);
    let started = Instant::now();
    let meshed = steady(lab.in_pod(&sleep, fixture_bin()?)?, &to, 300, 3000)?;
    let outside = steady(lab.on_node(1, fixture_bin()?)?, &to, 50, 1000)?;

    std::thread::sleep(Duration::from_secs(3));
    lab.kill_agent(2)?;
    let killed_at = started.elapsed().as_millis() as u64;
    std::thread::sleep(Duration::from_secs(2));
    lab.start_agent(2)?;
    let restarted_at = started.elapsed().as_millis() as u64;

    let meshed = outcomes(meshed)?;
    let outside = outcomes(outside)?;
    let _ = capture.kill();
    let _ = capture.wait();

    // Callers through the mesh: answered, or refused/reset quickly; never a hang.
    let hangs: Vec<_> = meshed
        .iter()
        .filter(|(_, outcome, ms)| outcome != "data" && *ms > 1000)
        .collect();
    ensure!(hangs.is_empty(), "meshed callers hung: {hangs:?}");
    let failed_while_down = meshed
        .iter()
        .filter(|(at, outcome, _)| *at > killed_at && *at < restarted_at && outcome != "data")
        .count();
    ensure!(
        failed_while_down > 0,
        "no meshed call failed while the destination agent was down ({killed_at}–{restarted_at} ms): the kill did not happen under load"
    );
    // Service resumes within 2 s of the restart: every later connection is answered.
    let late_failures: Vec<_> = meshed
        .iter()
        .filter(|(at, outcome, _)| *at > restarted_at + 2000 && outcome != "data")
        .collect();
    ensure!(
        late_failures.is_empty(),
        "meshed calls still failed more than 2 s after the restart (at {restarted_at} ms): {late_failures:?}"
    );
    ensure!(
        meshed
            .iter()
            .filter(|(at, o, _)| *at > restarted_at + 2000 && o == "data")
            .count()
            > 100,
        "too few calls after the restart to tell"
    );

    // The STRICT pod took no plaintext at any moment, with its agent dead or alive.
    let answered: Vec<_> = outside.iter().filter(|(_, o, _)| o == "data").collect();
    ensure!(
        answered.is_empty(),
        "the STRICT pod answered plaintext: {answered:?}"
    );
    ensure!(
        outside.len() > 400,
        "the outside caller made {} calls",
        outside.len()
    );

    // And nothing of the tracker's service crossed the underlay in plaintext.
    let plaintext = std::fs::read_to_string(&capture_file)?;
    ensure!(
        plaintext.trim().is_empty(),
        "plaintext on the underlay:\n{plaintext}"
    );
    println!(
        "meshed: {} calls, {failed_while_down} failed while the agent was down; outside: {} calls, none answered",
        meshed.len(),
        outside.len()
    );
    Ok(())
}

#[test]
fn the_source_agent_killed_resets_what_it_carried_and_its_pods_fail_closed() -> anyhow::Result<()> {
    let (mut lab, sleep, tracker) = walkthrough_lab()?;
    start_fixture(&mut lab, &tracker, "sink", 9000)?;

    // A connection in flight: half its bytes sent, then a pause while node 1's agent dies.
    let mut sender = lab.in_pod(&sleep, fixture_bin()?)?;
    sender
        .args(["send", "--to", &format!("{}:9000", tracker.ip)])
        .args(["--bytes", "2000000", "--pause-ms", "1500"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let sender = sender.spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    lab.kill_agent(1)?;
    let killed = Instant::now();
    let out = sender.wait_with_output()?;
    ensure!(
        !out.status.success(),
        "the connection in flight completed through a dead agent: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(
        killed.elapsed() < Duration::from_secs(3),
        "the caller hung {:?} after its agent died",
        killed.elapsed()
    );

    // New connections from node 1's pod fail at once, and none reaches the tracker.
    let inbound_before = records(&lab, 2)?.len();
    let (outcome, millis) = probe(
        lab.in_pod(&sleep, fixture_bin()?)?,
        &format!("{}:8080", tracker.ip),
    )?;
    ensure!(
        matches!(outcome.as_str(), "refused" | "reset") && millis < 1000,
        "a pod whose agent is dead got {outcome} after {millis} ms"
    );
    ensure!(
        records(&lab, 2)?.len() == inbound_before,
        "the tracker's node saw a connection from a pod whose agent is dead"
    );
    lab.start_agent(1)?;
    Ok(())
}
