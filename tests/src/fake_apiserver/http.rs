//! The HTTP side: routing, list, get, watch, patch, and the real server's Status errors.

use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode, body::Frame, body::Incoming, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{broadcast::error::RecvError, mpsc},
};

use super::{
    ApiRequest, Change, Kind, Outage, Shared, patch,
    select::{FieldSelector, LabelSelector},
};

type Body = BoxBody<Bytes, Infallible>;

/// Accepts connections until the task is dropped.
pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors or similar: the test will notice; do not spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if shared.lock().outage == Outage::Refuse {
            drop(stream);
            continue;
        }
        let mut kill = shared.kill.subscribe();
        // Requests on this connection serve nothing once a later drop has been ordered.
        let generation = *kill.borrow_and_update();
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(request, &shared, generation).await) }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            // Dropping the connection closes the socket: watches end mid-stream.
            tokio::select! {
                _ = connection => {}
                _ = kill.changed() => {}
            }
        });
    }
}

/// What a path names.
struct Target {
    kind: Kind,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
}

/// Parses `/api/v1/...` and `/apis/<group>/<version>/...`; `None` for anything not served.
fn route(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        _ => return None,
    };
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.group() == group && k.plural() == plural && k.versions().contains(&version))?;
    if namespace.is_some() && !kind.namespaced() {
        return None;
    }
    Some(Target {
        kind,
        version: version.to_owned(),
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

async fn handle(request: Request<Incoming>, shared: &Shared, generation: u64) -> Response<Body> {
    let query = parse_query(request.uri().query().unwrap_or(""));
    let watching = matches!(query.get("watch").map(String::as_str), Some("1" | "true"));
    let route = route(request.uri().path());
    let outage = {
        let mut state = shared.lock();
        if let Some(target) = &route {
            let verb = match (request.method(), &target.name) {
                (&Method::GET, None) if watching => "watch",
                (&Method::GET, None) => "list",
                (&Method::GET, Some(_)) => "get",
                (&Method::PATCH, _) => "patch",
                (&Method::POST, _) => "create",
                (&Method::PUT, _) => "update",
                (&Method::DELETE, _) => "delete",
                _ => "unknown",
            };
            state.requests.push(ApiRequest {
                verb: verb.into(),
                group: target.kind.group().into(),
                resource: target.kind.plural().into(),
            });
        }
        let served = route
            .as_ref()
            .is_some_and(|t| !state.absent.contains(&t.kind));
        (state.outage, served)
    };
    match outage {
        (Outage::Status(code), _) => {
            return status(
                code,
                "InternalError",
                "the fake API server is in an outage",
                json!({}),
            );
        }
        (_, false) => return not_served(),
        _ => {}
    }
    let Some(target) = route else {
        return not_served();
    };
    match (request.method().clone(), target.name.clone()) {
        (Method::GET, None) if watching => watch(shared, &target, &query, generation),
        (Method::GET, None) => {
            let delay = shared.lock().list_delay;
            tokio::time::sleep(delay).await;
            list(shared, &target, &query)
        }
        (Method::GET, Some(name)) => get(shared, &target, &name),
        (Method::PATCH, Some(name)) => {
            let content_type = request
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = match request.into_body().collect().await {
                Ok(body) => body.to_bytes(),
                Err(e) => {
                    return status(
                        400,
                        "BadRequest",
                        &format!("reading the body: {e}"),
                        json!({}),
                    );
                }
            };
            patch_object(shared, &target, &name, &content_type, &body)
        }
        (method, _) => status(
            405,
            "MethodNotAllowed",
            &format!("the fake API server does not serve {method} here"),
            json!({}),
        ),
    }
}

/// The real server's answer for a path it does not serve (a missing CRD, an unknown group).
fn not_served() -> Response<Body> {
    status(
        404,
        "NotFound",
        "the server could not find the requested resource",
        json!({}),
    )
}

fn status(code: u16, reason: &str, message: &str, details: Value) -> Response<Body> {
    json_response(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details, "code": code,
        }),
    )
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// Selectors and namespace of a collection request.
struct Filter {
    kind: Kind,
    namespace: Option<String>,
    fields: FieldSelector,
    labels: LabelSelector,
}

impl Filter {
    fn new(target: &Target, query: &HashMap<String, String>) -> Result<Self, String> {
        Ok(Self {
            kind: target.kind,
            namespace: target.namespace.clone(),
            fields: FieldSelector::parse(
                query.get("fieldSelector").map_or("", String::as_str),
                target.kind,
            )?,
            labels: LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| object["metadata"]["namespace"] == ns)
            && self.fields.matches(object)
            && self.labels.matches(object)
    }

    /// The watch event a change is for this filter: (type, object).
    fn event(&self, change: &Change) -> Option<&'static str> {
        if change.kind != self.kind {
            return None;
        }
        let now = self.matches(&change.new);
        if change.deleted {
            return now.then_some("DELETED");
        }
        let before = change.old.as_deref().is_some_and(|old| self.matches(old));
        match (before, now) {
            (true, true) => Some("MODIFIED"),
            (false, true) => Some("ADDED"),
            // It no longer matches: gone, for this watch.
            (true, false) => Some("DELETED"),
            (false, false) => None,
        }
    }
}

/// An object as served at `version`: its apiVersion and kind set.
fn render(object: &Value, kind: Kind, version: &str) -> Value {
    let mut object = object.clone();
    object["apiVersion"] = Value::from(kind.api_version(version));
    object["kind"] = Value::from(kind.name());
    object
}

fn list(shared: &Shared, target: &Target, query: &HashMap<String, String>) -> Response<Body> {
    let filter = match Filter::new(target, query) {
        Ok(filter) => filter,
        Err(message) => return status(400, "BadRequest", &message, json!({})),
    };
    let state = shared.lock();
    let items: Vec<Value> = state
        .objects
        .iter()
        .filter(|((kind, _, _), object)| *kind == target.kind && filter.matches(object))
        .map(|(_, object)| {
            let mut item = render(object, target.kind, &target.version);
            if !target.kind.custom()
                && let Some(map) = item.as_object_mut()
            {
                // Typed lists carry the type once, on the list.
                map.remove("apiVersion");
                map.remove("kind");
            }
            item
        })
        .collect();
    json_response(
        200,
        &json!({
            "kind": format!("{}List", target.kind.name()),
            "apiVersion": target.kind.api_version(&target.version),
            "metadata": {"resourceVersion": state.rv.to_string()},
            "items": items,
        }),
    )
}

fn get(shared: &Shared, target: &Target, name: &str) -> Response<Body> {
    let state = shared.lock();
    let key = (
        target.kind,
        target.namespace.clone().unwrap_or_default(),
        name.to_owned(),
    );
    match state.objects.get(&key) {
        Some(object) => json_response(200, &render(object, target.kind, &target.version)),
        None => object_not_found(target.kind, name),
    }
}

fn object_not_found(kind: Kind, name: &str) -> Response<Body> {
    status(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", kind.plural()),
        json!({"name": name, "kind": kind.plural()}),
    )
}

fn watch(
    shared: &Shared,
    target: &Target,
    query: &HashMap<String, String>,
    generation: u64,
) -> Response<Body> {
    let filter = match Filter::new(target, query) {
        Ok(filter) => filter,
        Err(message) => return status(400, "BadRequest", &message, json!({})),
    };
    let from = query.get("resourceVersion").cloned().unwrap_or_default();
    let from: Option<u64> = match from.as_str() {
        "" | "0" => None,
        text => match text.parse() {
            Ok(rv) => Some(rv),
            Err(_) => {
                return status(
                    400,
                    "BadRequest",
                    &format!("invalid resourceVersion {text:?}"),
                    json!({}),
                );
            }
        },
    };
    let bookmarks = matches!(
        query.get("allowWatchBookmarks").map(String::as_str),
        Some("true" | "1")
    );
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs);
    let kind = target.kind;
    let version = target.version.clone();
    let line = move |kind_of_event: &str, object: &Value| {
        let mut text =
            json!({"type": kind_of_event, "object": render(object, kind, &version)}).to_string();
        text.push('\n');
        Bytes::from(text)
    };
    // Subscribe before reading the state, so no change falls in between.
    let mut changes = shared.changes.subscribe();
    // A connection drop ordered before a change must win over delivering that change: the
    // connection's generation was taken when it was accepted.
    let killed = shared.kill.subscribe();
    if *killed.borrow() != generation {
        return status(
            503,
            "ServiceUnavailable",
            "the connection is being dropped",
            json!({}),
        );
    }
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let (mut last_rv, interval) = {
        let state = shared.lock();
        let mut initial = Vec::new();
        match from {
            None => {
                for ((k, _, _), object) in &state.objects {
                    if *k == kind && filter.matches(object) {
                        initial.push(line("ADDED", object));
                    }
                }
            }
            Some(rv) if rv < state.oldest_watchable => {
                let message = format!(
                    "too old resource version: {rv} ({})",
                    state.oldest_watchable
                );
                let event = json!({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": message, "reason": "Expired", "code": 410}});
                initial.push(Bytes::from(format!("{event}\n")));
                // The real server answers 200 and ends the stream after this event.
                let _ = tx.try_send(initial.remove(0));
                drop(tx);
                return streaming(rx);
            }
            Some(rv) => {
                for change in state.history.iter().filter(|c| c.rv > rv) {
                    if let Some(event) = filter.event(change) {
                        initial.push(line(event, &change.new));
                    }
                }
            }
        }
        for bytes in initial {
            if tx.try_send(bytes).is_err() {
                // More than the channel holds: let the client resume with a fresh list.
                return status(500, "InternalError", "too many initial events", json!({}));
            }
        }
        (state.rv, state.bookmark_interval)
    };
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(3600)));
        tokio::pin!(deadline);
        loop {
            let bytes = tokio::select! {
                change = changes.recv() => match change {
                    Ok(_) if *killed.borrow() != generation => return,
                    Ok(change) if change.rv > last_rv => {
                        last_rv = change.rv;
                        match filter.event(&change) {
                            Some(event) => line(event, &change.new),
                            None => continue,
                        }
                    }
                    Ok(_) => continue,
                    // Too slow, or the server is gone: end the stream; the client resumes.
                    Err(RecvError::Lagged(_) | RecvError::Closed) => return,
                },
                _ = ticker.tick(), if bookmarks => {
                    let event = json!({"type": "BOOKMARK", "object": {
                        "kind": kind.name(), "apiVersion": kind.api_version(kind.versions()[0]),
                        "metadata": {"resourceVersion": last_rv.to_string()}}});
                    Bytes::from(format!("{event}\n"))
                }
                () = &mut deadline => return,
                () = tx.closed() => return,
            };
            if tx.send(bytes).await.is_err() {
                return;
            }
        }
    });
    streaming(rx)
}

