//! Running a pipeline: expands the first stages' items, submits what is ready (skipping items
//! whose outputs are up to date), reads results as they come, and keeps the run's state in
//! RabbitMQ (queue `warren.runs.<run>`), so a run stopped or killed anywhere is resumed from any
//! machine with the same files, and no task whose result was recorded runs again.
//!
//! The state is checkpointed like a batch's manifest (see `checkpoint`): results are acknowledged
//! only once a state that records them is confirmed, so a killed runner loses nothing. A
//! checkpoint costs what changed: most are deltas (the items whose state changed since the one
//! before), and a full state replaces the deltas once they add up to as many items as it holds,
//! so the queue holds at most about twice the run and a checkpoint's bytes do not grow with it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use futures_lite::StreamExt;
use lapin::{Channel, Connection, Consumer};
use tracing::warn;
use warren_broker::connection::{RetryBudget, consumer_channel};
use warren_broker::error::is_access_refused;
use warren_broker::protocol::{
    self, DEAD_REASON_FOREIGN_RESULT, DEAD_REASON_UNREADABLE_RESULT, TaskStatus,
};
use warren_broker::publisher::{PendingConfirm, Publisher};
use warren_broker::topology::{self, amqp_name, dead_letter_queue, result_queue, run_queue};
use warren_broker::{AmqpSettings, BrokerError};

use super::Pipeline;
pub use super::items::{dry_run, root_items, up_to_date};
use super::plan::{ItemState, Plan, task_id};
pub use super::state::{MESSAGE_TYPE_RUN, RunState, StageEdge, fold_states, read_state};
use super::window::{AHEAD_PROBE, Ahead};
use crate::checkpoint::{consume_alone, set_aside};
use crate::submit::{SubmitOptions, Submitter, encode_task};

mod options;
mod record;

