//! End-to-end: `warren autoscale` with the local backend against the real broker.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// Starts an autoscaler for `queue` on the local backend with short timers.
fn autoscaler(queue: &str, dir: &std::path::Path, knobs: &str, worker: &[&str]) -> WorkerProcess {
    let mut args = vec![
        "autoscale",
        "--queue",
        queue,
        "--backend",
        "local",
        "--poll",
        "0.5",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    args.extend(knobs.split_whitespace());
    args.push("--");
    args.push(env!("CARGO_BIN_EXE_warren"));
    args.extend_from_slice(worker);
    WorkerProcess::spawn(&args, dir, &[])
}

async fn gauge_reaches(url: &str, series: &str, value: f64, within: Duration) {
    eventually(within, &format!("{series} == {value}"), || async {
        (sample(&scrape(url).await, series) == Some(value)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_grows_the_pool_to_max_and_a_drained_queue_returns_it_to_zero() {
    let queue = unique_queue("grow");
    let dir = scratch("grow");
    let mut scaler = autoscaler(
        &queue,
        &dir,
        "--min 0 --max 3 --tasks-per-worker 2 --scale-down-window 2 --idle-to-zero 3",
        &["worker", "--queue", &queue, "--concurrency", "2"],
    );
    let url = scaler.metrics_url().await;
    let pool = format!("{{pool=\"{queue}\"}}");
    gauge_reaches(
        &url,
        &format!("warren_autoscaler_current_replicas{pool}"),
        0.0,
        MINUTE,
    )
    .await;
    let tasks: Vec<Value> = (0..40)
        .map(|_| json!({"kind": "sleep", "args": {"ms": 400}}))
        .collect();
    let file = dir.join("tasks.jsonl");
    write_tasks(&file, &tasks);
    let started = Instant::now();
    let submitted = submit_file(&queue, &file, &[]).await;
    assert_eq!(submitted.code, Some(0), "{}", submitted.stderr);
    gauge_reaches(
        &url,
        &format!("warren_autoscaler_current_replicas{pool}"),
        3.0,
        Duration::from_secs(10),
    )
    .await;
    let grew_in = started.elapsed();
    let waited = run_warren(&["wait", submitted.stdout.trim()], None, MINUTE).await;
    assert_eq!(waited.code, Some(0), "{}", waited.stderr);
    gauge_reaches(
        &url,
        &format!("warren_autoscaler_current_replicas{pool}"),
        0.0,
        MINUTE,
    )
    .await;
    let page = scrape(&url).await;
    assert!(
        sample(
            &page,
            &format!("warren_autoscaler_scale_events_total{{direction=\"up\",pool=\"{queue}\"}}")
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{page}"
    );
    assert!(
        sample(
            &page,
            &format!("warren_autoscaler_scale_events_total{{direction=\"down\",pool=\"{queue}\"}}")
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{page}"
    );
    assert_eq!(
        sample(&page, &format!("warren_autoscaler_desired_replicas{pool}")),
        Some(0.0)
    );
    assert!(
        page.contains("warren_autoscaler_backlog_to_ready_seconds_count"),
        "{page}"
    );
    let log = scaler.log_text();
    assert!(
        log.matches("worker started").count() <= 6,
        "no churn beyond max: {log}"
    );
    assert!(!log.contains("not growing"), "{log}");
    eprintln!("pool reached --max {grew_in:?} after the backlog appeared");
    scaler.signal(Signal::SIGTERM);
    assert_eq!(scaler.exit_code(MINUTE).await, Some(0));
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shrinking_while_long_tasks_run_neither_redelivers_nor_loses_a_task() {
    let queue = unique_queue("shrink");
    let dir = scratch("shrink");
    let mut scaler = autoscaler(
        &queue,
        &dir,
        "--min 0 --max 6 --tasks-per-worker 1 --scale-down-window 1 --idle-to-zero 2",
        &["worker", "--queue", &queue, "--concurrency", "1"],
    );
    scaler.metrics_url().await;
    let mut tasks: Vec<Value> = (0..2)
        .map(|i| json!({"id": format!("long-{i}"), "kind": "sleep", "args": {"ms": 7000}}))
        .collect();
    tasks.extend(
        (0..24).map(|i| json!({"id": format!("short-{i}"), "kind": "sleep", "args": {"ms": 200}})),
    );
    let file = dir.join("tasks.jsonl");
    write_tasks(&file, &tasks);
    let done = submit_file(&queue, &file, &["--wait"]).await;
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let results = read_results(&done.stdout);
    assert_eq!(results.len(), 26, "every task exactly once");
    let ids: BTreeSet<&str> = results
        .iter()
        .map(|r| r["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 26);
    assert!(
        results
            .iter()
            .all(|r| r["status"] == "succeeded" && r["attempt"] == 1),
        "no task ran twice: {results:?}"
    );
    let log = scaler.log_text();
    // The first stop happened before the long tasks finished: the pool shrank around them.
    let first_stop = log
        .lines()
        .find(|l| l.contains("stopping worker"))
        .expect("the pool shrank");
    let stopped_at = format!("{}Z", &first_stop[..23]);
    let long_finished = results
        .iter()
        .filter(|r| r["task_id"].as_str().unwrap().starts_with("long"))
        .map(|r| r["finished_at"].as_str().unwrap().to_string())
        .min()
        .unwrap();
    assert!(
        stopped_at < long_finished,
        "stopped at {stopped_at}, long tasks finished at {long_finished}"
    );
    assert!(!log.contains("returning it to the queue"), "{log}");
    scaler.signal(Signal::SIGTERM);
    assert_eq!(scaler.exit_code(MINUTE).await, Some(0));
    assert_eq!(
        dead_letter_count(&queue).await,
        0,
        "nothing was dead-lettered"
    );
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_churn_does_not_spend_the_delivery_limit_of_tasks_never_started() {
    // RabbitMQ 3.10 counts every return of a message toward x-delivery-limit (10). A worker that
    // held tasks it had not started would return them at each stop, and after ten stops they
    // would be dead-lettered without ever running.
    let queue = unique_queue("churn");
    let dir = scratch("churn");
    let tasks: Vec<Value> = (0..12)
        .map(|_| json!({"kind": "sleep", "args": {"ms": 150}}))
        .collect();
    let file = dir.join("tasks.jsonl");
    write_tasks(&file, &tasks);
    let submitted = submit_file(&queue, &file, &[]).await;
    assert_eq!(submitted.code, Some(0), "{}", submitted.stderr);
    for round in 0..12 {
        let mut worker =
            WorkerProcess::start(&queue, &dir, &["--concurrency", "1", "--grace", "10"]);
        worker.wait_for_log("task started", 1, MINUTE).await;
        worker.signal(Signal::SIGTERM);
        assert_eq!(worker.exit_code(MINUTE).await, Some(0), "round {round}");
    }
    let waited = run_warren(
        &["wait", submitted.stdout.trim(), "--timeout", "20"],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(waited.code, Some(0), "{}", waited.stderr);
    let results = read_results(&waited.stdout);
    assert_eq!(results.len(), 12);
    assert!(results.iter().all(|r| r["attempt"] == 1), "{results:?}");
    assert_eq!(
        dead_letter_count(&queue).await,
        0,
        "nothing was dead-lettered"
    );
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_that_cannot_start_stop_the_pool_from_growing() {
    let queue = unique_queue("crash");
    let dir = scratch("crash");
    let mut scaler = autoscaler(
        &queue,
        &dir,
        "--min 0 --max 5 --tasks-per-worker 1",
        // Refused credentials: the worker exits 2 at once with a clear message.
        &[
            "--amqp-url",
            "amqp://guest:wrong@127.0.0.1:5672/%2f",
            "worker",
            "--queue",
            &queue,
        ],
    );
    let url = scaler.metrics_url().await;
    let file = dir.join("tasks.jsonl");
    write_tasks(
        &file,
        &(0..20).map(|_| json!({"kind": "echo"})).collect::<Vec<_>>(),
    );
    assert_eq!(submit_file(&queue, &file, &[]).await.code, Some(0));
    scaler.wait_for_log("not growing the pool", 1, MINUTE).await;
    gauge_reaches(
        &url,
        &format!("warren_autoscaler_pool_unhealthy{{pool=\"{queue}\"}}"),
        1.0,
        MINUTE,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = scaler.log_text();
    assert!(
        log.contains("refused the login"),
        "the workers' own error is visible: {log}"
    );
    assert!(
        log.matches("worker started").count() <= 5,
        "crashing workers are not restarted in a loop: {log}"
    );
    scaler.signal(Signal::SIGTERM);
    assert_eq!(scaler.exit_code(MINUTE).await, Some(0));
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_decides_but_changes_nothing() {
    let queue = unique_queue("dryrun");
    let dir = scratch("dryrun");
    let file = dir.join("tasks.jsonl");
    write_tasks(
        &file,
        &(0..8).map(|_| json!({"kind": "echo"})).collect::<Vec<_>>(),
    );
    assert_eq!(submit_file(&queue, &file, &[]).await.code, Some(0));
    let mut scaler = autoscaler(
        &queue,
        &dir,
        "--max 4 --dry-run",
        &["worker", "--queue", &queue],
    );
    let url = scaler.metrics_url().await;
    gauge_reaches(
        &url,
        &format!("warren_autoscaler_desired_replicas{{pool=\"{queue}\"}}"),
        2.0,
        MINUTE,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = scaler.log_text();
    assert!(log.contains("reason=\"wake_from_zero\""), "{log}");
    assert!(!log.contains("worker started"), "{log}");
    // Marked as a dry run, and said once rather than at every poll.
    assert!(log.contains("dry_run=true"), "{log}");
    assert_eq!(log.matches("would scale").count(), 1, "{log}");
    scaler.signal(Signal::SIGTERM);
    assert_eq!(scaler.exit_code(MINUTE).await, Some(0));
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_command_that_cannot_run_fails_at_once_with_advice() {
    let mut cmd = warren();
    cmd.env("PATH", "/usr/bin:/bin").args([
        "autoscale",
        "--backend",
        "local",
        "--metrics-addr",
        "127.0.0.1:0",
        "--",
        "warren",
        "worker",
    ]);
    let out = tokio::time::timeout(MINUTE, cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cargo install --path ."), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autoscaler_declares_its_queue_so_a_submit_without_create_queue_is_accepted() {
    let queue = unique_queue("declares");
    let dir = scratch("declares");
    // A worker command that names another queue would never take this pool's tasks: refused.
    let mut mismatched = autoscaler(
        &queue,
        &dir,
        "--min 0 --max 1",
        &["worker", "--queue", "other.queue"],
    );
    assert_eq!(
        mismatched.exit_code(MINUTE).await,
        Some(2),
        "{}",
        mismatched.log_text()
    );
    assert!(
        mismatched.log_text().contains("WARREN_QUEUE"),
        "{}",
        mismatched.log_text()
    );
    // Without --queue, the pool's workers consume the pool's queue (WARREN_QUEUE).
    let mut scaler = autoscaler(&queue, &dir, "--min 0 --max 1", &["worker"]);
    eventually(MINUTE, "the autoscaler to declare its queue", || async {
        let status = run_warren(&["status", "--queue", &queue], None, MINUTE).await;
        (status.code == Some(0)).then_some(())
    })
    .await;
    let file = dir.join("tasks.jsonl");
    write_tasks(&file, &[json!({"kind": "echo", "args": 1})]);
    let done = run_warren(
        &[
            "submit",
            "--queue",
            &queue,
            "--file",
            file.to_str().unwrap(),
            "--wait",
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    assert_eq!(read_results(&done.stdout).len(), 1);
    scaler.signal(Signal::SIGTERM);
    assert_eq!(scaler.exit_code(MINUTE).await, Some(0));
    delete_queues(&queue).await;
}
