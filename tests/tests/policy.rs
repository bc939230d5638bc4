//! Issue 3: PeerAuthentication enforced at the pod's door, on the lab (root, real kernel).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::ensure;
use interceptor_tests::{
    lab::{Lab, Pod, fixture_bin},
    pattern,
    scenario::{curl, daemonset_grace_period, fixture, probe, start_fixture, walkthrough_lab},
};
use serde_json::Value;

/// The walkthrough's cast: a meshed `sleep` on node 1, a meshed `position-tracker` on node 2
/// (namespace vehicles) serving /vehicles/ on 8080, a sink on 9000 and a "metrics" port 8081.
struct Walkthrough {
    lab: Lab,
    sleep: Pod,
    tracker: Pod,
}

fn walkthrough() -> anyhow::Result<Walkthrough> {
    let (mut lab, sleep, tracker) = walkthrough_lab()?;
    start_fixture(&mut lab, &tracker, "http", 8081)?;
    start_fixture(&mut lab, &tracker, "sink", 9000)?;
    Ok(Walkthrough {
        lab,
        sleep,
        tracker,
    })
}

impl Walkthrough {
    fn url(&self, port: u16) -> String {
        format!("http://{}:{port}/vehicles/", self.tracker.ip)
    }

    /// curl from node 1's host namespace: a caller outside the mesh.
    fn outside_gets_json(&self, port: u16) -> anyhow::Result<bool> {
        let out = curl(
            self.lab.on_node(1, "curl")?,
            &self.url(port),
            &["--max-time", "5"],
        )?;
        Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Vehicle 1"))
    }

    /// The outside caller is refused (reset or refused) within a second, never answered.
    fn outside_is_refused(&self, port: u16) -> anyhow::Result<()> {
        let (outcome, millis) = probe(
            self.lab.on_node(1, fixture_bin()?)?,
            &format!("{}:{port}", self.tracker.ip),
        )?;
        ensure!(
            matches!(outcome.as_str(), "refused" | "reset"),
            "plaintext to port {port} gave {outcome}"
        );
        ensure!(millis < 1000, "refusal took {millis} ms");
        Ok(())
    }

    fn meshed_gets_json(&self) -> anyhow::Result<bool> {
        let out = curl(
            self.lab.in_pod(&self.sleep, "curl")?,
            &self.url(8080),
            &["--max-time", "5"],
        )?;
        Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Vehicle 1"))
    }

    fn apply(&self, file: &Path) -> anyhow::Result<std::process::Output> {
        self.lab
            .cli(2, &["policy", "apply", file.to_str().unwrap_or_default()])
    }

