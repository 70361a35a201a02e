//! End-to-end: what users see when input or configuration is wrong, and `warren status`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_bad_task_line_is_named_and_nothing_is_submitted() {
    let queue = unique_queue("badline");
    let dir = scratch("badline");
    let file = dir.join("tasks.jsonl");
    std::fs::write(
        &file,
        "{\"kind\":\"echo\"}\n{\"kind\":\"echo\",\"arg\":{}}\n",
    )
    .unwrap();
    let done = submit_file(&queue, &file, &[]).await;
    assert_eq!(done.code, Some(2));
    assert!(
        done.stderr.contains("line 2") && done.stderr.contains("arg"),
        "{}",
        done.stderr
    );
    assert!(done.stdout.is_empty(), "no batch id for a refused batch");
    // Arguments a worker would refuse are refused here too, naming the line and the field.
    for (line, field) in [
        (
            r#"{"kind":"exec","args":{"argv":["ls"],"env":{"N":1}}}"#,
            "env.N",
        ),
        (r#"{"kind":"exec","args":{"argv":[]}}"#, "argv"),
        (
            r#"{"kind":"exec","args":{"argv":["ls"],"cdw":"/tmp"}}"#,
            "cdw",
        ),
        (r#"{"kind":"sleep","args":{"ms":"soon"}}"#, "ms"),
    ] {
        std::fs::write(&file, format!("{{\"kind\":\"echo\"}}\n{line}\n")).unwrap();
        let done = submit_file(&queue, &file, &[]).await;
        assert_eq!(done.code, Some(2), "{line}: {}", done.stderr);
        assert!(
            done.stderr.contains("line 2") && done.stderr.contains(field),
            "{line}: {}",
            done.stderr
        );
    }
    let status = run_warren(&["status", "--queue", &queue], None, MINUTE).await;
    assert_eq!(
        status.code,
        Some(2),
        "the queue was never created: {}",
        status.stdout
    );
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let done = run_warren(&["submit"], None, MINUTE).await;
    assert_eq!(done.code, Some(2));
    assert!(done.stderr.contains("nothing to submit"), "{}", done.stderr);
    let done = run_warren(&["worker", "--concurrency", "0"], None, MINUTE).await;
    assert_eq!(done.code, Some(2));
}

#[tokio::test]
async fn an_unreachable_broker_is_named_without_the_password() {
    let mut cmd = warren();
    cmd.env("WARREN_AMQP_URL", "amqp://guest:topsecret@127.0.0.1:1/%2f");
    let out = cmd
        .args([
            "submit",
            "--create-queue",
            "--retry-for",
            "1",
            "exec",
            "--",
            "true",
        ])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("amqp://guest:***@127.0.0.1:1/%2f"),
        "{stderr}"
    );
    assert!(
        stderr.contains("Check that the broker is running"),
        "{stderr}"
    );
    assert!(!stderr.contains("topsecret"), "password leaked: {stderr}");
}

#[tokio::test]
async fn refused_credentials_fail_fast_for_submitters_and_workers() {
    for args in [
        vec!["submit", "--create-queue", "exec", "--", "true"],
        vec!["worker"],
    ] {
        let mut cmd = warren();
        cmd.env(
            "WARREN_AMQP_URL",
            format!("amqp://guest:wrong@127.0.0.1:5672/{TEST_VHOST}"),
        );
        let out = tokio::time::timeout(MINUTE, cmd.args(&args).output())
            .await
            .unwrap()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("refused the login"), "{args:?}: {stderr}");
        assert!(!stderr.contains("wrong"), "password leaked: {stderr}");
    }
}

