//! `warren worker`: consumes a task queue and runs its tasks.

use clap::Args;
use std::path::PathBuf;
use warren_broker::AmqpSettings;
use warren_broker::topology::DEFAULT_TASK_QUEUE;

use warren_worker::handlers::exec::{Limits, Sandbox, SandboxConfig};
use warren_worker::{ExecPolicy, Worker, WorkerConfig};

use crate::cli::{EXIT_USAGE_OR_CONNECTION, fail, seconds};

#[derive(Args)]
pub struct WorkerArgs {
    /// Task queue to consume (an autoscaler's local pool sets WARREN_QUEUE for its workers).
    #[arg(long, env = "WARREN_QUEUE", default_value = DEFAULT_TASK_QUEUE)]
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
    /// Variable a task may set (repeatable): a name, or a prefix ending in '*' (AWS_*). Tasks may
    /// set only GDAL, OpenMP and math-library tuning variables and the locale besides these;
    /// WARREN_* never.
    #[arg(long = "allow-task-env", value_name = "PATTERN")]
    allow_task_env: Vec<String>,
    /// Folder exec commands may read and write (repeatable); default: the worker's working
    /// folder. Task cwd and outputs must lie under one. Keep credentials out of it.
    #[arg(long = "data-root", value_name = "DIR")]
    data_root: Vec<PathBuf>,
    /// Folder exec commands may read (repeatable), besides /usr, /bin, /sbin, /lib*, /etc, /opt.
    #[arg(long = "sandbox-read", value_name = "DIR")]
    sandbox_read: Vec<PathBuf>,
    /// TCP port exec commands may connect to or bind (repeatable); none by default.
    #[arg(long = "sandbox-net-allow", value_name = "PORT")]
    sandbox_net_allow: Vec<u16>,
    /// Where each exec command gets its private TMPDIR and HOME, removed after it
    /// (default: $TMPDIR/warren-task-tmp).
    #[arg(long, value_name = "DIR")]
    sandbox_tmp: Option<PathBuf>,
    /// User exec commands run as, for a worker running as root. Without it a root worker's
    /// commands keep uid 0 with every capability dropped.
    #[arg(long, value_name = "USER", env = "WARREN_RUN_AS")]
    run_as: Option<String>,
    /// Run exec commands without the sandbox (Landlock, no capabilities, limits): only for a
    /// kernel without Landlock and tasks you trust.
    #[arg(long)]
    no_sandbox: bool,
    /// Address space of each exec command, in bytes (RLIMIT_AS); default: unlimited.
    #[arg(long, value_name = "BYTES")]
    limit_memory: Option<u64>,
    /// CPU seconds of each exec command (RLIMIT_CPU); default: unlimited (see --default-timeout).
    #[arg(long, value_name = "SECONDS")]
    limit_cpu: Option<u64>,
    /// Largest file an exec command may write, in bytes (RLIMIT_FSIZE); default: unlimited.
    #[arg(long, value_name = "BYTES")]
    limit_file_size: Option<u64>,
    /// Open files of each exec command (RLIMIT_NOFILE).
    #[arg(long, value_name = "N", default_value_t = 4096)]
    limit_open_files: u64,
    /// Processes of the commands' user (RLIMIT_NPROC, counted per user by the kernel); default:
    /// unlimited. Useful with --run-as.
    #[arg(long, value_name = "N")]
    limit_processes: Option<u64>,
    /// Bytes of stdout and of stderr kept from each exec task.
    #[arg(long, default_value_t = warren_worker::handlers::exec::DEFAULT_MAX_OUTPUT_BYTES)]
    max_output_bytes: usize,
    /// Seconds a publish RabbitMQ refuses (a result, while a quorum queue has no leader or is
    /// full) is tried again, from the first refusal, before the task is returned to the queue to
    /// run again; the worker starts no new task meanwhile.
    #[arg(long, default_value_t = warren_worker::DEFAULT_PUBLISH_RETRY_FOR.as_secs_f64())]
    publish_retry_for: f64,
    /// Seconds a publish (a result, a retry, a dead letter) waits for RabbitMQ's confirm; one not
    /// confirmed by then counts as refused and is sent again on a fresh channel (within
    /// --publish-retry-for), so the task is not left unanswered.
    #[arg(long, default_value_t = warren_worker::DEFAULT_CONFIRM_TIMEOUT.as_secs_f64())]
    confirm_timeout: f64,
    /// RabbitMQ user whose `warren cancel` applies to every batch (repeatable); anyone else's
    /// cancellation applies only to the batches they submitted (checked by the broker-verified
    /// user_id of both).
    #[arg(long = "cancel-admin", value_name = "USER")]
    cancel_admin: Vec<String>,
    /// Serve /healthz, /readyz and /metrics here (e.g. 0.0.0.0:9477); off by default.
    #[arg(long, env = "WARREN_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

/// Runs `warren worker`; returns the exit status.
// Long: the binary's argument glue for `warren worker`: each flag checked with its own message
// before the worker starts.
pub async fn run(args: WorkerArgs, amqp: AmqpSettings) -> u8 {
    let (Some(grace), Some(default_timeout), Some(publish_retry_for), Some(confirm_timeout)) = (
        seconds(args.grace),
        seconds(args.default_timeout),
        seconds(args.publish_retry_for),
        seconds(args.confirm_timeout),
    ) else {
        return fail(
            "--grace, --default-timeout, --publish-retry-for and --confirm-timeout must be \
             positive numbers of seconds",
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
        confirm_timeout,
        cancel_admins: args.cancel_admin,
        ..WorkerConfig::new(DEFAULT_TASK_QUEUE)
    };
    // The worker's own secrets go out of reach of what it runs before anything runs.
    let passwords = config.amqp.url_passwords();
    for problem in warren_worker::harden::protect_process(
        &passwords.iter().map(String::as_str).collect::<Vec<_>>(),
    ) {
        tracing::warn!("{problem}");
    }
    let secrets: Vec<PathBuf> = config.amqp.password_file.iter().cloned().collect();
    let mut worker = Worker::new(config);
    if !args.allow_exec.is_empty() {
        let policy = ExecPolicy::new(args.allow_exec)
            .with_max_output_bytes(args.max_output_bytes)
            .with_pass_env(args.pass_env)
            .and_then(|p| p.with_task_env_allowed(args.allow_task_env));
        let policy = match policy {
            Ok(policy) => policy,
            Err(e) => return fail(&e),
        };
        let policy = if args.no_sandbox {
            tracing::warn!(
                "--no-sandbox: exec commands run unconfined, with this worker's user and rights; \
                 an allowed program can be made to run any code (GDAL's --config, an \
                 interpreter's -c), so run only tasks you trust"
            );
            policy
        } else {
            let sandbox = Sandbox::new(SandboxConfig {
                data_roots: args.data_root,
                read_roots: args.sandbox_read,
                net_allow: args.sandbox_net_allow,
                tmp_base: args.sandbox_tmp,
                run_as: args.run_as,
                limits: Limits {
                    memory_bytes: args.limit_memory,
                    cpu_seconds: args.limit_cpu,
                    file_bytes: args.limit_file_size,
                    open_files: Some(args.limit_open_files),
                    processes: args.limit_processes,
                },
                secrets,
            });
            match sandbox {
                Ok(sandbox) => {
                    tracing::info!("{}", sandbox.describe());
                    policy.with_sandbox(sandbox)
                }
                Err(e) => return fail(&e),
            }
        };
        worker = worker.with_exec(policy);
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
