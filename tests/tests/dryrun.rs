//! Issue 17: `policy apply --dry-run` names the callers a policy would cut off, exactly as
//! the kernel then refuses them; `status` counts plaintext callers under PERMISSIVE. On the
//! lab (root, real kernel).

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use interceptor_tests::{
    lab::{Lab, Pod, fixture_bin},
    scenario::{curl, probe, start_fixture, status_json, walkthrough_lab},
};
use serde_json::Value;

/// The exit status of a dry run that would refuse a caller let in now.
const WOULD_REFUSE: i32 = 3;

/// The walkthrough's cast with HTTP on 8080, 8081 and 9000 of the tracker, so every port's
/// outcome is a plain answer or a refusal.
struct Cast {
    lab: Lab,
    sleep: Pod,
    tracker: Pod,
}

const PORTS: [u16; 3] = [8080, 8081, 9000];

fn cast() -> anyhow::Result<Cast> {
    let (mut lab, sleep, tracker) = walkthrough_lab()?;
    start_fixture(&mut lab, &tracker, "http", 8081)?;
    start_fixture(&mut lab, &tracker, "http", 9000)?;
    Ok(Cast {
        lab,
        sleep,
        tracker,
    })
}

impl Cast {
    /// The outside caller: node 1's own namespace, at its underlay address.
    fn outside_address(&self) -> anyhow::Result<String> {
        Ok(self.lab.node(1)?.underlay_ip.to_string())
    }

