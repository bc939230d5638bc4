//! Issue 16: the agent's container image, in real containers (rootful podman, root, real
//! kernel). `cargo xtask image` builds the image and runs these tests with `--ignored`, naming
//! the image in `INTERCEPTOR_IMAGE` and its OCI archive in `INTERCEPTOR_IMAGE_ARCHIVE`; they
//! fail loudly without them.
//!
//! Containers run with `--runtime runc` (the default crun refuses hybrid cgroup layouts) and
//! explicit `--ulimit`s within the hard limits (the runtime may not raise a limit: the
//! machine may lack CAP_SYS_RESOURCE).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
};

use anyhow::{Context, ensure};
use interceptor_tests::{
    lab::{AgentCommand, LabOptions, Node, fixture_bin, interceptor_bin},
    scenario::{curl, daemonset_grace_period, probe, records, start_fixture, walkthrough_lab_with},
};
use serde_json::Value;

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| {
        format!(
            "{name} is not set: these tests run from `cargo xtask image`, which builds the image"
        )
    })
}

fn image() -> anyhow::Result<String> {
    env("INTERCEPTOR_IMAGE")
}

/// `RLIMIT_NOFILE`/`RLIMIT_NPROC` hard limit, as podman's `--ulimit` writes it.
fn hard_limit(resource: libc::__rlimit_resource_t) -> anyhow::Result<String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    ensure!(
        unsafe { libc::getrlimit(resource, &mut limit) } == 0,
        "getrlimit: {}",
        std::io::Error::last_os_error()
    );
    Ok(if limit.rlim_max == libc::RLIM_INFINITY {
        "-1".to_owned()
    } else {
        limit.rlim_max.to_string()
    })
}

/// The most `--ulimit nproc` that runc could set on this machine kind: higher values, even
/// below the hard limit, fail with EPERM (found by bisection). Root's processes are not held
/// to RLIMIT_NPROC anyway.
const MAX_NPROC: u64 = 32_768;

/// `podman run --rm --runtime runc --ulimit ...`, the start of every container here.
fn podman_run() -> anyhow::Result<Command> {
    let nofile = hard_limit(libc::RLIMIT_NOFILE)?;
    let nproc = hard_limit(libc::RLIMIT_NPROC)?
        .parse::<u64>()
        .map_or(MAX_NPROC, |hard| hard.min(MAX_NPROC));
    let mut command = Command::new("podman");
    command
        .args(["run", "--rm", "--runtime", "runc"])
        .args(["--ulimit", &format!("nofile={nofile}:{nofile}")])
        .args(["--ulimit", &format!("nproc={nproc}:{nproc}")]);
    Ok(command)
}

fn output(command: &mut Command) -> anyhow::Result<Output> {
    command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?} (cargo xtask image installs podman)"))
}

#[test]
#[ignore = "needs the image: run by `cargo xtask image`"]
fn the_image_runs_the_agent_binary_alone() -> anyhow::Result<()> {
    let image = image()?;
    let out = output(podman_run()?.arg(&image).arg("--help"))?;
    let help = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "podman run {image} --help failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(help.contains("Usage: interceptor"), "no usage: {help}");
    for command in ["agent", "ca", "workload", "policy", "status"] {
        ensure!(help.contains(command), "--help lacks {command}: {help}");
    }
    // FROM scratch: the binary is the image's only file, so there is no shell to run.
    let shell = output(podman_run()?.args(["--entrypoint", "/bin/sh", &image, "-c", "true"]))?;
    ensure!(!shell.status.success(), "the image has a shell");
    Ok(())
}

