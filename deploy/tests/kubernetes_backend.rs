//! The Kubernetes backend through kube's real `Client`, against a stateful fake API server.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::fake_api::{Cluster, Shared, client, not_ready_pod, pod};
use warren_broker::depth::WorkerLoad;
use warren_deploy::backend::{Backend, BackendErrorKind};
use warren_deploy::kubernetes::{API_CALLS, DELETION_COST, KubernetesBackend};

const STALL_AFTER: Duration = Duration::from_secs(300);

fn backend(cluster: &Shared, name: &str) -> KubernetesBackend {
    KubernetesBackend::new(client(cluster), "pipelines", name, STALL_AFTER)
}

fn replicas(cluster: &Shared, name: &str) -> i32 {
    cluster.lock().unwrap().deployments[name]
        .spec
        .as_ref()
        .unwrap()
        .replicas
        .unwrap()
}

fn calls(cluster: &Shared) -> Vec<String> {
    cluster
        .lock()
        .unwrap()
        .calls
        .iter()
        .map(|((_, r, v), _)| format!("{v} {r}"))
        .collect()
}

fn load(name: &str, unacked: u64) -> WorkerLoad {
    WorkerLoad {
        name: name.into(),
        unacked,
    }
}

#[tokio::test]
async fn scales_up_through_the_scale_subresource_with_a_merge_patch() {
    let cluster = Cluster::with_deployment("warren-worker", 1);
    let mut b = backend(&cluster, "warren-worker");
    assert_eq!(b.status().await.unwrap().replicas, 1);
    b.scale(4, &[]).await.unwrap();
    assert_eq!(replicas(&cluster, "warren-worker"), 4);
    let recorded = cluster.lock().unwrap().calls.clone();
    let scale_patch = recorded
        .iter()
        .find(|((_, r, v), _)| r == "deployments/scale" && v == "patch")
        .expect("scale patched");
    assert_eq!(
        scale_patch.1.as_deref(),
        Some("application/merge-patch+json")
    );
    assert!(
        !calls(&cluster).contains(&"patch pods".to_string()),
        "no pod is marked when growing"
    );
}

#[tokio::test]
async fn scale_down_marks_idle_pods_cheapest_before_scaling() {
    let cluster = Cluster::with_deployment("warren-worker", 3);
    {
        let mut c = cluster.lock().unwrap();
        for name in ["busy", "idle", "starting"] {
            c.pods.insert(name.into(), pod(name, "warren-worker", None));
        }
        c.pods
            .insert("other-app".into(), pod("other-app", "something-else", None));
    }
    let mut b = backend(&cluster, "warren-worker");
    b.scale(1, &[load("busy", 3), load("idle", 0)])
        .await
        .unwrap();
    let c = cluster.lock().unwrap();
    let cost = |name: &str| {
        c.pods[name]
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DELETION_COST))
            .cloned()
    };
    assert_eq!(cost("busy").as_deref(), Some("3"));
    assert_eq!(cost("idle").as_deref(), Some("0"));
    assert_eq!(cost("starting").as_deref(), Some("0"));
    assert_eq!(
        cost("other-app"),
        None,
        "only the Deployment's own pods are touched"
    );
    let order: Vec<String> = c
        .calls
        .iter()
        .map(|((_, r, v), _)| format!("{v} {r}"))
        .collect();
    let last_mark = order.iter().rposition(|c| c == "patch pods").unwrap();
    let scaled = order
        .iter()
        .position(|c| c == "patch deployments/scale")
        .unwrap();
    assert!(
        last_mark < scaled,
        "pods are ranked before the scale-down: {order:?}"
    );
    assert_eq!(
        c.deployments["warren-worker"]
            .spec
            .as_ref()
            .unwrap()
            .replicas,
        Some(1)
    );
}

