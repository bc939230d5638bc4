//! The benchmarks (`cargo xtask bench`): the interceptor against plaintext and against stunnel
//! on the lab.
//!
//! One lab, two nodes; pod `client` on node 1 and pod `server` on node 2, both enrolled. The
//! load tools (iperf3 and the `lab-fixture` benchmark clients) and the servers run in the pods'
//! network namespaces; what differs between the variants is only the path:
//! - **direct**: the client runs in the client pod's namespace but outside its cgroup, so its
//!   connects are not captured: plaintext pod to pod, as without the interceptor;
//! - **interceptor**: the client runs in the client pod (namespace and cgroup), so connect4
//!   sends it through agent 1, mutual TLS to agent 2, and the server pod's loopback;
//! - **stunnel**: the client (outside the cgroup) talks to a stunnel client on the client pod's
//!   loopback, which opens TLS 1.3 with mutual certificate checks to a stunnel server on the
//!   server pod's address, which delivers on the server pod's loopback. Their certificates are
//!   issued by the lab's mesh CA for the same identities the agents present.
//!
//! A second new-connections measurement spreads the load over 50 client pods on node 1 (one
//! identity each), all calling the server pod: the interceptor client runs in each pod, the
//! direct client in each pod's namespace outside its cgroup, and for stunnel each pod has its
//! own stunnel client (as a sidecar would), all to the one stunnel server. During both
//! new-connections measurements the tunnel pool's reuse ratio is read from agent 1's metrics
//! (see [`pool`]).
//!
//! Each metric runs every variant once per round, rounds interleaved and the order rotated per
//! round; results are medians over rounds. Every load loop is bounded in count and time.

pub mod pool;
pub mod report;
pub mod stats;
pub mod stunnel;
pub mod tools;

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use serde_json::{Value, json};

use crate::{
    lab::{Lab, LabOptions, Pod, fixture_bin, interceptor_bin},
    scenario::wait_listening,
};
use stunnel::Service;
use tools::{last_json, number, run_bounded};

/// The three ways the client reaches the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Plaintext pod to pod, no interceptor on the path.
    Direct,
    /// Through both agents, mutual TLS between them.
    Interceptor,
    /// Through a stunnel client/server pair.
    Stunnel,
}

impl Variant {
    /// All variants, in report order.
    pub const ALL: [Variant; 3] = [Variant::Direct, Variant::Interceptor, Variant::Stunnel];

    /// Name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Interceptor => "interceptor",
            Variant::Stunnel => "stunnel",
        }
    }
}

/// Which measurements to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Bulk throughput (iperf3), 1 and 4 streams, and proxy CPU per GB.
    Throughput,
    /// Request/response latency on a held connection, 1 B and 1 KiB.
    Latency,
    /// New connections per second, from one client pod and from 50, with the tunnel pool's
    /// reuse ratio.
    Connections,
    /// Proxy memory per idle connection.
    Memory,
}

/// How much load each measurement puts on.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// Rounds (runs per variant) of every measurement.
    pub rounds: usize,
    /// Seconds per iperf3 run.
    pub throughput_secs: u64,
    /// Measured round trips per latency run.
    pub rr_count: usize,
    /// Unmeasured round trips before them.
    pub rr_warmup: usize,
    /// Milliseconds per connection-rate run.
    pub conn_ms: u64,
    /// Concurrent client threads of a connection-rate run.
    pub conn_threads: usize,
    /// Bytes of request (and of response) per new connection.
    pub conn_message: usize,
    /// Client pods of the many-pods connection-rate run (0: no such run).
    pub load_pods: usize,
    /// Client threads per pod in that run.
    pub load_threads: usize,
    /// Idle connections held for the memory measurement.
    pub hold_connections: usize,
}

impl Sizes {
    /// The full benchmark: 5 rounds (this machine is noisy), about five minutes in all.
    pub fn full() -> Sizes {
        Sizes {
            rounds: 5,
            throughput_secs: 3,
            rr_count: 20_000,
            rr_warmup: 2_000,
            conn_ms: 3_000,
            conn_threads: 8,
            conn_message: 64,
            load_pods: 50,
            load_threads: 1,
            hold_connections: 1_000,
        }
    }

