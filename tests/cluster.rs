//! End-to-end against a real three-node RabbitMQ cluster on this machine: a batch goes on when the
//! node that leads its task queue stops in the middle.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::private_broker::PrivateCluster;
use common::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// The node that leads `queue` (a quorum queue), as the management API of `node` says.
async fn leader(management_url: &str, queue: &str) -> Option<String> {
    let text = management_get_at(management_url, &format!("/api/queues/%2F/{queue}")).await?;
    let info: Value = serde_json::from_str(&text).ok()?;
    info["leader"].as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_goes_on_when_the_node_leading_its_task_queue_stops() {
    let cluster = tokio::task::spawn_blocking(|| PrivateCluster::start(3))
        .await
        .unwrap();
    let url = cluster.url();
    let queue = unique_queue("cluster");
    let dir = scratch("cluster");
    let tasks: Vec<Value> = (0..300)
        .map(|i| json!({"kind": "sleep", "args": {"ms": 150}, "id": format!("t{i}")}))
        .collect();
    let file = dir.join("tasks.jsonl");
    write_tasks(&file, &tasks);
    let submitted = run_warren(
        &[
            "submit",
            "--amqp-url",
            &url,
            "--create-queue",
            "--queue",
            &queue,
            "--file",
            file.to_str().unwrap(),
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(submitted.code, Some(0), "{}", submitted.stderr);
    let batch = submitted.stdout.trim().to_string();
    let env = [("WARREN_AMQP_URL", url.as_str())];
    let workers: Vec<WorkerProcess> = (0..2)
        .map(|_| WorkerProcess::start_with(&queue, &dir, &["--concurrency", "4"], &env))
        .collect();
    let out = dir.join("results.jsonl");
    let mut wait = WorkerProcess::spawn(
        &[
            "wait",
            &batch,
            "--amqp-url",
            &url,
            "--output",
            out.to_str().unwrap(),
            "--retry-for",
            "120",
        ],
        &dir,
        &[],
    );
    eventually(MINUTE, "some results", || async {
        let lines = std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .count();
        (lines >= 40).then_some(())
    })
    .await;
    let leader = leader(&cluster.nodes[0].management_url(), &queue)
        .await
        .expect("the task queue has a leader");
    let node = cluster
        .node(&leader)
        .expect("the leader is one of the nodes");
    node.ctl(&["stop_app"]);

    assert_eq!(
        wait.exit_code(Duration::from_secs(240)).await,
        Some(0),
        "wait finished by itself: {}",
        wait.log_text()
    );
    let results = read_results(&std::fs::read_to_string(&out).unwrap());
    let seqs: BTreeSet<u64> = results.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(results.len(), 300, "every task has exactly one result line");
    assert_eq!(seqs, (0..300).collect());
    for worker in &workers {
        assert!(
            worker.log_text().contains("consuming"),
            "{}",
            worker.log_text()
        );
    }
    let status = run_warren(
        &["status", "--amqp-url", &url, "--queue", &queue],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(status.code, Some(0), "{}", status.stderr);
    assert!(
        status
            .stdout
            .contains("broker: amqp://guest:***@127.0.0.1:"),
        "status says which node it uses: {}",
        status.stdout
    );
}
