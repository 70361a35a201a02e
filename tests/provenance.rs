//! Who sent a message is what RabbitMQ verified (`user_id`), never what the message says. These
//! tests use real RabbitMQ users: an ordinary user who may publish anywhere in the vhost tries to
//! cancel somebody else's batch, and to pass a message off as somebody else's.

mod common;

use std::time::Duration;

use common::*;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);
const MALLORY: &str = "warren-test-mallory";

fn sleep_tasks(n: usize, ms: u64) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"kind": "sleep", "args": {"ms": ms}, "id": format!("t{i}")}))
        .collect()
}

async fn submit(queue: &str, dir: &std::path::Path, tasks: &[Value]) -> String {
    let file = dir.join(format!("tasks-{}.jsonl", uuid::Uuid::now_v7().simple()));
    write_tasks(&file, tasks);
    let done = submit_file(queue, &file, &[]).await;
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    done.stdout.trim().to_string()
}

/// `warren wait` of a batch whose tasks do not all succeed (exit 1); its results.
async fn wait_failing(batch: &str, out: &std::path::Path) -> Vec<Value> {
    let waited = run_warren(
        &["wait", batch, "--output", out.to_str().unwrap()],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(waited.code, Some(1), "{}", waited.stderr);
    read_results(&std::fs::read_to_string(out).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_submitter_or_an_admin_can_cancel_a_batch() {
    let mallory = rabbit_user(MALLORY).await;
    let queue = unique_queue("forgedcancel");
    let dir = scratch("forgedcancel");
    let worker = WorkerProcess::start(&queue, &dir, &["--concurrency", "4"]);
    worker.wait_for_log("consuming", 1, MINUTE).await;
    // Mallory cancels guest's batch: the record is written, and ignored.
    let batch = submit(&queue, &dir, &sleep_tasks(3, 1500)).await;
    let forged = run_warren(&["cancel", &batch, "--amqp-url", &mallory], None, MINUTE).await;
    assert_eq!(forged.code, Some(0), "{}", forged.stderr);
    let (_, results) = wait_into(&batch, &dir.join("forged.jsonl")).await;
    assert_eq!(results.len(), 3);
    for result in &results {
        assert_eq!(result["status"], "succeeded", "{result}");
    }
    // Guest cancels its own batch: it stops.
    let batch = submit(&queue, &dir, &sleep_tasks(3, 20_000)).await;
    worker
        .wait_for_log(&format!("task started task_id=t0 batch={batch}"), 1, MINUTE)
        .await;
    let own = run_warren(&["cancel", &batch], None, MINUTE).await;
    assert_eq!(own.code, Some(0), "{}", own.stderr);
    let results = wait_failing(&batch, &dir.join("own.jsonl")).await;
    assert_eq!(results.len(), 3);
    for result in &results {
        assert_eq!(result["status"], "cancelled", "{result}");
    }
    // An admin's cancellation reaches every batch.
    let admin_queue = unique_queue("admincancel");
    let _admin_worker = WorkerProcess::start(
        &admin_queue,
        &dir,
        &["--concurrency", "4", "--cancel-admin", MALLORY],
    );
    let batch = submit(&admin_queue, &dir, &sleep_tasks(2, 20_000)).await;
    let by_admin = run_warren(&["cancel", &batch, "--amqp-url", &mallory], None, MINUTE).await;
    assert_eq!(by_admin.code, Some(0), "{}", by_admin.stderr);
    let results = wait_failing(&batch, &dir.join("admin.jsonl")).await;
    assert_eq!(results.len(), 2);
    for result in &results {
        assert_eq!(result["status"], "cancelled", "{result}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_refuses_a_message_that_claims_another_user() {
    let mallory = rabbit_user(MALLORY).await;
    let connection = lapin::Connection::connect(&mallory, lapin::ConnectionProperties::default())
        .await
        .expect("mallory connects");
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let queue = unique_queue("claim");
    declare_classic(&channel, &queue).await;
    let claimed = channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"forged",
            BasicProperties::default().with_user_id("guest".into()),
        )
        .await;
    let confirmed = match claimed {
        Ok(confirm) => confirm.await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(confirmed.is_err(), "RabbitMQ let mallory claim to be guest");
    let _ = connection.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_token_and_a_forged_manifest_get_nothing_accepted() {
    use lapin::options::{BasicGetOptions, BasicNackOptions};
    let mallory = rabbit_user(MALLORY).await;
    let queue = unique_queue("stolentoken");
    let dir = scratch("stolentoken");
    let file = dir.join("tasks.jsonl");
    write_tasks(
        &file,
        &(0..3)
            .map(|i| json!({"kind": "echo", "args": {"real": i}}))
            .collect::<Vec<_>>(),
    );
    let submitted = submit_file(&queue, &file, &["--worker-user", "guest"]).await;
    assert_eq!(submitted.code, Some(0), "{}", submitted.stderr);
    let batch = submitted.stdout.trim().to_string();
    // Mallory may read the manifest queue: she learns the token, then answers task 0 with it
    // and writes a manifest that says every result is already collected.
    let connection = lapin::Connection::connect(&mallory, lapin::ConnectionProperties::default())
        .await
        .expect("mallory connects");
    let channel = connection.create_channel().await.unwrap();
    let message = channel
        .basic_get(
            format!("warren.batches.{batch}").as_str().into(),
            BasicGetOptions::default(),
        )
        .await
        .unwrap()
        .expect("a manifest");
    let manifest: Value = rmp_serde::from_slice(&message.delivery.data).unwrap();
    let token = manifest["token"].as_str().expect("a token").to_string();
    message
        .delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let forged_result = rmp_serde::to_vec_named(&json!({
        "v": 1, "task_id": "forged-0", "batch": batch, "seq": 0, "kind": "echo", "token": token,
        "status": "succeeded", "output": {"forged": true}, "worker": "mallory", "attempt": 1,
        "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:00Z"
    }))
    .unwrap();
    let forged_manifest = rmp_serde::to_vec_named(&json!({
        "v": 1, "batch": batch, "total": 3, "queue": queue, "generation": 99,
        "collected": [[0, 2]], "token": token
    }))
    .unwrap();
    for (queue, body) in [
        (format!("warren.results.{batch}"), forged_result),
        (format!("warren.batches.{batch}"), forged_manifest),
    ] {
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_user_id(MALLORY.into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let _ = connection.close(200, "bye".into()).await;
    let _worker = WorkerProcess::start(&queue, &dir, &[]);
    let (log, results) = wait_into(&batch, &dir.join("results.jsonl")).await;
    assert_eq!(
        results.len(),
        3,
        "every real result, none forged: {results:?}"
    );
    for r in &results {
        assert_ne!(r["worker"], "mallory", "a forged result was taken: {r}");
        assert_eq!(r["output"]["real"], r["seq"], "{r}");
    }
    assert!(log.contains("who may not answer this batch"), "{log}");
    assert!(log.contains("setting aside a manifest"), "{log}");
}

/// The permissions the README gives `role` (configure, write, read), from its
/// `rabbitmqctl set_permissions -p VHOST ROLE ...` line.
fn readme_permissions(role: &str) -> [String; 3] {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let prefix = format!("rabbitmqctl set_permissions -p VHOST {role} ");
    let line = readme
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("the README gives the {role} role its permissions"));
    let patterns: Vec<String> = line
        .split('\'')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect();
    patterns.try_into().expect("three quoted patterns")
}

/// Creates (again) the user `name` with the README's permissions of `role` in the test vhost;
/// returns its URL. The queue names of the README are the default ones: tests use their own.
async fn role_user(name: &str, role: &str, task_queue: &str) -> String {
    let [configure, write, read] =
        readme_permissions(role).map(|p| p.replace("warren\\.tasks", &regex_escape(task_queue)));
    rabbit_user_with(name, [&configure, &write, &read]).await
}

fn regex_escape(name: &str) -> String {
    name.replace('.', "\\.")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_can_do_its_work_with_the_readmes_permissions_and_no_more() {
    let queue = unique_queue("roles");
    let dir = scratch("roles");
    let submitter = role_user("warren-test-submitter", "SUBMITTER", &queue).await;
    let worker_url = role_user("warren-test-worker", "WORKER", &queue).await;
    // The worker declares its queue; the submitter may not create one.
    let refused = run_warren(
        &[
            "submit",
            "--amqp-url",
            &submitter,
            "--queue",
            &queue,
            "--create-queue",
            "exec",
            "--",
            "true",
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("Roles and permissions"),
        "{}",
        refused.stderr
    );
    let worker = WorkerProcess::start_with(
        &queue,
        &dir,
        &["--allow-exec", "true", "--allow-exec", "false"],
        &[("WARREN_AMQP_URL", worker_url.as_str())],
    );
    worker.wait_for_log("consuming", 1, MINUTE).await;
    // The submitter submits and collects; the worker runs, retries and dead-letters.
    let declared = run_warren(
        &[
            "submit",
            "--amqp-url",
            &submitter,
            "--queue",
            &queue,
            "exec",
            "--",
            "true",
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(declared.code, Some(0), "{}", declared.stderr);
    let first = declared.stdout.trim().to_string();
    let tasks = dir.join("tasks.jsonl");
    write_tasks(
        &tasks,
        &[
            json!({"kind": "exec", "args": {"argv": ["true"]}, "id": "ok"}),
            json!({"kind": "exec", "args": {"argv": ["false"]}, "id": "retried", "max_retries": 1, "retry_backoff_s": 0.1}),
            json!({"kind": "nope", "id": "dead"}),
        ],
    );
    let out = dir.join("results.jsonl");
    let done = run_warren(
        &[
            "submit",
            "--amqp-url",
            &submitter,
            "--queue",
            &queue,
            "--worker-user",
            "warren-test-worker",
            "--file",
            tasks.to_str().unwrap(),
            "--wait",
            "--output",
            out.to_str().unwrap(),
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(done.code, Some(1), "{}", done.stderr);
    let results = by_task_id(read_results(&std::fs::read_to_string(&out).unwrap()));
    assert_eq!(results["ok"]["status"], "succeeded");
    assert_eq!(results["retried"]["attempt"], 2, "{}", results["retried"]);
    assert_eq!(results["dead"]["error"]["kind"], "unknown_kind");
    let waited = run_warren(&["wait", &first, "--amqp-url", &submitter], None, MINUTE).await;
    assert_eq!(waited.code, Some(0), "{}", waited.stderr);
    // The worker recorded its attempts; the submitter reads them, the worker may not.
    let logs = run_warren(
        &["logs", &first, "--json", "--amqp-url", &submitter],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(logs.code, Some(0), "{}", logs.stderr);
    assert_eq!(logs.stdout.lines().count(), 1, "{}", logs.stdout);
    assert!(
        logs.stdout.contains("\"sent_by\":\"warren-test-worker\""),
        "{}",
        logs.stdout
    );
    let refused = run_warren(&["logs", &first, "--amqp-url", &worker_url], None, MINUTE).await;
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    // No more: a worker cannot collect a batch, a submitter cannot take tasks off the queue.
    let batch = {
        let again = run_warren(
            &[
                "submit",
                "--amqp-url",
                &submitter,
                "--queue",
                &queue,
                "exec",
                "--",
                "true",
            ],
            None,
            MINUTE,
        )
        .await;
        assert_eq!(again.code, Some(0), "{}", again.stderr);
        again.stdout.trim().to_string()
    };
    let stolen = run_warren(&["wait", &batch, "--amqp-url", &worker_url], None, MINUTE).await;
    assert_eq!(stolen.code, Some(2), "{}", stolen.stderr);
    let connection = lapin::Connection::connect(&submitter, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let taken = channel
        .basic_get(queue.as_str().into(), Default::default())
        .await;
    assert!(taken.is_err(), "a submitter read the task queue");
    let _ = connection.close(200, "bye".into()).await;
    let collected = run_warren(&["wait", &batch, "--amqp-url", &submitter], None, MINUTE).await;
    assert_eq!(collected.code, Some(0), "{}", collected.stderr);
    // An autoscaler with its line declares and sizes its own queue (dry run: it starts nothing).
    let scaled_queue = unique_queue("rolesscaled");
    let autoscaler_url = role_user("warren-test-autoscaler", "AUTOSCALER", &scaled_queue).await;
    let scaler = WorkerProcess::spawn(
        &[
            "autoscale",
            "--queue",
            &scaled_queue,
            "--backend",
            "local",
            "--dry-run",
            "--poll",
            "1",
            "--metrics-addr",
            "127.0.0.1:0",
            "--",
            "true",
        ],
        &dir,
        &[("WARREN_AMQP_URL", autoscaler_url.as_str())],
    );
    scaler.wait_for_log("reason=", 1, MINUTE).await;
    let log = scaler.log_text();
    assert!(!log.contains("refused"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_confined_to_its_namespace_works_there_and_reaches_nothing_else() {
    // Alice may use only queues of the namespace team-a (and publish through the default
    // exchange): RabbitMQ itself keeps her out of everybody else's batches.
    let alice = rabbit_user_with(
        "warren-test-alice",
        [
            r"^team-a\..*$",
            r"^(amq\.default|team-a\..*)$",
            r"^team-a\..*$",
        ],
    )
    .await;
    let dir = scratch("namespace");
    let queue = format!("team-a.{}", unique_queue("ns"));
    let team = [("WARREN_NAMESPACE", "team-a")];
    let worker = WorkerProcess::start_with(&queue, &dir, &["--allow-exec", "true"], &team);
    worker.wait_for_log("consuming", 1, MINUTE).await;
    let mut submit = warren();
    submit
        .args(["submit", "--queue", &queue, "--wait", "exec", "--", "true"])
        .env("WARREN_AMQP_URL", &alice)
        .env("WARREN_NAMESPACE", "team-a");
    let out = submit.output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("1 succeeded"), "{stderr}");
    // A batch outside the namespace is out of her reach, as RabbitMQ says.
    let other_queue = unique_queue("nsother");
    let _other_worker = WorkerProcess::start(&other_queue, &dir, &[]);
    let other = {
        let file = dir.join("other.jsonl");
        write_tasks(&file, &[json!({"kind": "echo", "args": 1})]);
        let done = submit_file(&other_queue, &file, &[]).await;
        assert_eq!(done.code, Some(0), "{}", done.stderr);
        done.stdout.trim().to_string()
    };
    let mut steal = warren();
    steal
        .args(["wait", &other])
        .env("WARREN_AMQP_URL", &alice)
        .env("WARREN_NAMESPACE", "warren");
    let stolen = steal.output().await.unwrap();
    let stolen_err = String::from_utf8_lossy(&stolen.stderr);
    assert_eq!(stolen.status.code(), Some(2), "{stolen_err}");
    assert!(
        stolen_err.contains("refused") || stolen_err.contains("not found"),
        "{stolen_err}"
    );
    let (_, results) = wait_into(&other, &dir.join("other-results.jsonl")).await;
    assert_eq!(results.len(), 1, "the owner still collects it");
    // Bad namespaces are refused before anything is sent.
    let bad = run_warren(&["status", "--queue-namespace", "a.b"], None, MINUTE).await;
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
}
