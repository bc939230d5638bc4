//! Istio `PeerAuthentication` objects (security.istio.io), whose CRD may not be installed.
//!
//! A cluster without Istio's CRDs answers `404` for the collection. That is a state, not an
//! error: [`ApiClient::list_peer_authentications`] says [`PeerAuthentications::present`]
//! `false`, and [`ApiClient::watch_peer_authentications`] publishes an empty, synced view
//! flagged absent and looks again every [`ABSENT_RECHECK`], instead of retrying a failing
//! watch in a loop. The objects are handed over as JSON, for the policy module to parse.

use std::{sync::Arc, time::Duration};

use ::kube::{
    Api,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
    runtime::watcher,
};
use tokio::sync::watch as channel;

use super::{
    ApiClient,
    watch::{View, Watch, WatchObject, WatchStatus, publisher, run},
};

/// The versions Istio serves, newest first: the first one the server has is used.
const VERSIONS: [&str; 2] = ["v1", "v1beta1"];
/// How often an absent CRD is looked for again.
pub const ABSENT_RECHECK: Duration = Duration::from_secs(30);

/// One PeerAuthentication object, as the API server returned it.
#[derive(Clone, Debug, PartialEq)]
pub struct RawPeerAuthentication {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The whole object as JSON (`apiVersion`, `kind`, `metadata`, `spec`).
    pub object: serde_json::Value,
    /// `metadata.creationTimestamp`, in milliseconds since the Unix epoch.
    pub created_unix_ms: Option<i64>,
}

impl WatchObject for RawPeerAuthentication {
    /// `namespace/name`.
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl RawPeerAuthentication {
    pub(super) fn from_api(object: &DynamicObject) -> Option<Self> {
        Some(Self {
            namespace: object.metadata.namespace.clone()?,
            name: object.metadata.name.clone()?,
            object: serde_json::to_value(object).ok()?,
            created_unix_ms: object
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|time| time.0.as_millisecond()),
        })
    }
}

/// The result of listing PeerAuthentications.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerAuthentications {
    /// The CRD is installed (some version of it answered).
    pub present: bool,
    /// The version that answered.
    pub version: Option<&'static str>,
    /// The objects (empty when absent).
    pub objects: Vec<RawPeerAuthentication>,
}

/// Listing PeerAuthentications failed for a reason other than an absent CRD.
#[derive(Debug, thiserror::Error)]
#[error("listing peerauthentications.security.istio.io/{version}: {source}")]
pub struct PeerAuthError {
    /// The version asked for.
    pub version: &'static str,
    /// What the API said.
    #[source]
    pub source: ::kube::Error,
}

fn api_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("security.istio.io", version, "PeerAuthentication"),
        "peerauthentications",
    )
}

impl ApiClient {
    /// Lists all PeerAuthentications, from the newest version the server serves. An absent
    /// CRD is `Ok` with `present: false`, not an error.
    pub async fn list_peer_authentications(&self) -> Result<PeerAuthentications, PeerAuthError> {
        for version in VERSIONS {
            let api: Api<DynamicObject> =
                Api::all_with(self.client.clone(), &api_resource(version));
            match api.list(&ListParams::default()).await {
                Ok(list) => {
                    return Ok(PeerAuthentications {
                        present: true,
                        version: Some(version),
                        objects: list
                            .items
                            .iter()
                            .filter_map(RawPeerAuthentication::from_api)
                            .collect(),
                    });
                }
                Err(::kube::Error::Api(status)) if status.code == 404 => continue,
                Err(source) => return Err(PeerAuthError { version, source }),
            }
        }
        Ok(PeerAuthentications {
            present: false,
            version: None,
            objects: Vec::new(),
        })
    }

    /// Watches all PeerAuthentications. While the CRD is absent the view is synced, empty,
    /// and [`WatchStatus::absent`]; it is looked for again every [`ABSENT_RECHECK`]. If it
    /// disappears while watched, the view becomes absent (and empty) too.
    pub fn watch_peer_authentications(&self) -> Watch<RawPeerAuthentication> {
        let (tx, rx) = channel::channel(Arc::new(View::empty()));
        let client = self.clone();
        let task = tokio::spawn(async move {
            let mut status = WatchStatus::default();
            let mut retry = Duration::from_secs(1);
            loop {
                match client.list_peer_authentications().await {
                    Ok(PeerAuthentications {
                        version: Some(version),
                        ..
                    }) => {
                        // Not synced again until this version's list is in, and nothing
                        // from an earlier run of the CRD is published again.
                        status.absent = false;
                        status.synced = false;
                        let mut publish = publisher(tx.clone(), RawPeerAuthentication::from_api);
                        let resource = api_resource(version);
                        let api: Api<DynamicObject> =
                            Api::all_with(client.client.clone(), &resource);
                        run(
                            api,
                            watcher::Config::default(),
                            resource,
                            "peerauthentications",
                            true,
                            &mut status,
                            &mut publish,
                        )
                        .await;
                        if tx.is_closed() {
                            return;
                        }
                        continue;
                    }
                    Ok(_) => {
                        if !status.absent {
                            tracing::info!(
                                "no PeerAuthentication CRD (security.istio.io) on the API \
                                 server; looking again every {}s",
                                ABSENT_RECHECK.as_secs()
                            );
                        }
                        status.absent = true;
                        status.synced = true;
                        status.version += 1;
                        let view = View {
                            objects: Arc::default(),
                            by_ip: Arc::default(),
                            status: status.clone(),
                        };
                        if tx.send(Arc::new(view)).is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "trying again in {}s", retry.as_secs());
                        status.errors += 1;
                        status.last_error = Some(error.to_string());
                        tokio::time::sleep(retry).await;
                        retry = (retry * 2).min(ABSENT_RECHECK);
                        continue;
                    }
                }
                retry = Duration::from_secs(1);
                tokio::time::sleep(ABSENT_RECHECK).await;
            }
        });
        Watch::new(rx, task)
    }
}
