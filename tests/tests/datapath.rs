//! Issue 2: transparent capture and node-to-node mutual TLS on the lab (root, real kernel).

use std::process::{Command, Stdio};

use anyhow::{Context, ensure};
use interceptor_tests::{
    lab::{Lab, LabOptions, Pod},
    pattern,
    scenario::{curl, records, start_fixture, status_json},
};
use serde_json::Value;

const HTTP_PORT: u16 = 8080;
const SINK_PORT: u16 = 9000;

/// Two nodes; pod `client` on node 1 and pod `server` on node 2 (HTTP on 8080, sink on 9000),
/// both enrolled.
fn two_node_lab() -> anyhow::Result<(Lab, Pod, Pod)> {
    let mut lab = Lab::new(LabOptions::default())?;
    let client = lab.add_pod(1, "client", "default")?;
    let server = lab.add_pod(2, "server", "default")?;
    lab.enroll(&client, "sleep", &[("app", "sleep")])?;
    lab.enroll(&server, "tracker", &[("app", "position-tracker")])?;
    start_servers(&mut lab, &server)?;
    Ok((lab, client, server))
}

fn start_servers(lab: &mut Lab, pod: &Pod) -> anyhow::Result<()> {
    start_fixture(lab, pod, "http", HTTP_PORT)?;
    start_fixture(lab, pod, "sink", SINK_PORT)
}

fn fixture() -> anyhow::Result<std::path::PathBuf> {
    interceptor_tests::lab::fixture_bin()
}

fn status(lab: &Lab, node: u8) -> anyhow::Result<Value> {
    status_json(lab, node, &[])
}

#[test]
fn pod_to_pod_over_mutual_tls_with_large_transfers_and_no_plaintext_on_the_wire()
-> anyhow::Result<()> {
    let (mut lab, client, server) = two_node_lab()?;
    let url = |path: &str| format!("http://{}:{HTTP_PORT}{path}", server.ip);
    // The capture on node 1's link to the underlay starts before the first call: calls share
    // a pooled tunnel, whose TLS records can only be followed from its handshake on.
    let capture = lab.dir.join("node1.pcap");
    let tcpdump = start_capture(&mut lab, 1, &capture)?;

    let body = curl(lab.in_pod(&client, "curl")?, &url("/vehicles/"), &[])?;
    ensure!(
        body.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&body.stderr)
    );
    let vehicles: Value = serde_json::from_slice(&body.stdout)?;
    ensure!(
        vehicles[0]["name"] == "Vehicle 1",
        "unexpected body {vehicles}"
    );

    // 100 MB each way, the upload under the capture.
    const SIZE: u64 = 100 * 1024 * 1024;
    let upload_file = lab.dir.join("upload.bin");
    let marker = b"INTERCEPTOR-PLAINTEXT-MARKER-7f3a";
    write_marked_file(&upload_file, SIZE, marker)?;
    let expected_upload = sha256_file(&upload_file)?;
    let upload = curl(
        lab.in_pod(&client, "curl")?,
        &url("/upload"),
        &[
            "--data-binary",
            &format!("@{}", upload_file.display()),
            "-H",
            "Content-Type: application/octet-stream",
            "-H",
            "Expect:",
        ],
    )?;
    stop_capture(tcpdump)?;
    ensure!(
        upload.status.success(),
        "upload failed: {}",
        String::from_utf8_lossy(&upload.stderr)
    );
    let answer: Value = serde_json::from_slice(&upload.stdout)?;
    ensure!(answer["bytes"] == SIZE, "upload size {answer}");
    ensure!(
        answer["sha256"] == expected_upload.as_str(),
        "upload sha mismatch: {answer}"
    );

    let pcap = std::fs::read(&capture)?;
    ensure!(
        pcap.len() > 1_000_000,
        "capture too small ({} bytes): was anything captured?",
        pcap.len()
    );
    ensure!(
        !contains(&pcap, marker),
        "plaintext payload marker found on the wire between nodes"
    );
    ensure!(
        count_tls_records(&capture)? > 100,
        "no TLS application data records on port 15008 in the capture"
    );

    let download_file = lab.dir.join("download.bin");
    let download = curl(
        lab.in_pod(&client, "curl")?,
        &url(&format!("/download/{SIZE}")),
        &["-o", download_file.to_str().context("path")?],
    )?;
    ensure!(
        download.status.success(),
        "download failed: {}",
        String::from_utf8_lossy(&download.stderr)
    );
    ensure!(
        sha256_file(&download_file)? == pattern::sha256_hex(1, SIZE),
        "download sha mismatch"
    );

    // Both agents saw it as mutual TLS between the right identities.
    let outbound = records(&lab, 1)?;
    ensure!(
        outbound.iter().any(|r| r["direction"] == "outbound"
            && r["security"] == "mutual_tls"
            && r["verdict"] == "allowed"
            && r["source_identity"] == "spiffe://cluster.local/ns/default/sa/sleep"
            && r["destination_identity"] == "spiffe://cluster.local/ns/default/sa/tracker"
            && r["bytes_sent"].as_u64().unwrap_or(0) >= SIZE),
        "agent 1 has no outbound mutual TLS record of the upload: {outbound:#?}"
    );
    let inbound = records(&lab, 2)?;
    ensure!(
        inbound.iter().any(|r| r["direction"] == "inbound"
            && r["security"] == "mutual_tls"
            && r["source_identity"] == "spiffe://cluster.local/ns/default/sa/sleep"
            && r["bytes_received"].as_u64().unwrap_or(0) >= SIZE),
        "agent 2 has no inbound mutual TLS record of the download: {inbound:#?}"
    );
    Ok(())
}

