//! The Kubernetes backend: sizes a Deployment through its `scale` subresource, and before a
//! scale-down marks idle pods with `controller.kubernetes.io/pod-deletion-cost` so the
//! ReplicaSet removes them first.
//!
//! API calls made (the Role in `deploy/k8s/autoscaler.yaml` grants exactly these):
//! `get` deployments, `patch` deployments/scale, `list` and `patch` pods.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tracing::{info, warn};
use warren_broker::depth::WorkerLoad;

use crate::backend::{Backend, BackendError, BackendErrorKind, PoolStatus};

/// Every Kubernetes API call this backend makes, as (API group, resource, verb). The autoscaler's
/// Role grants exactly these; the fake-API tests and the manifest tests hold both to this list.
pub const API_CALLS: &[(&str, &str, &str)] = &[
    ("apps", "deployments", "get"),
    ("apps", "deployments/scale", "patch"),
    ("", "pods", "list"),
    ("", "pods", "patch"),
];

/// The annotation the ReplicaSet controller reads to choose which pods to delete first.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// Container waiting reasons that mean a pod will not become ready by itself.
const STALL_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];
/// Conflicts retried before giving up until the next poll.
const CONFLICT_RETRIES: usize = 3;

/// A Deployment of workers.
pub struct KubernetesBackend {
    namespace: String,
    name: String,
    deployments: Api<Deployment>,
    pods: Api<Pod>,
    /// A pod not ready this long (since its Ready condition last changed) counts as stalled.
    stall_after: Duration,
    costs: HashMap<String, String>,
    /// Whether to set pod-deletion-cost before a scale-down (needs `patch pods`).
    patch_pods: bool,
    /// How to make a new client after the API server rejected this one's credentials (a
    /// rotated or re-issued token is then read from its file at once): the kubeconfig context,
    /// when the client came from [`client`].
    rebuild: Option<Option<String>>,
}

/// A client from the in-cluster service account inside a pod, else from the kubeconfig
/// (`context` selects a kubeconfig context).
pub async fn client(context: Option<&str>) -> Result<Client, BackendError> {
    let unreachable = |message: String| BackendError {
        kind: BackendErrorKind::Unreachable,
        message,
    };
    let config = match context {
        Some(context) => {
            let options = kube::config::KubeConfigOptions { context: Some(context.to_string()), ..Default::default() };
            kube::Config::from_kubeconfig(&options)
                .await
                .map_err(|e| unreachable(format!("cannot load kubeconfig context '{context}': {e}")))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            unreachable(format!(
                "no Kubernetes configuration: not in a pod with a service account, and no usable kubeconfig ({e})"
            ))
        })?,
    };
    client_with_timeouts(config, API_TIMEOUT)
}

/// What a 403 to `verb` on `resource` in `namespace` means, and what to do: RBAC grants the
/// autoscaler its Role in one namespace only, so a 403 is as often a wrong `--namespace` as a
/// missing rule; and right after an API server (re)starts, its RBAC caches are briefly empty.
fn forbidden_message(verb: &str, resource: &str, namespace: &str, said: &str) -> String {
    let namespace_hint = match own_namespace() {
        Some(own) if own != namespace => format!(
            "this pod runs in namespace '{own}' but --namespace is '{namespace}': the Role of deploy/k8s/autoscaler.yaml \
             is granted in the manifests' namespace only, so fix --namespace (or apply a Role there)"
        ),
        _ => format!(
            "is --namespace '{namespace}' where the Deployment and the autoscaler's Role are?"
        ),
    };
    format!(
        "forbidden to {verb} {resource} in namespace {namespace} (403): {namespace_hint}; otherwise its Role lacks a \
         rule allowing verb '{verb}' on '{resource}' (see deploy/k8s/autoscaler.yaml). Just after the API server \
         started this may be transient (its permission caches fill in a few seconds): it is tried again every poll. \
         API server said: {said}"
    )
}

/// The namespace this process runs in, when it runs in a pod with a ServiceAccount: the
/// default of `--namespace`, so the manifests need not repeat (and an overlay cannot desync) it.
pub fn own_namespace() -> Option<String> {
    std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE_FILE)
        .ok()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
}

/// Where a pod's ServiceAccount namespace is mounted.
const SERVICE_ACCOUNT_NAMESPACE_FILE: &str =
    "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Longest wait for the API server to accept a connection, and for each read of an answer: a
/// paused or overloaded API server must fail a call, not stall the control loop silently.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

