//! `warren run PIPELINE`: runs a pipeline file (docs/pipelines.md) with a progress bar per stage,
//! and `warren status --run RUN`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::cli::{
    EXIT_INCOMPLETE, EXIT_OK, EXIT_TASK_FAILED, EXIT_USAGE_OR_CONNECTION, connection_name, fail,
    seconds, stop_on_ctrl_c,
};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use warren_broker::AmqpSettings;
use warren_broker::connection::close_connection;
use warren_broker::topology::{DEFAULT_RESULT_EXPIRY, DEFAULT_TASK_QUEUE};
use warren_submitter::pipeline::Pipeline;
use warren_submitter::pipeline::plan::{ItemState, Plan, StageCounts};
use warren_submitter::pipeline::run::{
    RunEnd, RunOptions, RunProgress, dry_run, read_state, run as run_pipeline,
};

#[derive(Args)]
pub struct RunArgs {
    /// The pipeline file (TOML; see docs/pipelines.md).
    pipeline: PathBuf,
    /// Continue run RUN where it stopped (from any machine with the same files and pipeline).
    #[arg(long, value_name = "RUN", conflicts_with = "run")]
    resume: Option<String>,
    /// Start run RUN, or continue it if it was started before: for a Kubernetes Job whose pod may
    /// be restarted (e.g. --run "$JOB_NAME").
    #[arg(long, value_name = "RUN")]
    run: Option<String>,
    /// Run every item, even those whose declared outputs are newer than their inputs.
    #[arg(long)]
    force: bool,
    /// List what would run, per stage, and submit nothing.
    #[arg(long)]
    dry_run: bool,
    /// Task queue of stages that name none (and the file does not either).
    #[arg(long, default_value = DEFAULT_TASK_QUEUE)]
    queue: String,
    /// Create task queues that do not exist (otherwise a stage naming an undeclared queue is refused).
    #[arg(long)]
    create_queue: bool,
    /// Most tasks submitted and unfinished at once. Within it the runner keeps each task queue
    /// only a few tasks ahead of its workers (4, or 2 per consumer), later stages first, so each
    /// file moves through the pipeline early whatever the pool's size.
    #[arg(long, default_value_t = warren_submitter::pipeline::run::DEFAULT_MAX_QUEUED)]
    max_queued: usize,
    /// Make every chained stage wait for the whole of the stage before it (to compare with
    /// per-item chaining).
    #[arg(long)]
    barriers: bool,
    /// Stop after this many seconds (exit 3; resume with --resume).
    #[arg(long)]
    timeout: Option<f64>,
    /// Seconds to keep retrying while the broker or a run's queue is unavailable (connection lost,
    /// a queue without quorum while nodes restart) before giving up (exit 2).
    #[arg(long, default_value_t = warren_broker::connection::DEFAULT_COLLECT_RETRY_FOR.as_secs_f64())]
    retry_for: f64,
    /// Hours a run's queues are kept after the last activity.
    #[arg(long, default_value_t = DEFAULT_RESULT_EXPIRY.as_secs_f64() / 3600.0)]
    result_expiry_hours: f64,
    /// With --dry-run, list every item (else the first 10 of each stage).
    #[arg(long, short = 'v')]
    verbose: bool,
}

/// Items listed per stage by --dry-run without --verbose.
const DRY_RUN_ITEMS: usize = 10;

