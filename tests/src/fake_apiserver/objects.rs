//! Kubernetes objects for tests, as the real API returns them.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

static UIDS: AtomicU64 = AtomicU64::new(1);

/// A fresh UID in the API's format (a version-4-shaped UUID, unique in this process).
pub fn new_uid() -> String {
    let n = UIDS.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        std::process::id(),
        nanos & 0xffff,
        (n >> 12) & 0xfff,
        n & 0xfff,
        n
    )
}

/// Now, as the API writes times (`2026-11-30T05:48:40Z`).
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A pod object under construction.
#[derive(Clone, Debug)]
pub struct PodObject {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid` (`None`: the server makes one).
    pub uid: Option<String>,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// `metadata.labels`.
    pub labels: Vec<(String, String)>,
    /// `status.podIP` / `podIPs`.
    pub ip: Option<Ipv4Addr>,
    /// `spec.hostNetwork`.
    pub host_network: bool,
    /// `status.qosClass`.
    pub qos_class: String,
    /// `status.phase`.
    pub phase: String,
}

/// A Running BestEffort pod on `node`, service account `default`, no address yet.
pub fn pod(namespace: &str, name: &str, node: &str) -> PodObject {
    PodObject {
        namespace: namespace.into(),
        name: name.into(),
        uid: None,
        node: Some(node.into()),
        service_account: "default".into(),
        labels: Vec::new(),
        ip: None,
        host_network: false,
        qos_class: "BestEffort".into(),
        phase: "Running".into(),
    }
}

impl PodObject {
    /// With this address.
    pub fn ip(mut self, ip: Ipv4Addr) -> Self {
        self.ip = Some(ip);
        self
    }

    /// With this label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    /// With this service account.
    pub fn service_account(mut self, name: &str) -> Self {
        self.service_account = name.into();
        self
    }

    /// With this UID.
    pub fn uid(mut self, uid: &str) -> Self {
        self.uid = Some(uid.into());
        self
    }

    /// On the node's network.
    pub fn host_network(mut self) -> Self {
        self.host_network = true;
        self
    }

    /// In this phase.
    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = phase.into();
        self
    }

    /// The object.
    pub fn to_json(&self) -> Value {
        let mut metadata = json!({"name": self.name, "namespace": self.namespace});
        metadata["labels"] = Value::Object(
            self.labels
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                .collect(),
        );
        if let Some(uid) = &self.uid {
            metadata["uid"] = Value::from(uid.as_str());
        }
        let mut status = json!({
            "phase": self.phase, "qosClass": self.qos_class,
            "conditions": [{"type": "Ready", "status": if self.phase == "Running" { "True" } else { "False" }}],
        });
        if let Some(ip) = self.ip {
            status["podIP"] = Value::from(ip.to_string());
            status["podIPs"] = json!([{"ip": ip.to_string()}]);
        }
        let mut spec = json!({
            "serviceAccountName": self.service_account,
            "containers": [{"name": "app", "image": "registry.example/app:1"}],
        });
        if let Some(node) = &self.node {
            spec["nodeName"] = Value::from(node.as_str());
        }
        if self.host_network {
            spec["hostNetwork"] = Value::from(true);
        }
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec, "status": status})
    }
}

/// A namespace with labels.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels_json(labels)},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"},
    })
}

/// A ClusterIP Service with TCP ports (name, port, targetPort) selecting `selector`.
pub fn service(
    namespace: &str,
    name: &str,
    cluster_ip: Ipv4Addr,
    ports: &[(&str, u16, u16)],
    selector: &[(&str, &str)],
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": "ClusterIP", "clusterIP": cluster_ip.to_string(),
            "clusterIPs": [cluster_ip.to_string()],
            "selector": labels_json(selector),
            "ports": ports.iter().map(|(n, p, t)| json!({"name": n, "port": p, "targetPort": t, "protocol": "TCP"})).collect::<Vec<_>>(),
        },
    })
}

/// An EndpointSlice of a Service: ready pod endpoints (ip, node, pod name) on ports.
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &[(&str, u16)],
    endpoints: &[(Ipv4Addr, &str, &str)],
) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": ports.iter().map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"})).collect::<Vec<_>>(),
        "endpoints": endpoints.iter().map(|(ip, node, pod)| json!({
            "addresses": [ip.to_string()], "conditions": {"ready": true},
            "nodeName": node, "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod},
        })).collect::<Vec<_>>(),
    })
}

/// A PeerAuthentication with a mesh-, namespace- or workload-wide mode.
pub fn peer_authentication(
    namespace: &str,
    name: &str,
    mode: &str,
    selector: &[(&str, &str)],
) -> Value {
    let mut spec = json!({"mtls": {"mode": mode}});
    if !selector.is_empty() {
        spec["selector"] = json!({"matchLabels": labels_json(selector)});
    }
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": namespace}, "spec": spec,
    })
}

fn labels_json(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        let now = now_rfc3339();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.starts_with("20") && now.ends_with('Z'));
        assert_ne!(new_uid(), new_uid());
        assert_eq!(new_uid().len(), 36);
    }
}