/// A client for `config` whose calls fail after `timeout` without a connection or an answer.
pub fn client_with_timeouts(
    mut config: kube::Config,
    timeout: Duration,
) -> Result<Client, BackendError> {
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
    Client::try_from(config).map_err(|e| BackendError {
        kind: BackendErrorKind::Unreachable,
        message: format!("cannot build a Kubernetes client: {e}"),
    })
}

impl KubernetesBackend {
    /// Never patches pods: no pod-deletion-cost ranking before a scale-down, so the Role needs
    /// no `patch pods`; the ReplicaSet then picks which pods go, and the SIGTERM drain still
    /// lets their tasks finish.
    pub fn without_pod_patching(mut self) -> Self {
        self.patch_pods = false;
        self
    }

    /// The Deployment `name` in `namespace`, through `client`.
    pub fn new(client: Client, namespace: &str, name: &str, stall_after: Duration) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            deployments: Api::namespaced(client.clone(), namespace),
            pods: Api::namespaced(client, namespace),
            stall_after,
            costs: HashMap::new(),
            patch_pods: true,
            rebuild: None,
        }
    }

    /// After a 401, make a new client as [`client`] does with `context`, so fresh credentials
    /// are read at once instead of when kube's own refresh comes round.
    pub fn rebuilding_on_unauthorized(mut self, context: Option<String>) -> Self {
        self.rebuild = Some(context);
        self
    }

    /// Makes a new client when `error` says the credentials were rejected.
    async fn renew_client_after(&mut self, error: &BackendError) {
        if error.kind != BackendErrorKind::Unauthorized {
            return;
        }
        let Some(context) = self.rebuild.clone() else {
            return;
        };
        match client(context.as_deref()).await {
            Ok(fresh) => {
                self.deployments = Api::namespaced(fresh.clone(), &self.namespace);
                self.pods = Api::namespaced(fresh, &self.namespace);
            }
            Err(e) => warn!("cannot make a new Kubernetes client after a 401: {e}"),
        }
    }

    fn error(&self, verb: &str, resource: &str, error: kube::Error) -> BackendError {
        let target = format!("{}/{}", self.namespace, self.name);
        match &error {
            kube::Error::Api(status) => match status.code {
                404 => BackendError {
                    kind: BackendErrorKind::NotFound,
                    message: format!(
                        "Deployment {target} not found: create it (deploy/k8s/worker.yaml) or fix --namespace/--deployment"
                    ),
                },
                401 => BackendError {
                    kind: BackendErrorKind::Unauthorized,
                    message: format!(
                        "the API server rejected the autoscaler's credentials (401 Unauthorized) to {verb} {resource} \
                         {target}: its ServiceAccount token expired or was revoked, or the kubeconfig's user is not \
                         known there; a projected token is read again from its file, so a rotated one is taken up \
                         on the next poll. Keeping the current size. API server said: {}",
                        status.message
                    ),
                },
                403 => BackendError {
                    kind: BackendErrorKind::Forbidden,
                    message: forbidden_message(verb, resource, &self.namespace, &status.message),
                },
                409 => BackendError {
                    kind: BackendErrorKind::Conflict,
                    message: format!("conflict on {resource} {target}: {}", status.message),
                },
                code => BackendError {
                    kind: if code >= 500 {
                        BackendErrorKind::Unreachable
                    } else {
                        BackendErrorKind::Other
                    },
                    message: format!(
                        "API server answered {code} to {verb} {resource} {target}: {}; keeping the current size",
                        status.message
                    ),
                },
            },
            _ => BackendError {
                kind: BackendErrorKind::Unreachable,
                message: format!(
                    "Kubernetes API server unreachable ({error}); keeping the current size and retrying"
                ),
            },
        }
    }

    /// The Deployment and its wanted replicas (Kubernetes defaults an unset count to 1).
    async fn deployment(&self) -> Result<(Deployment, i32), BackendError> {
        let deployment = self
            .deployments
            .get(&self.name)
            .await
            .map_err(|e| self.error("get", "deployments", e))?;
        let replicas = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1);
        Ok((deployment, replicas))
    }

    /// Pods of the Deployment, through its label selector.
    async fn pods(&self, deployment: &Deployment) -> Result<Vec<Pod>, BackendError> {
        let labels = deployment
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.as_ref())
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        if labels.is_empty() {
            return Ok(Vec::new());
        }
        let list = self
            .pods
            .list(&ListParams::default().labels(&labels))
            .await
            .map_err(|e| self.error("list", "pods", e))?;
        Ok(list
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect())
    }

    /// Why a pod is stalled, if it is.
    fn stalled(&self, pod: &Pod) -> Option<String> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let status = pod.status.as_ref()?;
        for container in status
            .container_statuses
            .iter()
            .flatten()
            .chain(status.init_container_statuses.iter().flatten())
        {
            if let Some(reason) = container
                .state
                .as_ref()
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.as_deref())
                && STALL_REASONS.contains(&reason)
            {
                return Some(format!("pod {name}: {reason}"));
            }
        }
        let condition = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready");
        if condition.is_some_and(|c| c.status == "True") {
            return None;
        }
        // Not ready since its Ready condition last changed: a pod that was ready a moment ago
        // and is reconnecting after a broker blip is not "not starting". Without the condition,
        // since the pod was created.
        let created = pod.metadata.creation_timestamp.as_ref()?.0;
        let since = condition
            .and_then(|c| c.last_transition_time.as_ref())
            .map_or(created, |t| t.0);
        let not_ready = Timestamp::now().duration_since(since).as_secs();
        let limit = i64::try_from(self.stall_after.as_secs()).unwrap_or(i64::MAX);
        // A Ready condition that changed well after creation means the pod was ready before.
        let was_ready = since.duration_since(created).as_secs() > 60;
        (not_ready > limit).then(|| {
            if was_ready {
                format!("pod {name}: was ready, not ready for {not_ready}s")
            } else {
                format!("pod {name}: never became ready in {not_ready}s")
            }
        })
    }

    /// Ranks pods for deletion: idle pods get cost 0 and busy ones their running task count.
    async fn mark_deletion_costs(
        &mut self,
        deployment: &Deployment,
        loads: &[WorkerLoad],
    ) -> Result<(), BackendError> {
        for pod in self.pods(deployment).await? {
            let Some(name) = pod.metadata.name.clone() else {
                continue;
            };
            let busy = loads
                .iter()
                .find(|l| l.name == name)
                .map_or(0, |l| l.unacked);
            let cost = busy.to_string();
            let current = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DELETION_COST));
            if current == Some(&cost) || self.costs.get(&name) == Some(&cost) {
                continue;
            }
            let patch = json!({ "metadata": { "annotations": { DELETION_COST: cost } } });
            self.pods
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| self.error("patch", "pods", e))?;
            self.costs.insert(name, cost);
        }
        Ok(())
    }
}

