//! The `interceptor` command line: the node agent and the commands that talk to it.

mod agent;
mod ca;
mod policy;
mod status;
mod workload;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::admin;

/// Sidecar-less mutual TLS for Kubernetes pods: eBPF steers pod traffic to one agent per node,
/// agents speak mutual TLS to each other, and PeerAuthentication policy decides what a pod
/// accepts in plaintext.
#[derive(Debug, Parser)]
#[command(name = "interceptor", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the CLI finds the agent.
#[derive(Debug, clap::Args)]
pub struct AdminSocket {
    /// The agent's admin socket.
    #[arg(long = "admin-socket", env = "INTERCEPTOR_ADMIN_SOCKET", default_value = admin::DEFAULT_SOCKET)]
    pub path: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent (as root, in the node's host network; one per node).
    Agent(agent::AgentArgs),
    /// Manage the mesh certificate authority.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Enroll, remove and list the pods this node's agent serves.
    #[command(subcommand)]
    Workload(workload::WorkloadCommand),
    /// Validate, apply, list and delete PeerAuthentication policies.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Show encrypted, plaintext and dropped connections seen by this node's agent.
    Status(status::StatusArgs),
}

/// Runs the CLI; errors are printed with their causes and give exit status 1 (a policy dry run
/// that would refuse a caller gives its own status, see [`crate::dry_run::EXIT_WOULD_REFUSE`]).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => agent::run(args).map(|()| ExitCode::SUCCESS),
        Command::Ca(command) => ca::run(command).map(|()| ExitCode::SUCCESS),
        Command::Workload(command) => workload::run(command).map(|()| ExitCode::SUCCESS),
        Command::Policy(command) => policy::run(command),
        Command::Status(args) => status::run(args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
