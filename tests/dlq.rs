//! `warren dlq`: see what a task queue set aside and why, replay tasks after a fix (their results
//! reach their batch), and drop what is not wanted.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

async fn dlq(args: &[&str]) -> Finished {
    let mut all = vec!["dlq"];
    all.extend_from_slice(args);
    run_warren(&all, None, MINUTE).await
}

async fn submit_tasks(queue: &str, dir: &std::path::Path, name: &str, tasks: &[Value]) -> String {
    let file = dir.join(name);
    write_tasks(&file, tasks);
    let done = submit_file(queue, &file, &[]).await;
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    done.stdout.trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_tasks_are_listed_shown_replayed_after_a_fix_and_purged() {
    let queue = unique_queue("dlq");
    let dir = scratch("dlq");
    // A worker that cannot run `exec` sets such tasks aside (unknown_kind).
    let mut first = WorkerProcess::start(&queue, &dir, &[]);
    let exec =
        |i: u32| json!({"kind": "exec", "args": {"argv": ["sh", "-c", format!("echo {i}")]}});
    let fixable = submit_tasks(
        &queue,
        &dir,
        "a.jsonl",
        &[exec(0), exec(1), json!({"kind": "echo", "args": 2})],
    )
    .await;
    let unwanted = submit_tasks(&queue, &dir, "b.jsonl", &[exec(9)]).await;
    eventually(MINUTE, "three dead letters", || async {
        let listed = dlq(&["list", "--queue", &queue]).await;
        listed.stdout.contains("3 dead letter(s)").then_some(())
    })
    .await;
    let listed = dlq(&["list", "--queue", &queue]).await;
    assert_eq!(listed.code, Some(0), "{}", listed.stderr);
    let rows: Vec<&str> = listed
        .stdout
        .lines()
        .filter(|l| l.starts_with("unknown_kind"))
        .collect();
    assert_eq!(rows.len(), 2, "{}", listed.stdout);
    assert!(
        rows.iter()
            .any(|r| r.contains(&fixable) && r.ends_with(" 2")),
        "{}",
        listed.stdout
    );
    assert!(
        rows.iter()
            .any(|r| r.contains(&unwanted) && r.ends_with(" 1")),
        "{}",
        listed.stdout
    );

    let shown = dlq(&["show", "--queue", &queue, "--batch", &unwanted]).await;
    let letters = read_results(&shown.stdout);
    assert_eq!(letters.len(), 1, "{}", shown.stdout);
    assert_eq!(letters[0]["reason"], "unknown_kind");
    assert_eq!(letters[0]["batch"], unwanted.as_str());
    assert_eq!(letters[0]["envelope"]["args"]["argv"][2], "echo 9");
    assert!(
        letters[0]["envelope"].get("token").is_none(),
        "{}",
        letters[0]
    );

    // Purging asks first, then drops only what the filter names.
    let asked = dlq(&["purge", "--queue", &queue, "--batch", &unwanted]).await;
    assert_eq!(asked.code, Some(2));
    assert!(asked.stderr.contains("would drop 1"), "{}", asked.stderr);
    let purged = dlq(&["purge", "--queue", &queue, "--batch", &unwanted, "--yes"]).await;
    assert!(purged.stderr.contains("dropped 1"), "{}", purged.stderr);

    // The fix: a worker that may run sh. Replay runs the two tasks again.
    first.signal(nix::sys::signal::Signal::SIGTERM);
    first.exit_code(MINUTE).await;
    let _fixed = WorkerProcess::start(&queue, &dir, &["--allow-exec", "sh"]);
    let replayed = dlq(&["replay", "--queue", &queue]).await;
    assert_eq!(replayed.code, Some(0), "{}", replayed.stderr);
    assert!(
        replayed.stderr.contains("replayed 2 task(s)"),
        "{}",
        replayed.stderr
    );
    let again = replayed.stdout.trim().to_string();
    assert!(
        replayed.stderr.contains(&format!("warren wait {again}")),
        "{}",
        replayed.stderr
    );
    let empty = dlq(&["list", "--queue", &queue]).await;
    assert!(
        empty.stdout.contains("no matching dead letters"),
        "{}",
        empty.stdout
    );

    // The original batch was answered (two rejections, one success); the replay is a batch of
    // its own, with the tasks' own ids, and its results are collected like any batch's.
    let original = run_warren(&["wait", &fixable], None, MINUTE).await;
    assert_eq!(
        original.code,
        Some(1),
        "two tasks were rejected: {}",
        original.stderr
    );
    let first_run = read_results(&original.stdout);
    assert_eq!(first_run.len(), 3);
    let (_, second_run) = wait_into(&again, &dir.join("again.jsonl")).await;
    assert_eq!(second_run.len(), 2, "{second_run:?}");
    let originals: Vec<&Value> = first_run
        .iter()
        .filter(|r| r["status"] == "rejected")
        .collect();
    for r in &second_run {
        assert_eq!(r["status"], "succeeded", "{r}");
        assert_eq!(r["replayed"], 1, "{r}");
        assert!(
            originals.iter().any(|o| o["task_id"] == r["task_id"]),
            "{r}"
        );
    }
    delete_queues(&queue).await;
}
