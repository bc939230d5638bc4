//! `interceptor agent`.

use std::{net::SocketAddr, path::PathBuf};

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use crate::{
    config::AgentConfig,
    kube::ClientSource,
    limits,
    proxy::{admission::TunnelLimits, pool::PoolLimits},
};

/// Run the node agent.
///
/// Attaches interceptor's eBPF programs to the cgroup that holds this node's pods, serves the
/// admin socket for the CLI, and proxies enrolled pods' connections over mutual TLS. Kernel
/// state is pinned under --bpf-dir, so STRICT pods keep refusing plaintext while the agent is
/// down, and a restarted agent takes over its saved workloads.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Name of this node.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The cgroup v2 directory holding this node's pods (e.g. /sys/fs/cgroup/kubepods.slice).
    /// Required standalone; in Kubernetes mode it defaults to the kubelet's pods cgroup found
    /// under the cgroup v2 mount (kubepods.slice, kubepods, or kind's nested layouts).
    #[arg(long)]
    pods_cgroup: Option<PathBuf>,
    /// Directory of the mesh CA made by `interceptor ca init`.
    #[arg(long)]
    ca_dir: PathBuf,
    /// Where kernel maps and links are pinned [default: /sys/fs/bpf/interceptor/<node-name>].
    #[arg(long)]
    bpf_dir: Option<PathBuf>,
    /// Where enrolled workloads and applied policies are kept across restarts.
    #[arg(long, default_value = "/var/lib/interceptor")]
    state_dir: PathBuf,
    /// The admin socket the CLI talks to.
    #[arg(long, env = "INTERCEPTOR_ADMIN_SOCKET", default_value = crate::admin::DEFAULT_SOCKET)]
    admin_socket: PathBuf,
    /// Directory shared by all agents of the mesh, listing meshed workloads.
    #[arg(long, default_value = "/var/run/interceptor/mesh")]
    mesh_dir: PathBuf,
    /// Kubernetes mode with the in-cluster service account: this node's pods are enrolled
    /// and removed from the API server, and the mesh is read from it (not --mesh-dir).
    #[arg(long)]
    kubernetes: bool,
    /// Kubernetes mode with this kubeconfig file instead of the in-cluster service account.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Directory of PeerAuthentication files, loaded at start and watched for changes.
    #[arg(long)]
    policy_dir: Option<PathBuf>,
    /// Istio's root namespace: policies there without a selector apply mesh-wide.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// HTTP address for /metrics and /healthz/ready.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// How many recent connection records to keep in memory.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    record_capacity: u32,
    /// Lifetime of workload certificates in seconds; each is renewed at half its life.
    #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(8..=31_536_000))]
    cert_lifetime_secs: u64,
    /// Seconds a caller on a tunnel port (15008) has to complete the mutual-TLS handshake;
    /// then it is reset.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    tunnel_handshake_timeout_secs: u64,
    /// Seconds a caller on a tunnel port has, after the handshake, to send its tunnel
    /// request; then it is reset.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    tunnel_request_timeout_secs: u64,
    /// Most tunnel connections not yet authenticated at once, all pods of this node
    /// together; more are reset at once. Lowered to a quarter of the open-file limit when
    /// that is smaller.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    tunnel_max_pending: u32,
    /// Most tunnel connections not yet authenticated at once from one source address; more
    /// are reset at once.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    tunnel_max_pending_per_source: u32,
    /// Most connections one pooled tunnel (an HTTP/2 connection to another pod's agent)
    /// carries at once, as HBONE streams; more open another tunnel.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=256))]
    tunnel_max_streams: u32,
    /// Tunnels that connections from one pod to one destination pod spread over while every
    /// tunnel has a connection: each tunnel is encrypted on one thread, so busy connections
    /// on separate tunnels use separate cores. 1 puts them all on one tunnel.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    tunnel_spread: u32,
    /// Seconds a pooled tunnel with no connections stays open before it is closed.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    tunnel_idle_timeout_secs: u64,
    /// Niceness of the agent's threads (-20 to 19). Below 0, the agent's relays preempt
    /// CPU-bound work on a busy node instead of waiting behind it, which keeps the added
    /// latency of a round trip through the mesh from growing with the node's load
    /// (BENCHMARKS.md, "Where the time goes"); it needs CAP_SYS_NICE, else the agent warns
    /// and keeps its niceness. 0 leaves it as inherited.
    #[arg(long, default_value_t = DEFAULT_NICE, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-20..=19))]
    nice: i32,
    /// How log lines on stderr are written: `text` for people, `json` (one object per line,
    /// with timestamp, level, target, message and fields) for log collectors. RUST_LOG picks
    /// what is logged.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "INTERCEPTOR_LOG_FORMAT")]
    log_format: LogFormat,
}

