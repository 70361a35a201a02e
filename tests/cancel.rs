//! `warren cancel` and `expires_at`: tasks of a cancelled batch are not run, running ones are
//! stopped (their processes killed), and every task still gets a result, so `wait` ends.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// Whether a live process has `needle` in its command line.
fn running(needle: &str) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(needle) && !stat.contains(") Z ")
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_batch_stops_running_tasks_skips_queued_ones_and_wait_ends() {
    let queue = unique_queue("cancel");
    let dir = scratch("cancel");
    let worker = WorkerProcess::start(&queue, &dir, &["--concurrency", "2", "--allow-exec", "sh"]);
    let tag = format!("warren-cancel-{}", uuid::Uuid::now_v7().simple());
    let file = dir.join("tasks.jsonl");
    write_tasks(
        &file,
        &(0..6)
            .map(|i| json!({"id": format!("t{i}"), "kind": "exec", "args": {"argv": ["sh", "-c", "sleep 120", tag.clone()]}}))
            .collect::<Vec<_>>(),
    );
    let submitted = submit_file(&queue, &file, &[]).await;
    assert_eq!(submitted.code, Some(0), "{}", submitted.stderr);
    let batch = submitted.stdout.trim().to_string();
    worker.wait_for_log("task started", 2, MINUTE).await;
    // "task started" is logged before the command is spawned: wait for the commands themselves.
    eventually(MINUTE, "the commands to be running", || async {
        running(&tag).then_some(())
    })
    .await;
    let cancelled = run_warren(&["cancel", &batch], None, MINUTE).await;
    assert_eq!(cancelled.code, Some(0), "{}", cancelled.stderr);
    let waited = run_warren(&["wait", &batch], None, MINUTE).await;
    assert_eq!(waited.code, Some(1), "{}", waited.stderr);
    let results = by_task_id(read_results(&waited.stdout));
    assert_eq!(results.len(), 6, "{results:?}");
    for r in results.values() {
        assert_eq!(r["status"], "cancelled", "{r}");
    }
    assert_eq!(
        worker.log_text().matches("task started").count(),
        2,
        "queued tasks were not started"
    );
    eventually(
        Duration::from_secs(10),
        "the cancelled commands to be gone",
        || async { (!running(&tag)).then_some(()) },
    )
    .await;
    // The worker goes on with other work.
    let file = dir.join("more.jsonl");
    write_tasks(&file, &[json!({"kind": "echo", "args": 1})]);
    let more = submit_file(&queue, &file, &["--wait"]).await;
    assert_eq!(more.code, Some(0), "{}", more.stderr);
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cancelled_task_and_an_expired_one_are_answered_by_a_worker_that_starts_later() {
    let queue = unique_queue("cancelone");
    let dir = scratch("cancelone");
    let file = dir.join("tasks.jsonl");
    write_tasks(
        &file,
        &[
            json!({"id": "a", "kind": "echo", "args": "a"}),
            json!({"id": "b", "kind": "echo", "args": "b"}),
            json!({"id": "c", "kind": "echo", "args": "c", "expires_at": "2020-01-01T00:00:00Z"}),
        ],
    );
    let submitted = submit_file(&queue, &file, &[]).await;
    let batch = submitted.stdout.trim().to_string();
    let cancelled = run_warren(&["cancel", &batch, "--task", "b"], None, MINUTE).await;
    assert_eq!(cancelled.code, Some(0), "{}", cancelled.stderr);
    // The worker was not running when the cancellation was made: it reads it on start.
    let _worker = WorkerProcess::start(&queue, &dir, &[]);
    let waited = run_warren(&["wait", &batch], None, MINUTE).await;
    let results = by_task_id(read_results(&waited.stdout));
    assert_eq!(results["a"]["status"], "succeeded");
    assert_eq!(results["b"]["status"], "cancelled", "{}", results["b"]);
    assert_eq!(results["c"]["status"], "expired", "{}", results["c"]);
    assert_eq!(waited.code, Some(1));
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cancellations_and_expiry_times_are_named() {
    let gone = run_warren(&["cancel", "no-such-batch"], None, MINUTE).await;
    assert_eq!(gone.code, Some(2));
    assert!(
        gone.stderr.contains("no-such-batch not found"),
        "{}",
        gone.stderr
    );
    let dir = scratch("badexpiry");
    let file = dir.join("tasks.jsonl");
    write_tasks(&file, &[json!({"kind": "echo", "expires_at": "tomorrow"})]);
    let done = submit_file(&unique_queue("badexpiry"), &file, &[]).await;
    assert_eq!(done.code, Some(2));
    assert!(
        done.stderr.contains("expires_at") && done.stderr.contains("RFC 3339"),
        "{}",
        done.stderr
    );
}
