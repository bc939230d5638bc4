//! The agent's saved state under faults: killed in the middle of `policy apply` and
//! `workload add`, and a state directory that is full or read-only. The saved state is the old
//! one or the new one, never torn; a write that fails is an error that names the file and the
//! cause, and the running state stays as it was.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, ensure};
use interceptor_tests::{
    lab::{Lab, Pod, fixture_bin, interceptor_bin, netns_path},
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

/// Node 2's state directory on a small tmpfs of its own, holding what it held; unmounted when
/// dropped (also when the test fails), before the lab removes its directory.
struct SmallStateDir {
    path: PathBuf,
}

impl SmallStateDir {
    /// Stops node 2's agent, moves its state onto a 1 MiB tmpfs and starts it again.
    fn mount(lab: &mut Lab) -> anyhow::Result<Self> {
        let path = lab.node(2)?.state_dir.clone();
        lab.kill_agent(2)?;
        let saved = lab.dir.join("state-copy");
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&path)
            .arg(&saved)
            .status()?;
        ensure!(copied.success(), "copying the state aside");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&path)
            .status()?;
        ensure!(mounted.success(), "mounting a tmpfs on {}", path.display());
        let dir = SmallStateDir { path };
        let restored = Command::new("sh")
            .args(["-c", "cp -a \"$0\"/. \"$1\"/"])
            .arg(&saved)
            .arg(&dir.path)
            .status()?;
        ensure!(restored.success(), "restoring the state");
        lab.start_agent(2)?;
        Ok(dir)
    }

    /// Fills it with a file until no byte is left; returns the file.
    fn fill(&self) -> anyhow::Result<PathBuf> {
        let filler = self.path.join("filler");
        // dd stops with "No space left on device", which is the point.
        Command::new("dd")
            .args(["if=/dev/zero", "bs=64k", "count=64"])
            .arg(format!("of={}", filler.display()))
            .stderr(Stdio::null())
            .status()?;
        let free = Command::new("stat")
            .args(["-f", "-c", "%a"])
            .arg(&self.path)
            .output()?;
        ensure!(
            String::from_utf8_lossy(&free.stdout).trim() == "0",
            "the tmpfs still has free blocks"
        );
        Ok(filler)
    }

    /// Remounts it read-only, or writable again.
    fn set_read_only(&self, read_only: bool) -> anyhow::Result<()> {
        let option = if read_only {
            "remount,ro"
        } else {
            "remount,rw"
        };
        let status = Command::new("mount")
            .args(["-o", option])
            .arg(&self.path)
            .status()?;
        ensure!(
            status.success(),
            "mount -o {option} {}",
            self.path.display()
        );
        Ok(())
    }

    /// Every file in it (but the filler) with its content.
    fn files(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "filler" && entry.file_type()?.is_file() {
                files.push((name, std::fs::read(entry.path())?));
            }
        }
        files.sort();
        Ok(files)
    }
}

impl Drop for SmallStateDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// What node 2's agent runs: its policies, its workloads (as listed and in status).
fn running_state(lab: &Lab) -> anyhow::Result<(String, String, Vec<Value>)> {
    let status: Value = serde_json::from_str(&lab.cli_ok(2, &["status", "--output", "json"])?)?;
    let workloads = status["workloads"]
        .as_array()
        .context("status has no workloads")?
        .iter()
        .map(|w| serde_json::json!([w["workload"], w["identity"], w["ip"]]))
        .collect();
    Ok((
        lab.cli_ok(2, &["policy", "list", "--json"])?,
        lab.cli_ok(2, &["workload", "list", "--json"])?,
        workloads,
    ))
}

/// `workload add` of `pod` on node 2, as the CLI's arguments.
fn add_args(pod: &Pod) -> anyhow::Result<Vec<String>> {
    Ok(vec![
        "workload".into(),
        "add".into(),
        "--name".into(),
        pod.name.clone(),
        "-n".into(),
        pod.namespace.clone(),
        "--service-account".into(),
        "late".into(),
        "--cgroup".into(),
        pod.cgroup.to_str().context("path")?.to_owned(),
        "--netns".into(),
        netns_path(&pod.netns).to_str().context("path")?.to_owned(),
    ])
}

