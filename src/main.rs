//! The `warren` command: parses arguments and hands over to the worker and submitter crates.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use cli::EXIT_USAGE_OR_CONNECTION;
use wait::WaitCommand;
use warren_broker::AmqpSettings;
use warren_broker::depth::ManagementTarget;
use warren_broker::topology::DEFAULT_TASK_QUEUE;
use warren_deploy::config;
use warren_deploy::run::{AutoscaleOptions, autoscale};
use warren_worker::{ExecPolicy, Worker, WorkerConfig};

/// Warren: a task worker pool on RabbitMQ.
mod batches;
mod cancel;
mod cli;
mod dlq;
mod progress;
mod run;
mod status;
mod submit;
mod wait;

#[derive(Parser)]
#[command(name = "warren", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// RabbitMQ URL (amqp:// or amqps://); a cluster's nodes comma-separated (entries without a
    /// scheme take the first's user, password and vhost). The password may instead come from
    /// --amqp-password-file.
    #[arg(long, global = true, env = "WARREN_AMQP_URL", hide_env_values = true,
          default_value = warren_broker::settings::DEFAULT_AMQP_URL)]
    amqp_url: String,
    /// File holding the RabbitMQ password (e.g. a mounted Kubernetes Secret).
    #[arg(long, global = true, env = "WARREN_AMQP_PASSWORD_FILE")]
    amqp_password_file: Option<PathBuf>,
    /// Seconds to wait for a broker connection to open (TCP, TLS and the AMQP handshake) before
    /// counting the attempt as failed.
    #[arg(long, global = true, env = "WARREN_CONNECT_TIMEOUT",
          default_value_t = warren_broker::settings::DEFAULT_CONNECT_TIMEOUT.as_secs_f64())]
    connect_timeout: f64,
    /// Allow sending the broker credentials to the management API over plain http:// to another
    /// machine (status, autoscale). Without it only https:// or this machine's loopback are used.
    #[arg(long, global = true, env = "WARREN_INSECURE_MANAGEMENT_HTTP")]
    insecure_management_http: bool,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "WARREN_LOG_FORMAT")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a worker: consume tasks and publish their results.
    Worker(WorkerArgs),
    /// Submit tasks; prints the batch id.
    Submit(submit::SubmitArgs),
    /// Run a pipeline file: stages of commands over files, chained per file, resumable.
    Run(run::RunArgs),
    /// Collect the results of a batch submitted earlier.
    Wait(WaitArgs),
    /// Show a task queue's depth, consumers and dead letters.
    Status(StatusArgs),
    /// Inspect, replay or drop what a task queue set aside (its dead-letter queue).
    Dlq(DlqArgs),
    /// Cancel a batch (or one task of it): queued tasks are not run, running ones are stopped.
    Cancel(CancelArgs),
    /// List the batches the broker holds: size, collected, waiting results, age, expiry.
    Batches(BatchesArgs),
    /// Size worker pools by queue depth: a Kubernetes Deployment, or local worker processes.
    Autoscale(AutoscaleArgs),
}

#[derive(Args)]
struct AutoscaleArgs {
    /// Pools file (TOML) describing several queue → pool pairs; replaces the one-pool flags.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Task queue whose depth sizes the pool.
    #[arg(long, default_value = DEFAULT_TASK_QUEUE)]
    queue: String,
    /// Where the workers run: local or kubernetes.
    #[arg(long, default_value = "local")]
    backend: config::BackendKind,
    /// Namespace of the worker Deployment (kubernetes backend).
    #[arg(long)]
    namespace: Option<String>,
    /// Name of the worker Deployment (kubernetes backend).
    #[arg(long)]
    deployment: Option<String>,
    /// Kubeconfig context (kubernetes backend outside a cluster; inside a pod the service account is used).
    #[arg(long)]
    context: Option<String>,
    /// Fewest workers.
    #[arg(long, default_value_t = 0)]
    min: u32,
    /// Most workers.
    #[arg(long, default_value_t = 10)]
    max: u32,
    /// Backlog (ready + running tasks) each worker should carry; usually the worker's --concurrency.
    #[arg(long, default_value_t = 4)]
    tasks_per_worker: u32,
    /// Backlog needed to start workers when there are none.
    #[arg(long, default_value_t = 1)]
    activation: u64,
    /// Seconds between polls of the queue.
    #[arg(long, default_value_t = 2.0)]
    poll: f64,
    /// Seconds the wanted size must stay lower before workers are stopped.
    #[arg(long, default_value_t = 60.0)]
    scale_down_window: f64,
    /// Seconds the queue must stay empty before the last worker is stopped.
    #[arg(long, default_value_t = 120.0)]
    idle_to_zero: f64,
    /// Size to fall back to when the queue cannot be probed three times in a row.
    #[arg(long)]
    fallback_replicas: Option<u32>,
    /// Observe and log decisions; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Where to serve /metrics, /healthz and /readyz (this machine only by default; the
    /// Kubernetes manifests set 0.0.0.0:9478).
    #[arg(long, default_value = "127.0.0.1:9478")]
    metrics_addr: std::net::SocketAddr,
    /// Management API base URL (default: https://HOST:15671 for amqps://, http://HOST:15672 for amqp://).
    #[arg(long, env = "WARREN_MANAGEMENT_URL")]
    management_url: Option<String>,
    /// Never patch pods (kubernetes backend): no pod-deletion-cost ranking before a scale-down,
    /// so the Role needs no `patch pods`. The ReplicaSet picks which pods go; their tasks still
    /// finish (SIGTERM drain).
    #[arg(long)]
    no_pod_patching: bool,
    /// Seconds a worker pod may stay not ready (counted from its Ready condition's last change,
    /// so a pod reconnecting after a broker blip is not "not starting") before it counts as stuck.
    /// Growth stops while half or more of the pool is stuck.
    #[arg(long, default_value_t = 300.0)]
    start_timeout: f64,
    /// Seconds local workers get to finish their tasks when the autoscaler stops.
    #[arg(long, default_value_t = 60.0)]
    stop_grace: f64,
    /// Worker command for the local backend, after `--`.
    #[arg(last = true, value_name = "WORKER COMMAND")]
    command: Vec<String>,
}

