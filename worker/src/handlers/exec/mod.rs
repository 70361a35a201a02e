//! `exec`: runs an allowed external command in its own process group, with a clean environment,
//! captured output, a stdin, and a check that the files it should create exist.

mod policy;
mod reaper;
mod sandbox;

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::handler::{HandlerFuture, Task, TaskFailure};
pub use policy::{BASE_ENV, DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_TASK_ENV, ExecPolicy};
use reaper::ProcessGroup;
pub use sandbox::{Limits, SYSTEM_READ_ROOTS, Sandbox, SandboxConfig};
use warren_broker::protocol::{ErrorKind, ExecArgs};

/// How long output is still read after a command exits: a background process that escaped the
/// command's process group (`setsid`) and holds its stdout must not hold up the result.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// The `exec` handler for a policy.
pub fn handler(policy: ExecPolicy) -> impl Fn(Task) -> HandlerFuture + Send + Sync + 'static {
    let policy = Arc::new(policy);
    reaper::start();
    move |task: Task| -> HandlerFuture {
        let policy = Arc::clone(&policy);
        Box::pin(async move { run(&policy, &task).await })
    }
}

async fn run(policy: &ExecPolicy, task: &Task) -> Result<Value, TaskFailure> {
    let mut args: ExecArgs = task.args_as()?;
    let program = checked_program(&args)?.to_owned();
    let sandbox = policy.sandbox();
    // `_prepared` holds the command's private TMPDIR until the command is done.
    let (command, _prepared) = command_for(policy, &args, &program)?;
    let ran = execute(
        command,
        args.stdin.take(),
        task.timeout,
        policy.max_output_bytes(),
    )
    .await
    .map_err(|e| e.for_program(&program))?;
    let (outputs, missing) = find_outputs(sandbox, &args);
    let output = json!({
        "exit_code": ran.status.and_then(|s| s.code()),
        "signal": ran.status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
        "stdout": ran.stdout.text(),
        "stderr": ran.stderr.text(),
        "stdout_bytes": ran.stdout.total,
        "stderr_bytes": ran.stderr.total,
        "truncated": ran.stdout.truncated() || ran.stderr.truncated(),
        "duration_ms": ran.duration_ms,
        "outputs": outputs,
    });
    let Some(status) = ran.status else {
        return Err(TaskFailure::timed_out(format!(
            "'{program}' ran longer than its limit of {:?}; its process group was killed (output up to then is kept)",
            task.timeout
        ))
        .with_output(output));
    };
    if !status.success() {
        let message = match status.code() {
            Some(code) => format!("'{program}' exited with status {code}"),
            None => format!("'{program}' was killed by a signal ({status})"),
        };
        let retryable = match (&args.retry_exit_codes, status.code()) {
            (None, _) => true,
            (Some(codes), Some(code)) => codes.contains(&code),
            (Some(_), None) => false,
        };
        let failure = if retryable {
            TaskFailure::of(ErrorKind::ExitStatus, message)
        } else {
            TaskFailure::permanent(ErrorKind::ExitStatus, message)
        };
        return Err(failure.with_output(output));
    }
    if !missing.is_empty() {
        return Err(TaskFailure::of(
            ErrorKind::MissingOutputs,
            format!(
                "'{program}' succeeded but did not create: {}",
                missing.join(", ")
            ),
        )
        .with_output(output));
    }
    Ok(output)
}

/// The program to run: argv's first entry, once argv is known to be one a program can receive.
fn checked_program(args: &ExecArgs) -> Result<&str, TaskFailure> {
    let Some(program) = args.argv.first() else {
        return Err(TaskFailure::of(
            ErrorKind::InvalidArgs,
            "argv is empty: give at least the program to run",
        ));
    };
    // A NUL byte cannot reach a program (C strings end there): refused as the env rule does.
    if let Some(at) = args.argv.iter().position(|a| a.contains('\0')) {
        return Err(TaskFailure::of(
            ErrorKind::InvalidArgs,
            format!("argv[{at}] holds a NUL byte, which no program can receive"),
        ));
    }
    Ok(program)
}