#[tokio::test]
async fn a_missing_deployment_is_named() {
    let cluster = Cluster::with_deployment("warren-worker", 1);
    let mut b = backend(&cluster, "warren-wroker");
    let err = b.status().await.unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::NotFound);
    assert!(
        err.message.contains("pipelines/warren-wroker"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn forbidden_names_the_missing_rbac_rule() {
    let cluster = Cluster::with_deployment("warren-worker", 1);
    cluster
        .lock()
        .unwrap()
        .failures
        .push_back(("deployments/scale".into(), "patch".into(), 403));
    let err = backend(&cluster, "warren-worker")
        .scale(2, &[])
        .await
        .unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::Forbidden);
    assert!(
        err.message.contains("verb 'patch' on 'deployments/scale'"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("namespace pipelines"),
        "{}",
        err.message
    );
    assert_eq!(replicas(&cluster, "warren-worker"), 1);
}

#[tokio::test]
async fn rejected_credentials_are_told_apart_from_a_missing_rule() {
    let cluster = Cluster::with_deployment("warren-worker", 1);
    cluster
        .lock()
        .unwrap()
        .failures
        .push_back(("deployments".into(), "get".into(), 401));
    let err = backend(&cluster, "warren-worker")
        .status()
        .await
        .unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::Unauthorized);
    assert!(
        err.message
            .contains("rejected the autoscaler's credentials")
            && !err.message.contains("Role"),
        "{}",
        err.message
    );
    // A 403 names both causes: the wrong namespace and the missing rule, and says it may pass.
    cluster
        .lock()
        .unwrap()
        .failures
        .push_back(("deployments".into(), "get".into(), 403));
    let err = backend(&cluster, "warren-worker")
        .status()
        .await
        .unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::Forbidden);
    for said in [
        "--namespace 'pipelines'",
        "verb 'get' on 'deployments'",
        "transient",
    ] {
        assert!(err.message.contains(said), "{said}: {}", err.message);
    }
}

#[tokio::test]
async fn conflicts_are_retried() {
    let cluster = Cluster::with_deployment("warren-worker", 1);
    for _ in 0..2 {
        cluster.lock().unwrap().failures.push_back((
            "deployments/scale".into(),
            "patch".into(),
            409,
        ));
    }
    backend(&cluster, "warren-worker")
        .scale(5, &[])
        .await
        .unwrap();
    assert_eq!(replicas(&cluster, "warren-worker"), 5);
    assert_eq!(
        calls(&cluster)
            .iter()
            .filter(|c| *c == "patch deployments/scale")
            .count(),
        3
    );
}

#[tokio::test]
async fn server_errors_keep_the_size_and_say_so() {
    let cluster = Cluster::with_deployment("warren-worker", 2);
    cluster
        .lock()
        .unwrap()
        .failures
        .push_back(("deployments".into(), "get".into(), 503));
    let err = backend(&cluster, "warren-worker")
        .status()
        .await
        .unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::Unreachable);
    assert!(
        err.message.contains("keeping the current size"),
        "{}",
        err.message
    );
    assert_eq!(replicas(&cluster, "warren-worker"), 2);
}

#[tokio::test]
async fn an_unreachable_api_server_is_reported_as_such() {
    let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let err = KubernetesBackend::new(client, "pipelines", "warren-worker", STALL_AFTER)
        .status()
        .await
        .unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::Unreachable);
    assert!(err.message.contains("unreachable"), "{}", err.message);
}

#[tokio::test]
async fn pods_that_cannot_start_are_reported_as_stalled() {
    let cluster = Cluster::with_deployment("warren-worker", 3);
    {
        let mut c = cluster.lock().unwrap();
        c.pods.insert("ok".into(), pod("ok", "warren-worker", None));
        c.pods.insert(
            "bad-image".into(),
            pod("bad-image", "warren-worker", Some("ImagePullBackOff")),
        );
        c.pods.insert(
            "crashing".into(),
            pod("crashing", "warren-worker", Some("CrashLoopBackOff")),
        );
        c.pods.insert(
            "pulling".into(),
            pod("pulling", "warren-worker", Some("ContainerCreating")),
        );
    }
    let status = backend(&cluster, "warren-worker").status().await.unwrap();
    assert_eq!(status.stalled, 2);
    let detail = status.stalled_detail.unwrap();
    assert!(
        detail.contains("bad-image: ImagePullBackOff")
            && detail.contains("crashing: CrashLoopBackOff"),
        "{detail}"
    );
}

