//! End-to-end: `warren logs` of a batch: every attempt of a retried task, readable before any
//! collector ran, followed live, and filtered by task and attempt.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

const MINUTE: Duration = Duration::from_secs(60);

fn records(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON record per line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_of_an_uncollected_batch_is_shown_live_and_afterwards() {
    let queue = unique_queue("logs");
    let dir = scratch("logs");
    let file = dir.join("tasks.jsonl");
    write_tasks(
        &file,
        &[
            json!({"id": "flaky", "kind": "exec", "max_retries": 1, "retry_backoff_s": 0.1,
                   "args": {"argv": ["sh", "-c", "echo \"try failed <b>\" >&2; exit 2"]}}),
            json!({"id": "fine", "kind": "exec", "args": {"argv": ["sh", "-c", "echo ok"]}}),
        ],
    );
    let submitted = submit_file(&queue, &file, &[]).await;
    assert_eq!(submitted.code, Some(0), "{}", submitted.stderr);
    let batch = submitted.stdout.trim().to_string();

    // A follower started before any worker sees the records as they are appended.
    let mut follower = warren()
        .args(["logs", &batch, "--follow", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut followed = tokio::io::BufReader::new(follower.stdout.take().unwrap()).lines();
    let _worker = WorkerProcess::start(&queue, &dir, &["--allow-exec", "sh"]);
    let mut live = Vec::new();
    while live.len() < 3 {
        let line = tokio::time::timeout(MINUTE, followed.next_line())
            .await
            .expect("a record within a minute")
            .unwrap()
            .expect("the follower keeps going");
        live.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    let _ = follower.kill().await;

    // Nobody collected the batch: its records are there all the same, each attempt once.
    let all = run_warren(&["logs", &batch, "--json"], None, MINUTE).await;
    assert_eq!(all.code, Some(0), "{}", all.stderr);
    let all = records(&all.stdout);
    assert_eq!(all.len(), 3, "{all:?}");
    let mut live_keys: Vec<String> = live
        .iter()
        .map(|r| format!("{} {}", r["task_id"], r["attempt"]))
        .collect();
    let mut all_keys: Vec<String> = all
        .iter()
        .map(|r| format!("{} {}", r["task_id"], r["attempt"]))
        .collect();
    live_keys.sort();
    all_keys.sort();
    assert_eq!(live_keys, all_keys);

    let flaky = run_warren(&["logs", &batch, "--task", "flaky", "--json"], None, MINUTE).await;
    let flaky = records(&flaky.stdout);
    assert_eq!(flaky.len(), 2, "{flaky:?}");
    assert_eq!(
        (flaky[0]["attempt"].clone(), flaky[0]["next"].clone()),
        (json!(1), json!("retry"))
    );
    assert_eq!(
        (flaky[1]["attempt"].clone(), flaky[1]["next"].clone()),
        (json!(2), json!("result"))
    );
    assert_eq!(flaky[1]["previous_errors"][0]["kind"], "exit_status");
    let second = run_warren(
        &["logs", &batch, "--task", "flaky", "--attempt", "2"],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(second.stdout.matches("== ").count(), 1, "{}", second.stdout);
    assert!(
        second.stdout.contains("earlier attempt: exit_status"),
        "{}",
        second.stdout
    );
    // Task output is shown as text, as it was written.
    assert!(
        second.stdout.contains("try failed <b>"),
        "{}",
        second.stdout
    );

    let nothing = run_warren(
        &["logs", &batch, "--task", "fine", "--failed"],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(nothing.code, Some(0));
    assert!(
        nothing.stdout.is_empty() && nothing.stderr.contains("match these filters"),
        "{}",
        nothing.stderr
    );
    delete_queues(&queue).await;
}

/// A group of records in one message (what a busy worker writes) is read record by record, and
/// an unreadable one among them hides no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_records_in_one_message_is_read_record_by_record() {
    use warren_broker::protocol::{self, AttemptNext, AttemptRecord, TaskStatus};
    let batch = protocol::new_id();
    let record = |task: &str| AttemptRecord {
        v: protocol::PROTOCOL_VERSION,
        batch: batch.clone(),
        task_id: task.into(),
        seq: Some(0),
        kind: "exec".into(),
        labels: Default::default(),
        attempt: 1,
        status: TaskStatus::Succeeded,
        error: None,
        next: AttemptNext::Result,
        args: json!({"argv": ["true"]}),
        output: json!({"exit_code": 0, "stdout": "", "stderr": ""}),
        worker: "w".into(),
        host: "h".into(),
        started_at: "2026-01-01T00:00:00Z".into(),
        finished_at: "2026-01-01T00:00:01Z".into(),
        duration_s: 1.0,
        previous_errors: Vec::new(),
    };
    let body = protocol::encode_attempt_group(&[
        protocol::encode(&record("first")),
        b"\x81\xa1v\x05".to_vec(),
        protocol::encode(&record("second")),
    ]);
    let (_conn, channel) = raw_channel().await;
    // The stream exists once any submitter or worker declared it; `warren logs` declares it too.
    let none = run_warren(&["logs", &batch, "--json"], None, MINUTE).await;
    assert_eq!(none.code, Some(0), "{}", none.stderr);
    let stream = warren_broker::topology::logs_stream();
    channel
        .basic_publish(
            "".into(),
            stream.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            &body,
            lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_type(protocol::MESSAGE_TYPE_ATTEMPTS.into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let read = run_warren(&["logs", &batch, "--json"], None, MINUTE).await;
    assert_eq!(read.code, Some(0), "{}", read.stderr);
    let tasks: Vec<Value> = records(&read.stdout)
        .iter()
        .map(|r| r["task_id"].clone())
        .collect();
    assert_eq!(
        tasks,
        vec![json!("first"), json!("second")],
        "{}",
        read.stderr
    );
}
