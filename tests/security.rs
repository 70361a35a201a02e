//! A task is untrusted input. These tests try, as a hostile client would, to turn an `exec`
//! worker into a remote shell or to read its secrets, and check that commands die with a killed
//! worker so that a redelivered task never runs twice at once.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// Submits `tasks` to `queue` and waits for their results, keyed by task id.
async fn run_tasks(
    queue: &str,
    dir: &std::path::Path,
    tasks: &[serde_json::Value],
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let file = dir.join("tasks.jsonl");
    write_tasks(&file, tasks);
    let out = dir.join("results.jsonl");
    let done = submit_file(queue, &file, &["--wait", "--output", out.to_str().unwrap()]).await;
    assert!(done.code.is_some(), "{}", done.stderr);
    by_task_id(read_results(
        &std::fs::read_to_string(&out).unwrap_or_default(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_cannot_escape_the_allowlist_or_read_the_workers_secrets() {
    use std::os::unix::fs::PermissionsExt;
    let queue = unique_queue("escape");
    let dir = scratch("escape");
    // A folder the attacker controls, holding programs named like the allowed ones.
    let marker = dir.join("escaped");
    for name in ["sha256sum", "cat"] {
        let fake = dir.join(name);
        std::fs::write(&fake, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let evil_rc = dir.join("rc.sh");
    std::fs::write(&evil_rc, format!("touch {}\n", marker.display())).unwrap();
    let _worker = WorkerProcess::start_with(
        &queue,
        &dir,
        // /proc opened to commands on purpose: their own environ is what is checked here.
        &[
            "--allow-exec",
            "sha256sum",
            "--allow-exec",
            "cat",
            "--sandbox-read",
            "/proc",
        ],
        &[("WARREN_AMQP_PASSWORD_FILE_HINT", "s3cret-canary")],
    );
    let d = dir.to_str().unwrap();
    let results = run_tasks(
        &queue,
        &dir,
        &[
            json!({"id": "path", "kind": "exec", "args": {"argv": ["sha256sum", "/dev/null"], "env": {"PATH": d}}}),
            json!({"id": "dot-path", "kind": "exec", "args": {"argv": ["sha256sum", "/dev/null"], "env": {"PATH": "."}, "cwd": d}}),
            json!({"id": "cwd", "kind": "exec", "args": {"argv": ["sha256sum", "/dev/null"], "cwd": d}}),
            json!({"id": "relative", "kind": "exec", "args": {"argv": ["./sha256sum"], "cwd": d}}),
            json!({"id": "preload", "kind": "exec", "args": {"argv": ["sha256sum", "/dev/null"], "env": {"LD_PRELOAD": format!("{d}/evil.so")}}}),
            json!({"id": "bash-env", "kind": "exec", "args": {"argv": ["sha256sum", "/dev/null"], "env": {"BASH_ENV": evil_rc}}}),
            json!({"id": "bash-func", "kind": "exec", "args": {"argv": ["sha256sum", "/dev/null"], "env": {"BASH_FUNC_sha256sum%%": "() { touch x; }"}}}),
            json!({"id": "environ", "kind": "exec", "args": {"argv": ["cat", "/proc/self/environ"]}}),
        ],
    )
    .await;
    assert_eq!(results.len(), 8, "{results:?}");
    for id in ["path", "dot-path", "preload", "bash-env", "bash-func"] {
        assert_eq!(results[id]["status"], "rejected", "{id}: {}", results[id]);
        assert_eq!(results[id]["error"]["kind"], "env_not_allowed", "{id}");
    }
    assert_eq!(results["relative"]["error"]["kind"], "not_allowed");
    // The allowed program ran, from the worker's PATH, not the task's folder.
    assert_eq!(results["cwd"]["status"], "succeeded", "{}", results["cwd"]);
    assert!(
        results["cwd"]["output"]["stdout"]
            .as_str()
            .unwrap()
            .starts_with("e3b0c442")
    );
    assert!(!marker.exists(), "a task ran its own program");
    // The command's environment holds none of the worker's settings or secrets.
    let environ = results["environ"]["output"]["stdout"].as_str().unwrap();
    assert_eq!(results["environ"]["status"], "succeeded");
    for leak in ["WARREN_", "guest", "s3cret-canary", "amqp://"] {
        assert!(!environ.contains(leak), "{leak} leaked: {environ:?}");
    }
    assert!(environ.contains("PATH="), "{environ:?}");
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_may_pass_variables_on_and_allow_named_task_variables() {
    let queue = unique_queue("passenv");
    let dir = scratch("passenv");
    let _worker = WorkerProcess::start_with(
        &queue,
        &dir,
        &[
            "--allow-exec",
            "sh",
            "--pass-env",
            "GDAL_DATA",
            "--allow-task-env",
            "PYTHONPATH",
        ],
        &[("GDAL_DATA", "/usr/share/gdal"), ("NOT_PASSED", "x")],
    );
    let script = "echo \"$GDAL_DATA|$PYTHONPATH|$GDAL_CACHEMAX|${NOT_PASSED:-unset}\"";
    let results = run_tasks(
        &queue,
        &dir,
        &[
            json!({"id": "t", "kind": "exec", "args": {"argv": ["sh", "-c", script], "env": {"PYTHONPATH": "/opt/py", "GDAL_CACHEMAX": "512"}}}),
        ],
    )
    .await;
    assert_eq!(
        results["t"]["output"]["stdout"], "/usr/share/gdal|/opt/py|512|unset\n",
        "{}",
        results["t"]
    );
    // A worker refuses to hand its own settings to commands.
    let refused = run_warren(
        &[
            "worker",
            "--queue",
            &queue,
            "--allow-exec",
            "sh",
            "--pass-env",
            "WARREN_AMQP_URL",
        ],
        None,
        MINUTE,
    )
    .await;
    assert_eq!(refused.code, Some(2));
    assert!(
        refused.stderr.contains("WARREN_AMQP_URL"),
        "{}",
        refused.stderr
    );
    delete_queues(&queue).await;
}

/// Process ids whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    found
}

/// Process ids whose parent is one of `parents`.
fn children_of(parents: &[String]) -> Vec<String> {
    let mut kids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // The parent pid is the second field after the parenthesised command name.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        if let Some(ppid) = after.split_whitespace().nth(1)
            && parents.iter().any(|p| p == ppid)
        {
            kids.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    kids
}

/// Whether `pid` is a live process (a zombie is dead, only not yet collected by its parent).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_die_with_a_killed_worker() {
    let queue = unique_queue("orphans");
    let dir = scratch("orphans");
    let mut worker = WorkerProcess::start(&queue, &dir, &["--allow-exec", "sh"]);
    // A shell recognisable by its $0, with a foreground and a background child.
    let tag = format!("warren-orphan-{}", uuid::Uuid::now_v7().simple());
    let file = dir.join("tasks.jsonl");
    write_tasks(
        &file,
        &[
            json!({"id": "long", "kind": "exec", "args": {"argv": ["sh", "-c", "sleep 300 & sleep 301; true", tag.clone()]}}),
        ],
    );
    let submitted = submit_file(&queue, &file, &[]).await;
    assert_eq!(submitted.code, Some(0), "{}", submitted.stderr);
    let family = eventually(
        MINUTE,
        "the command and its two children to start",
        || async {
            let shell = processes_with(&tag);
            let kids = children_of(&shell);
            (shell.len() == 1 && kids.len() == 2).then(|| [shell, kids].concat())
        },
    )
    .await;
    worker.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = worker.exit_code(MINUTE).await;
    eventually(
        Duration::from_secs(10),
        "the command and its background child to die with the worker",
        || async { family.iter().all(|pid| !alive(pid)).then_some(()) },
    )
    .await;
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_result_is_not_taken_and_the_real_one_is() {
    let queue = unique_queue("forged");
    let dir = scratch("forged");
    let file = dir.join("tasks.jsonl");
    write_tasks(
        &file,
        &(0..3)
            .map(|i| json!({"kind": "echo", "args": {"real": i}}))
            .collect::<Vec<_>>(),
    );
    let submitted = submit_file(&queue, &file, &[]).await;
    assert_eq!(submitted.code, Some(0), "{}", submitted.stderr);
    let batch = submitted.stdout.trim().to_string();
    // Anyone who may publish to the result queue tries to answer task 0 first, and to slip in a
    // result of another batch and one beyond the batch's size.
    let (conn, channel) = raw_channel().await;
    let forge = |batch: &str, seq: u32| {
        rmp_serde::to_vec_named(&json!({
            "v": 1, "task_id": format!("forged-{seq}"), "batch": batch, "seq": seq, "kind": "echo",
            "status": "succeeded", "output": {"forged": true}, "worker": "mallory", "attempt": 1,
            "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:00Z"
        }))
        .unwrap()
    };
    for body in [
        forge(&batch, 0),
        forge("another-batch", 1),
        forge(&batch, 7),
    ] {
        publish_raw(&channel, &format!("warren.results.{batch}"), &body).await;
    }
    let _ = conn.close(200, "bye".into()).await;
    let _worker = WorkerProcess::start(&queue, &dir, &[]);
    let (waited, results) = wait_into(&batch, &dir.join("results.jsonl")).await;
    assert_eq!(results.len(), 3, "{results:?}");
    for r in &results {
        assert_ne!(r["worker"], "mallory", "a forged result was taken: {r}");
        assert_eq!(r["output"]["real"], r["seq"], "{r}");
        assert!(
            r.get("token").is_none(),
            "the batch secret leaked into the output: {r}"
        );
    }
    // By the time the collector is done, each forged result is in the dead-letter queue, saying
    // why (the collector republished it with confirms before acking it).
    let (conn, channel) = raw_channel().await;
    let dead = drain(&channel, &format!("{queue}.dead")).await;
    let _ = conn.close(200, "bye".into()).await;
    assert_eq!(
        dead.len(),
        3,
        "the forged results are dead-lettered; warren wait said:\n{waited}"
    );
    let mut details: Vec<String> = dead
        .iter()
        .map(|d| {
            assert_eq!(
                header(d, "x-warren-dead-reason").as_deref(),
                Some("foreign_result")
            );
            header(d, "x-warren-dead-detail").unwrap_or_default()
        })
        .collect();
    details.sort();
    assert!(
        details.iter().any(|d| d.contains("another-batch"))
            && details.iter().any(|d| d.contains("seq 7"))
            && details.iter().any(|d| d.contains("token")),
        "{details:?}"
    );
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_token_stays_out_of_the_most_verbose_logs() {
    let queue = unique_queue("tokenlog");
    let dir = scratch("tokenlog");
    let worker = WorkerProcess::start_with(&queue, &dir, &[], &[("WARREN_LOG", "trace")]);
    let results = run_tasks(
        &queue,
        &dir,
        &[json!({"id": "t", "kind": "echo", "args": 1})],
    )
    .await;
    assert_eq!(results["t"]["status"], "succeeded");
    let log = worker.log_text();
    assert!(log.contains("TRACE"), "the log is at trace level: {log}");
    assert!(
        !log.contains("x-warren-token"),
        "a frame dump shows the task's headers"
    );
}