/// Runs `warren run`; returns the exit status.
// Long: argument checks then the run and its report, each with its own exit status and message.
pub async fn run(args: RunArgs, amqp: AmqpSettings) -> u8 {
    let text = match std::fs::read_to_string(&args.pipeline) {
        Ok(text) => text,
        Err(e) => return fail(&format!("cannot read {}: {e}", args.pipeline.display())),
    };
    let pipeline = match Pipeline::parse(&text, &args.pipeline, &args.queue) {
        Ok(p) => p,
        Err(message) => return fail(&format!("{message}; nothing was submitted")),
    };
    if args.dry_run {
        return match dry_run(&pipeline, args.force) {
            Ok(stages) => {
                print_dry_run(&stages, args.verbose);
                EXIT_OK
            }
            Err(message) => fail(&message),
        };
    }
    let (Some(retry_for), Some(expiry)) = (
        seconds(args.retry_for),
        seconds(args.result_expiry_hours * 3600.0),
    ) else {
        return fail("--retry-for and --result-expiry-hours must be positive numbers");
    };
    let timeout = match args.timeout.map(seconds) {
        Some(None) => return fail("--timeout must be a positive number of seconds"),
        Some(t) => t,
        None => None,
    };
    if args.max_queued == 0 {
        return fail("--max-queued must be at least 1");
    }
    let stop = stop_on_ctrl_c();
    let mut options = RunOptions {
        resume: args.resume.is_some(),
        force: args.force,
        max_queued: args.max_queued,
        barriers: args.barriers,
        create_queue: args.create_queue,
        retry_for,
        stop: Some(stop),
        timeout,
        expiry,
        ..RunOptions::new()
    };
    if let Some(run) = args.resume.as_ref().or(args.run.as_ref()) {
        if let Err(e) = warren_broker::protocol::validate_id("--run", run) {
            return fail(&e.to_string());
        }
        options.run = run.clone();
    }
    // What can be checked is checked before a run id is handed out: items that do not exist
    // (a glob matching nothing), stage queues nobody declared.
    if !options.resume
        && let Err(message) = dry_run(&pipeline, options.force)
    {
        return fail(&format!("{message}; nothing was submitted"));
    }
    if let Err(message) = preflight(&amqp, &pipeline, &options, &args.pipeline).await {
        return fail(&message);
    }
    let run = options.run.clone();
    // The run id first, so that a run stopped any way can be resumed and inspected.
    println!("{run}");
    eprintln!(
        "{} run {run} of {} ({} stage(s)); status: warren status --run {run}",
        if options.resume {
            "resuming"
        } else {
            "starting"
        },
        args.pipeline.display(),
        pipeline.stages.len()
    );
    let started = Instant::now();
    let mut progress = StageBars::new(&pipeline);
    let outcome = run_pipeline(&amqp, pipeline, &options, &mut progress).await;
    progress.finish();
    let resume = format!("warren run --resume {run} {}", args.pipeline.display());
    match outcome {
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_USAGE_OR_CONNECTION
        }
        Ok((RunEnd::Stopped, plan)) => {
            summary(&run, &plan, started.elapsed());
            eprintln!(
                "stopped early: what finished is recorded, and submitted tasks still run. Continue with: {resume}"
            );
            EXIT_INCOMPLETE
        }
        Ok((RunEnd::Finished, plan)) => {
            let failed = summary(&run, &plan, started.elapsed());
            if failed > 0 {
                eprintln!(
                    "after fixing the cause, run the pipeline again: only the failed items and what depends on them run (outputs that are up to date are skipped)"
                );
                EXIT_TASK_FAILED
            } else {
                EXIT_OK
            }
        }
    }
}

/// Prints what `--dry-run` found: per stage, its item count and the items (the first
/// [`DRY_RUN_ITEMS`] unless `verbose`).
fn print_dry_run(stages: &[(String, Vec<String>)], verbose: bool) {
    for (stage, items) in stages {
        println!("{stage}: {} item(s) would run", items.len());
        let shown = if verbose { items.len() } else { DRY_RUN_ITEMS };
        for item in items.iter().take(shown) {
            println!("  {item}");
        }
        if items.len() > shown {
            println!(
                "  ... and {} more (--verbose lists them all)",
                items.len() - shown
            );
        }
    }
}

/// What is refused before a run starts: a resume with another version of the pipeline file, and
/// (without --create-queue) a stage queue nobody declared.
async fn preflight(
    amqp: &AmqpSettings,
    pipeline: &Pipeline,
    options: &RunOptions,
    path: &std::path::Path,
) -> Result<(), String> {
    // A resume with another pipeline file is refused before anything is declared for it.
    if options.resume
        && let Ok(Some(state)) = read_state(amqp, &options.run).await
        && state.fingerprint != pipeline.fingerprint
    {
        // Anything else (a broker not reachable yet) is left to the run, which retries.
        return Err(format!(
            "run {} was started with another version of {}; resume it with the original \
             file, or start a new run (items whose outputs are up to date are skipped)",
            options.run,
            path.display()
        ));
    }
    if !options.create_queue {
        let mut submitter =
            warren_submitter::Submitter::new(amqp.clone(), crate::cli::connection_name("run"));
        let queues: std::collections::BTreeSet<&str> =
            pipeline.stages.iter().map(|s| s.queue.as_str()).collect();
        for queue in queues {
            if let Err(e @ warren_broker::BrokerError::TaskQueueMissing { .. }) =
                submitter.require_queue(queue).await
            {
                return Err(format!("{e}; nothing was submitted"));
            }
        }
    }
    Ok(())
}