/// The agent's default niceness (see `--nice`): enough to win wake-up preemption against
/// CPU-bound work at the default niceness, far from the real-time range.
const DEFAULT_NICE: i32 = -5;

/// How the agent writes its log lines to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, fields at the top level.
    Json,
}

/// Logs to stderr, where container runtimes collect them, filtered by RUST_LOG (default
/// `info`); coloured only on a terminal, so collected logs carry no escape codes.
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// Starts the runtime and the agent.
pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let nice = args.nice;
    let tunnel_limits = tunnel_limits(&args, raise_open_file_limit());
    let kubernetes = args.kubernetes || args.kubeconfig.is_some();
    let pods_cgroup = pods_cgroup(args.pods_cgroup.clone(), kubernetes, || {
        crate::cgroup::cgroup2_mount().context("finding the cgroup v2 mount in /proc/mounts")
    })?;
    info!(pods_cgroup = %pods_cgroup.display(), "capture attaches to the pods cgroup");
    let config = AgentConfig {
        bpf_dir: args
            .bpf_dir
            .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/interceptor").join(&args.node_name)),
        node_name: args.node_name,
        pods_cgroup,
        ca_dir: args.ca_dir,
        state_dir: args.state_dir,
        admin_socket: args.admin_socket,
        mesh_dir: args.mesh_dir,
        policy_dir: args.policy_dir,
        root_namespace: args.root_namespace,
        metrics_addr: args.metrics_addr,
        record_capacity: args.record_capacity as usize,
        cert_lifetime: Duration::from_secs(args.cert_lifetime_secs),
        kubernetes: kubernetes.then(|| ClientSource::from_flag(args.kubeconfig.as_deref())),
        tunnel_limits,
        pool_limits: PoolLimits {
            max_streams: args.tunnel_max_streams as usize,
            spread: args.tunnel_spread as usize,
            idle_timeout: Duration::from_secs(args.tunnel_idle_timeout_secs),
        },
    };
    // Before the runtime starts, so that its threads inherit it.
    set_niceness(nice);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(crate::app::run(config))
}

/// `--pods-cgroup` when given; in Kubernetes mode, else, the kubelet's pods cgroup found under
/// the cgroup v2 mount. Standalone, the flag is required: there is no kubelet to look for.
fn pods_cgroup(
    flag: Option<PathBuf>,
    kubernetes: bool,
    cgroup2_mount: impl FnOnce() -> anyhow::Result<PathBuf>,
) -> anyhow::Result<PathBuf> {
    match (flag, kubernetes) {
        (Some(dir), _) => Ok(dir),
        (None, true) => {
            let mount = cgroup2_mount()?;
            let root = crate::kube::cgroup::detect_pods_root(&mount)
                .context("--pods-cgroup is not given and no kubelet pods cgroup was found; pass --pods-cgroup")?;
            Ok(root.dir)
        }
        (None, false) => anyhow::bail!(
            "--pods-cgroup is required without --kubernetes/--kubeconfig: name the cgroup v2 directory that holds this node's pods"
        ),
    }
}

