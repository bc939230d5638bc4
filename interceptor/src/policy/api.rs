//! PeerAuthentication objects of the Kubernetes API, checked one by one.
//!
//! An object from the API goes through the same parser as a file ([`super::parse_str`]):
//! the same schema, limits and messages. Only what the policy means is read: `apiVersion`,
//! `kind`, `metadata.name`, `metadata.namespace` and `spec`; the rest of the metadata
//! (labels, annotations, managed fields) and `status` are the cluster's business and never
//! make an object invalid or too large.
//!
//! Each object stands alone: one that is invalid is refused with a [`RejectedPolicy`] and
//! the others still apply. What the agent does with a refused object whose earlier version
//! was valid is its choice (`agent/policy_sync.rs` keeps that version in force).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{ApiPolicy, PolicyError, PolicyRef, PolicySource, parse_str};

/// An object of the API that is not in force because it is invalid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedPolicy {
    /// Its namespace/name.
    pub policy: PolicyRef,
    /// Where it is.
    pub source: PolicySource,
    /// What is wrong with it, naming the field.
    pub reason: String,
    /// An earlier, valid version of the same object (same UID) stays in force.
    pub previous_in_force: bool,
}

/// The Kubernetes API as a policy source, for `policy list`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiSourceStatus {
    /// The API server has answered with a complete list (or said the CRD is absent). Before
    /// that, the objects saved by the previous run are in force.
    pub listed: bool,
    /// The PeerAuthentication CRD is not installed: no policies come from the API.
    pub crd_absent: bool,
    /// Objects the API listed, valid or not.
    pub objects: usize,
    /// Errors of the list and watch so far.
    pub errors: u64,
    /// The last of them.
    pub last_error: Option<String>,
}

/// Reads one object of the API. `created_unix_ms` is its `metadata.creationTimestamp`,
/// already decoded by the caller.
pub fn from_api(
    object: &Value,
    created_unix_ms: Option<i64>,
) -> Result<ApiPolicy, Box<RejectedPolicy>> {
    let metadata = &object["metadata"];
    let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
    let reference = PolicyRef {
        namespace: text(&metadata["namespace"]),
        name: text(&metadata["name"]),
    };
    let created = text(&metadata["creationTimestamp"]);
    let path = api_path(object, &reference);
    let reject = |reason: String| {
        Box::new(RejectedPolicy {
            policy: reference.clone(),
            source: PolicySource::Api {
                path: path.clone(),
                created: created.clone(),
            },
            reason,
            previous_in_force: false,
        })
    };
    let mut meaning = Map::new();
    for field in ["apiVersion", "kind", "spec"] {
        if let Some(value) = object.get(field) {
            meaning.insert(field.to_owned(), value.clone());
        }
    }
    let mut names = Map::new();
    for field in ["name", "namespace"] {
        if let Some(value) = metadata.get(field) {
            names.insert(field.to_owned(), value.clone());
        }
    }
    meaning.insert("metadata".to_owned(), Value::Object(names));
    // JSON is YAML: the parser reads it as a file. Pretty-printed so that nesting limits and
    // positions work as for a file.
    let yaml = serde_json::to_string_pretty(&Value::Object(meaning))
        .map_err(|error| reject(error.to_string()))?;
    let mut parsed = parse_str(&yaml, &path).map_err(|error| reject(reason(&error)))?;
    match (parsed.pop(), parsed.is_empty()) {
        (Some(policy), true) => Ok(ApiPolicy {
            policy,
            uid: text(&metadata["uid"]),
            created,
            created_unix_ms,
        }),
        _ => Err(reject("not one PeerAuthentication object".to_owned())),
    }
}

/// `/apis/<apiVersion>/namespaces/<namespace>/peerauthentications/<name>`: where
/// `kubectl get --raw` finds the object.
fn api_path(object: &Value, reference: &PolicyRef) -> String {
    let version = object["apiVersion"]
        .as_str()
        .unwrap_or("security.istio.io/v1");
    format!(
        "/apis/{version}/namespaces/{}/peerauthentications/{}",
        reference.namespace, reference.name
    )
}

