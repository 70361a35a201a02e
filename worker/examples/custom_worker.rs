//! A worker binary with a handler of your own, in a few lines.
//!
//! ```text
//! cargo run -p warren-worker --example custom_worker
//! echo '{"kind": "word_count", "args": {"path": "/etc/os-release"}}' | warren submit --file - --wait
//! ```

use serde::Deserialize;
use serde_json::json;
use warren_worker::{HandlerResult, Task, TaskFailure, Worker, WorkerConfig, shutdown_signal};

#[derive(Deserialize)]
struct WordCountArgs {
    path: String,
}

async fn word_count(task: Task) -> HandlerResult {
    let args: WordCountArgs = task.args_as()?;
    let text = tokio::fs::read_to_string(&args.path)
        .await
        .map_err(|e| TaskFailure::failed("read_failed", format!("{}: {e}", args.path)))?;
    Ok(json!({ "words": text.split_whitespace().count() }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let config = WorkerConfig::new("warren.tasks"); // amqp, concurrency, grace... are fields
    Worker::new(config)
        .handler("word_count", word_count)
        .run(shutdown_signal())
        .await?;
    Ok(())
}
