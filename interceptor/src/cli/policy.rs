//! `interceptor policy`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Subcommand, ValueEnum};

use super::{AdminSocket, status::parse_duration};
use crate::{
    admin::{client, protocol::Request},
    dry_run::{self, DryRunReport, EXIT_WOULD_REFUSE},
    policy::{self, ApiSourceStatus, PolicyChange, PolicyReport, Scope},
    records::unix_ms,
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
        dry_run: DryRunArgs,
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
        dry_run: DryRunArgs,
        #[command(flatten)]
        admin: AdminSocket,
    },
}

/// `--dry-run` and its options, shared by `apply` and `delete`.
#[derive(Debug, Args)]
pub struct DryRunArgs {
    /// Change nothing: print each workload's mode before and after, and every plaintext
    /// caller in the agent's kept records that the change would refuse. Exit status 0 when
    /// no caller let in now would be refused, 3 when some would, 1 on error.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: only records that started within this long (e.g. 30m, 2h, 7d);
    /// by default every record the agent keeps.
    #[arg(long, value_parser = parse_duration, requires = "dry_run")]
    since: Option<Duration>,
    /// With --dry-run: output format (JSON schema in ARCHITECTURE.md).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, requires = "dry_run")]
    output: Output,
}

/// How a dry run is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Tables for people.
    Table,
    /// JSON for scripts.
    Json,
}

impl DryRunArgs {
    /// Asks the agent what `change` would do, prints it, and gives the exit status.
    fn run(&self, admin: &AdminSocket, change: PolicyChange) -> anyhow::Result<ExitCode> {
        let since_unix_ms = self.since.map(|window| {
            unix_ms(std::time::SystemTime::now()).saturating_sub(window.as_millis() as u64)
        });
        let report: DryRunReport = client::call(
            &admin.path,
            &Request::PolicyDryRun {
                change,
                since_unix_ms,
            },
        )?;
        match self.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            Output::Table => print!("{}", dry_run::render::report(&report)),
        }
        Ok(if report.would_refuse > 0 {
            ExitCode::from(EXIT_WOULD_REFUSE)
        } else {
            ExitCode::SUCCESS
        })
    }
}

/// Runs a policy command; a dry run's exit status says whether it would refuse a caller.
pub fn run(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Validate { paths } => {
            let objects = policy::load_paths(&paths)?;
            policy::validate(&objects)?;
            println!("valid: {} PeerAuthentication object(s)", objects.len());
        }
        PolicyCommand::Apply {
            paths,
            dry_run,
            admin,
        } => {
            let policies = policy::load_paths(&paths)?;
            if dry_run.dry_run {
                return dry_run.run(&admin, PolicyChange::Apply { policies });
            }
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
            dry_run,
            admin,
        } => {
            if dry_run.dry_run {
                return dry_run.run(&admin, PolicyChange::Delete { namespace, name });
            }
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
    Ok(ExitCode::SUCCESS)
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
