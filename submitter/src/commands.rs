//! The `submit`, `wait` and `status` commands, as the CLI runs them: inputs, outputs, summary
//! and exit status.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use warren_broker::AmqpSettings;
use warren_broker::BrokerError;
use warren_broker::connection::{confirm_channel, connect};
use warren_broker::depth::{Management, ManagementTarget};
use warren_broker::protocol::{self, Cancellation, MESSAGE_TYPE_CANCEL, PROTOCOL_VERSION};
use warren_broker::publisher::{Publisher, message_properties};
use warren_broker::topology::{self, CANCELLATIONS_STREAM, dead_letter_queue, result_queue};

use crate::batches::list_batches;
use crate::collect::{CollectError, CollectOptions, Counts, Outcome};
use crate::dlq::{DeadLetters, Filter};
use crate::fanout::FanOut;
use crate::journal::Journal;
use crate::output::{JsonLines, StderrProgress, open_output};
use crate::seqset::SeqSet;
use crate::spec::{SpecSource, TaskFile, TaskSpec};
use crate::status::{queue_status, render};
use crate::submit::{SubmitError, SubmitOptions, Submitter, prepare};

/// Exit status: every task succeeded.
pub const EXIT_OK: u8 = 0;
/// Exit status: at least one task failed, timed out or was rejected.
pub const EXIT_TASK_FAILED: u8 = 1;
/// Exit status: bad usage or input, or the broker could not be used.
pub const EXIT_USAGE_OR_CONNECTION: u8 = 2;
/// Exit status: stopped waiting before every result was in (timeout or Ctrl-C).
pub const EXIT_INCOMPLETE: u8 = 3;
/// Exit status: `submit` stopped by Ctrl-C while publishing (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

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

