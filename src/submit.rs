//! `warren submit`: its arguments, and turning them into a submission (a task file, one task, or
//! one task per item of a fan-out).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use warren_broker::protocol::ExecArgs;
use warren_broker::topology::{DEFAULT_RESULT_EXPIRY, DEFAULT_TASK_QUEUE};
use warren_broker::{AmqpSettings, BrokerError};

use warren_submitter::fanout::{FanOut, glob_items, has_placeholder, line_items};
use warren_submitter::{SubmitOptions, TaskSpec};

use std::io::Write;
use std::sync::Arc;

use warren_submitter::journal::Journal;
use warren_submitter::spec::{SpecSource, TaskFile};
use warren_submitter::submit::{SubmitError, Submitter, prepare};

use crate::cli::*;
use crate::wait::{CollectArgs, wait_command};
use crate::wait::{WaitCommand, collect};

#[derive(Args)]
pub struct SubmitArgs {
    /// Task queue to submit to [default: warren.tasks; with --resume, the batch's own].
    #[arg(long)]
    queue: Option<String>,
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
    /// RabbitMQ user whose results the batch's collector takes (repeatable): the workers' users.
    /// Recorded in the batch's manifest; a result published by anyone else is set aside, even
    /// with the batch's token. Default: anyone with the token.
    #[arg(long = "worker-user", value_name = "USER")]
    worker_user: Vec<String>,
    /// With --wait, also write the batch id as the first line of stdout (without --wait it always is).
    #[arg(long)]
    print_batch_id: bool,
    #[command(flatten)]
    collect: CollectArgs,
    /// Hours an uncollected batch's results are kept after the last activity.
    #[arg(long, default_value_t = DEFAULT_RESULT_EXPIRY.as_secs_f64() / 3600.0)]
    result_expiry_hours: f64,
    /// `exec --timeout-s` given before `exec`: caught here to point to the right place (clap
    /// would suggest --timeout, the wait's limit).
    #[arg(long = "timeout-s", hide = true, value_name = "SECONDS")]
    misplaced_timeout_s: Option<String>,
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
    if let Some(seconds) = &args.misplaced_timeout_s {
        return fail(&format!(
            "--timeout-s is the task's own limit: put it after `exec`, e.g. `warren submit exec \
             --timeout-s {seconds} -- PROGRAM ...` (--timeout, before `exec`, bounds the wait)"
        ));
    }
    let task = args.single.map(exec_task);
    let fan_out = args.each.is_some() || args.each_line.is_some();
    let source = match (task, args.file) {
        (Some(task), None) if fan_out => {
            match fan_out_source(task, args.each.as_deref(), args.each_line.as_deref()) {
                Ok(source) => source,
                Err(message) => return fail(&message),
            }
        }
        (None, None) if fan_out => {
            return fail(
                "--each and --each-line need the task to fan out: `warren submit --each 'raw/*.tif' exec -- PROGRAM {} ...`",
            );
        }
        (Some(task), None) => TaskSource::Single(task),
        (None, Some(file)) => TaskSource::File(file),
        (Some(_), Some(_)) => {
            return fail("give either --file or a single task, not both");
        }
        (None, None) => {
            return fail(
                "nothing to submit: give --file FILE (or - for stdin), `exec -- PROGRAM ARGS...`, or --each GLOB exec -- ...",
            );
        }
    };
    if args.resume.is_some() && matches!(source, TaskSource::Single(_)) {
        return fail(
            "--resume needs the tasks again: the same --file, or the same --each/--each-line and task",
        );
    }
    let Some(expiry) = seconds(args.result_expiry_hours * 3600.0) else {
        return fail("--result-expiry-hours must be a positive number");
    };
    // One --retry-for, when given, bounds publishing and collecting alike; otherwise each keeps
    // its own default (publishing gives up sooner: the tasks not confirmed are safe with the user).
    let publish_retry_for = match args.collect.retry_for.map(seconds) {
        None => warren_broker::connection::DEFAULT_RETRY_FOR,
        Some(Some(d)) => d,
        Some(None) => return fail("--retry-for must be a positive number of seconds"),
    };
    let Ok(wait) = wait_command(args.collect) else {
        return fail(
            "--timeout, --retry-for and --warn-no-worker-after must be positive numbers of seconds",
        );
    };
    let options = SubmitOptions {
        result_expiry: expiry,
        retry_for: publish_retry_for,
        create_queue: args.create_queue,
        worker_users: args.worker_user,
        ..SubmitOptions::new(
            args.queue
                .clone()
                .unwrap_or_else(|| DEFAULT_TASK_QUEUE.into()),
        )
    };
    submit(SubmitCommand {
        amqp,
        options,
        source,
        wait: args.wait.then_some(wait),
        resume: args.resume,
        print_batch_id: args.print_batch_id,
        queue_given: args.queue,
    })
    .await
}

