//! Watches: a kube-rs reflector per kind of object, published as immutable snapshots.
//!
//! Each watch is `watcher` → `default_backoff` → `reflector` store, driven by one task:
//! - the watcher lists, then watches from the list's resourceVersion; a dropped stream resumes
//!   from the last version seen; `410 Gone` (the version was compacted) starts a new list;
//! - every error is followed by an exponential backoff (0.8 s doubling to 30 s, reset after
//!   two quiet minutes), so an unreachable or failing server is not hammered;
//! - the reflector applies a relist only once it is complete (the old objects stay until the
//!   new list has been read whole), and an error never touches the store.
//!
//! So a published [`View`] never loses objects because of an error or a relist: it holds the
//! last state the server confirmed. The task converts the store into plain objects after each
//! burst of events (all events that are ready are applied first, then one snapshot is made),
//! and publishes it through a `tokio::sync::watch` channel: readers clone an `Arc` and never
//! wait for the watch.

use std::{collections::BTreeMap, fmt::Debug, net::IpAddr, sync::Arc};

use ::kube::{
    Api, Resource,
    runtime::{
        WatchStreamExt, reflector,
        watcher::{self, Event},
    },
};
use futures_util::{FutureExt, StreamExt};
use serde::de::DeserializeOwned;
use tokio::sync::watch as channel;

use super::{
    ApiClient, EndpointSliceInfo, NamespaceInfo, PodInfo, ServiceInfo, mesh,
    objects::api::{ApiObject, Collection, resource},
};

/// A plain object a watch publishes.
pub trait WatchObject: Clone + Debug + Send + Sync + 'static {
    /// Its key in [`View::objects`].
    fn key(&self) -> String;
    /// Addresses it is found by in [`View::by_ip`].
    fn ips(&self) -> &[IpAddr] {
        &[]
    }
}

impl WatchObject for PodInfo {
    /// The pod's UID: unique across the pod's re-creations under the same name.
    fn key(&self) -> String {
        self.uid.clone()
    }
    fn ips(&self) -> &[IpAddr] {
        &self.ips
    }
}

impl WatchObject for NamespaceInfo {
    /// The namespace's name.
    fn key(&self) -> String {
        self.name.clone()
    }
}

impl WatchObject for ServiceInfo {
    /// `namespace/name`.
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
    fn ips(&self) -> &[IpAddr] {
        &self.cluster_ips
    }
}

impl WatchObject for EndpointSliceInfo {
    /// `namespace/name`.
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// How a watch is doing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchStatus {
    /// A complete list has been applied: [`View::objects`] is the server's state (as of the
    /// last event), not a partial one. False only before the first list has succeeded.
    pub synced: bool,
    /// Bumped on every publication.
    pub version: u64,
    /// Lists started: 1 after start-up, one more for every relist (after `410 Gone`, or a
    /// retry of a failed list).
    pub lists: u64,
    /// Errors seen (failed lists and watches, dropped streams reported as errors, `410`).
    pub errors: u64,
    /// The last error, for status pages.
    pub last_error: Option<String>,
    /// The server does not serve this kind of object (its CRD is not installed); the view is
    /// empty and synced. Only for optional kinds ([`ApiClient::watch_peer_authentications`]).
    pub absent: bool,
}

/// A snapshot of the objects a watch sees.
#[derive(Debug)]
pub struct View<T> {
    /// Objects by [`WatchObject::key`].
    pub objects: Arc<BTreeMap<String, T>>,
    /// Keys of the objects that carry each address ([`WatchObject::ips`]).
    pub by_ip: Arc<BTreeMap<IpAddr, Vec<String>>>,
    /// The watch's health when this snapshot was made.
    pub status: WatchStatus,
}

impl<T> View<T> {
    pub(super) fn empty() -> Self {
        Self {
            objects: Arc::default(),
            by_ip: Arc::default(),
            status: WatchStatus::default(),
        }
    }

    /// The objects that carry `ip`.
    pub fn with_ip(&self, ip: IpAddr) -> impl Iterator<Item = &T> {
        self.by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .filter_map(|key| self.objects.get(key))
    }
}

