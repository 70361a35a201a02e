//! `exec`: runs an allowed external command in its own process group, with captured output, a
//! stdin, and a check that the files it should create exist.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::handler::{HandlerFuture, Task, TaskFailure};

/// Default cap on captured bytes of stdout and of stderr, each.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1 << 20;

/// Which programs may run and how much of their output is kept.
#[derive(Debug, Clone)]
pub struct ExecPolicy {
    allowed: Vec<String>,
    max_output_bytes: usize,
}

impl ExecPolicy {
    /// Allows the programs in `allowed`: a bare name (`sha256sum`) allows exactly that `argv[0]`,
    /// found on PATH; a path allows exactly that path; `*` allows anything.
    pub fn new(allowed: Vec<String>) -> Self {
        Self {
            allowed,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
        }
    }

    /// Sets the cap on captured stdout and stderr bytes.
    pub fn with_max_output_bytes(mut self, bytes: usize) -> Self {
        self.max_output_bytes = bytes;
        self
    }

    /// Whether `program` (an `argv[0]`) may run.
    pub fn allows(&self, program: &str) -> bool {
        self.allowed.iter().any(|a| a == "*" || a == program)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecArgs {
    argv: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<PathBuf>,
    stdin: Option<String>,
    #[serde(default)]
    outputs: Vec<PathBuf>,
}

/// The `exec` handler for a policy.
pub fn handler(policy: ExecPolicy) -> impl Fn(Task) -> HandlerFuture + Send + Sync + 'static {
    let policy = Arc::new(policy);
    move |task: Task| -> HandlerFuture {
        let policy = Arc::clone(&policy);
        Box::pin(async move { run(&policy, &task).await })
    }
}

async fn run(policy: &ExecPolicy, task: &Task) -> Result<Value, TaskFailure> {
    let args: ExecArgs = task.args_as()?;
    let Some(program) = args.argv.first() else {
        return Err(TaskFailure::rejected(
            "invalid_args",
            "argv is empty: give at least the program to run",
        ));
    };
    if !policy.allows(program) {
        return Err(TaskFailure::rejected(
            "not_allowed",
            format!(
                "program '{program}' is not allowed on this worker; start the worker with \
                 --allow-exec {program} (or --allow-exec '*' to allow any program)"
            ),
        ));
    }
    let mut command = Command::new(program);
    command
        .args(&args.argv[1..])
        .envs(&args.env)
        .stdin(if args.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout can kill the command and everything it started.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(cwd) = &args.cwd {
        command.current_dir(cwd);
    }
    let started = Instant::now();
    let mut child = command.spawn().map_err(|e| {
        TaskFailure::failed("spawn_failed", format!("cannot start '{program}': {e}"))
    })?;
    let group = ProcessGroup(child.id());
    if let (Some(text), Some(mut stdin)) = (args.stdin, child.stdin.take()) {
        // A command that exits without reading its stdin closes the pipe: not an error.
        tokio::spawn(async move {
            let _ = stdin.write_all(text.as_bytes()).await;
        });
    }
    let stdout = tokio::spawn(capture(child.stdout.take(), policy.max_output_bytes));
    let stderr = tokio::spawn(capture(child.stderr.take(), policy.max_output_bytes));
    let status = child
        .wait()
        .await
        .map_err(|e| TaskFailure::failed("wait_failed", format!("waiting for '{program}': {e}")))?;
    // Background children of the command would keep the pipes open; they die with the group.
    drop(group);
    let stdout = stdout.await.unwrap_or_default();
    let stderr = stderr.await.unwrap_or_default();
    let duration_ms = started.elapsed().as_millis() as u64;

    let mut outputs = Vec::new();
    let mut missing = Vec::new();
    for path in &args.outputs {
        let full = match &args.cwd {
            Some(cwd) if path.is_relative() => cwd.join(path),
            _ => path.clone(),
        };
        match std::fs::metadata(&full) {
            Ok(meta) => outputs.push(json!({"path": path, "size": meta.len()})),
            Err(_) => missing.push(path.display().to_string()),
        }
    }
    let output = json!({
        "exit_code": status.code(),
        "signal": std::os::unix::process::ExitStatusExt::signal(&status),
        "stdout": stdout.text(),
        "stderr": stderr.text(),
        "stdout_bytes": stdout.total,
        "stderr_bytes": stderr.total,
        "truncated": stdout.truncated() || stderr.truncated(),
        "duration_ms": duration_ms,
        "outputs": outputs,
    });
    if !status.success() {
        let message = match status.code() {
            Some(code) => format!("'{program}' exited with status {code}"),
            None => format!("'{program}' was killed by a signal ({status})"),
        };
        return Err(TaskFailure::failed("exit_status", message).with_output(output));
    }
    if !missing.is_empty() {
        return Err(TaskFailure::failed(
            "missing_outputs",
            format!(
                "'{program}' succeeded but did not create: {}",
                missing.join(", ")
            ),
        )
        .with_output(output));
    }
    Ok(output)
}

/// Kills a whole process group when dropped: on completion, timeout or cancellation alike.
struct ProcessGroup(Option<u32>);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            // ESRCH (the group is already gone) is the normal case after a clean exit.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

#[derive(Default)]
struct Captured {
    kept: Vec<u8>,
    total: u64,
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.kept).into_owned()
    }

    fn truncated(&self) -> bool {
        self.total > self.kept.len() as u64
    }
}

/// Reads a pipe to its end, keeping the first `limit` bytes; the rest is counted and discarded so
/// the command never blocks on a full pipe.
async fn capture(pipe: Option<impl AsyncRead + Unpin>, limit: usize) -> Captured {
    let mut captured = Captured::default();
    let Some(mut pipe) = pipe else {
        return captured;
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                captured.total += n as u64;
                let room = limit.saturating_sub(captured.kept.len());
                captured.kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    captured
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let out = run(&any(), &task(json!({"argv": ["sh", "-c", "cat; echo \"$X\"; echo err >&2"], "env": {"X": "hi"}, "stdin": "in\n"})))
            .await
            .unwrap();
        assert_eq!(out["stdout"], "in\nhi\n");
        assert_eq!(out["stderr"], "err\n");
        assert_eq!(out["exit_code"], 0);
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
}
