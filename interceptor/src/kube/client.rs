//! The API client: the pod's service account by default, a kubeconfig file when asked.

use std::path::{Path, PathBuf};

use ::kube::config::{InClusterError, KubeConfigOptions, Kubeconfig, KubeconfigError};

/// Where the client's configuration comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientSource {
    /// The service account of the pod the agent runs in (`KUBERNETES_SERVICE_HOST`, the token
    /// and CA under `/var/run/secrets/kubernetes.io/serviceaccount/`).
    InCluster,
    /// A kubeconfig file (`--kubeconfig`), its current context.
    Kubeconfig(PathBuf),
}

impl ClientSource {
    /// `--kubeconfig` when given, the in-cluster configuration otherwise.
    pub fn from_flag(kubeconfig: Option<&Path>) -> Self {
        kubeconfig.map_or(Self::InCluster, |path| Self::Kubeconfig(path.to_owned()))
    }
}

impl std::fmt::Display for ClientSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InCluster => f.write_str("the in-cluster service account"),
            Self::Kubeconfig(path) => write!(f, "--kubeconfig {}", path.display()),
        }
    }
}

/// Why no client could be made. Each names the flag or file at fault and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Not in a pod, or the service account is not mounted.
    #[error(
        "no in-cluster Kubernetes configuration ({0}): run the agent in a pod with a service \
         account (deploy/base/rbac.yaml), or pass --kubeconfig FILE"
    )]
    InCluster(#[source] InClusterError),
    /// The kubeconfig file cannot be read or parsed.
    #[error("--kubeconfig {}: cannot read it as a kubeconfig file ({source}); pass a kubeconfig such as `kubectl config view --raw` prints", path.display())]
    KubeconfigRead {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: KubeconfigError,
    },
    /// The kubeconfig file has no usable current context, cluster or user.
    #[error("--kubeconfig {}: {source}; fix its current-context, cluster or user entry", path.display())]
    KubeconfigContext {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: KubeconfigError,
    },
    /// The configuration was read but no client could be built from it (TLS material, URL).
    #[error("Kubernetes client from {origin}: {source}")]
    Build {
        /// Where the configuration came from.
        origin: ClientSource,
        /// What went wrong.
        #[source]
        source: ::kube::Error,
    },
}

/// A connection to the API server. Cheap to clone; all watches share its connection pool.
#[derive(Clone)]
pub struct ApiClient {
    pub(super) client: ::kube::Client,
    origin: ClientSource,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("origin", &self.origin)
            .finish()
    }
}

impl ApiClient {
    /// Builds a client. No request is made: an unreachable server shows up as watch errors,
    /// which the watches retry.
    pub async fn connect(source: &ClientSource) -> Result<Self, ClientError> {
        // The agent's TLS is ring-only; make it the process default before kube-rs asks for
        // one (it would otherwise pick it from rustls's features, with the same result).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = match source {
            ClientSource::InCluster => {
                ::kube::Config::incluster().map_err(ClientError::InCluster)?
            }
            ClientSource::Kubeconfig(path) => {
                let kubeconfig =
                    Kubeconfig::read_from(path).map_err(|source| ClientError::KubeconfigRead {
                        path: path.clone(),
                        source,
                    })?;
                ::kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .map_err(|source| ClientError::KubeconfigContext {
                        path: path.clone(),
                        source,
                    })?
            }
        };
        let client = ::kube::Client::try_from(config).map_err(|error| ClientError::Build {
            origin: source.clone(),
            source: error,
        })?;
        Ok(Self {
            client,
            origin: source.clone(),
        })
    }

    /// Where this client's configuration came from.
    pub fn origin(&self) -> &ClientSource {
        &self.origin
    }
}
