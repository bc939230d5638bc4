//! `interceptor policy`.

use std::path::PathBuf;

use clap::Subcommand;

use super::AdminSocket;
use crate::{
    admin::{client, protocol::Request},
    policy::{self, PolicyReport, Scope},
};

/// Policy commands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check PeerAuthentication files offline; errors name file, line and field.
    Validate {
        /// Files or directories (*.yaml, *.yml).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Send PeerAuthentication files to the running agent, all or nothing: if any object is
    /// invalid, nothing changes.
    Apply {
        /// Files or directories (*.yaml, *.yml).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        admin: AdminSocket,
    },
    /// Show active policies and the effective mode of each workload and port.
    List {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminSocket,
    },
    /// Delete a policy.
    Delete {
        /// The policy's metadata.name.
        name: String,
        /// The policy's metadata.namespace.
        #[arg(short = 'n', long)]
        namespace: String,
        #[command(flatten)]
        admin: AdminSocket,
    },
}

/// Runs a policy command.
pub fn run(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Validate { paths } => {
            let objects = policy::load_paths(&paths)?;
            policy::validate(&objects)?;
            println!("valid: {} PeerAuthentication object(s)", objects.len());
        }
        PolicyCommand::Apply { paths, admin } => {
            let policies = policy::load_paths(&paths)?;
            let count = policies.len();
            let _: PolicyReport = client::call(&admin.path, &Request::PolicyApply { policies })?;
            println!("applied {count} PeerAuthentication object(s)");
        }
        PolicyCommand::List { json, admin } => {
            let report: PolicyReport = client::call(&admin.path, &Request::PolicyList)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_report(&report);
            }
        }
        PolicyCommand::Delete {
            name,
            namespace,
            admin,
        } => {
            let () = client::call(
                &admin.path,
                &Request::PolicyDelete {
                    namespace: namespace.clone(),
                    name: name.clone(),
                },
            )?;
            println!("deleted {namespace}/{name}");
        }
    }
    Ok(())
}

fn print_report(report: &PolicyReport) {
    println!("POLICIES (root namespace {})", report.root_namespace);
    if report.policies.is_empty() {
        println!("  none: every workload is PERMISSIVE");
    }
    for p in &report.policies {
        let labels = || {
            p.match_labels()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let scope = match p.scope(&report.root_namespace) {
            Scope::Mesh => "mesh".to_owned(),
            Scope::Namespace => "namespace".to_owned(),
            Scope::Workload => format!("workload {}", labels()),
            Scope::Ignored => format!("ignored (selector in root namespace) {}", labels()),
        };
        let ports: Vec<String> = p
            .port_level
            .iter()
            .map(|(port, mode)| format!("{port}:{mode}"))
            .collect();
        println!(
            "  {:<40} {:<28} {:<11} {}",
            p.reference().to_string(),
            scope,
            p.mode.to_string(),
            ports.join(" ")
        );
    }
    println!("\nEFFECTIVE MODES");
    for (workload, effective) in &report.workloads {
        println!("  {workload:<40} default {}", effective.default);
        for (port, decision) in &effective.ports {
            println!("  {:<40} port {port:<5} {decision}", "");
        }
    }
}
