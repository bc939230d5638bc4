//! The lab: a multi-node "cluster" on one Linux host, made of network namespaces and cgroups.
//!
//! ```text
//!  fabric netns: bridge br0 ── 198.18.0.0/24 underlay
//!    ├─ node-1 netns (eth0 198.18.0.11, agent 1)  pods 198.19.1.0/24 via veths, gw 198.19.1.1
//!    │    ├─ pod netns (eth0 198.19.1.10) + cgroup <lab>/node-1/pods/<pod>
//!    │    └─ ...
//!    └─ node-2 netns (eth0 198.18.0.12, agent 2)  pods 198.19.2.0/24
//! ```
//! Nodes route each other's pod ranges over the underlay, so pods reach each other in
//! plaintext without the interceptor, as a CNI would. Every lab has unique names
//! (`icpt-<pid>-<n>`), and `Drop` removes everything it made; labs left by a killed process
//! are removed by the next lab that starts.

use std::{
    fs::File,
    io,
    net::Ipv4Addr,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};

const NETNS_DIR: &str = "/run/netns";
const LAB_PREFIX: &str = "icpt-";
const BPF_ROOT: &str = "/sys/fs/bpf/interceptor-lab";

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A node of the lab.
pub struct Node {
    /// 1-based index.
    pub index: u8,
    /// Node name as the agent knows it.
    pub name: String,
    /// Network namespace name.
    pub netns: String,
    /// Address on the underlay.
    pub underlay_ip: Ipv4Addr,
    /// The cgroup that holds this node's pods.
    pub pods_cgroup: PathBuf,
    /// The agent's admin socket.
    pub admin_socket: PathBuf,
    /// The agent's policy directory.
    pub policy_dir: PathBuf,
    /// The agent's /metrics and /healthz address (inside the node's namespace).
    pub metrics_addr: String,
    /// CA directory the agent uses.
    pub ca_dir: PathBuf,
    /// The cgroup the agent runs in: `None` for the lab's own (outside the pods cgroup).
    pub agent_cgroup: Option<PathBuf>,
    agent_args: Vec<String>,
    agent_nofile: Option<u64>,
    /// The agent's --state-dir.
    pub state_dir: PathBuf,
    /// Where the agent pins its kernel maps and links.
    pub bpf_dir: PathBuf,
    log: PathBuf,
    agent: Option<Child>,
    agent_command: Option<AgentCommand>,
    next_pod: u8,
}

/// Makes the command that starts a node's agent, up to and including the program that takes
/// `agent --node-name ...` next (for example `podman run ... <image>`).
pub type AgentCommand = std::sync::Arc<dyn Fn(&Node) -> anyhow::Result<Command> + Send + Sync>;

/// A pod of the lab.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Index of its node (1-based).
    pub node: u8,
    /// Network namespace name.
    pub netns: String,
    /// Pod address.
    pub ip: Ipv4Addr,
    /// Its cgroup.
    pub cgroup: PathBuf,
}

/// Options for [`Lab::new`].
pub struct LabOptions {
    /// How many nodes.
    pub nodes: u8,
    /// Nodes (1-based) whose agent gets certificates from a different CA.
    pub foreign_ca_nodes: Vec<u8>,
    /// Extra `interceptor agent` arguments for every agent.
    pub agent_args: Vec<String>,
    /// Start every agent with this open-file limit, soft and hard (the real kernel limit, set
    /// between fork and exec), instead of the one the lab inherited.
    pub agent_nofile: Option<u64>,
    /// Run every agent inside its node's pods cgroup, in a child cgroup `agent` (where a
    /// DaemonSet's agent is: its pod is under kubepods), instead of outside it.
    pub agents_in_pods_cgroup: bool,
    /// The name of each node's pods cgroup: `kubepods.slice` or `kubepods` to lay the lab out
    /// as the kubelet does under its systemd or cgroupfs driver.
    pub pods_cgroup_name: &'static str,
    /// Starts every agent with this command instead of the interceptor binary (for example
    /// from its container image); it runs in the node's network namespace.
    pub agent_command: Option<AgentCommand>,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            nodes: 2,
            foreign_ca_nodes: Vec::new(),
            agent_args: Vec::new(),
            agent_nofile: None,
            agents_in_pods_cgroup: false,
            pods_cgroup_name: "pods",
            agent_command: None,
        }
    }
}

