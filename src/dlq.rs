//! `warren dlq`: list, show, replay or purge what a task queue set aside.

use warren_broker::AmqpSettings;
use warren_broker::topology::dead_letter_queue;
use warren_submitter::dlq::{DeadLetters, Filter};

use clap::{Args, Subcommand};
use warren_broker::topology::DEFAULT_TASK_QUEUE;

use crate::cli::*;

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
// Long: one match arm per `warren dlq` action, each printing its own output.
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
        DlqAction::Replay => match letters
            .replay(filter, &mut |batch| {
                // Named before its first task is sent: a replay stopped part-way leaves a batch
                // that can still be collected.
                eprintln!("replaying tasks whose batch is gone into the new batch {batch}");
            })
            .await
        {
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

#[derive(Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    action: DlqCommand,
}

#[derive(Subcommand)]
pub enum DlqCommand {
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
pub struct DlqFilterArgs {
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

/// Runs `warren dlq ...`; returns the exit status.
pub async fn run(args: DlqArgs, amqp: AmqpSettings) -> u8 {
    let (filter, action) = match args.action {
        DlqCommand::List(f) => (f, DlqAction::List),
        DlqCommand::Show { filter, limit } => (filter, DlqAction::Show { limit }),
        DlqCommand::Replay(f) => (f, DlqAction::Replay),
        DlqCommand::Purge { filter, yes } => (filter, DlqAction::Purge { yes }),
    };
    let selection = warren_submitter::dlq::Filter {
        batch: filter.batch,
        reason: filter.reason,
    };
    dlq(amqp, &filter.queue, &selection, action).await
}
