//! The Kubernetes manifests in deploy/: well-formed, and consistent with the agent's flags and
//! with the policy parser. There is no cluster here, so this is as far as validation goes.

use std::process::Command;

use anyhow::{Context, ensure};
use serde_json::Value;

fn manifests() -> anyhow::Result<Vec<Value>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(path)?;
    serde_saphyr::from_multiple(&text).context("deploy/daemonset.yaml")
}

#[test]
fn daemonset_runs_the_agent_with_flags_it_accepts() -> anyhow::Result<()> {
    let docs = manifests()?;
    let daemonset = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .context("no DaemonSet")?;
    let pod = &daemonset["spec"]["template"]["spec"];
    ensure!(
        pod["hostNetwork"] == true,
        "the agent needs the node's network"
    );
    let selector = &daemonset["spec"]["selector"]["matchLabels"];
    ensure!(
        &daemonset["spec"]["template"]["metadata"]["labels"] == selector,
        "selector must match the template labels"
    );
    let container = &pod["containers"][0];
    ensure!(
        container["securityContext"]["privileged"] == true,
        "eBPF and setns need privileges"
    );
    let args: Vec<&str> = container["args"]
        .as_array()
        .context("args")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(args.first() == Some(&"agent"));
    let help = Command::new(interceptor_tests::lab::interceptor_bin()?)
        .args(["agent", "--help"])
        .output()?;
    let help = String::from_utf8(help.stdout)?;
    for flag in args.iter().skip(1) {
        let name = flag.split('=').next().unwrap_or(flag);
        ensure!(
            help.contains(&format!("{name} ")) || help.contains(&format!("{name} <")),
            "agent does not accept {name}"
        );
    }
    // Every path flag points into a mounted volume.
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .context("volumeMounts")?
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    for flag in [
        "--pods-cgroup",
        "--ca-dir",
        "--state-dir",
        "--admin-socket",
        "--mesh-dir",
        "--policy-dir",
    ] {
        let value = args
            .iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")))
            .with_context(|| format!("{flag} missing"))?;
        ensure!(
            mounts.iter().any(|m| value.starts_with(m)),
            "{flag}={value} is not on a mounted volume"
        );
    }
    let probe_port = &container["readinessProbe"]["httpGet"]["port"];
    ensure!(
        args.iter()
            .any(|a| a.ends_with(&format!(":{}", probe_port.as_u64().unwrap_or(0)))),
        "probe port is not the metrics port"
    );
    Ok(())
}

#[test]
fn the_policy_config_map_holds_valid_policies() -> anyhow::Result<()> {
    let docs = manifests()?;
    let config_map = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .context("no ConfigMap")?;
    for (file, text) in config_map["data"].as_object().context("data")? {
        let objects = interceptor::policy::parse_str(text.as_str().context("value")?, file)?;
        ensure!(!objects.is_empty(), "{file} holds no policy");
    }
    Ok(())
}
