//! Issue 13: the tunnel port speaks HBONE as another implementation expects it. The client is
//! `tests/scripts/hbone_client.py`: OpenSSL (Python's `ssl`) for mutual TLS 1.3 with ALPN
//! `h2`, and hyper-h2 for HTTP/2, sending ztunnel-shaped CONNECT requests with a certificate
//! from the mesh CA. Nothing of interceptor's own tunnel code is on the client side.

use std::{path::Path, process::Stdio};

use anyhow::{Context, ensure};
use interceptor_tests::{
    lab::{Lab, LabOptions, fixture_bin},
    scenario::{records, wait_listening},
};
use serde_json::Value;

const ECHO_PORT: u16 = 7002;
const CLOSED_PORT: u16 = 7999;

fn client_script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hbone_client.py")
}

#[test]
fn an_independent_http2_client_opens_hbone_streams_and_bad_requests_are_refused_and_recorded()
-> anyhow::Result<()> {
    let mut lab = Lab::new(LabOptions::default())?;
    let server = lab.add_pod(2, "server", "default")?;
    lab.enroll(&server, "tracker", &[])?;
    let mut echo = lab.in_pod(&server, fixture_bin()?)?;
    echo.args(["echo", "--port", &ECHO_PORT.to_string()])
        .stdout(Stdio::null());
    lab.spawn(echo)?;
    wait_listening(&lab, &server, ECHO_PORT)?;

    // A certificate for a workload no agent runs, from the mesh CA.
    let ca_dir = lab.node(1)?.ca_dir.clone();
    let cert = lab.dir.join("outsider.pem");
    let key = lab.dir.join("outsider-key.pem");
    lab.cli_ok(
        1,
        &[
            "ca",
            "issue",
            "--dir",
            ca_dir.to_str().context("path")?,
            "--service-account",
            "outsider",
            "--cert-out",
            cert.to_str().context("path")?,
            "--key-out",
            key.to_str().context("path")?,
        ],
    )?;

    let target = |port: u16| format!("{}:{port}", server.ip);
    // Debian's interpreter, which has the python3-h2 package set-up installs (another
    // python3 on PATH, e.g. pyenv's, would not see it).
    let mut command = lab.on_node(1, "/usr/bin/python3")?;
    command
        .arg(client_script())
        .arg(format!("{}:15008", server.ip))
        .arg(ca_dir.join("ca.pem"))
        .arg(&cert)
        .arg(&key)
        .args([
            target(ECHO_PORT),
            target(ECHO_PORT),
            target(CLOSED_PORT),
            format!("198.18.9.9:{ECHO_PORT}"),
            format!("{},GET", target(ECHO_PORT)),
        ]);
    let out = command
        .output()
        .context("running /usr/bin/python3 (setup installs python3-h2)")?;
    ensure!(
        out.status.success(),
        "hbone client: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(answers.len() == 5, "{answers:#?}");
    // Two streams multiplexed on one tunnel, each echoed and ended cleanly.
    for (answer, stream) in answers[..2].iter().zip([1, 3]) {
        ensure!(
            answer["status"] == 200
                && answer["echo"] == format!("hello over stream {stream}").as_str()
                && answer["ended"] == true
                && answer.get("reset").is_none(),
            "stream {stream}: {answer}"
        );
    }
    ensure!(answers[2]["status"] == 503, "closed port: {}", answers[2]);
    ensure!(
        answers[3]["status"] == 400,
        "another pod's address: {}",
        answers[3]
    );
    ensure!(answers[4]["status"] == 400, "GET: {}", answers[4]);

    // Each stream is its own record with the caller's identity; refusals say why.
    let inbound: Vec<Value> = records(&lab, 2)?
        .into_iter()
        .filter(|r| {
            r["direction"] == "inbound"
                && r["source_identity"] == "spiffe://cluster.local/ns/default/sa/outsider"
        })
        .collect();
    let reason_of = |destination: &str| -> Vec<String> {
        inbound
            .iter()
            .filter(|r| r["destination"] == destination)
            .map(|r| r["reason"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    let served = inbound
        .iter()
        .filter(|r| r["destination"] == target(ECHO_PORT).as_str() && r["verdict"] == "allowed")
        .count();
    ensure!(served == 2, "two served streams expected: {inbound:#?}");
    ensure!(
        reason_of(&target(CLOSED_PORT))
            .iter()
            .any(|r| r.contains("destination refused the connection")),
        "{inbound:#?}"
    );
    let refused: Vec<&str> = inbound
        .iter()
        .filter(|r| r["verdict"] == "failed")
        .filter_map(|r| r["reason"].as_str())
        .collect();
    ensure!(
        refused
            .iter()
            .any(|r| r.contains("198.18.9.9") && r.contains("this tunnel port serves"))
            && refused.iter().any(|r| r.contains("method GET")),
        "bad requests must be recorded with what was wrong: {refused:#?}"
    );
    Ok(())
}