    /// What the kernel does now with plaintext from outside to `port`: `allowed` (the app
    /// answered) or `refused` (reset or refused).
    fn outside_verdict(&self, port: u16) -> anyhow::Result<&'static str> {
        let (outcome, _) = probe(
            self.lab.on_node(1, fixture_bin()?)?,
            &format!("{}:{port}", self.tracker.ip),
        )?;
        match outcome.as_str() {
            "data" => Ok("allowed"),
            "refused" | "reset" => Ok("refused"),
            other => anyhow::bail!("plaintext to port {port} gave {other}"),
        }
    }

    fn meshed_gets_json(&self) -> anyhow::Result<bool> {
        let out = curl(
            self.lab.in_pod(&self.sleep, "curl")?,
            &format!("http://{}:8080/vehicles/", self.tracker.ip),
            &["--max-time", "5"],
        )?;
        Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Vehicle 1"))
    }

    fn write(&self, name: &str, yaml: &str) -> anyhow::Result<String> {
        let path = self.lab.dir.join(name);
        std::fs::write(&path, yaml)?;
        Ok(path.to_str().context("path")?.to_owned())
    }

    /// `interceptor <change> --dry-run -o json` on node 2: (exit status, report).
    fn dry_run(&self, change: &[String]) -> anyhow::Result<(i32, Value)> {
        let mut args: Vec<&str> = change.iter().map(String::as_str).collect();
        args.extend(["--dry-run", "-o", "json"]);
        let out = self.lab.cli(2, &args)?;
        let code = out.status.code().context("dry run killed")?;
        ensure!(
            code == 0 || code == WOULD_REFUSE,
            "dry run {args:?} failed ({code}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((code, serde_json::from_slice(&out.stdout)?))
    }

    /// The dry run's entry for the outside caller on `port`, waiting (up to 3 s) for the
    /// agent to have recorded the caller's attempts on every port.
    fn dry_run_per_port(&self, change: &[String]) -> anyhow::Result<(i32, Value, Vec<Value>)> {
        let outside = self.outside_address()?;
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let (code, report) = self.dry_run(change)?;
            let entries: Vec<Value> = PORTS
                .iter()
                .filter_map(|port| {
                    report["callers"].as_array()?.iter().find(|c| {
                        c["caller"] == outside.as_str()
                            && c["port"] == *port
                            && c["workload"] == "vehicles/position-tracker"
                    })
                })
                .cloned()
                .collect();
            if entries.len() == PORTS.len() {
                return Ok((code, report, entries));
            }
            ensure!(
                Instant::now() < deadline,
                "the dry run does not list the outside caller on every port: {report:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn mesh_strict() -> anyhow::Result<String> {
    Ok(policies_dir()
        .join("mesh-strict.yaml")
        .to_str()
        .context("path")?
        .to_owned())
}

fn policy_yaml(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n{spec}"
    )
}

fn mode(mode: &str) -> String {
    format!("  mtls:\n    mode: {mode}\n")
}

const TRACKER_SELECTOR: &str = "  selector:\n    matchLabels:\n      app: position-tracker\n";

/// Item 4 and item 2: after a meshed call and an outside plaintext call, `status` counts one
/// plaintext caller; a dry run of the mesh-wide STRICT policy lists the outside caller and
/// not the meshed one, changes nothing, and exits 3; after the real apply the caller is
/// refused, as the dry run said.
#[test]
fn a_dry_run_of_mesh_strict_names_the_outside_caller_and_changes_nothing() -> anyhow::Result<()> {
    let c = cast()?;
    let outside = c.outside_address()?;
    ensure!(c.meshed_gets_json()?, "the meshed call failed");
    ensure!(c.outside_verdict(8080)? == "allowed", "PERMISSIVE refused");
    ensure!(c.outside_verdict(8080)? == "allowed", "PERMISSIVE refused");

    // status: one distinct plaintext caller, two connections, under PERMISSIVE.
    let mut callers = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let status = status_json(&c.lab, 2, &[])?;
        callers = status["plaintext_callers"].clone();
        if callers[0]["connections"] == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        callers.as_array().map(Vec::len) == Some(1)
            && callers[0]["workload"] == "vehicles/position-tracker"
            && callers[0]["default_mode"] == "PERMISSIVE"
            && callers[0]["callers"] == 1
            && callers[0]["connections"] == 2
            && callers[0]["last_seen_unix_ms"].as_u64().is_some(),
        "status plaintext callers: {callers:#}"
    );
    let table = c.lab.cli_ok(2, &["status"])?;
    println!("{table}");
    let row = table
        .lines()
        .skip_while(|line| !line.starts_with("PLAINTEXT CALLERS UNDER PERMISSIVE"))
        .find(|line| line.starts_with("vehicles/position-tracker"))
        .with_context(|| format!("no plaintext-callers row in status:\n{table}"))?;
    let fields: Vec<&str> = row.split_whitespace().collect();
    ensure!(
        fields[1..4] == ["PERMISSIVE", "1", "2"],
        "status row: {row}"
    );

    // The dry run, as JSON and as text.
    let strict = mesh_strict()?;
    let (code, report) = c.dry_run(&["policy".into(), "apply".into(), strict.clone()])?;
    ensure!(code == WOULD_REFUSE, "exit status {code}: {report:#}");
    let listed = report["callers"].as_array().context("callers")?;
    ensure!(
        listed.len() == 1
            && listed[0]["caller"] == outside.as_str()
            && listed[0]["port"] == 8080
            && listed[0]["connections"] == 2
            && listed[0]["outcome"] == "cut_off"
            && listed[0]["after"]["decision"]["policy"]["namespace"] == "istio-system",
        "the dry run should list exactly the outside caller: {report:#}"
    );
    ensure!(
        !report.to_string().contains(&c.sleep.ip.to_string()),
        "the meshed caller is listed: {report:#}"
    );
    ensure!(report["would_refuse"] == 1, "{report:#}");
    let text = c.lab.cli(
        2,
        &["policy", "apply", "--dry-run", "--since", "1h", &strict],
    )?;
    let stdout = String::from_utf8_lossy(&text.stdout);
    println!("{stdout}");
    ensure!(
        text.status.code() == Some(WOULD_REFUSE)
            && stdout.contains("WOULD BE REFUSED")
            && stdout.contains(&outside)
            && stdout.contains("STRICT by istio-system/default"),
        "text dry run ({:?}):\n{stdout}",
        text.status.code()
    );

    // A broken file fails the dry run (status 1), naming the file, as the real apply would.
    let broken = c.write(
        "broken.yaml",
        &policy_yaml("istio-system", "default", &mode("STRICTEST")),
    )?;
    let out = c.lab.cli(2, &["policy", "apply", "--dry-run", &broken])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1)
            && stderr.contains("broken.yaml")
            && stderr.contains("STRICTEST"),
        "broken dry run ({:?}): {stderr}",
        out.status.code()
    );

    // Nothing was applied.
    ensure!(
        c.outside_verdict(8080)? == "allowed",
        "the dry run changed enforcement"
    );
    let list: Value = serde_json::from_str(&c.lab.cli_ok(2, &["policy", "list", "--json"])?)?;
    ensure!(
        list["policies"].as_array().is_some_and(Vec::is_empty),
        "the dry run changed the policy: {list:#}"
    );

    // The real apply refuses the caller, exactly as said; the meshed call still works.
    c.lab.cli_ok(2, &["policy", "apply", &strict])?;
    ensure!(
        c.outside_verdict(8080)? == "refused",
        "STRICT let plaintext in"
    );
    ensure!(c.meshed_gets_json()?, "STRICT broke the meshed call");

    // Deleting it again would let the caller back in: exit status 0.
    let (code, report) = c.dry_run(&[
        "policy".into(),
        "delete".into(),
        "default".into(),
        "-n".into(),
        "istio-system".into(),
    ])?;
    ensure!(code == 0, "delete dry run exit status {code}: {report:#}");
    ensure!(
        report["callers"][0]["before"]["verdict"] == "refused"
            && report["callers"][0]["after"]["verdict"] == "allowed",
        "{report:#}"
    );
    ensure!(
        c.outside_verdict(8080)? == "refused",
        "the delete dry run deleted"
    );
    Ok(())
}