#[test]
fn the_capture_check_sees_plaintext_when_traffic_bypasses_the_mesh() -> anyhow::Result<()> {
    // Control for the test above: the same capture does find the marker in plaintext traffic.
    let (mut lab, _client, server) = two_node_lab()?;
    let file = lab.dir.join("plain.bin");
    let marker = b"INTERCEPTOR-PLAINTEXT-MARKER-7f3a";
    write_marked_file(&file, 4 * 1024 * 1024, marker)?;
    let capture = lab.dir.join("plain.pcap");
    let tcpdump = start_capture(&mut lab, 1, &capture)?;
    let url = format!("http://{}:{HTTP_PORT}/upload", server.ip);
    let out = curl(
        lab.on_node(1, "curl")?,
        &url,
        &["--data-binary", &format!("@{}", file.display())],
    )?;
    stop_capture(tcpdump)?;
    ensure!(
        out.status.success(),
        "plain upload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        contains(&std::fs::read(&capture)?, marker),
        "marker not found in a plaintext capture"
    );
    Ok(())
}

#[test]
fn processes_outside_the_pods_cgroup_are_not_captured() -> anyhow::Result<()> {
    let (lab, _client, server) = two_node_lab()?;
    let before = status(&lab, 1)?;
    let out = curl(
        lab.on_node(1, "curl")?,
        &format!("http://{}:{HTTP_PORT}/vehicles/", server.ip),
        &[],
    )?;
    ensure!(
        out.status.success(),
        "direct call failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(String::from_utf8_lossy(&out.stdout).contains("Vehicle 1"));
    let after = status(&lab, 1)?;
    ensure!(
        after["records"] == before["records"],
        "agent 1 recorded a connection it must not see"
    );
    ensure!(
        after["kernel"]["redirected"] == before["kernel"]["redirected"],
        "the kernel redirected a connection from outside the pods' cgroup"
    );
    Ok(())
}

#[test]
fn loopback_destinations_inside_a_pod_are_not_captured() -> anyhow::Result<()> {
    let (mut lab, client, _server) = two_node_lab()?;
    start_fixture(&mut lab, &client, "http", 7070)?;
    let before = status(&lab, 1)?["kernel"]["redirected"].clone();
    let out = curl(
        lab.in_pod(&client, "curl")?,
        "http://127.0.0.1:7070/vehicles/",
        &[],
    )?;
    ensure!(
        out.status.success(),
        "loopback call failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        status(&lab, 1)?["kernel"]["redirected"] == before,
        "a loopback connect was redirected"
    );
    Ok(())
}

#[test]
fn destinations_outside_the_mesh_are_reached_in_plaintext() -> anyhow::Result<()> {
    let (mut lab, client, _server) = two_node_lab()?;
    let outsider = lab.add_pod(2, "outsider", "default")?;
    start_fixture(&mut lab, &outsider, "http", 8080)?;
    let out = curl(
        lab.in_pod(&client, "curl")?,
        &format!("http://{}:8080/vehicles/", outsider.ip),
        &[],
    )?;
    ensure!(
        out.status.success(),
        "call failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = records(&lab, 1)?;
    ensure!(
        records.iter().any(|r| r["direction"] == "outbound"
            && r["security"] == "plaintext"
            && r["destination"] == format!("{}:8080", outsider.ip)),
        "no outbound plaintext record: {records:#?}"
    );
    Ok(())
}

#[test]
fn an_agent_with_a_certificate_from_another_ca_is_refused() -> anyhow::Result<()> {
    let mut lab = Lab::new(LabOptions {
        nodes: 3,
        foreign_ca_nodes: vec![3],
        ..LabOptions::default()
    })?;
    let server = lab.add_pod(2, "server", "default")?;
    let intruder = lab.add_pod(3, "intruder", "default")?;
    lab.enroll(&server, "tracker", &[])?;
    lab.enroll(&intruder, "sleep", &[])?;
    start_servers(&mut lab, &server)?;
    let requests_url = format!("http://{}:{HTTP_PORT}/requests", server.ip);
    let out = curl(
        lab.in_pod(&intruder, "curl")?,
        &format!("http://{}:{HTTP_PORT}/vehicles/", server.ip),
        &[],
    )?;
    ensure!(
        !out.status.success(),
        "a foreign-CA agent got through: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(
        !String::from_utf8_lossy(&out.stdout).contains("Vehicle"),
        "plaintext fallback happened"
    );
    // The server app saw no request from the intruder (only this check itself).
    let served = curl(lab.on_node(2, "curl")?, &requests_url, &[])?;
    ensure!(
        String::from_utf8_lossy(&served.stdout).trim() == "1",
        "the app saw the intruder's request"
    );
    let inbound = records(&lab, 2)?;
    ensure!(
        inbound.iter().any(|r| r["verdict"] == "dropped"
            && r["reason"].as_str().unwrap_or("").contains("handshake")),
        "agent 2 did not record the refused handshake: {inbound:#?}"
    );
    Ok(())
}

#[test]
fn two_hundred_concurrent_connections_through_the_tunnel() -> anyhow::Result<()> {
    let (lab, client, server) = two_node_lab()?;
    let out = lab
        .in_pod(&client, fixture()?)?
        .args([
            "many",
            "--to",
            &format!("{}:{SINK_PORT}", server.ip),
            "--connections",
            "200",
            "--bytes",
            "65536",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(String::from_utf8_lossy(&out.stdout).trim() == "ok 200");
    Ok(())
}

#[test]
fn half_close_still_gets_the_whole_response() -> anyhow::Result<()> {
    let (lab, client, server) = two_node_lab()?;
    let bytes = 3 * 1024 * 1024 + 17;
    let out = lab
        .in_pod(&client, fixture()?)?
        .args([
            "send",
            "--to",
            &format!("{}:{SINK_PORT}", server.ip),
            "--bytes",
            &bytes.to_string(),
            "--seed",
            "42",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = format!("{bytes} {}\n", pattern::sha256_hex(42, bytes));
    ensure!(
        String::from_utf8_lossy(&out.stdout) == expected,
        "answer {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

#[test]
fn a_closed_destination_port_is_refused_quickly() -> anyhow::Result<()> {
    let (lab, client, server) = two_node_lab()?;
    let out = lab
        .in_pod(&client, fixture()?)?
        .args(["probe", "--to", &format!("{}:9", server.ip)])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace();
    let (outcome, millis) = (
        fields.next().unwrap_or(""),
        fields.next().unwrap_or("").parse::<u64>()?,
    );
    ensure!(
        matches!(outcome, "refused" | "reset"),
        "closed port gave {outcome}"
    );
    ensure!(millis < 1000, "closed port took {millis} ms");
    let outbound = records(&lab, 1)?;
    ensure!(
        outbound
            .iter()
            .any(|r| r["verdict"] == "failed"
                && r["reason"].as_str().unwrap_or("").contains("refused")),
        "no failed record: {outbound:#?}"
    );
    Ok(())
}

fn write_marked_file(path: &std::path::Path, size: u64, marker: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut offset = 0;
    while offset < size {
        let n = chunk.len().min((size - offset) as usize);
        pattern::fill(9, offset, &mut chunk[..n]);
        // A marker every 4 KiB, so any captured payload segment holds one.
        for start in (0..n.saturating_sub(marker.len())).step_by(4096) {
            chunk[start..start + marker.len()].copy_from_slice(marker);
        }
        file.write_all(&chunk[..n])?;
        offset += n as u64;
    }
    file.flush()?;
    Ok(())
}

fn sha256_file(path: &std::path::Path) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(pattern::hex(&hasher.finalize()))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Captures the first 20,000 packets on the node's underlay link.
fn start_capture(
    lab: &mut Lab,
    node: u8,
    file: &std::path::Path,
) -> anyhow::Result<std::process::Child> {
    let mut command = lab.on_node(node, "tcpdump")?;
    command
        .args(["-i", "eth0", "-s", "0", "-U", "-c", "20000", "-w"])
        .arg(file)
        .arg("tcp")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .context("starting tcpdump (cargo xtask setup installs it)")?;
    // tcpdump says "listening on" once the capture is open.
    let stderr = child.stderr.take().context("tcpdump stderr")?;
    let mut reader = std::io::BufReader::new(stderr);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line)?;
    ensure!(line.contains("listening"), "tcpdump did not start: {line}");
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    Ok(child)
}

fn stop_capture(mut child: std::process::Child) -> anyhow::Result<()> {
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait()?;
    Ok(())
}

fn count_tls_records(capture: &std::path::Path) -> anyhow::Result<usize> {
    let out = Command::new("tshark")
        .args(["-n", "-r"])
        .arg(capture)
        .args([
            "-d",
            "tcp.port==15008,tls",
            "-Y",
            "tls.record.opaque_type == 23",
            "-T",
            "fields",
            "-e",
            "frame.number",
        ])
        .output()
        .context("running tshark (cargo xtask setup installs it)")?;
    ensure!(
        out.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

#[test]
fn garbage_on_the_tunnel_port_and_admin_socket_changes_nothing() -> anyhow::Result<()> {
    let (lab, client, server) = two_node_lab()?;
    // Plaintext HTTP and random bytes at the tunnel port, from outside the mesh.
    for payload in [
        "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "\u{16}\u{3}\u{1}\u{2}\u{5}garbage",
    ] {
        let out = lab
            .on_node(1, "bash")?
            .args([
                "-c",
                &format!(
                    "printf '%s' \"$0\" | timeout 5 socat -t 2 - TCP:{}:15008",
                    server.ip
                ),
                payload,
            ])
            .output()?;
        ensure!(
            !String::from_utf8_lossy(&out.stdout).contains("Vehicle"),
            "the tunnel port answered plaintext"
        );
    }
    // Garbage on the admin socket gets an error answer.
    let socket = lab.node(2)?.admin_socket.clone();
    let out = Command::new("bash")
        .args([
            "-c",
            &format!(
                "printf 'not json\\n' | socat -t 2 - UNIX-CONNECT:{}",
                socket.display()
            ),
        ])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("bad admin request"),
        "admin socket answer: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The agent is still serving the mesh and recorded the refused handshakes.
    let body = curl(
        lab.in_pod(&client, "curl")?,
        &format!("http://{}:{HTTP_PORT}/vehicles/", server.ip),
        &[],
    )?;
    ensure!(String::from_utf8_lossy(&body.stdout).contains("Vehicle 1"));
    // Refusals from one address are aggregated into one record with a count.
    let refused: u64 = records(&lab, 2)?
        .iter()
        .filter(|r| {
            r["verdict"] == "dropped" && r["reason"].as_str().unwrap_or("").contains("handshake")
        })
        .map(|r| r["count"].as_u64().unwrap_or(0))
        .sum();
    ensure!(refused == 2, "expected 2 refused handshakes, saw {refused}");
    Ok(())
}

#[test]
fn certificates_rotate_without_breaking_the_mesh() -> anyhow::Result<()> {
    // 8 s certificates: renewed after 4 s, checked every second.
    let mut lab = Lab::new(LabOptions {
        agent_args: vec!["--cert-lifetime-secs".into(), "8".into()],
        ..LabOptions::default()
    })?;
    let client = lab.add_pod(1, "client", "default")?;
    let server = lab.add_pod(2, "server", "default")?;
    lab.enroll(&client, "sleep", &[])?;
    lab.enroll(&server, "tracker", &[])?;
    start_servers(&mut lab, &server)?;
    let url = format!("http://{}:{HTTP_PORT}/vehicles/", server.ip);
    let call = || -> anyhow::Result<bool> {
        let out = curl(lab.in_pod(&client, "curl")?, &url, &[])?;
        Ok(String::from_utf8_lossy(&out.stdout).contains("Vehicle 1"))
    };
    ensure!(call()?, "first call failed");
    // Past the certificates' first expiry: every call must keep working.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        ensure!(call()?, "a call failed while certificates rotated");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    for node in [1, 2] {
        let log = lab.agent_log(node);
        ensure!(
            log.matches("certificate rotated").count() >= 2,
            "node {node} did not rotate twice:\n{log}"
        );
    }
    Ok(())
}

#[test]
fn a_restarted_agent_keeps_its_pods_and_forgets_vanished_ones() -> anyhow::Result<()> {
    let (mut lab, client, server) = two_node_lab()?;
    let gone = lab.add_pod(2, "gone", "default")?;
    lab.enroll(&gone, "gone", &[])?;
    let links = lab.node(2)?.bpf_dir.join("links");
    let doors = |links: &std::path::Path| -> anyhow::Result<usize> {
        Ok(std::fs::read_dir(links)?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("pod-door-"))
            .count())
    };
    ensure!(doors(&links)? == 2, "one door per enrolled pod expected");
    lab.kill_agent(2)?;
    let out = Command::new("ip")
        .args(["netns", "del", &gone.netns])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lab.start_agent(2)?;
    let list = lab.cli_ok(2, &["workload", "list"])?;
    ensure!(
        list.contains("default/server") && !list.contains("default/gone"),
        "{list}"
    );
    ensure!(
        doors(&links)? == 1,
        "the vanished pod's door is still pinned"
    );
    let body = curl(
        lab.in_pod(&client, "curl")?,
        &format!("http://{}:{HTTP_PORT}/vehicles/", server.ip),
        &[],
    )?;
    ensure!(
        String::from_utf8_lossy(&body.stdout).contains("Vehicle 1"),
        "mesh broken after restart"
    );
    Ok(())
}