#[derive(Args)]
struct WorkerArgs {
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
    /// Serve /healthz, /readyz and /metrics here (e.g. 0.0.0.0:9477); off by default.
    #[arg(long, env = "WARREN_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Args)]
struct CollectArgs {
    /// File to append result lines to (default: stdout).
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// Stop waiting after this many seconds (exit status 3; resume with `warren wait`).
    #[arg(long)]
    timeout: Option<f64>,
    /// Seconds to keep retrying while the broker is unreachable before giving up (exit status 2).
    #[arg(long, default_value_t = warren_broker::connection::DEFAULT_RETRY_FOR.as_secs_f64())]
    retry_for: f64,
    /// Seconds the task queue may have no consumer, while results are outstanding, before a
    /// warning says so (a mistyped --queue, or a pool that does not start).
    #[arg(long, default_value_t = warren_submitter::NO_CONSUMER_WARN_AFTER.as_secs_f64())]
    warn_no_worker_after: f64,
}

#[derive(Args)]
struct WaitArgs {
    /// Batch id printed by `warren submit`.
    batch: String,
    #[command(flatten)]
    collect: CollectArgs,
}

#[derive(Args)]
struct BatchesArgs {
    /// One JSON object per batch instead of a table.
    #[arg(long)]
    json: bool,
    /// Management API base URL (default: https://HOST:15671 for amqps://, http://HOST:15672 for amqp://).
    #[arg(long, env = "WARREN_MANAGEMENT_URL")]
    management_url: Option<String>,
}

#[derive(Args)]
struct CancelArgs {
    /// Batch id printed by `warren submit`.
    batch: String,
    /// Cancel only this task of the batch.
    #[arg(long, value_name = "ID")]
    task: Option<String>,
}

#[derive(Args)]
struct DlqArgs {
    #[command(subcommand)]
    action: DlqCommand,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Count dead letters by reason and batch.
    List(DlqFilterArgs),
    /// Print dead letters as JSON lines: reason, detail, task, batch, worker, envelope.
    Show {
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Publish dead tasks to the task queue again, as fresh tasks whose results reach their batch.
    Replay(DlqFilterArgs),
    /// Drop dead letters for good.
    Purge {
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Really drop them (without it, purge says how many it would drop).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args)]
struct DlqFilterArgs {
    /// Task queue whose dead letters to use.
    #[arg(long, default_value = DEFAULT_TASK_QUEUE)]
    queue: String,
    /// Only dead letters of this batch.
    #[arg(long)]
    batch: Option<String>,
    /// Only dead letters set aside for this reason (e.g. too_many_attempts, oversize, delivery_limit).
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Args)]
struct StatusArgs {
    /// Task queue to show.
    #[arg(long, default_value = DEFAULT_TASK_QUEUE)]
    queue: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Management API base URL (default: https://HOST:15671 for amqps://, http://HOST:15672 for amqp://).
    #[arg(long, env = "WARREN_MANAGEMENT_URL")]
    management_url: Option<String>,
    /// Refresh every SECONDS (default 2) until Ctrl-C.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<f64>,
    /// Show pipeline run RUN instead (`warren run`): each stage's done, failed, running, waiting.
    #[arg(long, value_name = "RUN")]
    run: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.log_format);
    let Some(connect_timeout) = seconds(cli.global.connect_timeout) else {
        return ExitCode::from(usage(
            "--connect-timeout must be a positive number of seconds",
        ));
    };
    let amqp = AmqpSettings {
        url: cli.global.amqp_url.clone(),
        password_file: cli.global.amqp_password_file.clone(),
        connect_timeout,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_USAGE_OR_CONNECTION);
        }
    };
    let insecure = cli.global.insecure_management_http;
    ExitCode::from(runtime.block_on(run(cli.command, amqp, insecure)))
}

