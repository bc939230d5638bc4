//! Issue 4: `interceptor status` and /metrics after the walkthrough's three calls.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, ensure};
use interceptor_tests::{
    lab::fixture_bin,
    scenario::{curl, probe, status_json, walkthrough_lab},
};
use serde_json::Value;

#[test]
fn status_shows_mutual_tls_plaintext_and_dropped_and_metrics_agree() -> anyhow::Result<()> {
    let (lab, sleep, tracker) = walkthrough_lab()?;
    let url = format!("http://{}:8080/vehicles/", tracker.ip);

    // Watch from the start; the first record must show up on the stream.
    let mut watch = std::process::Command::new(interceptor_tests::lab::interceptor_bin()?);
    watch
        .args(["status", "--watch", "--output", "json"])
        .env("INTERCEPTOR_ADMIN_SOCKET", &lab.node(2)?.admin_socket)
        .stdout(Stdio::piped());
    let mut watcher = watch.spawn()?;
    let watched = BufReader::new(watcher.stdout.take().context("watch stdout")?);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in watched.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::sleep(Duration::from_millis(300));

    // 1. meshed call, 2. outside plaintext under PERMISSIVE, 3. outside under STRICT.
    ensure!(
        curl(lab.in_pod(&sleep, "curl")?, &url, &[])?
            .status
            .success()
    );
    ensure!(curl(lab.on_node(1, "curl")?, &url, &[])?.status.success());
    let policy =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/mesh-strict.yaml");
    lab.cli_ok(2, &["policy", "apply", policy.to_str().context("path")?])?;
    let (outcome, _) = probe(
        lab.on_node(1, fixture_bin()?)?,
        &format!("{}:8080", tracker.ip),
    )?;
    ensure!(
        outcome == "refused" || outcome == "reset",
        "STRICT call gave {outcome}"
    );
    std::thread::sleep(Duration::from_millis(300));

    let first = rx
        .recv_timeout(Duration::from_secs(5))
        .context("--watch printed nothing")?;
    let first: Value = serde_json::from_str(&first)?;
    ensure!(
        first["security"] == "mutual_tls",
        "first watched record: {first}"
    );
    let _ = watcher.kill();
    let _ = watcher.wait();

    let status = status_json(&lab, 2, &[])?;
    let records = status["records"].as_array().context("records")?;
    ensure!(
        records.len() == 3,
        "expected exactly 3 records on node 2: {records:#?}"
    );
    // Newest first: dropped, plaintext, mutual TLS.
    let (dropped, plaintext, mtls) = (&records[0], &records[1], &records[2]);
    ensure!(
        mtls["security"] == "mutual_tls" && mtls["verdict"] == "allowed",
        "{mtls}"
    );
    ensure!(
        mtls["source_identity"] == "spiffe://cluster.local/ns/foo/sa/sleep",
        "{mtls}"
    );
    ensure!(
        mtls["destination_workload"]["name"] == "position-tracker",
        "{mtls}"
    );
    ensure!(
        plaintext["security"] == "plaintext" && plaintext["verdict"] == "allowed",
        "{plaintext}"
    );
    ensure!(
        plaintext["source_identity"].is_null(),
        "plaintext caller must be unknown: {plaintext}"
    );
    let caller = format!("{}:", lab.node(1)?.underlay_ip);
    ensure!(
        plaintext["source"]
            .as_str()
            .unwrap_or("")
            .starts_with(&caller),
        "caller's real address: {plaintext}"
    );
    ensure!(
        plaintext["reason"]
            .as_str()
            .unwrap_or("")
            .contains("PERMISSIVE"),
        "{plaintext}"
    );
    ensure!(
        dropped["verdict"] == "dropped" && dropped["security"] == "plaintext",
        "{dropped}"
    );
    ensure!(
        dropped["destination"] == format!("{}:8080", tracker.ip),
        "{dropped}"
    );
    ensure!(
        dropped["reason"]
            .as_str()
            .unwrap_or("")
            .contains("STRICT by istio-system/default"),
        "{dropped}"
    );

    // Filters.
    let count = |filters: &[&str]| -> anyhow::Result<usize> {
        Ok(status_json(&lab, 2, filters)?["records"]
            .as_array()
            .map_or(0, Vec::len))
    };
    ensure!(count(&["--dropped"])? == 1);
    ensure!(count(&["--plaintext"])? == 2);
    ensure!(count(&["--workload", "position-tracker"])? == 3);
    ensure!(
        count(&["--workload", "sleep"])? == 1,
        "sleep is the source of the mTLS record"
    );
    ensure!(count(&["-n", "vehicles"])? == 3);
    ensure!(count(&["-n", "nowhere"])? == 0);
    ensure!(count(&["--since", "1h"])? == 3);

    // Totals and the table.
    let totals = &status["workloads"][0]["totals"];
    ensure!(
        totals["mutual_tls"] == 1 && totals["plaintext"] == 1 && totals["dropped"] == 1,
        "{totals}"
    );
    let table = lab.cli_ok(2, &["status"])?;
    ensure!(
        table.contains("vehicles/position-tracker") && table.contains("dropped"),
        "{table}"
    );
    ensure!(
        !table.contains('\x1b'),
        "no colour when stdout is not a terminal"
    );
    // The default table fits 120 columns and names workloads; `-o wide` gives every field.
    for line in table.lines() {
        ensure!(
            line.chars().count() <= 120,
            "wider than 120 columns: {line:?}"
        );
    }
    ensure!(
        table.contains("foo/sleep") && !table.contains("spiffe://"),
        "workloads and short identities: {table}"
    );
    let wide = lab.cli_ok(2, &["status", "-o", "wide"])?;
    ensure!(
        wide.contains("spiffe://cluster.local/ns/foo/sa/sleep")
            && wide.contains(&format!("{}:", lab.node(1)?.underlay_ip))
            && wide.lines().any(|l| l.chars().count() > 120),
        "wide shows full identities and addresses: {wide}"
    );

    // Metrics agree.
    let metrics = curl(
        lab.on_node(2, "curl")?,
        &format!("http://{}/metrics", lab.node(2)?.metrics_addr),
        &[],
    )?;
    let metrics = String::from_utf8(metrics.stdout)?;
    let sample = |name: &str, needle: &str| -> Option<f64> {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains(needle))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    ensure!(
        sample(
            "istio_tcp_connections_opened_total",
            "connection_security_policy=\"mutual_tls\""
        ) == Some(1.0),
        "{metrics}"
    );
    ensure!(
        sample(
            "istio_tcp_connections_opened_total",
            "connection_security_policy=\"unknown\""
        ) == Some(1.0),
        "{metrics}"
    );
    ensure!(
        sample(
            "interceptor_dropped_connections_total",
            "reason=\"plaintext_refused\""
        ) == Some(1.0),
        "{metrics}"
    );
    ensure!(
        metrics.contains("source_principal=\"spiffe://cluster.local/ns/foo/sa/sleep\""),
        "{metrics}"
    );
    ensure!(metrics.contains("reporter=\"destination\""), "{metrics}");
    let ready = curl(
        lab.on_node(2, "curl")?,
        &format!("http://{}/healthz/ready", lab.node(2)?.metrics_addr),
        &[],
    )?;
    ensure!(String::from_utf8_lossy(&ready.stdout).trim() == "ready");
    Ok(())
}

#[test]
fn status_reports_a_clear_error_when_no_agent_runs() -> anyhow::Result<()> {
    let out = std::process::Command::new(interceptor_tests::lab::interceptor_bin()?)
        .args(["status", "--admin-socket", "/nonexistent/admin.sock"])
        .output()?;
    ensure!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("/nonexistent/admin.sock") && stderr.contains("interceptor agent"),
        "{stderr}"
    );
    Ok(())
}