    /// One short round, for development.
    pub fn quick() -> Sizes {
        Sizes {
            rounds: 1,
            throughput_secs: 1,
            rr_count: 2_000,
            rr_warmup: 200,
            conn_ms: 1_000,
            conn_threads: 8,
            conn_message: 64,
            load_pods: 50,
            load_threads: 1,
            hold_connections: 200,
        }
    }
}

/// One run of one metric for one variant.
#[derive(Clone, Debug)]
pub struct Run {
    /// Metric key (see [`report::METRICS`]).
    pub metric: &'static str,
    /// The variant measured.
    pub variant: Variant,
    /// Round number, from 1.
    pub round: usize,
    /// The value, in the metric's unit.
    pub value: f64,
    /// What the tool reported, for the JSON file.
    pub detail: Value,
}

/// Time for all measurements; a single run is bounded to well under a minute on top.
pub const TIME_BUDGET: Duration = Duration::from_secs(8 * 60);

const IPERF: Service = Service {
    name: "iperf",
    app_port: 5201,
};
const ECHO: Service = Service {
    name: "echo",
    app_port: 7000,
};
const ONCE: Service = Service {
    name: "once",
    app_port: 7001,
};
/// The one-shot echo server of the many-pods run, with enough workers for all its clients.
const ONCE_MANY: Service = Service {
    name: "once-many",
    app_port: 7002,
};

/// How long the memory readings wait for the agents' allocator to return freed pages: more
/// than the agent's jemalloc `dirty_decay_ms` (1 s, `interceptor/src/main.rs`).
const MEMORY_SETTLE: Duration = Duration::from_millis(1_500);

/// Holds a command at `read` until its standard input gets a line, then execs the program
/// (`$0`) with its arguments in the same process, so it keeps the namespace and cgroup it was
/// started in. Lets many clients start their measurement together.
const GATE: &str = "read go && exec \"$0\" \"$@\"";

/// The lab with its pods, servers and stunnel pair.
pub struct Bench {
    lab: Lab,
    client: Pod,
    server: Pod,
    /// The client pods of the many-pods run, on node 1.
    load_pods: Vec<Pod>,
    /// The stunnel client and server.
    stunnel_pids: Vec<u32>,
    /// One stunnel client per load pod.
    load_stunnel_pids: Vec<u32>,
    sizes: Sizes,
    /// Runs so far.
    pub runs: Vec<Run>,
}

