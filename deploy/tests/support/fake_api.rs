//! A small, stateful fake of the Kubernetes API server: Deployments with their `scale`
//! subresource and Pods, on the real paths, verbs and content types, answering with real objects
//! and `Status` errors. kube's real `Client` talks to it through `Client::new(service, ns)`.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStatus};
use k8s_openapi::api::autoscaling::v1::{Scale, ScaleSpec, ScaleStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

/// One request the fake received: (API group, resource, verb), as RBAC names them.
pub type Call = (String, String, String);

#[derive(Default)]
pub struct Cluster {
    pub deployments: BTreeMap<String, Deployment>,
    pub pods: BTreeMap<String, Pod>,
    /// Calls in order, with the content type of PATCHes.
    pub calls: Vec<(Call, Option<String>)>,
    /// Scripted failures for the next matching calls: (resource, verb, HTTP code).
    pub failures: VecDeque<(String, String, u16)>,
    /// While true every call fails with 503, as an API server in an outage.
    pub down: bool,
}

pub type Shared = Arc<Mutex<Cluster>>;

pub const NAMESPACE: &str = "pipelines";

impl Cluster {
    pub fn with_deployment(name: &str, replicas: i32) -> Shared {
        let mut cluster = Cluster::default();
        cluster
            .deployments
            .insert(name.to_string(), deployment(name, replicas));
        Arc::new(Mutex::new(cluster))
    }
}

pub fn deployment(name: &str, replicas: i32) -> Deployment {
    Deployment {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NAMESPACE.into()),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(BTreeMap::from([("app".into(), name.into())])),
                ..Default::default()
            },
            ..Default::default()
        }),
        status: Some(DeploymentStatus {
            replicas: Some(replicas),
            ready_replicas: Some(replicas),
            ..Default::default()
        }),
    }
}

/// A pod of deployment `app`, created `age_s` ago, whose Ready condition is False since
/// `not_ready_s` ago, as the API server reports conditions with their transition times.
pub fn not_ready_pod(name: &str, app: &str, age_s: i64, not_ready_s: i64) -> Pod {
    let ago = |s: i64| {
        Time(
            Timestamp::now()
                .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(s))
                .expect("time"),
        )
    };
    let mut pod = pod(name, app, None);
    pod.metadata.creation_timestamp = Some(ago(age_s));
    if let Some(status) = pod.status.as_mut() {
        status.conditions = Some(vec![PodCondition {
            type_: "Ready".into(),
            status: "False".into(),
            last_transition_time: Some(ago(not_ready_s)),
            ..Default::default()
        }]);
        for c in status.container_statuses.iter_mut().flatten() {
            c.ready = false;
        }
    }
    pod
}