/// Item 3: step by step through the walkthrough, the precedence cases of the policy tests and
/// the age rule, the dry run's verdict for the outside caller on each port is compared with
/// what the kernel does right after the real change (and its "before" with what the kernel
/// does right before it).
#[test]
fn dry_run_verdicts_match_the_kernel_after_the_real_apply() -> anyhow::Result<()> {
    let c = cast()?;
    let apply = |name: &str, yaml: &str| -> anyhow::Result<Vec<String>> {
        Ok(vec!["policy".into(), "apply".into(), c.write(name, yaml)?])
    };
    let delete = |namespace: &str, name: &str| -> Vec<String> {
        ["policy", "delete", name, "-n", namespace]
            .map(String::from)
            .to_vec()
    };
    let steps: Vec<(&str, Vec<String>)> = vec![
        (
            "walkthrough: mesh STRICT",
            vec!["policy".into(), "apply".into(), mesh_strict()?],
        ),
        ("walkthrough: delete it", delete("istio-system", "default")),
        (
            "namespace STRICT",
            apply(
                "ns.yaml",
                &policy_yaml("vehicles", "ns-strict", &mode("STRICT")),
            )?,
        ),
        (
            "workload UNSET inherits, port 8081 PERMISSIVE",
            apply(
                "workload.yaml",
                &policy_yaml(
                    "vehicles",
                    "tracker",
                    &format!(
                        "{TRACKER_SELECTOR}{}  portLevelMtls:\n    8081:\n      mode: PERMISSIVE\n",
                        mode("UNSET")
                    ),
                ),
            )?,
        ),
        (
            "workload DISABLE beats namespace STRICT",
            apply(
                "disable.yaml",
                &policy_yaml(
                    "vehicles",
                    "tracker",
                    &format!("{TRACKER_SELECTOR}{}", mode("DISABLE")),
                ),
            )?,
        ),
        (
            "workload PERMISSIVE, port 9000 STRICT, port 8081 UNSET",
            apply(
                "ports.yaml",
                &policy_yaml(
                    "vehicles",
                    "tracker",
                    &format!(
                        "{TRACKER_SELECTOR}{}  portLevelMtls:\n    9000:\n      mode: STRICT\n    8081:\n      mode: UNSET\n",
                        mode("PERMISSIVE")
                    ),
                ),
            )?,
        ),
        ("delete the workload policy", delete("vehicles", "tracker")),
        (
            "delete the namespace policy",
            delete("vehicles", "ns-strict"),
        ),
        (
            "STRICT in another namespace",
            apply(
                "other.yaml",
                &policy_yaml("foo", "default", &mode("STRICT")),
            )?,
        ),
        (
            "a selector policy in the root namespace is ignored",
            apply(
                "root-selector.yaml",
                &policy_yaml(
                    "istio-system",
                    "selected",
                    &format!("{TRACKER_SELECTOR}{}", mode("STRICT")),
                ),
            )?,
        ),
        (
            "age: first STRICT",
            apply(
                "first-strict.yaml",
                &policy_yaml("vehicles", "first", &mode("STRICT")),
            )?,
        ),
        (
            "age: a younger DISABLE loses",
            apply(
                "second.yaml",
                &policy_yaml("vehicles", "second", &mode("DISABLE")),
            )?,
        ),
        (
            "age: first re-applied as PERMISSIVE stays oldest",
            apply(
                "first-permissive.yaml",
                &policy_yaml("vehicles", "first", &mode("PERMISSIVE")),
            )?,
        ),
        (
            "age: first STRICT again",
            apply(
                "first-strict-again.yaml",
                &policy_yaml("vehicles", "first", &mode("STRICT")),
            )?,
        ),
        (
            "age: without first, second decides",
            delete("vehicles", "first"),
        ),
    ];
    // Every port gets an attempt from the outside caller before the first dry run.
    for port in PORTS {
        c.outside_verdict(port)?;
    }
    let mut compared = 0;
    for (name, change) in &steps {
        let (code, _, entries) = c.dry_run_per_port(change)?;
        let mut cut_off = false;
        for (port, entry) in PORTS.iter().zip(&entries) {
            let now = c.outside_verdict(*port)?;
            ensure!(
                entry["before"]["verdict"] == now,
                "{name}: port {port}: the dry run says {} now, the kernel {now}: {entry:#}",
                entry["before"]["verdict"]
            );
            cut_off |= entry["outcome"] == "cut_off";
        }
        ensure!(
            (code == WOULD_REFUSE) == cut_off,
            "{name}: exit status {code} but cut off: {cut_off}"
        );
        c.lab
            .cli_ok(2, &change.iter().map(String::as_str).collect::<Vec<_>>())?;
        for (port, entry) in PORTS.iter().zip(&entries) {
            let kernel = c.outside_verdict(*port)?;
            ensure!(
                entry["after"]["verdict"] == kernel,
                "{name}: port {port}: the dry run said {}, the kernel did {kernel}: {entry:#}",
                entry["after"]["verdict"]
            );
            compared += 1;
        }
        println!(
            "{name}: {}",
            entries
                .iter()
                .map(|e| format!("{}={}", e["port"], e["after"]["verdict"]))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    ensure!(compared == steps.len() * PORTS.len());
    Ok(())
}
