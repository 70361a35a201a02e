//! `warren worker`: consumes a task queue and runs its tasks.

use clap::Args;
use warren_broker::AmqpSettings;
use warren_broker::topology::DEFAULT_TASK_QUEUE;
use warren_worker::{ExecPolicy, Worker, WorkerConfig};

use crate::cli::EXIT_USAGE_OR_CONNECTION;
use crate::{seconds, usage};

#[derive(Args)]
pub struct WorkerArgs {
    /// Task queue to consume.
    #[arg(long, default_value = DEFAULT_TASK_QUEUE)]
    queue: String,
    /// Tasks run at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Tasks the broker may send ahead (default: --concurrency, so none waits unstarted). Raise it
    /// for pools of very short tasks; see the README on the trade-off with the delivery limit.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    prefetch: Option<u16>,
    /// Program the `exec` handler may run (repeatable); '*' allows any program.
    #[arg(long = "allow-exec", value_name = "PROGRAM")]
    allow_exec: Vec<String>,
    /// Seconds running tasks get to finish after SIGTERM/SIGINT before they are returned to the queue.
    #[arg(long, default_value_t = 30.0)]
    grace: f64,
    /// Time limit in seconds for tasks that set no timeout_s.
    #[arg(long, default_value_t = warren_worker::DEFAULT_TASK_TIMEOUT.as_secs_f64())]
    default_timeout: f64,
    /// Worker name in results and in the broker's connection list (default: pod or host name and pid).
    #[arg(long, env = "WARREN_WORKER_NAME")]
    name: Option<String>,
    /// Largest task message accepted; larger ones are dead-lettered.
    #[arg(long, default_value_t = warren_worker::DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// Worker environment variable passed on to every exec command (repeatable). Commands get only
    /// PATH, HOME, LANG, TMPDIR and these; WARREN_* settings are never passed.
    #[arg(long = "pass-env", value_name = "NAME")]
    pass_env: Vec<String>,
    /// Variable that tasks may set although it can change which code runs (repeatable), e.g.
    /// PYTHONPATH; PATH, LD_*, BASH_ENV and the like are refused otherwise.
    #[arg(long = "allow-task-env", value_name = "NAME")]
    allow_task_env: Vec<String>,
    /// Bytes of stdout and of stderr kept from each exec task.
    #[arg(long, default_value_t = warren_worker::handlers::exec::DEFAULT_MAX_OUTPUT_BYTES)]
    max_output_bytes: usize,
    /// Seconds a publish RabbitMQ refuses (a result, while a quorum queue has no leader or is
    /// full) is tried again, from the first refusal, before the task is returned to the queue to
    /// run again; the worker starts no new task meanwhile.
    #[arg(long, default_value_t = warren_worker::DEFAULT_PUBLISH_RETRY_FOR.as_secs_f64())]
    publish_retry_for: f64,
    /// Serve /healthz, /readyz and /metrics here (e.g. 0.0.0.0:9477); off by default.
    #[arg(long, env = "WARREN_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

/// Runs `warren worker`; returns the exit status.
pub async fn run(args: WorkerArgs, amqp: AmqpSettings) -> u8 {
    let (Some(grace), Some(default_timeout), Some(publish_retry_for)) = (
        seconds(args.grace),
        seconds(args.default_timeout),
        seconds(args.publish_retry_for),
    ) else {
        return usage(
            "--grace, --default-timeout and --publish-retry-for must be positive numbers of seconds",
        );
    };
    let config = WorkerConfig {
        amqp,
        queue: args.queue,
        concurrency: args.concurrency,
        prefetch: args.prefetch,
        name: args.name.unwrap_or_else(warren_worker::default_name),
        grace,
        default_timeout,
        max_message_bytes: args.max_message_bytes,
        metrics_addr: args.metrics_addr,
        publish_retry_for,
        ..WorkerConfig::new(DEFAULT_TASK_QUEUE)
    };
    let mut worker = Worker::new(config);
    if !args.allow_exec.is_empty() {
        let policy = ExecPolicy::new(args.allow_exec)
            .with_max_output_bytes(args.max_output_bytes)
            .with_pass_env(args.pass_env)
            .and_then(|p| p.with_task_env_allowed(args.allow_task_env));
        match policy {
            Ok(policy) => worker = worker.with_exec(policy),
            Err(e) => return usage(&e),
        }
    }
    match worker
        .run(warren_broker::endpoints::shutdown_signal())
        .await
    {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_USAGE_OR_CONNECTION
        }
    }
}
