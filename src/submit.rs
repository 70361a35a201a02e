//! `warren submit`: its arguments, and turning them into a submission (a task file, one task, or
//! one task per item of a fan-out).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use warren_broker::AmqpSettings;
use warren_broker::protocol::ExecArgs;
use warren_broker::topology::{DEFAULT_RESULT_EXPIRY, DEFAULT_TASK_QUEUE};
use warren_submitter::commands::{self, SubmitCommand, TaskSource};
use warren_submitter::fanout::{FanOut, glob_items, has_placeholder, line_items};
use warren_submitter::{SubmitOptions, TaskSpec};

use crate::{CollectArgs, seconds, usage, wait_command};

#[derive(Args)]
pub struct SubmitArgs {
    /// Task queue to submit to.
    #[arg(long, default_value = DEFAULT_TASK_QUEUE)]
    queue: String,
    /// JSON-lines task file, or '-' for stdin.
    #[arg(long, short = 'f', value_name = "FILE", conflicts_with_all = ["each", "each_line"])]
    file: Option<PathBuf>,
    /// One task per file matching GLOB (expanded here, sorted; no match is an error), put into the
    /// `exec` task's arguments with placeholders: {} (path), {name}, {stem}, {ext}, {dir}; {{ and
    /// }} for literal braces. E.g. `--each 'raw/*.tif' exec -- gdal_translate {} out/{stem}.tif`.
    #[arg(long, value_name = "GLOB", conflicts_with = "each_line")]
    each: Option<String>,
    /// Like --each, with one item per non-blank line of FILE ('-' for stdin).
    #[arg(long, value_name = "FILE")]
    each_line: Option<PathBuf>,
    /// Finish an interrupted submission of BATCH: publish only the tasks that were not confirmed,
    /// given the same --file (or the same --each/--each-line and task) again. The command that
    /// gave up prints it.
    #[arg(long, value_name = "BATCH")]
    resume: Option<String>,
    /// Wait for the results and write them out. Stdout then carries only result lines; the batch
    /// id is on stderr.
    #[arg(long)]
    wait: bool,
    /// Create the task queue if it does not exist. Without it, submitting to a queue that no
    /// worker or autoscaler has declared is refused (a mistyped --queue, most often).
    #[arg(long)]
    create_queue: bool,
    /// With --wait, also write the batch id as the first line of stdout (without --wait it always is).
    #[arg(long)]
    print_batch_id: bool,
    #[command(flatten)]
    collect: CollectArgs,
    /// Hours an uncollected batch's results are kept after the last activity.
    #[arg(long, default_value_t = DEFAULT_RESULT_EXPIRY.as_secs_f64() / 3600.0)]
    result_expiry_hours: f64,
    #[command(subcommand)]
    single: Option<SingleTask>,
}

#[derive(Subcommand)]
pub enum SingleTask {
    /// Submit one exec task: `warren submit exec -- PROGRAM ARGS...`.
    Exec {
        /// Time limit of one attempt, in seconds (default: the worker's --default-timeout).
        #[arg(long)]
        timeout_s: Option<f64>,
        /// Working folder of the command, on the worker.
        #[arg(long, value_name = "DIR")]
        cwd: Option<PathBuf>,
        /// Environment variable for the command (repeatable); the worker refuses those that change
        /// which code runs (PATH, LD_*, ...).
        #[arg(long = "env", value_name = "NAME=VALUE", value_parser = key_value)]
        env: Vec<(String, String)>,
        /// Label copied to the result (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = key_value)]
        labels: Vec<(String, String)>,
        /// File the command must create, relative to --cwd (repeatable); a missing one fails the
        /// task with missing_outputs.
        #[arg(long = "outputs", value_name = "PATH")]
        outputs: Vec<PathBuf>,
        /// How often a failed or timed-out attempt is tried again (0 to 100).
        #[arg(long)]
        max_retries: Option<u32>,
        /// Task id (default: generated).
        #[arg(long)]
        id: Option<String>,
        /// Program and arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        argv: Vec<String>,
    },
}