/// A pod of deployment `app`, ready or stalled waiting for `waiting`.
pub fn pod(name: &str, app: &str, waiting: Option<&str>) -> Pod {
    let ready = waiting.is_none();
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NAMESPACE.into()),
            labels: Some(BTreeMap::from([("app".into(), app.into())])),
            creation_timestamp: Some(Time(Timestamp::now())),
            ..Default::default()
        },
        status: Some(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            container_statuses: Some(vec![ContainerStatus {
                name: "worker".into(),
                ready,
                state: waiting.map(|reason| ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn status_error(code: u16, reason: &str, message: &str) -> Response<String> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code});
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(body.to_string())
        .expect("response")
}

fn ok(value: Value) -> Response<String> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(value.to_string())
        .expect("response")
}

/// Merges a JSON merge patch (RFC 7386) into `target`.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Handles one request against the shared cluster.
pub async fn handle(
    cluster: Shared,
    request: Request<kube::client::Body>,
) -> Result<Response<String>, std::convert::Infallible> {
    let (parts, body) = request.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let content_type = parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /apis/apps/v1/namespaces/{ns}/deployments/{name}[/scale] or /api/v1/namespaces/{ns}/pods[/{name}]
    let (group, rest) = match segments.as_slice() {
        ["apis", "apps", "v1", "namespaces", ns, rest @ ..] if *ns == NAMESPACE => {
            ("apps", rest.to_vec())
        }
        ["api", "v1", "namespaces", ns, rest @ ..] if *ns == NAMESPACE => ("", rest.to_vec()),
        _ => {
            return Ok(status_error(
                404,
                "NotFound",
                &format!("the server could not find the requested resource {path}"),
            ));
        }
    };
    let (resource, name, verb) = match (rest.as_slice(), &parts.method) {
        (["deployments", name], &Method::GET) => ("deployments", Some(name.to_string()), "get"),
        (["deployments", name, "scale"], &Method::PATCH) => {
            ("deployments/scale", Some(name.to_string()), "patch")
        }
        (["deployments", name, "scale"], &Method::GET) => {
            ("deployments/scale", Some(name.to_string()), "get")
        }
        (["pods"], &Method::GET) => ("pods", None, "list"),
        (["pods", name], &Method::PATCH) => ("pods", Some(name.to_string()), "patch"),
        _ => {
            return Ok(status_error(
                405,
                "MethodNotAllowed",
                &format!("{} {path} is not served", parts.method),
            ));
        }
    };
    let mut c = cluster.lock().expect("cluster lock");
    if c.down {
        return Ok(status_error(
            503,
            "ServiceUnavailable",
            "the API server is down (scripted by the test)",
        ));
    }
    c.calls.push((
        (group.into(), resource.into(), verb.into()),
        if verb == "patch" {
            content_type.clone()
        } else {
            None
        },
    ));
    if let Some(i) = c
        .failures
        .iter()
        .position(|(r, v, _)| r == resource && v == verb)
    {
        let (_, _, code) = c.failures.remove(i).expect("failure");
        let reason = match code {
            403 => "Forbidden",
            404 => "NotFound",
            409 => "Conflict",
            _ => "InternalError",
        };
        let message = format!(
            "{resource} \"{}\" is {reason}: scripted by the test",
            name.clone().unwrap_or_default()
        );
        return Ok(status_error(code, reason, &message));
    }
    if verb == "patch" && content_type.as_deref() != Some("application/merge-patch+json") {
        return Ok(status_error(
            415,
            "UnsupportedMediaType",
            &format!("unsupported patch content type {content_type:?}"),
        ));
    }
    let patch: Value = if verb == "patch" {
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    match (resource, verb) {
        ("deployments", "get") | ("deployments/scale", _) => {
            let name = name.unwrap_or_default();
            let Some(deployment) = c.deployments.get_mut(&name) else {
                return Ok(status_error(
                    404,
                    "NotFound",
                    &format!("deployments.apps \"{name}\" not found"),
                ));
            };
            if resource == "deployments" {
                return Ok(ok(serde_json::to_value(&*deployment).expect("json")));
            }
            if let Some(replicas) = patch.pointer("/spec/replicas").and_then(Value::as_i64) {
                let replicas = i32::try_from(replicas).unwrap_or(0);
                if let Some(spec) = deployment.spec.as_mut() {
                    spec.replicas = Some(replicas);
                }
            }
            let replicas = deployment
                .spec
                .as_ref()
                .and_then(|s| s.replicas)
                .unwrap_or(0);
            let scale = Scale {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: Some(NAMESPACE.into()),
                    ..Default::default()
                },
                spec: Some(ScaleSpec {
                    replicas: Some(replicas),
                }),
                status: Some(ScaleStatus {
                    replicas,
                    selector: None,
                }),
            };
            let mut value = serde_json::to_value(&scale).expect("json");
            value["apiVersion"] = json!("autoscaling/v1");
            value["kind"] = json!("Scale");
            Ok(ok(value))
        }
        ("pods", "list") => {
            let selector = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("labelSelector="))
                .map(|s| s.replace("%3D", "=").replace("%2C", ","))
                .unwrap_or_default();
            let wanted: Vec<(&str, &str)> = selector
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .collect();
            let items: Vec<Value> = c
                .pods
                .values()
                .filter(|p| {
                    let labels = p.metadata.labels.clone().unwrap_or_default();
                    wanted
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
                })
                .map(|p| serde_json::to_value(p).expect("json"))
                .collect();
            Ok(ok(
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items}),
            ))
        }
        ("pods", "patch") => {
            let name = name.unwrap_or_default();
            let Some(pod) = c.pods.get_mut(&name) else {
                return Ok(status_error(
                    404,
                    "NotFound",
                    &format!("pods \"{name}\" not found"),
                ));
            };
            let mut value = serde_json::to_value(&*pod).expect("json");
            merge(&mut value, &patch);
            *pod = serde_json::from_value(value.clone()).expect("patched pod");
            Ok(ok(value))
        }
        _ => Ok(status_error(405, "MethodNotAllowed", "not served")),
    }
}

/// A kube `Client` whose requests go to the fake.
pub fn client(cluster: &Shared) -> kube::Client {
    let cluster = Arc::clone(cluster);
    let service = tower::service_fn(move |request| handle(Arc::clone(&cluster), request));
    kube::Client::new(service, NAMESPACE)
}