fn streaming(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(stream).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn patch_object(
    shared: &Shared,
    target: &Target,
    name: &str,
    content_type: &str,
    body: &[u8],
) -> Response<Body> {
    let Ok(patch_body) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "the patch is not JSON", json!({}));
    };
    let mut state = shared.lock();
    let key = (
        target.kind,
        target.namespace.clone().unwrap_or_default(),
        name.to_owned(),
    );
    let Some(old) = state.objects.get(&key).cloned() else {
        return object_not_found(target.kind, name);
    };
    let mut patched = (*old).clone();
    let media = content_type.split(';').next().unwrap_or("").trim();
    match media {
        // Strategic merge differs from merge only for lists with merge keys; the agent
        // patches maps (labels, annotations).
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            patch::merge(&mut patched, &patch_body);
        }
        "application/json-patch+json" => {
            if let Err(message) = patch::json_patch(&mut patched, &patch_body) {
                return status(422, "Invalid", &message, json!({}));
            }
        }
        other => {
            return status(
                415,
                "UnsupportedMediaType",
                &format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {other:?})"
                ),
                json!({}),
            );
        }
    }
    let meta = |object: &Value, field: &str| object["metadata"][field].clone();
    if meta(&patched, "uid") != meta(&old, "uid") {
        return status(
            409,
            "Conflict",
            &format!(
                "Precondition failed: UID in precondition: {}, UID in object meta: {}",
                meta(&patched, "uid"),
                meta(&old, "uid")
            ),
            json!({"name": name, "kind": target.kind.plural()}),
        );
    }
    if meta(&patched, "resourceVersion") != meta(&old, "resourceVersion") {
        return status(
            409,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                target.kind.plural()
            ),
            json!({"name": name, "kind": target.kind.plural()}),
        );
    }
    // What a patch cannot change.
    for field in ["name", "namespace", "creationTimestamp"] {
        patched["metadata"][field] = meta(&old, field);
    }
    patched["apiVersion"] = old["apiVersion"].clone();
    patched["kind"] = old["kind"].clone();
    if patched == *old {
        // A no-op patch does not make a new version.
        return json_response(200, &render(&old, target.kind, &target.version));
    }
    let stored = state.commit(target.kind, key, Some(old), Some(patched), &shared.changes);
    json_response(200, &render(&stored, target.kind, &target.version))
}

