//! End-to-end: the Python example client (pika + msgpack) against the real worker and broker.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

const MINUTE: Duration = Duration::from_secs(60);

async fn python(args: &[&str]) -> std::process::Output {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python/warren_client.py"
    );
    let run = tokio::process::Command::new("python3")
        .arg(script)
        .args(args)
        .env("WARREN_AMQP_URL", AMQP_URL)
        .output();
    tokio::time::timeout(MINUTE, run)
        .await
        .expect("python client finished")
        .expect("python3 runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_submits_and_collects() {
    let queue = unique_queue("python");
    let dir = scratch("python");
    let _worker = WorkerProcess::start(&queue, &dir, &[]);
    let out = python(&["--queue", &queue, "--count", "25"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    let batch = lines.next().expect("batch id");
    let results = read_results(&lines.collect::<Vec<_>>().join("\n"));
    assert_eq!(results.len(), 25);
    let ns: BTreeSet<u64> = results
        .iter()
        .map(|r| r["output"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, (0..25).collect());
    assert!(
        results
            .iter()
            .all(|r| r["batch"] == batch && r["labels"]["from"] == "python")
    );
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_batch_can_be_collected_by_warren_wait() {
    let queue = unique_queue("pywait");
    let dir = scratch("pywait");
    let _worker = WorkerProcess::start(&queue, &dir, &[]);
    let out = python(&["--queue", &queue, "--count", "7", "--no-wait"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let batch = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let waited = run_warren(&["wait", &batch], None, MINUTE).await;
    assert_eq!(waited.code, Some(0), "{}", waited.stderr);
    assert_eq!(read_results(&waited.stdout).len(), 7);
    delete_queues(&queue).await;
}