/// The errors without the parser's position in the JSON text, which no user sees: the
/// field path says where.
fn reason(error: &PolicyError) -> String {
    let parts: Vec<String> = error
        .errors()
        .iter()
        .map(|error| match error {
            PolicyError::Invalid { field, message, .. } => format!("field `{field}`: {message}"),
            PolicyError::Syntax { message, .. } | PolicyError::Limit { message, .. } => {
                message.clone()
            }
            other => other.to_string(),
        })
        .collect();
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::policy::Mode;

    fn object(spec: Value) -> Value {
        json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {
                "name": "web", "namespace": "shop", "uid": "u-1",
                "creationTimestamp": "2026-11-30T08:00:00Z", "resourceVersion": "7",
                "labels": {"team": "a"},
                // Annotations and managed fields are never read: not even their size counts.
                "annotations": {"big": "x".repeat(100_000)},
                "managedFields": [{"manager": "kubectl", "operation": "Update"}],
                "somethingNewInObjectMeta": true,
            },
            "spec": spec,
            "status": {"validationMessages": []},
        })
    }

    #[test]
    fn a_valid_object_reads_like_a_file_and_keeps_its_place_and_time() {
        let spec = json!({
            "selector": {"matchLabels": {"app": "web"}},
            "mtls": {"mode": "PERMISSIVE"},
            "portLevelMtls": {"8080": {"mode": "STRICT"}},
        });
        let read = from_api(&object(spec), Some(1_796_025_600_000)).unwrap();
        assert_eq!(read.policy.reference().to_string(), "shop/web");
        assert_eq!(read.policy.mode, Mode::Permissive);
        assert_eq!(
            read.policy.port_level,
            BTreeMap::from([(8080, Mode::Strict)])
        );
        assert_eq!(
            read.policy.origin.file,
            "/apis/security.istio.io/v1/namespaces/shop/peerauthentications/web"
        );
        assert_eq!(read.uid, "u-1");
        assert_eq!(read.created, "2026-11-30T08:00:00Z");
        assert_eq!(read.created_unix_ms, Some(1_796_025_600_000));
        assert_eq!(
            PolicySource::api(&read).to_string(),
            "api /apis/security.istio.io/v1/namespaces/shop/peerauthentications/web \
             (created 2026-11-30T08:00:00Z)"
        );
    }

    #[test]
    fn an_invalid_object_is_refused_naming_the_field_without_json_positions() {
        let rejected = from_api(&object(json!({"mtls": {"mode": "STRIKT"}})), None).unwrap_err();
        assert_eq!(rejected.policy.to_string(), "shop/web");
        assert!(
            rejected
                .reason
                .starts_with("field `spec.mtls.mode`: invalid mode \"STRIKT\""),
            "{}",
            rejected.reason
        );
        assert!(!rejected.previous_in_force);

        let rejected = from_api(&object(json!({"mtls": {"mod": "STRICT"}})), None).unwrap_err();
        assert!(
            rejected.reason.contains("spec.mtls"),
            "unknown field: {}",
            rejected.reason
        );
        let ports =
            json!({"mtls": {"mode": "STRICT"}, "portLevelMtls": {"80": {"mode": "DISABLE"}}});
        let rejected = from_api(&object(ports), None).unwrap_err();
        assert!(
            rejected
                .reason
                .contains("portLevelMtls requires a selector"),
            "{}",
            rejected.reason
        );
        assert!(
            !rejected.reason.contains(":1:") && !rejected.reason.contains("/apis/"),
            "{}",
            rejected.reason
        );
    }

    #[test]
    fn a_v1beta1_object_without_spec_is_unset() {
        let mut value = object(Value::Null);
        value["apiVersion"] = "security.istio.io/v1beta1".into();
        value.as_object_mut().unwrap().remove("spec");
        let read = from_api(&value, None).unwrap();
        assert_eq!(read.policy.mode, Mode::Unset);
        assert!(
            read.policy
                .origin
                .file
                .starts_with("/apis/security.istio.io/v1beta1/")
        );
    }
}
