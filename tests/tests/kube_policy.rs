//! Issue 12 item 2 on the lab: PeerAuthentication objects of the API server join the policy
//! files and CLI-applied policies of agents in Kubernetes mode. The fake API server listens in
//! node 1's namespace; the `position-tracker` pod (namespace vehicles, node 2) serves
//! /vehicles/ on 8080, and the caller outside the mesh is a process in node 1's host
//! namespace.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use interceptor_tests::{
    fake_apiserver::{FakeApiServer, Kind, Outage, objects::peer_authentication},
    kube_lab::{Driver, WITHIN, kube_pod, kubernetes_lab, kubernetes_mode, wait_enrolled},
    lab::{Lab, Pod, fixture_bin},
    scenario::{probe, start_fixture},
};
use serde_json::Value;

const PORT: u16 = 8080;
const TRACKER: &str = "vehicles/position-tracker";

/// Kubernetes mode with the meshed namespace `vehicles` and the tracker enrolled on node 2.
fn tracker_lab() -> anyhow::Result<(Lab, FakeApiServer, Pod)> {
    let (mut lab, server) = kubernetes_lab(Driver::Systemd, &["vehicles"])?;
    let (tracker, object) = kube_pod(
        &mut lab,
        Driver::Systemd,
        2,
        "vehicles",
        "position-tracker",
        "BestEffort",
    )?;
    start_fixture(&mut lab, &tracker, "http", PORT)?;
    server.apply(object)?;
    wait_enrolled(&lab, 2, "position-tracker", true)?;
    Ok((lab, server, tracker))
}

/// What the outside caller gets from the tracker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outside {
    /// An answer in plaintext.
    Answered,
    /// Refused or reset by the pod's door.
    Refused,
}

fn outside(lab: &Lab, tracker: &Pod) -> anyhow::Result<Outside> {
    let (outcome, _) = probe(
        lab.on_node(1, fixture_bin()?)?,
        &format!("{}:{PORT}", tracker.ip),
    )?;
    Ok(match outcome.as_str() {
        "data" => Outside::Answered,
        "refused" | "reset" => Outside::Refused,
        other => anyhow::bail!("the outside caller's probe gave {other}"),
    })
}

