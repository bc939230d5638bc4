//! A fake Kubernetes API server: real Kubernetes JSON over HTTP, for the real kube-rs client.
//!
//! There is no kube-apiserver on these machines. This one keeps objects in memory and speaks
//! enough of the API for the agent's watches and patches, the way the real server does:
//! - list (`GET .../pods`) and get, with `resourceVersion` in every object and list;
//! - watch (`?watch=1`): JSON lines `{"type": "ADDED|MODIFIED|DELETED|BOOKMARK|ERROR", "object": …}`
//!   from a resourceVersion (resuming from the server's history), bookmarks when asked
//!   (`allowWatchBookmarks`), `timeoutSeconds`, and an `ERROR` event with a `410 Expired`
//!   Status when the version is older than the history ([`FakeApiServer::expire_history`]);
//!   an object that starts or stops matching a watch's selector is ADDED or DELETED for it;
//! - `fieldSelector` (`metadata.name`, `metadata.namespace`, and per kind `spec.nodeName`,
//!   `status.phase`, …; other fields are refused with 400, as the real server does) and
//!   `labelSelector` (equality- and set-based);
//! - PATCH of pods (merge, strategic merge — the same as merge for the maps the agent patches
//!   — and JSON patch), with the `metadata.uid` / `resourceVersion` preconditions (409);
//! - 404 with the real server's Status for kinds it does not serve: an uninstalled CRD
//!   ([`FakeApiServer::set_served`]) looks exactly like a real missing CRD.
//!
//! Pods, Namespaces, Services (v1), EndpointSlices (discovery.k8s.io/v1) and
//! PeerAuthentications (security.istio.io v1 and v1beta1, one storage) are served. Tests
//! change objects with [`FakeApiServer::apply`] and [`FakeApiServer::delete`] (each bumps the
//! resourceVersion and notifies watchers), and break the server on purpose with
//! [`FakeApiServer::set_outage`] and [`FakeApiServer::drop_connections`]. Every request is
//! logged ([`FakeApiServer::requests`]) as the RBAC verb it needs. It serves plain HTTP on the
//! listener it is given (127.0.0.1 by default, or a socket made inside a lab namespace) and
//! writes a kubeconfig pointing at itself.

mod http;
pub mod objects;
pub mod patch;
pub mod select;

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use serde_json::Value;
use tokio::sync::{broadcast, oneshot, watch};

/// The kinds of object the server knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// core/v1 Pod.
    Pod,
    /// core/v1 Namespace (cluster-scoped).
    Namespace,
    /// core/v1 Service.
    Service,
    /// discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice,
    /// security.istio.io PeerAuthentication (a CRD: served as v1 and v1beta1).
    PeerAuthentication,
}

impl Kind {
    /// All kinds.
    pub const ALL: [Kind; 5] = [
        Kind::Pod,
        Kind::Namespace,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::PeerAuthentication,
    ];

    /// API group ("" for core).
    pub fn group(self) -> &'static str {
        match self {
            Kind::Pod | Kind::Namespace | Kind::Service => "",
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::PeerAuthentication => "security.istio.io",
        }
    }

    /// Served versions, preferred first.
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            Kind::PeerAuthentication => &["v1", "v1beta1"],
            _ => &["v1"],
        }
    }

    /// The resource name (plural).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Namespace => "namespaces",
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::PeerAuthentication => "peerauthentications",
        }
    }

    /// The `kind` field.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::PeerAuthentication => "PeerAuthentication",
        }
    }

    /// Namespaced (all but Namespace).
    pub fn namespaced(self) -> bool {
        self != Kind::Namespace
    }

    /// `apiVersion` for a version.
    pub fn api_version(self, version: &str) -> String {
        match self.group() {
            "" => version.to_owned(),
            group => format!("{group}/{version}"),
        }
    }

    /// A custom resource: list items keep `apiVersion` and `kind`, as the real server's
    /// unstructured lists do.
    fn custom(self) -> bool {
        self == Kind::PeerAuthentication
    }

    /// The fields a field selector may use (the real server's per-kind sets, in part).
    pub fn selectable_fields(self) -> &'static [&'static str] {
        match self {
            Kind::Pod => &[
                "metadata.name",
                "metadata.namespace",
                "spec.nodeName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
            ],
            _ => &["metadata.name", "metadata.namespace"],
        }
    }

    fn from_object(object: &Value) -> anyhow::Result<Kind> {
        let kind = object["kind"].as_str().context("object without kind")?;
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == kind)
            .with_context(|| format!("the fake API server does not serve kind {kind}"))
    }
}

