//! End-to-end: batches through the real binary and the real broker.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::*;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_1000_echo_tasks_returns_1000_matching_results() {
    let queue = unique_queue("batch1000");
    let dir = scratch("batch1000");
    let _worker = WorkerProcess::start(&queue, &dir, &["--concurrency", "8"]);
    let tasks: Vec<Value> = (0..1000)
        .map(|i| json!({"kind": "echo", "args": {"i": i}, "labels": {"n": i.to_string()}}))
        .collect();
    let file = dir.join("tasks.jsonl");
    write_tasks(&file, &tasks);
    let out = dir.join("results.jsonl");
    let done = submit_file(
        &queue,
        &file,
        &[
            "--wait",
            "--print-batch-id",
            "--output",
            out.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(done.code, Some(0), "stderr: {}", done.stderr);
    let batch = done.stdout.trim().to_string();
    let results = read_results(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(results.len(), 1000);
    let mut seen = BTreeSet::new();
    for r in &results {
        assert_eq!(r["status"], "succeeded", "{r}");
        assert_eq!(r["batch"], batch.as_str());
        let i = r["output"]["i"].as_u64().expect("echoed i");
        assert_eq!(r["seq"].as_u64(), Some(i), "result matches its task: {r}");
        assert_eq!(r["labels"]["n"], i.to_string());
        assert!(seen.insert(i), "duplicate result for {i}");
    }
    assert!(
        done.stderr.contains("1000/1000 results"),
        "summary: {}",
        done.stderr
    );
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_on_stdin_and_results_on_stdout() {
    let queue = unique_queue("stdin");
    let dir = scratch("stdin");
    let _worker = WorkerProcess::start(&queue, &dir, &[]);
    let input: String = (0..50)
        .map(|i| format!("{{\"kind\":\"echo\",\"args\":[{i}],\"id\":\"task-{i}\"}}\n"))
        .collect();
    let done = run_warren(
        &[
            "submit",
            "--create-queue",
            "--queue",
            &queue,
            "--file",
            "-",
            "--wait",
        ],
        Some(&input),
        MINUTE,
    )
    .await;
    assert_eq!(done.code, Some(0), "stderr: {}", done.stderr);
    // Stdout holds only result lines (it can be piped to jq); the batch id is on stderr.
    let results = read_results(&done.stdout);
    assert_eq!(results.len(), 50);
    let batch = results[0]["batch"].as_str().unwrap();
    assert!(done.stderr.contains(batch), "{}", done.stderr);
    for r in &results {
        assert_eq!(r["batch"], batch);
        assert_eq!(r["task_id"], format!("task-{}", r["output"][0]));
    }
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_tasks_report_success_failure_timeout_and_refusal() {
    let queue = unique_queue("exec");
    let dir = scratch("exec");
    let _worker = WorkerProcess::start(
        &queue,
        &dir,
        &[
            "--allow-exec",
            "sha256sum",
            "--allow-exec",
            "sh",
            "--allow-exec",
            "sleep",
        ],
    );
    let data = dir.join("in.tif");
    std::fs::write(&data, b"pretend raster").unwrap();
    let tasks = vec![
        json!({"id": "hash", "kind": "exec", "args": {"argv": ["sha256sum", data]}}),
        json!({"id": "exit3", "kind": "exec", "args": {"argv": ["sh", "-c", "echo bad input >&2; exit 3"]}}),
        json!({"id": "slow", "kind": "exec", "args": {"argv": ["sh", "-c", "echo started; echo working >&2; sleep 30"]}, "timeout_s": 1}),
        json!({"id": "rm", "kind": "exec", "args": {"argv": ["rm", "-rf", dir.join("nothing")]}}),
        json!({"id": "outputs", "kind": "exec", "args": {"argv": ["sh", "-c", "echo x > made.tif"], "cwd": dir, "outputs": ["made.tif", "never.tif"]}}),
        json!({"id": "made", "kind": "exec", "args": {"argv": ["sh", "-c", "printf 1234 > ok.tif"], "cwd": dir, "outputs": ["ok.tif"]}}),
    ];
    let file = dir.join("tasks.jsonl");
    write_tasks(&file, &tasks);
    let done = submit_file(&queue, &file, &["--wait"]).await;
    assert_eq!(
        done.code,
        Some(1),
        "some tasks failed, so exit 1; stderr: {}",
        done.stderr
    );
    // The summary names the tasks that did not succeed, with their error kinds.
    for named in [
        "exit3 (exit_status)",
        "slow (timeout)",
        "rm (not_allowed)",
        "outputs (missing_outputs)",
    ] {
        assert!(done.stderr.contains(named), "{named}: {}", done.stderr);
    }
    let results = by_task_id(read_results(&done.stdout));
    let hash = &results["hash"];
    assert_eq!(hash["status"], "succeeded");
    assert!(
        hash["output"]["stdout"]
            .as_str()
            .unwrap()
            .starts_with("67d2cda12678002c"),
        "{hash}"
    );
    let exit3 = &results["exit3"];
    assert_eq!(
        (
            exit3["status"].as_str(),
            exit3["output"]["exit_code"].as_i64()
        ),
        (Some("failed"), Some(3))
    );
    assert_eq!(exit3["output"]["stderr"], "bad input\n");
    assert_eq!(results["slow"]["status"], "timed_out");
    // A command that ran too long is reported with what it wrote until then.
    assert_eq!(results["slow"]["error"]["kind"], "timeout");
    assert_eq!(results["slow"]["output"]["stdout"], "started\n");
    assert_eq!(results["slow"]["output"]["stderr"], "working\n");
    assert_eq!(results["slow"]["output"]["exit_code"], Value::Null);
    assert_eq!(results["rm"]["status"], "rejected");
    assert_eq!(results["rm"]["error"]["kind"], "not_allowed");
    assert_eq!(results["outputs"]["error"]["kind"], "missing_outputs");
    assert!(
        results["outputs"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("never.tif")
    );
    assert_eq!(results["made"]["output"]["outputs"][0]["size"], 4);
    assert!(!dir.join("nothing").exists());
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_exec_task_from_the_command_line_then_wait() {
    let queue = unique_queue("single");
    let dir = scratch("single");
    let _worker = WorkerProcess::start(&queue, &dir, &["--allow-exec", "sha256sum"]);
    let data = dir.join("in.tif");
    std::fs::write(&data, b"pretend raster").unwrap();
    let submitted = run_warren(
        &[
            "submit",
            "--create-queue",
            "--queue",
            &queue,
            "exec",
            "--",
            "sha256sum",
            data.to_str().unwrap(),
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(submitted.code, Some(0), "{}", submitted.stderr);
    let batch = submitted.stdout.trim();
    let out = dir.join("r.jsonl");
    let waited = run_warren(
        &["wait", batch, "--output", out.to_str().unwrap()],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(waited.code, Some(0), "{}", waited.stderr);
    let results = read_results(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["output"]["exit_code"], 0);
    // Collected batches are cleaned up: waiting again finds nothing.
    let again = run_warren(&["wait", batch], None, MINUTE).await;
    assert_eq!(again.code, Some(2));
    assert!(again.stderr.contains("not found"), "{}", again.stderr);
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_exec_task_sets_cwd_env_labels_outputs_and_id_from_flags() {
    let queue = unique_queue("execflags");
    let dir = scratch("execflags");
    let _worker = WorkerProcess::start(&queue, &dir, &["--allow-exec", "sh"]);
    let done = run_warren(
        &[
            "submit",
            "--create-queue",
            "--queue",
            &queue,
            "--wait",
            "exec",
            "--cwd",
            dir.to_str().unwrap(),
            "--env",
            "GDAL_CACHEMAX=64",
            "--label",
            "step=cog",
            "--outputs",
            "made.txt",
            "--id",
            "scene-1",
            "--timeout-s",
            "30",
            "--",
            "sh",
            "-c",
            "echo $GDAL_CACHEMAX > made.txt; pwd",
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let results = read_results(&done.stdout);
    let r = &results[0];
    assert_eq!(r["task_id"], "scene-1");
    assert_eq!(r["labels"]["step"], "cog");
    assert_eq!(
        r["output"]["stdout"].as_str().unwrap().trim(),
        dir.to_str().unwrap()
    );
    assert_eq!(r["output"]["outputs"][0]["path"], "made.txt");
    assert_eq!(
        std::fs::read_to_string(dir.join("made.txt")).unwrap(),
        "64\n"
    );
    // A flag that is not NAME=VALUE is a usage error, before anything is sent.
    let bad = run_warren(
        &[
            "submit",
            "--create-queue",
            "--queue",
            &queue,
            "exec",
            "--env",
            "NOVALUE",
            "--",
            "sh",
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
    assert!(bad.stderr.contains("NAME=VALUE"), "{}", bad.stderr);
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fans_out_one_task_per_file_with_placeholders() {
    let queue = unique_queue("each");
    let dir = scratch("each");
    let raw = dir.join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    for name in ["b.tif", "a.tif", "notes.txt"] {
        std::fs::write(raw.join(name), name).unwrap();
    }
    let _worker = WorkerProcess::start(&queue, &dir, &["--allow-exec", "cp"]);
    let pattern = format!("{}/*.tif", raw.display());
    let done = run_warren(
        &[
            "submit",
            "--create-queue",
            "--queue",
            &queue,
            "--each",
            &pattern,
            "--wait",
            "exec",
            "--outputs",
            "{dir}/{stem}.copy.{ext}",
            "--label",
            "file={name}",
            "--",
            "cp",
            "{}",
            "{dir}/{stem}.copy.{ext}",
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    let results = read_results(&done.stdout);
    let mut files: Vec<&str> = results
        .iter()
        .map(|r| r["labels"]["file"].as_str().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["a.tif", "b.tif"],
        "one task per matching file, no more"
    );
    for r in &results {
        let item = r["labels"]["item"].as_str().unwrap();
        assert!(item.ends_with(r["labels"]["file"].as_str().unwrap()), "{r}");
    }
    assert_eq!(
        std::fs::read_to_string(raw.join("a.copy.tif")).unwrap(),
        "a.tif"
    );

    // Items from lines on stdin.
    let lines = format!(
        "{}\n\n{}\n",
        raw.join("notes.txt").display(),
        raw.join("a.tif").display()
    );
    let done = run_warren(
        &[
            "submit",
            "--create-queue",
            "--queue",
            &queue,
            "--each-line",
            "-",
            "--wait",
            "exec",
            "--",
            "cp",
            "{}",
            "{}.bak",
        ],
        Some(&lines),
        MINUTE,
    )
    .await;
    assert_eq!(done.code, Some(0), "{}", done.stderr);
    assert_eq!(read_results(&done.stdout).len(), 2);
    assert!(raw.join("notes.txt.bak").exists());

    // No match, and an unknown placeholder: named, nothing submitted.
    for (pattern, needle) in [
        (
            format!("{}/*.jp2", raw.display()),
            "matches no file".to_string(),
        ),
        (pattern.clone(), "unknown placeholder {stme}".to_string()),
    ] {
        let refused = run_warren(
            &[
                "submit",
                "--create-queue",
                "--queue",
                &queue,
                "--each",
                &pattern,
                "exec",
                "--",
                "cp",
                "{}",
                "{stme}.x",
            ],
            None,
            MINUTE,
        )
        .await;
        assert_eq!(refused.code, Some(2), "{}", refused.stderr);
        assert!(refused.stderr.contains(&needle), "{}", refused.stderr);
        assert!(refused.stdout.is_empty(), "no batch: {}", refused.stdout);
    }
    delete_queues(&queue).await;
}

/// Publishes a hand-made message to `queue`.
async fn publish_raw(channel: &lapin::Channel, queue: &str, body: &[u8], props: BasicProperties) {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
}

fn identified(id: &str, reply_to: &str) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(ShortString::from(id))
        .with_reply_to(ShortString::from(reply_to))
        .with_correlation_id("raw-batch".into())
        .with_delivery_mode(2)
}

fn envelope(id: &str, kind: &str, reply_to: &str, args: Value) -> Value {
    json!({"v": 1, "id": id, "batch": "raw-batch", "seq": 0, "kind": kind, "args": args, "reply_to": reply_to})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_answered_dead_lettered_and_never_stops_the_worker() {
    let queue = unique_queue("badinput");
    let replies = format!("{queue}.replies");
    let dir = scratch("badinput");
    let worker = WorkerProcess::start(&queue, &dir, &["--max-message-bytes", "2000"]);
    worker.wait_for_log("consuming", 1, MINUTE).await;
    let (conn, channel) = raw_channel().await;
    channel.confirm_select(Default::default()).await.unwrap();
    declare_classic(&channel, &replies).await;

    let pack = |v: &Value| rmp_serde::to_vec_named(v).unwrap();
    let mut no_kind = envelope("missing", "echo", &replies, json!(null));
    no_kind.as_object_mut().unwrap().remove("kind");
    let mut future = envelope("future", "echo", &replies, json!(null));
    future["v"] = json!(99);
    let big = envelope("big", "echo", &replies, json!("x".repeat(5000)));
    let mut no_seq = envelope("noseq", "echo", &replies, json!(null));
    no_seq.as_object_mut().unwrap().remove("seq");
    // A binary `id` is not a string, however valid its bytes would be as UTF-8.
    let mut binary_id = Vec::new();
    rmpv::encode::write_value(
        &mut binary_id,
        &rmpv::Value::Map(vec![
            ("v".into(), 1.into()),
            ("id".into(), rmpv::Value::Binary(b"binary".to_vec())),
            ("batch".into(), "raw-batch".into()),
            ("seq".into(), 1.into()),
            ("kind".into(), "echo".into()),
            ("reply_to".into(), replies.as_str().into()),
        ]),
    )
    .unwrap();
    let cases: Vec<(&str, Vec<u8>, BasicProperties)> = vec![
        (
            "garbage",
            b"\xc1 this is not msgpack".to_vec(),
            identified("garbage", &replies),
        ),
        ("future", pack(&future), identified("future", &replies)),
        ("missing", pack(&no_kind), identified("missing", &replies)),
        ("big", pack(&big), identified("big", &replies)),
        (
            "unknown",
            pack(&envelope("unknown", "frobnicate", &replies, json!({}))),
            identified("unknown", &replies),
        ),
        (
            "anonymous",
            b"\x00\x01".to_vec(),
            BasicProperties::default(),
        ),
        ("noseq", pack(&no_seq), identified("noseq", &replies)),
        ("binary", binary_id, identified("binary", &replies)),
    ];
    for (_, body, props) in &cases {
        publish_raw(&channel, &queue, body, props.clone()).await;
    }
    // The worker is still serving: a good task after all the bad ones succeeds. Its nil labels
    // are the same as none, and the envelope's id wins over a different message_id.
    let mut good = envelope("good", "echo", &replies, json!({"ok": true}));
    good["labels"] = json!(null);
    publish_raw(
        &channel,
        &queue,
        &pack(&good),
        identified("message-id-of-good", &replies),
    )
    .await;

    let results: HashMap<String, Value> = eventually(MINUTE, "8 replies", || async {
        let got = drain(&channel, &replies).await;
        (!got.is_empty()).then_some(got)
    })
    .await
    .into_iter()
    .map(|d| {
        let r: Value = rmp_serde::from_slice(&d.data).expect("result decodes");
        (r["task_id"].as_str().unwrap().to_string(), r)
    })
    .collect();
    let mut results = results;
    while results.len() < 8 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for d in drain(&channel, &replies).await {
            let r: Value = rmp_serde::from_slice(&d.data).unwrap();
            results.insert(r["task_id"].as_str().unwrap().to_string(), r);
        }
    }
    let expected = [
        ("garbage", "undecodable"),
        ("future", "unsupported_version"),
        ("missing", "missing_field"),
        ("big", "oversize"),
        ("unknown", "unknown_kind"),
        ("noseq", "missing_field"),
        ("binary", "invalid_field"),
    ];
    for (id, kind) in expected {
        let r = &results[id];
        assert_eq!(r["status"], "rejected", "{id}: {r}");
        assert_eq!(r["error"]["kind"], kind, "{id}: {r}");
        assert!(!r["error"]["message"].as_str().unwrap().is_empty());
    }
    for (id, field) in [("noseq", "seq"), ("binary", "id")] {
        let message = results[id]["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{id}: {message}");
    }
    assert_eq!(results["good"]["status"], "succeeded");

    let dead = eventually(MINUTE, "8 dead letters", || async {
        let got = drain(&channel, &format!("{queue}.dead")).await;
        (!got.is_empty()).then_some(got)
    })
    .await;
    let mut dead = dead;
    while dead.len() < 8 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        dead.extend(drain(&channel, &format!("{queue}.dead")).await);
    }
    let reasons: BTreeSet<String> = dead
        .iter()
        .map(|d| header(d, "x-warren-dead-reason").expect("reason header"))
        .collect();
    let want: BTreeSet<String> = [
        "undecodable",
        "unsupported_version",
        "missing_field",
        "oversize",
        "unknown_kind",
        "invalid_field",
    ]
    .map(String::from)
    .into();
    assert_eq!(reasons, want);
    assert_eq!(
        dead.len(),
        8,
        "every bad message is dead-lettered exactly once"
    );
    let anonymous = dead
        .iter()
        .find(|d| d.data == b"\x00\x01")
        .expect("anonymous message kept");
    assert_eq!(
        header(anonymous, "x-warren-dead-queue").as_deref(),
        Some(queue.as_str())
    );
    assert!(header(anonymous, "x-warren-dead-detail").is_some());
    assert!(worker.log_text().contains("dead-lettering"));

    let _ = channel
        .queue_delete(replies.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_on_its_last_delivery_is_answered_instead_of_vanishing() {
    // A task that keeps killing its worker reaches RabbitMQ's delivery limit (10) and would be
    // dead-lettered with no result; on the last delivery the worker answers instead.
    let queue = unique_queue("lastdelivery");
    let replies = format!("{queue}.replies");
    let dir = scratch("lastdelivery");
    let worker = WorkerProcess::start(&queue, &dir, &[]);
    worker.wait_for_log("consuming", 1, MINUTE).await;
    let (conn, channel) = raw_channel().await;
    channel.confirm_select(Default::default()).await.unwrap();
    declare_classic(&channel, &replies).await;
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-delivery-count".into(),
        lapin::types::AMQPValue::LongLongInt(9),
    );
    let body = rmp_serde::to_vec_named(&envelope("doomed", "echo", &replies, json!({}))).unwrap();
    publish_raw(
        &channel,
        &queue,
        &body,
        identified("doomed", &replies).with_headers(headers),
    )
    .await;
    let result = eventually(MINUTE, "an answer", || async {
        drain(&channel, &replies).await.pop()
    })
    .await;
    let result: Value = rmp_serde::from_slice(&result.data).unwrap();
    assert_eq!(
        (result["status"].as_str(), result["error"]["kind"].as_str()),
        (Some("failed"), Some("too_many_attempts")),
        "{result}"
    );
    assert_eq!(result["attempt"], 10);
    let dead = eventually(MINUTE, "the dead letter", || async {
        drain(&channel, &format!("{queue}.dead")).await.pop()
    })
    .await;
    assert_eq!(
        header(&dead, "x-warren-dead-reason").as_deref(),
        Some("too_many_attempts")
    );
    assert!(
        !worker.log_text().contains("task started"),
        "the task was not run again"
    );
    let _ = channel
        .queue_delete(replies.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_with_large_headers_costs_nothing_but_itself() {
    // RabbitMQ takes header blocks up to its frame size (128 KiB); a worker that asked for smaller
    // frames lost its connection on every delivery of such a message, and with it every other
    // task in flight.
    let queue = unique_queue("bigheaders");
    let replies = format!("{queue}.replies");
    let dir = scratch("bigheaders");
    let worker = WorkerProcess::start(&queue, &dir, &["--concurrency", "4"]);
    worker.wait_for_log("consuming", 1, MINUTE).await;
    let (conn, channel) = raw_channel().await;
    channel.confirm_select(Default::default()).await.unwrap();
    declare_classic(&channel, &replies).await;
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-client-notes".into(),
        lapin::types::AMQPValue::LongString("n".repeat(44_000).into()),
    );
    let pack = |v: &Value| rmp_serde::to_vec_named(v).unwrap();
    publish_raw(
        &channel,
        &queue,
        &pack(&envelope("heavy", "echo", &replies, json!(1))),
        identified("heavy", &replies).with_headers(headers),
    )
    .await;
    for id in ["a", "b", "c"] {
        let task = envelope(id, "sleep", &replies, json!({"ms": 300}));
        publish_raw(&channel, &queue, &pack(&task), identified(id, &replies)).await;
    }
    let mut results: HashMap<String, Value> = HashMap::new();
    let until = std::time::Instant::now() + MINUTE;
    while results.len() < 4 && std::time::Instant::now() < until {
        for d in drain(&channel, &replies).await {
            let r: Value = rmp_serde::from_slice(&d.data).unwrap();
            results.insert(r["task_id"].as_str().unwrap().to_string(), r);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        results.len(),
        4,
        "results: {results:?}\n{}",
        worker.log_text()
    );
    for id in ["heavy", "a", "b", "c"] {
        assert_eq!(results[id]["status"], "succeeded", "{id}: {}", results[id]);
    }
    assert!(
        !worker.log_text().contains("connection lost"),
        "{}",
        worker.log_text()
    );
    let _ = channel
        .queue_delete(replies.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
    delete_queues(&queue).await;
}
