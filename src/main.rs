//! The `warren` command: parses arguments and hands over to the worker and submitter crates.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use cli::{EXIT_USAGE_OR_CONNECTION, fail, seconds};
use wait::{WaitArgs, wait_command};
use warren_broker::AmqpSettings;
use warren_broker::depth::ManagementTarget;
use warren_broker::topology::DEFAULT_TASK_QUEUE;

/// Warren: a task worker pool on RabbitMQ.
mod autoscale;
mod batches;
mod cancel;
mod cli;
mod dlq;
mod logs;
mod progress;
mod run;
mod status;
mod submit;
mod ui;
mod wait;
mod worker;

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
    /// First part of the names of batch, run and cancellation queues (NS.results.<batch>, ...):
    /// one per team lets RabbitMQ permissions confine each to its own. Submitters, collectors
    /// and workers of a team must share it; set WARREN_NAMESPACE for pools an autoscaler starts.
    #[arg(long = "queue-namespace", global = true, env = "WARREN_NAMESPACE",
          default_value = warren_broker::topology::DEFAULT_NAMESPACE)]
    queue_namespace: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a worker: consume tasks and publish their results.
    Worker(worker::WorkerArgs),
    /// Submit tasks; prints the batch id.
    Submit(submit::SubmitArgs),
    /// Run a pipeline file: stages of commands over files, chained per file, resumable.
    Run(run::RunArgs),
    /// Collect the results of a batch submitted earlier.
    Wait(WaitArgs),
    /// Show a task queue's depth, consumers and dead letters.
    Status(StatusArgs),
    /// Inspect, replay or drop what a task queue set aside (its dead-letter queue).
    Dlq(dlq::DlqArgs),
    /// Show what each attempt of a run's or batch's tasks did: command, exit, worker, stderr.
    Logs(logs::LogsArgs),
    /// Cancel a batch (or one task of it): queued tasks are not run, running ones are stopped.
    Cancel(CancelArgs),
    /// List the batches the broker holds: size, collected, waiting results, age, expiry.
    Batches(BatchesArgs),
    /// Serve a read-only web view of runs, batches, queues and dead letters (127.0.0.1:8080).
    Ui(ui::UiArgs),
    /// Size worker pools by queue depth: a Kubernetes Deployment, or local worker processes.
    Autoscale(autoscale::AutoscaleArgs),
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
    if let Err(e) = warren_broker::topology::set_namespace(&cli.global.queue_namespace) {
        return ExitCode::from(fail(&format!("--queue-namespace: {e}")));
    }
    let Some(connect_timeout) = seconds(cli.global.connect_timeout) else {
        return ExitCode::from(fail(
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
        Command::Worker(args) => worker::run(args, amqp).await,
        Command::Submit(args) => submit::run(args, amqp).await,
        Command::Run(args) => run::run(args, amqp).await,
        Command::Wait(args) => match wait_command(args.collect) {
            Ok(wait) => wait::wait(amqp, &args.batch, &wait).await,
            Err(()) => fail(
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
                Some(None) => return fail("--watch must be a positive number of seconds"),
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
        Command::Dlq(args) => dlq::run(args, amqp).await,
        Command::Logs(args) => logs::logs(amqp, args).await,
        Command::Ui(args) => ui::serve(args, amqp, insecure_management_http).await,
        Command::Autoscale(args) => {
            let target = management(args.management_url.clone());
            autoscale::run(args, amqp, target).await
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WARREN_LOG")
        // kube's client logs each failed call itself; the autoscaler reports it once, with what
        // to do.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=off,kube_client=off"));
    // lapin dumps whole frames (message headers, so batch tokens) at trace level: never that,
    // whatever WARREN_LOG asks for. (A cap only where trace was asked: a directive of its own
    // would switch those targets on.)
    let asks_trace =
        std::env::var("WARREN_LOG").is_ok_and(|f| f.to_ascii_lowercase().contains("trace"));
    let caps: &[&str] = if asks_trace {
        &[
            "lapin::channels=debug",
            "lapin::frames=debug",
            "lapin::io_loop=debug",
        ]
    } else {
        &[]
    };
    let filter = caps
        .iter()
        .filter_map(|d| d.parse().ok())
        .fold(filter, tracing_subscriber::EnvFilter::add_directive);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        // Catches two flags of one name (a global one and a subcommand's, say) before a user does.
        super::Cli::command().debug_assert();
    }
}
