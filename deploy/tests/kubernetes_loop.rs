//! The whole control loop on the Kubernetes backend: a real queue on the real broker, the real
//! probe and policy, and the fake API server standing in for the cluster.

mod support;

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, QueuePurgeOptions};
use support::fake_api::{Cluster, client};
use tokio_util::sync::CancellationToken;
use warren_broker::AmqpSettings;
use warren_broker::connection::connect;
use warren_deploy::autoscaler::{PoolSpec, run_pool};
use warren_deploy::kubernetes::KubernetesBackend;
use warren_deploy::metrics::Metrics;
use warren_deploy::policy::PolicyConfig;
use warren_deploy::probe::DepthProbe;

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The shared broker's test vhost, which `tests/run` recreates before the suite (see
/// `tests/common`), so nothing these tests leave piles up in a vhost someone else uses.
const TEST_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/warren-test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_scales_the_deployment_up_and_an_empty_queue_back_to_zero() {
    let queue = format!("test.kubeloop.{}", std::process::id());
    let amqp = AmqpSettings::new(TEST_AMQP_URL);
    let connection = connect(&amqp, "kube-loop-test").await.expect("broker");
    let channel = connection.create_channel().await.unwrap();
    warren_broker::topology::declare_task_queue(&channel, &queue)
        .await
        .unwrap();
    for _ in 0..12 {
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                b"x",
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }

    let cluster = Cluster::with_deployment("warren-worker", 0);
    let backend = KubernetesBackend::new(
        client(&cluster),
        "pipelines",
        "warren-worker",
        Duration::from_secs(300),
    );
    let spec = PoolSpec {
        queue: queue.clone(),
        policy: PolicyConfig {
            max: 10,
            tasks_per_worker: 4,
            scale_down_window: Duration::from_secs(1),
            idle_to_zero: Duration::from_secs(2),
            ..PolicyConfig::default()
        },
        poll: Duration::from_millis(200),
        dry_run: false,
    };
    let stop = CancellationToken::new();
    let metrics = Metrics::new().unwrap();
    let looping = tokio::spawn(run_pool(
        spec,
        backend,
        DepthProbe::new(amqp, &Default::default()),
        metrics.clone(),
        stop.clone(),
    ));
    let replicas = || {
        cluster.lock().unwrap().deployments["warren-worker"]
            .spec
            .as_ref()
            .unwrap()
            .replicas
            .unwrap()
    };
    until("3 replicas for 12 tasks", || replicas() == 3).await;
    channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    until("back to zero", || replicas() == 0).await;
    let page = metrics.render();
    assert!(
        page.contains(&format!(
            "warren_autoscaler_scale_events_total{{direction=\"down\",pool=\"{queue}\"}}"
        )),
        "{page}"
    );
    stop.cancel();
    looping.await.unwrap();
    let _ = channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    let _ = channel
        .queue_delete(format!("{queue}.dead").as_str().into(), Default::default())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_outage_does_not_skip_the_scale_down_window() {
    let queue = format!("test.kubeoutage.{}", std::process::id());
    let amqp = AmqpSettings::new(TEST_AMQP_URL);
    let connection = connect(&amqp, "kube-outage-test").await.expect("broker");
    let channel = connection.create_channel().await.unwrap();
    warren_broker::topology::declare_task_queue(&channel, &queue)
        .await
        .unwrap();
    for _ in 0..12 {
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                b"x",
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }
    let cluster = Cluster::with_deployment("warren-worker", 0);
    let backend = KubernetesBackend::new(
        client(&cluster),
        "pipelines",
        "warren-worker",
        Duration::from_secs(300),
    );
    let spec = PoolSpec {
        queue: queue.clone(),
        policy: PolicyConfig {
            max: 10,
            tasks_per_worker: 4,
            scale_down_window: Duration::from_secs(2),
            idle_to_zero: Duration::from_secs(4),
            ..PolicyConfig::default()
        },
        poll: Duration::from_millis(200),
        dry_run: false,
    };
    let stop = CancellationToken::new();
    let metrics = Metrics::new().unwrap();
    let looping = tokio::spawn(run_pool(
        spec,
        backend,
        DepthProbe::new(amqp, &Default::default()),
        metrics.clone(),
        stop.clone(),
    ));
    let replicas = || {
        cluster.lock().unwrap().deployments["warren-worker"]
            .spec
            .as_ref()
            .unwrap()
            .replicas
            .unwrap()
    };
    until("3 replicas for 12 tasks", || replicas() == 3).await;
    // The API goes away for longer than the window, while the queue is still full...
    cluster.lock().unwrap().down = true;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let page = metrics.render();
    assert!(
        page.contains(&format!(
            "warren_autoscaler_backend_up{{pool=\"{queue}\"}} 0"
        )),
        "{page}"
    );
    // ...the queue empties just before it comes back.
    channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.lock().unwrap().down = false;
    // The policy saw the queue empty only 0.5 s ago: a 2 s window must pass before shrinking.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        replicas(),
        3,
        "shrank before the scale-down window had passed"
    );
    until(
        "back to zero once the window and the idle limit have passed",
        || replicas() == 0,
    )
    .await;
    stop.cancel();
    looping.await.unwrap();
    let _ = channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    let _ = channel
        .queue_delete(format!("{queue}.dead").as_str().into(), Default::default())
        .await;
}