/// The tasks of `--each GLOB` or `--each-line FILE` (`-`: stdin): one per item, after checking the
/// task's placeholders and warning where the items would not name the same files on a worker.
fn fan_out_source(
    task: TaskSpec,
    each: Option<&str>,
    each_line: Option<&std::path::Path>,
) -> Result<TaskSource, String> {
    let (items, origin) = if let Some(pattern) = each {
        (glob_items(pattern), format!("--each '{pattern}'"))
    } else if let Some(path) = each_line.filter(|p| p.as_os_str() == "-") {
        (
            line_items(std::io::stdin().lock(), "stdin"),
            format!("--each-line {}", path.display()),
        )
    } else if let Some(path) = each_line {
        (
            std::fs::File::open(path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))
                .and_then(|f| line_items(std::io::BufReader::new(f), &path.display().to_string())),
            format!("--each-line {}", path.display()),
        )
    } else {
        return Err("--each or --each-line is needed to fan out".into());
    };
    let items = items.map_err(|message| format!("{message}; nothing was submitted"))?;
    // A misspelt placeholder is the error to show, not "no placeholder".
    if let Err(e) = warren_submitter::fanout::expand_value(&task.args, "a/b.c") {
        return Err(format!("the task's arguments: {e}"));
    }
    // Items expand here but run on the workers: relative ones only name the same files
    // where the command runs in the same folder.
    if task.args.get("cwd").is_none_or(serde_json::Value::is_null)
        && let Some(relative) = items.iter().find(|i| !i.starts_with('/'))
    {
        let here = std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|_| ".".into());
        eprintln!(
            "warning: the items are relative paths (e.g. {relative}), found from {here}, but \
             each command runs in its worker's own folder: add `--cwd {here}` to the exec \
             task (or give absolute paths) so {{}} names the same file there"
        );
    }
    if !has_placeholder(&task.args) {
        eprintln!(
            "warning: the task has no placeholder ({{}}, {{name}}, {{stem}}, ...), so all {} task(s) are the same",
            items.len()
        );
    }
    Ok(TaskSource::FanOut(FanOut::new(items, task, origin)))
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
    // Every long flag of `submit` and of its `exec` task, as clap knows them.
    let submit = SubmitArgs::augment_args(clap::Command::new("submit"));
    let flags: Vec<String> = submit
        .get_arguments()
        .chain(submit.get_subcommands().flat_map(|c| c.get_arguments()))
        .filter_map(|a| a.get_long())
        .filter(|long| !matches!(*long, "help" | "version"))
        .map(|long| format!("--{long}"))
        .collect();
    for arg in argv.iter().skip(1) {
        let flag = arg.split('=').next().unwrap_or(arg);
        if flags.iter().any(|f| f == flag) {
            eprintln!(
                "warning: '{arg}' comes after `exec --`, so it is passed to '{}' as an argument, not to warren; \
                 put warren's flags before `exec`, e.g. `warren submit --wait exec -- {} ...`",
                argv[0], argv[0]
            );
        }
    }
}

/// Where the tasks of `warren submit` come from.
#[derive(Debug, Clone)]
pub enum TaskSource {
    /// A JSON-lines file, or `-` for stdin.
    File(PathBuf),
    /// One task given on the command line.
    Single(TaskSpec),
    /// One task per item (`--each`, `--each-line`).
    FanOut(FanOut),
}

/// Options of `warren submit`.
#[derive(Debug, Clone)]
pub struct SubmitCommand {
    /// Broker connection.
    pub amqp: AmqpSettings,
    /// How to submit.
    pub options: SubmitOptions,
    /// The tasks.
    pub source: TaskSource,
    /// Wait for the results after submitting.
    pub wait: Option<WaitCommand>,
    /// Finish this interrupted batch instead of submitting a new one.
    pub resume: Option<String>,
    /// Write the batch id to stdout even with `wait` (where stdout otherwise holds only results).
    pub print_batch_id: bool,
    /// The queue the user named, if any: a resume must not silently use another.
    pub queue_given: Option<String>,
}

