//! The install in deploy/, as `kubectl kustomize` renders it (offline; `cargo xtask setup`
//! installs kubectl): the objects a cluster gets, checked against the agent's real `--help`,
//! its policy parser, its CA loader and (RBAC) the API calls it makes. There is no cluster
//! here, so this is as far as validation goes.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail, ensure};
use interceptor_tests::lab::interceptor_bin;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// `kubectl kustomize <dir>`, parsed into its objects.
fn render(dir: &Path) -> anyhow::Result<Vec<Value>> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .context("running kubectl (cargo xtask setup installs Debian's kubernetes-client)")?;
    ensure!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_saphyr::from_multiple(&String::from_utf8(out.stdout)?)
        .with_context(|| format!("the rendering of {}", dir.display()))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

fn find<'a>(docs: &'a [Value], kind: &str) -> anyhow::Result<&'a Value> {
    let mut matching = docs.iter().filter(|d| d["kind"] == kind);
    let found = matching.next().with_context(|| format!("no {kind}"))?;
    ensure!(matching.next().is_none(), "more than one {kind}");
    Ok(found)
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The agent's `agent --help`, from the binary the tests built.
fn agent_help() -> anyhow::Result<String> {
    let out = Command::new(interceptor_bin()?)
        .args(["agent", "--help"])
        .output()?;
    ensure!(out.status.success(), "interceptor agent --help failed");
    Ok(String::from_utf8(out.stdout)?)
}

/// The help text of one `--flag` (its line and description), if the agent has it.
fn flag_help(help: &str, flag: &str) -> Option<String> {
    let lines: Vec<&str> = help.lines().collect();
    // clap's flag lines: `      --ca-dir <CA_DIR>`, `  -h, --help`.
    let is_flag_line = |l: &str| l.trim_start().starts_with('-');
    let start = lines.iter().position(|l| {
        is_flag_line(l)
            && l.split_whitespace()
                .take(2)
                .any(|w| w.trim_end_matches(',') == flag)
    })?;
    let end = lines[start + 1..]
        .iter()
        .position(|l| is_flag_line(l))
        .map_or(lines.len(), |p| start + 1 + p);
    Some(lines[start..end].join("\n"))
}

/// The `[default: ...]` of a flag's help.
fn flag_default(help: &str, flag: &str) -> Option<String> {
    let text = flag_help(help, flag)?;
    let at = text.find("[default: ")? + "[default: ".len();
    text[at..].split(']').next().map(str::to_owned)
}

/// The `--flag=value` arguments, by flag; a flag without `=` maps to "".
fn flag_values<'a>(args: &[&'a str]) -> BTreeMap<&'a str, &'a str> {
    args.iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split_once('=').unwrap_or((a, "")))
        .collect()
}

#[test]
fn the_base_renders_into_the_install_objects() -> anyhow::Result<()> {
    let docs = render(&deploy_dir())?;
    let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    let expected = BTreeSet::from([
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
    ]);
    ensure!(
        kinds == expected,
        "rendered kinds {kinds:?}, want {expected:?}"
    );
    ensure!(docs.len() == expected.len(), "one object of each kind");
    let namespace = find(&docs, "Namespace")?["metadata"]["name"].clone();
    for kind in ["ServiceAccount", "ConfigMap", "DaemonSet"] {
        ensure!(
            find(&docs, kind)?["metadata"]["namespace"] == namespace,
            "{kind} is not in the namespace {namespace}"
        );
    }
    Ok(())
}