impl Bench {
    /// Builds the lab, enrolls the pods, and starts the servers and the stunnel pair; with
    /// `parts` including [`Part::Connections`], also the load pods of the many-pods run, each
    /// with its stunnel client.
    pub fn setup(sizes: Sizes, parts: &[Part]) -> anyhow::Result<Bench> {
        for tool in ["iperf3", "stunnel"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            ensure!(found, "`{tool}` is missing; run `cargo xtask setup`");
        }
        let mut lab = Lab::new(LabOptions::default())?;
        let client = lab.add_pod(1, "client", "default")?;
        let server = lab.add_pod(2, "server", "default")?;
        lab.enroll(&client, "sleep", &[("app", "sleep")])?;
        lab.enroll(&server, "tracker", &[("app", "position-tracker")])?;
        let load_count = if parts.contains(&Part::Connections) {
            sizes.load_pods
        } else {
            0
        };
        let mut load_pods = Vec::with_capacity(load_count);
        for i in 1..=load_count {
            // One service account per pod: each pod is its own identity, so no pool can share
            // a tunnel between two of them whatever it keys on.
            let pod = lab.add_pod(1, &load_name(i), "default")?;
            lab.enroll(&pod, &load_name(i), &[("app", "load")])?;
            load_pods.push(pod);
        }
        // Servers run in the server pod's namespace (outside its cgroup, so nothing of the
        // mesh observes the direct and stunnel variants); the agent delivers mesh traffic to
        // them on the pod's loopback.
        let mut iperf = lab.in_pod_netns(&server, "iperf3")?;
        iperf
            .args(["-s", "-p", &IPERF.app_port.to_string()])
            .stdout(Stdio::null());
        lab.spawn(iperf)?;
        let fixture = fixture_bin()?;
        let mut echo = lab.in_pod_netns(&server, &fixture)?;
        echo.args(["echo", "--port", &ECHO.app_port.to_string()])
            .stdout(Stdio::null());
        lab.spawn(echo)?;
        let mut once = lab.in_pod_netns(&server, &fixture)?;
        once.args([
            "echo",
            "--port",
            &ONCE.app_port.to_string(),
            "--workers",
            &(sizes.conn_threads * 2).to_string(),
            "--once",
            &sizes.conn_message.to_string(),
        ])
        .stdout(Stdio::null());
        lab.spawn(once)?;
        let mut services = vec![IPERF, ECHO, ONCE];
        if !load_pods.is_empty() {
            let mut once = lab.in_pod_netns(&server, &fixture)?;
            once.args([
                "echo",
                "--port",
                &ONCE_MANY.app_port.to_string(),
                "--workers",
                &(load_pods.len() * sizes.load_threads * 2).to_string(),
                "--once",
                &sizes.conn_message.to_string(),
            ])
            .stdout(Stdio::null());
            lab.spawn(once)?;
            services.push(ONCE_MANY);
        }
        for service in &services {
            wait_listening(&lab, &server, service.app_port)?;
        }
        let mut bench = Bench {
            lab,
            client,
            server,
            load_pods,
            stunnel_pids: Vec::new(),
            load_stunnel_pids: Vec::new(),
            sizes,
            runs: Vec::new(),
        };
        bench.start_stunnel(&services)?;
        Ok(bench)
    }