/// Prints per-stage counts and the items that failed or were skipped; returns the failures.
fn summary(run: &str, plan: &Plan, took: Duration) -> u64 {
    let mut failed = 0;
    let mut listed = 0;
    for (index, stage) in plan.pipeline().stages.iter().enumerate() {
        let c = plan.counts(index);
        eprintln!(
            "{:<16} {} done, {} up to date, {} failed, {} skipped, {} running, {} waiting",
            stage.name, c.done, c.up_to_date, c.failed, c.skipped, c.running, c.waiting
        );
        failed += c.failed;
        for (item, state) in plan.items(index) {
            let why = match state {
                ItemState::Failed(kind) => format!("failed ({kind})"),
                ItemState::Skipped => "skipped: an input failed".to_string(),
                _ => continue,
            };
            if listed < 20 {
                eprintln!("  {}: {item}: {why}", stage.name);
                if let ItemState::Failed(_) = state {
                    for line in plan.failure(index, item).unwrap_or_default().lines() {
                        eprintln!("      | {line}");
                    }
                    let quoted = shlex::try_quote(item)
                        .map_or_else(|_| item.to_string(), |q| q.into_owned());
                    eprintln!(
                        "      every attempt: warren logs {run} --stage {} --item {quoted}",
                        stage.name
                    );
                }
            }
            listed += 1;
        }
    }
    if listed > 20 {
        eprintln!(
            "  ... and {} more (warren status --run shows the counts)",
            listed - 20
        );
    }
    eprintln!("took {:.1?}", took);
    failed
}

/// A bar per stage on a terminal; otherwise a line per stage every 5 s.
struct StageBars {
    bars: Option<(MultiProgress, Vec<ProgressBar>)>,
    last_line: Instant,
}

impl StageBars {
    fn new(pipeline: &Pipeline) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self {
                bars: None,
                last_line: Instant::now(),
            };
        }
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template("{prefix:<14} {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bars = pipeline
            .stages
            .iter()
            .map(|s| {
                let bar = multi.add(ProgressBar::new(0));
                bar.set_style(style.clone());
                bar.set_prefix(s.name.clone());
                bar
            })
            .collect();
        Self {
            bars: Some((multi, bars)),
            last_line: Instant::now(),
        }
    }

    fn finish(&self) {
        if let Some((_, bars)) = &self.bars {
            for bar in bars {
                bar.finish_and_clear();
            }
        }
    }
}

impl RunProgress for StageBars {
    fn update(&mut self, plan: &Plan, counts: &[StageCounts]) {
        match &self.bars {
            Some((_, bars)) => {
                for (bar, c) in bars.iter().zip(counts) {
                    bar.set_length(c.known);
                    bar.set_position(c.done + c.up_to_date + c.failed + c.skipped);
                    bar.set_message(format!(
                        "{} running, {} queued, {} failed{}",
                        c.running.saturating_sub(c.queued),
                        c.queued,
                        c.failed,
                        if c.all_known { "" } else { ", more to come" }
                    ));
                }
            }
            None if self.last_line.elapsed() >= Duration::from_secs(5) => {
                self.last_line = Instant::now();
                for (stage, c) in plan.pipeline().stages.iter().zip(counts) {
                    eprintln!(
                        "{}: {}/{}{} finished, {} running, {} queued, {} failed",
                        stage.name,
                        c.done + c.up_to_date + c.failed + c.skipped,
                        c.known,
                        if c.all_known { "" } else { "+" },
                        c.running.saturating_sub(c.queued),
                        c.queued,
                        c.failed
                    );
                }
            }
            None => {}
        }
    }
}