/// A running lab; dropping it tears everything down.
pub struct Lab {
    /// Unique name of this lab.
    pub name: String,
    /// Scratch directory (CA, mesh directory, agent state, logs).
    pub dir: PathBuf,
    /// The nodes.
    pub nodes: Vec<Node>,
    pods: Vec<Pod>,
    cgroup_root: PathBuf,
    children: Vec<Child>,
}

impl Lab {
    /// Builds the topology and starts one agent per node.
    pub fn new(options: LabOptions) -> anyhow::Result<Lab> {
        preflight()?;
        collect_stale_labs();
        let name = format!(
            "{LAB_PREFIX}{}-{}",
            std::process::id(),
            LAB_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join("interceptor-lab").join(&name);
        let cgroup_root = interceptor::cgroup::cgroup2_mount()?
            .join("interceptor-lab")
            .join(&name);
        let mut lab = Lab {
            dir,
            nodes: Vec::new(),
            pods: Vec::new(),
            cgroup_root,
            children: Vec::new(),
            name,
        };
        lab.build(&options)?;
        Ok(lab)
    }

    fn build(&mut self, options: &LabOptions) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        std::fs::create_dir_all(&self.cgroup_root)?;
        let ca = self.dir.join("ca");
        run_interceptor(&["ca", "init", "--dir", path_str(&ca)?])?;
        let foreign_ca = self.dir.join("foreign-ca");
        if !options.foreign_ca_nodes.is_empty() {
            run_interceptor(&["ca", "init", "--dir", path_str(&foreign_ca)?])?;
        }
        let fabric = self.netns_name("fab");
        ip(&["netns", "add", &fabric])?;
        ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &fabric, "link", "set", "br0", "up"])?;
        for index in 1..=options.nodes {
            let ca_dir = if options.foreign_ca_nodes.contains(&index) {
                foreign_ca.clone()
            } else {
                ca.clone()
            };
            self.add_node(index, &fabric, ca_dir, options)?;
            self.node_mut(index)?.agent_nofile = options.agent_nofile;
            self.node_mut(index)?.agent_command = options.agent_command.clone();
            if options.agents_in_pods_cgroup {
                self.set_agent_cgroup(index, "agent")?;
            }
        }
        for node in &self.nodes {
            for other in &self.nodes {
                if other.index != node.index {
                    let range = format!("198.19.{}.0/24", other.index);
                    ip(&[
                        "-n",
                        &node.netns,
                        "route",
                        "add",
                        &range,
                        "via",
                        &other.underlay_ip.to_string(),
                    ])?;
                }
            }
        }
        for index in 1..=options.nodes {
            self.start_agent(index)?;
        }
        Ok(())
    }

    fn add_node(
        &mut self,
        index: u8,
        fabric: &str,
        ca_dir: PathBuf,
        options: &LabOptions,
    ) -> anyhow::Result<()> {
        let netns = self.netns_name(&format!("n{index}"));
        let underlay_ip = Ipv4Addr::new(198, 18, 0, 10 + index);
        ip(&["netns", "add", &netns])?;
        let port = format!("node{index}");
        ip(&[
            "-n", fabric, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &netns,
        ])?;
        ip(&["-n", fabric, "link", "set", &port, "master", "br0", "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{underlay_ip}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        sysctl(&netns, "net/ipv4/ip_forward", "1")?;
        let node_dir = self.dir.join(format!("node-{index}"));
        let pods_cgroup = self
            .cgroup_root
            .join(format!("node-{index}"))
            .join(options.pods_cgroup_name);
        std::fs::create_dir_all(&pods_cgroup)?;
        let policy_dir = node_dir.join("policies");
        std::fs::create_dir_all(&policy_dir)?;
        self.nodes.push(Node {
            index,
            name: format!("node-{index}"),
            netns,
            underlay_ip,
            pods_cgroup,
            admin_socket: node_dir.join("admin.sock"),
            policy_dir,
            metrics_addr: format!("{underlay_ip}:15020"),
            ca_dir,
            agent_cgroup: None,
            agent_args: options.agent_args.clone(),
            agent_nofile: None,
            state_dir: node_dir.join("state"),
            bpf_dir: Path::new(BPF_ROOT)
                .join(&self.name)
                .join(format!("node-{index}")),
            log: node_dir.join("agent.log"),
            agent: None,
            agent_command: None,
            next_pod: 10,
        });
        Ok(())
    }

    /// Starts (or restarts) a node's agent and waits until it answers.
    pub fn start_agent(&mut self, index: u8) -> anyhow::Result<()> {
        let mesh_dir = self.dir.join("mesh");
        let node = self.node_mut(index)?;
        ensure!(
            node.agent.is_none(),
            "agent of node {index} is already running"
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let mut command = match node.agent_command.clone() {
            Some(make) => make(node)?,
            None => Command::new(interceptor_bin()?),
        };
        command
            .args(["agent", "--node-name", &node.name])
            .arg("--pods-cgroup")
            .arg(&node.pods_cgroup)
            .arg("--ca-dir")
            .arg(&node.ca_dir)
            .arg("--bpf-dir")
            .arg(&node.bpf_dir)
            .arg("--state-dir")
            .arg(&node.state_dir)
            .arg("--admin-socket")
            .arg(&node.admin_socket)
            .arg("--mesh-dir")
            .arg(&mesh_dir)
            .arg("--policy-dir")
            .arg(&node.policy_dir)
            .args(["--metrics-addr", &node.metrics_addr])
            .args(&node.agent_args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        enter(
            &mut command,
            Some(&netns_path(&node.netns)),
            node.agent_cgroup.as_deref(),
        )?;
        if let Some(limit) = node.agent_nofile {
            let limit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: setrlimit is async-signal-safe; lowering a limit needs no privilege.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        node.agent = Some(command.spawn().context("starting the agent")?);
        let socket = node.admin_socket.clone();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let node = self.node_mut(index)?;
            if let Some(status) = node
                .agent
                .as_mut()
                .and_then(|a| a.try_wait().ok().flatten())
            {
                node.agent = None;
                bail!(
                    "agent of node {index} exited with {status}:\n{}",
                    self.agent_log(index)
                );
            }
            let probe = self.cli(index, &["workload", "list", "--json"]);
            if socket.exists() && probe.is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "agent of node {index} did not answer within 20 s:\n{}",
                    self.agent_log(index)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// From its next start on, a node's agent runs in the child cgroup `name` of the node's
    /// pods cgroup (made here), as a DaemonSet's agent runs under kubepods. A new name gives
    /// a new cgroup, as a new container of the agent's pod would get. Returns its directory.
    pub fn set_agent_cgroup(&mut self, index: u8, name: &str) -> anyhow::Result<PathBuf> {
        let node = self.node_mut(index)?;
        let cgroup = node.pods_cgroup.join(name);
        std::fs::create_dir_all(&cgroup)?;
        node.agent_cgroup = Some(cgroup.clone());
        Ok(cgroup)
    }

    /// Replaces the extra arguments a node's agent gets from its next start on.
    pub fn set_agent_args(&mut self, index: u8, args: Vec<String>) -> anyhow::Result<()> {
        self.node_mut(index)?.agent_args = args;
        Ok(())
    }

    /// From its next start on, a node's agent loads the mesh CA from `dir` (a CA rotation).
    pub fn set_ca_dir(&mut self, index: u8, dir: PathBuf) -> anyhow::Result<()> {
        self.node_mut(index)?.ca_dir = dir;
        Ok(())
    }

    /// Kills a node's agent with SIGKILL (no clean-up chance), as a crash would.
    pub fn kill_agent(&mut self, index: u8) -> anyhow::Result<()> {
        let node = self.node_mut(index)?;
        if let Some(mut agent) = node.agent.take() {
            agent.kill()?;
            agent.wait()?;
        }
        Ok(())
    }

    /// Stops a node's agent with SIGTERM, as the kubelet stops a container, and waits for it
    /// to exit; fails unless it exits successfully within `deadline`. Returns how long it took.
    pub fn stop_agent(&mut self, index: u8, deadline: Duration) -> anyhow::Result<Duration> {
        let node = self.node_mut(index)?;
        let mut agent = node
            .agent
            .take()
            .with_context(|| format!("agent of node {index} is not running"))?;
        let start = Instant::now();
        // SAFETY: plain kill(2) on our own child, which has not been reaped.
        if unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) } != 0 {
            return Err(io::Error::last_os_error()).context("sending SIGTERM to the agent");
        }
        loop {
            if let Some(status) = agent.try_wait()? {
                let took = start.elapsed();
                ensure!(
                    status.success(),
                    "agent of node {index} exited with {status} after SIGTERM:\n{}",
                    self.agent_log(index)
                );
                return Ok(took);
            }
            if start.elapsed() > deadline {
                let _ = agent.kill();
                let _ = agent.wait();
                bail!(
                    "agent of node {index} still ran {deadline:?} after SIGTERM:\n{}",
                    self.agent_log(index)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The agent's log so far.
    pub fn agent_log(&self, index: u8) -> String {
        self.nodes
            .iter()
            .find(|n| n.index == index)
            .and_then(|n| std::fs::read_to_string(&n.log).ok())
            .unwrap_or_default()
    }

    /// Adds a pod (namespace, cgroup, veth, routes) to a node, not enrolled.
    pub fn add_pod(&mut self, node: u8, name: &str, namespace: &str) -> anyhow::Result<Pod> {
        let lab_name = self.name.clone();
        let n = self.node_mut(node)?;
        let slot = n.next_pod;
        n.next_pod += 1;
        let pod_ip = Ipv4Addr::new(198, 19, node, slot);
        let gateway = Ipv4Addr::new(198, 19, node, 1);
        let netns = format!("{lab_name}-n{node}p{slot}");
        let node_netns = n.netns.clone();
        let cgroup = n.pods_cgroup.join(name);
        ip(&["netns", "add", &netns])?;
        let port = format!("pod{slot}");
        ip(&[
            "-n",
            &node_netns,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ])?;
        ip(&[
            "-n",
            &node_netns,
            "addr",
            "add",
            &format!("{gateway}/32"),
            "dev",
            &port,
        ])?;
        ip(&["-n", &node_netns, "link", "set", &port, "up"])?;
        ip(&[
            "-n",
            &node_netns,
            "route",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            &port,
        ])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            &gateway.to_string(),
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &gateway.to_string(),
            "dev",
            "eth0",
        ])?;
        std::fs::create_dir_all(&cgroup)?;
        let pod = Pod {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            node,
            netns,
            ip: pod_ip,
            cgroup,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Enrolls a pod with its node's agent through the CLI.
    pub fn enroll(
        &self,
        pod: &Pod,
        service_account: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let netns = netns_path(&pod.netns);
        let mut args = vec![
            "workload".to_owned(),
            "add".into(),
            "--name".into(),
            pod.name.clone(),
            "-n".into(),
            pod.namespace.clone(),
            "--service-account".into(),
            service_account.into(),
            "--cgroup".into(),
            path_str(&pod.cgroup)?.to_owned(),
            "--netns".into(),
            path_str(&netns)?.to_owned(),
        ];
        for (key, value) in labels {
            args.push("--label".into());
            args.push(format!("{key}={value}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = self.cli(pod.node, &args)?;
        ensure!(
            output.status.success(),
            "enrolling {}: {}",
            pod.name,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }

    /// Runs the interceptor CLI against a node's agent.
    pub fn cli(&self, node: u8, args: &[&str]) -> anyhow::Result<Output> {
        let node = self.node(node)?;
        Ok(Command::new(interceptor_bin()?)
            .args(args)
            .env("INTERCEPTOR_ADMIN_SOCKET", &node.admin_socket)
            .stdin(Stdio::null())
            .output()?)
    }

    /// Like [`Lab::cli`], failing unless the command succeeds; returns its stdout.
    pub fn cli_ok(&self, node: u8, args: &[&str]) -> anyhow::Result<String> {
        let output = self.cli(node, args)?;
        ensure!(
            output.status.success(),
            "interceptor {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?)
    }

    /// A command that runs inside a pod: in its network namespace and its cgroup.
    pub fn in_pod(
        &self,
        pod: &Pod,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> anyhow::Result<Command> {
        let mut command = Command::new(program);
        enter(
            &mut command,
            Some(&netns_path(&pod.netns)),
            Some(&pod.cgroup),
        )?;
        Ok(command)
    }

    /// A command that runs in a pod's network namespace but not in its cgroup, so its
    /// connects are never captured: the pod's own addresses and loopback, without the mesh.
    pub fn in_pod_netns(
        &self,
        pod: &Pod,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> anyhow::Result<Command> {
        let mut command = Command::new(program);
        enter(&mut command, Some(&netns_path(&pod.netns)), None)?;
        Ok(command)
    }

    /// The process id of a node's agent, while it runs.
    pub fn agent_pid(&self, node: u8) -> Option<u32> {
        self.node(node).ok()?.agent.as_ref().map(Child::id)
    }

    /// A command that runs on a node, outside the mesh (the node's namespace, not a pod's
    /// cgroup).
    pub fn on_node(
        &self,
        node: u8,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> anyhow::Result<Command> {
        let mut command = Command::new(program);
        enter(
            &mut command,
            Some(&netns_path(&self.node(node)?.netns)),
            None,
        )?;
        Ok(command)
    }

    /// Starts a long-running process that the lab kills at teardown.
    pub fn spawn(&mut self, mut command: Command) -> anyhow::Result<u32> {
        let child = command.stdin(Stdio::null()).spawn()?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// A node by index.
    pub fn node(&self, index: u8) -> anyhow::Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.index == index)
            .with_context(|| format!("no node {index}"))
    }

    fn node_mut(&mut self, index: u8) -> anyhow::Result<&mut Node> {
        self.nodes
            .iter_mut()
            .find(|n| n.index == index)
            .with_context(|| format!("no node {index}"))
    }

    fn netns_name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.name)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for node in &mut self.nodes {
            if let Some(agent) = node.agent.as_mut() {
                let _ = agent.kill();
                let _ = agent.wait();
            }
        }
        remove_lab(&self.name);
    }
}

/// Removes everything a lab named `name` made; safe to call for partial labs.
fn remove_lab(name: &str) {
    if let Ok(cgroup2) = interceptor::cgroup::cgroup2_mount() {
        remove_cgroup_tree(&cgroup2.join("interceptor-lab").join(name));
    }
    if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
        for entry in entries.flatten() {
            let ns = entry.file_name().to_string_lossy().into_owned();
            if ns.starts_with(&format!("{name}-")) {
                let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            }
        }
    }
    let _ = std::fs::remove_dir_all(Path::new(BPF_ROOT).join(name));
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join("interceptor-lab").join(name));
}

/// Kills what is left in a cgroup tree, then removes it deepest first.
fn remove_cgroup_tree(root: &Path) {
    if !root.exists() {
        return;
    }
    let _ = std::fs::write(root.join("cgroup.kill"), "1");
    let mut dirs = Vec::new();
    collect_dirs(root, &mut dirs);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for dir in dirs {
        for _ in 0..50 {
            if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                break;
            }
            // Killed processes take a moment to leave the cgroup.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_owned());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
}

/// Removes labs whose creating process is gone (a killed test run).
fn collect_stale_labs() {
    let mut names: Vec<String> = Vec::new();
    let sources = [
        std::fs::read_dir(NETNS_DIR).ok(),
        std::fs::read_dir(BPF_ROOT).ok(),
        std::fs::read_dir(std::env::temp_dir().join("interceptor-lab")).ok(),
        interceptor::cgroup::cgroup2_mount()
            .ok()
            .and_then(|cg| std::fs::read_dir(cg.join("interceptor-lab")).ok()),
    ];
    for entries in sources.into_iter().flatten() {
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some(lab) = lab_of(&file)
                && !names.contains(&lab)
            {
                names.push(lab);
            }
        }
    }
    for lab in names {
        let pid: u32 = lab[LAB_PREFIX.len()..]
            .split('-')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if pid != 0 && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_lab(&lab);
        }
    }
}

/// `icpt-<pid>-<n>` from a lab name or one of its namespace names.
fn lab_of(file: &str) -> Option<String> {
    let rest = file.strip_prefix(LAB_PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?;
    let n = parts.next()?;
    (pid.chars().all(|c| c.is_ascii_digit()) && n.chars().all(|c| c.is_ascii_digit()))
        .then(|| format!("{LAB_PREFIX}{pid}-{n}"))
}

/// Makes `command` join a network namespace and/or a cgroup before exec, and die with its
/// parent. The files are opened here, before fork; the child only makes raw system calls.
fn enter(command: &mut Command, netns: Option<&Path>, cgroup: Option<&Path>) -> anyhow::Result<()> {
    let netns = netns
        .map(|path| {
            File::open(path).with_context(|| format!("network namespace {}", path.display()))
        })
        .transpose()?;
    let procs = cgroup
        .map(|path| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(path.join("cgroup.procs"))
                .with_context(|| format!("cgroup {}", path.display()))
        })
        .transpose()?;
    // SAFETY: the closure only calls async-signal-safe system calls on descriptors it owns.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(procs) = &procs
                && libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1
            {
                return Err(io::Error::last_os_error());
            }
            if let Some(netns) = &netns
                && libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Fails loudly when the machine cannot run the lab.
fn preflight() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the lab needs root (network namespaces, cgroups, eBPF)"
    );
    interceptor::cgroup::cgroup2_mount()?;
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    ensure!(
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some("bpf")),
        "bpffs is not mounted at /sys/fs/bpf; run `cargo xtask setup`"
    );
    for tool in ["ip", "curl"] {
        ensure!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()?
                .status
                .success(),
            "`{tool}` is missing; run `cargo xtask setup`"
        );
    }
    Ok(())
}

/// The interceptor binary: $INTERCEPTOR_BIN, or `interceptor` in the cargo target directory
/// this test or tool was built into.
pub fn interceptor_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("INTERCEPTOR_BIN") {
        return Ok(PathBuf::from(path));
    }
    sibling_bin("interceptor", "cargo build --release -p interceptor")
}

/// The `lab-fixture` test tool from the same cargo target directory.
pub fn fixture_bin() -> anyhow::Result<PathBuf> {
    sibling_tool("lab-fixture")
}

/// A tool of this crate (`lab-fixture`, `lab-up`, ...) from the same cargo target directory.
pub fn sibling_tool(name: &str) -> anyhow::Result<PathBuf> {
    sibling_bin(name, "cargo build --release -p interceptor-tests --bins")
}

/// A binary built into the same target directory as the running executable (tests run from
/// `target/<profile>/deps`, tools from `target/<profile>`).
fn sibling_bin(name: &str, build: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .with_context(|| {
            format!(
                "no {name} binary near {}; build it first (`{build}`; `cargo xtask test` does)",
                exe.display()
            )
        })
}

fn run_interceptor(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(interceptor_bin()?).args(args).output()?;
    ensure!(
        output.status.success(),
        "interceptor {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    ensure!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn sysctl(netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let mut command = Command::new("sh");
    command.args(["-c", &format!("echo {value} > /proc/sys/{key}")]);
    enter(&mut command, Some(&netns_path(netns)), None)?;
    let status = command.status()?;
    ensure!(status.success(), "sysctl {key}={value} in {netns}");
    Ok(())
}

/// Path of a named network namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("non-UTF-8 path {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names_are_recognised() {
        assert_eq!(lab_of("icpt-123-4").as_deref(), Some("icpt-123-4"));
        assert_eq!(lab_of("icpt-123-4-n1p10").as_deref(), Some("icpt-123-4"));
        assert_eq!(lab_of("icpt-x-4"), None);
        assert_eq!(lab_of("other"), None);
    }
}
