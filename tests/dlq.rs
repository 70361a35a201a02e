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
        replayed.stderr.contains("replayed 2 task(s)")
            && replayed.stderr.contains("into their own batches"),
        "{}",
        replayed.stderr
    );
    let empty = dlq(&["list", "--queue", &queue]).await;
    assert!(
        empty.stdout.contains("no matching dead letters"),
        "{}",
        empty.stdout
    );

    // The batch was not collected yet: its collector writes the rejections, waits for the
    // replays, and writes their results after them; the later line for a task is the one that counts.
    let original = run_warren(&["wait", &fixable], None, MINUTE).await;
    assert!(original.code.is_some(), "{}", original.stderr);
    let lines = read_results(&original.stdout);
    assert_eq!(
        lines.len(),
        5,
        "3 answers and 2 replayed results: {lines:?}"
    );
    let last = |seq: u64| {
        lines
            .iter()
            .rev()
            .find(|r| r["seq"] == seq)
            .cloned()
            .unwrap()
    };
    for seq in [0, 1] {
        let r = last(seq);
        assert_eq!(
            (r["status"].as_str(), r["replayed"].as_u64()),
            (Some("succeeded"), Some(1)),
            "{r}"
        );
        assert_eq!(r["output"]["stdout"], format!("{seq}\n"));
    }
    assert_eq!(last(2)["status"], "succeeded");

    // A task whose batch was already collected goes to a batch of its own.
    let gone = submit_tasks(
        &queue,
        &dir,
        "c.jsonl",
        &[json!({"id": "odd", "kind": "no-such-kind"})],
    )
    .await;
    let answered = run_warren(&["wait", &gone], None, MINUTE).await;
    assert_eq!(answered.code, Some(1), "{}", answered.stderr);
    eventually(MINUTE, "the dead task", || async {
        dlq(&["list", "--queue", &queue, "--batch", &gone])
            .await
            .stdout
            .contains("1 dead letter(s)")
            .then_some(())
    })
    .await;
    let replayed = dlq(&["replay", "--queue", &queue, "--batch", &gone]).await;
    let again = replayed.stdout.trim().to_string();
    assert!(
        replayed.stderr.contains(&format!("warren wait {again}")),
        "{}",
        replayed.stderr
    );
    let rerun = run_warren(&["wait", &again], None, MINUTE).await;
    let rerun = read_results(&rerun.stdout);
    assert_eq!(rerun.len(), 1, "{rerun:?}");
    assert_eq!(
        (rerun[0]["task_id"].as_str(), rerun[0]["replayed"].as_u64()),
        (Some("odd"), Some(1))
    );
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_reaches_a_wait_that_is_already_collecting_its_batch() {
    let queue = unique_queue("dlqlive");
    let dir = scratch("dlqlive");
    let first = WorkerProcess::start(&queue, &dir, &[]);
    let batch = submit_tasks(
        &queue,
        &dir,
        "a.jsonl",
        &[
            json!({"id": "fix-me", "kind": "exec", "args": {"argv": ["sh", "-c", "echo fixed"]}}),
            json!({"id": "slow", "kind": "sleep", "args": {"ms": 4000}}),
        ],
    )
    .await;
    let out = dir.join("results.jsonl");
    let mut waiting = WorkerProcess::spawn(
        &["wait", &batch, "--output", out.to_str().unwrap()],
        &dir,
        &[],
    );
    eventually(MINUTE, "the rejection written", || async {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("unknown_kind")
            .then_some(())
    })
    .await;
    // The fix: the old worker finishes its sleep and leaves; a worker that may run sh comes.
    first.signal(nix::sys::signal::Signal::SIGTERM);
    first.wait_for_log("shutdown requested", 1, MINUTE).await;
    let _fixed = WorkerProcess::start(&queue, &dir, &["--allow-exec", "sh"]);
    let replayed = dlq(&["replay", "--queue", &queue, "--batch", &batch]).await;
    assert!(
        replayed.stderr.contains("into their own batches"),
        "{}",
        replayed.stderr
    );
    assert!(
        waiting.exit_code(MINUTE).await.is_some(),
        "{}",
        waiting.log_text()
    );
    let lines = read_results(&std::fs::read_to_string(&out).unwrap());
    let last = lines
        .iter()
        .rev()
        .find(|r| r["task_id"] == "fix-me")
        .unwrap();
    assert_eq!(last["status"], "succeeded", "{lines:?}");
    assert_eq!(last["output"]["stdout"], "fixed\n");
    assert_eq!(lines.len(), 3, "{lines:?}");
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_part_way_leaves_a_named_batch_that_wait_collects() {
    let queue = unique_queue("replaykill");
    let dir = scratch("replaykill");
    let total = 1500;
    // A worker without exec sets every task aside; its batch is then collected, so it is gone.
    let mut refusing = WorkerProcess::start(&queue, &dir, &["--concurrency", "16"]);
    let tasks: Vec<Value> = (0..total)
        .map(|i| json!({"kind": "exec", "args": {"argv": ["true"]}, "id": format!("t{i}")}))
        .collect();
    let batch = submit_tasks(&queue, &dir, "tasks.jsonl", &tasks).await;
    let waited = run_warren(&["wait", &batch, "--output", "/dev/null"], None, MINUTE * 3).await;
    assert_eq!(waited.code, Some(1), "{}", waited.stderr);
    refusing.signal(nix::sys::signal::Signal::SIGTERM);
    refusing.exit_code(MINUTE).await;
    let _runner = WorkerProcess::start(
        &queue,
        &dir,
        &["--concurrency", "16", "--allow-exec", "true"],
    );
    // The replay names its new batch before sending anything; it is killed part-way.
    let mut replay = WorkerProcess::spawn(&["dlq", "replay", "--queue", &queue], &dir, &[]);
    replay.wait_for_log("into the new batch", 1, MINUTE).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    replay.signal(nix::sys::signal::Signal::SIGKILL);
    replay.exit_code(MINUTE).await;
    let log = replay.log_text();
    let new_batch = log
        .split("into the new batch ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the new batch is named")
        .to_string();
    // What was published is a batch `warren wait` completes: every task it counts has a result.
    let out = dir.join("replayed.jsonl");
    let collected = run_warren(
        &["wait", &new_batch, "--output", out.to_str().unwrap()],
        None,
        MINUTE * 2,
    )
    .await;
    assert_eq!(collected.code, Some(0), "{}", collected.stderr);
    let results = read_results(&std::fs::read_to_string(&out).unwrap());
    assert!(
        !results.is_empty() && results.len() < total,
        "killed part-way: {}",
        results.len()
    );
    // Nothing is lost: the rest still wait in the dead-letter queue (one may be in both, when
    // the kill came between its publish and its removal).
    let left = dead_letter_count(&queue).await;
    assert!(
        (total..=total + 1).contains(&(results.len() + left)),
        "{} replayed + {left} left of {total}",
        results.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_batch_dead_letters_what_is_not_its_result_and_reads_on() {
    use warren_submitter::{SubmitOptions, Submitter, TaskSpec};
    let queue = unique_queue("openbatch");
    let dir = scratch("openbatch");
    let _worker = WorkerProcess::start(&queue, &dir, &[]);
    let mut submitter = Submitter::new(
        warren_broker::AmqpSettings::new(AMQP_URL),
        "open-batch-test".to_string(),
    );
    let mut options = SubmitOptions::new(queue.clone());
    options.create_queue = true;
    let mut open = submitter.open_batch(&options).await.unwrap();
    // Anyone allowed to publish to the result queue could put this there before the real result.
    let (conn, channel) = raw_channel().await;
    let results = warren_broker::topology::result_queue(open.id());
    publish_raw(&channel, &results, b"not a result").await;
    let spec: TaskSpec = serde_json::from_value(json!({"kind": "echo", "args": {"n": 1}})).unwrap();
    let seq = open.submit(&spec).await.unwrap();
    let result = tokio::time::timeout(MINUTE, open.next_result())
        .await
        .expect("the real result within a minute")
        .unwrap();
    assert_eq!(
        result.seq,
        Some(seq),
        "the stranger is skipped, the result read"
    );
    open.close().await.unwrap();
    let dead = drain(&channel, &format!("{queue}.dead")).await;
    assert_eq!(dead.len(), 1, "the stranger is kept, not dropped");
    assert_eq!(dead[0].data, b"not a result");
    assert_eq!(
        header(&dead[0], "x-warren-dead-reason").as_deref(),
        Some("unreadable_result")
    );
    let _ = conn.close(200, "bye".into()).await;
    delete_queues(&queue).await;
}