/// A running watch. Dropping it stops the watch.
#[derive(Debug)]
pub struct Watch<T> {
    rx: channel::Receiver<Arc<View<T>>>,
    task: tokio::task::JoinHandle<()>,
}

impl<T> Drop for Watch<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<T: WatchObject> Watch<T> {
    pub(super) fn new(
        rx: channel::Receiver<Arc<View<T>>>,
        task: tokio::task::JoinHandle<()>,
    ) -> Self {
        Self { rx, task }
    }

    /// The latest snapshot.
    pub fn current(&self) -> Arc<View<T>> {
        self.rx.borrow().clone()
    }

    /// A receiver that is told about every new snapshot (`changed().await`).
    pub fn subscribe(&self) -> channel::Receiver<Arc<View<T>>> {
        self.rx.clone()
    }

    /// Waits until the first complete list has been applied and returns that snapshot.
    /// (Should the watch task have died, it returns the last snapshot, not synced.)
    pub async fn synced(&self) -> Arc<View<T>> {
        let mut rx = self.rx.clone();
        match rx.wait_for(|view| view.status.synced).await {
            Ok(view) => view.clone(),
            Err(_) => self.current(),
        }
    }
}

impl ApiClient {
    /// This node's pods: `spec.nodeName=<node>`, all namespaces.
    pub fn watch_node_pods(&self, node: &str) -> Watch<PodInfo> {
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        spawn(
            Api::<ApiObject>::all_with(self.client.clone(), &resource(Collection::Pods)),
            resource(Collection::Pods),
            config,
            format!("pods on node {node}"),
            PodInfo::from_api,
        )
    }

    /// The pods of all nodes that an agent has enrolled (label [`mesh::ENROLLED_LABEL`]):
    /// the mesh as peers see it. Look addresses up with [`mesh::lookup`].
    pub fn watch_enrolled_pods(&self) -> Watch<PodInfo> {
        let config = watcher::Config::default().labels(&mesh::enrolled_selector());
        spawn(
            Api::<ApiObject>::all_with(self.client.clone(), &resource(Collection::Pods)),
            resource(Collection::Pods),
            config,
            "enrolled pods".into(),
            PodInfo::from_api,
        )
    }

    /// All namespaces (their labels decide who is meshed).
    pub fn watch_namespaces(&self) -> Watch<NamespaceInfo> {
        spawn(
            Api::<ApiObject>::all_with(self.client.clone(), &resource(Collection::Namespaces)),
            resource(Collection::Namespaces),
            watcher::Config::default(),
            "namespaces".into(),
            NamespaceInfo::from_api,
        )
    }

    /// All Services, found by ClusterIP in [`View::by_ip`].
    pub fn watch_services(&self) -> Watch<ServiceInfo> {
        spawn(
            Api::<ApiObject>::all_with(self.client.clone(), &resource(Collection::Services)),
            resource(Collection::Services),
            watcher::Config::default(),
            "services".into(),
            ServiceInfo::from_api,
        )
    }

    /// All EndpointSlices.
    pub fn watch_endpoint_slices(&self) -> Watch<EndpointSliceInfo> {
        spawn(
            Api::<ApiObject>::all_with(self.client.clone(), &resource(Collection::EndpointSlices)),
            resource(Collection::EndpointSlices),
            watcher::Config::default(),
            "endpoint slices".into(),
            EndpointSliceInfo::from_api,
        )
    }
}

/// Starts a reflector-backed watch of `api` whose objects `convert` turns into `T`s
/// (objects it returns `None` for are left out).
pub(super) fn spawn<T: WatchObject>(
    api: Api<ApiObject>,
    resource: ::kube::core::ApiResource,
    config: watcher::Config,
    what: String,
    convert: fn(&ApiObject) -> Option<T>,
) -> Watch<T> {
    let (tx, rx) = channel::channel(Arc::new(View::empty()));
    let task = tokio::spawn(async move {
        let mut status = WatchStatus::default();
        let mut publish = publisher(tx, convert);
        // Built-in kinds are always served: a 404 is retried like any error.
        run(
            api,
            config,
            resource,
            &what,
            false,
            &mut status,
            &mut publish,
        )
        .await;
    });
    Watch::new(rx, task)
}

