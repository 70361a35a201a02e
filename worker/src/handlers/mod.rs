//! Built-in handlers: `exec` (external commands), `echo` and `sleep` (tests and benchmarks).

pub mod exec;

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use crate::handler::{HandlerResult, Task};

/// `echo`: returns its arguments unchanged.
pub async fn echo(task: Task) -> HandlerResult {
    Ok(task.args)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepArgs {
    ms: u64,
}

/// `sleep`: waits `{"ms": N}` milliseconds, then succeeds.
pub async fn sleep(task: Task) -> HandlerResult {
    let args: SleepArgs = task.args_as()?;
    tokio::time::sleep(Duration::from_millis(args.ms)).await;
    Ok(json!({ "slept_ms": args.ms }))
}