/// Runs `warren submit`; returns the process exit status.
// Long: the binary's submit flow: source, output check, first submit or resume, and the report;
// each branch ends with its own exit status and message.
pub async fn submit(cmd: SubmitCommand) -> u8 {
    // `_spooled` is kept until the end: the task file stdin was spooled to.
    let (source, _spooled) = match open_source(&cmd.source).await {
        Ok(opened) => opened,
        Err(message) => return fail(&message),
    };
    // A results file that cannot be written is found before anything is sent.
    if let Some(WaitCommand {
        output: Some(path), ..
    }) = &cmd.wait
        && let Err(e) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        return fail(&format!(
            "cannot open output file {}: {e}; nothing was submitted",
            path.display()
        ));
    }
    // With --wait, stdout carries only result lines (so it can be piped to jq); the batch id is on
    // stderr either way.
    let batch_id_to_stdout = cmd.wait.is_none() || cmd.print_batch_id;
    let mut submitter = Submitter::new(cmd.amqp.clone(), connection_name("submit"));
    // Ctrl-C stops publishing cleanly: what is in flight is confirmed, and the batch can be
    // finished with --resume (or stopped with `warren cancel`).
    let stop = stop_on_ctrl_c();
    let options = SubmitOptions {
        stop: Some(Arc::clone(&stop)),
        ..cmd.options.clone()
    };
    // A resume publishes to the batch's own queue.
    let mut queue_used = cmd.options.queue.clone();
    let submitted = match &cmd.resume {
        None => match prepare(&*source, &options) {
            // A queue nobody declared is refused before anything is said; an unreachable broker
            // is left to the publishing pass, which retries it.
            Ok(_)
                if !options.create_queue
                    && let Err(e @ BrokerError::TaskQueueMissing { .. }) =
                        submitter.require_queue(&options.queue).await =>
            {
                return fail(&format!("nothing was submitted: {e}"));
            }
            Ok(journal) => {
                // Said first, so an interrupted submit never leaves a batch nobody can name.
                eprintln!(
                    "submitting {} task(s) to '{}' as batch {}",
                    journal.total, options.queue, journal.batch
                );
                submitter.submit_as(&*source, &options, journal).await
            }
            Err(e) => Err(e),
        },
        Some(batch) => match Journal::load(batch) {
            Ok(journal)
                if cmd
                    .queue_given
                    .as_ref()
                    .is_some_and(|q| *q != journal.queue) =>
            {
                return fail(&format!(
                    "batch {batch} was submitted to '{}', not '{}': leave --queue out (a resume \
                     publishes to the batch's own queue) or give --queue {}",
                    journal.queue,
                    cmd.queue_given.as_deref().unwrap_or_default(),
                    journal.queue
                ));
            }
            Ok(journal) => {
                eprintln!(
                    "resuming batch {batch} of '{}': {} of {} task(s) were confirmed before; publishing the rest",
                    journal.queue,
                    journal.confirmed_count(),
                    journal.total
                );
                queue_used = journal.queue.clone();
                submitter.resume(&*source, &options, journal).await
            }
            Err(message) => return fail(&message),
        },
    };
    let receipt = match submitted {
        Ok(r) => {
            if cmd.resume.is_some() {
                Journal::remove(&r.batch);
            }
            r
        }
        Err(e) => return unfinished(&e, &cmd.source, batch_id_to_stdout),
    };
    if batch_id_to_stdout {
        println!("{}", receipt.batch);
        let _ = std::io::stdout().flush();
    }
    eprintln!(
        "submitted {} task(s) to '{}' as batch {}",
        receipt.total, queue_used, receipt.batch
    );
    match &cmd.wait {
        None => EXIT_OK,
        Some(wait) => collect(&mut submitter, &receipt.batch, wait).await,
    }
}

