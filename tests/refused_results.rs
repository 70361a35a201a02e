//! End-to-end: a result the broker refuses (publisher-confirm nack) never wedges a worker. The
//! refusal is made at will with a `reject-publish` length limit on a batch's result queue, as a
//! quorum queue electing a leader or without a majority refuses publishes.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// PUTs (or with `definition` None, DELETEs) a policy of the test vhost.
async fn policy(name: &str, pattern: &str, definition: Option<Value>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let url = format!("http://127.0.0.1:15672/api/policies/{TEST_VHOST}/{name}");
    let client = reqwest::Client::new();
    let request = match definition {
        Some(definition) => client.put(&url).json(&json!({
            "pattern": pattern,
            "definition": definition,
            "apply-to": "queues",
            "priority": 50,
        })),
        None => client.delete(&url),
    };
    let response = request
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("management API");
    assert!(
        response.status().is_success(),
        "policy {name}: {}",
        response.status()
    );
}

/// A batch of `n` echo tasks (ids `t0`...) on a fresh queue, whose result queue takes
/// `max_length` results and then refuses every publish until [`Refusing::clear`].
struct Refusing {
    queue: String,
    dir: std::path::PathBuf,
    batch: String,
    policy: String,
    pattern: String,
}

impl Refusing {
    async fn new(test: &str, n: usize, max_length: u32) -> Self {
        let queue = unique_queue(test);
        let dir = scratch(test);
        let tasks: Vec<Value> = (0..n)
            .map(|i| json!({"kind": "echo", "args": i, "id": format!("t{i}")}))
            .collect();
        let file = dir.join("tasks.jsonl");
        write_tasks(&file, &tasks);
        let submitted = submit_file(&queue, &file, &[]).await;
        assert_eq!(submitted.code, Some(0), "{}", submitted.stderr);
        let batch = submitted.stdout.trim().to_string();
        let refusing = Self {
            policy: format!("refuse-{batch}"),
            pattern: format!("^warren\\.results\\.{batch}$"),
            queue,
            dir,
            batch,
        };
        policy(
            &refusing.policy,
            &refusing.pattern,
            Some(json!({"max-length": max_length, "overflow": "reject-publish"})),
        )
        .await;
        // The policy reaches the queue's members asynchronously.
        tokio::time::sleep(Duration::from_secs(2)).await;
        refusing
    }

    async fn clear(&self) {
        policy(&self.policy, &self.pattern, None).await;
    }

    /// `warren wait` of the batch; its results.
    async fn wait(&self) -> Vec<Value> {
        let out = self.dir.join("results.jsonl");
        let waited = run_warren(
            &["wait", &self.batch, "--output", out.to_str().unwrap()],
            None,
            MINUTE * 2,
        )
        .await;
        assert_eq!(waited.code, Some(0), "{}", waited.stderr);
        read_results(&std::fs::read_to_string(&out).unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_results_are_retried_and_the_batch_completes_once_the_queue_takes_them() {
    // The result queue takes two results, then refuses every publish.
    let refusing = Refusing::new("refused", 20, 2).await;
    let (queue, dir) = (&refusing.queue, &refusing.dir);
    let worker = WorkerProcess::start(
        queue,
        dir,
        &["--concurrency", "4", "--metrics-addr", "127.0.0.1:0"],
    );
    let metrics = worker.metrics_url().await;
    worker
        .wait_for_log("RabbitMQ refuses publishes", 1, MINUTE)
        .await;
    // Refusals go on being retried; the worker says so on /readyz and in its metrics.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let page = scrape(&metrics).await;
    let refused = sample(&page, "warren_worker_publishes_refused_total").unwrap_or(0.0);
    assert!(refused >= 2.0, "refusals are counted: {page}");
    assert!(
        sample(&page, "warren_worker_publishes_refused").unwrap_or(0.0) >= 1.0,
        "{page}"
    );
    let ready = http_get(metrics.replace("/metrics", "/readyz"))
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 503);
    assert!(
        ready.text().await.unwrap_or_default().contains("refuses"),
        "/readyz says why"
    );
    // While refused, the worker starts nothing new (it would have nowhere to put the result).
    let started = |page: &str| {
        sample(page, "warren_worker_tasks_started_total{kind=\"echo\"}").unwrap_or(0.0)
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = scrape(&metrics).await;
    assert_eq!(
        started(&page),
        started(&later),
        "no new task while results are refused"
    );
    assert!(started(&later) < 20.0, "{later}");

    refusing.clear().await;
    let results = refusing.wait().await;
    let ids: BTreeSet<String> = results
        .iter()
        .map(|r| r["task_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(results.len(), 20, "one result per task");
    assert_eq!(ids.len(), 20);
    for result in &results {
        assert_eq!(result["status"], "succeeded", "{result}");
        // A refusal is not the task's fault: it ran once, and no delivery was spent on it.
        assert_eq!(result["attempt"], 1, "{result}");
    }
    worker
        .wait_for_log("RabbitMQ takes publishes again", 1, MINUTE)
        .await;
    assert_eq!(dead_letter_count(queue).await, 0);
    let page = scrape(&metrics).await;
    assert_eq!(sample(&page, "warren_worker_publishes_refused"), Some(0.0));
    let ready = http_get(metrics.replace("/metrics", "/readyz"))
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_refused_past_the_budget_goes_back_to_the_queue_and_the_worker_goes_on() {
    let refusing = Refusing::new("refusedlong", 6, 1).await;
    let worker = WorkerProcess::start(
        &refusing.queue,
        &refusing.dir,
        &["--concurrency", "2", "--publish-retry-for", "2"],
    );
    // Past the budget, the delivery is given back rather than held.
    worker
        .wait_for_log("returning the task to the queue", 1, MINUTE)
        .await;
    refusing.clear().await;
    let results = refusing.wait().await;
    let ids: BTreeSet<String> = results
        .iter()
        .map(|r| r["task_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 6, "every task has its result: {results:?}");
    assert_eq!(results.len(), 6, "and only one");
}