#[tokio::test]
async fn the_password_can_come_from_a_file() {
    let queue = unique_queue("pwfile");
    let dir = scratch("pwfile");
    let secret = dir.join("password");
    std::fs::write(&secret, "guest\n").unwrap();
    let mut cmd = warren();
    cmd.env(
        "WARREN_AMQP_URL",
        format!("amqp://guest@127.0.0.1:5672/{TEST_VHOST}"),
    )
    .env("WARREN_AMQP_PASSWORD_FILE", &secret);
    let out = cmd
        .args([
            "submit",
            "--create-queue",
            "--queue",
            &queue,
            "exec",
            "--",
            "true",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    delete_queues(&queue).await;
}

#[tokio::test]
async fn a_queue_with_other_settings_is_a_clear_fatal_error() {
    let queue = unique_queue("classic");
    let (conn, channel) = raw_channel().await;
    declare_classic(&channel, &queue).await;
    let done = run_warren(&["worker", "--queue", &queue], None, MINUTE).await;
    assert_eq!(done.code, Some(2));
    assert!(
        done.stderr
            .contains(&format!("queue '{queue}' exists with different settings")),
        "{}",
        done.stderr
    );
    let _ = channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
    delete_queues(&queue).await;
}

#[tokio::test]
async fn status_shows_depth_and_dead_letters() {
    let queue = unique_queue("status");
    let dir = scratch("status");
    let file = dir.join("t.jsonl");
    write_tasks(
        &file,
        &[
            serde_json::json!({"kind": "echo"}),
            serde_json::json!({"kind": "echo"}),
            serde_json::json!({"kind": "echo"}),
        ],
    );
    let done = submit_file(&queue, &file, &[]).await;
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    // The management API refreshes its figures every few seconds.
    let status: Value = eventually(MINUTE, "status shows 3 ready tasks", || async {
        let out = run_warren(&["status", "--queue", &queue, "--json"], None, MINUTE).await;
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        let v: Value = serde_json::from_str(&out.stdout).expect("status JSON");
        (v["tasks"]["ready"] == 3).then_some(v)
    })
    .await;
    assert_eq!(status["tasks"]["source"], "management");
    assert_eq!(status["tasks"]["unacked"], 0);
    assert_eq!(status["dead_letters"]["queue"], format!("{queue}.dead"));
    let table = run_warren(&["status", "--queue", &queue], None, MINUTE).await;
    assert!(
        table.stdout.contains("READY") && table.stdout.contains(&format!("{queue}.dead")),
        "{}",
        table.stdout
    );
    delete_queues(&queue).await;
}

#[tokio::test]
async fn a_worker_serves_health_readiness_and_metrics() {
    let queue = unique_queue("health");
    let dir = scratch("health");
    let worker = WorkerProcess::start(
        &queue,
        &dir,
        &["--metrics-addr", "127.0.0.1:0", "--allow-exec", "true"],
    );
    let url = worker.metrics_url().await;
    let base = url.trim_end_matches("/metrics").to_string();
    worker.wait_for_log("consuming", 1, MINUTE).await;
    assert_eq!(
        http_get(format!("{base}/healthz")).await.unwrap().status(),
        200
    );
    assert_eq!(
        http_get(format!("{base}/readyz")).await.unwrap().status(),
        200
    );
    let file = dir.join("t.jsonl");
    write_tasks(
        &file,
        &[
            serde_json::json!({"kind": "echo"}),
            // Valid for submit, refused by the worker's exec handler.
            serde_json::json!({"kind": "exec", "args": {"argv": ["true"], "env": {"LD_PRELOAD": "x.so"}}}),
        ],
    );
    assert_eq!(submit_file(&queue, &file, &["--wait"]).await.code, Some(1));
    let page = scrape(&url).await;
    assert_eq!(
        sample(
            &page,
            "warren_worker_tasks_finished_total{kind=\"echo\",status=\"succeeded\"}"
        ),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            "warren_worker_tasks_finished_total{kind=\"exec\",status=\"rejected\"}"
        ),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "warren_worker_tasks_in_flight"),
        Some(0.0),
        "{page}"
    );
    delete_queues(&queue).await;
}

#[tokio::test]
async fn json_logs_carry_the_task_and_batch_on_every_task_line() {
    let queue = unique_queue("jsonlog");
    let dir = scratch("jsonlog");
    let worker = WorkerProcess::start(&queue, &dir, &["--log-format", "json"]);
    let file = dir.join("t.jsonl");
    write_tasks(
        &file,
        &[
            serde_json::json!({"kind": "echo"}),
            serde_json::json!({"kind": "nope"}),
        ],
    );
    let done = submit_file(&queue, &file, &["--wait", "--print-batch-id"]).await;
    let batch = done.stdout.lines().next().unwrap().to_string();
    worker.wait_for_log("dead-lettering", 1, MINUTE).await;
    let lines: Vec<Value> = worker
        .log_text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let about_tasks: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            ["task started", "task finished", "dead-lettering"]
                .iter()
                .any(|m| l["fields"]["message"].as_str().unwrap_or("").starts_with(m))
        })
        .collect();
    assert_eq!(about_tasks.len(), 3, "{lines:?}");
    for line in about_tasks {
        assert_eq!(line["fields"]["batch"], batch.as_str(), "{line}");
        assert!(
            !line["fields"]["task_id"].as_str().unwrap_or("").is_empty(),
            "{line}"
        );
    }
    delete_queues(&queue).await;
}

