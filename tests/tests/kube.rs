//! Kubernetes mode foundations: the real kube-rs client (through `interceptor::kube`) against
//! the fake API server, and finding a pod's network namespace from a kubelet-shaped cgroup
//! tree on the real kernel.

use std::{
    collections::BTreeSet,
    ffi::CString,
    net::{IpAddr, Ipv4Addr},
    os::{fd::AsRawFd, unix::fs::MetadataExt, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use interceptor::identity::Identity;
use interceptor::kube::{
    API_CALLS, ApiClient, ClientSource, PodInfo, QosClass, View, Watch,
    cgroup::{Driver, detect_pods_root},
    mesh::{self, MeshLookup, PatchError},
    podns::{PodNetnsError, find_pod_netns},
};
use interceptor_tests::fake_apiserver::{
    FakeApiServer, Kind, Outage,
    objects::{endpoint_slice, namespace, peer_authentication, pod, service},
};

const WITHIN: Duration = Duration::from_secs(2);

async fn client(server: &FakeApiServer) -> anyhow::Result<ApiClient> {
    Ok(ApiClient::connect(&ClientSource::Kubeconfig(server.kubeconfig().to_owned())).await?)
}

/// Waits (at most `within`) until a snapshot satisfies `done`.
async fn eventually<T: interceptor::kube::WatchObject>(
    watch: &Watch<T>,
    within: Duration,
    what: &str,
    done: impl Fn(&View<T>) -> bool,
) -> anyhow::Result<Arc<View<T>>> {
    let mut rx = watch.subscribe();
    match tokio::time::timeout(within, rx.wait_for(|view| done(view))).await {
        Ok(Ok(view)) => Ok(view.clone()),
        _ => anyhow::bail!(
            "{what}: not within {within:?}; last view: {:?}",
            watch.current()
        ),
    }
}

fn names(view: &View<PodInfo>) -> BTreeSet<String> {
    view.objects.values().map(PodInfo::full_name).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Every request the client made is one `API_CALLS` (and so the RBAC) allows.
fn assert_calls_are_declared(server: &FakeApiServer) {
    for request in server.requests() {
        assert!(
            API_CALLS.iter().any(|call| call.group == request.group
                && call.resource == request.resource
                && call.verbs.contains(&request.verb.as_str())),
            "the client made a call API_CALLS does not declare: {request:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_pod_watch_sees_adds_modifies_and_deletes_of_its_node_only() -> anyhow::Result<()>
{
    let server = FakeApiServer::start()?;
    server.apply(
        pod("shop", "web-1", "node-1")
            .ip(Ipv4Addr::new(198, 19, 1, 10))
            .to_json(),
    )?;
    server.apply(
        pod("shop", "db-1", "node-2")
            .ip(Ipv4Addr::new(198, 19, 2, 10))
            .to_json(),
    )?;
    let client = client(&server).await?;
    let watch = client.watch_node_pods("node-1");
    let view = tokio::time::timeout(WITHIN, watch.synced()).await?;
    assert_eq!(
        names(&view),
        set(&["shop/web-1"]),
        "field selector spec.nodeName"
    );
    assert_eq!(view.status.lists, 1);

    // Added: a pod on this node, and one elsewhere that must not show.
    server.apply(
        pod("shop", "web-2", "node-1")
            .phase("Pending")
            .service_account("web")
            .to_json(),
    )?;
    server.apply(pod("shop", "db-2", "node-2").to_json())?;
    let view = eventually(&watch, WITHIN, "web-2 added", |v| v.objects.len() == 2).await?;
    assert_eq!(names(&view), set(&["shop/web-1", "shop/web-2"]));
    let web2 = view
        .objects
        .values()
        .find(|p| p.name == "web-2")
        .context("web-2")?
        .clone();
    assert!(web2.ips.is_empty());
    assert_eq!(web2.service_account, "web");
    assert_eq!(web2.qos_class, Some(QosClass::BestEffort));

    // Modified: it gets its address and runs.
    let ip = Ipv4Addr::new(198, 19, 1, 11);
    server.apply(
        pod("shop", "web-2", "node-1")
            .service_account("web")
            .ip(ip)
            .to_json(),
    )?;
    let view = eventually(&watch, WITHIN, "web-2 got its IP", |v| {
        v.objects
            .get(&web2.uid)
            .is_some_and(|p| p.ipv4() == Some(ip))
    })
    .await?;
    assert_eq!(view.with_ip(IpAddr::V4(ip)).count(), 1);

    // Deleted.
    server.delete(Kind::Pod, "shop", "web-1").context("web-1")?;
    let view = eventually(&watch, WITHIN, "web-1 deleted", |v| v.objects.len() == 1).await?;
    assert_eq!(names(&view), set(&["shop/web-2"]));
    assert_eq!(view.status.lists, 1, "no relist was needed");
    assert_eq!(view.status.errors, 0);
    assert_calls_are_declared(&server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_resource_version_relists_without_ever_emptying_the_view() -> anyhow::Result<()>
{
    let server = FakeApiServer::start()?;
    server.apply(pod("shop", "a", "node-1").to_json())?;
    server.apply(pod("shop", "b", "node-1").to_json())?;
    let client = client(&server).await?;
    let watch = client.watch_node_pods("node-1");
    tokio::time::timeout(WITHIN, watch.synced()).await?;

    // Record every snapshot published from here on.
    let mut rx = watch.subscribe();
    let recorder = tokio::spawn(async move {
        let mut seen = Vec::new();
        while rx.changed().await.is_ok() {
            seen.push(names(&rx.borrow_and_update()));
        }
        seen
    });

    // While the watch is cut off, the state changes and the history is compacted away.
    server.set_outage(Outage::Refuse);
    server.delete(Kind::Pod, "shop", "a");
    server.apply(pod("shop", "b", "node-1").label("version", "2").to_json())?;
    server.apply(pod("shop", "c", "node-1").to_json())?;
    server.expire_history();
    // The relist is slow, so there is time to look at the view while it runs.
    server.set_list_delay(Duration::from_millis(1500));
    server.set_outage(Outage::None);

    let old = set(&["shop/a", "shop/b"]);
    let new = set(&["shop/b", "shop/c"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut during_relist = 0;
    loop {
        let view = watch.current();
        let now = names(&view);
        assert!(
            now == old || now == new,
            "a partial or empty view: {now:?} ({:?})",
            view.status
        );
        if now == new {
            assert!(
                view.status.lists >= 2,
                "the watcher relisted: {:?}",
                view.status
            );
            break;
        }
        if view.status.lists >= 2 {
            during_relist += 1;
        }
        ensure!(Instant::now() < deadline, "no relist: {:?}", view.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        during_relist > 10,
        "the view was looked at while the slow relist ran ({during_relist} times)"
    );
    let view = watch.current();
    let b = view.objects.values().find(|p| p.name == "b").context("b")?;
    assert_eq!(b.labels.get("version").map(String::as_str), Some("2"));
    assert!(
        server
            .requests()
            .iter()
            .filter(|r| r.verb == "list" && r.resource == "pods")
            .count()
            >= 2
    );
    drop(watch);
    let seen = recorder.await?;
    for snapshot in &seen {
        assert!(
            *snapshot == old || *snapshot == new,
            "published {snapshot:?}"
        );
    }
    assert_calls_are_declared(&server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_keep_a_quiet_watch_resumable_after_compaction() -> anyhow::Result<()> {
    let server = FakeApiServer::start()?;
    server.set_bookmark_interval(Duration::from_millis(200));
    server.apply(pod("shop", "a", "node-1").to_json())?;
    let client = client(&server).await?;
    let watch = client.watch_node_pods("node-1");
    tokio::time::timeout(WITHIN, watch.synced()).await?;
    // Other objects move the resourceVersion on; this watch sees none of them, only the
    // bookmarks that carry the new version.
    for n in 0..5 {
        server.apply(namespace(&format!("ns-{n}"), &[]))?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Everything older than now is compacted; the watch had moved past it.
    server.expire_history_before(server.resource_version());
    server.apply(pod("shop", "b", "node-1").to_json())?;
    let view = eventually(
        &watch,
        Duration::from_secs(5),
        "b after the compaction",
        |v| v.objects.len() == 2,
    )
    .await?;
    assert_eq!(view.status.lists, 1, "resumed from the bookmark, no relist");
    assert_eq!(view.status.errors, 0, "{:?}", view.status);
    assert_calls_are_declared(&server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_server_does_not_wipe_the_view_and_the_watch_resumes() -> anyhow::Result<()> {
    let server = FakeApiServer::start()?;
    server.apply(pod("shop", "a", "node-1").to_json())?;
    server.apply(pod("shop", "b", "node-1").to_json())?;
    let client = client(&server).await?;
    let watch = client.watch_node_pods("node-1");
    tokio::time::timeout(WITHIN, watch.synced()).await?;

    // A dropped connection: the watch resumes from its resourceVersion at once.
    server.drop_connections();
    server.apply(pod("shop", "c", "node-1").to_json())?;
    eventually(
        &watch,
        Duration::from_secs(5),
        "c after a dropped stream",
        |v| v.objects.len() == 3,
    )
    .await?;

    // 500s for three seconds: errors, backoff, the view stays.
    server.set_outage(Outage::Status(500));
    server.delete(Kind::Pod, "shop", "a");
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let view = watch.current();
        assert_eq!(names(&view), set(&["shop/a", "shop/b", "shop/c"]));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = watch.current().status.clone();
    assert!(during.errors >= 1, "{during:?}");
    assert!(
        during
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("500") || e.contains("outage")),
        "{during:?}"
    );
    let attempts = server.requests().len();
    server.set_outage(Outage::None);
    let view = eventually(
        &watch,
        Duration::from_secs(20),
        "a gone after the outage",
        |v| v.objects.len() == 2,
    )
    .await?;
    assert_eq!(names(&view), set(&["shop/b", "shop/c"]));
    assert_eq!(view.status.lists, 1, "resumed from its version, no relist");
    // Backoff: a handful of attempts in three seconds, not a tight loop.
    assert!(attempts < 30, "{attempts} requests during a 3 s outage");
    assert_calls_are_declared(&server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_peer_authentication_crd_is_absent_not_an_error_loop() -> anyhow::Result<()> {
    let server = FakeApiServer::start()?;
    server.set_served(Kind::PeerAuthentication, false);
    let client = client(&server).await?;
    let listed = client.list_peer_authentications().await?;
    assert!(!listed.present && listed.objects.is_empty() && listed.version.is_none());

    let watch = client.watch_peer_authentications();
    let view = tokio::time::timeout(WITHIN, watch.synced()).await?;
    assert!(
        view.status.absent && view.objects.is_empty(),
        "{:?}",
        view.status
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = server
        .requests()
        .iter()
        .filter(|r| r.resource == "peerauthentications")
        .count();
    // One list per version for list_peer_authentications, one per version for the watch.
    assert_eq!(requests, 4, "{:?}", server.requests());
    assert_eq!(watch.current().status.errors, 0);

    // Installed: both versions answer, from one storage.
    server.set_served(Kind::PeerAuthentication, true);
    server.apply(peer_authentication(
        "istio-system",
        "default",
        "STRICT",
        &[],
    ))?;
    let listed = client.list_peer_authentications().await?;
    assert!(listed.present);
    assert_eq!(listed.version, Some("v1"));
    assert_eq!(listed.objects.len(), 1);
    assert_eq!(listed.objects[0].object["spec"]["mtls"]["mode"], "STRICT");
    assert_eq!(
        listed.objects[0].object["apiVersion"],
        "security.istio.io/v1"
    );
    assert_calls_are_declared(&server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_authentications_are_watched_once_the_crd_is_there() -> anyhow::Result<()> {
    let server = FakeApiServer::start()?;
    server.apply(peer_authentication(
        "istio-system",
        "default",
        "PERMISSIVE",
        &[],
    ))?;
    let client = client(&server).await?;
    let watch = client.watch_peer_authentications();
    let view = tokio::time::timeout(WITHIN, watch.synced()).await?;
    assert!(!view.status.absent);
    assert_eq!(view.objects.len(), 1);
    server.apply(peer_authentication(
        "shop",
        "strict",
        "STRICT",
        &[("app", "db")],
    ))?;
    let view = eventually(&watch, WITHIN, "second policy", |v| v.objects.len() == 2).await?;
    let strict = view.objects.get("shop/strict").context("shop/strict")?;
    assert_eq!(
        strict.object["spec"]["selector"]["matchLabels"]["app"],
        "db"
    );
    assert_calls_are_declared(&server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enrolled_marker_is_patched_and_the_mesh_view_follows_it() -> anyhow::Result<()> {
    let server = FakeApiServer::start()?;
    let ip = Ipv4Addr::new(198, 19, 1, 10);
    server.apply(namespace("shop", &[(mesh::MESH_LABEL, mesh::MESH_ENABLED)]))?;
    server.apply(
        pod("shop", "web", "node-1")
            .service_account("web")
            .ip(ip)
            .to_json(),
    )?;
    let client = client(&server).await?;
    let node = client.watch_node_pods("node-1");
    let namespaces = client.watch_namespaces();
    let mesh_view = client.watch_enrolled_pods();
    let pods = tokio::time::timeout(WITHIN, node.synced()).await?;
    let namespaces = tokio::time::timeout(WITHIN, namespaces.synced()).await?;
    let peers = tokio::time::timeout(WITHIN, mesh_view.synced()).await?;
    assert!(peers.objects.is_empty());
    assert_eq!(
        mesh::lookup(&peers, IpAddr::V4(ip), "cluster.local"),
        MeshLookup::NotMeshed
    );

    let web = pods.objects.values().next().context("web")?.clone();
    assert_eq!(
        mesh::decide(&web, namespaces.objects.get("shop")),
        mesh::MeshDecision::Enroll
    );
    let identity = "spiffe://cluster.local/ns/shop/sa/web";
    let web_identity: Identity = identity.parse()?;
    client.set_enrolled(&web, Some(&web_identity)).await?;
    let stored = server.get(Kind::Pod, "shop", "web").context("stored")?;
    assert_eq!(
        stored["metadata"]["annotations"][mesh::ENROLLED_ANNOTATION],
        identity
    );
    assert_eq!(stored["metadata"]["labels"][mesh::ENROLLED_LABEL], "true");
    let peers = eventually(&mesh_view, WITHIN, "the mesh sees web", |v| {
        v.objects.len() == 1
    })
    .await?;
    match mesh::lookup(&peers, IpAddr::V4(ip), "cluster.local") {
        MeshLookup::Meshed {
            identity: found,
            pod,
        } => {
            assert_eq!(found.to_string(), identity);
            assert_eq!(pod, "shop/web");
        }
        other => anyhow::bail!("{other:?}"),
    }
    let seen = eventually(&node, WITHIN, "the node sees the mark", |v| {
        v.objects.values().any(|p| p.enrolled.is_some())
    })
    .await?;
    assert_eq!(
        seen.objects
            .values()
            .next()
            .and_then(|p| p.enrolled.as_deref()),
        Some(identity)
    );

    // Unmarked: the label selector no longer matches, so the peers' watch drops it.
    client.set_enrolled(&web, None).await?;
    let peers = eventually(&mesh_view, WITHIN, "the mesh forgets web", |v| {
        v.objects.is_empty()
    })
    .await?;
    assert_eq!(
        mesh::lookup(&peers, IpAddr::V4(ip), "cluster.local"),
        MeshLookup::NotMeshed
    );
    let stored = server.get(Kind::Pod, "shop", "web").context("stored")?;
    assert!(
        stored["metadata"]["annotations"]
            .get(mesh::ENROLLED_ANNOTATION)
            .is_none()
    );

    // A pod re-created under the same name is never marked through the old one's UID.
    server.delete(Kind::Pod, "shop", "web");
    server.apply(pod("shop", "web", "node-1").ip(ip).to_json())?;
    let error = client
        .set_enrolled(&web, Some(&web_identity))
        .await
        .unwrap_err();
    assert!(matches!(error, PatchError::Gone { .. }), "{error}");
    server.delete(Kind::Pod, "shop", "web");
    let error = client
        .set_enrolled(&web, Some(&web_identity))
        .await
        .unwrap_err();
    assert!(matches!(error, PatchError::Gone { .. }), "{error}");
    assert_calls_are_declared(&server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_endpoint_slices_are_watched_as_plain_objects() -> anyhow::Result<()> {
    let server = FakeApiServer::start()?;
    let vip = Ipv4Addr::new(198, 18, 200, 1);
    server.apply(service(
        "shop",
        "web",
        vip,
        &[("http", 80, 8080)],
        &[("app", "web")],
    ))?;
    server.apply(endpoint_slice(
        "shop",
        "web-abcde",
        "web",
        &[("http", 8080)],
        &[(Ipv4Addr::new(198, 19, 1, 10), "node-1", "web-1")],
    ))?;
    let client = client(&server).await?;
    let services = client.watch_services();
    let slices = client.watch_endpoint_slices();
    let services = tokio::time::timeout(WITHIN, services.synced()).await?;
    let slices = tokio::time::timeout(WITHIN, slices.synced()).await?;
    let web = services
        .with_ip(IpAddr::V4(vip))
        .next()
        .context("by ClusterIP")?;
    assert_eq!((web.namespace.as_str(), web.name.as_str()), ("shop", "web"));
    assert_eq!(web.ports[0].port, 80);
    let slice = slices.objects.get("shop/web-abcde").context("slice")?;
    assert_eq!(slice.service.as_deref(), Some("web"));
    assert_eq!(slice.ports, vec![("http".to_owned(), 8080)]);
    assert!(slice.endpoints[0].ready);
    assert_eq!(
        slice.endpoints[0].pod,
        Some(("shop".to_owned(), "web-1".to_owned()))
    );
    assert_calls_are_declared(&server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_name_the_flag_and_the_file() {
    let missing = PathBuf::from("/nonexistent/interceptor/kubeconfig");
    let error = ApiClient::connect(&ClientSource::Kubeconfig(missing))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("--kubeconfig /nonexistent/interceptor/kubeconfig:"),
        "{error}"
    );
    let dir = std::env::temp_dir().join(format!("interceptor-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("no-context");
    std::fs::write(&empty, "apiVersion: v1\nkind: Config\nclusters: []\n").unwrap();
    let error = ApiClient::connect(&ClientSource::Kubeconfig(empty.clone()))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&format!("--kubeconfig {}", empty.display())),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
        let error = ApiClient::connect(&ClientSource::InCluster)
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("--kubeconfig"), "{error}");
    }
}

#[test]
fn the_fake_api_server_serves_inside_a_lab_namespace() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "this test needs root (network namespaces)"
    );
    let mut made = Made::default();
    let address = Ipv4Addr::new(198, 18, 252, 1);
    let netns = made.netns(&format!("icpt-kt-{}-api", std::process::id()), address)?;
    let server = FakeApiServer::start_in_netns(&netns, (address, 0).into())?;
    server.apply(pod("shop", "web", "node-1").to_json())?;
    let url = server.url();
    ensure!(url.starts_with("http://198.18.252.1:"), "{url}");
    let kubeconfig: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(server.kubeconfig())?)?;
    assert_eq!(
        kubeconfig["clusters"][0]["cluster"]["server"].as_str(),
        Some(url.as_str())
    );
    // A client inside that namespace lists the pod.
    let output = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["curl", "-sS", "--max-time", "5"])
        .arg(format!(
            "{url}/api/v1/namespaces/shop/pods?fieldSelector=spec.nodeName%3Dnode-1"
        ))
        .output()?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(list["kind"], "PodList");
    assert_eq!(list["items"][0]["metadata"]["name"], "web");
    Ok(())
}

// ---- a pod's network namespace, on the real kernel ----

/// What the cgroup test made; removed on drop, also after a failed assertion.
#[derive(Default)]
struct Made {
    children: Vec<Child>,
    cgroups: Vec<PathBuf>,
    netns: Vec<String>,
}

impl Drop for Made {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Deepest first.
        self.cgroups
            .sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for cgroup in &self.cgroups {
            let _ = std::fs::remove_dir(cgroup);
        }
        for netns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", netns]).status();
        }
    }
}

impl Made {
    fn cgroup(&mut self, path: &Path) -> anyhow::Result<()> {
        let mut missing = Vec::new();
        let mut dir = path.to_owned();
        while !dir.exists() {
            missing.push(dir.clone());
            dir = dir.parent().context("cgroup path")?.to_owned();
        }
        std::fs::create_dir_all(path)?;
        self.cgroups.extend(missing);
        Ok(())
    }

    /// A network namespace whose loopback also holds `ip`.
    fn netns(&mut self, name: &str, ip: Ipv4Addr) -> anyhow::Result<PathBuf> {
        run("ip", &["netns", "add", name])?;
        self.netns.push(name.to_owned());
        run(
            "ip",
            &["-n", name, "addr", "add", &format!("{ip}/32"), "dev", "lo"],
        )?;
        run("ip", &["-n", name, "link", "set", "lo", "up"])?;
        Ok(PathBuf::from("/run/netns").join(name))
    }

    /// A process that joins `cgroup` and, when given, the network namespace `netns`.
    fn process(&mut self, cgroup: &Path, netns: Option<&Path>) -> anyhow::Result<u32> {
        let procs = CString::new(cgroup.join("cgroup.procs").to_str().context("path")?)?;
        let netns = netns.map(std::fs::File::open).transpose()?;
        let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
        let mut command = Command::new("sleep");
        command.arg("60").stdin(Stdio::null());
        // SAFETY: only async-signal-safe calls (open, write, close, setns) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                if let Some(fd) = netns_fd
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(program).args(args).output()?;
    ensure!(
        output.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[test]
fn a_pods_network_namespace_is_found_from_its_kubelet_cgroup() -> anyhow::Result<()> {
    assert!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() } == 0,
        "this test needs root (cgroups, network namespaces)"
    );
    let id = std::process::id();
    let base = interceptor::cgroup::cgroup2_mount()?.join(format!("interceptor-kubetest-{id}"));
    let mut made = Made::default();
    made.cgroup(&base)?;
    // Three pods of the systemd layout, a container scope each.
    let uid = |n: u32| format!("0f2a9c3e-51b4-4c1e-9a8d-{:08x}{n:04x}", id);
    let pods = base.join("kubepods.slice");
    let scope = |uid: &str, qos: &str, container: &str| {
        pods.join(format!("kubepods-{qos}.slice"))
            .join(format!("kubepods-{qos}-pod{}.slice", uid.replace('-', "_")))
            .join(format!("cri-containerd-{container}.scope"))
    };
    let (good, no_ip, host) = (uid(1), uid(2), uid(3));
    let pod_ip = Ipv4Addr::new(198, 18, 251, 10);

    // The pod: its sandbox in the pod's netns (holding the pod IP), an app container too.
    let good_netns = made.netns(&format!("icpt-kt-{id}-a"), pod_ip)?;
    made.cgroup(&scope(&good, "burstable", "pause"))?;
    made.cgroup(&scope(&good, "burstable", "app"))?;
    let sandbox = made.process(&scope(&good, "burstable", "pause"), Some(&good_netns))?;
    std::thread::sleep(Duration::from_millis(20));
    made.process(&scope(&good, "burstable", "app"), Some(&good_netns))?;
    // A privileged helper passing through the pod's cgroup in the node's netns: ignored.
    made.process(&scope(&good, "burstable", "app"), None)?;
    // A pod whose processes are in a namespace without its address.
    let wrong_netns = made.netns(&format!("icpt-kt-{id}-b"), Ipv4Addr::new(198, 18, 251, 20))?;
    made.cgroup(&scope(&no_ip, "besteffort", "pause"))?;
    made.process(&scope(&no_ip, "besteffort", "pause"), Some(&wrong_netns))?;
    // A pod whose only process is in the node's netns.
    made.cgroup(&scope(&host, "besteffort", "pause"))?;
    made.process(&scope(&host, "besteffort", "pause"), None)?;
    // A pod with no process yet.
    let empty = pods.join(format!("kubepods-pod{}.slice", uid(4).replace('-', "_")));
    made.cgroup(&empty)?;

    let root = detect_pods_root(&base)?;
    assert_eq!(
        (root.dir.clone(), root.driver),
        (pods.clone(), Driver::Systemd)
    );
    let cgroup = root
        .find_pod_cgroup(&good, None)
        .context("the pod's cgroup")?;
    assert_eq!(cgroup, scope(&good, "burstable", "pause").parent().unwrap());
    let found = find_pod_netns(&cgroup, &[IpAddr::V4(pod_ip)])?;
    assert_eq!(found.pid, sandbox, "the oldest process, the sandbox");
    assert_eq!(found.inode, std::fs::metadata(&good_netns)?.ino());
    assert_eq!(found.file.metadata()?.ino(), found.inode);
    assert!(found.addresses.contains(&IpAddr::V4(pod_ip)));

    let no_ip_cgroup = root
        .find_pod_cgroup(&no_ip, Some(QosClass::BestEffort))
        .context("no-ip pod cgroup")?;
    match find_pod_netns(&no_ip_cgroup, &[IpAddr::V4(pod_ip)]) {
        Err(PodNetnsError::NoMatchingAddress { seen, .. }) => {
            assert_eq!(seen.len(), 1);
            assert!(seen[0].1.contains(&"198.18.251.20".parse()?));
        }
        other => anyhow::bail!("a netns without the pod IP was accepted: {other:?}"),
    }
    let host_cgroup = root
        .find_pod_cgroup(&host, None)
        .context("host pod cgroup")?;
    assert!(
        matches!(
            find_pod_netns(&host_cgroup, &[IpAddr::V4(pod_ip)]),
            Err(PodNetnsError::HostNetns { .. })
        ),
        "the node's netns was accepted"
    );
    let empty_cgroup = root
        .find_pod_cgroup(&uid(4), Some(QosClass::Guaranteed))
        .context("guaranteed pod cgroup")?;
    assert!(matches!(
        find_pod_netns(&empty_cgroup, &[IpAddr::V4(pod_ip)]),
        Err(PodNetnsError::NoProcess { .. })
    ));
    drop(made);
    assert!(!base.exists(), "the test's cgroups were removed");
    Ok(())
}
