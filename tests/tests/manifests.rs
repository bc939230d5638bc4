//! The Kubernetes manifests in deploy/: well-formed, and consistent with the agent's flags,
//! with the policy parser, and (RBAC) with the API calls the agent makes. There is no cluster
//! here, so this is as far as validation goes.

use std::{collections::BTreeSet, process::Command};

use anyhow::{Context, ensure};
use serde_json::Value;

fn manifests() -> anyhow::Result<Vec<Value>> {
    load("daemonset.yaml")
}

fn load(file: &str) -> anyhow::Result<Vec<Value>> {
    let path = format!("{}/../deploy/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path)?;
    serde_saphyr::from_multiple(&text).with_context(|| format!("deploy/{file}"))
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
            help.contains(&format!("{name} "))
                || help.contains(&format!("{name} <"))
                || help.contains(&format!("{name}\n")),
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

#[test]
fn rbac_grants_exactly_the_calls_the_agent_makes() -> anyhow::Result<()> {
    let rbac = load("rbac.yaml")?;
    let daemonset_docs = manifests()?;
    let find = |docs: &[Value], kind: &str| -> anyhow::Result<Value> {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .cloned()
            .with_context(|| format!("no {kind}"))
    };
    let role = find(&rbac, "ClusterRole")?;
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().context("rules")? {
        ensure!(
            rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(),
            "unexpected rule shape: {rule:?}"
        );
        let strings = |field: &str| -> anyhow::Result<Vec<String>> {
            rule[field]
                .as_array()
                .with_context(|| format!("rule without {field}"))?
                .iter()
                .map(|v| v.as_str().map(str::to_owned).context("not a string"))
                .collect()
        };
        for group in strings("apiGroups")? {
            for resource in strings("resources")? {
                for verb in strings("verbs")? {
                    ensure!(
                        group != "*" && resource != "*" && verb != "*",
                        "wildcards are not least privilege"
                    );
                    ensure!(
                        granted.insert((group.clone(), resource.clone(), verb.clone())),
                        "{group}/{resource} {verb} granted twice"
                    );
                }
            }
        }
    }
    let called: BTreeSet<(String, String, String)> = interceptor::kube::API_CALLS
        .iter()
        .flat_map(|call| {
            call.verbs.iter().map(|verb| {
                (
                    call.group.to_owned(),
                    call.resource.to_owned(),
                    verb.to_string(),
                )
            })
        })
        .collect();
    let extra: Vec<_> = granted.difference(&called).collect();
    let missing: Vec<_> = called.difference(&granted).collect();
    ensure!(
        extra.is_empty() && missing.is_empty(),
        "ClusterRole and interceptor::kube::API_CALLS differ: granted but never called {extra:?}, \
         called but not granted {missing:?}"
    );

    // The binding gives that role to the DaemonSet's service account, in its namespace.
    let account = find(&rbac, "ServiceAccount")?;
    let binding = find(&rbac, "ClusterRoleBinding")?;
    ensure!(binding["roleRef"]["kind"] == "ClusterRole");
    ensure!(binding["roleRef"]["name"] == role["metadata"]["name"]);
    let subjects = binding["subjects"].as_array().context("subjects")?;
    ensure!(subjects.len() == 1, "one subject: the agent");
    ensure!(subjects[0]["kind"] == "ServiceAccount");
    ensure!(subjects[0]["name"] == account["metadata"]["name"]);
    ensure!(subjects[0]["namespace"] == account["metadata"]["namespace"]);
    let daemonset = find(&daemonset_docs, "DaemonSet")?;
    ensure!(
        daemonset["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"],
        "the DaemonSet runs as the bound service account"
    );
    ensure!(daemonset["metadata"]["namespace"] == account["metadata"]["namespace"]);
    let namespace = find(&daemonset_docs, "Namespace")?;
    ensure!(namespace["metadata"]["name"] == account["metadata"]["namespace"]);
    Ok(())
}