#[test]
fn a_full_or_read_only_state_directory_refuses_the_change_and_keeps_the_running_state()
-> anyhow::Result<()> {
    let (mut lab, _sleep, tracker) = walkthrough_lab()?;
    let state = SmallStateDir::mount(&mut lab)?;
    let late = lab.add_pod(2, "late", "vehicles")?;
    let add = add_args(&late)?;
    let add: Vec<&str> = add.iter().map(String::as_str).collect();
    let strict = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/mesh-strict.yaml");
    let strict = strict.to_str().context("path")?;
    let target = format!("{}:8080", tracker.ip);
    let late_entry = lab.dir.join("mesh").join(format!("{}.json", late.ip));
    let tracker_key = format!("{}/{}", tracker.namespace, tracker.name);

    for fault in ["full", "read-only"] {
        let filler = match fault {
            "full" => Some(state.fill()?),
            _ => {
                state.set_read_only(true)?;
                None
            }
        };
        let cause = match fault {
            "full" => "No space left on device",
            _ => "Read-only file system",
        };
        let running = running_state(&lab)?;
        let on_disk = state.files()?;

        let refused = |args: &[&str], file: &str| -> anyhow::Result<()> {
            let out = lab.cli(2, args)?;
            let error = String::from_utf8_lossy(&out.stderr).into_owned();
            ensure!(
                !out.status.success(),
                "{fault}: `{}` succeeded",
                args.join(" ")
            );
            let path = state.path.join(file);
            ensure!(
                error.contains(&path.display().to_string()) && error.contains(cause),
                "{fault}: `{}` does not name {} and {cause:?}: {error}",
                args.join(" "),
                path.display()
            );
            Ok(())
        };
        refused(&["policy", "apply", strict], "policies.json")?;
        refused(&add, "workloads.json")?;
        refused(
            &[
                "workload",
                "remove",
                "--name",
                &tracker.name,
                "-n",
                &tracker.namespace,
            ],
            "workloads.json",
        )?;

        // Nothing changed: what runs, what is saved, what the mesh and the callers see.
        ensure!(
            running_state(&lab)? == running,
            "{fault}: the running state changed after refused changes"
        );
        ensure!(
            state.files()? == on_disk,
            "{fault}: the state files changed (or a temporary stayed) after refused changes"
        );
        ensure!(
            !late_entry.exists(),
            "{fault}: the refused workload has a mesh directory entry"
        );
        ensure!(
            running.1.contains(&format!("\"{}\"", tracker.name)),
            "{fault}: {tracker_key} is not listed: {}",
            running.1
        );
        let (outcome, _) = probe(lab.on_node(1, fixture_bin()?)?, &target)?;
        ensure!(
            outcome == "data",
            "{fault}: the outside caller was not answered after a refused apply: {outcome}"
        );

        match filler {
            Some(filler) => std::fs::remove_file(filler)?,
            None => state.set_read_only(false)?,
        }
    }

    // With room again, the same changes take, and a restarted agent has them.
    lab.cli_ok(2, &["policy", "apply", strict])?;
    lab.cli_ok(2, &add)?;
    let (outcome, _) = probe(lab.on_node(1, fixture_bin()?)?, &target)?;
    ensure!(
        matches!(outcome.as_str(), "refused" | "reset"),
        "STRICT did not take after the space came back: {outcome}"
    );
    lab.kill_agent(2)?;
    lab.start_agent(2)?;
    let workloads = lab.cli_ok(2, &["workload", "list", "--json"])?;
    ensure!(
        workloads.contains("\"late\""),
        "the workload added once there was room is not restored: {workloads}"
    );
    lab.kill_agent(2)?;
    Ok(())
}
