use super::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use warren_broker::protocol::TaskStatus;

fn task(args: Value) -> Task {
    Task {
        id: "t".into(),
        batch: "b".into(),
        kind: "exec".into(),
        args,
        attempt: 1,
        labels: BTreeMap::new(),
        timeout: Duration::from_secs(5),
    }
}

fn any() -> ExecPolicy {
    ExecPolicy::new(vec!["*".into()])
}

#[tokio::test]
async fn captures_stdout_stdin_env_and_exit_code() {
    let out = run(&any(), &task(json!({"argv": ["sh", "-c", "cat; echo \"$OMP_NUM_THREADS\"; echo err >&2"], "env": {"OMP_NUM_THREADS": "hi"}, "stdin": "in\n"})))
        .await
        .unwrap();
    assert_eq!(out["stdout"], "in\nhi\n");
    assert_eq!(out["stderr"], "err\n");
    assert_eq!(out["exit_code"], 0);
}

#[tokio::test]
async fn nul_bytes_in_argv_and_env_are_refused_alike() {
    for args in [
        json!({"argv": ["sh", "-c", "echo a\0b"]}),
        json!({"argv": ["sh"], "env": {"LANG": "C\0"}}),
    ] {
        let err = run(&any(), &task(args.clone())).await.unwrap_err();
        assert_eq!(
            (err.status, err.error.kind.as_str()),
            (TaskStatus::Rejected, "invalid_args"),
            "{args}"
        );
    }
}

#[tokio::test]
async fn non_zero_exit_fails_with_output() {
    let err = run(
        &any(),
        &task(json!({"argv": ["sh", "-c", "echo oops >&2; exit 3"]})),
    )
    .await
    .unwrap_err();
    assert_eq!(
        (err.status, err.error.kind.as_str()),
        (TaskStatus::Failed, "exit_status")
    );
    assert_eq!(err.output["exit_code"], 3);
    assert_eq!(err.output["stderr"], "oops\n");
}

#[tokio::test]
async fn disallowed_program_is_rejected_and_not_run() {
    let policy = ExecPolicy::new(vec!["sha256sum".into()]);
    let err = run(
        &policy,
        &task(json!({"argv": ["touch", "/tmp/warren-should-not-exist"]})),
    )
    .await
    .unwrap_err();
    assert_eq!(
        (err.status, err.error.kind.as_str()),
        (TaskStatus::Rejected, "not_allowed")
    );
    assert!(err.error.message.contains("--allow-exec touch"));
    // A path is not the bare name it ends with.
    assert!(!policy.allows("/tmp/evil/sha256sum"));
}

#[tokio::test]
async fn output_is_truncated_at_the_limit_but_counted() {
    let policy = any().with_max_output_bytes(10);
    let out = run(
        &policy,
        &task(json!({"argv": ["sh", "-c", "head -c 100000 /dev/zero"]})),
    )
    .await
    .unwrap();
    assert_eq!(out["stdout_bytes"], 100000);
    assert_eq!(out["stdout"].as_str().unwrap().len(), 10);
    assert_eq!(out["truncated"], true);
}

