//! Built-in handlers: `exec` (external commands), `echo` and `sleep` (tests and benchmarks).

pub mod exec;

use std::time::Duration;

use serde_json::json;
use warren_broker::protocol::SleepArgs;

use crate::handler::{HandlerResult, Task, TaskFailure};

/// `echo`: returns its arguments unchanged.
pub async fn echo(task: Task) -> HandlerResult {
    Ok(task.args)
}

/// `sleep`: waits `{"ms": N}` milliseconds, then succeeds.
pub async fn sleep(task: Task) -> HandlerResult {
    let args: SleepArgs = task.args_as()?;
    let wanted = Duration::from_millis(args.ms);
    if wanted > task.timeout {
        tokio::time::sleep(task.timeout).await;
        return Err(TaskFailure::timed_out(format!(
            "slept for the task's limit of {:?} of the {:?} asked",
            task.timeout, wanted
        )));
    }
    tokio::time::sleep(wanted).await;
    Ok(json!({ "slept_ms": args.ms }))
}