/// Publishes snapshots of a store, as `T`s, into `tx`. Returns false once nobody listens.
///
/// Kept apart from [`run`] (which takes it as a trait object) so that the watch machinery
/// is compiled once per API type, not once per plain type.
pub(super) type Publish<'a, K> =
    dyn FnMut(&reflector::Store<K>, &WatchStatus, bool) -> bool + Send + 'a;

/// A [`Publish`] that converts with `convert` (rebuilding only after a change).
pub(super) fn publisher<K, T>(
    tx: channel::Sender<Arc<View<T>>>,
    convert: fn(&K) -> Option<T>,
) -> impl FnMut(&reflector::Store<K>, &WatchStatus, bool) -> bool + Send
where
    K: Resource + Clone + 'static,
    <K as Resource>::DynamicType: Eq + std::hash::Hash + Clone,
    T: WatchObject,
{
    let mut objects = Arc::new(BTreeMap::new());
    let mut by_ip = Arc::new(BTreeMap::new());
    move |store, status, changed| {
        if changed && status.synced {
            let mut fresh = BTreeMap::new();
            let mut index: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
            for object in store.state() {
                if let Some(object) = convert(&object) {
                    let key = object.key();
                    for ip in object.ips() {
                        index.entry(*ip).or_default().push(key.clone());
                    }
                    fresh.insert(key, object);
                }
            }
            objects = Arc::new(fresh);
            by_ip = Arc::new(index);
        }
        let view = View {
            objects: objects.clone(),
            by_ip: by_ip.clone(),
            status: status.clone(),
        };
        tx.send(Arc::new(view)).is_ok()
    }
}

/// Watches until `publish` says nobody listens or, with `stop_when_missing`, until the
/// collection is missing from the server (404: its CRD is not installed).
pub(super) async fn run<K>(
    api: Api<K>,
    config: watcher::Config,
    dyntype: <K as Resource>::DynamicType,
    what: &str,
    stop_when_missing: bool,
    status: &mut WatchStatus,
    publish: &mut Publish<'_, K>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    <K as Resource>::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::<K>::new(dyntype);
    let store = writer.as_reader();
    let stream = watcher::watcher(api, config)
        .modify(trim::<K>)
        .default_backoff()
        .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    while let Some(first) = stream.next().await {
        let mut changed = false;
        let mut missing = false;
        let mut next = Some(first);
        // Apply every event that is already here, then publish once.
        while let Some(event) = next {
            match event {
                Ok(Event::Init) => {
                    status.lists += 1;
                    tracing::debug!(watch = %what, lists = status.lists, "listing");
                }
                Ok(Event::InitApply(_)) => {}
                Ok(Event::InitDone) => {
                    if !status.synced {
                        tracing::info!(watch = %what, objects = store.len(), "synced");
                    }
                    status.synced = true;
                    changed = true;
                }
                Ok(Event::Apply(_) | Event::Delete(_)) => changed = true,
                Err(error) => {
                    status.errors += 1;
                    let text = error_text(&error);
                    if matches!(&error, watcher::Error::WatchError(s) if s.code == 410) {
                        tracing::info!(watch = %what, "resourceVersion expired; relisting");
                    } else {
                        tracing::warn!(watch = %what, error = %text, "watch error; retrying with backoff");
                    }
                    missing |= stop_when_missing && is_not_found(&error);
                    status.last_error = Some(text);
                }
            }
            next = stream.next().now_or_never().flatten();
        }
        status.version += 1;
        if !publish(&store, status, changed) || missing {
            return;
        }
    }
}

/// Drops what the agent never reads but every object may carry in bulk, before it is stored.
fn trim<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// The server has no such collection (a CRD that is not installed).
fn is_not_found(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => {
            matches!(e, ::kube::Error::Api(status) if status.code == 404)
        }
        watcher::Error::WatchError(status) => status.code == 404,
        watcher::Error::NoResourceVersion => false,
    }
}

/// The error with its causes, on one line.
fn error_text(error: &watcher::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