    fn start_stunnel(&mut self, services: &[Service]) -> anyhow::Result<()> {
        let dir = self.lab.dir.join("stunnel");
        std::fs::create_dir_all(&dir)?;
        let ca_dir = self.lab.node(1)?.ca_dir.clone();
        let issue = |service_account: &str| -> anyhow::Result<stunnel::Credentials> {
            let creds = stunnel::Credentials {
                cert: dir.join(format!("{service_account}.pem")),
                key: dir.join(format!("{service_account}-key.pem")),
            };
            let mut command = Command::new(interceptor_bin()?);
            command
                .args(["ca", "issue", "--dir"])
                .arg(&ca_dir)
                .args(["-n", "default", "--service-account", service_account])
                .arg("--cert-out")
                .arg(&creds.cert)
                .arg("--key-out")
                .arg(&creds.key);
            run_bounded(command, Duration::from_secs(30))?;
            Ok(creds)
        };
        let client_creds = issue("sleep")?;
        let server_creds = issue("tracker")?;
        let ca_file = ca_dir.join(interceptor::identity::CA_CERT_FILE);
        // The client pod's stunnel carries the single-pod services; the load pods' the one
        // of the many-pods run.
        let (many, single): (Vec<Service>, Vec<Service>) = services
            .iter()
            .partition(|s| s.app_port == ONCE_MANY.app_port);
        let server_conf = dir.join("server.conf");
        std::fs::write(
            &server_conf,
            stunnel::server_config(
                self.server.ip,
                services,
                &ca_file,
                &server_creds,
                &dir.join("server.log"),
            ),
        )?;
        let client_conf = dir.join("client.conf");
        std::fs::write(
            &client_conf,
            stunnel::client_config(
                self.server.ip,
                &single,
                &ca_file,
                &client_creds,
                &dir.join("client.log"),
            ),
        )?;
        let mut server = self.lab.in_pod_netns(&self.server, "stunnel")?;
        server
            .arg(&server_conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let server_pid = self.lab.spawn(server)?;
        let mut client = self.lab.in_pod_netns(&self.client, "stunnel")?;
        client
            .arg(&client_conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let client_pid = self.lab.spawn(client)?;
        self.stunnel_pids = vec![client_pid, server_pid];
        for service in services {
            wait_listening(&self.lab, &self.server, service.tunnel_port())
                .context("stunnel server did not start; see its log in the lab directory")?;
        }
        for service in &single {
            wait_listening(&self.lab, &self.client, service.local_port())
                .context("stunnel client did not start")?;
        }
        for (i, pod) in self.load_pods.iter().enumerate() {
            let name = load_name(i + 1);
            let creds = issue(&name)?;
            let conf = dir.join(format!("{name}.conf"));
            std::fs::write(
                &conf,
                stunnel::client_config(
                    self.server.ip,
                    &many,
                    &ca_file,
                    &creds,
                    &dir.join(format!("{name}.log")),
                ),
            )?;
            let mut client = self.lab.in_pod_netns(pod, "stunnel")?;
            client
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            self.load_stunnel_pids.push(self.lab.spawn(client)?);
        }
        for pod in &self.load_pods {
            wait_listening(&self.lab, pod, ONCE_MANY.local_port())
                .with_context(|| format!("the stunnel client of {} did not start", pod.name))?;
        }
        Ok(())
    }

    /// A command for the client side of `variant`, in the client pod.
    fn client_command(
        &self,
        variant: Variant,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> anyhow::Result<Command> {
        self.command_in(variant, &self.client, program)
    }

    /// A command for the client side of `variant` in `pod`: inside it (namespace and cgroup)
    /// for the interceptor, else in its namespace only.
    fn command_in(
        &self,
        variant: Variant,
        pod: &Pod,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> anyhow::Result<Command> {
        match variant {
            Variant::Interceptor => self.lab.in_pod(pod, program),
            Variant::Direct | Variant::Stunnel => self.lab.in_pod_netns(pod, program),
        }
    }

    /// Where the client side of `variant` connects to reach `service`.
    fn target(&self, variant: Variant, service: Service) -> SocketAddrV4 {
        match variant {
            Variant::Direct | Variant::Interceptor => {
                SocketAddrV4::new(self.server.ip, service.app_port)
            }
            Variant::Stunnel => service.local_addr(),
        }
    }

    /// The proxy processes of a variant (both ends), whose CPU and memory are measured.
    fn proxy_pids(&self, variant: Variant) -> anyhow::Result<Vec<u32>> {
        Ok(match variant {
            Variant::Direct => Vec::new(),
            Variant::Interceptor => vec![
                self.lab.agent_pid(1).context("agent 1 is not running")?,
                self.lab.agent_pid(2).context("agent 2 is not running")?,
            ],
            Variant::Stunnel => self.stunnel_pids.clone(),
        })
    }

    fn record(
        &mut self,
        metric: &'static str,
        variant: Variant,
        round: usize,
        value: f64,
        detail: Value,
    ) {
        println!(
            "bench: round {round} {:<11} {metric:<10} {value:>10.2}",
            variant.name()
        );
        self.runs.push(Run {
            metric,
            variant,
            round,
            value,
            detail,
        });
    }

    /// Runs the chosen parts; each interleaves the variants round by round. Stops with an
    /// error (keeping the runs so far) once [`TIME_BUDGET`] is spent, so that with every
    /// single run also bounded the whole benchmark ends within ten minutes.
    pub fn run(&mut self, parts: &[Part]) -> anyhow::Result<()> {
        let budget = Instant::now() + TIME_BUDGET;
        // The memory part restarts the agents, so it goes last.
        for part in [
            Part::Throughput,
            Part::Latency,
            Part::Connections,
            Part::Memory,
        ] {
            if !parts.contains(&part) {
                continue;
            }
            let started = Instant::now();
            println!("bench: {part:?}");
            for round in 1..=self.sizes.rounds {
                for variant in rotated(round) {
                    ensure!(
                        Instant::now() < budget,
                        "the benchmark ran out of its {} s budget in {part:?}, round {round}; \
                         is the machine busy?",
                        TIME_BUDGET.as_secs()
                    );
                    match part {
                        Part::Throughput => {
                            self.throughput(variant, round, 1)?;
                            self.throughput(variant, round, 4)?;
                        }
                        Part::Latency => {
                            self.latency(variant, round, 1)?;
                            self.latency(variant, round, 1024)?;
                        }
                        Part::Connections => {
                            self.connections(variant, round)?;
                            if !self.load_pods.is_empty() {
                                self.connections_many(variant, round)?;
                            }
                        }
                        Part::Memory => {
                            if variant != Variant::Direct {
                                self.memory(variant, round)?;
                            }
                        }
                    }
                }
            }
            println!(
                "bench: {part:?} done in {:.1}s",
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }

    fn throughput(&mut self, variant: Variant, round: usize, streams: u32) -> anyhow::Result<()> {
        let target = self.target(variant, IPERF);
        let secs = self.sizes.throughput_secs;
        let mut command = self.client_command(variant, "iperf3")?;
        command.args([
            "-c",
            &target.ip().to_string(),
            "-p",
            &target.port().to_string(),
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "--connect-timeout",
            "5000",
            "-J",
        ]);
        let pids = self.proxy_pids(variant)?;
        let cpu_before = tools::total_cpu(&pids)?;
        let finished = run_bounded(command, Duration::from_secs(secs + 30))?;
        let cpu = tools::total_cpu(&pids)? - cpu_before;
        let report: Value = serde_json::from_str(&finished.stdout)
            .with_context(|| format!("iperf3 output: {}", finished.stdout))?;
        if let Some(error) = report.get("error") {
            anyhow::bail!("iperf3 ({}): {error}", variant.name());
        }
        let bits = number(&report, "/end/sum_received/bits_per_second")?;
        let bytes = number(&report, "/end/sum_received/bytes")?;
        let sent = number(&report, "/end/sum_sent/bytes")?;
        let detail = json!({
            "streams": streams,
            "seconds": number(&report, "/end/sum_received/seconds")?,
            "bytes_received": bytes,
            "bytes_sent": sent,
            "proxy_cpu_seconds": cpu,
            "retransmits": report.pointer("/end/sum_sent/retransmits"),
        });
        let (tput, cpu_metric) = if streams == 1 {
            ("tput_1", "cpu_gb_1")
        } else {
            ("tput_4", "cpu_gb_4")
        };
        self.record(tput, variant, round, bits / 1e9, detail.clone());
        if !pids.is_empty() {
            // Bytes moved: what the sender pushed into the path (the receiver's count is of the
            // measured interval only), in GB (10^9).
            self.record(
                cpu_metric,
                variant,
                round,
                cpu / (sent.max(bytes) / 1e9),
                detail,
            );
        }
        Ok(())
    }

    fn latency(&mut self, variant: Variant, round: usize, size: usize) -> anyhow::Result<()> {
        let mut command = self.client_command(variant, fixture_bin()?)?;
        command.args([
            "rr",
            "--to",
            &self.target(variant, ECHO).to_string(),
            "--size",
            &size.to_string(),
            "--count",
            &self.sizes.rr_count.to_string(),
            "--warmup",
            &self.sizes.rr_warmup.to_string(),
            "--max-ms",
            "15000",
        ]);
        let result = last_json(&run_bounded(command, Duration::from_secs(40))?)?;
        let (p50, p99) = if size == 1 {
            ("rr1_p50", "rr1_p99")
        } else {
            ("rr1k_p50", "rr1k_p99")
        };
        self.record(
            p50,
            variant,
            round,
            number(&result, "/p50_us")?,
            result.clone(),
        );
        self.record(p99, variant, round, number(&result, "/p99_us")?, result);
        Ok(())
    }

    fn connections(&mut self, variant: Variant, round: usize) -> anyhow::Result<()> {
        let mut command = self.client_command(variant, fixture_bin()?)?;
        command.args([
            "conn-rate",
            "--to",
            &self.target(variant, ONCE).to_string(),
            "--size",
            &self.sizes.conn_message.to_string(),
            "--threads",
            &self.sizes.conn_threads.to_string(),
            "--duration-ms",
            &self.sizes.conn_ms.to_string(),
            "--max",
            "1000000",
        ]);
        let pids = self.proxy_pids(variant)?;
        let pool_before = self.scrape_pool(variant)?;
        let cpu_before = tools::total_cpu(&pids)?;
        let limit = Duration::from_millis(self.sizes.conn_ms) + Duration::from_secs(30);
        let mut result = last_json(&run_bounded(command, limit)?)?;
        let cpu = tools::total_cpu(&pids)? - cpu_before;
        let reuse = self.reuse_since(pool_before, std::slice::from_ref(&self.client))?;
        let connections = number(&result, "/connections")?;
        let errors = number(&result, "/errors")?;
        ensure!(
            errors <= connections / 100.0,
            "{}: {errors} failed connections of {connections}: {result}",
            variant.name()
        );
        if connections > 0.0 && !pids.is_empty() {
            result["proxy_cpu_us_per_connection"] = json!(cpu * 1e6 / connections);
        }
        if let Some(reuse) = &reuse {
            result["pool"] = reuse.detail();
        }
        self.record(
            "conn_rate",
            variant,
            round,
            number(&result, "/per_sec")?,
            result.clone(),
        );
        if let Some(ratio) = reuse.as_ref().and_then(pool::Reuse::ratio) {
            self.record("reuse_1", variant, round, ratio, result["pool"].clone());
        }
        Ok(())
    }

    /// New connections from every load pod at once to the server pod: one `conn-rate` per
    /// pod, all started together through [`GATE`]; the rate is all their connections over the
    /// longest run.
    fn connections_many(&mut self, variant: Variant, round: usize) -> anyhow::Result<()> {
        let fixture = fixture_bin()?;
        let target = self.target(variant, ONCE_MANY).to_string();
        let mut commands = Vec::with_capacity(self.load_pods.len());
        for pod in &self.load_pods {
            let mut command = self.command_in(variant, pod, "sh")?;
            command
                .args(["-c", GATE])
                .arg(&fixture)
                .args(["conn-rate", "--to", &target, "--size"])
                .arg(self.sizes.conn_message.to_string())
                .arg("--threads")
                .arg(self.sizes.load_threads.to_string())
                .arg("--duration-ms")
                .arg(self.sizes.conn_ms.to_string())
                .args(["--max", "1000000"]);
            commands.push(command);
        }
        let pids = match variant {
            Variant::Stunnel => {
                let mut pids = self.load_stunnel_pids.clone();
                // The stunnel server (the client pod's stunnel client is idle here).
                pids.extend(self.stunnel_pids.get(1));
                pids
            }
            _ => self.proxy_pids(variant)?,
        };
        let pool_before = self.scrape_pool(variant)?;
        let cpu_before = tools::total_cpu(&pids)?;
        let limit = Duration::from_millis(self.sizes.conn_ms) + Duration::from_secs(30);
        let finished = tools::run_together(commands, limit)?;
        let cpu = tools::total_cpu(&pids)? - cpu_before;
        let reuse = self.reuse_since(pool_before, &self.load_pods)?;
        let per_pod = finished
            .iter()
            .map(last_json)
            .collect::<anyhow::Result<Vec<Value>>>()?;
        let sum = |pointer: &str| -> anyhow::Result<f64> {
            per_pod.iter().map(|r| number(r, pointer)).sum()
        };
        let (connections, errors) = (sum("/connections")?, sum("/errors")?);
        let secs: Vec<f64> = per_pod
            .iter()
            .map(|r| number(r, "/secs"))
            .collect::<anyhow::Result<_>>()?;
        let longest = secs.iter().copied().fold(0.0, f64::max);
        let shortest = secs.iter().copied().fold(f64::INFINITY, f64::min);
        ensure!(
            errors <= connections / 100.0,
            "{}, {} pods: {errors} failed connections of {connections}; last errors: {:?}",
            variant.name(),
            per_pod.len(),
            per_pod
                .iter()
                .filter_map(|r| r["last_error"].as_str())
                .take(3)
                .collect::<Vec<_>>()
        );
        ensure!(longest > 0.0, "no conn-rate run took any time: {per_pod:?}");
        let mut detail = json!({
            "pods": per_pod.len(),
            "threads_per_pod": self.sizes.load_threads,
            "connections": connections,
            "errors": errors,
            "secs_longest": longest,
            "secs_shortest": shortest,
            "per_pod_connections": per_pod.iter().map(|r| r["connections"].clone()).collect::<Vec<_>>(),
            "per_pod_p50_us": per_pod.iter().map(|r| r["p50_us"].clone()).collect::<Vec<_>>(),
            "per_pod_p99_us": per_pod.iter().map(|r| r["p99_us"].clone()).collect::<Vec<_>>(),
        });
        if connections > 0.0 && !pids.is_empty() {
            detail["proxy_cpu_us_per_connection"] = json!(cpu * 1e6 / connections);
        }
        if let Some(reuse) = &reuse {
            detail["pool"] = reuse.detail();
        }
        self.record(
            "conn_rate_50",
            variant,
            round,
            connections / longest,
            detail.clone(),
        );
        if let Some(ratio) = reuse.as_ref().and_then(pool::Reuse::ratio) {
            self.record("reuse_50", variant, round, ratio, detail["pool"].clone());
        }
        Ok(())
    }

    /// For the interceptor, the pool counters of agent 1 (the client side) now.
    fn scrape_pool(&self, variant: Variant) -> anyhow::Result<Option<pool::Scrape>> {
        if variant != Variant::Interceptor {
            return Ok(None);
        }
        let url = format!("http://{}/metrics", self.lab.node(1)?.metrics_addr);
        let mut curl = self.lab.on_node(1, "curl")?;
        curl.args(["-sS", "--fail", "--max-time", "5", &url]);
        let finished = run_bounded(curl, Duration::from_secs(10))
            .context("reading agent 1's /metrics for the pool counters")?;
        Ok(Some(pool::Scrape::parse(&finished.stdout)))
    }

    /// The pool's reuse over `pods` since `before` (the interceptor only).
    fn reuse_since(
        &self,
        before: Option<pool::Scrape>,
        pods: &[Pod],
    ) -> anyhow::Result<Option<pool::Reuse>> {
        let Some(before) = before else {
            return Ok(None);
        };
        let after = self
            .scrape_pool(Variant::Interceptor)?
            .context("pool counters")?;
        let keys: Vec<pool::PodKey> = pods
            .iter()
            .map(|p| (p.namespace.clone(), p.name.clone()))
            .collect();
        Ok(Some(pool::Reuse::between(&before, &after, &keys)))
    }

    fn memory(&mut self, variant: Variant, round: usize) -> anyhow::Result<()> {
        if variant == Variant::Interceptor {
            // Fresh agents, so the growth is not hidden by memory an earlier measurement left
            // free inside the allocator.
            for node in [1, 2] {
                self.lab.kill_agent(node)?;
                self.lab.start_agent(node)?;
            }
        }
        let pids = self.proxy_pids(variant)?;
        let target = self.target(variant, ECHO);
        // Warm up: first connections set up sessions, caches and worker threads.
        self.hold(variant, target, 20, || Ok(()))?;
        // Both readings wait out the agents' allocator purge (jemalloc returns freed pages
        // after `dirty_decay_ms`, 1 s): read sooner, the reading before still counted pages
        // freed since the start and the growth came out too small, even 0.
        std::thread::sleep(MEMORY_SETTLE);
        let before = tools::total_rss(&pids)?;
        let connections = self.sizes.hold_connections;
        let mut during = 0;
        self.hold(variant, target, connections, || {
            // Let both agents finish setting up the last connections, and purge what the
            // handshakes freed.
            std::thread::sleep(MEMORY_SETTLE);
            during = tools::total_rss(&pids)?;
            Ok(())
        })?;
        let growth_kib = during.saturating_sub(before) as f64;
        let mib_per_1000 = growth_kib / 1024.0 * 1000.0 / connections as f64;
        self.record(
            "mem_1000",
            variant,
            round,
            mib_per_1000,
            json!({
                "connections": connections,
                "rss_before_kib": before,
                "rss_during_kib": during,
                "kib_per_connection": growth_kib / connections as f64,
            }),
        );
        Ok(())
    }

    /// Holds `connections` idle connections through `variant` while `during` runs.
    fn hold(
        &self,
        variant: Variant,
        target: SocketAddrV4,
        connections: usize,
        during: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut command = self.client_command(variant, fixture_bin()?)?;
        command
            .args([
                "hold",
                "--to",
                &SocketAddr::V4(target).to_string(),
                "--connections",
                &connections.to_string(),
                "--max-ms",
                "30000",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("starting lab-fixture hold")?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        // Bounded by the fixture's own --max-ms: it exits (closing stdout) when time is up.
        BufReader::new(stdout).read_line(&mut line)?;
        let result = if line.starts_with("ready") {
            during()
        } else {
            let _ = child.kill();
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
            }
            Err(anyhow::anyhow!(
                "{}: holding {connections} connections failed: {line}{err}",
                variant.name()
            ))
        };
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.flush();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.wait();
        result
    }

    /// Facts about the setup for the report.
    pub fn setup_facts(&self) -> Value {
        json!({
            "client_pod": {"ip": self.client.ip.to_string(), "node": self.client.node},
            "server_pod": {"ip": self.server.ip.to_string(), "node": self.server.node},
            "sizes": {
                "rounds": self.sizes.rounds,
                "throughput_secs": self.sizes.throughput_secs,
                "rr_count": self.sizes.rr_count,
                "rr_warmup": self.sizes.rr_warmup,
                "conn_ms": self.sizes.conn_ms,
                "conn_threads": self.sizes.conn_threads,
                "conn_message_bytes": self.sizes.conn_message,
                "load_pods": self.sizes.load_pods,
                "load_threads_per_pod": self.sizes.load_threads,
                "hold_connections": self.sizes.hold_connections,
            },
        })
    }

    /// How to reach the running lab by hand: processes, namespaces and addresses of every
    /// variant, for profiling.
    pub fn describe(&self) -> Value {
        let netns = |pod: &Pod| crate::lab::netns_path(&pod.netns).display().to_string();
        let targets = |variant: Variant| {
            json!({
                "iperf3": self.target(variant, IPERF).to_string(),
                "echo": self.target(variant, ECHO).to_string(),
                "echo_once": self.target(variant, ONCE).to_string(),
                "echo_once_from_load_pods": self.target(variant, ONCE_MANY).to_string(),
            })
        };
        let load_pods: Vec<Value> = self
            .load_pods
            .iter()
            .map(|pod| {
                json!({
                    "name": pod.name,
                    "ip": pod.ip.to_string(),
                    "netns": netns(pod),
                    "cgroup": pod.cgroup.display().to_string(),
                })
            })
            .collect();
        json!({
            "lab": self.lab.dir.display().to_string(),
            "client_netns": netns(&self.client),
            "client_cgroup": self.client.cgroup.display().to_string(),
            "server_netns": netns(&self.server),
            "agent_pids": [self.lab.agent_pid(1), self.lab.agent_pid(2)],
            "stunnel_pids": self.stunnel_pids,
            "load_pods": load_pods,
            "load_stunnel_pids": self.load_stunnel_pids,
            "direct": targets(Variant::Direct),
            "interceptor": targets(Variant::Interceptor),
            "stunnel": targets(Variant::Stunnel),
            "once_message_bytes": self.sizes.conn_message,
        })
    }

    /// The lab's scratch directory (logs of the agents and stunnel).
    pub fn lab_dir(&self) -> PathBuf {
        self.lab.dir.clone()
    }
}

/// Name and service account of the `i`th load pod (from 1).
fn load_name(i: usize) -> String {
    format!("load-{i:02}")
}

/// The variants in round `round`'s order: rotated each round, so no variant always runs
/// first or right after another.
pub fn rotated(round: usize) -> [Variant; 3] {
    let mut order = Variant::ALL;
    order.rotate_left((round - 1) % Variant::ALL.len());
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_rotate_the_order() {
        assert_eq!(rotated(1), Variant::ALL);
        assert_eq!(
            rotated(2),
            [Variant::Interceptor, Variant::Stunnel, Variant::Direct]
        );
        assert_eq!(rotated(4), Variant::ALL);
    }
}