/// Runs `warren submit`; returns the process exit status.
pub async fn submit(cmd: SubmitCommand) -> u8 {
    // Kept until the end: the task file stdin was spooled to.
    let mut _spooled = None;
    let source: Box<dyn SpecSource + Send> = match &cmd.source {
        TaskSource::Single(spec) => Box::new(vec![spec.clone()]),
        TaskSource::File(path) if path.as_os_str() == "-" => match spool_stdin().await {
            Ok(file) => {
                let source = TaskFile::new(file.path(), "stdin");
                _spooled = Some(file);
                Box::new(source)
            }
            Err(message) => return fail(&message),
        },
        TaskSource::File(path) => Box::new(TaskFile::new(path, path.display().to_string())),
        TaskSource::FanOut(fan) => Box::new(fan.clone()),
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
    let submitted = match &cmd.resume {
        None => match prepare(&*source, &options) {
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
            Ok(journal) => {
                eprintln!(
                    "resuming batch {batch}: {} of {} task(s) were confirmed before; publishing the rest",
                    journal.confirmed_count(),
                    journal.total
                );
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
        Err(e) => {
            let Some(journal) = e.journal() else {
                return fail(&format!("nothing usable was submitted: {e}"));
            };
            // The batch id goes to stdout as on success: scripts must know what will run.
            if batch_id_to_stdout {
                println!("{}", journal.batch);
                let _ = std::io::stdout().flush();
            }
            let resume = match (&cmd.source, journal.save()) {
                (TaskSource::File(file), Ok(_)) if file.as_os_str() != "-" => format!(
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
            return fail(&format!(
                "{e} (--retry-for). Once the broker is reachable, {resume}"
            ));
        }
    };
    if batch_id_to_stdout {
        println!("{}", receipt.batch);
        let _ = std::io::stdout().flush();
    }
    eprintln!(
        "submitted {} task(s) to '{}' as batch {}",
        receipt.total, cmd.options.queue, receipt.batch
    );
    match &cmd.wait {
        None => EXIT_OK,
        Some(wait) => collect(&mut submitter, &receipt.batch, wait).await,
    }
}

/// Runs `warren wait`; returns the process exit status.
pub async fn wait(amqp: AmqpSettings, batch: &str, cmd: &WaitCommand) -> u8 {
    let mut submitter = Submitter::new(amqp, connection_name("wait"));
    collect(&mut submitter, batch, cmd).await
}

/// Runs `warren batches`; returns the exit status.
pub async fn batches(amqp: AmqpSettings, management: &ManagementTarget, json: bool) -> u8 {
    let batches = match list_batches(&amqp, management).await {
        Ok(b) => b,
        Err(e) => {
            return fail(&format!(
                "cannot list batches (it needs the management API): {e}"
            ));
        }
    };
    if json {
        for b in &batches {
            match serde_json::to_string(b) {
                Ok(line) => println!("{line}"),
                Err(e) => return fail(&e.to_string()),
            }
        }
        return EXIT_OK;
    }
    if batches.is_empty() {
        println!("no batches in the broker: every batch was collected, or expired");
        return EXIT_OK;
    }
    let span = |s: Option<u64>| {
        s.map_or("-".to_string(), |s| {
            humantime::format_duration(Duration::from_secs(s)).to_string()
        })
    };
    println!(
        "{:<38} {:<20} {:>7} {:>9} {:>8}  {:<16} {:<14} EXPIRES IN",
        "BATCH", "QUEUE", "TOTAL", "COLLECTED", "WAITING", "STATE", "AGE"
    );
    for b in &batches {
        let state = match (b.collecting, b.total) {
            (true, _) => "being collected",
            (false, None) => "no manifest yet",
            (false, Some(t)) if b.collected + b.waiting >= u64::from(t) => "all results in",
            (false, Some(_)) => "running",
        };
        println!(
            "{:<38} {:<20} {:>7} {:>9} {:>8}  {:<16} {:<14} {}",
            b.batch,
            b.queue.as_deref().unwrap_or("-"),
            b.total.map_or("?".to_string(), |t| t.to_string()),
            b.collected,
            b.waiting,
            state,
            span(b.age_s),
            span(b.expires_in_s),
        );
    }
    println!("collect one with `warren wait BATCH`; stop one with `warren cancel BATCH`");
    EXIT_OK
}

/// Says that `queue` does not exist, and which task queues do (those with a `.dead` sibling).
async fn missing_queue(amqp: &AmqpSettings, management: &ManagementTarget, queue: &str) -> String {
    let mut message = format!(
        "task queue '{queue}' does not exist yet: the first `warren worker` or `warren submit` on it creates it"
    );
    let listed = match Management::new(management, amqp) {
        Ok(api) => api.queues("").await.ok(),
        Err(_) => None,
    };
    if let Some(queues) = listed {
        let names: std::collections::BTreeSet<&str> =
            queues.iter().map(|q| q.name.as_str()).collect();
        let tasks: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| names.contains(format!("{n}.dead").as_str()))
            .collect();
        message += &if tasks.is_empty() {
            ". There are no task queues yet".to_string()
        } else {
            format!(
                ". Task queues here: {} (pick one with --queue)",
                tasks.join(", ")
            )
        };
    }
    message
}

/// Runs `warren cancel BATCH [--task ID]`; returns the exit status.
pub async fn cancel(amqp: AmqpSettings, batch: &str, task: Option<&str>) -> u8 {
    let cancellation = Cancellation {
        v: PROTOCOL_VERSION,
        batch: batch.to_string(),
        task_id: task.map(String::from),
        at: protocol::timestamp(std::time::SystemTime::now()),
    };
    let recorded = async {
        let connection = connect(&amqp, &connection_name("cancel")).await?;
        let publisher = Publisher::new(confirm_channel(&connection).await?);
        // A batch that is gone cannot be cancelled; say so rather than record nothing useful.
        topology::inspect(publisher.channel(), &result_queue(batch)).await?;
        topology::declare_cancellations(publisher.channel()).await?;
        publisher
            .publish(
                CANCELLATIONS_STREAM,
                &protocol::encode(&cancellation),
                message_properties(MESSAGE_TYPE_CANCEL),
            )
            .await?;
        let _ = connection.close(200, "done".into()).await;
        Ok::<(), BrokerError>(())
    };
    match recorded.await {
        Ok(()) => {
            let what = task.map_or_else(
                || format!("batch {batch}"),
                |t| format!("task {t} of batch {batch}"),
            );
            eprintln!(
                "cancelled {what}: workers answer its queued tasks `cancelled` without running them \
                 and stop the running ones; `warren wait {batch}` ends once every task is answered"
            );
            EXIT_OK
        }
        Err(BrokerError::QueueNotFound { .. }) => fail(&format!(
            "batch {batch} not found: it was never submitted, was already collected, or expired"
        )),
        Err(e) => fail(&format!("nothing was cancelled: {e}")),
    }
}

/// What `warren dlq` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlqAction {
    /// Count dead letters by reason and batch.
    List,
    /// Print dead letters as JSON lines.
    Show {
        /// At most this many.
        limit: usize,
    },
    /// Publish dead tasks to the task queue again.
    Replay,
    /// Drop dead letters for good.
    Purge {
        /// The user confirmed.
        yes: bool,
    },
}

/// Runs `warren dlq ACTION`; returns the exit status.
pub async fn dlq(amqp: AmqpSettings, queue: &str, filter: &Filter, action: DlqAction) -> u8 {
    let letters = match DeadLetters::open(&amqp, queue).await {
        Ok(l) => l,
        Err(e) => return fail(&e.to_string()),
    };
    let dead = dead_letter_queue(queue);
    let status = match action {
        DlqAction::List => match letters.summary(filter).await {
            Ok(summary) if summary.total == 0 => {
                println!("no matching dead letters in '{dead}'");
                EXIT_OK
            }
            Ok(summary) => {
                println!("{:<24} {:<40} {:>8}", "REASON", "BATCH", "COUNT");
                for ((reason, batch), n) in &summary.by_reason_and_batch {
                    println!("{reason:<24} {batch:<40} {n:>8}");
                }
                println!(
                    "{} dead letter(s) in '{dead}'; see them with `warren dlq show --queue {queue}`, \
                     run the tasks again after a fix with `warren dlq replay --queue {queue}` \
                     (--batch, --reason narrow both)",
                    summary.total
                );
                EXIT_OK
            }
            Err(e) => fail(&e.to_string()),
        },
        DlqAction::Show { limit } => match letters.show(filter, limit).await {
            Ok(shown) => {
                for letter in shown {
                    match serde_json::to_string(&letter) {
                        Ok(line) => println!("{line}"),
                        Err(e) => return fail(&e.to_string()),
                    }
                }
                EXIT_OK
            }
            Err(e) => fail(&e.to_string()),
        },
        DlqAction::Replay => match letters.replay(filter).await {
            Ok(replayed) => {
                if replayed.home > 0 {
                    eprintln!(
                        "replayed {} task(s) from '{dead}' to '{queue}' into their own batches; \
                         `warren wait` on those batches writes the new results (each with `replayed`)",
                        replayed.home
                    );
                }
                if replayed.tasks == 0 && replayed.home == 0 {
                    eprintln!("no matching dead tasks in '{dead}'");
                } else if replayed.tasks > 0 {
                    // The batch id alone on stdout, as `warren submit` prints it, for scripts.
                    println!("{}", replayed.batch);
                    eprintln!(
                        "replayed {} task(s) whose batch is gone from '{dead}' to '{queue}' as batch \
                         {}; collect their results with `warren wait {}`",
                        replayed.tasks, replayed.batch, replayed.batch
                    );
                }
                if replayed.skipped > 0 {
                    eprintln!(
                        "left {} matching message(s) that are not readable tasks (e.g. results whose \
                         batch was gone); see them with `warren dlq show`, drop them with `warren dlq purge`",
                        replayed.skipped
                    );
                }
                EXIT_OK
            }
            Err(e) => fail(&format!(
                "replay stopped: {e}. Tasks already replayed are out of '{dead}' and will run; run \
                 the replay again for the rest"
            )),
        },
        DlqAction::Purge { yes: false } => match letters.summary(filter).await {
            Ok(summary) => fail(&format!(
                "purge would drop {} dead letter(s) from '{dead}' for good; add --yes to do it",
                summary.total
            )),
            Err(e) => fail(&e.to_string()),
        },
        DlqAction::Purge { yes: true } => match letters.purge(filter).await {
            Ok(moved) => {
                eprintln!("dropped {} dead letter(s) from '{dead}'", moved.done);
                EXIT_OK
            }
            Err(e) => fail(&e.to_string()),
        },
    };
    letters.close().await;
    status
}

/// Runs `warren status`, once or every `watch` interval until Ctrl-C; returns the exit status.
pub async fn status(
    amqp: AmqpSettings,
    management: &ManagementTarget,
    queue: &str,
    json: bool,
    watch: Option<Duration>,
) -> u8 {
    let in_place = watch.is_some() && !json && std::io::stdout().is_terminal();
    loop {
        let status = match queue_status(&amqp, management, queue).await {
            Ok(status) => status,
            Err(BrokerError::QueueNotFound { .. }) => {
                return fail(&missing_queue(&amqp, management, queue).await);
            }
            Err(e) => return fail(&e.to_string()),
        };
        let text = if json {
            // A watch prints one compact JSON document per line, for scripts that follow it.
            let rendered = if watch.is_some() {
                serde_json::to_string(&status)
            } else {
                serde_json::to_string_pretty(&status)
            };
            match rendered {
                Ok(t) => format!("{t}\n"),
                Err(e) => return fail(&e.to_string()),
            }
        } else {
            render(&status)
        };
        let mut out = std::io::stdout().lock();
        let written = if in_place {
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            write!(out, "\x1b[H\x1b[2J{text}\nupdated {now}; Ctrl-C to stop\n")
        } else {
            write!(out, "{text}")
        };
        if written.and_then(|()| out.flush()).is_err() {
            return EXIT_OK; // stdout closed (e.g. piped into head)
        }
        drop(out);
        let Some(every) = watch else { return EXIT_OK };
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return EXIT_OK,
        }
        if !in_place && !json {
            println!();
        }
    }
}

async fn collect(submitter: &mut Submitter, batch: &str, cmd: &WaitCommand) -> u8 {
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
    match outcome {
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
    }
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
        let named: Vec<String> = counts
            .failed_examples
            .iter()
            .map(|(id, kind)| format!("{id} ({kind})"))
            .collect();
        line += &format!("\nnot succeeded: {}", named.join(", "));
        let more = counts.failed().saturating_sub(named.len() as u64);
        if more > 0 {
            line += &format!(" and {more} more (see the result lines)");
        }
    }
    line
}

/// A flag set when Ctrl-C (SIGINT) arrives, for commands that stop cleanly rather than die.
pub fn stop_on_ctrl_c() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            flag.store(true, Ordering::Relaxed);
        }
    });
    stop
}

/// Reads stdin once into a temporary file, so that the batch can be checked and then published
/// (and republished after a reconnect) without being held in memory.
async fn spool_stdin() -> Result<tempfile::NamedTempFile, String> {
    tokio::task::spawn_blocking(|| {
        let mut file = tempfile::NamedTempFile::new()
            .map_err(|e| format!("cannot create a temporary file to hold stdin: {e}"))?;
        std::io::copy(&mut std::io::stdin().lock(), &mut file)
            .map_err(|e| format!("cannot read the tasks from stdin: {e}"))?;
        Ok(file)
    })
    .await
    .map_err(|e| format!("cannot read the tasks from stdin: {e}"))?
}

fn connection_name(role: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    format!("warren-{role}@{host}-{}", std::process::id())
}

fn fail(message: &str) -> u8 {
    eprintln!("error: {message}");
    EXIT_USAGE_OR_CONNECTION
}