impl KubernetesBackend {
    async fn read_status(&mut self) -> Result<PoolStatus, BackendError> {
        let (deployment, replicas) = self.deployment().await?;
        let ready = deployment
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        let stalled: Vec<String> = self
            .pods(&deployment)
            .await?
            .iter()
            .filter_map(|p| self.stalled(p))
            .collect();
        Ok(PoolStatus {
            replicas: u32::try_from(replicas).unwrap_or(0),
            ready: u32::try_from(ready).unwrap_or(0),
            stalled: u32::try_from(stalled.len()).unwrap_or(u32::MAX),
            stalled_detail: (!stalled.is_empty()).then(|| stalled.join("; ")),
        })
    }

    async fn resize(&mut self, desired: u32, loads: &[WorkerLoad]) -> Result<(), BackendError> {
        // Read again: the size may have changed since `status` (another controller, a user).
        let (deployment, current) = self.deployment().await?;
        if self.patch_pods && i64::from(desired) < i64::from(current) {
            // Best effort: a pod can take a task between marking and scaling; the SIGTERM drain
            // is the safety net.
            if let Err(e) = self.mark_deletion_costs(&deployment, loads).await {
                warn!(
                    "could not rank pods for deletion ({e}); scaling down anyway, running tasks are drained on SIGTERM"
                );
            }
        }
        let patch = json!({ "spec": { "replicas": desired } });
        for attempt in 1..=CONFLICT_RETRIES {
            match self
                .deployments
                .patch_scale(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    info!(deployment = %self.name, from = current, to = desired, "scaled");
                    return Ok(());
                }
                Err(e) => {
                    let error = self.error("patch", "deployments/scale", e);
                    if error.kind != BackendErrorKind::Conflict || attempt == CONFLICT_RETRIES {
                        return Err(error);
                    }
                    warn!("{error}; retrying");
                }
            }
        }
        Ok(())
    }
}

impl Backend for KubernetesBackend {
    fn describe(&self) -> String {
        format!("deployment {}/{}", self.namespace, self.name)
    }

    async fn status(&mut self) -> Result<PoolStatus, BackendError> {
        let status = self.read_status().await;
        if let Err(e) = &status {
            self.renew_client_after(e).await;
        }
        status
    }

    async fn scale(&mut self, desired: u32, loads: &[WorkerLoad]) -> Result<(), BackendError> {
        let scaled = self.resize(desired, loads).await;
        if let Err(e) = &scaled {
            self.renew_client_after(e).await;
        }
        scaled
    }
}