#[tokio::test]
async fn status_shows_busy_workers_and_watch_refreshes() {
    let queue = unique_queue("busy");
    let dir = scratch("busy");
    let worker = WorkerProcess::start_with(
        &queue,
        &dir,
        &["--concurrency", "2"],
        &[("WARREN_WORKER_NAME", "busy-worker-1")],
    );
    let file = dir.join("t.jsonl");
    write_tasks(
        &file,
        &[serde_json::json!({"kind": "sleep", "args": {"ms": 20000}})],
    );
    assert_eq!(submit_file(&queue, &file, &[]).await.code, Some(0));
    worker.wait_for_log("task started", 1, MINUTE).await;
    // The management API refreshes its figures every few seconds.
    let table = eventually(MINUTE, "the worker shows as busy", || async {
        let out = run_warren(&["status", "--queue", &queue], None, MINUTE).await;
        out.stdout
            .contains("busy-worker-1")
            .then_some(out.stdout)
            .filter(|t| t.contains("busy, 1 task"))
    })
    .await;
    assert!(table.contains("WORKERS (1 busy, 0 idle)"), "{table}");
    let mut watch = warren()
        .args(["status", "--queue", &queue, "--json", "--watch", "0.3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    watch.start_kill().unwrap();
    let out = watch.wait_with_output().await.unwrap();
    let snapshots: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        snapshots.len() >= 3,
        "a snapshot per interval: {}",
        snapshots.len()
    );
    assert!(
        snapshots
            .iter()
            .all(|s| s["tasks"]["queue"] == queue.as_str())
    );
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_lists_what_the_broker_holds_until_it_is_collected() {
    let queue = unique_queue("batches");
    let dir = scratch("batches");
    let file = dir.join("tasks.jsonl");
    write_tasks(
        &file,
        &[
            json!({"kind": "echo", "args": 1}),
            json!({"kind": "echo", "args": 2}),
        ],
    );
    let submitted = submit_file(&queue, &file, &[]).await;
    let batch = submitted.stdout.trim().to_string();
    let listed = run_warren(&["batches", "--json"], None, MINUTE).await;
    assert_eq!(listed.code, Some(0), "{}", listed.stderr);
    let mine: Vec<Value> = read_results(&listed.stdout)
        .into_iter()
        .filter(|b| b["batch"] == batch.as_str())
        .collect();
    assert_eq!(mine.len(), 1, "{}", listed.stdout);
    assert_eq!(mine[0]["total"], 2);
    assert_eq!(mine[0]["collected"], 0);
    assert_eq!(mine[0]["queue"], queue.as_str());
    assert!(mine[0]["age_s"].as_u64().unwrap() < 600);
    let table = run_warren(&["batches"], None, MINUTE).await;
    assert!(
        table.stdout.contains(&batch) && table.stdout.contains("EXPIRES IN"),
        "{}",
        table.stdout
    );
    let _worker = WorkerProcess::start(&queue, &dir, &[]);
    let waited = run_warren(&["wait", &batch], None, MINUTE).await;
    assert_eq!(waited.code, Some(0), "{}", waited.stderr);
    let after = run_warren(&["batches", "--json"], None, MINUTE).await;
    assert!(
        !after.stdout.contains(&batch),
        "a collected batch is gone: {}",
        after.stdout
    );
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warren_flag_after_exec_dashes_is_warned_about() {
    let queue = unique_queue("flagafter");
    let out = run_warren(
        &[
            "submit",
            "--create-queue",
            "--queue",
            &queue,
            "exec",
            "--",
            "sha256sum",
            "/etc/hostname",
            "--wait",
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("'--wait' comes after `exec --`")
            && out.stderr.contains("warren submit --wait exec --"),
        "{}",
        out.stderr
    );
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_missing_queue_lists_the_task_queues_that_exist() {
    let queue = unique_queue("statusq");
    let dir = scratch("statusq");
    let file = dir.join("t.jsonl");
    write_tasks(&file, &[json!({"kind": "echo"})]);
    assert_eq!(submit_file(&queue, &file, &[]).await.code, Some(0));
    let out = run_warren(&["status", "--queue", "no.such.queue"], None, MINUTE).await;
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("'no.such.queue' does not exist yet"),
        "{}",
        out.stderr
    );
    // It says what creates a queue (a submit does not, without --create-queue).
    assert!(
        out.stderr.contains("warren worker --queue no.such.queue")
            && !out.stderr.contains("`warren submit` on it"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(&queue),
        "the existing queue is listed: {}",
        out.stderr
    );
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_output_path_is_refused_before_anything_is_sent() {
    let queue = unique_queue("badout");
    let dir = scratch("badout");
    let file = dir.join("t.jsonl");
    write_tasks(&file, &[json!({"kind": "echo"})]);
    let out = submit_file(
        &queue,
        &file,
        &["--wait", "--output", "/no/such/dir/r.jsonl"],
    )
    .await;
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("nothing was submitted"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.trim().is_empty(), "no batch: {}", out.stdout);
    let (conn, channel) = raw_channel().await;
    let exists = warren_queue_exists(&channel, &queue).await;
    assert!(!exists, "nothing was declared or sent");
    let _ = conn.close(200, "bye".into()).await;
}

async fn warren_queue_exists(channel: &lapin::Channel, queue: &str) -> bool {
    inspect(channel, queue).await.is_ok()
}

/// A passive declare of `queue`: its figures, or the broker's refusal when it does not exist.
async fn inspect(channel: &lapin::Channel, queue: &str) -> Result<lapin::Queue, lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_nobody_declared_is_refused_and_a_queue_without_workers_is_named() {
    let queue = unique_queue("typo");
    let refused = run_warren(
        &["submit", "--queue", &queue, "exec", "--", "true"],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("does not exist") && refused.stderr.contains("--create-queue"),
        "{}",
        refused.stderr
    );
    // Refused before anything is announced: no "submitting", no batch id.
    assert!(!refused.stderr.contains("submitting"), "{}", refused.stderr);
    assert!(refused.stdout.trim().is_empty(), "{}", refused.stdout);
    let status = run_warren(&["status", "--queue", &queue], None, MINUTE).await;
    assert_eq!(
        status.code,
        Some(2),
        "nothing was created: {}",
        status.stdout
    );

    // Created on request; with no worker, the wait says so instead of showing an ETA for ever.
    let waited = run_warren(
        &[
            "submit",
            "--queue",
            &queue,
            "--create-queue",
            "--wait",
            "--timeout",
            "8",
            "--warn-no-worker-after",
            "1",
            "exec",
            "--",
            "true",
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(waited.code, Some(3), "{}", waited.stderr);
    assert!(
        waited
            .stderr
            .contains(&format!("no worker is consuming '{queue}'")),
        "{}",
        waited.stderr
    );
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_sends_tasks_ahead_but_concurrency_bounds_what_runs_and_shutdown_returns_the_rest()
{
    let queue = unique_queue("prefetch");
    let dir = scratch("prefetch");
    let file = dir.join("t.jsonl");
    write_tasks(
        &file,
        &(0..5)
            .map(|_| json!({"kind": "sleep", "args": {"ms": 3000}}))
            .collect::<Vec<_>>(),
    );
    assert_eq!(submit_file(&queue, &file, &[]).await.code, Some(0));
    let worker = WorkerProcess::start(
        &queue,
        &dir,
        &[
            "--concurrency",
            "1",
            "--prefetch",
            "5",
            "--grace",
            "30",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    );
    let url = worker.metrics_url().await;
    let ready = || async {
        let out = run_warren(&["status", "--queue", &queue, "--json"], None, MINUTE).await;
        serde_json::from_str::<Value>(&out.stdout).ok()?["tasks"]["ready"].as_u64()
    };
    // All five are sent ahead; one runs.
    eventually(MINUTE, "every task sent to the worker", || async {
        (ready().await == Some(0)).then_some(())
    })
    .await;
    assert_eq!(
        sample(&scrape(&url).await, "warren_worker_tasks_in_flight"),
        Some(1.0)
    );
    // On SIGTERM the running task finishes; the four held ones go back at once.
    let mut worker = worker;
    worker.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        worker.exit_code(MINUTE).await,
        Some(0),
        "{}",
        worker.log_text()
    );
    assert_eq!(ready().await, Some(4));
    delete_queues(&queue).await;
}

/// Tasks waiting in `queue`, from a passive declare.
async fn queue_depth(queue: &str) -> u32 {
    let (conn, channel) = raw_channel().await;
    let depth = inspect(&channel, queue)
        .await
        .expect("the queue exists")
        .message_count();
    let _ = conn.close(200, "bye".into()).await;
    depth
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_from_a_pipe_a_fifo_or_a_process_substitution_are_all_published() {
    let queue = unique_queue("pipefile");
    let dir = scratch("pipefile");
    let tasks = r#"for i in $(seq 1 10); do echo "{\"kind\":\"echo\",\"args\":$i}"; done"#;
    // Process substitution: a /dev/fd/N pipe that can be read only once.
    let script =
        format!("exec \"$WARREN\" submit --queue {queue} --create-queue --file <({tasks})");
    let run = |script: String| {
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg("-c")
            .arg(script)
            .env("WARREN", env!("CARGO_BIN_EXE_warren"))
            .env("WARREN_AMQP_URL", AMQP_URL)
            .env("WARREN_LOG", "warn")
            .current_dir(&dir)
            .kill_on_drop(true);
        cmd
    };
    let out = run(script).output().await.expect("bash runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("submitted 10 task(s)"), "{stderr}");
    assert_eq!(
        queue_depth(&queue).await,
        10,
        "every task counted was published"
    );
    // A named FIFO, written by another process.
    let fifo = dir.join("tasks.fifo");
    let script = format!(
        "mkfifo {fifo}; ({tasks}) > {fifo} & \"$WARREN\" submit --queue {queue} --file {fifo}",
        fifo = fifo.display()
    );
    let out = run(script).output().await.expect("bash runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("submitted 10 task(s)"), "{stderr}");
    assert_eq!(queue_depth(&queue).await, 20);
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_says_why_each_failed_task_failed() {
    let queue = unique_queue("whyfailed");
    let dir = scratch("whyfailed");
    let _worker = WorkerProcess::start(&queue, &dir, &["--allow-exec", "sh"]);
    let file = dir.join("tasks.jsonl");
    write_tasks(
        &file,
        &[
            json!({"kind": "exec", "id": "bad-tile", "args": {"argv": ["sh", "-c",
                "echo 'Warning 1: noise' >&2; echo 'ERROR 4: raw/bad.tif: not recognized as a supported file format.' >&2; exit 1"]}}),
            json!({"kind": "exec", "id": "good-tile", "args": {"argv": ["sh", "-c", "true"]}}),
        ],
    );
    let done = submit_file(&queue, &file, &["--wait"]).await;
    assert_eq!(done.code, Some(1), "{}", done.stderr);
    assert!(
        done.stderr.contains(
            "bad-tile (exit_status): ERROR 4: raw/bad.tif: not recognized as a supported file format."
        ),
        "the last line of the failed step's stderr is on screen: {}",
        done.stderr
    );
    assert!(!done.stderr.contains("good-tile"), "{}", done.stderr);
}

#[tokio::test]
async fn misplaced_flags_and_misspelt_placeholders_get_the_right_advice() {
    let misplaced = run_warren(
        &["submit", "--timeout-s", "600", "exec", "--", "true"],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(misplaced.code, Some(2), "{}", misplaced.stderr);
    assert!(
        misplaced
            .stderr
            .contains("warren submit exec --timeout-s 600"),
        "{}",
        misplaced.stderr
    );
    let dir = scratch("placeholder");
    std::fs::write(dir.join("a.tif"), "x").unwrap();
    let glob = format!("{}/*.tif", dir.display());
    let misspelt = run_warren(
        &[
            "submit", "--each", &glob, "exec", "--", "gdalinfo", "{stme}",
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(misspelt.code, Some(2), "{}", misspelt.stderr);
    assert!(
        misspelt.stderr.contains("unknown placeholder {stme}"),
        "{}",
        misspelt.stderr
    );
    assert!(
        !misspelt.stderr.contains("no placeholder"),
        "only the right error: {}",
        misspelt.stderr
    );
    // Relative items name files here; the commands run in the workers' folders: say so.
    let relative = run_warren(
        &[
            "submit",
            "--queue",
            &unique_queue("relative"),
            "--each",
            "src/*.rs",
            "exec",
            "--",
            "wc",
            "{}",
        ],
        None,
        MINUTE,
    )
    .await;
    assert!(
        relative.stderr.contains("add `--cwd"),
        "{}",
        relative.stderr
    );
}