/// The tasks of `source`, and the temporary file they were spooled to when `source` can be read
/// only once.
async fn open_source(
    source: &TaskSource,
) -> Result<(Box<dyn SpecSource + Send>, Option<tempfile::NamedTempFile>), String> {
    Ok(match source {
        TaskSource::Single(spec) => (Box::new(vec![spec.clone()]), None),
        // Anything but a regular file (stdin, a pipe, a FIFO, `<(...)`, a device) can be read
        // only once, and the tasks are read twice (checked, then published): spool it first.
        TaskSource::File(path) if needs_spooling(path) => {
            let file = spool(path).await?;
            let name = if path.as_os_str() == "-" {
                "stdin".to_string()
            } else {
                path.display().to_string()
            };
            (Box::new(TaskFile::new(file.path(), name)), Some(file))
        }
        TaskSource::File(path) => (
            Box::new(TaskFile::new(path, path.display().to_string())),
            None,
        ),
        TaskSource::FanOut(fan) => (Box::new(fan.clone()), None),
    })
}

/// Reports a submit that stopped part way: the batch id (scripts must know what will run), and
/// how to finish it with `--resume` or stop it; returns the exit status.
fn unfinished(e: &SubmitError, source: &TaskSource, batch_id_to_stdout: bool) -> u8 {
    let Some(journal) = e.journal() else {
        return fail(&format!("nothing usable was submitted: {e}"));
    };
    if batch_id_to_stdout {
        println!("{}", journal.batch);
        let _ = std::io::stdout().flush();
    }
    let resume = match (source, journal.save()) {
        (TaskSource::File(file), Ok(_)) if !needs_spooling(file) => format!(
            "finish it, publishing only the unconfirmed tasks, with: warren submit --resume {} --file {}",
            journal.batch,
            file.display()
        ),
        (TaskSource::FanOut(_), Ok(_)) => format!(
            "finish it, publishing only the unconfirmed tasks, by running the same command with \
             --resume {} added (the same items must match)",
            journal.batch
        ),
        (_, Ok(_)) => format!(
            "finish it, publishing only the unconfirmed tasks, with: warren submit --resume {} --file FILE \
             (FILE holding the same task lines)",
            journal.batch
        ),
        (_, Err(err)) => format!(
            "the record needed to resume could not be written ({}: {err}); do not resubmit the \
             whole file, the confirmed tasks would run twice",
            Journal::path(&journal.batch).display()
        ),
    };
    if matches!(e, SubmitError::Stopped { .. }) {
        eprintln!(
            "error: {e}. To {resume}; to stop the confirmed ones instead: warren cancel {}",
            journal.batch
        );
        return EXIT_INTERRUPTED;
    }
    let when = match e {
        SubmitError::Interrupted { source, .. } if source.is_fatal() => "Then",
        _ => "Once the broker is reachable",
    };
    fail(&format!("{e}. {when}, {resume}"))
}

/// Whether `--file PATH` can be read only once: `-` (stdin), or anything that is not a regular
/// file (a pipe, a FIFO, a process substitution's /dev/fd/N). A path that cannot be examined is
/// left to the reader, which names the error.
fn needs_spooling(path: &std::path::Path) -> bool {
    path.as_os_str() == "-" || std::fs::metadata(path).is_ok_and(|m| !m.is_file())
}

/// Reads `path` (`-`: stdin) once into a temporary file, so that the batch can be checked and
/// then published (and republished after a reconnect) without being held in memory.
async fn spool(path: &std::path::Path) -> Result<tempfile::NamedTempFile, String> {
    let path = path.to_path_buf();
    let name = if path.as_os_str() == "-" {
        "stdin".to_string()
    } else {
        path.display().to_string()
    };
    let failed = |e: &dyn std::fmt::Display| format!("cannot read the tasks from {name}: {e}");
    let read = tokio::task::spawn_blocking(move || {
        let mut file = tempfile::NamedTempFile::new()
            .map_err(|e| format!("cannot create a temporary file to hold the tasks: {e}"))?;
        let copied = if path.as_os_str() == "-" {
            std::io::copy(&mut std::io::stdin().lock(), &mut file)
        } else {
            std::fs::File::open(&path).and_then(|mut input| std::io::copy(&mut input, &mut file))
        };
        copied.map_err(|e| e.to_string())?;
        Ok::<_, String>(file)
    })
    .await;
    match read {
        Ok(Ok(file)) => Ok(file),
        Ok(Err(e)) => Err(failed(&e)),
        Err(e) => Err(failed(&e)),
    }
}