/// Sets the agent's niceness (`--nice`) and says so; warns when it cannot.
fn set_niceness(nice: i32) {
    match limits::niceness() {
        Ok(current) if current == nice => {}
        _ if nice == 0 => {}
        _ => match limits::set_niceness(nice) {
            Ok(()) => info!(nice, "scheduling niceness of the agent's threads (--nice)"),
            Err(e) => warn!(
                "cannot set the agent's niceness to {nice} (--nice): {e}; round trips through the mesh wait longer behind CPU-bound work on a busy node; grant CAP_SYS_NICE or pass --nice 0"
            ),
        },
    }
}

/// Raises the soft open-file limit to the hard one and says so; warns when it stays low.
/// Returns the soft limit in force.
fn raise_open_file_limit() -> u64 {
    match limits::raise_nofile() {
        Ok(limit) => {
            info!(
                before = limit.before,
                soft = limit.soft,
                hard = limit.hard,
                "open-file limit (RLIMIT_NOFILE)"
            );
            if limit.soft < limits::LOW_NOFILE {
                warn!(
                    "the open-file limit is low: {} (hard limit {}); each proxied connection uses two descriptors in each agent, so this agent can serve at most about {} connections at once; raise the hard limit to at least {} (LimitNOFILE= in systemd, the container runtime's nofile ulimit)",
                    limit.soft,
                    limit.hard,
                    limit.soft / 2,
                    limits::LOW_NOFILE
                );
            }
            limit.soft
        }
        Err(e) => {
            let soft = limits::nofile_soft();
            warn!("cannot raise the open-file limit (soft {soft}): {e}");
            soft
        }
    }
}

/// The tunnel limits from the flags; unauthenticated connections may use at most a quarter
/// of the descriptors, so a flood can never take those that real connections need.
fn tunnel_limits(args: &AgentArgs, nofile: u64) -> TunnelLimits {
    let fd_share = usize::try_from(nofile / 4).unwrap_or(usize::MAX).max(1);
    let max_pending = (args.tunnel_max_pending as usize).min(fd_share);
    if max_pending < args.tunnel_max_pending as usize {
        warn!(
            "--tunnel-max-pending lowered from {} to {max_pending}, a quarter of the open-file limit {nofile}",
            args.tunnel_max_pending
        );
    }
    TunnelLimits {
        handshake_timeout: Duration::from_secs(args.tunnel_handshake_timeout_secs),
        request_timeout: Duration::from_secs(args.tunnel_request_timeout_secs),
        max_pending,
        max_pending_per_source: (args.tunnel_max_pending_per_source as usize).min(max_pending),
    }
}

#[cfg(test)]
mod pods_cgroup_tests {
    use super::*;

    #[test]
    fn the_flag_wins_detection_needs_kubernetes_mode() {
        let dir = std::env::temp_dir().join(format!("icpt-pods-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let given = PathBuf::from("/sys/fs/cgroup/custom.slice");
        let never = || -> anyhow::Result<PathBuf> { panic!("the mount is not needed") };
        assert_eq!(
            pods_cgroup(Some(given.clone()), true, never).unwrap(),
            given
        );
        assert_eq!(
            pods_cgroup(Some(given.clone()), false, never).unwrap(),
            given
        );
        let err = pods_cgroup(None, false, never).unwrap_err().to_string();
        assert!(err.contains("--pods-cgroup is required"), "{err}");

        // Kubernetes mode: the kubelet's layout under the mount is found, and its absence is
        // a clear error.
        std::fs::create_dir_all(&dir).unwrap();
        let mount = || Ok(dir.clone());
        let err = format!("{:#}", pods_cgroup(None, true, mount).unwrap_err());
        assert!(err.contains("pass --pods-cgroup"), "{err}");
        std::fs::create_dir_all(dir.join("kubepods.slice")).unwrap();
        let mount = || Ok(dir.clone());
        assert_eq!(
            pods_cgroup(None, true, mount).unwrap(),
            dir.join("kubepods.slice")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
