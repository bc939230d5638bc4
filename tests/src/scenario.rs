//! Steps shared by the integration tests and the demo: start test servers in pods, call
//! them, and read what the agents recorded.

use std::{
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::ensure;
use serde_json::Value;

use crate::lab::{Lab, LabOptions, Pod, fixture_bin};

/// Starts `lab-fixture <kind> --port <port>` in a pod and waits until it listens.
pub fn start_fixture(lab: &mut Lab, pod: &Pod, kind: &str, port: u16) -> anyhow::Result<()> {
    start_fixture_with(lab, pod, kind, port, &[])
}

/// Like [`start_fixture`], with extra fixture arguments (for example `--bind 127.0.0.1`).
pub fn start_fixture_with(
    lab: &mut Lab,
    pod: &Pod,
    kind: &str,
    port: u16,
    extra: &[&str],
) -> anyhow::Result<()> {
    let mut command = lab.in_pod(pod, fixture_bin()?)?;
    command
        .args([kind, "--port", &port.to_string()])
        .args(extra)
        .stdout(Stdio::null());
    lab.spawn(command)?;
    wait_listening(lab, pod, port)
}

/// Waits until something listens on a TCP port in a pod.
pub fn wait_listening(lab: &Lab, pod: &Pod, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let out = lab
            .in_pod(pod, "ss")?
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()?;
        if !out.stdout.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("nothing listens on {}:{port}", pod.name)
}

/// Runs curl with a time limit, extra arguments and the URL.
pub fn curl(mut command: Command, url: &str, extra: &[&str]) -> anyhow::Result<Output> {
    Ok(command
        .args(["-sS", "--max-time", "60"])
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .output()?)
}

/// A fixture client command in a pod or on a node.
pub fn fixture(mut command: Command, args: &[&str]) -> anyhow::Result<Output> {
    Ok(command.args(args).stdin(Stdio::null()).output()?)
}

/// `lab-fixture probe` from `command`'s place: (outcome, milliseconds).
pub fn probe(command: Command, to: &str) -> anyhow::Result<(String, u64)> {
    let out = fixture(command, &["probe", "--to", to])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut fields = text.split_whitespace();
    let outcome = fields.next().unwrap_or("").to_owned();
    let millis = fields
        .next()
        .unwrap_or("")
        .parse::<u64>()
        .unwrap_or(u64::MAX);
    ensure!(
        !outcome.is_empty(),
        "probe printed nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((outcome, millis))
}

/// `interceptor status --output json` of a node, parsed.
pub fn status_json(lab: &Lab, node: u8, filters: &[&str]) -> anyhow::Result<Value> {
    let mut args = vec!["status", "--output", "json"];
    args.extend_from_slice(filters);
    Ok(serde_json::from_str(&lab.cli_ok(node, &args)?)?)
}

/// The records of a node's status.
pub fn records(lab: &Lab, node: u8) -> anyhow::Result<Vec<Value>> {
    Ok(status_json(lab, node, &[])?["records"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// The cast of Istio's walkthrough on a two-node lab: a meshed `sleep` pod (namespace foo) on
/// node 1 and a meshed `position-tracker` pod (namespace vehicles) on node 2 serving
/// `/vehicles/` on 8080. Returns (lab, sleep, tracker).
pub fn walkthrough_lab() -> anyhow::Result<(Lab, Pod, Pod)> {
    walkthrough_lab_with(LabOptions::default())
}

/// [`walkthrough_lab`] on a lab built with `options`.
pub fn walkthrough_lab_with(options: LabOptions) -> anyhow::Result<(Lab, Pod, Pod)> {
    walkthrough_cast(options, &[("app", "position-tracker")])
}

/// [`walkthrough_lab`] with these labels on the tracker.
pub fn walkthrough_lab_labelled(
    tracker_labels: &[(&str, &str)],
) -> anyhow::Result<(Lab, Pod, Pod)> {
    walkthrough_cast(LabOptions::default(), tracker_labels)
}

fn walkthrough_cast(
    options: LabOptions,
    tracker_labels: &[(&str, &str)],
) -> anyhow::Result<(Lab, Pod, Pod)> {
    let mut lab = Lab::new(options)?;
    let sleep = lab.add_pod(1, "sleep", "foo")?;
    let tracker = lab.add_pod(2, "position-tracker", "vehicles")?;
    lab.enroll(&sleep, "sleep", &[("app", "sleep")])?;
    lab.enroll(&tracker, "position-tracker", tracker_labels)?;
    start_fixture(&mut lab, &tracker, "http", 8080)?;
    Ok((lab, sleep, tracker))
}

/// The DaemonSet's `terminationGracePeriodSeconds` (deploy/base/daemonset.yaml): how long the
/// kubelet waits after SIGTERM before it kills the agent.
pub fn daemonset_grace_period() -> anyhow::Result<Duration> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/daemonset.yaml");
    let text = std::fs::read_to_string(path)?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)?;
    let seconds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .and_then(|d| d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64());
    let seconds = anyhow::Context::context(
        seconds,
        "deploy/base/daemonset.yaml: no DaemonSet with terminationGracePeriodSeconds",
    )?;
    Ok(Duration::from_secs(seconds))
}

/// The walkthrough's three calls to the tracker: from the meshed sleep pod (mutual TLS), from
/// node 1 outside the mesh under PERMISSIVE (plaintext, allowed), then, after
/// `policies/mesh-strict.yaml` is applied on node 2, from outside again (dropped).
pub fn walkthrough_calls(lab: &Lab, sleep: &Pod, tracker: &Pod) -> anyhow::Result<()> {
    let url = format!("http://{}:8080/vehicles/", tracker.ip);
    let meshed = curl(lab.in_pod(sleep, "curl")?, &url, &[])?;
    ensure!(meshed.status.success(), "meshed call: {meshed:?}");
    let outside = curl(lab.on_node(1, "curl")?, &url, &[])?;
    ensure!(outside.status.success(), "PERMISSIVE call: {outside:?}");
    let policy =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/mesh-strict.yaml");
    let policy = policy
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("policy path"))?;
    lab.cli_ok(2, &["policy", "apply", policy])?;
    let (outcome, _) = probe(
        lab.on_node(1, fixture_bin()?)?,
        &format!("{}:8080", tracker.ip),
    )?;
    ensure!(
        outcome == "refused" || outcome == "reset",
        "STRICT call gave {outcome}"
    );
    Ok(())
}

/// The agent's `/metrics`, from inside its node's namespace.
pub fn metrics(lab: &Lab, node: u8) -> anyhow::Result<String> {
    let addr = lab.node(node)?.metrics_addr.clone();
    let out = curl(
        lab.on_node(node, "curl")?,
        &format!("http://{addr}/metrics"),
        &[],
    )?;
    anyhow::ensure!(out.status.success(), "metrics: {out:?}");
    Ok(String::from_utf8(out.stdout)?)
}

/// Sum of a metric family's samples whose labels contain every one of `labels`.
pub fn metric_sum(text: &str, family: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