/// Waits until the outside caller gets `want`, at most [`WITHIN`] after `since`; returns how
/// long it took from `since`.
fn wait_outside(
    lab: &Lab,
    tracker: &Pod,
    want: Outside,
    since: Instant,
) -> anyhow::Result<Duration> {
    loop {
        let got = outside(lab, tracker)?;
        let took = since.elapsed();
        if got == want {
            return Ok(took);
        }
        ensure!(
            took < WITHIN,
            "the outside caller still gets {got:?} {took:?} after the change, not {want:?}:\n{}",
            lab.agent_log(2)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `policy list --json` of node 2.
fn report(lab: &Lab) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(
        &lab.cli_ok(2, &["policy", "list", "--json"])?,
    )?)
}

fn api_path(namespace: &str, name: &str) -> String {
    format!("/apis/security.istio.io/v1/namespaces/{namespace}/peerauthentications/{name}")
}

/// The STRICT policy of Istio's walkthrough, mesh-wide.
fn mesh_strict() -> Value {
    peer_authentication("istio-system", "default", "STRICT", &[])
}

#[test]
fn a_strict_peer_authentication_from_the_api_refuses_the_outside_caller_until_deleted()
-> anyhow::Result<()> {
    let (lab, server, tracker) = tracker_lab()?;
    ensure!(
        outside(&lab, &tracker)? == Outside::Answered,
        "PERMISSIVE: the outside caller should be answered"
    );

    // kubectl apply: refused within 2 s, and `policy list` says the policy is the API's.
    let applied = Instant::now();
    server.apply(mesh_strict())?;
    let took = wait_outside(&lab, &tracker, Outside::Refused, applied)?;
    eprintln!("STRICT from the API in force after {took:?}");
    let listed = report(&lab)?;
    ensure!(
        listed["sources"]["istio-system/default"]["kind"] == "api"
            && listed["sources"]["istio-system/default"]["path"]
                == api_path("istio-system", "default"),
        "policy list does not name the API as the source: {listed:#}"
    );
    ensure!(
        listed["workloads"][TRACKER]["default"]["mode"] == "STRICT"
            && listed["workloads"][TRACKER]["default"]["policy"]["name"] == "default",
        "{listed:#}"
    );
    ensure!(
        listed["api"]["listed"] == true && listed["api"]["crd_absent"] == false,
        "{listed:#}"
    );
    let text = lab.cli_ok(2, &["policy", "list"])?;
    ensure!(
        text.contains(&format!("from api {}", api_path("istio-system", "default"))),
        "the table does not show the API origin:\n{text}"
    );

    // kubectl delete: answered again within 2 s.
    let deleted = Instant::now();
    ensure!(
        server
            .delete(Kind::PeerAuthentication, "istio-system", "default")
            .is_some()
    );
    let took = wait_outside(&lab, &tracker, Outside::Answered, deleted)?;
    eprintln!("deletion in force after {took:?}");
    let listed = report(&lab)?;
    ensure!(
        listed["policies"].as_array().is_some_and(Vec::is_empty),
        "{listed:#}"
    );
    Ok(())
}

#[test]
fn a_file_policy_and_an_api_policy_of_one_scope_follow_the_age_rule() -> anyhow::Result<()> {
    let (lab, server, tracker) = tracker_lab()?;

    // A namespace-wide PERMISSIVE policy in node 2's policy directory.
    let file = lab.node(2)?.policy_dir.join("vehicles-permissive.yaml");
    std::fs::write(
        &file,
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata:\n  name: from-file\n  namespace: vehicles\nspec:\n  mtls:\n    mode: PERMISSIVE\n",
    )?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while report(&lab)?["sources"]["vehicles/from-file"]["kind"] != "file" {
        ensure!(
            Instant::now() < deadline,
            "the file policy was not loaded:\n{}",
            lab.agent_log(2)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let file_seen = Instant::now();

    // A namespace-wide STRICT object created long before: the older one decides.
    let mut older = peer_authentication("vehicles", "from-api", "STRICT", &[]);
    older["metadata"]["creationTimestamp"] = "2020-01-01T00:00:00Z".into();
    let applied = Instant::now();
    server.apply(older)?;
    wait_outside(&lab, &tracker, Outside::Refused, applied)?;
    let listed = report(&lab)?;
    let names: Vec<&str> = listed["policies"]
        .as_array()
        .context("policies")?
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    ensure!(
        names == ["from-api", "from-file"],
        "oldest first: {names:?}"
    );
    ensure!(
        listed["workloads"][TRACKER]["default"]["policy"]["name"] == "from-api",
        "{listed:#}"
    );

    // The same object created anew, after the file was read: now the file's policy is the
    // older one, and the API's STRICT object is ignored, as Istio ignores newer policies.
    ensure!(
        server
            .delete(Kind::PeerAuthentication, "vehicles", "from-api")
            .is_some()
    );
    wait_outside(&lab, &tracker, Outside::Answered, Instant::now())?;
    // creationTimestamp has whole seconds: make sure the new one is later than the file.
    std::thread::sleep(Duration::from_millis(1100).saturating_sub(file_seen.elapsed()));
    server.apply(peer_authentication("vehicles", "from-api", "STRICT", &[]))?;
    let deadline = Instant::now() + WITHIN;
    loop {
        let listed = report(&lab)?;
        let names: Vec<&str> = listed["policies"]
            .as_array()
            .context("policies")?
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        if names == ["from-file", "from-api"] {
            ensure!(
                listed["workloads"][TRACKER]["default"]["mode"] == "PERMISSIVE"
                    && listed["workloads"][TRACKER]["default"]["policy"]["name"] == "from-file",
                "{listed:#}"
            );
            ensure!(
                listed["sources"]["vehicles/from-api"]["kind"] == "api"
                    && listed["sources"]["vehicles/from-file"]["kind"] == "file",
                "{listed:#}"
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the newer API object was not listed after the file's policy: {names:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for attempt in 0..3 {
        ensure!(
            outside(&lab, &tracker)? == Outside::Answered,
            "attempt {attempt}: the newer STRICT object decided:\n{}",
            lab.agent_log(2)
        );
    }
    Ok(())
}

#[test]
fn an_invalid_object_from_the_api_is_refused_and_the_others_apply() -> anyhow::Result<()> {
    let (lab, server, tracker) = tracker_lab()?;

    // A typo in a namespace policy next to the valid mesh-wide STRICT one.
    server.apply(peer_authentication("vehicles", "typo", "STRIKT", &[]))?;
    let applied = Instant::now();
    server.apply(mesh_strict())?;
    wait_outside(&lab, &tracker, Outside::Refused, applied)?;
    let listed = report(&lab)?;
    let rejected = listed["rejected"].as_array().context("rejected")?;
    ensure!(
        rejected.len() == 1
            && rejected[0]["policy"]["name"] == "typo"
            && rejected[0]["source"]["path"] == api_path("vehicles", "typo")
            && rejected[0]["previous_in_force"] == false
            && rejected[0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("spec.mtls.mode") && r.contains("STRIKT")),
        "{listed:#}"
    );
    ensure!(
        listed["sources"]["vehicles/typo"].is_null()
            && listed["workloads"][TRACKER]["default"]["policy"]["name"] == "default",
        "{listed:#}"
    );
    let log = lab.agent_log(2);
    ensure!(
        log.contains("PeerAuthentication from the API refused") && log.contains("STRIKT"),
        "the refusal was not logged:\n{log}"
    );
    let text = lab.cli_ok(2, &["policy", "list"])?;
    ensure!(
        text.contains("REFUSED") && text.contains("vehicles/typo"),
        "{text}"
    );

    // The valid policy edited into an invalid one: its last valid version stays in force, so
    // a typo does not open the pod.
    let mut broken = mesh_strict();
    broken["spec"]["mtls"]["mode"] = "strict".into();
    server.apply(broken)?;
    let deadline = Instant::now() + WITHIN;
    while !report(&lab)?["rejected"]
        .as_array()
        .is_some_and(|r| r.iter().any(|r| r["policy"]["name"] == "default"))
    {
        ensure!(
            Instant::now() < deadline,
            "the broken edit was not reported:\n{}",
            lab.agent_log(2)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let listed = report(&lab)?;
    ensure!(
        listed["rejected"]
            .as_array()
            .context("rejected")?
            .iter()
            .any(|r| r["policy"]["name"] == "default" && r["previous_in_force"] == true),
        "{listed:#}"
    );
    for attempt in 0..3 {
        ensure!(
            outside(&lab, &tracker)? == Outside::Refused,
            "attempt {attempt}: the broken edit opened the pod"
        );
    }

    // Fixed, then deleted: the caller is answered again; the typo stays refused meanwhile.
    let deleted = Instant::now();
    server.delete(Kind::PeerAuthentication, "istio-system", "default");
    wait_outside(&lab, &tracker, Outside::Answered, deleted)?;
    let listed = report(&lab)?;
    ensure!(
        listed["rejected"].as_array().map(Vec::len) == Some(1),
        "{listed:#}"
    );
    Ok(())
}

#[test]
fn without_the_crd_there_are_no_api_policies_and_no_error_loop() -> anyhow::Result<()> {
    let (mut lab, server, tracker) = tracker_lab()?;
    server.set_served(Kind::PeerAuthentication, false);
    kubernetes_mode(&mut lab, &server)?;
    wait_enrolled(&lab, 2, "position-tracker", true)?;

    // A file still applies, and `policy list` says why nothing comes from the API.
    let changed = Instant::now();
    std::fs::write(
        lab.node(2)?.policy_dir.join("mesh-strict.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata:\n  name: default\n  namespace: istio-system\nspec:\n  mtls:\n    mode: STRICT\n",
    )?;
    wait_outside(&lab, &tracker, Outside::Refused, changed)?;
    for node in [1, 2] {
        let listed: Value =
            serde_json::from_str(&lab.cli_ok(node, &["policy", "list", "--json"])?)?;
        ensure!(
            listed["api"]["listed"] == true && listed["api"]["crd_absent"] == true,
            "node {node}: {listed:#}"
        );
    }
    let listed = report(&lab)?;
    ensure!(
        listed["sources"]["istio-system/default"]["kind"] == "file",
        "{listed:#}"
    );
    let text = lab.cli_ok(2, &["policy", "list"])?;
    ensure!(
        text.contains("no PeerAuthentication CRD installed"),
        "{text}"
    );

    // Both agents have found the CRD missing: over the next 4 s neither asks again (they
    // look every 30 s), and neither logged an error.
    let peer_auth_calls = || {
        server
            .requests()
            .iter()
            .filter(|r| r.resource == "peerauthentications")
            .count()
    };
    let before = peer_auth_calls();
    std::thread::sleep(Duration::from_secs(4));
    let calls = peer_auth_calls() - before;
    ensure!(
        calls == 0,
        "{calls} PeerAuthentication requests in 4 s: {:?}",
        &server.requests()[before..]
    );
    for node in [1, 2] {
        let log = lab.agent_log(node);
        ensure!(
            log.contains("no PeerAuthentication CRD")
                && !log.contains("listing peerauthentications"),
            "node {node}:\n{log}"
        );
    }
    Ok(())
}

#[test]
fn a_restarted_agent_keeps_the_api_policies_until_the_api_answers() -> anyhow::Result<()> {
    let (mut lab, server, tracker) = tracker_lab()?;
    let applied = Instant::now();
    server.apply(mesh_strict())?;
    wait_outside(&lab, &tracker, Outside::Refused, applied)?;

    // Node 2's agent restarts while the API refuses every connection: the objects it last
    // listed stay in force, so the pod is not opened meanwhile.
    lab.kill_agent(2)?;
    server.set_outage(Outage::Refuse);
    lab.start_agent(2)?;
    wait_enrolled(&lab, 2, "position-tracker", true)?;
    for attempt in 0..3 {
        ensure!(
            outside(&lab, &tracker)? == Outside::Refused,
            "attempt {attempt}: a restarted agent opened the pod before the API answered:\n{}",
            lab.agent_log(2)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let listed = report(&lab)?;
    ensure!(
        listed["api"]["listed"] == false
            && listed["sources"]["istio-system/default"]["kind"] == "api",
        "{listed:#}"
    );

    // The API answers again, without the object: the pod is open again.
    server.delete(Kind::PeerAuthentication, "istio-system", "default");
    server.set_outage(Outage::None);
    let deadline = Instant::now() + Duration::from_secs(15);
    while outside(&lab, &tracker)? != Outside::Answered {
        ensure!(
            Instant::now() < deadline,
            "the deletion did not apply once the API answered:\n{}",
            lab.agent_log(2)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