    fn apply_ok(&self, file: &Path) -> anyhow::Result<()> {
        let out = self.apply(file)?;
        ensure!(
            out.status.success(),
            "policy apply {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn effective(&self) -> anyhow::Result<Value> {
        let report: Value =
            serde_json::from_str(&self.lab.cli_ok(2, &["policy", "list", "--json"])?)?;
        Ok(report["workloads"]["vehicles/position-tracker"].clone())
    }

    fn write_policy(&self, name: &str, yaml: &str) -> anyhow::Result<PathBuf> {
        let path = self.lab.dir.join(name);
        std::fs::write(&path, yaml)?;
        Ok(path)
    }
}

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

#[test]
fn the_walkthrough_permissive_then_strict_then_deleted() -> anyhow::Result<()> {
    let w = walkthrough()?;
    ensure!(
        w.outside_gets_json(8080)?,
        "PERMISSIVE: the outside caller should get the JSON"
    );
    ensure!(w.meshed_gets_json()?, "the meshed pod should get the JSON");

    w.apply_ok(&policies_dir().join("mesh-strict.yaml"))?;
    w.outside_is_refused(8080)?;
    ensure!(
        w.meshed_gets_json()?,
        "STRICT: the meshed pod must still get the JSON over mutual TLS"
    );
    ensure!(w.effective()?["default"]["mode"] == "STRICT");
    ensure!(w.effective()?["default"]["policy"]["name"] == "default");

    w.lab
        .cli_ok(2, &["policy", "delete", "default", "-n", "istio-system"])?;
    ensure!(
        w.outside_gets_json(8080)?,
        "after delete the outside caller should get the JSON again"
    );
    Ok(())
}

#[test]
fn namespace_workload_and_port_level_precedence() -> anyhow::Result<()> {
    let w = walkthrough()?;
    let namespace_strict = w.write_policy(
        "ns.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: ns-strict\n  namespace: vehicles\nspec:\n  mtls:\n    mode: STRICT\n",
    )?;
    w.apply_ok(&namespace_strict)?;
    w.outside_is_refused(8080)?;
    w.outside_is_refused(8081)?;

    // A workload policy inheriting (UNSET) with a PERMISSIVE exception on 8081.
    let workload = w.write_policy(
        "workload.yaml",
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: tracker\n  namespace: vehicles\nspec:\n  selector:\n    matchLabels:\n      app: position-tracker\n  mtls:\n    mode: UNSET\n  portLevelMtls:\n    8081:\n      mode: PERMISSIVE\n",
    )?;
    w.apply_ok(&workload)?;
    w.outside_is_refused(8080)?;
    ensure!(
        w.outside_gets_json(8081)?,
        "port-level PERMISSIVE on 8081 should let plaintext in"
    );
    let effective = w.effective()?;
    ensure!(
        effective["default"]["policy"]["name"] == "ns-strict",
        "UNSET inherits the namespace policy: {effective}"
    );
    ensure!(
        effective["ports"]["8081"]["mode"] == "PERMISSIVE",
        "{effective}"
    );

    // A workload DISABLE beats the namespace STRICT.
    let disable = w.write_policy(
        "disable.yaml",
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: tracker\n  namespace: vehicles\nspec:\n  selector:\n    matchLabels:\n      app: position-tracker\n  mtls:\n    mode: DISABLE\n",
    )?;
    w.apply_ok(&disable)?;
    ensure!(
        w.outside_gets_json(8080)?,
        "workload DISABLE should accept plaintext"
    );

    // A namespace policy elsewhere does not touch this workload.
    w.lab
        .cli_ok(2, &["policy", "delete", "tracker", "-n", "vehicles"])?;
    w.lab
        .cli_ok(2, &["policy", "delete", "ns-strict", "-n", "vehicles"])?;
    let other = w.write_policy(
        "other.yaml",
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: foo\nspec:\n  mtls:\n    mode: STRICT\n",
    )?;
    w.apply_ok(&other)?;
    ensure!(
        w.outside_gets_json(8080)?,
        "a STRICT policy in namespace foo must not affect vehicles"
    );
    Ok(())
}

#[test]
fn bad_policy_files_are_refused_whole_and_change_nothing() -> anyhow::Result<()> {
    let w = walkthrough()?;
    let good = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: istio-system\nspec:\n  mtls:\n    mode: STRICT\n";
    let cases: [(&str, String, &str); 8] = [
        ("syntax.yaml", "apiVersion: [unclosed\n".into(), "syntax.yaml:"),
        ("version.yaml", good.replace("security.istio.io/v1beta1", "security.istio.io/v2"), "apiVersion"),
        ("kind.yaml", good.replace("PeerAuthentication", "AuthorizationPolicy"), "kind"),
        ("field.yaml", good.replace("  mtls:", "  mutual:\n    mode: STRICT\n  mtls:"), "mutual"),
        ("mode.yaml", good.replace("mode: STRICT", "mode: STRICTEST"), "STRICTEST"),
        ("portlevel.yaml", good.replace("  mtls:\n    mode: STRICT\n", "  portLevelMtls:\n    8080:\n      mode: DISABLE\n"), "portLevelMtls"),
        ("port.yaml", good.replace("  mtls:\n    mode: STRICT\n", "  selector:\n    matchLabels:\n      app: x\n  portLevelMtls:\n    70000:\n      mode: DISABLE\n"), "70000"),
        ("dup.yaml", format!("{good}---\n{good}"), "istio-system/default"),
    ];
    let before = w.lab.cli_ok(2, &["policy", "list", "--json"])?;
    for (file, yaml, expected) in &cases {
        // Each bad file goes in a directory with a good STRICT file: the whole batch must fail.
        let dir = w.lab.dir.join(format!("batch-{file}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("a-good.yaml"),
            good.replace("name: default", "name: good"),
        )?;
        std::fs::write(dir.join(file), yaml)?;
        let out = w.apply(&dir)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{file} was accepted");
        ensure!(
            stderr.contains(file),
            "{file}: error does not name the file: {stderr}"
        );
        ensure!(
            stderr.contains(expected),
            "{file}: error does not name {expected:?}: {stderr}"
        );
        let has_line = stderr
            .match_indices(&format!("{file}:"))
            .any(|(at, m)| stderr[at + m.len()..].starts_with(|c: char| c.is_ascii_digit()));
        ensure!(has_line, "{file}: error has no line number: {stderr}");
        let validate = w.lab.cli(
            2,
            &[
                "policy",
                "validate",
                dir.join(file).to_str().unwrap_or_default(),
            ],
        )?;
        ensure!(!validate.status.success(), "validate accepted {file}");
    }
    ensure!(
        w.lab.cli_ok(2, &["policy", "list", "--json"])? == before,
        "a refused batch changed the policy"
    );
    ensure!(
        w.outside_gets_json(8080)?,
        "a refused batch changed enforcement"
    );
    Ok(())
}

#[test]
fn strict_holds_while_the_agent_is_down_and_the_agent_takes_over_again() -> anyhow::Result<()> {
    let mut w = walkthrough()?;
    w.apply_ok(&policies_dir().join("mesh-strict.yaml"))?;
    w.outside_is_refused(8080)?;
    w.lab.kill_agent(2)?;
    w.outside_is_refused(8080)?;
    w.outside_is_refused(8081)?;
    w.lab.start_agent(2)?;
    w.outside_is_refused(8080)?;
    ensure!(
        w.meshed_gets_json()?,
        "after restart the meshed pod should get the JSON"
    );
    // The refusals made while the agent was down (the only ones on 8081) were recorded when it
    // came back, from the pinned ring buffer.
    let status: Value = serde_json::from_str(
        &w.lab
            .cli_ok(2, &["status", "--output", "json", "--dropped"])?,
    )?;
    let records = status["records"].as_array().cloned().unwrap_or_default();
    let on_8081 = format!("{}:8081", w.tracker.ip);
    ensure!(
        records.iter().any(|r| r["destination"] == on_8081.as_str()),
        "the refusal made while the agent was down is missing: {status:#}"
    );
    ensure!(
        status["kernel"]["strict_drops"].as_u64().unwrap_or(0) >= 4,
        "kernel counted fewer refusals: {status:#}"
    );
    w.lab
        .cli_ok(2, &["policy", "delete", "default", "-n", "istio-system"])?;
    ensure!(
        w.outside_gets_json(8080)?,
        "the restarted agent should apply policy changes"
    );
    Ok(())
}

#[test]
fn sigterm_stops_the_agent_within_its_grace_period_and_strict_holds() -> anyhow::Result<()> {
    let mut w = walkthrough()?;
    // Restart node 2's agent with JSON logs, as the DaemonSet runs it.
    w.lab
        .set_agent_args(2, vec!["--log-format".into(), "json".into()])?;
    w.lab.kill_agent(2)?;
    w.lab.start_agent(2)?;
    w.apply_ok(&policies_dir().join("mesh-strict.yaml"))?;
    w.outside_is_refused(8080)?;
    ensure!(
        w.meshed_gets_json()?,
        "the meshed call failed before SIGTERM"
    );
    // The DaemonSet's probes: readiness and liveness are both served, on different paths.
    let metrics = w.lab.node(2)?.metrics_addr.clone();
    for path in ["/healthz/ready", "/healthz/live"] {
        let out = curl(
            w.lab.on_node(2, "curl")?,
            &format!("http://{metrics}{path}"),
            &["--fail", "--max-time", "5"],
        )?;
        ensure!(out.status.success(), "{path} does not answer");
    }

    let grace = daemonset_grace_period()?;
    let took = w.lab.stop_agent(2, grace)?;
    eprintln!("SIGTERM to exit: {took:?} (grace period {grace:?})");
    // The kernel still refuses plaintext with the agent gone, on a port never tried before.
    w.outside_is_refused(8080)?;
    w.outside_is_refused(8081)?;

    // Every line of the JSON run is one object with the fields log collectors index.
    let log = w.lab.agent_log(2);
    let json_lines: Vec<Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    for line in &json_lines {
        for field in ["timestamp", "level", "target", "message"] {
            ensure!(
                line.get(field).is_some(),
                "log line without {field}: {line}"
            );
        }
    }
    let said = |message: &str| json_lines.iter().any(|l| l["message"] == message);
    ensure!(
        said("agent ready") && said("shutting down; kernel enforcement stays pinned"),
        "the JSON log lacks the start or the shutdown:\n{log}"
    );
    Ok(())
}

#[test]
fn the_policy_directory_is_watched() -> anyhow::Result<()> {
    let w = walkthrough()?;
    let dir = w.lab.node(2)?.policy_dir.clone();
    std::fs::copy(
        policies_dir().join("mesh-strict.yaml"),
        dir.join("mesh.yaml"),
    )?;
    wait_until(Duration::from_secs(5), || {
        w.outside_is_refused(8080).is_ok()
    })?;
    // A broken edit is refused and the previous policy stays.
    std::fs::write(dir.join("broken.yaml"), "kind: [\n")?;
    std::thread::sleep(Duration::from_millis(1500));
    w.outside_is_refused(8080)?;
    std::fs::remove_file(dir.join("broken.yaml"))?;
    std::fs::remove_file(dir.join("mesh.yaml"))?;
    wait_until(Duration::from_secs(5), || {
        w.outside_gets_json(8080).unwrap_or(false)
    })?;
    Ok(())
}

#[test]
fn a_policy_change_keeps_established_mutual_tls_connections() -> anyhow::Result<()> {
    let w = walkthrough()?;
    let bytes = 2 * 1024 * 1024;
    let to = format!("{}:9000", w.tracker.ip);
    let mut sender = w.lab.in_pod(&w.sleep, fixture_bin()?)?;
    sender.args([
        "send",
        "--to",
        &to,
        "--bytes",
        &bytes.to_string(),
        "--seed",
        "5",
        "--pause-ms",
        "1500",
    ]);
    let handle = std::thread::spawn(move || fixture(sender, &[]));
    std::thread::sleep(Duration::from_millis(500));
    w.apply_ok(&policies_dir().join("mesh-strict.yaml"))?;
    let out = handle
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    let expected = format!("{bytes} {}\n", pattern::sha256_hex(5, bytes));
    ensure!(
        String::from_utf8_lossy(&out.stdout) == expected,
        "connection broken by the policy change: {:?} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A namespace-wide policy for the tracker's namespace.
fn vehicles_policy(name: &str, mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: vehicles\nspec:\n  mtls:\n    mode: {mode}\n"
    )
}

/// Issue 10, bug A: Istio keeps a policy's creationTimestamp when it is applied again, so
/// among policies of one scope the oldest still wins. Re-applying (changed or not), a
/// directory reload that brings in a file sorting first, and an agent restart must not make
/// a policy younger.
#[test]
fn reapplying_or_reloading_a_policy_keeps_its_age() -> anyhow::Result<()> {
    let mut w = walkthrough()?;
    let first = w.write_policy("first.yaml", &vehicles_policy("first", "STRICT"))?;
    let second = w.write_policy("second.yaml", &vehicles_policy("second", "DISABLE"))?;
    w.apply_ok(&first)?;
    w.apply_ok(&second)?;
    w.outside_is_refused(8080)?;
    // Applied again, unchanged: still the oldest.
    w.apply_ok(&first)?;
    w.outside_is_refused(8080)?;
    ensure!(w.effective()?["default"]["policy"]["name"] == "first");
    // Applied again, changed: still the oldest, now deciding PERMISSIVE.
    w.apply_ok(&w.write_policy("first.yaml", &vehicles_policy("first", "PERMISSIVE"))?)?;
    ensure!(w.outside_gets_json(8080)?, "first's new mode should decide");
    w.apply_ok(&w.write_policy("first.yaml", &vehicles_policy("first", "STRICT"))?)?;
    w.outside_is_refused(8080)?;
    // Ages survive a restart.
    w.lab.kill_agent(2)?;
    w.lab.start_agent(2)?;
    w.outside_is_refused(8080)?;
    ensure!(w.effective()?["default"]["policy"]["name"] == "first");

    // The policy directory: a file that sorts first but arrives later is younger.
    w.lab
        .cli_ok(2, &["policy", "delete", "first", "-n", "vehicles"])?;
    w.lab
        .cli_ok(2, &["policy", "delete", "second", "-n", "vehicles"])?;
    let dir = w.lab.node(2)?.policy_dir.clone();
    std::fs::write(dir.join("zz.yaml"), vehicles_policy("dir-old", "STRICT"))?;
    wait_until(Duration::from_secs(5), || {
        w.outside_is_refused(8080).is_ok()
    })?;
    std::fs::write(dir.join("aa.yaml"), vehicles_policy("dir-new", "DISABLE"))?;
    wait_until(Duration::from_secs(5), || {
        w.lab
            .cli_ok(2, &["policy", "list", "--json"])
            .is_ok_and(|list| list.contains("dir-new"))
    })?;
    w.outside_is_refused(8080)?;
    ensure!(w.effective()?["default"]["policy"]["name"] == "dir-old");
    Ok(())
}

/// Issue 10, bug B: a refusal is recorded with the policy that decided when the kernel
/// refused, even when the agent reads the event later (it was down) and the policy has been
/// replaced since.
#[test]
fn a_refusal_names_the_policy_in_force_when_the_kernel_made_it() -> anyhow::Result<()> {
    let mut w = walkthrough()?;
    // Plaintext the kernel let in is attributed the same way.
    ensure!(
        w.outside_gets_json(8080)?,
        "PERMISSIVE should let plaintext in"
    );
    let status: Value = serde_json::from_str(
        &w.lab
            .cli_ok(2, &["status", "--output", "json", "--plaintext"])?,
    )?;
    ensure!(
        status["records"][0]["reason"] == "plaintext allowed: PERMISSIVE (mesh default, no policy)",
        "{status:#}"
    );
    let dir = w.lab.node(2)?.policy_dir.clone();
    std::fs::write(dir.join("first.yaml"), vehicles_policy("first", "STRICT"))?;
    wait_until(Duration::from_secs(5), || {
        w.outside_is_refused(8080).is_ok()
    })?;
    w.lab.kill_agent(2)?;
    // Refused by the kernel under `first`; the event waits in the pinned ring buffer.
    w.outside_is_refused(8081)?;
    std::fs::remove_file(dir.join("first.yaml"))?;
    std::fs::write(dir.join("second.yaml"), vehicles_policy("second", "STRICT"))?;
    w.lab.start_agent(2)?;
    w.outside_is_refused(9000)?;
    let reason_for = |port: u16| -> anyhow::Result<String> {
        let status: Value = serde_json::from_str(
            &w.lab
                .cli_ok(2, &["status", "--output", "json", "--dropped"])?,
        )?;
        let destination = format!("{}:{port}", w.tracker.ip);
        let records = status["records"].as_array().cloned().unwrap_or_default();
        let record = records
            .iter()
            .find(|r| r["destination"] == destination.as_str())
            .ok_or_else(|| anyhow::anyhow!("no refusal recorded on {port}: {status:#}"))?;
        Ok(record["reason"].as_str().unwrap_or_default().to_owned())
    };
    let mut down = String::new();
    wait_until(Duration::from_secs(5), || {
        reason_for(8081).map(|reason| down = reason).is_ok()
    })?;
    ensure!(
        down == "plaintext refused: STRICT by vehicles/first",
        "the refusal made while the agent was down names {down:?}"
    );
    let after = reason_for(9000)?;
    ensure!(
        after == "plaintext refused: STRICT by vehicles/second",
        "the refusal after the restart names {after:?}"
    );
    Ok(())
}

/// Issue 9: a hostile file dropped into the policy directory (deep nesting, tens of
/// thousands of documents, 50 MB) is refused without stalling the agent: the admin socket
/// answers and meshed calls keep working while the agent looks at it, and the previous
/// policy stays.
#[test]
fn a_hostile_policy_file_stalls_neither_the_admin_socket_nor_the_mesh() -> anyhow::Result<()> {
    let w = walkthrough()?;
    let dir = w.lab.node(2)?.policy_dir.clone();
    std::fs::copy(
        policies_dir().join("mesh-strict.yaml"),
        dir.join("mesh.yaml"),
    )?;
    wait_until(Duration::from_secs(5), || {
        w.outside_is_refused(8080).is_ok()
    })?;
    let nested = format!("a: {}{}", "[".repeat(80_000), "]".repeat(80_000));
    std::fs::write(dir.join("nested.yaml"), nested)?;
    std::fs::write(dir.join("documents.yaml"), "a: 1\n---\n".repeat(40_000))?;
    std::fs::File::create(dir.join("huge.yaml"))?.set_len(50 * 1024 * 1024)?;
    // Several polls of the directory (every 500 ms) happen during this loop.
    let until = Instant::now() + Duration::from_secs(3);
    let mut slowest = Duration::ZERO;
    let mut calls = 0;
    while Instant::now() < until {
        let started = Instant::now();
        w.lab.cli_ok(2, &["workload", "list"])?;
        slowest = slowest.max(started.elapsed());
        ensure!(
            w.meshed_gets_json()?,
            "a meshed call failed after {calls} calls"
        );
        calls += 1;
    }
    println!("`workload list`: slowest {slowest:?} over {calls} calls");
    ensure!(
        slowest < Duration::from_millis(1000),
        "`workload list` took {slowest:?} while the agent read the hostile files"
    );
    w.outside_is_refused(8080)?;
    let log = w.lab.agent_log(2);
    ensure!(
        log.contains("policy directory change refused") && log.contains("huge.yaml"),
        "the refusal is not logged:\n{log}"
    );
    Ok(())
}

fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("condition not met within {limit:?}")
}
