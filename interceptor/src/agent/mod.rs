//! The node agent's state and operations: the enrolled workloads, the policy, the kernel's
//! enrolment and modes, certificates; it answers the admin socket through [`AdminHandler`].
//! [`crate::app`] builds it and wires it to the servers.

mod dry_run;
mod error;
mod events;
mod policy_sync;
mod workload;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use anyhow::Context;
use tokio::{sync::Mutex as AsyncMutex, task::JoinHandle};

use crate::{
    admin::{
        AdminHandler,
        protocol::{KernelCounters, Request, StatusReport, WorkloadStatus},
    },
    config::AgentConfig,
    ebpf::{CounterReader, EventReader, Kernel},
    identity::Ca,
    proxy::ProxyShared,
    records::RecordStore,
    workloads::{Enrolment, LocalWorkloads, WorkloadKey},
};

pub use error::{AgentError, RequestError};
pub use workload::RunningWorkload;

/// The running agent.
pub struct Agent {
    config: AgentConfig,
    ca: Ca,
    shared: Arc<ProxyShared>,
    /// Enrolment and inbound modes in the kernel; never taken on the connection path.
    kernel: Mutex<Kernel>,
    counters: Arc<CounterReader>,
    workloads: AsyncMutex<BTreeMap<WorkloadKey, RunningWorkload>>,
    /// The enrolled workloads by address, for the kernel-event reader (no waiting on
    /// `workloads`); replaced whenever `workloads` changes.
    local: LocalWorkloads,
    policy: policy_sync::SharedPolicy,
}

impl Agent {
    /// The agent over the parts the composition root ([`crate::app`]) built; loads the policy
    /// state saved in `--state-dir` (a broken policy directory stops start-up).
    pub fn new(
        config: AgentConfig,
        ca: Ca,
        kernel: Kernel,
        counters: Arc<CounterReader>,
        shared: Arc<ProxyShared>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("state directory {}", config.state_dir.display()))?;
        let policy = policy_sync::PolicyState::load(&config)?;
        Ok(Agent {
            ca,
            shared,
            kernel: Mutex::new(kernel),
            counters,
            workloads: AsyncMutex::new(BTreeMap::new()),
            local: LocalWorkloads::default(),
            policy,
            config,
        })
    }

    /// What the agent was told on its command line.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Re-enrolls the workloads a previous run saved, then starts the agent's own tasks:
    /// kernel events, certificate rotation and the policy directory watch.
    pub async fn start(self: &Arc<Self>, events: EventReader) -> Vec<JoinHandle<()>> {
        self.restore_workloads().await;
        let mut tasks = vec![
            tokio::spawn(events::serve(events, self.clone())),
            tokio::spawn(rotate_certificates(self.clone())),
        ];
        if self.config.policy_dir.is_some() {
            tasks.push(tokio::spawn(policy_sync::watch_policy_dir(self.clone())));
        }
        tasks
    }

    /// The connection records.
    fn records(&self) -> &RecordStore {
        &self.shared.records
    }

    /// Kernel counters.
    fn kernel_counters(&self) -> KernelCounters {
        self.counters.read()
    }

    /// Answers an admin request.
    pub async fn handle_request(
        &self,
        request: Request,
    ) -> Result<serde_json::Value, RequestError> {
        let json =
            |value: serde_json::Result<serde_json::Value>| value.map_err(RequestError::Encode);
        match request {
            Request::WorkloadAdd { spec } => json(serde_json::to_value(self.enroll(spec).await?)),
            Request::WorkloadRemove { namespace, name } => {
                self.remove(WorkloadKey { namespace, name }).await?;
                Ok(serde_json::Value::Null)
            }
            Request::WorkloadList => json(serde_json::to_value(self.enrolled().await)),
            Request::PolicyApply { policies } => {
                json(serde_json::to_value(self.apply_policies(policies).await?))
            }
            Request::PolicyList => json(serde_json::to_value(self.policy_report().await)),
            Request::PolicyDelete { namespace, name } => {
                self.delete_policy(&namespace, &name).await?;
                Ok(serde_json::Value::Null)
            }
            Request::PolicyDryRun {
                change,
                since_unix_ms,
            } => json(serde_json::to_value(
                self.dry_run(change, since_unix_ms).await?,
            )),
            Request::Status => json(serde_json::to_value(self.status().await)),
            Request::Watch => Err(RequestError::Streaming),
        }
    }
}

impl AdminHandler for Agent {
    type Error = RequestError;

    fn answer(
        &self,
        request: Request,
    ) -> impl Future<Output = Result<serde_json::Value, RequestError>> + Send {
        self.handle_request(request)
    }

    fn watch(&self) -> tokio::sync::broadcast::Receiver<crate::records::ConnectionRecord> {
        self.shared.records.subscribe()
    }
}

impl crate::metrics::StatusSource for Agent {
    fn status(&self) -> std::pin::Pin<Box<dyn Future<Output = StatusReport> + Send + '_>> {
        Box::pin(Agent::status(self))
    }
}

/// Checks certificates often enough to renew each well before it expires.
async fn rotate_certificates(agent: Arc<Agent>) {
    let period = (agent.config.cert_lifetime / 8).min(std::time::Duration::from_secs(60));
    loop {
        tokio::time::sleep(period).await;
        agent.rotate_certificates().await;
    }
}

impl Agent {
    /// Totals per workload, kernel counters and recent records.
    pub async fn status(&self) -> StatusReport {
        let totals = self.records().totals();
        let workloads = self.workloads.lock().await;
        let mut rows: Vec<WorkloadStatus> = workloads
            .iter()
            .map(|(key, running)| WorkloadStatus {
                workload: key.to_string(),
                identity: Some(running.identity.to_string()),
                ip: Some(running.ip),
                labels: running.spec.labels.clone(),
                totals: totals.get(key).copied().unwrap_or_default(),
            })
            .collect();
        rows.extend(
            totals
                .iter()
                .filter(|(key, _)| !workloads.contains_key(*key))
                .map(|(key, totals)| WorkloadStatus {
                    workload: key.to_string(),
                    identity: None,
                    ip: None,
                    labels: BTreeMap::new(),
                    totals: *totals,
                }),
        );
        drop(workloads);
        let specs = self.workload_specs().await;
        let records = self.records().recent();
        StatusReport {
            node: self.config.node_name.clone(),
            workloads: rows,
            kernel: self.kernel_counters(),
            plaintext_callers: self.plaintext_callers(&specs, &records),
            records,
        }
    }
}