#[tokio::test]
async fn the_backend_makes_exactly_the_calls_it_declares() {
    let cluster = Cluster::with_deployment("warren-worker", 2);
    cluster
        .lock()
        .unwrap()
        .pods
        .insert("p".into(), pod("p", "warren-worker", None));
    let mut b = backend(&cluster, "warren-worker");
    b.status().await.unwrap();
    b.scale(3, &[]).await.unwrap();
    b.scale(1, &[load("p", 0)]).await.unwrap();
    let made: BTreeSet<(String, String, String)> = cluster
        .lock()
        .unwrap()
        .calls
        .iter()
        .map(|(c, _)| c.clone())
        .collect();
    let declared: BTreeSet<(String, String, String)> = API_CALLS
        .iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
        .collect();
    assert_eq!(made, declared);
}

#[tokio::test]
async fn a_hung_api_server_fails_the_call_instead_of_stalling_the_loop() {
    // An API server that accepts connections and never answers, as one paused with SIGSTOP.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let _hole = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let config = kube::Config::new(url.parse().unwrap());
    let client =
        warren_deploy::kubernetes::client_with_timeouts(config, Duration::from_secs(1)).unwrap();
    let mut backend = KubernetesBackend::new(
        client,
        "pipelines",
        "warren-worker",
        Duration::from_secs(300),
    );
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(20), backend.status())
        .await
        .expect("the call must time out on its own")
        .unwrap_err();
    assert_eq!(err.kind, BackendErrorKind::Unreachable, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn not_ready_is_measured_from_the_ready_condition_not_the_pod_age() {
    let cluster = Cluster::with_deployment("warren-worker", 3);
    {
        let mut c = cluster.lock().unwrap();
        // Up for an hour, not ready for 4 s while it reconnects after a broker blip: fine.
        c.pods.insert(
            "blip".into(),
            not_ready_pod("blip", "warren-worker", 3600, 4),
        );
        // Never became ready in 400 s.
        c.pods.insert(
            "never".into(),
            not_ready_pod("never", "warren-worker", 402, 400),
        );
        // Was ready, and has not been for 400 s.
        c.pods.insert(
            "lost".into(),
            not_ready_pod("lost", "warren-worker", 3600, 400),
        );
    }
    let status = backend(&cluster, "warren-worker").status().await.unwrap();
    let detail = status.stalled_detail.unwrap_or_default();
    assert_eq!(status.stalled, 2, "{detail}");
    assert!(!detail.contains("blip"), "{detail}");
    assert!(
        detail.contains("never: never became ready in 400s"),
        "{detail}"
    );
    assert!(
        detail.contains("lost: was ready, not ready for 400s"),
        "{detail}"
    );
}

#[tokio::test]
async fn without_pod_patching_a_scale_down_touches_no_pod() {
    let cluster = Cluster::with_deployment("warren-worker", 3);
    {
        let mut c = cluster.lock().unwrap();
        for name in ["busy", "idle"] {
            c.pods.insert(name.into(), pod(name, "warren-worker", None));
        }
    }
    let mut b = backend(&cluster, "warren-worker").without_pod_patching();
    b.scale(1, &[load("busy", 3), load("idle", 0)])
        .await
        .unwrap();
    let c = cluster.lock().unwrap();
    let verbs: Vec<String> = c
        .calls
        .iter()
        .map(|((_, r, v), _)| format!("{v} {r}"))
        .collect();
    assert!(
        !verbs.iter().any(|v| v == "patch pods" || v == "list pods"),
        "{verbs:?}"
    );
    assert!(
        verbs.iter().any(|v| v == "patch deployments/scale"),
        "{verbs:?}"
    );
    assert!(c.pods.values().all(|p| p.metadata.annotations.is_none()));
}