/// The command a task asks for, as the policy allows it: resolved program, clean environment,
/// its own process group, and (with a sandbox) the confinement it enters before `exec`.
fn command_for(
    policy: &ExecPolicy,
    args: &ExecArgs,
    program: &str,
) -> Result<(Command, Option<sandbox::Prepared>), TaskFailure> {
    let resolved = policy.resolve(program)?;
    let mut env = policy.command_env(&args.env)?;
    let sandbox = policy.sandbox();
    if let Some(sandbox) = sandbox {
        check_paths(sandbox, args)?;
    }
    if let Some(cwd) = &args.cwd
        && !cwd.is_dir()
    {
        return Err(TaskFailure::of(
            ErrorKind::CwdMissing,
            format!(
                "cannot start '{program}': its cwd {} is not a folder on this worker",
                cwd.display()
            ),
        ));
    }
    let prepared = match sandbox {
        Some(sandbox) => Some(
            {
                let limits = sandbox
                    .limits_for(args.limits.as_ref())
                    .map_err(|e| TaskFailure::of(ErrorKind::InvalidArgs, e))?;
                sandbox.prepare(&resolved.path, limits)
            }
            .map_err(|e| {
                TaskFailure::of(
                    ErrorKind::SpawnFailed,
                    format!("cannot start '{program}': {e}"),
                )
            })?,
        ),
        None => None,
    };
    if let Some(prepared) = &prepared {
        // A private HOME and TMPDIR: nothing a task leaves there reaches another task.
        env.retain(|(name, _)| name != "HOME" && name != "TMPDIR");
        env.push(("HOME".into(), prepared.tmpdir().into()));
        env.push(("TMPDIR".into(), prepared.tmpdir().into()));
    }
    let mut command = Command::new(&resolved.path);
    command
        .arg0(&resolved.arg0)
        .args(&args.argv[1..])
        .env_clear()
        .envs(env)
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
    let worker_pid = nix::unistd::getpid();
    // SAFETY: die_with_parent makes only async-signal-safe calls (prctl, getppid).
    unsafe {
        command.pre_exec(move || reaper::die_with_parent(worker_pid));
    }
    if let Some(prepared) = &prepared {
        if let (Some(uid), Some(gid)) = (prepared.uid, prepared.gid) {
            command.uid(uid).gid(gid);
        }
        // SAFETY: `enter` makes only system calls (setrlimit, prctl, capset, landlock).
        unsafe {
            command.pre_exec(prepared.enter());
        }
    }
    Ok((command, prepared))
}

/// What a command did: its exit (`None` when it ran out of time and was killed), its output
/// and how long it ran.
struct Ran {
    status: Option<std::process::ExitStatus>,
    stdout: Captured,
    stderr: Captured,
    duration_ms: u64,
}

/// Why a command could not be run to its end, before the program's name is added.
enum ExecuteError {
    Spawn(std::io::Error),
    Wait(std::io::Error),
}

impl ExecuteError {
    fn for_program(self, program: &str) -> TaskFailure {
        match self {
            Self::Spawn(e) => TaskFailure::of(
                ErrorKind::SpawnFailed,
                format!("cannot start '{program}': {e}"),
            ),
            Self::Wait(e) => TaskFailure::of(
                ErrorKind::WaitFailed,
                format!("waiting for '{program}': {e}"),
            ),
        }
    }
}