/// Runs `warren submit`; returns the exit status.
pub async fn run(args: SubmitArgs, amqp: AmqpSettings) -> u8 {
    let task = args.single.map(exec_task);
    let fan_out = args.each.is_some() || args.each_line.is_some();
    let source = match (task, args.file) {
        (Some(task), None) if fan_out => {
            let (items, origin) = if let Some(pattern) = &args.each {
                (glob_items(pattern), format!("--each '{pattern}'"))
            } else if let Some(path) = args.each_line.as_ref().filter(|p| p.as_os_str() == "-") {
                (
                    line_items(std::io::stdin().lock(), "stdin"),
                    format!("--each-line {}", path.display()),
                )
            } else if let Some(path) = &args.each_line {
                (
                    std::fs::File::open(path)
                        .map_err(|e| format!("cannot open {}: {e}", path.display()))
                        .and_then(|f| {
                            line_items(std::io::BufReader::new(f), &path.display().to_string())
                        }),
                    format!("--each-line {}", path.display()),
                )
            } else {
                return usage("--each or --each-line is needed to fan out");
            };
            let items = match items {
                Ok(items) => items,
                Err(message) => return usage(&message),
            };
            if !has_placeholder(&task.args) {
                eprintln!(
                    "warning: the task has no placeholder ({{}}, {{name}}, {{stem}}, ...), so all {} task(s) are the same",
                    items.len()
                );
            }
            TaskSource::FanOut(FanOut::new(items, task, origin))
        }
        (None, None) if fan_out => {
            return usage(
                "--each and --each-line need the task to fan out: `warren submit --each 'raw/*.tif' exec -- PROGRAM {} ...`",
            );
        }
        (Some(task), None) => TaskSource::Single(task),
        (None, Some(file)) => TaskSource::File(file),
        (Some(_), Some(_)) => {
            return usage("give either --file or a single task, not both");
        }
        (None, None) => {
            return usage(
                "nothing to submit: give --file FILE (or - for stdin), `exec -- PROGRAM ARGS...`, or --each GLOB exec -- ...",
            );
        }
    };
    if args.resume.is_some() && matches!(source, TaskSource::Single(_)) {
        return usage(
            "--resume needs the tasks again: the same --file, or the same --each/--each-line and task",
        );
    }
    let Some(expiry) = seconds(args.result_expiry_hours * 3600.0) else {
        return usage("--result-expiry-hours must be a positive number");
    };
    let Ok(wait) = wait_command(args.collect) else {
        return usage(
            "--timeout, --retry-for and --warn-no-worker-after must be positive numbers of seconds",
        );
    };
    let options = SubmitOptions {
        result_expiry: expiry,
        retry_for: wait.retry_for,
        create_queue: args.create_queue,
        ..SubmitOptions::new(args.queue)
    };
    commands::submit(SubmitCommand {
        amqp,
        options,
        source,
        wait: args.wait.then_some(wait),
        resume: args.resume,
        print_batch_id: args.print_batch_id,
    })
    .await
}

/// The task of `warren submit exec ...`.
fn exec_task(single: SingleTask) -> TaskSpec {
    let SingleTask::Exec {
        timeout_s,
        cwd,
        env,
        labels,
        outputs,
        max_retries,
        id,
        argv,
    } = single;
    warn_about_flags_after_exec(&argv);
    let exec = ExecArgs {
        argv,
        env: env.into_iter().collect(),
        cwd,
        outputs,
        ..ExecArgs::default()
    };
    TaskSpec {
        timeout_s,
        labels: labels.into_iter().collect(),
        max_retries,
        id,
        ..TaskSpec::from_exec(&exec)
    }
}

/// Parses `NAME=VALUE` (for --env and --label).
fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("expected NAME=VALUE, got '{text}'")),
    }
}

/// Everything after `exec --` goes to the program, so a warren flag there is almost always a
/// mistake (`... exec -- sha256sum f --wait` waits for nothing and passes `--wait` on).
fn warn_about_flags_after_exec(argv: &[String]) {
    const SUBMIT_FLAGS: [&str; 16] = [
        "--wait",
        "--output",
        "--timeout",
        "--queue",
        "--file",
        "--retry-for",
        "--amqp-url",
        "--timeout-s",
        "--print-batch-id",
        "--cwd",
        "--label",
        "--outputs",
        "--max-retries",
        "--id",
        "--each",
        "--each-line",
    ];
    for arg in argv.iter().skip(1) {
        let flag = arg.split('=').next().unwrap_or(arg);
        if SUBMIT_FLAGS.contains(&flag) {
            eprintln!(
                "warning: '{arg}' comes after `exec --`, so it is passed to '{}' as an argument, not to warren; \
                 put warren's flags before `exec`, e.g. `warren submit --wait exec -- {} ...`",
                argv[0], argv[0]
            );
        }
    }
}