#[tokio::test]
async fn missing_outputs_fail_and_present_ones_are_sized() {
    let dir = std::env::temp_dir().join(format!("warren-exec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let args = json!({"argv": ["sh", "-c", "printf abc > made"], "cwd": dir, "outputs": ["made", "not-made"]});
    let err = run(&any(), &task(args)).await.unwrap_err();
    assert_eq!(err.error.kind, "missing_outputs");
    assert!(err.error.message.contains("not-made"));
    assert_eq!(err.output["outputs"][0]["size"], 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn dropping_the_future_kills_the_whole_group() {
    let marker = std::env::temp_dir().join(format!("warren-kill-{}", std::process::id()));
    let script = format!("(sleep 1; touch {}) & sleep 30", marker.display());
    let (policy, task) = (any(), task(json!({"argv": ["sh", "-c", script]})));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), run(&policy, &task))
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!marker.exists(), "a background child outlived the timeout");
}

#[tokio::test]
async fn bad_args_and_unknown_programs_are_clear() {
    let err = run(&any(), &task(json!({"argv": []}))).await.unwrap_err();
    assert_eq!(err.error.kind, "invalid_args");
    let err = run(&any(), &task(json!({"argv": ["x"], "bogus": 1})))
        .await
        .unwrap_err();
    assert!(err.error.message.contains("bogus"), "{}", err.error.message);
    let err = run(&any(), &task(json!({"argv": ["/no/such/program"]})))
        .await
        .unwrap_err();
    assert_eq!(err.error.kind, "spawn_failed");
}

/// A folder holding a fake `sha256sum` that leaves a marker when it runs.
fn trap(test: &str) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("warren-trap-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let marker = dir.join("escaped");
    let fake = dir.join("sha256sum");
    std::fs::write(&fake, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, marker)
}

#[tokio::test]
async fn the_task_cannot_swap_an_allowed_program() {
    let (dir, marker) = trap("swap");
    let policy = ExecPolicy::new(vec!["sha256sum".into()]);
    // Its own PATH is refused outright.
    let err = run(
        &policy,
        &task(json!({"argv": ["sha256sum", "/dev/null"], "env": {"PATH": dir}})),
    )
    .await
    .unwrap_err();
    assert_eq!(
        (err.status, err.error.kind.as_str()),
        (TaskStatus::Rejected, "env_not_allowed")
    );
    // A cwd holding a program of the same name, or a relative name, changes nothing.
    let out = run(
        &policy,
        &task(json!({"argv": ["sha256sum", "/dev/null"], "cwd": dir})),
    )
    .await
    .unwrap();
    assert!(
        out["stdout"].as_str().unwrap().starts_with("e3b0c442"),
        "{out}"
    );
    for argv0 in ["./sha256sum", dir.join("sha256sum").to_str().unwrap()] {
        let err = run(&policy, &task(json!({"argv": [argv0], "cwd": dir})))
            .await
            .unwrap_err();
        assert_eq!(err.error.kind, "not_allowed");
    }
    for (name, value) in [
        ("LD_PRELOAD", "/tmp/evil.so"),
        ("BASH_ENV", "/tmp/evil.sh"),
        ("ENV", "/tmp/evil.sh"),
    ] {
        let err = run(
            &policy,
            &task(json!({"argv": ["sha256sum"], "env": {name: value}})),
        )
        .await
        .unwrap_err();
        assert_eq!(err.error.kind, "env_not_allowed", "{name}");
    }
    assert!(!marker.exists(), "the task's own sha256sum ran");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn commands_get_a_clean_environment_and_their_own_argv0() {
    let out = run(
        &any(),
        &task(
            json!({"argv": ["sh", "-c", "env; echo \"arg0=$0\""], "env": {"GDAL_CACHEMAX": "512"}}),
        ),
    )
    .await
    .unwrap();
    let stdout = out["stdout"].as_str().unwrap();
    let names: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once('=').map(|(n, _)| n))
        .filter(|n| *n != "arg0" && *n != "PWD" && *n != "SHLVL" && *n != "_")
        .collect();
    for name in &names {
        assert!(
            BASE_ENV.contains(name) || *name == "GDAL_CACHEMAX",
            "leaked {name}: {stdout}"
        );
    }
    assert!(stdout.contains("GDAL_CACHEMAX=512"), "{stdout}");
    // argv[0] is the name the task gave, not the resolved path.
    assert!(stdout.contains("arg0=sh\n"), "{stdout}");
}

#[tokio::test]
async fn a_background_process_holding_stdout_does_not_hold_the_result() {
    // setsid takes the sleeper out of the command's process group, so it is not killed with
    // it; the result must still follow the command's own exit.
    let started = Instant::now();
    let out = run(
        &any(),
        &task(json!({"argv": ["sh", "-c", "setsid sleep 20 & echo done"]})),
    )
    .await
    .unwrap();
    assert_eq!(out["exit_code"], 0);
    assert_eq!(out["stdout"], "done\n");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_missing_cwd_is_named() {
    let err = run(
        &any(),
        &task(json!({"argv": ["true"], "cwd": "/no/such/folder"})),
    )
    .await
    .unwrap_err();
    assert_eq!(err.error.kind, "cwd_missing");
    assert!(
        err.error.message.contains("/no/such/folder"),
        "{}",
        err.error.message
    );
}
