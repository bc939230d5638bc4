//! The agent's saved state under faults: killed in the middle of `policy apply` and
//! `workload add`, and a state directory that is full. The saved state is the old one or the
//! new one, never torn; a write that fails is an error that names the file, and the running
//! state stays as it was.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, ensure};
use interceptor_tests::{
    lab::{Lab, fixture_bin, interceptor_bin, netns_path},
    scenario::{probe, walkthrough_lab},
};
use serde_json::Value;

/// How many policies the batch holds: enough that saving it takes a while.
const BATCH: usize = 200;

/// A file of `BATCH` namespace-wide PERMISSIVE policies named `batch-<round>`, in
/// namespaces `chaos-<n>`.
fn write_batch(dir: &Path, round: usize) -> anyhow::Result<PathBuf> {
    let text: String = (0..BATCH)
        .map(|n| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  \
                 name: batch-{round}\n  namespace: chaos-{n}\nspec:\n  mtls:\n    mode: PERMISSIVE\n---\n"
            )
        })
        .collect();
    let path = dir.join(format!("chaos-batch-{round}.yaml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// A CLI command against node 2's agent, not started yet.
fn cli(lab: &Lab, args: &[&str]) -> anyhow::Result<Command> {
    let mut command = Command::new(interceptor_bin()?);
    command
        .args(args)
        .env("INTERCEPTOR_ADMIN_SOCKET", &lab.node(2)?.admin_socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(command)
}

/// How many policies of each round's batch node 2's agent lists.
fn batch_policies(lab: &Lab, rounds: usize) -> anyhow::Result<Vec<usize>> {
    let list = lab.cli_ok(2, &["policy", "list", "--json"])?;
    Ok((0..rounds)
        .map(|round| list.matches(&format!("\"batch-{round}\"")).count())
        .collect())
}

/// Pseudo-random delays, the same on every run: 0 to 24 ms.
fn delays(rounds: u64) -> impl Iterator<Item = Duration> {
    (0..rounds).map(|round| Duration::from_micros((round * 7_919 + 3_001) % 25_000))
}

#[test]
fn an_agent_killed_during_policy_apply_or_workload_add_restarts_with_the_old_or_the_new_state()
-> anyhow::Result<()> {
    let (mut lab, _sleep, _tracker) = walkthrough_lab()?;
    let rounds = 12;
    let (mut old, mut new) = (0, 0);
    for (round, delay) in delays(rounds as u64).enumerate() {
        let batch = write_batch(&lab.dir, round)?;
        let before = batch_policies(&lab, rounds)?;
        let mut apply = cli(&lab, &["policy", "apply", batch.to_str().context("path")?])?;
        let mut running = apply.spawn()?;
        std::thread::sleep(delay);
        lab.kill_agent(2)?;
        running.wait()?;
        lab.start_agent(2).with_context(|| {
            format!("round {round}: the agent did not start on its saved state")
        })?;
        let after = batch_policies(&lab, rounds)?;
        ensure!(
            after[round] == 0 || after[round] == BATCH,
            "round {round}: {} of {BATCH} policies after a killed apply: torn",
            after[round]
        );
        ensure!(
            after[..round] == before[..round],
            "round {round}: earlier batches changed: {before:?} → {after:?}"
        );
        if after[round] == 0 {
            old += 1
        } else {
            new += 1
        }
    }
    println!("killed applies: {old} kept the old state, {new} the new one");

    // A workload added while the agent is killed: listed and served, or not listed at all.
    for (round, delay) in delays(6).enumerate() {
        let pod = lab.add_pod(2, &format!("late-{round}"), "vehicles")?;
        let netns = netns_path(&pod.netns);
        let cgroup = pod.cgroup.to_str().context("path")?.to_owned();
        let mut add = cli(
            &lab,
            &[
                "workload",
                "add",
                "--name",
                &pod.name,
                "-n",
                "vehicles",
                "--service-account",
                "late",
                "--cgroup",
                &cgroup,
                "--netns",
                netns.to_str().context("path")?,
            ],
        )?;
        let mut running = add.spawn()?;
        std::thread::sleep(delay);
        lab.kill_agent(2)?;
        running.wait()?;
        lab.start_agent(2)
            .with_context(|| format!("workload round {round}: the agent did not start"))?;
        let list: Vec<Value> =
            serde_json::from_str(&lab.cli_ok(2, &["workload", "list", "--json"])?)?;
        let listed = list.iter().any(|w| w["spec"]["name"] == pod.name.as_str());
        if listed {
            // A listed workload is whole: it has its address and identity.
            let entry = list
                .iter()
                .find(|w| w["spec"]["name"] == pod.name.as_str())
                .context("entry")?;
            ensure!(
                entry["ip"] == pod.ip.to_string()
                    && entry["identity"] == "spiffe://cluster.local/ns/vehicles/sa/late",
                "workload round {round}: {entry:#}"
            );
        }
    }
    Ok(())
}

/// Unmounts a tmpfs when dropped, so the lab can remove its directory.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_state_directory_refuses_the_change_and_keeps_the_running_state() -> anyhow::Result<()> {
    let (mut lab, _sleep, tracker) = walkthrough_lab()?;
    // Node 2's state directory moves onto a 1 MiB tmpfs, with what it held.
    let state = lab.node(2)?.state_dir.clone();
    lab.kill_agent(2)?;
    let saved = lab.dir.join("state-copy");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&state)
        .arg(&saved)
        .status()?;
    ensure!(copied.success(), "copying the state aside");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&state)
        .status()?;
    ensure!(mounted.success(), "mounting a tmpfs on {}", state.display());
    let _mount = Mounted(state.clone());
    let restored = Command::new("sh")
        .args(["-c", "cp -a \"$0\"/. \"$1\"/"])
        .arg(&saved)
        .arg(&state)
        .status()?;
    ensure!(restored.success(), "restoring the state");
    lab.start_agent(2)?;

    // Fill it up.
    let filler = state.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k", "count=64"])
        .arg(format!("of={}", filler.display()))
        .stderr(Stdio::null())
        .status()?;

    let strict = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/mesh-strict.yaml");
    let strict = strict.to_str().context("path")?;
    let out = lab.cli(2, &["policy", "apply", strict])?;
    let error = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(!out.status.success(), "apply succeeded on a full disk");
    ensure!(
        error.contains(&state.display().to_string()) && error.contains("No space left"),
        "the error does not name the file and the cause: {error}"
    );
    // Nothing changed: no policy listed, the outside caller still answered.
    let list = lab.cli_ok(2, &["policy", "list"])?;
    ensure!(!list.contains("istio-system/default"), "{list}");
    let target = format!("{}:8080", tracker.ip);
    let (outcome, _) = probe(lab.on_node(1, fixture_bin()?)?, &target)?;
    ensure!(
        outcome == "data",
        "the outside caller was not answered after a failed apply: {outcome}"
    );

    // With space again, the same apply works.
    std::fs::remove_file(&filler)?;
    lab.cli_ok(2, &["policy", "apply", strict])?;
    let (outcome, _) = probe(lab.on_node(1, fixture_bin()?)?, &target)?;
    ensure!(
        matches!(outcome.as_str(), "refused" | "reset"),
        "STRICT did not take after the space came back: {outcome}"
    );
    lab.kill_agent(2)?;
    Ok(())
}