#[test]
fn daemonset_runs_the_agent_with_flags_it_accepts_and_the_mounts_they_need() -> anyhow::Result<()> {
    let docs = render(&deploy_dir())?;
    let daemonset = find(&docs, "DaemonSet")?;
    let pod = &daemonset["spec"]["template"]["spec"];
    ensure!(
        pod["hostNetwork"] == true,
        "the agent needs the node's network"
    );
    ensure!(
        pod["hostPID"] == true,
        "the agent finds pods' network namespaces through the host's /proc"
    );
    let selector = &daemonset["spec"]["selector"]["matchLabels"];
    ensure!(
        &daemonset["spec"]["template"]["metadata"]["labels"] == selector,
        "selector must match the template labels"
    );
    let containers = pod["containers"].as_array().context("containers")?;
    ensure!(containers.len() == 1, "one container: the agent");
    let container = &containers[0];
    ensure!(
        container["securityContext"]["privileged"] == true,
        "eBPF and setns need privileges"
    );

    // Every flag is one the agent accepts, per its real --help.
    let args = strings(&container["args"]);
    ensure!(
        args.first() == Some(&"agent"),
        "args start with the agent command"
    );
    let help = agent_help()?;
    let flags = flag_values(&args[1..]);
    ensure!(
        flags.len() == args.len() - 1,
        "every argument is one --flag[=value]: {args:?}"
    );
    for flag in flags.keys() {
        ensure!(
            flag_help(&help, flag).is_some(),
            "agent does not accept {flag}"
        );
    }
    ensure!(flags.contains_key("--kubernetes"), "Kubernetes mode");
    ensure!(flags.get("--log-format") == Some(&"json"), "JSON logs");
    let env: Vec<&str> = container["env"]
        .as_array()
        .context("env")?
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    ensure!(
        flags.get("--node-name") == Some(&"$(NODE_NAME)") && env.contains(&"NODE_NAME"),
        "the node name comes from the downward API"
    );

    // Every path the agent uses, given or by default, is on a mounted volume.
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .context("volumes")?
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?, v)))
        .collect();
    let mounts: Vec<(&str, &Value)> = container["volumeMounts"]
        .as_array()
        .context("volumeMounts")?
        .iter()
        .map(|m| {
            let name = m["name"].as_str().context("mount name")?;
            let volume = volumes
                .get(name)
                .with_context(|| format!("mount {name} has no volume"))?;
            Ok((m["mountPath"].as_str().context("mountPath")?, *volume))
        })
        .collect::<anyhow::Result<_>>()?;
    let mounted = |path: &str| mounts.iter().any(|(m, _)| Path::new(path).starts_with(m));
    // The path flags of Kubernetes mode (--mesh-dir is standalone only).
    for flag in [
        "--ca-dir",
        "--bpf-dir",
        "--state-dir",
        "--admin-socket",
        "--policy-dir",
        "--pods-cgroup",
        "--kubeconfig",
    ] {
        ensure!(flag_help(&help, flag).is_some(), "agent has no {flag}");
        let path = match flags.get(flag) {
            Some(value) => (*value).to_owned(),
            None => match flag_default(&help, flag) {
                Some(default) => default,
                None => continue,
            },
        };
        ensure!(mounted(&path), "{flag} {path} is not on a mounted volume");
    }
    for (flag, value) in &flags {
        ensure!(
            !value.starts_with('/') || mounted(value),
            "{flag}={value} is not on a mounted volume"
        );
    }
    // Without --pods-cgroup the agent looks for the kubelet's pods cgroup under the cgroup2
    // root; pinned programs live in the node's bpffs. Both must be the host's.
    let host_mount = |path: &str| {
        mounts
            .iter()
            .any(|(m, v)| *m == path && v["hostPath"]["path"] == path)
    };
    ensure!(
        flags.contains_key("--pods-cgroup") || host_mount("/sys/fs/cgroup"),
        "the host's cgroup root is not mounted at /sys/fs/cgroup"
    );
    ensure!(host_mount("/sys/fs/bpf"), "the host's bpffs is not mounted");
    ensure!(
        !flags.contains_key("--mesh-dir"),
        "--mesh-dir is not read in Kubernetes mode"
    );

    // Probes: on the metrics port, readiness and liveness distinct.
    let metrics_port: u64 = flags
        .get("--metrics-addr")
        .and_then(|a| a.rsplit(':').next())
        .context("--metrics-addr")?
        .parse()?;
    let probe_path = |probe: &str| -> anyhow::Result<&str> {
        let get = &container[probe]["httpGet"];
        ensure!(
            get["port"].as_u64() == Some(metrics_port),
            "{probe} is not on the metrics port"
        );
        get["path"].as_str().with_context(|| format!("no {probe}"))
    };
    let ready = probe_path("readinessProbe")?;
    let live = probe_path("livenessProbe")?;
    ensure!(ready != live, "liveness must not be readiness");

    // Resources, and a grace period the agent's shutdown fits in (policy.rs measures it).
    for (field, what) in [
        ("requests", "cpu"),
        ("requests", "memory"),
        ("limits", "memory"),
    ] {
        ensure!(
            container["resources"][field][what].is_string(),
            "no {field}.{what}"
        );
    }
    ensure!(
        pod["terminationGracePeriodSeconds"]
            .as_u64()
            .is_some_and(|s| s >= 1),
        "terminationGracePeriodSeconds"
    );
    Ok(())
}

#[test]
fn the_policy_config_map_holds_valid_policies() -> anyhow::Result<()> {
    let docs = render(&deploy_dir())?;
    let config_map = find(&docs, "ConfigMap")?;
    let daemonset = find(&docs, "DaemonSet")?;
    let volumes = &daemonset["spec"]["template"]["spec"]["volumes"];
    ensure!(
        volumes
            .as_array()
            .context("volumes")?
            .iter()
            .any(|v| v["configMap"]["name"] == config_map["metadata"]["name"]),
        "the DaemonSet does not mount the policy ConfigMap"
    );
    for (file, text) in config_map["data"].as_object().context("data")? {
        let objects = interceptor::policy::parse_str(text.as_str().context("value")?, file)?;
        ensure!(!objects.is_empty(), "{file} holds no policy");
    }
    Ok(())
}

