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
    let submitted = submit_file(&queue, &file, &["--amqp-url", &url]).await;
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

/// Lines in `path` so far.
fn lines_in(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .count()
}

/// Tasks that were started more than once, over the workers' logs.
fn started_twice(workers: &[WorkerProcess]) -> usize {
    let mut starts = std::collections::BTreeMap::<String, usize>::new();
    for worker in workers {
        for line in worker.log_text().lines() {
            if let Some(rest) = line.split("task started task_id=").nth(1) {
                let id = rest.split_whitespace().next().unwrap_or_default();
                *starts.entry(id.to_string()).or_default() += 1;
            }
        }
    }
    starts.values().map(|n| n - 1).sum()
}

/// One fault of the harsh test: what to kill, given the batch id.
enum Fault {
    TaskQueueLeader,
    ResultQueueLeader,
    TwoNodes,
}

/// Runs a batch through `submit --wait` given every node's address, applies `fault` once a third
/// of the results are in, and checks that the batch ends by itself with one result per task.
/// Returns (seconds from the kill to the next result, tasks started twice).
async fn batch_through(cluster: &PrivateCluster, fault: Fault, label: &str) -> (f64, usize) {
    let url = cluster.url();
    let queue = unique_queue(label);
    let dir = scratch(label);
    let total = 1500;
    let tasks: Vec<Value> = (0..total)
        .map(|i| json!({"kind": "sleep", "args": {"ms": 40}, "id": format!("t{i}")}))
        .collect();
    let file = dir.join("tasks.jsonl");
    write_tasks(&file, &tasks);
    let env = [("WARREN_AMQP_URL", url.as_str())];
    let workers: Vec<WorkerProcess> = (0..2)
        .map(|_| WorkerProcess::start_with(&queue, &dir, &["--concurrency", "8"], &env))
        .collect();
    for worker in &workers {
        worker.wait_for_log("consuming", 1, MINUTE).await;
    }
    let out = dir.join("results.jsonl");
    let mut submit = WorkerProcess::spawn(
        &[
            "submit",
            "--queue",
            &queue,
            "--file",
            file.to_str().unwrap(),
            "--wait",
            "--output",
            out.to_str().unwrap(),
        ],
        &dir,
        &env,
    );
    eventually(MINUTE * 2, "a third of the results", || async {
        (lines_in(&out) >= total / 3).then_some(())
    })
    .await;
    let log = submit.log_text();
    let batch = log
        .split("as batch ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("submit names its batch")
        .to_string();
    let api = cluster.nodes[0].management_url();
    let victims: Vec<&common::private_broker::PrivateBroker> = match fault {
        Fault::TaskQueueLeader => {
            let leader = leader(&api, &queue).await.expect("a task queue leader");
            vec![cluster.node(&leader).expect("a node")]
        }
        Fault::ResultQueueLeader => {
            let results = format!("warren.results.{batch}");
            let leader = leader(&api, &results).await.expect("a result queue leader");
            vec![cluster.node(&leader).expect("a node")]
        }
        Fault::TwoNodes => cluster.nodes[1..].iter().collect(),
    };
    let before = lines_in(&out);
    let killed_at = std::time::Instant::now();
    for node in &victims {
        node.kill9();
    }
    // Both waits stay well inside the test binary's watchdog, so a batch that stops moving fails
    // here with the submitter's and the workers' logs rather than as a bare watchdog exit.
    let first_after = eventually(MINUTE * 3, "a result after the kill", || async {
        (lines_in(&out) > before).then(|| killed_at.elapsed().as_secs_f64())
    });
    let first_after = if matches!(fault, Fault::TwoNodes) {
        // Without a majority nothing can move: keep them down for ~30 s, then bring both back.
        tokio::time::sleep(Duration::from_secs(30)).await;
        for node in &victims {
            tokio::task::block_in_place(|| node.launch());
        }
        first_after.await
    } else {
        let seconds = first_after.await;
        for node in &victims {
            tokio::task::block_in_place(|| node.launch());
        }
        seconds
    };
    assert_eq!(
        submit.exit_code(Duration::from_secs(180)).await,
        Some(0),
        "submit --wait finished by itself: {}\n--- workers' last lines:\n{}",
        submit.log_text(),
        workers
            .iter()
            .map(|worker| last_lines(&worker.log_text(), 40))
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
    let results = read_results(&std::fs::read_to_string(&out).unwrap());
    let seqs: BTreeSet<u64> = results.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        results.len(),
        total,
        "every task exactly one result line ({label})"
    );
    assert_eq!(seqs, (0..total as u64).collect());
    let twice = started_twice(&workers);
    eprintln!(
        "{label}: first result {first_after:.2}s after the kill; {twice} task(s) started twice"
    );
    (first_after, twice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_finish_by_themselves_through_kill_9_of_queue_leaders_and_a_quorum_loss() {
    let cluster = tokio::task::spawn_blocking(|| PrivateCluster::start(3))
        .await
        .unwrap();
    batch_through(&cluster, Fault::TaskQueueLeader, "killtaskleader").await;
    batch_through(&cluster, Fault::ResultQueueLeader, "killresultleader").await;
    batch_through(&cluster, Fault::TwoNodes, "killtwo").await;
}
