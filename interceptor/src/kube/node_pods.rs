//! The pod source: enrolls this node's meshed pods and removes them, from the API server.
//!
//! One task watches this node's pods and all namespaces and runs [`reconcile`] on every
//! change, and every [`RETRY`] so that a pod whose sandbox is not up yet, or a marker patch
//! that failed, is tried again. For each pod to enroll it finds the pod's cgroup
//! ([`PodsRoot`]) and network namespace ([`find_pod_netns`]), enrolls it through
//! [`Enrolment`], and then marks it enrolled on the API ([`ApiClient::set_enrolled`]), so
//! peers send mutual TLS only once this agent serves the pod.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use tracing::{debug, info, warn};

use super::{
    ApiClient, NamespaceInfo, PodInfo, View,
    cgroup::PodsRoot,
    mesh::{Plan, reconcile},
    podns::find_pod_netns,
};
use crate::{
    identity::Identity,
    workloads::{Enrolment, WorkloadKey, WorkloadSpec},
};

/// How often the pods are reconciled when nothing changes (retries).
pub const RETRY: Duration = Duration::from_millis(500);

/// What the pod source needs.
pub struct NodePods<E> {
    /// Where pods are enrolled.
    pub enrolment: Arc<E>,
    /// The API.
    pub client: ApiClient,
    /// This node's name (`spec.nodeName`).
    pub node: String,
    /// The node's pods cgroup.
    pub root: PodsRoot,
    /// The mesh's trust domain.
    pub trust_domain: String,
}

/// The state of the loop.
struct State {
    /// Enrolled pods: UID → workload.
    enrolled: BTreeMap<String, WorkloadKey>,
    /// The last failure per pod UID, logged once until it changes.
    failures: BTreeMap<String, String>,
}

impl<E: Enrolment + Send + Sync + 'static> NodePods<E> {
    /// Runs until the task is aborted.
    pub async fn run(self) {
        let pods = self.client.watch_node_pods(&self.node);
        let namespaces = self.client.watch_namespaces();
        let mut pods_rx = pods.subscribe();
        let mut ns_rx = namespaces.subscribe();
        let first = pods.synced().await;
        let mut state = State {
            enrolled: BTreeMap::new(),
            failures: BTreeMap::new(),
        };
        self.adopt(&first, &mut state).await;
        let mut tick = tokio::time::interval(RETRY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (view, ns) = (pods.current(), namespaces.current());
            self.step(&view, &ns, &mut state).await;
            tokio::select! {
                changed = pods_rx.changed() => if changed.is_err() { return },
                changed = ns_rx.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
            }
        }
    }

    /// After a restart: keeps the restored workloads whose pod still exists with the same
    /// address, and removes the others (gone, or re-created under the same name).
    async fn adopt(&self, pods: &View<PodInfo>, state: &mut State) {
        for info in self.enrolment.enrolled().await {
            let key = info.spec.key();
            let pod = pods.objects.values().find(|p| {
                p.namespace == key.namespace && p.name == key.name && p.ipv4() == Some(info.ip)
            });
            match pod {
                Some(pod) => {
                    info!(workload = %key, uid = %pod.uid, "kept after restart");
                    state.enrolled.insert(pod.uid.clone(), key);
                }
                None => {
                    info!(workload = %key, "pod gone from the API; removing it");
                    if let Err(e) = self.enrolment.remove(key.clone()).await {
                        warn!(workload = %key, "removing: {e}");
                    }
                }
            }
        }
    }

    async fn step(&self, pods: &View<PodInfo>, ns: &View<NamespaceInfo>, state: &mut State) {
        let uids: BTreeSet<String> = state.enrolled.keys().cloned().collect();
        let Plan {
            enroll,
            remove,
            mark,
            unmark,
            waiting,
        } = reconcile(&uids, pods, ns, &self.trust_domain);
        for uid in remove {
            if let Some(key) = state.enrolled.remove(&uid) {
                match self.enrolment.remove(key.clone()).await {
                    Ok(()) => info!(workload = %key, "pod gone or no longer meshed; removed"),
                    Err(e) => warn!(workload = %key, "removing: {e}"),
                }
            }
        }
        for pod in enroll {
            match self.enroll(&pod).await {
                Ok(identity) => {
                    state.failures.remove(&pod.uid);
                    state.enrolled.insert(
                        pod.uid.clone(),
                        WorkloadKey {
                            namespace: pod.namespace.clone(),
                            name: pod.name.clone(),
                        },
                    );
                    self.mark(&pod, Some(&identity)).await;
                }
                Err(reason) => {
                    if state.failures.get(&pod.uid) != Some(&reason) {
                        warn!(pod = %pod.full_name(), "not enrolled yet: {reason}");
                        state.failures.insert(pod.uid.clone(), reason);
                    }
                }
            }
        }
        for pod in mark {
            match Identity::new(&self.trust_domain, &pod.namespace, &pod.service_account) {
                Ok(identity) => self.mark(&pod, Some(&identity)).await,
                Err(e) => warn!(pod = %pod.full_name(), "cannot mark: {e}"),
            }
        }
        for pod in unmark {
            self.mark(&pod, None).await;
        }
        for (pod, reason) in waiting {
            debug!(pod = %pod.full_name(), ?reason, "waiting");
        }
        state
            .failures
            .retain(|uid, _| pods.objects.contains_key(uid));
    }

    /// Finds the pod's cgroup and namespace and enrolls it; the error says why not (yet).
    async fn enroll(&self, pod: &PodInfo) -> Result<Identity, String> {
        let cgroup = self
            .root
            .find_pod_cgroup(&pod.uid, pod.qos_class)
            .ok_or_else(|| {
                format!(
                    "no cgroup for it under {} (tried {:?})",
                    self.root.dir.display(),
                    self.root.pod_cgroup_candidates(&pod.uid, pod.qos_class)
                )
            })?;
        let found = find_pod_netns(&cgroup, &pod.ips).map_err(|e| e.to_string())?;
        let spec = WorkloadSpec {
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            labels: pod.labels.clone(),
            cgroup,
            // The pod's oldest process (its sandbox) names the namespace for as long as
            // the pod lives; the agent opens it while enrolling.
            netns: found.path,
        };
        let info = self
            .enrolment
            .enroll(spec)
            .await
            .map_err(|e| e.to_string())?;
        info.identity
            .parse()
            .map_err(|e: crate::identity::IdentityError| e.to_string())
    }

    async fn mark(&self, pod: &PodInfo, identity: Option<&Identity>) {
        match self.client.set_enrolled(pod, identity).await {
            Ok(()) => debug!(pod = %pod.full_name(), marked = identity.is_some(), "marker set"),
            Err(e) => warn!("{e}; retrying"),
        }
    }
}