/// `tar -xOf <archive> <member>`.
fn archive_member(archive: &str, member: &str) -> anyhow::Result<Value> {
    let out = output(Command::new("tar").args(["-xOf", archive, member]))?;
    ensure!(out.status.success(), "{archive} has no {member}");
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn blob(archive: &str, digest: &Value) -> anyhow::Result<Value> {
    let digest = digest.as_str().context("digest")?;
    let hex = digest.strip_prefix("sha256:").context("sha256 digest")?;
    archive_member(archive, &format!("blobs/sha256/{hex}"))
}

#[test]
#[ignore = "needs the image: run by `cargo xtask image`"]
fn the_archive_is_one_layer_annotated_with_version_and_commit() -> anyhow::Result<()> {
    let archive = env("INTERCEPTOR_IMAGE_ARCHIVE")?;
    let index = archive_member(&archive, "index.json")?;
    let manifests = index["manifests"].as_array().context("index manifests")?;
    ensure!(manifests.len() == 1, "one image in the archive: {index}");
    let manifest = blob(&archive, &manifests[0]["digest"])?;
    let annotations = &manifest["annotations"];

    let version = output(Command::new(interceptor_bin()?).arg("--version"))?;
    let version = String::from_utf8(version.stdout)?;
    let version = version.split_whitespace().nth(1).context("--version")?;
    ensure!(
        annotations["org.opencontainers.image.version"] == version,
        "version annotation: {annotations}"
    );
    let head = output(
        Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR")),
    )?;
    let head = String::from_utf8(head.stdout)?;
    let revision = annotations["org.opencontainers.image.revision"]
        .as_str()
        .context("no revision annotation")?;
    ensure!(
        revision.trim_end_matches("-dirty") == head.trim(),
        "revision annotation {revision}, HEAD {head}"
    );
    // FROM scratch plus one COPY: a single layer, and no base image.
    let layers = manifest["layers"].as_array().context("layers")?;
    ensure!(layers.len() == 1, "layers: {layers:?}");
    let size = layers[0]["size"].as_u64().context("layer size")?;
    eprintln!("image layer: {:.1} MiB compressed", size as f64 / 1048576.0);
    Ok(())
}

/// Removes the named containers when dropped: the lab's teardown only kills `podman run`,
/// which leaves its container running.
struct Containers(Arc<Mutex<Vec<String>>>);

impl Drop for Containers {
    fn drop(&mut self) {
        let names = self.0.lock().map(|n| n.clone()).unwrap_or_default();
        if !names.is_empty() {
            let _ = Command::new("podman")
                .args(["rm", "--force", "--ignore", "--time", "0"])
                .args(&names)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs each lab agent from the image as the DaemonSet runs it (host network: the node's
/// namespace, which `podman` is started in; host PID; privileged; the host's cgroup
/// namespace; bpffs and the cgroup root mounted), plus the lab's own paths: its scratch
/// directory (CA, state, admin socket, mesh directory) and /run/netns, by which the lab
/// enrolls pods.
fn from_the_image(image: String, names: Arc<Mutex<Vec<String>>>) -> AgentCommand {
    Arc::new(move |node: &Node| {
        let lab_dir = std::env::temp_dir().join("interceptor-lab");
        let name = format!("{}-agent", node.netns);
        names
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .push(name.clone());
        let mut command = podman_run()?;
        command
            .args(["--replace", "--name", &name])
            .args(["--network", "host", "--pid", "host", "--cgroupns", "host"])
            .arg("--privileged")
            .args(["--volume", "/sys/fs/bpf:/sys/fs/bpf"])
            .args(["--volume", "/sys/fs/cgroup:/sys/fs/cgroup"])
            // rslave: pods made after the agent started (their nsfs mounts) show up inside.
            .args(["--volume", "/run/netns:/run/netns:rslave"])
            .arg("--volume")
            .arg(format!("{0}:{0}", lab_dir.display()))
            .args(["--env", "RUST_LOG=info"])
            .arg(&image);
        Ok(command)
    })
}

#[test]
#[ignore = "needs the image: run by `cargo xtask image`"]
fn agents_from_the_image_carry_a_meshed_call_and_stop_on_sigterm() -> anyhow::Result<()> {
    let containers = Containers(Arc::new(Mutex::new(Vec::new())));
    let options = LabOptions {
        agent_command: Some(from_the_image(image()?, containers.0.clone())),
        agent_args: vec!["--log-format".into(), "json".into()],
        ..LabOptions::default()
    };
    let (mut lab, sleep, tracker) = walkthrough_lab_with(options)?;
    // Moved after the lab, so the containers go before the lab's teardown does.
    let _containers = containers;
    start_fixture(&mut lab, &tracker, "http", 8081)?;

    // A meshed call from node 1's pod to node 2's, both agents in containers.
    let url = format!("http://{}:8080/vehicles/", tracker.ip);
    let out = curl(lab.in_pod(&sleep, "curl")?, &url, &["--max-time", "10"])?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Vehicle 1"),
        "the meshed call failed: {}\nagent 1:\n{}\nagent 2:\n{}",
        String::from_utf8_lossy(&out.stderr),
        lab.agent_log(1),
        lab.agent_log(2)
    );
    let inbound = records(&lab, 2)?;
    ensure!(
        inbound.iter().any(|r| r["direction"] == "inbound"
            && r["security"] == "mutual_tls"
            && r["source_identity"] == "spiffe://cluster.local/ns/foo/sa/sleep"),
        "agent 2 has no inbound mutual-TLS record of the call: {inbound:#?}"
    );

    // The DaemonSet's probes answer on the agent in the container.
    for path in ["/healthz/ready", "/healthz/live"] {
        let metrics = &lab.node(2)?.metrics_addr;
        let out = curl(
            lab.on_node(2, "curl")?,
            &format!("http://{metrics}{path}"),
            &["--fail", "--max-time", "5"],
        )?;
        ensure!(out.status.success(), "{path} does not answer");
    }

    // STRICT, then SIGTERM (podman passes it on, as the kubelet's runtime does): the agent
    // stops within the grace period and the kernel keeps refusing plaintext.
    let strict = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/mesh-strict.yaml");
    lab.cli_ok(
        2,
        &["policy", "apply", strict.to_str().context("policy path")?],
    )?;
    let refused = |lab: &interceptor_tests::lab::Lab, port: u16| -> anyhow::Result<()> {
        let (outcome, _) = probe(
            lab.on_node(1, fixture_bin()?)?,
            &format!("{}:{port}", tracker.ip),
        )?;
        ensure!(
            matches!(outcome.as_str(), "refused" | "reset"),
            "plaintext to port {port} gave {outcome}"
        );
        Ok(())
    };
    refused(&lab, 8080)?;
    let grace = daemonset_grace_period()?;
    let took = lab.stop_agent(2, grace)?;
    eprintln!("container agent: SIGTERM to exit {took:?} (grace period {grace:?})");
    refused(&lab, 8081)?;

    // Its log on stderr is JSON lines.
    let log = lab.agent_log(2);
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("a log line is not JSON:\n{log}"))?;
    ensure!(
        lines
            .iter()
            .any(|l| l["message"] == "shutting down; kernel enforcement stays pinned"),
        "no shutdown line:\n{log}"
    );
    let pinned: PathBuf = lab.node(2)?.bpf_dir.join("links");
    ensure!(
        std::fs::read_dir(&pinned).is_ok_and(|mut d| d.next().is_some()),
        "no pinned links left in {}",
        pinned.display()
    );
    Ok(())
}