/// A request as RBAC sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiRequest {
    /// `get`, `list`, `watch`, `patch`, …
    pub verb: String,
    /// API group.
    pub group: String,
    /// Resource (plural).
    pub resource: String,
}

/// A way for the server to misbehave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outage {
    /// Serve normally.
    None,
    /// Answer every request with this status (e.g. 500) and a Status body.
    Status(u16),
    /// Close every new connection before reading a request.
    Refuse,
}

/// One change, kept in the history for watches that resume.
#[derive(Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    /// The object before (None when created).
    old: Option<Arc<Value>>,
    /// The object after; for a deletion, the last state with the deletion's version.
    new: Arc<Value>,
    deleted: bool,
}

/// How many changes the history keeps before the oldest versions expire by themselves.
const HISTORY: usize = 10_000;

struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Arc<Value>>,
    history: VecDeque<Arc<Change>>,
    /// Watches from a resourceVersion below this get `410 Expired`.
    oldest_watchable: u64,
    absent: BTreeSet<Kind>,
    outage: Outage,
    requests: Vec<ApiRequest>,
    bookmark_interval: Duration,
    list_delay: Duration,
}

struct Shared {
    state: Mutex<State>,
    changes: broadcast::Sender<Arc<Change>>,
    /// Bumped to close every open connection.
    kill: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running fake API server. Dropping it stops it and removes its kubeconfig.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    dir: PathBuf,
    kubeconfig: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

static SERVERS: AtomicU32 = AtomicU32::new(0);

impl FakeApiServer {
    /// Starts a server on 127.0.0.1 (a free port).
    pub fn start() -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        Self::start_on(listener)
    }

    /// Starts a server listening on `addr` inside the network namespace at `netns` (a lab
    /// node's or the fabric's), so that agents in the lab reach it. The server itself runs on
    /// a thread of this process; only its socket lives in that namespace.
    pub fn start_in_netns(netns: &Path, addr: SocketAddr) -> anyhow::Result<Self> {
        let netns = std::fs::File::open(netns)
            .with_context(|| format!("network namespace {}", netns.display()))?;
        // A short-lived thread joins the namespace, binds, and ends; nothing else moves.
        let listener = std::thread::scope(|scope| {
            scope
                .spawn(|| -> anyhow::Result<std::net::TcpListener> {
                    use std::os::fd::AsRawFd;
                    // SAFETY: setns on this thread only, with a descriptor we own.
                    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error()).context("setns");
                    }
                    std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the binding thread panicked"))?
        })?;
        Self::start_on(listener)
    }

