//! Enrolling and removing workloads, and restoring them after a restart.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{Agent, AgentError};
use crate::{
    delivery,
    identity::Identity,
    mesh::MeshPeer,
    netns::PodNetns,
    proxy::{self, PodProxy},
    sync::lock,
    tls,
    workloads::{Enrolment, LocalWorkload, WorkloadInfo, WorkloadKey, WorkloadSpec},
};

/// A workload the agent serves.
pub struct RunningWorkload {
    /// What was enrolled.
    pub spec: WorkloadSpec,
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// The pod's identity.
    pub identity: Identity,
    /// The pod's network namespace.
    pub netns: Arc<PodNetns>,
    /// The TLS configurations the pod's proxies use; renewed on rotation.
    tls: Arc<tls::PodTls>,
    /// When the current certificate expires.
    cert_not_after: SystemTime,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for RunningWorkload {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl RunningWorkload {
    /// The admin view of this workload.
    pub fn info(&self) -> WorkloadInfo {
        WorkloadInfo {
            spec: self.spec.clone(),
            ip: self.ip,
            identity: self.identity.to_string(),
        }
    }
}

/// The CLI (through the admin socket) enrolls through this; the Kubernetes source will too.
impl Enrolment for Agent {
    type Error = AgentError;

    /// Enrolls a pod: listeners in its namespace, certificate, capture, policy, mesh.
    async fn enroll(&self, spec: WorkloadSpec) -> Result<WorkloadInfo, AgentError> {
        spec.validate()?;
        let mut workloads = self.workloads.lock().await;
        let key = spec.key();
        if workloads.contains_key(&key) {
            return Err(AgentError::AlreadyEnrolled(key));
        }
        self.check_cgroup(&spec.cgroup)?;
        let running = self.start_workload(spec)?;
        // Saved before it counts as enrolled: when the state directory cannot take it, the
        // workload is stopped again and the agent runs on as before.
        let saved = self.save_workloads(workloads.values().map(|w| &w.spec).chain([&running.spec]));
        if let Err(e) = saved {
            self.stop_workload(&running);
            return Err(e);
        }
        let info = running.info();
        workloads.insert(key.clone(), running);
        self.refresh_local(&workloads);
        info!(workload = %key, ip = %info.ip, identity = %info.identity, "enrolled");
        Ok(info)
    }

    /// Removes a pod: capture, door, listeners, delivery routing and mesh entry.
    async fn remove(&self, key: WorkloadKey) -> Result<(), AgentError> {
        let mut workloads = self.workloads.lock().await;
        if !workloads.contains_key(&key) {
            return Err(AgentError::NotEnrolled(key));
        }
        // Saved first: when the state directory cannot take it, the workload keeps running.
        self.save_workloads(
            workloads
                .iter()
                .filter(|(k, _)| **k != key)
                .map(|(_, w)| &w.spec),
        )?;
        if let Some(running) = workloads.remove(&key) {
            self.stop_workload(&running);
        }
        self.refresh_local(&workloads);
        info!(workload = %key, "removed");
        Ok(())
    }

    async fn enrolled(&self) -> Vec<WorkloadInfo> {
        self.workloads
            .lock()
            .await
            .values()
            .map(RunningWorkload::info)
            .collect()
    }
}

impl Agent {
    /// Re-enrolls the workloads saved by a previous run of the agent.
    pub(super) async fn restore_workloads(&self) {
        let specs: Vec<WorkloadSpec> = match std::fs::read(self.workloads_file()) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(
                    "ignoring unreadable {}: {e}",
                    self.workloads_file().display()
                );
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let mut workloads = self.workloads.lock().await;
        for spec in specs {
            let key = spec.key();
            match self.start_workload(spec) {
                Ok(running) => {
                    info!(workload = %key, "restored");
                    workloads.insert(key, running);
                }
                Err(e) => warn!(workload = %key, "not restored: {e}"),
            }
        }
        let cookies: Vec<u64> = workloads.values().map(|w| w.netns.cookie()).collect();
        let ips: Vec<Ipv4Addr> = workloads.values().map(|w| w.ip).collect();
        if let Err(e) = lock(&self.kernel).retain_pods(&cookies, &ips) {
            warn!("forgetting pods that were not restored: {e}");
        }
        self.refresh_local(&workloads);
        if let Err(e) = self.save_workloads(workloads.values().map(|w| &w.spec)) {
            warn!("{e}");
        }
    }

    fn start_workload(&self, spec: WorkloadSpec) -> Result<RunningWorkload, AgentError> {
        let key = spec.key();
        let netns_error = |source| AgentError::Netns {
            key: key.clone(),
            source,
        };
        let netns = Arc::new(PodNetns::open(&spec.netns).map_err(netns_error)?);
        let ip = netns.pod_ip().map_err(netns_error)?;
        let identity_error = |source| AgentError::Identity {
            key: key.clone(),
            source: Box::new(source),
        };
        let identity = Identity::new(
            self.ca.trust_domain(),
            &spec.namespace,
            &spec.service_account,
        )
        .map_err(identity_error)?;
        let cert = self
            .ca
            .issue(&identity, self.config.cert_lifetime)
            .map_err(identity_error)?;
        let pod_tls = Arc::new(tls::PodTls::new(self.ca.trust_bundle(), &cert).map_err(
            |source| AgentError::Tls {
                key: key.clone(),
                source: Box::new(source),
            },
        )?);
        delivery::prepare(&netns).map_err(|source| AgentError::Delivery {
            key: key.clone(),
            source: Box::new(source),
        })?;
        let pod = Arc::new(PodProxy {
            workload: key.clone(),
            identity: identity.clone(),
            ip,
            netns: netns.clone(),
            tls: pod_tls.clone(),
            pool: proxy::pool::TunnelPool::new(
                self.shared.pool_limits,
                self.shared.tunnels.for_workload(&key),
            ),
        });
        let tasks =
            proxy::start(pod, self.shared.clone()).map_err(|source| AgentError::Listeners {
                key: key.clone(),
                source,
            })?;
        let running = RunningWorkload {
            spec,
            ip,
            identity,
            netns,
            tls: pod_tls,
            cert_not_after: cert.not_after,
            tasks,
        };
        self.program_kernel(&running)?;
        self.shared
            .mesh
            .announce(
                ip,
                MeshPeer {
                    identity: running.identity.clone(),
                    workload: key.clone(),
                    node: self.config.node_name.clone(),
                },
            )
            .map_err(|source| AgentError::Mesh {
                key,
                source: Box::new(source),
            })?;
        Ok(running)
    }

    /// Re-issues every certificate past half its life; running proxies present the new one
    /// from their next handshake, and TLS sessions keep resuming.
    pub(super) async fn rotate_certificates(&self) {
        let renew_before = self.config.cert_lifetime / 2;
        let mut workloads = self.workloads.lock().await;
        for running in workloads.values_mut() {
            let left = running
                .cert_not_after
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            if left > renew_before {
                continue;
            }
            let renewed = self
                .ca
                .issue(&running.identity, self.config.cert_lifetime)
                .map_err(|e| e.to_string())
                .and_then(|cert| {
                    let serial = cert.serial().map_err(|e| e.to_string())?;
                    let renewed = running.tls.renew(self.ca.trust_bundle(), &cert);
                    renewed
                        .map(|()| (cert.not_after, serial))
                        .map_err(|e| e.to_string())
                });
            match renewed {
                Ok((not_after, serial)) => {
                    running.cert_not_after = not_after;
                    info!(identity = %running.identity, %serial, "certificate rotated");
                }
                Err(e) => warn!(identity = %running.identity, "certificate rotation failed: {e}"),
            }
        }
    }

    fn program_kernel(&self, running: &RunningWorkload) -> Result<(), AgentError> {
        let modes = self.kernel_modes(&running.spec);
        let mut kernel = lock(&self.kernel);
        let result = kernel
            .enroll(running.netns.cookie(), running.netns.path())
            .and_then(|()| kernel.replace_inbound_modes(running.ip, &modes));
        if let Err(e) = result {
            let _ = kernel.unenroll(running.netns.cookie());
            let _ = kernel.replace_inbound_modes(running.ip, &[]);
            return Err(AgentError::Kernel {
                key: running.spec.key(),
                source: Box::new(e),
            });
        }
        Ok(())
    }

    fn stop_workload(&self, running: &RunningWorkload) {
        if let Err(e) = delivery::withdraw(&running.netns) {
            warn!(
                "undoing the delivery routing of {}: {e}",
                running.spec.key()
            );
        }
        if let Err(e) = self.shared.mesh.withdraw(running.ip) {
            warn!("withdrawing {} from the mesh: {e}", running.ip);
        }
        let mut kernel = lock(&self.kernel);
        if let Err(e) = kernel.unenroll(running.netns.cookie()) {
            warn!("unenrolling {}: {e}", running.spec.key());
        }
        if let Err(e) = kernel.replace_inbound_modes(running.ip, &[]) {
            warn!("clearing modes of {}: {e}", running.spec.key());
        }
    }

    /// The cgroup must be under the node's pods cgroup, where capture is attached.
    fn check_cgroup(&self, cgroup: &Path) -> Result<(), AgentError> {
        let canonical = |path: &Path| {
            path.canonicalize().map_err(|source| AgentError::Cgroup {
                path: path.to_owned(),
                source,
            })
        };
        let pods = canonical(&self.config.pods_cgroup)?;
        let pod = canonical(cgroup)?;
        if pod == pods || !pod.starts_with(&pods) {
            return Err(AgentError::OutsidePodsCgroup {
                cgroup: cgroup.to_owned(),
                pods,
            });
        }
        Ok(())
    }

    fn workloads_file(&self) -> PathBuf {
        self.config.state_dir.join("workloads.json")
    }

    /// Refreshes the by-address view of the workloads this agent serves.
    fn refresh_local(&self, workloads: &std::collections::BTreeMap<WorkloadKey, RunningWorkload>) {
        self.local.replace(workloads.iter().map(|(key, running)| {
            let local = LocalWorkload {
                key: key.clone(),
                identity: running.identity.to_string(),
            };
            (running.ip, local)
        }));
    }

    /// Saves the workloads a restarted agent restores, whole or not at all.
    fn save_workloads<'a>(
        &self,
        specs: impl Iterator<Item = &'a WorkloadSpec>,
    ) -> Result<(), AgentError> {
        let specs: Vec<&WorkloadSpec> = specs.collect();
        let path = self.workloads_file();
        serde_json::to_vec_pretty(&specs)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::fsutil::write_atomically(&path, &bytes))
            .map_err(|source| AgentError::Save { path, source })
    }
}
