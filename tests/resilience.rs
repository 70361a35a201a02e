//! End-to-end: nothing is lost when workers, submitters or connections die.

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

const MINUTE: Duration = Duration::from_secs(60);

fn sleep_tasks(n: usize, ms: u64) -> Vec<Value> {
    (0..n)
        .map(|_| json!({"kind": "sleep", "args": {"ms": ms}}))
        .collect()
}

async fn submit_only(queue: &str, dir: &std::path::Path, tasks: &[Value]) -> String {
    let file = dir.join(format!("tasks-{}.jsonl", uuid::Uuid::now_v7().simple()));
    write_tasks(&file, tasks);
    let done = submit_file(queue, &file, &[]).await;
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    done.stdout.trim().to_string()
}

fn seqs(results: &[Value]) -> BTreeSet<u64> {
    results
        .iter()
        .map(|r| r["seq"].as_u64().expect("seq"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_task_loses_nothing() {
    let queue = unique_queue("kill9");
    let dir = scratch("kill9");
    let mut first = WorkerProcess::start(&queue, &dir, &["--concurrency", "2"]);
    let batch = submit_only(&queue, &dir, &sleep_tasks(4, 1500)).await;
    first.wait_for_log("task started", 2, MINUTE).await;
    first.signal(Signal::SIGKILL);
    first.exit_code(MINUTE).await;
    let second = WorkerProcess::start(&queue, &dir, &["--concurrency", "4"]);
    let waited = run_warren(&["wait", &batch], None, MINUTE).await;
    assert_eq!(waited.code, Some(0), "{}", waited.stderr);
    let results = read_results(&waited.stdout);
    assert_eq!(results.len(), 4);
    assert!(results.iter().all(|r| r["status"] == "succeeded"));
    let retried: Vec<&Value> = results.iter().filter(|r| r["attempt"] == 2).collect();
    assert_eq!(
        retried.len(),
        2,
        "the two killed tasks ran again, as attempt 2: {results:?}"
    );
    assert!(second.log_text().contains("attempt=2"));
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_outlive_a_killed_submitter_and_wait_collects_them() {
    let queue = unique_queue("subkill");
    let dir = scratch("subkill");
    let file = dir.join("tasks.jsonl");
    let tasks: Vec<Value> = (0..100)
        .map(|i| json!({"kind": "echo", "args": {"i": i}}))
        .collect();
    write_tasks(&file, &tasks);
    // No worker yet: the submitter publishes, prints the batch id and waits...
    let mut submitter = warren()
        .args([
            "submit",
            "--create-queue",
            "--queue",
            &queue,
            "--file",
            file.to_str().unwrap(),
            "--wait",
            "--print-batch-id",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(submitter.stdout.take().unwrap()).lines();
    let batch = tokio::time::timeout(MINUTE, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .expect("batch id");
    // ...and dies.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(submitter.id().unwrap() as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    let _ = submitter.wait().await;
    let _worker = WorkerProcess::start(&queue, &dir, &[]);
    let (_, results) = wait_into(&batch, &dir.join("later.jsonl")).await;
    assert_eq!(seqs(&results), (0..100).collect());
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_and_killed_waits_leave_the_rest_for_the_next_one() {
    let queue = unique_queue("rewait");
    let dir = scratch("rewait");
    let batch = submit_only(&queue, &dir, &sleep_tasks(200, 25)).await;
    let worker = WorkerProcess::start(&queue, &dir, &["--concurrency", "2"]);
    worker.wait_for_log("consuming", 1, MINUTE).await;
    // A wait that gives up: its results are recorded as collected.
    let first = dir.join("first.jsonl");
    let stopped = run_warren(
        &[
            "wait",
            &batch,
            "--timeout",
            "0.8",
            "--output",
            first.to_str().unwrap(),
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(
        stopped.code,
        Some(3),
        "incomplete wait exits 3: {}",
        stopped.stderr
    );
    assert!(
        stopped.stderr.contains(&format!("warren wait {batch}")),
        "{}",
        stopped.stderr
    );
    let first = read_results(&std::fs::read_to_string(&first).unwrap());
    assert!(
        !first.is_empty() && first.len() < 200,
        "partial: {}",
        first.len()
    );
    // A wait that is killed outright.
    let second_path = dir.join("second.jsonl");
    let mut killed = warren()
        .args(["wait", &batch, "--output", second_path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    killed.start_kill().unwrap();
    let _ = killed.wait().await;
    let second = read_results(&std::fs::read_to_string(&second_path).unwrap_or_default());
    // The last wait collects everything else.
    let third_path = dir.join("third.jsonl");
    let last = run_warren(
        &["wait", &batch, "--output", third_path.to_str().unwrap()],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(last.code, Some(0), "{}", last.stderr);
    let third = read_results(&std::fs::read_to_string(&third_path).unwrap());
    let (s1, s2, s3) = (seqs(&first), seqs(&second), seqs(&third));
    let all: BTreeSet<u64> = s1.iter().chain(&s2).chain(&s3).copied().collect();
    assert_eq!(
        all,
        (0..200).collect(),
        "every result was written by some wait"
    );
    assert!(
        s1.is_disjoint(&s3),
        "what a cleanly stopped wait wrote is not written again"
    );
    assert_eq!(first.len(), s1.len(), "no duplicates within one wait");
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_survives_cut_connections_and_a_broker_outage() {
    let queue = unique_queue("cut");
    let dir = scratch("cut");
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let worker = WorkerProcess::start_with(
        &queue,
        &dir,
        &["--concurrency", "4"],
        &[("WARREN_AMQP_URL", proxy.url().as_str())],
    );
    worker.wait_for_log("consuming", 1, MINUTE).await;
    let batch = submit_only(&queue, &dir, &sleep_tasks(60, 100)).await;
    worker.wait_for_log("task finished", 8, MINUTE).await;
    proxy.cut();
    worker.wait_for_log("consuming", 2, MINUTE).await;
    worker.wait_for_log("task finished", 20, MINUTE).await;
    // The broker is "down" for two seconds: connections are refused.
    proxy.refuse(true);
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.refuse(false);
    let waited = run_warren(&["wait", &batch], None, MINUTE).await;
    assert_eq!(waited.code, Some(0), "{}", waited.stderr);
    let results = read_results(&waited.stdout);
    assert_eq!(seqs(&results), (0..60).collect());
    let log = worker.log_text();
    assert!(log.matches("reconnecting in").count() >= 2, "{log}");
    assert!(log.matches("consuming").count() >= 3, "{log}");
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_tasks_finish() {
    let queue = unique_queue("drain");
    let dir = scratch("drain");
    let mut worker = WorkerProcess::start(&queue, &dir, &["--concurrency", "1", "--grace", "30"]);
    let batch = submit_only(&queue, &dir, &sleep_tasks(2, 1500)).await;
    worker.wait_for_log("task started", 1, MINUTE).await;
    worker.signal(Signal::SIGTERM);
    assert_eq!(worker.exit_code(MINUTE).await, Some(0));
    assert_eq!(
        worker.log_text().matches("task finished").count(),
        1,
        "the running task finished, no new one started"
    );
    let out = dir.join("r.jsonl");
    let partial = run_warren(
        &[
            "wait",
            &batch,
            "--timeout",
            "1",
            "--output",
            out.to_str().unwrap(),
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(partial.code, Some(3));
    let results = read_results(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(results.len(), 1);
    assert_eq!(
        (
            results[0]["status"].as_str(),
            results[0]["attempt"].as_u64()
        ),
        (Some("succeeded"), Some(1))
    );
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_past_the_grace_period_go_back_to_the_queue() {
    let queue = unique_queue("grace");
    let dir = scratch("grace");
    let mut worker = WorkerProcess::start(&queue, &dir, &["--concurrency", "1", "--grace", "0.5"]);
    let batch = submit_only(&queue, &dir, &sleep_tasks(1, 4000)).await;
    worker.wait_for_log("task started", 1, MINUTE).await;
    worker.signal(Signal::SIGTERM);
    assert_eq!(worker.exit_code(Duration::from_secs(10)).await, Some(0));
    assert!(worker.log_text().contains("returning it to the queue"));
    let _next = WorkerProcess::start(&queue, &dir, &[]);
    let waited = run_warren(&["wait", &batch], None, MINUTE).await;
    assert_eq!(waited.code, Some(0), "{}", waited.stderr);
    let results = read_results(&waited.stdout);
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["attempt"], 2);
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submitter_whose_connection_drops_republishes_what_was_unconfirmed() {
    let queue = unique_queue("subcut");
    let dir = scratch("subcut");
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let file = dir.join("tasks.jsonl");
    write_tasks(
        &file,
        &(0..5000)
            .map(|i| json!({"kind": "echo", "args": {"i": i}}))
            .collect::<Vec<_>>(),
    );
    // Cut the submitter's connection part-way through publishing the batch.
    proxy.cut_after_upstream_bytes(300_000);
    let submitted = warren()
        .env("WARREN_AMQP_URL", proxy.url())
        .args([
            "submit",
            "--create-queue",
            "--queue",
            &queue,
            "--file",
            file.to_str().unwrap(),
        ])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&submitted.stderr);
    assert_eq!(submitted.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("publishing interrupted"),
        "the cut happened mid-batch: {stderr}"
    );
    let batch = String::from_utf8_lossy(&submitted.stdout)
        .trim()
        .to_string();
    let _worker = WorkerProcess::start(&queue, &dir, &["--concurrency", "16"]);
    let waited = run_warren(&["wait", &batch], None, MINUTE).await;
    assert_eq!(waited.code, Some(0), "{}", waited.stderr);
    let results = read_results(&waited.stdout);
    assert_eq!(
        seqs(&results),
        (0..5000).collect(),
        "every task arrived despite the cut"
    );
    assert_eq!(
        results.len(),
        5000,
        "duplicates from republishing are written once"
    );
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_whose_connection_drops_reconnects_and_writes_each_result_once() {
    let queue = unique_queue("waitcut");
    let dir = scratch("waitcut");
    let worker = WorkerProcess::start(&queue, &dir, &["--concurrency", "16"]);
    let tasks: Vec<Value> = (0..3000)
        .map(|i| json!({"kind": "echo", "args": {"i": i}}))
        .collect();
    let batch = submit_only(&queue, &dir, &tasks).await;
    worker.wait_for_log("task finished", 3000, MINUTE).await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    // The collector's connection is cut part-way: a whole collection sends about 3 KB upstream.
    proxy.cut_after_upstream_bytes(1_600);
    let waited = warren()
        .env("WARREN_AMQP_URL", proxy.url())
        .args(["wait", &batch])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&waited.stderr);
    assert_eq!(waited.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("collecting interrupted"),
        "the cut happened mid-collection: {stderr}"
    );
    let results = read_results(&String::from_utf8_lossy(&waited.stdout));
    assert_eq!(results.len(), 3000, "each result written once");
    assert_eq!(seqs(&results), (0..3000).collect());
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_gives_each_outage_its_own_retry_budget() {
    // The budget is counted from the failure, not from the start: a wait that has been running
    // longer than --retry-for still rides out a short outage.
    let queue = unique_queue("waitbudget");
    let dir = scratch("waitbudget");
    let batch = submit_only(&queue, &dir, &sleep_tasks(5, 10)).await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let out = dir.join("results.jsonl");
    let mut waiting = WorkerProcess::spawn(
        &[
            "wait",
            &batch,
            "--retry-for",
            "3",
            "--output",
            out.to_str().unwrap(),
        ],
        &dir,
        &[("WARREN_AMQP_URL", proxy.url().as_str())],
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.refuse(true);
    proxy.cut();
    waiting
        .wait_for_log("collecting interrupted", 1, MINUTE)
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.refuse(false);
    let _worker = WorkerProcess::start(&queue, &dir, &[]);
    assert_eq!(
        waiting.exit_code(MINUTE).await,
        Some(0),
        "{}",
        waiting.log_text()
    );
    let results = read_results(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(seqs(&results), (0..5).collect());
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_gives_up_on_a_long_outage_even_after_an_earlier_reconnect_and_says_how_to_resume() {
    let queue = unique_queue("waitgiveup");
    let dir = scratch("waitgiveup");
    let batch = submit_only(&queue, &dir, &sleep_tasks(3, 10)).await;
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let mut waiting = WorkerProcess::spawn(
        &["wait", &batch, "--retry-for", "2"],
        &dir,
        &[("WARREN_AMQP_URL", proxy.url().as_str())],
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A blip it recovers from...
    proxy.cut();
    waiting
        .wait_for_log("collecting interrupted", 1, MINUTE)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // ...then an outage longer than the budget.
    proxy.refuse(true);
    proxy.cut();
    assert_eq!(
        waiting.exit_code(MINUTE).await,
        Some(2),
        "{}",
        waiting.log_text()
    );
    let log = waiting.log_text();
    assert!(log.contains("Gave up after"), "{log}");
    assert!(log.contains(&format!("warren wait {batch}")), "{log}");
    // Nothing was lost: the batch is still there to collect.
    let _worker = WorkerProcess::start(&queue, &dir, &[]);
    let waited = run_warren(&["wait", &batch], None, MINUTE).await;
    assert_eq!(waited.code, Some(0), "{}", waited.stderr);
    assert_eq!(seqs(&read_results(&waited.stdout)), (0..3).collect());
    delete_queues(&queue).await;
}

/// A TCP port that accepts connections and never says a word, as a hung broker or a wrong port.
async fn black_hole() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_that_never_answers_times_out_every_process() {
    let (port, _hole) = black_hole().await;
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    // A queue no management API knows: status cannot fall back on the API's figures for it.
    let queue = unique_queue("blackhole");
    let status = run_warren(
        &[
            "status",
            "--queue",
            &queue,
            "--amqp-url",
            &url,
            "--connect-timeout",
            "1",
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(status.code, Some(2), "{}", status.stderr);
    assert!(
        status
            .stderr
            .contains("did not complete the connection within 1s"),
        "{}",
        status.stderr
    );
    // A broker out of file handles looks exactly like this; the message says how to fix it.
    assert!(
        status.stderr.contains("open-file limit of 65536"),
        "{}",
        status.stderr
    );
    let submitted = run_warren(
        &[
            "submit",
            "--create-queue",
            "--amqp-url",
            &url,
            "--connect-timeout",
            "1",
            "--retry-for",
            "2",
            "exec",
            "--",
            "true",
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(submitted.code, Some(2), "{}", submitted.stderr);
    assert!(
        submitted.stderr.contains("did not complete the connection"),
        "{}",
        submitted.stderr
    );
    let dir = scratch("blackhole");
    let worker = WorkerProcess::start_with(
        "warren.blackhole",
        &dir,
        &["--connect-timeout", "1"],
        &[("WARREN_AMQP_URL", url.as_str())],
    );
    // Every failed attempt is logged.
    worker
        .wait_for_log("did not complete the connection", 2, MINUTE)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_task_queue_does_not_stop_workers() {
    let queue = unique_queue("qdeleted");
    let dir = scratch("qdeleted");
    let mut worker = WorkerProcess::start(&queue, &dir, &[]);
    worker.wait_for_log("consuming", 1, MINUTE).await;
    let (conn, channel) = raw_channel().await;
    channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    worker
        .wait_for_log("was the queue deleted?", 1, MINUTE)
        .await;
    // It declared the queue again and consumes from it.
    worker.wait_for_log("consuming", 2, MINUTE).await;
    assert!(
        worker.child.try_wait().unwrap().is_none(),
        "{}",
        worker.log_text()
    );
    let batch = submit_only(&queue, &dir, &sleep_tasks(3, 10)).await;
    let waited = run_warren(&["wait", &batch], None, MINUTE).await;
    assert_eq!(waited.code, Some(0), "{}", waited.stderr);
    assert_eq!(seqs(&read_results(&waited.stdout)), (0..3).collect());
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_wait_mends_a_half_written_output_file_and_writes_each_result_once() {
    let queue = unique_queue("halfline");
    let dir = scratch("halfline");
    let _worker = WorkerProcess::start(&queue, &dir, &[]);
    let batch = submit_only(&queue, &dir, &sleep_tasks(5, 10)).await;
    // What a `kill -9`'d wait leaves: a result written but not yet checkpointed, then half a line.
    let out = dir.join("results.jsonl");
    std::fs::write(
        &out,
        format!(
            "{}\n{{\"task_id\": \"half\", \"bat",
            json!({"task_id": "t0", "batch": batch, "seq": 0, "status": "succeeded"})
        ),
    )
    .unwrap();
    let (stderr, results) = wait_into(&batch, &out).await;
    assert!(stderr.contains("dropped a partial last line"), "{stderr}");
    assert_eq!(results.len(), 5, "each result exactly once: {results:?}");
    assert_eq!(seqs(&results), (0..5).collect());
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_wait_may_hold_a_batch_and_a_second_says_who_does() {
    let queue = unique_queue("twowaits");
    let dir = scratch("twowaits");
    let batch = submit_only(&queue, &dir, &sleep_tasks(3, 10)).await;
    let first_out = dir.join("first.jsonl");
    let mut first = WorkerProcess::spawn(
        &["wait", &batch, "--output", first_out.to_str().unwrap()],
        &dir,
        &[],
    );
    // The first holds the batch once the management API shows its consumer.
    eventually(MINUTE, "the first wait to consume", || async {
        let body =
            management_get(&format!("/api/queues/{TEST_VHOST}/warren.results.{batch}")).await?;
        body.contains("\"exclusive\":true").then_some(())
    })
    .await;
    let second = run_warren(&["wait", &batch], None, MINUTE).await;
    assert_eq!(second.code, Some(2), "{}", second.stderr);
    assert!(
        second.stderr.contains("being collected by another process")
            && second.stderr.contains("warren-wait@"),
        "{}",
        second.stderr
    );
    let _worker = WorkerProcess::start(&queue, &dir, &[]);
    assert_eq!(
        first.exit_code(MINUTE).await,
        Some(0),
        "{}",
        first.log_text()
    );
    let results = read_results(&std::fs::read_to_string(&first_out).unwrap());
    assert_eq!(seqs(&results), (0..3).collect());
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_waits_started_together_give_one_the_batch_and_tell_the_other_who_has_it() {
    let queue = unique_queue("racewaits");
    let dir = scratch("racewaits");
    // Long enough for the management API to show the holder (its statistics come every 5 s).
    let batch = submit_only(&queue, &dir, &sleep_tasks(3, 10_000)).await;
    let outs = [dir.join("a.jsonl"), dir.join("b.jsonl")];
    let mut waits: Vec<WorkerProcess> = outs
        .iter()
        .map(|out| {
            WorkerProcess::spawn(
                &["wait", &batch, "--output", out.to_str().unwrap()],
                &dir,
                &[],
            )
        })
        .collect();
    let _worker = WorkerProcess::start(&queue, &dir, &[]);
    let mut codes = Vec::new();
    for wait in &mut waits {
        codes.push(wait.exit_code(MINUTE).await);
    }
    codes.sort();
    assert_eq!(codes, [Some(0), Some(2)], "one collects, one is refused");
    let refused = waits
        .iter()
        .map(WorkerProcess::log_text)
        .find(|log| log.contains("being collected by another process"))
        .expect("the refused one says why");
    assert!(
        refused.contains("warren-wait@"),
        "it names the holder: {refused}"
    );
    let written: usize = outs
        .iter()
        .map(|o| read_results(&std::fs::read_to_string(o).unwrap_or_default()).len())
        .sum();
    assert_eq!(written, 3, "every result written once, by the holder");
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_is_reported_and_the_batch_goes_through_once_it_clears() {
    let broker = tokio::task::spawn_blocking(common::private_broker::PrivateBroker::start)
        .await
        .unwrap();
    let dir = scratch("alarm");
    let queue = "warren.alarm";
    broker.ctl(&["set_vm_memory_high_watermark", "absolute", "1MB"]);
    let file = dir.join("tasks.jsonl");
    write_tasks(
        &file,
        &(0..5)
            .map(|i| json!({"kind": "echo", "args": i}))
            .collect::<Vec<_>>(),
    );
    let url = broker.url();
    let mut submit = WorkerProcess::spawn(
        &[
            "submit",
            "--create-queue",
            "--queue",
            queue,
            "--file",
            file.to_str().unwrap(),
        ],
        &dir,
        &[("WARREN_AMQP_URL", url.as_str())],
    );
    submit
        .wait_for_log("is blocking publishes", 1, MINUTE)
        .await;
    let management = broker.management_url();
    eventually(MINUTE, "status to show the alarm", || async {
        let status = warren()
            .args(["status", "--queue", queue, "--management-url", &management])
            .env("WARREN_AMQP_URL", &url)
            .output()
            .await
            .ok()?;
        String::from_utf8_lossy(&status.stdout)
            .contains("ALARM: memory alarm")
            .then_some(())
    })
    .await;
    broker.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    assert_eq!(
        submit.exit_code(MINUTE).await,
        Some(0),
        "{}",
        submit.log_text()
    );
    assert!(submit.log_text().contains("accepts publishes again"));
    let batch = std::fs::read_to_string(&submit.log)
        .unwrap()
        .lines()
        .find_map(|l| l.split("as batch ").nth(1).map(str::trim).map(String::from))
        .expect("batch id in the submit log");
    let _worker = WorkerProcess::start_with(queue, &dir, &[], &[("WARREN_AMQP_URL", url.as_str())]);
    let waited = warren()
        .args(["wait", &batch])
        .env("WARREN_AMQP_URL", &url)
        .output()
        .await
        .unwrap();
    assert_eq!(
        waited.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&waited.stderr)
    );
    assert_eq!(
        seqs(&read_results(&String::from_utf8_lossy(&waited.stdout))),
        (0..5).collect()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_that_gives_up_part_way_prints_its_batch_and_resumes_without_resending_what_was_confirmed()
 {
    let queue = unique_queue("resume");
    let dir = scratch("resume");
    let state = dir.join("state");
    let proxy = Proxy::start("127.0.0.1:5672").await;
    let file = dir.join("tasks.jsonl");
    write_tasks(
        &file,
        &(0..5000)
            .map(|i| json!({"kind": "echo", "args": {"i": i}}))
            .collect::<Vec<_>>(),
    );
    // The one connection it gets is cut part-way; the broker then stays unreachable.
    proxy.accept_only(1);
    proxy.cut_after_upstream_bytes(900_000);
    let submitted = warren()
        .env("WARREN_AMQP_URL", proxy.url())
        .env("WARREN_STATE_DIR", &state)
        .args([
            "submit",
            "--create-queue",
            "--queue",
            &queue,
            "--retry-for",
            "2",
            "--file",
            file.to_str().unwrap(),
        ])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&submitted.stderr);
    assert_eq!(submitted.status.code(), Some(2), "{stderr}");
    let batch = String::from_utf8_lossy(&submitted.stdout)
        .trim()
        .to_string();
    assert!(!batch.is_empty(), "the batch id is printed: {stderr}");
    let how = format!("warren submit --resume {batch} --file {}", file.display());
    assert!(stderr.contains(&how), "{stderr}");
    assert!(
        stderr.contains("were confirmed by RabbitMQ and will run"),
        "{stderr}"
    );
    // Another file with as many tasks is not the batch.
    let edited = dir.join("edited.jsonl");
    write_tasks(
        &edited,
        &(0..5000)
            .map(|i| json!({"kind": "echo", "args": {"i": i + 1}}))
            .collect::<Vec<_>>(),
    );
    let refused = warren()
        .env("WARREN_STATE_DIR", &state)
        .args([
            "submit",
            "--create-queue",
            "--resume",
            &batch,
            "--file",
            edited.to_str().unwrap(),
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not the tasks batch"));
    // The journal holds the batch's token: its owner's alone.
    {
        use std::os::unix::fs::PermissionsExt;
        let batches = state.join("batches");
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&batches), 0o700);
        assert_eq!(mode(&batches.join(format!("{batch}.json"))), 0o600);
    }
    // A resume goes to the batch's own queue; naming another is refused, not ignored.
    let other = warren()
        .env("WARREN_STATE_DIR", &state)
        .args([
            "submit",
            "--resume",
            &batch,
            "--queue",
            "some.other.queue",
            "--file",
        ])
        .arg(&file)
        .output()
        .await
        .unwrap();
    assert_eq!(other.status.code(), Some(2));
    let other_err = String::from_utf8_lossy(&other.stderr);
    assert!(
        other_err.contains(&format!("was submitted to '{queue}'")),
        "{other_err}"
    );
    let worker = WorkerProcess::start(&queue, &dir, &["--concurrency", "16"]);
    let resumed = warren()
        .env("WARREN_STATE_DIR", &state)
        .args([
            "submit",
            "--create-queue",
            "--resume",
            &batch,
            "--file",
            file.to_str().unwrap(),
        ])
        .output()
        .await
        .unwrap();
    let resumed_err = String::from_utf8_lossy(&resumed.stderr);
    assert_eq!(resumed.status.code(), Some(0), "{resumed_err}");
    assert!(
        resumed_err.contains("were confirmed before"),
        "{resumed_err}"
    );
    let waited = run_warren(&["wait", &batch], None, MINUTE).await;
    assert_eq!(waited.code, Some(0), "{}", waited.stderr);
    let results = read_results(&waited.stdout);
    assert_eq!(results.len(), 5000);
    assert_eq!(seqs(&results), (0..5000).collect());
    // Confirmed tasks were not sent again: only those whose confirm the cut swallowed (at most
    // one confirm window, 1024) can have run twice.
    let runs = worker.log_text().matches("task started").count();
    assert!((5000..5000 + 1024).contains(&runs), "{runs} runs");
    // A finished batch leaves no record behind.
    let again = run_warren(
        &[
            "submit",
            "--create-queue",
            "--resume",
            &batch,
            "--file",
            file.to_str().unwrap(),
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(again.code, Some(2));
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarts_mid_submit_and_mid_wait_lose_and_repeat_nothing() {
    let broker = tokio::task::spawn_blocking(common::private_broker::PrivateBroker::start)
        .await
        .unwrap();
    let url = broker.url();
    let dir = scratch("restart");
    let queue = "warren.restart";
    let env = [("WARREN_AMQP_URL", url.as_str())];
    let _workers: Vec<WorkerProcess> = (0..2)
        .map(|_| WorkerProcess::start_with(queue, &dir, &["--concurrency", "16"], &env))
        .collect();
    let total = 20_000;
    let file = dir.join("tasks.jsonl");
    write_tasks(
        &file,
        &(0..total)
            .map(|i| json!({"kind": "echo", "args": i}))
            .collect::<Vec<_>>(),
    );
    let out = dir.join("results.jsonl");
    let mut submit = WorkerProcess::spawn(
        &[
            "submit",
            "--create-queue",
            "--queue",
            queue,
            "--file",
            file.to_str().unwrap(),
            "--wait",
            "--output",
            out.to_str().unwrap(),
            "--retry-for",
            "60",
        ],
        &dir,
        &env,
    );
    let restart = |broker: &common::private_broker::PrivateBroker| {
        broker.ctl(&["stop_app"]);
        std::thread::sleep(Duration::from_secs(2));
        broker.ctl(&["start_app"]);
    };
    // Part-way through publishing...
    tokio::time::sleep(Duration::from_millis(700)).await;
    restart(&broker);
    // ...and again once every task is submitted and results are being collected.
    submit.wait_for_log("submitted", 1, MINUTE * 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    restart(&broker);
    assert_eq!(
        submit.exit_code(MINUTE * 3).await,
        Some(0),
        "{}",
        submit.log_text()
    );
    let log = submit.log_text();
    assert!(
        log.contains("publishing interrupted"),
        "the first restart hit the submit: {log}"
    );
    assert!(
        log.contains("collecting interrupted"),
        "the second hit the wait: {log}"
    );
    let results = read_results(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(results.len(), total, "each task exactly one result line");
    assert_eq!(seqs(&results).len(), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_again_and_again_costs_no_task_and_no_duplicate() {
    let queue = unique_queue("killloop");
    let dir = scratch("killloop");
    let batch = submit_only(&queue, &dir, &sleep_tasks(200, 50)).await;
    let out = dir.join("results.jsonl");
    let mut waiting = WorkerProcess::spawn(
        &["wait", &batch, "--output", out.to_str().unwrap()],
        &dir,
        &[],
    );
    for round in 1..=6 {
        let mut worker = WorkerProcess::start(&queue, &dir, &["--concurrency", "8"]);
        worker.wait_for_log("task finished", 5, MINUTE).await;
        worker.signal(Signal::SIGKILL);
        worker.exit_code(MINUTE).await;
        eprintln!("round {round}: worker killed mid-batch");
    }
    let _last = WorkerProcess::start(&queue, &dir, &["--concurrency", "8"]);
    assert_eq!(
        waiting.exit_code(MINUTE * 2).await,
        Some(0),
        "{}",
        waiting.log_text()
    );
    let results = read_results(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(results.len(), 200, "each task exactly one result line");
    assert_eq!(seqs(&results), (0..200).collect());
    assert!(
        results.iter().any(|r| r["attempt"].as_u64() > Some(1)),
        "some tasks were cut and ran again"
    );
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_while_publishing_names_the_batch_and_a_resume_finishes_it() {
    let queue = unique_queue("ctrlc");
    let dir = scratch("ctrlc");
    let state = dir.join("state");
    let total = 30_000;
    let file = dir.join("tasks.jsonl");
    write_tasks(
        &file,
        &(0..total)
            .map(|i| json!({"kind": "echo", "args": i}))
            .collect::<Vec<_>>(),
    );
    let state_dir = state.to_str().unwrap();
    let mut submit = WorkerProcess::spawn(
        &[
            "submit",
            "--create-queue",
            "--queue",
            &queue,
            "--file",
            file.to_str().unwrap(),
        ],
        &dir,
        &[("WARREN_STATE_DIR", state_dir)],
    );
    // The batch is named before anything is sent.
    submit.wait_for_log("as batch ", 1, MINUTE).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    submit.signal(Signal::SIGINT);
    assert_eq!(
        submit.exit_code(MINUTE).await,
        Some(130),
        "{}",
        submit.log_text()
    );
    let log = submit.log_text();
    let batch = log
        .split("as batch ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("batch id")
        .to_string();
    assert!(
        log.contains("were confirmed by RabbitMQ and will run"),
        "{log}"
    );
    assert!(
        log.contains(&format!("warren submit --resume {batch} --file")),
        "{log}"
    );
    assert!(log.contains(&format!("warren cancel {batch}")), "{log}");
    let _worker = WorkerProcess::start(&queue, &dir, &["--concurrency", "64"]);
    let resumed = warren()
        .env("WARREN_STATE_DIR", &state)
        .args([
            "submit",
            "--create-queue",
            "--resume",
            &batch,
            "--file",
            file.to_str().unwrap(),
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(
        resumed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let (_, results) = wait_into(&batch, &dir.join("results.jsonl")).await;
    assert_eq!(results.len(), total, "each task exactly one result line");
    assert_eq!(seqs(&results).len(), total);
    delete_queues(&queue).await;
}

/// Reads the messages of an open batch's result queue for up to `within`, until `until` holds
/// (a consumer: quorum queues with a single active consumer refuse `basic.get`).
async fn results_back(batch: &str, within: Duration, until: impl Fn(usize) -> bool) -> Vec<u32> {
    use futures_lite::StreamExt;
    let (conn, channel) = raw_channel().await;
    let queue = warren_broker::topology::result_queue(batch);
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("consume the result queue");
    let deadline = tokio::time::Instant::now() + within;
    let mut seqs = Vec::new();
    while !until(seqs.len()) {
        let Ok(Some(message)) = tokio::time::timeout_at(deadline, consumer.next()).await else {
            break;
        };
        let message = message.expect("a delivery");
        let result =
            warren_broker::protocol::decode_result(&message.data, 1 << 20).expect("a result");
        seqs.push(result.seq.expect("a seq"));
    }
    let _ = conn.close(200, "bye".into()).await;
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_batch_result_comes_back_until_it_is_acknowledged() {
    use warren_submitter::{OpenBatch, SubmitOptions, Submitter, TaskSpec};
    let queue = unique_queue("openack");
    let dir = scratch("openack");
    let _worker = WorkerProcess::start(&queue, &dir, &[]);
    let mut options = SubmitOptions::new(queue.clone());
    options.create_queue = true;
    let spec: TaskSpec = serde_json::from_value(json!({"kind": "echo", "args": {}})).unwrap();
    // Reads one result, acknowledges it or not, then the submitter goes away.
    let read_one = |acknowledge: bool| {
        let (options, spec) = (options.clone(), spec.clone());
        async move {
            let mut submitter = Submitter::new(
                warren_broker::AmqpSettings::new(AMQP_URL),
                "open-batch-ack-test".to_string(),
            );
            let mut open: OpenBatch = submitter.open_batch(&options).await.unwrap();
            let seq = open.submit(&spec).await.unwrap();
            let result = tokio::time::timeout(MINUTE, open.next_result())
                .await
                .expect("a result within a minute")
                .unwrap();
            assert_eq!(result.seq, Some(seq));
            if acknowledge {
                open.acknowledge().await.unwrap();
                // A second call has nothing left to acknowledge.
                open.acknowledge().await.unwrap();
            }
            let batch = open.id().to_string();
            submitter.close().await;
            batch
        }
    };
    let unacknowledged = read_one(false).await;
    assert_eq!(
        results_back(&unacknowledged, MINUTE, |n| n > 0).await,
        vec![0],
        "a result read but not acknowledged is redelivered"
    );
    let acknowledged = read_one(true).await;
    // Five seconds: many times what the unacknowledged result above took to come back.
    assert_eq!(
        results_back(&acknowledged, Duration::from_secs(5), |_| false).await,
        Vec::<u32>::new(),
        "an acknowledged result is gone"
    );
    let (conn, channel) = raw_channel().await;
    for batch in [unacknowledged, acknowledged] {
        use warren_broker::topology::{manifest_queue, result_queue};
        for queue in [result_queue(&batch), manifest_queue(&batch)] {
            let _ = channel
                .queue_delete(
                    queue.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
    }
    let _ = conn.close(200, "bye".into()).await;
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_whose_confirm_does_not_come_is_sent_again_and_the_batch_completes() {
    let broker = tokio::task::spawn_blocking(common::private_broker::PrivateBroker::start)
        .await
        .unwrap();
    let url = broker.url();
    let dir = scratch("noconfirm");
    let queue = "warren.noconfirm";
    let worker = WorkerProcess::start_with(
        queue,
        &dir,
        &["--concurrency", "1", "--confirm-timeout", "1"],
        &[("WARREN_AMQP_URL", url.as_str())],
    );
    let channels_before = settled_channels(&broker).await;
    let file = dir.join("tasks.jsonl");
    write_tasks(&file, &[json!({"kind": "sleep", "args": {"ms": 3000}})]);
    let submitted = submit_file(queue, &file, &["--amqp-url", &url]).await;
    assert_eq!(submitted.code, Some(0), "{}", submitted.stderr);
    let batch = submitted.stdout.trim().to_string();
    worker.wait_for_log("task started", 1, MINUTE).await;
    // The node freezes while the task runs: its result is sent, and no confirm comes. It stays
    // frozen a while longer, so the result's retries on fresh channels wait too. (All of it
    // shorter than the 10 s heartbeat, so the connection itself is not given up.)
    broker.freeze(true);
    worker
        .wait_for_log("no publisher confirm within 1s", 1, MINUTE)
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    broker.freeze(false);
    let (_, results) =
        wait_into_with(&batch, &dir.join("results.jsonl"), &["--amqp-url", &url]).await;
    assert_eq!(
        results.len(),
        1,
        "one result, though it may have been sent twice"
    );
    assert_eq!(results[0]["status"], "succeeded", "{}", results[0]);
    worker
        .wait_for_log("RabbitMQ takes publishes again", 1, MINUTE)
        .await;
    // Every retry's channel is closed again, a retry cut off by the confirm timeout included.
    // (The management API counts channels every 5 s, so this waits for it to catch up.)
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut channels_after = open_channels(&broker).await;
    while channels_after != channels_before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        channels_after = open_channels(&broker).await;
    }
    assert_eq!(
        channels_after, channels_before,
        "the worker's channels before the freeze and after the batch (the collector has exited)"
    );
}

/// [`open_channels`] once two counts a stats interval apart agree on some: the idle worker's.
async fn settled_channels(broker: &common::private_broker::PrivateBroker) -> usize {
    let mut last = open_channels(broker).await;
    loop {
        tokio::time::sleep(Duration::from_secs(6)).await;
        let now = open_channels(broker).await;
        if now == last && now > 0 {
            return now;
        }
        last = now;
    }
}

/// Channels open on `broker`, all connections together, as its management API counts them.
async fn open_channels(broker: &common::private_broker::PrivateBroker) -> usize {
    let deadline = Instant::now() + MINUTE;
    loop {
        let listed = common::management_get_at(&broker.management_url(), "/api/channels")
            .await
            .and_then(|text| serde_json::from_str::<Vec<serde_json::Value>>(&text).ok());
        match listed {
            Some(channels) => return channels.len(),
            None if Instant::now() < deadline => tokio::time::sleep(Duration::from_secs(1)).await,
            None => panic!("the private node's management API does not answer"),
        }
    }
}
