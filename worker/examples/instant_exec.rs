//! A worker whose `exec` answers at once without running anything: for benchmarks of what
//! Warren itself costs per task (`benches/run-100k`), never for real work.
//!
//! ```text
//! cargo run --release -p warren-worker --example instant_exec -- QUEUE [CONCURRENCY]
//! ```

use serde_json::json;
use warren_worker::{HandlerResult, Task, Worker, WorkerConfig, shutdown_signal};

async fn instant_exec(_task: Task) -> HandlerResult {
    Ok(json!({
        "exit_code": 0, "signal": null, "stdout": "", "stderr": "", "stdout_bytes": 0,
        "stderr_bytes": 0, "truncated": false, "duration_ms": 0, "outputs": []
    }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("warn").init();
    let mut args = std::env::args().skip(1);
    let queue = args
        .next()
        .ok_or("usage: instant_exec QUEUE [CONCURRENCY]")?;
    let mut config = WorkerConfig::new(queue);
    if let Some(concurrency) = args.next() {
        config.concurrency = concurrency.parse()?;
    }
    Worker::new(config)
        .handler("exec", instant_exec)
        .run(shutdown_signal())
        .await?;
    Ok(())
}
