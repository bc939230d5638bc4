//! Enrolling and removing workloads, and restoring them after a restart.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::Agent;
use crate::{
    delivery,
    identity::Identity,
    mesh::MeshPeer,
    netns::PodNetns,
    proxy::{self, PodProxy},
    tls,
    workloads::{WorkloadInfo, WorkloadKey, WorkloadSpec},
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

impl Agent {
    /// Enrolls a pod: listeners in its namespace, certificate, capture, policy, directory.
    pub async fn add_workload(&self, spec: WorkloadSpec) -> Result<WorkloadInfo, String> {
        spec.validate()?;
        let mut workloads = self.workloads.lock().await;
        let key = spec.key();
        if workloads.contains_key(&key) {
            return Err(format!(
                "workload {key} is already enrolled; remove it first"
            ));
        }
        self.check_cgroup(&spec.cgroup)?;
        let running = self.start_workload(spec)?;
        let info = running.info();
        workloads.insert(key.clone(), running);
        self.save_workloads(&workloads);
        info!(workload = %key, ip = %info.ip, identity = %info.identity, "enrolled");
        Ok(info)
    }

    /// Removes a pod: capture, door, listeners and directory entry.
    pub async fn remove_workload(&self, key: &WorkloadKey) -> Result<(), String> {
        let mut workloads = self.workloads.lock().await;
        let running = workloads
            .remove(key)
            .ok_or_else(|| format!("workload {key} is not enrolled on this node"))?;
        self.stop_workload(&running);
        self.save_workloads(&workloads);
        info!(workload = %key, "removed");
        Ok(())
    }

    /// Enrolled workloads.
    pub async fn list_workloads(&self) -> Vec<WorkloadInfo> {
        self.workloads
            .lock()
            .await
            .values()
            .map(RunningWorkload::info)
            .collect()
    }

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
        match self.kernel.lock() {
            Ok(mut kernel) => {
                if let Err(e) = kernel.retain_pods(&cookies, &ips) {
                    warn!("forgetting pods that were not restored: {e}");
                }
            }
            Err(_) => warn!("kernel lock poisoned"),
        }
        self.save_workloads(&workloads);
    }

    fn start_workload(&self, spec: WorkloadSpec) -> Result<RunningWorkload, String> {
        let key = spec.key();
        let netns = Arc::new(PodNetns::open(&spec.netns).map_err(|e| e.to_string())?);
        let ip = netns
            .pod_ip()
            .map_err(|e| format!("finding the address of {key}: {e}"))?;
        let identity = Identity::new(
            self.ca.trust_domain(),
            &spec.namespace,
            &spec.service_account,
        )
        .map_err(|e| e.to_string())?;
        let cert = self
            .ca
            .issue(&identity, self.config.cert_lifetime)
            .map_err(|e| format!("issuing a certificate for {identity}: {e}"))?;
        let pod_tls =
            Arc::new(tls::PodTls::new(self.ca.trust_bundle(), &cert).map_err(|e| e.to_string())?);
        delivery::prepare(&netns)
            .map_err(|e| format!("preparing {key}'s network namespace for deliveries: {e}"))?;
        let pod = Arc::new(PodProxy {
            workload: key.clone(),
            identity: identity.clone(),
            ip,
            netns: netns.clone(),
            tls: pod_tls.clone(),
        });
        let tasks = proxy::start(pod, self.shared.clone()).map_err(|e| {
            format!("opening the agent's listeners in {key}'s network namespace: {e}")
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
                    workload: key,
                    node: self.config.node_name.clone(),
                },
            )
            .map_err(|e| format!("announcing to the mesh: {e}"))?;
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
                    running
                        .tls
                        .renew(self.ca.trust_bundle(), &cert)
                        .map_err(|e| e.to_string())?;
                    Ok(cert.not_after)
                });
            match renewed {
                Ok(not_after) => {
                    running.cert_not_after = not_after;
                    info!(identity = %running.identity, "certificate rotated");
                }
                Err(e) => warn!(identity = %running.identity, "certificate rotation failed: {e}"),
            }
        }
    }

    fn program_kernel(&self, running: &RunningWorkload) -> Result<(), String> {
        let modes = self.kernel_modes(&running.spec);
        let mut kernel = self.kernel.lock().map_err(|_| "kernel lock poisoned")?;
        let result = kernel
            .enroll(running.netns.cookie(), running.netns.path())
            .and_then(|()| kernel.replace_inbound_modes(running.ip, &modes));
        if let Err(e) = result {
            let _ = kernel.unenroll(running.netns.cookie());
            let _ = kernel.replace_inbound_modes(running.ip, &[]);
            return Err(format!(
                "programming the kernel for {}: {e}",
                running.spec.key()
            ));
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
        if let Ok(mut kernel) = self.kernel.lock() {
            if let Err(e) = kernel.unenroll(running.netns.cookie()) {
                warn!("unenrolling {}: {e}", running.spec.key());
            }
            if let Err(e) = kernel.replace_inbound_modes(running.ip, &[]) {
                warn!("clearing modes of {}: {e}", running.spec.key());
            }
        }
    }

    /// The cgroup must be under the node's pods cgroup, where capture is attached.
    fn check_cgroup(&self, cgroup: &Path) -> Result<(), String> {
        let canonical = |path: &Path| -> Result<PathBuf, String> {
            path.canonicalize()
                .map_err(|e| format!("cgroup {}: {e}", path.display()))
        };
        let pods = canonical(&self.config.pods_cgroup)?;
        let pod = canonical(cgroup)?;
        if pod == pods || !pod.starts_with(&pods) {
            return Err(format!(
                "cgroup {} is not inside the node's pods cgroup {}; its connections would not be captured",
                cgroup.display(),
                pods.display()
            ));
        }
        Ok(())
    }

    fn workloads_file(&self) -> PathBuf {
        self.config.state_dir.join("workloads.json")
    }

    fn save_workloads(&self, workloads: &std::collections::BTreeMap<WorkloadKey, RunningWorkload>) {
        let specs: Vec<&WorkloadSpec> = workloads.values().map(|w| &w.spec).collect();
        let path = self.workloads_file();
        let written = serde_json::to_vec_pretty(&specs)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::fsutil::write_atomically(&path, &bytes));
        if let Err(e) = written {
            warn!("saving {}: {e}", path.display());
        }
    }
}
