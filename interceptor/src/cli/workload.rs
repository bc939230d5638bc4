//! `interceptor workload`.

use std::{collections::BTreeMap, path::PathBuf};

use clap::Subcommand;

use super::AdminSocket;
use crate::{
    admin::{client, protocol::Request},
    workloads::{WorkloadInfo, WorkloadSpec},
};

/// Workload commands.
#[derive(Debug, Subcommand)]
pub enum WorkloadCommand {
    /// Enroll a pod with this node's agent: its connects are captured and carried over mutual
    /// TLS, and policy decides what it accepts in plaintext.
    Add {
        /// Pod name.
        #[arg(long)]
        name: String,
        /// Kubernetes namespace.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Service account (part of the pod's SPIFFE identity).
        #[arg(long, default_value = "default")]
        service_account: String,
        /// A pod label as key=value; repeat for more.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// The pod's cgroup v2 directory (under the node's pods cgroup).
        #[arg(long)]
        cgroup: PathBuf,
        /// The pod's network namespace (/run/netns/NAME or /proc/PID/ns/net).
        #[arg(long)]
        netns: PathBuf,
        #[command(flatten)]
        admin: AdminSocket,
    },
    /// Remove a pod from the mesh.
    Remove {
        /// Pod name.
        #[arg(long)]
        name: String,
        /// Kubernetes namespace.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        admin: AdminSocket,
    },
    /// List the pods this node's agent serves.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminSocket,
    },
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("label {text:?} must be key=value"))?;
    if key.is_empty() {
        return Err(format!("label {text:?} has an empty key"));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// Runs a workload command.
pub fn run(command: WorkloadCommand) -> anyhow::Result<()> {
    match command {
        WorkloadCommand::Add {
            name,
            namespace,
            service_account,
            labels,
            cgroup,
            netns,
            admin,
        } => {
            let spec = WorkloadSpec {
                name,
                namespace,
                service_account,
                labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
                cgroup,
                netns,
            };
            let info: WorkloadInfo = client::call(&admin.path, &Request::WorkloadAdd { spec })?;
            println!(
                "enrolled {}/{} at {} as {}",
                info.spec.namespace, info.spec.name, info.ip, info.identity
            );
        }
        WorkloadCommand::Remove {
            name,
            namespace,
            admin,
        } => {
            let () = client::call(
                &admin.path,
                &Request::WorkloadRemove {
                    namespace: namespace.clone(),
                    name: name.clone(),
                },
            )?;
            println!("removed {namespace}/{name}");
        }
        WorkloadCommand::List { json, admin } => {
            let list: Vec<WorkloadInfo> = client::call(&admin.path, &Request::WorkloadList)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<32} {:<16} IDENTITY", "WORKLOAD", "IP");
                for info in list {
                    println!(
                        "{:<32} {:<16} {}",
                        format!("{}/{}", info.spec.namespace, info.spec.name),
                        info.ip,
                        info.identity
                    );
                }
            }
        }
    }
    Ok(())
}