    /// Starts a server on a listener the caller made (for example inside a lab namespace).
    pub fn start_on(listener: std::net::TcpListener) -> anyhow::Result<Self> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                oldest_watchable: 1,
                absent: BTreeSet::new(),
                outage: Outage::None,
                requests: Vec::new(),
                bookmark_interval: Duration::from_secs(1),
                list_delay: Duration::ZERO,
            }),
            changes: broadcast::channel(4096).0,
            kill: watch::channel(0).0,
        });
        let dir = std::env::temp_dir().join(format!(
            "interceptor-fake-apiserver-{}-{}",
            std::process::id(),
            SERVERS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_text(&format!("http://{addr}")))?;
        let (stop, stopped) = oneshot::channel();
        let server = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a tokio runtime for the fake API server");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("a tokio listener for the fake API server");
                    tokio::select! {
                        () = http::serve(listener, server) => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(Self {
            shared,
            addr,
            dir,
            kubeconfig,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig file whose current context is this server.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Creates or replaces an object (its `kind` picks the collection). Fills in what the
    /// real server would: `uid` and `creationTimestamp` when creating (kept when replacing),
    /// and a new `resourceVersion`. Returns the stored object.
    pub fn apply(&self, mut object: Value) -> anyhow::Result<Value> {
        let kind = Kind::from_object(&object)?;
        let name = object["metadata"]["name"]
            .as_str()
            .context("object without metadata.name")?
            .to_owned();
        let namespace = if kind.namespaced() {
            object["metadata"]["namespace"]
                .as_str()
                .context("namespaced object without metadata.namespace")?
                .to_owned()
        } else {
            String::new()
        };
        let mut state = self.shared.lock();
        let key = (kind, namespace, name);
        let old = state.objects.get(&key).cloned();
        let meta = object["metadata"]
            .as_object_mut()
            .context("metadata is not an object")?;
        for field in ["uid", "creationTimestamp"] {
            if !meta.contains_key(field) {
                let value = match &old {
                    Some(old) => old["metadata"][field].clone(),
                    None if field == "uid" => Value::from(objects::new_uid()),
                    None => Value::from(objects::now_rfc3339()),
                };
                meta.insert(field.into(), value);
            }
        }
        object["apiVersion"] = Value::from(kind.api_version(kind.versions()[0]));
        let stored = state.commit(kind, key, old, Some(object), &self.shared.changes);
        Ok((*stored).clone())
    }

    /// Deletes an object; returns it, or `None` if there was none.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let mut state = self.shared.lock();
        let key = (kind, namespace.to_owned(), name.to_owned());
        let old = state.objects.get(&key).cloned()?;
        let last = state.commit(kind, key, Some(old), None, &self.shared.changes);
        Some((*last).clone())
    }

    /// An object as stored.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .objects
            .get(&(kind, namespace.to_owned(), name.to_owned()))
            .map(|o| (**o).clone())
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Forgets the history: a watch that resumes from any version issued so far gets
    /// `410 Expired` and must relist. Open watches are closed, so they resume (and fail).
    pub fn expire_history(&self) {
        let next = self.resource_version() + 1;
        self.expire_history_before(next);
    }

    /// Compacts the history below `rv`: watches resuming from an older version get `410`,
    /// newer ones resume. Open watches are closed, so they resume.
    pub fn expire_history_before(&self, rv: u64) {
        let mut state = self.shared.lock();
        state.history.retain(|change| change.rv >= rv);
        state.oldest_watchable = state.oldest_watchable.max(rv);
        drop(state);
        self.drop_connections();
    }

    /// Closes every open connection (watches end mid-stream, as when a server restarts).
    pub fn drop_connections(&self) {
        self.shared.kill.send_modify(|generation| *generation += 1);
    }

    /// Makes the server misbehave (or serve again with [`Outage::None`]). Open connections
    /// are closed when an outage starts.
    pub fn set_outage(&self, outage: Outage) {
        self.shared.lock().outage = outage;
        if outage != Outage::None {
            self.drop_connections();
        }
    }

    /// Serves a kind or answers 404 for it, as a cluster without its CRD does.
    pub fn set_served(&self, kind: Kind, served: bool) {
        let mut state = self.shared.lock();
        if served {
            state.absent.remove(&kind);
        } else {
            state.absent.insert(kind);
        }
    }

    /// How often watches that asked for bookmarks get one (1 s by default).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared.lock().bookmark_interval = interval;
    }

    /// Makes every list wait this long before it answers (a big cluster's slow relist).
    pub fn set_list_delay(&self, delay: Duration) {
        self.shared.lock().list_delay = delay;
    }

    /// Every request so far, as (verb, group, resource).
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.shared.lock().requests.clone()
    }
}

impl State {
    /// Stores `new` (or deletes, when `None`) under a new resourceVersion, records the change
    /// and tells the watchers. Returns the stored (or last) object.
    fn commit(
        &mut self,
        kind: Kind,
        key: (Kind, String, String),
        old: Option<Arc<Value>>,
        new: Option<Value>,
        changes: &broadcast::Sender<Arc<Change>>,
    ) -> Arc<Value> {
        self.rv += 1;
        let rv = self.rv;
        let deleted = new.is_none();
        let mut object = match new {
            Some(object) => object,
            None => old
                .as_deref()
                .cloned()
                .expect("a deletion has an old object"),
        };
        object["metadata"]["resourceVersion"] = Value::from(rv.to_string());
        let object = Arc::new(object);
        if deleted {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key, object.clone());
        }
        let change = Arc::new(Change {
            rv,
            kind,
            old,
            new: object.clone(),
            deleted,
        });
        self.history.push_back(change.clone());
        if self.history.len() > HISTORY
            && let Some(dropped) = self.history.pop_front()
        {
            self.oldest_watchable = dropped.rv + 1;
        }
        // No receiver is fine: nobody watches.
        let _ = changes.send(change);
        object
    }
}

fn kubeconfig_text(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {server}\n\
         users:\n- name: fake\n  user:\n    token: fake-token\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
         current-context: fake\n"
    )
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.drop_connections();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