pub use options::{DEFAULT_MAX_QUEUED, RunEnd, RunError, RunOptions, RunProgress};
/// Results taken before a checkpoint records them.
const CHECKPOINT_AFTER: usize = 100;
/// Item changes recorded in deltas before a full state replaces them, at the least (else as
/// many as the last full state held).
const COMPACT_AFTER: usize = 10_000;
/// Time between progress updates.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// Time between checkpoints while results trickle in.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Longest wait, when a session starts, for the results that arrived while no runner was there.
const BACKLOG_WAIT: Duration = Duration::from_secs(10);
/// Longest wait, after a session failed, for the confirms of the tasks it sent.
const LOST_CONFIRM_WAIT: Duration = Duration::from_secs(5);
/// Largest result message read.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The last 3 lines of a failed task's stderr (its command says why there), else its error
/// message; each line at most 300 characters.
fn failure_tail(result: &warren_broker::protocol::ResultEnvelope) -> String {
    let stderr = result.output["stderr"].as_str().unwrap_or_default();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = if lines.is_empty() {
        vec![result.error.as_ref().map_or("", |e| e.message.as_str())]
    } else {
        lines[lines.len().saturating_sub(3)..].to_vec()
    };
    tail.iter()
        .map(|l| match l.char_indices().nth(300) {
            Some((cut, _)) => format!("{}…", &l[..cut]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A run in progress.
struct Runner<'a> {
    options: &'a RunOptions,
    plan: Plan,
    token: String,
    generation: u64,
    /// Task id → (stage, item) of what was submitted and not finished.
    in_flight: HashMap<String, (usize, String)>,
    /// Tasks sent whose confirm is not yet awaited: submitting does not wait a round trip per
    /// task, and every checkpoint awaits these first, so no state records a task as submitted
    /// before the broker holds it.
    unconfirmed: Vec<(usize, String, PendingConfirm)>,
    next_seq: u32,
    submitted_at: String,
    /// Set once a session consumed results: the retry budget starts over.
    progressed: bool,
    /// Per task queue, what the runner knows of its waiting tasks (see [`Ahead`]).
    ahead: HashMap<String, Ahead>,
    /// Item changes written as deltas since the last full state.
    since_full: usize,
    /// Items the last full state held.
    full_size: usize,
    /// Bytes of state written, for the run's figures.
    checkpoint_bytes: u64,
}

/// Runs (or resumes) `pipeline`; returns how it ended and the final plan.
pub async fn run(
    amqp: &AmqpSettings,
    pipeline: Pipeline,
    options: &RunOptions,
    progress: &mut dyn RunProgress,
) -> Result<(RunEnd, Plan), RunError> {
    let mut submitter = Submitter::new(amqp.clone(), format!("warren-run-{}", options.run));
    let roots = root_items(&pipeline).map_err(RunError::Invalid)?;
    let mut runner = Runner {
        options,
        plan: Plan::new(pipeline),
        token: protocol::new_token(),
        generation: 0,
        in_flight: HashMap::new(),
        unconfirmed: Vec::new(),
        next_seq: 0,
        submitted_at: protocol::timestamp(SystemTime::now()),
        progressed: false,
        ahead: HashMap::new(),
        since_full: 0,
        full_size: 0,
        checkpoint_bytes: 0,
    };
    runner.plan.set_barriers(options.barriers);
    runner.plan.track_changes();
    for (stage, items) in roots {
        runner.plan.add_items(stage, items);
    }
    let deadline = options.timeout.map(|t| Instant::now() + t);
    let mut retry = RetryBudget::new(options.retry_for);
    let mut first = true;
    loop {
        let outcome = async {
            let (connection, publisher) = submitter.connection().await?;
            let publisher = publisher.clone();
            runner
                .session(connection, &publisher, first, deadline, progress)
                .await
        }
        .await;
        first = false;
        if outcome.is_err() {
            // Tasks the broker did not confirm wait to be submitted again by the next session.
            let _ = runner.confirm_submitted(Some(LOST_CONFIRM_WAIT)).await;
        }
        if std::mem::take(&mut runner.progressed) {
            retry.progressed();
        }
        match outcome {
            Ok(end) => {
                tracing::debug!(
                    run = %options.run,
                    generations = runner.generation,
                    bytes = runner.checkpoint_bytes,
                    "run state written"
                );
                return Ok((end, runner.plan));
            }
            Err(RunError::Broker(e)) if !e.is_fatal() => match retry.failed() {
                Some(delay) => {
                    warn!(run = %options.run, "run interrupted ({e}); reconnecting in {delay:.1?}");
                    submitter.reset();
                    tokio::time::sleep(delay).await;
                }
                None => {
                    return Err(RunError::Invalid(format!(
                        "{e}; gave up after {:?} of failures. What finished is recorded: continue with \
                         warren run --resume {} (tasks already submitted still run)",
                        retry.budget(),
                        options.run
                    )));
                }
            },
            Err(e) => return Err(e),
        }
    }
}

impl Runner<'_> {
    /// Declares the run's queues, reads (and on a resume takes over) its recorded state, and
    /// consumes its results queue alone: refused when another process runs it.
    async fn open(
        &mut self,
        connection: &Connection,
        publisher: &Publisher,
        first: bool,
    ) -> Result<(Channel, Consumer), RunError> {
        let run = self.options.run.clone();
        let queues: Vec<String> = {
            let mut q: Vec<String> = self
                .plan
                .pipeline()
                .stages
                .iter()
                .map(|s| s.queue.clone())
                .collect();
            q.sort();
            q.dedup();
            q
        };
        for queue in &queues {
            if !self.options.create_queue {
                topology::require_task_queue(connection, queue).await?;
            }
            topology::declare_task_queue(publisher.channel(), queue).await?;
        }
        let results_queue = result_queue(&run);
        if first && self.options.resume {
            let found = topology::inspect(publisher.channel(), &run_queue(&run)).await;
            if let Err(BrokerError::QueueNotFound { .. }) = found {
                return Err(RunError::Invalid(format!(
                    "run {run} not found: it has no recorded state (never started, or expired)"
                )));
            }
            found?;
        }
        topology::declare_result_queue(publisher.channel(), &run, &queues[0], self.options.expiry)
            .await?;
        topology::declare_run_queue(publisher.channel(), &run, self.options.expiry).await?;
        let results = consumer_channel(connection, 256).await?;
        if topology::inspect(&results, &results_queue)
            .await?
            .consumer_count()
            > 0
        {
            if first {
                return Err(RunError::Invalid(format!(
                    "run {run} is being run by another process (its results queue has a consumer)"
                )));
            }
            // After a reconnect, the consumer may be this process's lost connection.
            return Err(BrokerError::QueueBusy {
                queue: results_queue.clone(),
            }
            .into());
        }
        // Read what earlier sessions recorded (and, on a resume, take it over).
        self.checkpoint(publisher, None, true, first).await?;
        let consumer = match consume_alone(&results, &results_queue).await {
            Ok(consumer) => consumer,
            // Only a refusal means another runner; anything else (a lost connection) is retried.
            Err(e) if is_access_refused(&e) => {
                return Err(RunError::Invalid(format!(
                    "run {run} is being run by another process (its results queue is held): {e}"
                )));
            }
            Err(e) => return Err(BrokerError::from(e).into()),
        };
        Ok((results, consumer))
    }

    /// One connection's run: take the results queue alone, then submit what is ready and take
    /// results until the run completes or is stopped.
    // Long: one loop that submits, reports progress, takes results and checkpoints, whose
    // counters (backlog, pending, last checkpoint) are shared by all four.
    async fn session(
        &mut self,
        connection: &Connection,
        publisher: &Publisher,
        first: bool,
        deadline: Option<Instant>,
        progress: &mut dyn RunProgress,
    ) -> Result<RunEnd, RunError> {
        let run = self.options.run.clone();
        let results_queue = result_queue(&run);
        let (results, mut consumer) = self.open(connection, publisher, first).await?;
        self.progressed = true;
        tracing::debug!(
            run = %run,
            items = self.full_size,
            generation = self.generation,
            "state read and written again; taking results"
        );
        // Results that arrived while no runner was there are taken before anything is submitted,
        // so an item that finished after the last recorded state is not run again.
        let mut backlog = topology::inspect(&results, &results_queue)
            .await?
            .message_count();
        let backlog_deadline = Instant::now() + BACKLOG_WAIT;
        let mut unacked: Option<u64> = None;
        let mut pending = 0usize;
        let mut last_checkpoint = Instant::now();
        let mut last_progress: Option<Instant> = None;
        loop {
            if backlog == 0 || Instant::now() >= backlog_deadline {
                backlog = 0;
                self.submit_ready(publisher).await?;
            }
            // Ten times a second is enough for a progress display, and spares the counting on
            // every result of a fast run.
            if last_progress.is_none_or(|at| at.elapsed() >= PROGRESS_EVERY) || self.plan.complete()
            {
                progress.update(&self.plan, &self.counts());
                last_progress = Some(Instant::now());
            }
            if self.plan.complete() {
                self.record(publisher, &results, &mut unacked).await?;
                let _ = results
                    .queue_delete(amqp_name(&results_queue)?, Default::default())
                    .await;
                return Ok(RunEnd::Finished);
            }
            let stop_requested = self
                .options
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed))
                || deadline.is_some_and(|d| Instant::now() >= d);
            if stop_requested {
                self.record(publisher, &results, &mut unacked).await?;
                return Ok(RunEnd::Stopped);
            }
            let wait = if self.probing() {
                AHEAD_PROBE
            } else {
                Duration::from_millis(250)
            };
            let next = tokio::time::timeout(wait, consumer.next()).await;
            match next {
                Ok(Some(Ok(delivery))) => {
                    backlog = backlog.saturating_sub(1);
                    self.take_result(&results, publisher, &delivery).await?;
                    unacked = Some(delivery.delivery_tag);
                    pending += 1;
                }
                Ok(Some(Err(e))) => return Err(BrokerError::from(e).into()),
                Ok(None) => {
                    return Err(BrokerError::ConsumerCancelled {
                        queue: results_queue.clone(),
                    }
                    .into());
                }
                Err(_) => {}
            }
            if pending > 0
                && (pending >= CHECKPOINT_AFTER || last_checkpoint.elapsed() >= CHECKPOINT_EVERY)
            {
                self.record(publisher, &results, &mut unacked).await?;
                pending = 0;
                last_checkpoint = Instant::now();
            }
        }
    }

    /// Submits ready items up to the window; items whose outputs are up to date are recorded as
    /// such instead. Costs what it submits, not the size of the run: each ready stage hands over
    /// only as many waiting items as its queue may take.
    async fn submit_ready(&mut self, publisher: &Publisher) -> Result<(), RunError> {
        loop {
            let mut changed = false;
            for stage in self.plan.ready_stages() {
                let room = self.options.max_queued.saturating_sub(self.in_flight.len());
                if room == 0 {
                    return Ok(());
                }
                let queue = self.plan.pipeline().stages[stage].queue.clone();
                let ahead = self.waiting_in(publisher, &queue).await?;
                let take = room.min(usize::try_from(ahead.room()).unwrap_or(usize::MAX));
                if take == 0 {
                    // Nothing may go to this queue now; its items wait for the next result
                    // (looking at them here would check files on every result).
                    continue;
                }
                let mut submitted = 0;
                // Up-to-date items are recorded without taking room: look further for them.
                for item in self
                    .plan
                    .waiting_items(stage, take.max(1).saturating_mul(4))
                {
                    if !self.options.force && up_to_date(&self.plan, stage, &item) {
                        self.plan.record(stage, &item, ItemState::UpToDate);
                        changed = true;
                        continue;
                    }
                    if submitted >= take {
                        break;
                    }
                    self.submit(publisher, stage, &item, &queue).await?;
                    submitted += 1;
                    changed = true;
                }
            }
            if !changed {
                return Ok(());
            }
        }
    }

    /// Publishes the task of `item` of `stage` to `queue`.
    async fn submit(
        &mut self,
        publisher: &Publisher,
        stage: usize,
        item: &str,
        queue: &str,
    ) -> Result<(), RunError> {
        let spec = self
            .plan
            .task(&self.options.run, stage, item)
            .map_err(|e| RunError::Invalid(format!("stage {stage}, item '{item}': {e}")))?;
        let options = SubmitOptions::new(queue.to_string());
        let (body, properties) = encode_task(
            &spec,
            &self.options.run,
            &self.token,
            self.next_seq,
            &self.submitted_at,
            &options,
        )
        .map_err(|e| RunError::Invalid(e.to_string()))?;
        let confirm = publisher.send(queue, &body, properties).await?;
        if let Some(ahead) = self.ahead.get_mut(queue) {
            ahead.submitted();
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        self.plan.submitted(stage, item);
        self.in_flight.insert(
            task_id(&self.plan.pipeline().stages[stage].name, item),
            (stage, item.to_string()),
        );
        self.unconfirmed.push((stage, item.to_string(), confirm));
        Ok(())
    }

    /// Waits until the broker confirms every task sent. One it did not take (refused, or its
    /// connection lost first) is taken back: its item waits to be submitted again.
    /// With `within`, a confirm not in by then counts as refused (after a failed session, whose
    /// connection may not say).
    async fn confirm_submitted(&mut self, within: Option<Duration>) -> Result<(), RunError> {
        let deadline = within.map(|d| tokio::time::Instant::now() + d);
        let mut failure = None;
        let mut refused = Vec::new();
        for (stage, item, confirm) in std::mem::take(&mut self.unconfirmed) {
            let confirmed = match deadline {
                Some(at) => tokio::time::timeout_at(at, confirm.confirmed())
                    .await
                    .unwrap_or_else(|_| {
                        Err(BrokerError::ConfirmTimeout(within.unwrap_or_default()))
                    }),
                None => confirm.confirmed().await,
            };
            if let Err(e) = confirmed {
                failure.get_or_insert(e);
                // A result that came first settled the item: nothing to take back.
                if self.plan.state(stage, &item) != Some(&ItemState::Submitted) {
                    continue;
                }
                let name = &self.plan.pipeline().stages[stage].name;
                self.in_flight.remove(&task_id(name, &item));
                if let Some(ahead) = self
                    .ahead
                    .get_mut(&self.plan.pipeline().stages[stage].queue)
                {
                    ahead.finished();
                }
                refused.push((stage, item));
            }
        }
        self.plan.unsubmit(&refused);
        failure.map_or(Ok(()), |e| Err(e.into()))
    }

    /// What the runner knows of `queue`, read again from the broker when older than
    /// half a second, or sooner while its consumers took everything and the window is used up.
    async fn waiting_in(&mut self, publisher: &Publisher, queue: &str) -> Result<Ahead, RunError> {
        if let Some(known) = self.ahead.get(queue)
            && !known.stale()
        {
            return Ok(*known);
        }
        let found = topology::inspect(publisher.channel(), queue).await?;
        let ahead = self
            .ahead
            .entry(queue.to_string())
            .or_insert_with(Ahead::new);
        ahead.observe(
            u64::from(found.message_count()),
            u64::from(found.consumer_count()),
        );
        Ok(*ahead)
    }

    /// Whether a queue's consumers took everything the window allowed: the runner then looks
    /// again soon rather than at the next result.
    fn probing(&self) -> bool {
        // With `--max-queued` used up nothing could be submitted anyway: no early look.
        self.in_flight.len() < self.options.max_queued && self.ahead.values().any(Ahead::probing)
    }

    /// Records one result (ignoring repeats); a stranger (another batch's, without the run's
    /// token, or unreadable) goes to the first stage queue's dead-letter queue, with why.
    async fn take_result(
        &mut self,
        channel: &Channel,
        publisher: &Publisher,
        delivery: &lapin::message::Delivery,
    ) -> Result<(), RunError> {
        let refused = match protocol::decode_result(&delivery.data, MAX_MESSAGE_BYTES) {
            Ok(r) if r.batch != self.options.run => Err((
                DEAD_REASON_FOREIGN_RESULT,
                format!("it names batch '{}', not run '{}'", r.batch, self.options.run),
            )),
            Ok(r) if r.token.as_deref() != Some(self.token.as_str()) => Err((
                DEAD_REASON_FOREIGN_RESULT,
                "it does not carry the run's token (published by someone other than a worker running one of its tasks)".to_string(),
            )),
            Ok(r) => Ok(r),
            Err(e) => Err((DEAD_REASON_UNREADABLE_RESULT, e.to_string())),
        };
        let result = match refused {
            Ok(result) => result,
            Err((reason, detail)) => {
                warn!(run = %self.options.run, "dead-lettering a message of the results queue: {detail}");
                let first_queue = &self.plan.pipeline().stages[0].queue;
                set_aside(
                    channel,
                    publisher,
                    delivery,
                    &result_queue(&self.options.run),
                    Some(&dead_letter_queue(first_queue)),
                    "runner",
                    (reason, &detail),
                )
                .await?;
                return Ok(());
            }
        };
        let place = self.in_flight.remove(&result.task_id).or_else(|| {
            // Submitted by an earlier session of this run: find it by its labels.
            let stage = result.labels.get("stage")?;
            let item = result.labels.get("item")?;
            let index = self
                .plan
                .pipeline()
                .stages
                .iter()
                .position(|s| &s.name == stage)?;
            Some((index, item.clone()))
        });
        let Some((stage, item)) = place else {
            return Ok(());
        };
        if let Some(ahead) = self
            .ahead
            .get_mut(&self.plan.pipeline().stages[stage].queue)
        {
            ahead.finished();
        }
        let outcome = if result.status == TaskStatus::Succeeded {
            ItemState::Done
        } else {
            self.plan.note_failure(stage, &item, failure_tail(&result));
            ItemState::Failed(
                result
                    .error
                    .as_ref()
                    .map_or(result.status.as_str().to_string(), |e| e.kind.clone()),
            )
        };
        self.plan.record(stage, &item, outcome);
        Ok(())
    }
}
