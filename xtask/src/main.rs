//! `cargo xtask`: the project's developer and CI commands.
//!
//! Every command first runs [`setup`], which makes this machine able to build the eBPF
//! programs and run the lab (nightly `rust-src`, `bpf-linker`, Debian tools, bpffs, cgroup v2).
//! The command logic lives in [`setup`], [`bpf_linker`] and [`run`]; [`cmd`] holds the small
//! process helpers they share.

mod bpf_linker;
mod cmd;
mod fuzz;
mod image;
mod run;
mod setup;

use clap::{Parser, Subcommand};

/// The project's developer and CI commands (`cargo xtask <command>`).
#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", version, about, long_about = None)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The xtask subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Prepare this machine: nightly rust-src, bpf-linker, Debian tools, kubectl, bpffs,
    /// cgroup v2.
    ///
    /// Idempotent and fast when everything is present. Must run as root. Steps: the nightly
    /// toolchain's rust-src and clippy components; a working bpf-linker built against the
    /// nightly's own libLLVM (LLVM prefix kept in ~/.local/share/interceptor/llvm); the Debian
    /// packages the lab uses (iproute2, nftables, tshark, tcpdump, curl, socat, stunnel4,
    /// iperf3, bpftool); a kubectl that runs `kubectl kustomize` (Debian's kubernetes-client
    /// unless one is already on PATH); bpffs mounted at /sys/fs/bpf; a cgroup v2 mount.
    Setup,
    /// Setup, then build the agent (and its eBPF programs) in release mode.
    Build,
    /// Setup, build, run the whole test suite, then clippy and rustfmt checks.
    ///
    /// Runs `cargo build --release -p interceptor`, then `cargo test --workspace --release`
    /// (without the eBPF crate, which only builds for bpfel; the integration tests share one
    /// lab, so tests run with --test-threads=1 and --no-fail-fast), then clippy
    /// with -D warnings on the host crates and on the eBPF crate for its bpfel target, then
    /// `cargo fmt --all -- --check`. Without arguments it also runs a fuzz smoke (each target
    /// of `fuzz/` for 20 s, built without a sanitizer) after the tests. Every step runs even if
    /// an earlier one failed (except the tests when the build failed); the exit status is
    /// non-zero if any step failed. Arguments after `--` go to the test binaries, e.g.
    /// `cargo xtask test -- --nocapture` or a test name filter (which skips the fuzz smoke).
    Test {
        /// Extra arguments for the test binaries (after `--test-threads=1`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, then the agent's container image and its smoke test in real containers.
    ///
    /// Installs podman, runc and musl-tools when missing, builds the agent statically for
    /// x86_64-unknown-linux-musl, builds `Containerfile` (FROM scratch: the binary alone)
    /// with rootful podman as localhost/interceptor:<version>, annotated with the version and
    /// commit, and saves it as target/image/interceptor-<version>.oci.tar. Then runs
    /// tests/tests/image.rs: the image prints --help, and agents started from it the way the
    /// DaemonSet runs them (host network and PID, privileged, bpffs and cgroup mounted) carry
    /// a meshed call on the lab and stop on SIGTERM within the grace period.
    Image {
        /// Build and save the image only; skip the smoke test.
        #[arg(long)]
        no_test: bool,
    },
    /// Setup, then run the lab demo (`lab-demo` in interceptor-tests).
    Demo {
        /// Extra arguments for lab-demo.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, then run the benchmarks (`lab-bench` in interceptor-tests).
    Bench {
        /// Arguments for lab-bench, e.g. `cargo xtask bench -- --help`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, then run the libFuzzer targets of `fuzz/` (installs cargo-fuzz if missing): the
    /// policy parser and resolver, the tunnel request, the admin request, mesh directory
    /// entries and PeerAuthentication objects from the API, each from its checked-in seeds.
    Fuzz {
        /// How long to run each target.
        #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        seconds: u64,
        /// Targets to run (all when none): policy, tunnel_request, admin_request, mesh_entry,
        /// api_policy.
        targets: Vec<String>,
    },
    /// Setup, then the soak runs (`lab-soak` in interceptor-tests): a 20,000-connect flood of
    /// a tunnel port and memory over rounds of 10,000 connections (~5 min).
    Soak {
        /// Arguments for lab-soak, e.g. `cargo xtask soak -- --help`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() {
    cmd::ensure_cargo_bin_on_path();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::setup(),
        Command::Build => run::build(),
        Command::Test { args } => run::test(&args),
        Command::Image { no_test } => image::image(no_test),
        Command::Demo { args } => run::demo(&args),
        Command::Bench { args } => run::bench(&args),
        Command::Soak { args } => run::soak(&args),
        Command::Fuzz { seconds, targets } => fuzz::fuzz(seconds, &targets),
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_of(argv: &[&str]) -> Vec<String> {
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Test { args }
            | Command::Demo { args }
            | Command::Bench { args }
            | Command::Soak { args } => args,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn forwards_trailing_args() {
        assert_eq!(
            args_of(&["xtask", "test", "--", "--nocapture", "lab"]),
            ["--nocapture", "lab"]
        );
        assert_eq!(args_of(&["xtask", "test", "some_filter"]), ["some_filter"]);
        assert_eq!(args_of(&["xtask", "bench", "--", "--help"]), ["--help"]);
        assert!(args_of(&["xtask", "demo"]).is_empty());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