async fn run(command: Command, amqp: AmqpSettings, insecure_management_http: bool) -> u8 {
    let management = |url: Option<String>| ManagementTarget {
        url,
        insecure_http: insecure_management_http,
    };
    match command {
        Command::Worker(args) => run_worker(args, amqp).await,
        Command::Submit(args) => submit::run(args, amqp).await,
        Command::Run(args) => run::run(args, amqp).await,
        Command::Wait(args) => match wait_command(args.collect) {
            Ok(wait) => wait::wait(amqp, &args.batch, &wait).await,
            Err(()) => usage(
                "--timeout, --retry-for and --warn-no-worker-after must be positive numbers of seconds",
            ),
        },
        Command::Status(StatusArgs {
            run: Some(run_id),
            json,
            ..
        }) => run::status(amqp, &run_id, json).await,
        Command::Status(args) => {
            let watch = match args.watch.map(seconds) {
                Some(None) => return usage("--watch must be a positive number of seconds"),
                Some(every) => every,
                None => None,
            };
            status::status(
                amqp,
                &management(args.management_url),
                &args.queue,
                args.json,
                watch,
            )
            .await
        }
        Command::Batches(args) => {
            batches::batches(amqp, &management(args.management_url), args.json).await
        }
        Command::Cancel(args) => cancel::cancel(amqp, &args.batch, args.task.as_deref()).await,
        Command::Dlq(args) => {
            let (filter, action) = match args.action {
                DlqCommand::List(f) => (f, dlq::DlqAction::List),
                DlqCommand::Show { filter, limit } => (filter, dlq::DlqAction::Show { limit }),
                DlqCommand::Replay(f) => (f, dlq::DlqAction::Replay),
                DlqCommand::Purge { filter, yes } => (filter, dlq::DlqAction::Purge { yes }),
            };
            let selection = warren_submitter::dlq::Filter {
                batch: filter.batch,
                reason: filter.reason,
            };
            dlq::dlq(amqp, &filter.queue, &selection, action).await
        }
        Command::Autoscale(args) => {
            let target = management(args.management_url.clone());
            run_autoscaler(args, amqp, target).await
        }
    }
}

async fn run_autoscaler(
    args: AutoscaleArgs,
    amqp: AmqpSettings,
    management: ManagementTarget,
) -> u8 {
    let pools = match &args.config {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => match config::parse(&text) {
                Ok(file) => file.pools,
                Err(e) => return usage(&format!("{}: {e}", path.display())),
            },
            Err(e) => return usage(&format!("cannot read {}: {e}", path.display())),
        },
        None => vec![config::PoolEntry {
            queue: args.queue,
            backend: args.backend,
            namespace: args.namespace,
            deployment: args.deployment,
            context: args.context,
            command: args.command,
            min: args.min,
            max: args.max,
            tasks_per_worker: args.tasks_per_worker,
            activation: args.activation,
            poll_s: args.poll,
            scale_down_window_s: args.scale_down_window,
            idle_to_zero_s: args.idle_to_zero,
            fallback_replicas: args.fallback_replicas,
        }],
    };
    let Some(stop_grace) = seconds(args.stop_grace) else {
        return usage("--stop-grace must be a positive number of seconds");
    };
    let Some(start_timeout) = seconds(args.start_timeout) else {
        return usage("--start-timeout must be a positive number of seconds");
    };
    let options = AutoscaleOptions {
        amqp,
        management,
        metrics_addr: Some(args.metrics_addr),
        dry_run: args.dry_run,
        stop_grace,
        not_ready_after: start_timeout,
        patch_pods: !args.no_pod_patching,
    };
    match autoscale(pools, options, warren_broker::endpoints::shutdown_signal()).await {
        Ok(()) => 0,
        Err(e) => usage(&e),
    }
}

async fn run_worker(args: WorkerArgs, amqp: AmqpSettings) -> u8 {
    let (Some(grace), Some(default_timeout)) = (seconds(args.grace), seconds(args.default_timeout))
    else {
        return usage("--grace and --default-timeout must be positive numbers of seconds");
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

fn wait_command(args: CollectArgs) -> Result<WaitCommand, ()> {
    let timeout = match args.timeout {
        Some(t) => Some(seconds(t).ok_or(())?),
        None => None,
    };
    let retry_for = seconds(args.retry_for).ok_or(())?;
    let warn_no_worker_after = seconds(args.warn_no_worker_after).ok_or(())?;
    Ok(WaitCommand {
        output: args.output,
        timeout,
        retry_for,
        warn_no_worker_after,
    })
}

fn seconds(value: f64) -> Option<Duration> {
    warren_broker::settings::seconds("", value, false).ok()
}

fn usage(message: &str) -> u8 {
    eprintln!("error: {message}");
    EXIT_USAGE_OR_CONNECTION
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARREN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