#[test]
fn rbac_grants_exactly_the_calls_the_agent_makes() -> anyhow::Result<()> {
    let docs = render(&deploy_dir())?;
    let role = find(&docs, "ClusterRole")?;
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().context("rules")? {
        ensure!(
            rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(),
            "unexpected rule shape: {rule:?}"
        );
        for field in ["apiGroups", "resources", "verbs"] {
            ensure!(rule[field].is_array(), "rule without {field}: {rule:?}");
        }
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    ensure!(
                        group != "*" && resource != "*" && verb != "*",
                        "wildcards are not least privilege"
                    );
                    ensure!(
                        granted.insert((group.to_owned(), resource.to_owned(), verb.to_owned())),
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
    let account = find(&docs, "ServiceAccount")?;
    let binding = find(&docs, "ClusterRoleBinding")?;
    ensure!(binding["roleRef"]["kind"] == "ClusterRole");
    ensure!(binding["roleRef"]["name"] == role["metadata"]["name"]);
    let subjects = binding["subjects"].as_array().context("subjects")?;
    ensure!(subjects.len() == 1, "one subject: the agent");
    ensure!(subjects[0]["kind"] == "ServiceAccount");
    ensure!(subjects[0]["name"] == account["metadata"]["name"]);
    ensure!(subjects[0]["namespace"] == account["metadata"]["namespace"]);
    let daemonset = find(&docs, "DaemonSet")?;
    ensure!(
        daemonset["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"],
        "the DaemonSet runs as the bound service account"
    );
    ensure!(daemonset["metadata"]["namespace"] == account["metadata"]["namespace"]);
    Ok(())
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_example_overlay_sets_the_image_and_makes_the_ca_secret_the_agent_loads() -> anyhow::Result<()>
{
    // A copy of deploy/ with a CA made as the README says, so the source tree stays clean.
    let scratch =
        Scratch(std::env::temp_dir().join(format!("interceptor-manifests-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&scratch.0);
    std::fs::create_dir_all(&scratch.0)?;
    let copied = Command::new("cp")
        .arg("-r")
        .arg(deploy_dir())
        .arg(&scratch.0)
        .status()?;
    ensure!(copied.success(), "copying deploy/");
    let overlay = scratch.0.join("deploy/overlays/example");
    let ca = Command::new(interceptor_bin()?)
        .args(["ca", "init", "--dir"])
        .arg(overlay.join("ca"))
        .output()?;
    ensure!(ca.status.success(), "interceptor ca init failed");
    let docs = render(&overlay)?;

    // The image is the one `cargo xtask image` tags: localhost/interceptor:<agent version>.
    let version = Command::new(interceptor_bin()?).arg("--version").output()?;
    let version = String::from_utf8(version.stdout)?;
    let version = version.split_whitespace().nth(1).context("--version")?;
    let daemonset = find(&docs, "DaemonSet")?;
    let pod = &daemonset["spec"]["template"]["spec"];
    ensure!(
        pod["containers"][0]["image"] == format!("localhost/interceptor:{version}").as_str(),
        "overlay image {} is not localhost/interceptor:{version}",
        pod["containers"][0]["image"]
    );

    // The generated Secret is the one the DaemonSet mounts at --ca-dir, and holds a CA the
    // agent loads.
    let secret = find(&docs, "Secret")?;
    ensure!(secret["metadata"]["namespace"] == daemonset["metadata"]["namespace"]);
    let name = secret["metadata"]["name"].as_str().context("secret name")?;
    let volume = pod["volumes"]
        .as_array()
        .context("volumes")?
        .iter()
        .find(|v| v["secret"]["secretName"] == name)
        .with_context(|| format!("no volume mounts the Secret {name}"))?;
    let args = strings(&pod["containers"][0]["args"]);
    let ca_dir = flag_values(&args)
        .get("--ca-dir")
        .copied()
        .context("--ca-dir")?;
    ensure!(
        pod["containers"][0]["volumeMounts"]
            .as_array()
            .context("volumeMounts")?
            .iter()
            .any(|m| m["name"] == volume["name"] && m["mountPath"] == ca_dir),
        "the Secret is not mounted at --ca-dir {ca_dir}"
    );
    let data = secret["data"].as_object().context("secret data")?;
    let keys: BTreeSet<&str> = data.keys().map(String::as_str).collect();
    ensure!(
        keys == BTreeSet::from([
            interceptor::identity::CA_CERT_FILE,
            interceptor::identity::CA_KEY_FILE
        ]),
        "secret keys {keys:?}"
    );
    let mounted = scratch.0.join("mounted-ca");
    std::fs::create_dir_all(&mounted)?;
    for (file, encoded) in data {
        let decoded = Command::new("base64")
            .arg("-d")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .map(|mut stdin| stdin.write_all(encoded.as_str().unwrap_or("").as_bytes()))
                    .transpose()?;
                child.wait_with_output()
            })?;
        if !decoded.status.success() {
            bail!("secret data {file} is not base64");
        }
        std::fs::write(mounted.join(file), decoded.stdout)?;
    }
    interceptor::identity::Ca::load(&mounted).context("the agent cannot load the Secret's CA")?;
    Ok(())
}
