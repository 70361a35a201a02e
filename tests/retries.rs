//! Per-task retries: a failed attempt waits out its backoff in a delay queue of the broker (never
//! as an unacknowledged message in a worker), then runs again; the final result keeps every
//! earlier attempt's error.

mod common;

use common::*;
use serde_json::json;
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_are_retried_with_backoff_and_their_errors_kept() {
    let queue = unique_queue("retries");
    let dir = scratch("retries");
    let d = dir.to_str().unwrap();
    // Fails twice, then succeeds: it counts its own runs in a file.
    let flaky = "n=$(cat count 2>/dev/null || echo 0); n=$((n+1)); echo $n > count; echo run $n >&2; [ $n -ge 3 ]";
    std::fs::create_dir_all(dir.join("f")).unwrap();
    std::fs::create_dir_all(dir.join("g")).unwrap();
    let tasks = [
        json!({"id": "flaky", "kind": "exec", "max_retries": 3, "retry_backoff_s": 0.2,
               "args": {"argv": ["sh", "-c", flaky], "cwd": format!("{d}/f")}}),
        json!({"id": "hopeless", "kind": "exec", "max_retries": 1, "retry_backoff_s": 0.2,
               "args": {"argv": ["sh", "-c", "exit 4"]}}),
        json!({"id": "final-code", "kind": "exec", "max_retries": 5, "retry_backoff_s": 0.2,
               "args": {"argv": ["sh", "-c", "n=$(cat count 2>/dev/null || echo 0); echo $((n+1)) > count; exit 2"],
                        "cwd": format!("{d}/g"), "retry_exit_codes": [75]}}),
        json!({"id": "no-retries", "kind": "exec", "args": {"argv": ["false"]}}),
    ];
    let file = dir.join("tasks.jsonl");
    write_tasks(&file, &tasks);
    let worker = WorkerProcess::start(
        &queue,
        &dir,
        &["--allow-exec", "sh", "--allow-exec", "false"],
    );
    let out = dir.join("results.jsonl");
    let done = submit_file(
        &queue,
        &file,
        &["--wait", "--output", out.to_str().unwrap()],
    )
    .await;
    assert_eq!(done.code, Some(1), "{}", done.stderr);
    let results = by_task_id(read_results(&std::fs::read_to_string(&out).unwrap()));
    assert_eq!(results.len(), 4, "one final result per task: {results:?}");

    let flaky = &results["flaky"];
    assert_eq!(flaky["status"], "succeeded", "{flaky}");
    assert_eq!(flaky["attempt"], 3);
    let earlier = flaky["previous_errors"].as_array().unwrap();
    assert_eq!(earlier.len(), 2, "{flaky}");
    assert!(earlier.iter().all(|e| e["kind"] == "exit_status"));

    let hopeless = &results["hopeless"];
    assert_eq!(
        (hopeless["status"].as_str(), hopeless["attempt"].as_u64()),
        (Some("failed"), Some(2))
    );
    assert_eq!(hopeless["previous_errors"].as_array().unwrap().len(), 1);

    // An exit code the task did not list as retryable ends it at once.
    let last = &results["final-code"];
    assert_eq!(
        (last["status"].as_str(), last["attempt"].as_u64()),
        (Some("failed"), Some(1))
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("g/count")).unwrap().trim(),
        "1"
    );
    assert_eq!(results["no-retries"]["attempt"], 1);

    // The waits were the broker's: the worker set each failed attempt aside and acked it.
    assert_eq!(
        worker.log_text().matches("retrying in").count(),
        3,
        "{}",
        worker.log_text()
    );
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_retry_settings_are_named_before_anything_is_sent() {
    let queue = unique_queue("badretry");
    let dir = scratch("badretry");
    let file = dir.join("tasks.jsonl");
    write_tasks(
        &file,
        &[
            json!({"kind": "echo"}),
            json!({"kind": "echo", "max_retries": 1000}),
        ],
    );
    let done = submit_file(&queue, &file, &[]).await;
    assert_eq!(done.code, Some(2));
    assert!(
        done.stderr.contains("line 2") && done.stderr.contains("max_retries"),
        "{}",
        done.stderr
    );
    let file = dir.join("tasks2.jsonl");
    write_tasks(&file, &[json!({"kind": "echo", "retry_backoff_s": -1})]);
    let done = submit_file(&queue, &file, &[]).await;
    assert_eq!(done.code, Some(2));
    assert!(done.stderr.contains("retry_backoff_s"), "{}", done.stderr);
}