/// Runs `warren status --run RUN`; returns the exit status.
// Long: prints the `status --run` table or JSON; each section is a few lines of formatting.
pub async fn status(amqp: AmqpSettings, run: &str, json: bool) -> u8 {
    let state = match read_state(&amqp, run).await {
        Ok(Some(state)) => state,
        Ok(None) => {
            return fail(&format!(
                "run {run} not found: it has no recorded state (never started, or expired)"
            ));
        }
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_USAGE_OR_CONNECTION;
        }
    };
    let failed = failed_items(&amqp, &state).await;
    if json {
        // One object per stage, in pipeline order.
        let stages: Vec<serde_json::Value> = state
            .counts
            .iter()
            .map(|(name, counts)| {
                let mut stage = serde_json::to_value(counts).unwrap_or_default();
                stage["stage"] = serde_json::Value::from(name.as_str());
                stage
            })
            .collect();
        let failed: Vec<serde_json::Value> = failed
            .iter()
            .map(|f| {
                serde_json::json!({
                    "stage": f.stage, "item": f.item, "error": f.error,
                    "message": f.message, "stderr_tail": f.stderr_tail,
                })
            })
            .collect();
        match serde_json::to_string(&serde_json::json!({
            "run": state.run,
            "complete": state.complete,
            "workdir": state.workdir,
            "stages": stages,
            "failed": failed,
        })) {
            Ok(line) => println!("{line}"),
            Err(e) => return fail(&e.to_string()),
        }
        return EXIT_OK;
    }
    println!(
        "run {} ({}), workdir {}",
        state.run,
        if state.complete {
            "complete"
        } else {
            "not complete"
        },
        state.workdir
    );
    println!(
        "{:<16} {:>8} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "STAGE", "DONE", "UP-TO-DATE", "FAILED", "SKIPPED", "RUNNING", "QUEUED", "WAITING"
    );
    for (stage, c) in &state.counts {
        println!(
            "{:<16} {:>8} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8}",
            stage,
            c.done,
            c.up_to_date,
            c.failed,
            c.skipped,
            c.running.saturating_sub(c.queued),
            c.queued,
            c.waiting
        );
    }
    if !failed.is_empty() {
        println!(
            "\nfailed (last {} of {}):",
            failed.len().min(STATUS_FAILURES),
            failed.len()
        );
        for f in failed.iter().rev().take(STATUS_FAILURES).rev() {
            println!("  {}: {}: {}", f.stage, f.item, f.error);
            let why = if f.stderr_tail.is_empty() {
                &f.message
            } else {
                &f.stderr_tail
            };
            for line in why.lines() {
                println!("      | {line}");
            }
        }
        println!("every attempt: warren logs {} --failed", state.run);
    }
    EXIT_OK
}

/// Failed items listed by `warren status --run` (the whole list is in `--json`).
const STATUS_FAILURES: usize = 10;
/// Lines of stderr kept per failed item.
const FAILURE_LINES: usize = 3;

/// A failed item of a run, with why from its last attempt's record.
struct FailedItem {
    stage: String,
    item: String,
    error: String,
    message: String,
    stderr_tail: String,
}

/// The run's failed items in pipeline order, each with the error and the end of the stderr of
/// its last recorded attempt (from the logs stream; empty when none is kept).
async fn failed_items(
    amqp: &AmqpSettings,
    state: &warren_submitter::pipeline::run::RunState,
) -> Vec<FailedItem> {
    let mut failed: Vec<FailedItem> = Vec::new();
    for (stage, _) in &state.counts {
        for (item, item_state) in state.stages.get(stage).into_iter().flatten() {
            if let ItemState::Failed(kind) = item_state {
                failed.push(FailedItem {
                    stage: stage.clone(),
                    item: item.clone(),
                    error: kind.clone(),
                    message: String::new(),
                    stderr_tail: String::new(),
                });
            }
        }
    }
    if failed.is_empty() {
        return failed;
    }
    let mut last = std::collections::HashMap::new();
    if let Ok(connection) =
        warren_broker::connection::connect(amqp, &connection_name("status")).await
    {
        let filter = warren_submitter::logs::LogFilter {
            batch: state.run.clone(),
            failed: true,
            ..Default::default()
        };
        let _ = warren_submitter::logs::read_logs(
            &connection,
            &filter,
            warren_submitter::logs::Since::BatchStart,
            false,
            &mut |entry| {
                let r = entry.record;
                if let (Some(stage), Some(item)) = (r.labels.get("stage"), r.labels.get("item")) {
                    let stderr = r.output["stderr"].as_str().unwrap_or_default();
                    let lines: Vec<&str> =
                        stderr.lines().filter(|l| !l.trim().is_empty()).collect();
                    let tail = lines[lines.len().saturating_sub(FAILURE_LINES)..].join("\n");
                    let message = r.error.map(|e| e.message).unwrap_or_default();
                    last.insert((stage.clone(), item.clone()), (message, tail));
                }
            },
        )
        .await;
        close_connection(&connection, "done").await;
    }
    for f in &mut failed {
        if let Some((message, tail)) = last.remove(&(f.stage.clone(), f.item.clone())) {
            f.message = message;
            f.stderr_tail = tail;
        }
    }
    failed
}
