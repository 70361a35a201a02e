//! `warren wait` (and the collecting half of `submit --wait`): results to JSON lines, progress, summary.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use warren_broker::AmqpSettings;
use warren_submitter::collect::{CollectError, CollectOptions, Counts, Outcome};
use warren_submitter::output::{JsonLines, open_output};
use warren_submitter::seqset::SeqSet;
use warren_submitter::submit::Submitter;

use clap::Args;

use crate::cli::*;
use crate::progress::StderrProgress;

/// How results are collected: `warren wait`'s flags, also taken by `submit --wait`.
#[derive(Args)]
pub struct CollectArgs {
    /// File to append result lines to (default: stdout).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Stop waiting after this many seconds (exit status 3; resume with `warren wait`).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Seconds to keep retrying while the broker or a batch's queue is unavailable (connection
    /// lost, a queue without quorum while nodes restart) before giving up (exit status 2).
    /// Default: 300 for collecting results, 15 for publishing tasks.
    #[arg(long)]
    pub retry_for: Option<f64>,
    /// Seconds the task queue may have no consumer, while results are outstanding, before a
    /// warning says so (a mistyped --queue, or a pool that does not start).
    #[arg(long, default_value_t = warren_submitter::NO_CONSUMER_WARN_AFTER.as_secs_f64())]
    pub warn_no_worker_after: f64,
}

/// `warren wait BATCH`.
#[derive(Args)]
pub struct WaitArgs {
    /// Batch id printed by `warren submit`.
    pub batch: String,
    #[command(flatten)]
    pub collect: CollectArgs,
}

/// The wait that `args` ask for; Err when a number of seconds is not valid.
pub fn wait_command(args: CollectArgs) -> Result<WaitCommand, ()> {
    let timeout = match args.timeout {
        Some(t) => Some(seconds(t).ok_or(())?),
        None => None,
    };
    let retry_for = match args.retry_for {
        Some(s) => seconds(s).ok_or(())?,
        None => warren_broker::connection::DEFAULT_COLLECT_RETRY_FOR,
    };
    let warn_no_worker_after = seconds(args.warn_no_worker_after).ok_or(())?;
    Ok(WaitCommand {
        output: args.output,
        timeout,
        retry_for,
        warn_no_worker_after,
    })
}

/// Options of `warren wait` (and of `submit --wait`).
#[derive(Debug, Clone)]
pub struct WaitCommand {
    /// Where result lines go; stdout when None. Files are appended to, never truncated, so a
    /// resumed wait adds to what an interrupted one wrote.
    pub output: Option<PathBuf>,
    /// Stop waiting after this long.
    pub timeout: Option<Duration>,
    /// How long to keep retrying an unreachable broker.
    pub retry_for: Duration,
    /// Warn when the task queue has had no consumer this long.
    pub warn_no_worker_after: Duration,
}

/// Runs `warren wait`; returns the process exit status.
pub async fn wait(amqp: AmqpSettings, batch: &str, cmd: &WaitCommand) -> u8 {
    let mut submitter = Submitter::new(amqp, connection_name("wait"));
    collect(&mut submitter, batch, cmd).await
}

pub async fn collect(submitter: &mut Submitter, batch: &str, cmd: &WaitCommand) -> u8 {
    let started = Instant::now();
    let mut already_written = SeqSet::default();
    let mut sink: JsonLines<Box<dyn Write>> = match &cmd.output {
        None => JsonLines::new(Box::new(std::io::stdout())),
        Some(path) => match open_output(path, batch) {
            Ok(resumed) => {
                if resumed.dropped_partial > 0 {
                    eprintln!(
                        "{}: dropped a partial last line ({} bytes) left by an interrupted wait; \
                         its result will be written again",
                        path.display(),
                        resumed.dropped_partial
                    );
                }
                already_written = resumed.written;
                JsonLines::new(Box::new(resumed.file))
            }
            Err(e) => return fail(&format!("cannot open output file {}: {e}", path.display())),
        },
    };
    let mut progress = StderrProgress::for_stderr(batch);
    let options = CollectOptions {
        timeout: cmd.timeout,
        retry_for: cmd.retry_for,
        already_written,
        warn_no_worker_after: cmd.warn_no_worker_after,
    };

    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let outcome = submitter
        .collect(batch, &mut sink, &mut progress, &options, interrupt)
        .await;
    progress.finish();
    let code = match outcome {
        Ok(Outcome::Complete(counts)) => {
            eprintln!("{}", summary(batch, &counts, started.elapsed()));
            if counts.failed() == 0 {
                EXIT_OK
            } else {
                EXIT_TASK_FAILED
            }
        }
        Ok(Outcome::Incomplete(counts)) => {
            eprintln!("{}", summary(batch, &counts, started.elapsed()));
            eprintln!(
                "stopped before every result was in; collect the rest with: warren wait {batch}"
            );
            EXIT_INCOMPLETE
        }
        Err(CollectError::Sink(e)) => fail(&format!("cannot write results: {e}")),
        Err(e) => fail(&e.to_string()),
    };
    // After the outcome is printed (a slow broker delays only the exit), before the exit: the
    // close frees the batch's collector lock for the next wait.
    submitter.close().await;
    code
}

/// The one-line summary printed at the end of a wait.
pub fn summary(batch: &str, counts: &Counts, elapsed: Duration) -> String {
    let total = counts.total.map_or("?".to_string(), |t| t.to_string());
    let statuses: Vec<String> = counts
        .by_status
        .iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    let fresh = counts.done - counts.earlier;
    let rate = fresh as f64 / elapsed.as_secs_f64().max(0.001);
    let mut line = format!(
        "batch {batch}: {}/{total} results; {} in {:.1}s ({rate:.0}/s)",
        counts.done,
        if statuses.is_empty() {
            "none new".to_string()
        } else {
            statuses.join(", ")
        },
        elapsed.as_secs_f64()
    );
    if counts.earlier > 0 {
        line += &format!("; {} collected earlier by another wait", counts.earlier);
    }
    if !counts.failed_examples.is_empty() {
        line += "\nnot succeeded:";
        for (id, kind, why) in &counts.failed_examples {
            line += &format!("\n  {id} ({kind}): {why}");
        }
        let more = counts
            .failed()
            .saturating_sub(counts.failed_examples.len() as u64);
        if more > 0 {
            line += &format!("\n  and {more} more (see the result lines)");
        }
        line += &format!(
            "\nevery attempt's command, exit and whole stderr: warren logs {batch} --failed"
        );
    }
    line
}