/// `a=b&c=d`, percent-decoded (`+` is a space).
fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_percent_decoded() {
        let query = parse_query(
            "labelSelector=interceptor.io%2Fenrolled%3Dtrue&fieldSelector=spec.nodeName%3Dnode-1&watch=true&x=a+b&y=%",
        );
        assert_eq!(query["labelSelector"], "interceptor.io/enrolled=true");
        assert_eq!(query["fieldSelector"], "spec.nodeName=node-1");
        assert_eq!(query["x"], "a b");
        assert_eq!(query["y"], "%");
    }

    #[test]
    fn paths_route_to_kinds_and_versions() {
        let t = route("/api/v1/namespaces/shop/pods/web").unwrap();
        assert_eq!(
            (t.kind, t.namespace.as_deref(), t.name.as_deref()),
            (Kind::Pod, Some("shop"), Some("web"))
        );
        let t = route("/api/v1/namespaces/shop").unwrap();
        assert_eq!((t.kind, t.name.as_deref()), (Kind::Namespace, Some("shop")));
        assert_eq!(route("/api/v1/namespaces").unwrap().kind, Kind::Namespace);
        assert_eq!(route("/api/v1/pods").unwrap().kind, Kind::Pod);
        let t = route("/apis/security.istio.io/v1beta1/peerauthentications").unwrap();
        assert_eq!(
            (t.kind, t.version.as_str()),
            (Kind::PeerAuthentication, "v1beta1")
        );
        assert!(route("/apis/security.istio.io/v2/peerauthentications").is_none());
        assert!(route("/apis/networking.istio.io/v1/gateways").is_none());
        assert!(route("/api/v1/namespaces/a/namespaces").is_none());
        assert!(route("/version").is_none());
    }
}