/// Starts the command, feeds its stdin, captures its output (the first `limit` bytes of each
/// stream) and waits for it at most `timeout`, then kills what it left running.
async fn execute(
    mut command: Command,
    stdin: Option<String>,
    timeout: Duration,
    limit: usize,
) -> Result<Ran, ExecuteError> {
    let started = Instant::now();
    let mut child = command.spawn().map_err(ExecuteError::Spawn)?;
    let group = ProcessGroup::register(child.id());
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A command that exits without reading its stdin closes the pipe: not an error.
        tokio::spawn(async move {
            let _ = pipe.write_all(text.as_bytes()).await;
        });
    }
    let stop_reading = CancellationToken::new();
    let stdout = tokio::spawn(capture(child.stdout.take(), limit, stop_reading.clone()));
    let stderr = tokio::spawn(capture(child.stderr.take(), limit, stop_reading.clone()));
    // The limit is enforced here rather than only by the runtime dropping this future, so that a
    // command that runs too long is reported with the output it wrote until then.
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    // The result follows the command's exit: what it started in the background dies with it (and
    // on a timeout, the command's whole process group is killed here).
    drop(group);
    let status = match waited {
        Ok(status) => Some(status.map_err(ExecuteError::Wait)?),
        Err(_) => {
            // Reap the killed leader; the drain below bounds the wait for its pipes.
            let _ = tokio::time::timeout(OUTPUT_DRAIN, child.wait()).await;
            None
        }
    };
    let _drain_deadline = {
        let stop = stop_reading.clone();
        AbortOnDropHandle::new(tokio::spawn(async move {
            tokio::time::sleep(OUTPUT_DRAIN).await;
            stop.cancel();
        }))
    };
    let stdout = stdout.await.unwrap_or_default();
    let stderr = stderr.await.unwrap_or_default();
    Ok(Ran {
        status,
        stdout,
        stderr,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// The declared outputs that exist (path and size) and those that do not.
fn find_outputs(sandbox: Option<&Sandbox>, args: &ExecArgs) -> (Vec<Value>, Vec<String>) {
    let mut outputs = Vec::new();
    let mut missing = Vec::new();
    for path in &args.outputs {
        let full = match &args.cwd {
            Some(cwd) if path.is_relative() => cwd.join(path),
            _ => path.clone(),
        };
        // Checked again now: the command may have made the output a symlink to a file outside
        // the roots, which the (unconfined) worker must not describe.
        if sandbox.is_some_and(|s| !s.within_data_roots(&full)) {
            missing.push(format!("{} (leads outside the data roots)", path.display()));
            continue;
        }
        match std::fs::metadata(&full) {
            Ok(meta) => outputs.push(json!({"path": path, "size": meta.len()})),
            Err(_) => missing.push(path.display().to_string()),
        }
    }
    (outputs, missing)
}

/// Rejects a `cwd` or an output outside the sandbox's data roots, before anything looks at them
/// (so a task cannot learn whether a file exists elsewhere).
fn check_paths(sandbox: &Sandbox, args: &ExecArgs) -> Result<(), TaskFailure> {
    let base = match &args.cwd {
        Some(cwd) => cwd.clone(),
        None => std::env::current_dir().unwrap_or_default(),
    };
    let outside = |what: &str, path: &std::path::Path| {
        TaskFailure::of(
            ErrorKind::PathNotAllowed,
            format!(
                "{what} {} is outside the worker's data roots (--data-root): commands may only \
                 work there",
                path.display()
            ),
        )
    };
    if let Some(cwd) = &args.cwd
        && !sandbox.within_data_roots(&base.join(cwd))
    {
        return Err(outside("cwd", cwd));
    }
    for output in &args.outputs {
        if !sandbox.within_data_roots(&base.join(output)) {
            return Err(outside("output", output));
        }
    }
    Ok(())
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

/// Reads a pipe to its end (or until `stop`), keeping the first `limit` bytes; the rest is counted and discarded so
/// the command never blocks on a full pipe.
async fn capture(
    pipe: Option<impl AsyncRead + Unpin>,
    limit: usize,
    stop: CancellationToken,
) -> Captured {
    let mut captured = Captured::default();
    let Some(mut pipe) = pipe else {
        return captured;
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            read = pipe.read(&mut buf) => read,
            () = stop.cancelled() => break,
        };
        match read {
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
mod tests;
