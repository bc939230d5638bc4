//! `interceptor policy`.

use std::path::PathBuf;

use clap::Subcommand;

use super::AdminSocket;
use crate::{
    admin::{client, protocol::Request},
    policy::{self, ApiSourceStatus, PolicyReport, Scope},
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
    /// Show active policies, where each comes from (file, cli or api), and the effective mode
    /// of each workload and port.
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
    if let Some(api) = &report.api {
        println!("  {}", api_line(api));
    }
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
        let from = report
            .sources
            .get(&p.reference().to_string())
            .map(|source| format!("from {source}"))
            .unwrap_or_default();
        println!(
            "  {:<40} {:<28} {:<11} {}",
            p.reference().to_string(),
            scope,
            p.mode.to_string(),
            [ports.join(" "), from].join(" ").trim()
        );
    }
    if !report.rejected.is_empty() {
        println!("\nREFUSED (invalid objects of the Kubernetes API)");
        for r in &report.rejected {
            let kept = if r.previous_in_force {
                "; its previous version stays in force"
            } else {
                "; not in force"
            };
            println!(
                "  {:<40} {}: {}{kept}",
                r.policy.to_string(),
                r.source,
                r.reason
            );
        }
    }
    println!("\nEFFECTIVE MODES");
    for (workload, effective) in &report.workloads {
        println!("  {workload:<40} default {}", effective.default);
        for (port, decision) in &effective.ports {
            println!("  {:<40} port {port:<5} {decision}", "");
        }
    }
}

/// One line on the Kubernetes API as a policy source.
fn api_line(api: &ApiSourceStatus) -> String {
    let state = if !api.listed {
        "not listed yet: the objects saved by the last run are in force".to_owned()
    } else if api.crd_absent {
        "no PeerAuthentication CRD installed: no policies from the API".to_owned()
    } else {
        format!("{} PeerAuthentication object(s) listed", api.objects)
    };
    match &api.last_error {
        Some(error) => format!(
            "Kubernetes API: {state} ({} error(s), last: {error})",
            api.errors
        ),
        None => format!("Kubernetes API: {state}"),
    }
}
