//! Collecting a batch's results, safely across processes.
//!
//! Results are written to the sink as they arrive, but acknowledged only at checkpoints: the sink
//! is flushed, a new manifest generation recording every `seq` written so far is published and
//! confirmed, and only then are the older manifests and the written results acknowledged. Killed
//! at any point, the next collector finds the newest manifest, skips what it lists, and
//! collects the rest; at worst a result is written twice, never lost.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tracing::{info, warn};
use warren_broker::BrokerError;
use warren_broker::connection::{RetryBudget, consumer_channel};
use warren_broker::depth::{Management, ManagementTarget};
use warren_broker::error::is_access_refused;
use warren_broker::protocol::{
    self, BatchManifest, DEAD_REASON_FOREIGN_RESULT, DEAD_REASON_UNREADABLE_RESULT,
    MESSAGE_TYPE_MANIFEST, PROTOCOL_VERSION, ResultEnvelope, TaskStatus,
};
use warren_broker::publisher::{Publisher, message_properties, verified_user};
use warren_broker::topology::{self, dead_letter_queue, manifest_queue, result_queue, short};

use crate::checkpoint::{self, ack_checkpointed, consume_alone, take_states};
use crate::seqset::SeqSet;
use crate::submit::Submitter;

/// Largest result message read.
const MAX_RESULT_BYTES: usize = 64 << 20;
/// Results delivered ahead of being written.
const RESULT_PREFETCH: u16 = 1000;
/// How often written results are checkpointed and acknowledged.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// How long to ask the management API who holds a batch before saying it is unknown.
const HOLDER_LOOKUP: Duration = Duration::from_secs(7);
/// How often the task queue's consumers are counted while waiting.
const CONSUMER_CHECK_EVERY: Duration = Duration::from_secs(5);
/// Default of [`CollectOptions::warn_no_worker_after`]: a pool scaling up from zero takes a few
/// seconds; a mistyped queue never gets a worker.
pub const NO_CONSUMER_WARN_AFTER: Duration = Duration::from_secs(30);
/// How long to wait for a batch's manifest before telling the user it is missing.
const NO_MANIFEST_HINT_AFTER: Duration = Duration::from_secs(10);
/// Unacknowledged results that trigger a checkpoint before the next tick.
const CHECKPOINT_AFTER: u16 = RESULT_PREFETCH / 2;

/// Where collected results go.
pub trait ResultSink {
    /// Writes one result. An error stops the collection (nothing more is acknowledged).
    fn write(&mut self, result: &ResultEnvelope) -> std::io::Result<()>;
    /// Makes everything written so far durable enough to acknowledge.
    fn flush(&mut self) -> std::io::Result<()>;
}

/// Progress as results come in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Tasks in the batch, once the manifest is known.
    pub total: Option<u32>,
    /// Results written, by any collector (this one and earlier ones).
    pub done: u64,
    /// Of `done`, results written by this collector, by status.
    pub by_status: BTreeMap<&'static str, u64>,
    /// Results collected by earlier collectors of this batch.
    pub earlier: u64,
    /// Results this collector skipped because they were already written.
    pub duplicates: u64,
    /// Of the results this collector wrote, those that needed more than one attempt.
    pub retried: u64,
    /// The first few tasks this collector wrote that did not succeed: (task id, error kind, why:
    /// the last line of the command's stderr, else the error message).
    pub failed_examples: Vec<(String, String, String)>,
    /// Consumers of the batch's task queue when last counted (None: not known).
    pub consumers: Option<u64>,
    /// Tasks waiting in the batch's task queue (of every batch it holds) when last counted.
    pub queued: Option<u64>,
}

/// Failed tasks named in a summary.
pub const FAILED_EXAMPLES: usize = 10;

impl Counts {
    /// Results that did not succeed, among those this collector wrote.
    pub fn failed(&self) -> u64 {
        self.by_status
            .iter()
            .filter(|(s, _)| **s != TaskStatus::Succeeded.as_str())
            .map(|(_, n)| n)
            .sum()
    }
}

/// Receives progress updates.
pub trait Progress {
    /// Called after each result and whenever the total becomes known.
    fn update(&mut self, counts: &Counts);
}

impl Progress for () {
    fn update(&mut self, _: &Counts) {}
}

/// How a collection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every result of the batch is written; its queues were deleted.
    Complete(Counts),
    /// Stopped before the end (deadline or interruption); progress is saved in the manifest.
    Incomplete(Counts),
}

/// Why collection failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// Another collector holds the batch's results queue.
    #[error(
        "batch {batch} is being collected by another process ({holder}); only one `warren wait` \
         may hold a batch at a time, so that no result is split between two outputs. Stop that \
         one, or let it finish"
    )]
    Busy {
        /// Batch id.
        batch: String,
        /// Who holds it, as far as the management API tells.
        holder: String,
        /// Whether the holder may be this process's own lost connection.
        retry: bool,
    },
    /// The batch's queues do not exist.
    #[error("batch '{0}' not found: it was never submitted, was already collected, or expired")]
    UnknownBatch(String),
    /// Writing a result failed.
    #[error("cannot write results: {0}")]
    Sink(#[from] std::io::Error),
    /// The broker could not be used, even after retrying.
    #[error("{0}")]
    Broker(#[from] BrokerError),
    /// Connection failures lasted longer than the retry budget; what was collected is saved.
    #[error(
        "{source}. Gave up after {retry_for:?} of failures (--retry-for); every result written \
         so far is recorded in the batch manifest. Resume with `warren wait {batch}` once the \
         broker is reachable and its nodes are back"
    )]
    GaveUp {
        /// Batch id.
        batch: String,
        /// The retry budget that ran out.
        retry_for: Duration,
        /// The last failure.
        source: Box<BrokerError>,
    },
}

/// Options of a collection.
#[derive(Debug, Clone)]
pub struct CollectOptions {
    /// Give up (with [`Outcome::Incomplete`]) after this long; None waits forever.
    pub timeout: Option<Duration>,
    /// How long to keep retrying a lost connection or a batch queue without quorum.
    pub retry_for: Duration,
    /// Seqs already in the sink from an earlier, interrupted collection (see
    /// [`crate::output::open_output`]): skipped as duplicates and recorded as collected.
    pub already_written: SeqSet,
    /// How long the task queue may have no consumer, with results outstanding, before a warning.
    pub warn_no_worker_after: Duration,
}

impl From<lapin::Error> for CollectError {
    fn from(e: lapin::Error) -> Self {
        CollectError::Broker(BrokerError::from(e))
    }
}

impl Default for CollectOptions {
    fn default() -> Self {
        Self {
            timeout: None,
            retry_for: warren_broker::connection::DEFAULT_COLLECT_RETRY_FOR,
            already_written: SeqSet::default(),
            warn_no_worker_after: NO_CONSUMER_WARN_AFTER,
        }
    }
}

/// State that survives reconnections.
struct State {
    batch: String,
    manifest: Option<BatchManifest>,
    written: SeqSet,
    counts: Counts,
    /// When collection started, to tell the user if the manifest is slow to appear.
    started: Instant,
    warned_no_manifest: bool,
    /// Set once a session is consuming results, so a later failure starts a fresh retry budget.
    consuming: bool,
    /// Whether this process has consumed the results queue before (see `CollectError::Busy`).
    consumed_before: bool,
    /// `(seq, replay)` of tasks replayed into this batch (`warren dlq replay`), from the manifest.
    replays: BTreeSet<(u32, u32)>,
    /// Those whose replayed result is written.
    replays_collected: BTreeSet<(u32, u32)>,
    warn_no_worker_after: Duration,
    /// When the task queue's consumers were last counted.
    consumers_checked: Option<Instant>,
    /// Since when the task queue has had no consumer.
    no_consumer_since: Option<Instant>,
    warned_no_consumer: bool,
}

impl Submitter {
    /// Collects the results of `batch` into `sink` until all are in, the timeout passes or
    /// `interrupt` completes. Lost connections are retried for `options.retry_for`.
    pub async fn collect(
        &mut self,
        batch: &str,
        sink: &mut dyn ResultSink,
        progress: &mut dyn Progress,
        options: &CollectOptions,
        interrupt: impl std::future::Future<Output = ()>,
    ) -> Result<Outcome, CollectError> {
        let mut state = State {
            batch: batch.to_string(),
            manifest: None,
            written: options.already_written.clone(),
            counts: Counts::default(),
            started: Instant::now(),
            warned_no_manifest: false,
            consuming: false,
            consumed_before: false,
            replays: BTreeSet::new(),
            replays_collected: BTreeSet::new(),
            warn_no_worker_after: options.warn_no_worker_after,
            consumers_checked: None,
            no_consumer_since: None,
            warned_no_consumer: false,
        };
        let deadline = options.timeout.map(|t| Instant::now() + t);
        let mut retry = RetryBudget::new(options.retry_for);
        let mut said = None;
        tokio::pin!(interrupt);
        loop {
            let attempt = async {
                let (connection, _) = self.connection().await?;
                collect_session(
                    connection,
                    &mut state,
                    sink,
                    progress,
                    deadline,
                    &mut interrupt,
                )
                .await
            };
            let outcome = attempt.await;
            // A session that got as far as consuming was progress: the budget counts afresh.
            if std::mem::take(&mut state.consuming) {
                retry.progressed();
                said = None;
            }
            match outcome {
                Ok(outcome) => return Ok(outcome),
                Err(CollectError::Busy { retry: true, .. }) if retry.failed().is_some() => {
                    warn!(
                        "the results queue is still held, probably by this process's lost connection; retrying"
                    );
                    self.reset();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(CollectError::Broker(e)) if !e.is_fatal() => match retry.failed() {
                    Some(delay) => {
                        // The whole story once per kind of failure, then a line per retry.
                        let kind = std::mem::discriminant(&e);
                        if said.replace(kind) == Some(kind) {
                            info!("still interrupted; reconnecting in {delay:.1?}");
                        } else {
                            warn!("collecting interrupted ({e}); reconnecting in {delay:.1?}");
                        }
                        self.reset();
                        tokio::time::sleep(delay).await;
                    }
                    None => {
                        return Err(CollectError::GaveUp {
                            batch: state.batch.clone(),
                            retry_for: retry.budget(),
                            source: Box::new(e),
                        });
                    }
                },
                Err(CollectError::Busy {
                    batch,
                    retry: false,
                    ..
                }) => {
                    let holder = self.results_holder(&batch).await;
                    return Err(CollectError::Busy {
                        batch,
                        holder,
                        retry: false,
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Best effort: the connection that consumes `batch`'s results, from the management API.
    async fn results_holder(&self, batch: &str) -> String {
        let api = match Management::new(&ManagementTarget::default(), self.settings()) {
            Ok(api) => api,
            Err(e) => return format!("unknown: {e}"),
        };
        // The management API learns a new consumer's connection with its next statistics
        // (every 5 s by default): ask again for a little while.
        let deadline = Instant::now() + HOLDER_LOOKUP;
        loop {
            // The collector lock names its owner at once; consumers show with the next stats.
            if let Some(owner) = api.queue_owner(&collector_lock(batch)).await {
                return format!("held by {owner}");
            }
            match api.consumer_connections(&result_queue(batch)).await {
                Ok(holders) if !holders.is_empty() => {
                    return format!("held by {}", holders.join(", "));
                }
                // A new queue or consumer shows with the next statistics: not yet is not never.
                Ok(_) | Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok(_) => return "it has just let go; try again".into(),
                Err(e) => return format!("holder unknown: {e}"),
            }
        }
    }
}

async fn collect_session(
    connection: &Connection,
    state: &mut State,
    sink: &mut dyn ResultSink,
    progress: &mut dyn Progress,
    deadline: Option<Instant>,
    interrupt: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Result<Outcome, CollectError> {
    let results_queue = result_queue(&state.batch);
    // Two collectors started together both see no consumer; the lock makes the second one say
    // who holds the batch instead of waiting, unseen, as the queue's standby consumer.
    if !take_collector_lock(connection, &state.batch).await? {
        return Err(CollectError::Busy {
            batch: state.batch.clone(),
            holder: String::new(),
            retry: state.consumed_before,
        });
    }
    let manifests = Publisher::open(connection).await?;
    let results = consumer_channel(connection, RESULT_PREFETCH).await?;
    match topology::inspect(&results, &results_queue).await {
        Err(BrokerError::QueueNotFound { .. }) => {
            return Err(CollectError::UnknownBatch(state.batch.clone()));
        }
        // Another collector holds the batch (the queue keeps a second one as a silent standby).
        Ok(queue) if queue.consumer_count() > 0 => {
            return Err(CollectError::Busy {
                batch: state.batch.clone(),
                holder: String::new(),
                retry: state.consumed_before,
            });
        }
        other => {
            other?;
        }
    }
    // Deliveries of a lost connection come back; what this process wrote is skipped by `written`.
    checkpoint(&manifests, state, None).await?;
    // One collector per batch: two would split the results between two outputs.
    let consumed = consume_alone(&results, &results_queue).await;
    let mut consumer = match consumed {
        Ok(consumer) => consumer,
        Err(e) if is_access_refused(&e) => {
            return Err(CollectError::Busy {
                batch: state.batch.clone(),
                holder: String::new(),
                // Our own connection of before a network failure can linger at the broker
                // until its heartbeat times out: then the holder may be this process.
                retry: state.consumed_before,
            });
        }
        Err(e) => return Err(BrokerError::from_queue_error(&results_queue, e).into()),
    };
    state.consumed_before = true;
    state.consuming = true;
    progress.update(&state.counts);
    let mut unacked: Option<u64> = None;
    let mut pending = 0u16;
    let mut ticker = tokio::time::interval(CHECKPOINT_EVERY);
    let sleep_until_deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep_until_deadline);
    loop {
        if let Some(m) = &state.manifest
            && state.written.covers(m.total)
            && state.replays.is_subset(&state.replays_collected)
        {
            sink.flush()?;
            if let Some(tag) = unacked {
                results
                    .basic_ack(tag, BasicAckOptions { multiple: true })
                    .await?;
            }
            finish(&results, &state.batch).await;
            return Ok(Outcome::Complete(state.counts.clone()));
        }
        tokio::select! {
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let tag = delivery.delivery_tag;
                    if take_result(&results, &manifests, delivery, state, sink).await? {
                        progress.update(&state.counts);
                    }
                    unacked = Some(tag);
                    pending += 1;
                    // A full prefetch window would stall deliveries until the next tick.
                    if pending >= CHECKPOINT_AFTER && state.manifest.is_some() {
                        sink.flush()?;
                        checkpoint(&manifests, state, unacked.take().map(|tag| (&results, tag))).await?;
                        pending = 0;
                    }
                }
                Some(Err(e)) => return Err(BrokerError::from(e).into()),
                None => return Err(BrokerError::ConsumerCancelled { queue: results_queue.clone() }.into()),
            },
            _ = ticker.tick() => {
                if watch_consumers(connection, state).await {
                    progress.update(&state.counts);
                }
                let known = state.manifest.is_some();
                if !known && !state.warned_no_manifest && state.started.elapsed() > NO_MANIFEST_HINT_AFTER {
                    state.warned_no_manifest = true;
                    warn!(batch = %state.batch, "no manifest for this batch yet, so its size is unknown: the submitter may \
                        still be publishing, or it died before finishing, or it does not publish one (docs/protocol.md, \
                        Batches); results are written as they come, and --timeout bounds the wait");
                }
                if unacked.is_some() || !known {
                    sink.flush()?;
                    // Until the manifest is known nothing can be recorded, so nothing is acked.
                    let ack = if known { pending = 0; unacked.take() } else { None };
                    checkpoint(&manifests, state, ack.map(|tag| (&results, tag))).await?;
                    if !known && state.manifest.is_some() {
                        progress.update(&state.counts);
                    }
                }
            }
            () = &mut sleep_until_deadline => break,
            () = interrupt.as_mut() => break,
        }
    }
    sink.flush()?;
    if state.manifest.is_some() {
        checkpoint(&manifests, state, unacked.take().map(|tag| (&results, tag))).await?;
    }
    // Another process may take over the batch now.
    if let Ok(name) = short(&collector_lock(&state.batch)) {
        let _ = tokio::time::timeout(
            FINISH_DELETE_WAIT,
            results.queue_delete(name, QueueDeleteOptions::default()),
        )
        .await;
    }
    Ok(Outcome::Incomplete(state.counts.clone()))
}

/// Counts the consumers of the batch's task queue every few seconds, and warns once when it has
/// had none for [`CollectOptions::warn_no_worker_after`]. Returns whether the count was refreshed.
async fn watch_consumers(connection: &Connection, state: &mut State) -> bool {
    let Some(queue) = state.manifest.as_ref().map(|m| m.queue.clone()) else {
        return false;
    };
    if state
        .consumers_checked
        .is_some_and(|at| at.elapsed() < CONSUMER_CHECK_EVERY.min(state.warn_no_worker_after))
    {
        return false;
    }
    state.consumers_checked = Some(Instant::now());
    // A channel of its own: a failed passive declare (queue deleted) closes it.
    let consumers = match connection.create_channel().await {
        Ok(channel) => {
            let found = topology::inspect(&channel, &queue).await;
            if found.is_ok() {
                let _ = channel.close(200, "counted".into()).await;
            }
            found
                .ok()
                .map(|q| (u64::from(q.consumer_count()), u64::from(q.message_count())))
        }
        Err(_) => None,
    };
    state.counts.queued = consumers.map(|(_, queued)| queued);
    let consumers = consumers.map(|(consumers, _)| consumers);
    state.counts.consumers = consumers;
    match consumers {
        Some(0) => {
            let since = *state.no_consumer_since.get_or_insert_with(Instant::now);
            if !state.warned_no_consumer && since.elapsed() >= state.warn_no_worker_after {
                state.warned_no_consumer = true;
                warn!(
                    batch = %state.batch,
                    "no worker is consuming '{queue}' (for {}s): its tasks wait until one does. Start one \
                     (warren worker --queue {queue}) or an autoscaler for it; or was the queue name mistyped?",
                    since.elapsed().as_secs()
                );
            }
        }
        Some(_) => {
            state.no_consumer_since = None;
            if std::mem::take(&mut state.warned_no_consumer) {
                info!(batch = %state.batch, "a worker is consuming '{queue}' now");
            }
        }
        None => {}
    }
    true
}

/// Writes a result unless it was written before; returns whether it was written. A message that
/// is not a result is rejected, which dead-letters it to the task queue's dead-letter queue.
async fn take_result(
    channel: &Channel,
    manifests: &Publisher,
    delivery: Delivery,
    state: &mut State,
    sink: &mut dyn ResultSink,
) -> Result<bool, CollectError> {
    let result = match protocol::decode_result(&delivery.data, MAX_RESULT_BYTES) {
        Ok(r) => r,
        Err(e) => {
            warn!(batch = %state.batch, "dead-lettering an unreadable message in the result queue: {e}");
            let detail = e.to_string();
            set_aside(
                channel,
                manifests,
                &delivery,
                state,
                DEAD_REASON_UNREADABLE_RESULT,
                &detail,
            )
            .await?;
            return Ok(false);
        }
    };
    if let Some(why) = foreign(&result, verified_user(&delivery.properties), state) {
        warn!(batch = %state.batch, task_id = %result.task_id, "dead-lettering a result that is not this batch's: {why}");
        set_aside(
            channel,
            manifests,
            &delivery,
            state,
            DEAD_REASON_FOREIGN_RESULT,
            &why,
        )
        .await?;
        return Ok(false);
    }
    // The batch secret stays out of the output.
    let mut result = result;
    result.token = None;
    let fresh = match (result.seq, result.replayed) {
        (Some(seq), Some(replay)) => {
            if !state.replays.contains(&(seq, replay)) && state.written.contains(seq) {
                // The replay may be newer than the manifest read last: read it again first (the
                // output is flushed, as a checkpoint records what was written).
                sink.flush()?;
                checkpoint(manifests, state, None).await?;
            }
            let wanted = state.replays.contains(&(seq, replay))
                && state.replays_collected.insert((seq, replay));
            state.written.insert(seq) || wanted
        }
        (Some(seq), None) => state.written.insert(seq),
        (None, _) => true,
    };
    if !fresh {
        state.counts.duplicates += 1;
        return Ok(false);
    }
    sink.write(&result)?;
    if result.seq.is_none() {
        // Only a task that was refused for lacking its seq is answered without one: it cannot
        // fill any of the batch's slots, so the batch cannot complete.
        warn!(
            batch = %state.batch, task_id = %result.task_id,
            "a result without a seq was written but cannot be counted: every task of a batch collected by \
             'warren wait' must carry its seq (docs/protocol.md); this batch will not complete, stop with Ctrl-C or --timeout"
        );
    }
    if result.attempt > 1 {
        state.counts.retried += 1;
    }
    if result.status != TaskStatus::Succeeded
        && state.counts.failed_examples.len() < FAILED_EXAMPLES
    {
        let kind = result
            .error
            .as_ref()
            .map_or(result.status.as_str().to_string(), |e| e.kind.clone());
        state
            .counts
            .failed_examples
            .push((result.task_id.clone(), kind, why_failed(&result)));
    }
    state.counts.done = state.written.len();
    *state
        .counts
        .by_status
        .entry(result.status.as_str())
        .or_default() += 1;
    Ok(true)
}

/// Moves a message the collector will not take to the task queue's dead-letter queue, with why
/// (see [`crate::checkpoint::set_aside`]; before the manifest names the task queue, it is
/// rejected to the results queue's own dead-letter route).
async fn set_aside(
    channel: &Channel,
    manifests: &Publisher,
    delivery: &Delivery,
    state: &State,
    reason: &str,
    detail: &str,
) -> Result<(), CollectError> {
    let dead = state.manifest.as_ref().map(|m| dead_letter_queue(&m.queue));
    checkpoint::set_aside(
        channel,
        manifests,
        delivery,
        &result_queue(&state.batch),
        dead.as_deref(),
        "collector",
        (reason, detail),
    )
    .await?;
    Ok(())
}

/// Why `result` cannot be a worker's answer to a task of this batch, if it cannot. Before the
/// manifest is known only the batch id can be checked (see docs/protocol.md, "What a collector
/// trusts").
fn foreign(result: &ResultEnvelope, sender: Option<&str>, state: &State) -> Option<String> {
    if result.batch != state.batch {
        return Some(format!("it names batch '{}'", result.batch));
    }
    let manifest = state.manifest.as_ref()?;
    if let Some(answerers) = &manifest.answerers
        && !sender.is_some_and(|s| answerers.iter().any(|a| a == s))
    {
        return Some(format!(
            "it was published by {}, who may not answer this batch (its workers' users: {})",
            sender.map_or("an unverified publisher".to_string(), |s| format!(
                "user '{s}'"
            )),
            answerers.join(", ")
        ));
    }
    if let Some(seq) = result.seq
        && seq >= manifest.total
    {
        return Some(format!(
            "its seq {seq} is beyond the batch's {} task(s)",
            manifest.total
        ));
    }
    match &manifest.token {
        Some(token) if result.token.as_ref() != Some(token) => {
            Some("it does not carry the batch's token (published by someone other than a worker running one of its tasks)".into())
        }
        _ => None,
    }
}

/// Why a task failed, in one line: the last line of its command's stderr when it wrote one (a
/// failed GDAL step says why there), else the error message; at most 200 characters.
fn why_failed(result: &ResultEnvelope) -> String {
    let stderr_line = result.output["stderr"]
        .as_str()
        .and_then(|e| e.lines().rev().find(|l| !l.trim().is_empty()))
        .map(str::trim);
    let message = result.error.as_ref().map(|e| e.message.as_str());
    let why = stderr_line.or(message).unwrap_or_default();
    match why.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &why[..cut]),
        None => why.to_string(),
    }
}

/// Records progress: takes every manifest in the batch's manifest queue, publishes the next
/// generation (merged with what this process wrote), then acknowledges the old manifests and,
/// when given, the results up to `ack` (which the caller flushed to the sink first).
async fn checkpoint(
    manifests: &Publisher,
    state: &mut State,
    ack: Option<(&Channel, u64)>,
) -> Result<(), CollectError> {
    let queue = manifest_queue(&state.batch);
    let channel = manifests.channel();
    let first_sight = state.manifest.is_none();
    let mut recorded = SeqSet::default();
    let batch = state.batch.clone();
    let own = manifests.user().to_string();
    let taken = take_states(channel, &queue, &own, |message| {
        // Only this collector's own user may say what the batch is and what was collected (as
        // RabbitMQ verified): a forged manifest could mark results collected, or drop the token.
        if let Some(sender) = message.stranger {
            warn!(
                batch = %batch,
                "setting aside a manifest written by {}, not by this collector's user '{own}': collect a batch as the user that submitted it",
                sender.map_or("an unverified publisher".to_string(), |s| format!("user '{s}'")),
            );
            return;
        }
        match protocol::decode_manifest(message.data, MAX_RESULT_BYTES) {
            Ok(m) if m.batch == batch => {
                recorded.extend(&SeqSet::from_ranges(&m.collected));
                state
                    .replays
                    .extend(m.replays.iter().map(|[s, r]| (*s, *r)));
                state
                    .replays_collected
                    .extend(m.replays_collected.iter().map(|[s, r]| (*s, *r)));
                if state
                    .manifest
                    .as_ref()
                    .is_none_or(|cur| m.generation >= cur.generation)
                {
                    state.counts.total = Some(m.total);
                    state.manifest = Some(m);
                }
            }
            Ok(_) | Err(_) => {
                warn!(batch = %batch, "ignoring an unreadable message in the manifest queue")
            }
        }
    })
    .await?;
    state.written.extend(&recorded);
    if first_sight {
        state.counts.earlier = state.written.len();
    }
    state.counts.done = state.written.len();
    let Some(current) = &state.manifest else {
        // The submitter has not published the manifest yet.
        return Ok(());
    };
    if ack.is_none() && taken.is_empty() {
        return Ok(());
    }
    let next = BatchManifest {
        v: PROTOCOL_VERSION,
        generation: current.generation + 1,
        collected: state.written.to_ranges(),
        replays: state.replays.iter().map(|(s, r)| [*s, *r]).collect(),
        replays_collected: state
            .replays_collected
            .iter()
            .map(|(s, r)| [*s, *r])
            .collect(),
        ..current.clone()
    };
    manifests
        .publish(
            &queue,
            &protocol::encode(&next),
            message_properties(MESSAGE_TYPE_MANIFEST),
        )
        .await?;
    state.manifest = Some(next);
    ack_checkpointed(channel, &taken, ack).await?;
    Ok(())
}

/// The collector lock of `batch`: an exclusive queue, owned by the collecting connection and gone
/// with it.
fn collector_lock(batch: &str) -> String {
    format!("{}.lock", manifest_queue(batch))
}

/// Takes the collector lock of `batch` for `connection`; false when another connection has it.
async fn take_collector_lock(connection: &Connection, batch: &str) -> Result<bool, BrokerError> {
    let channel = connection.create_channel().await?;
    let lock = collector_lock(batch);
    let declared = channel
        .queue_declare(
            short(&lock)?,
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(_) => {
            let _ = channel.close(200, "locked".into()).await;
            Ok(true)
        }
        Err(e) if is_resource_locked(&e) => Ok(false),
        Err(e) => Err(BrokerError::from_queue_error(&lock, e)),
    }
}

/// Whether the broker answered RESOURCE_LOCKED (an exclusive queue of another connection).
fn is_resource_locked(error: &lapin::Error) -> bool {
    matches!(
        warren_broker::error::amqp_kind(error),
        Some(lapin::protocol::AMQPErrorKind::Soft(
            lapin::protocol::AMQPSoftError::RESOURCELOCKED
        ))
    )
}

/// Deletes the batch's queues once every result is written; failures only leave them to expire.
/// The deletes do not hold the exit: with a queue member's node down each takes about 5 s, so
/// they get [`FINISH_DELETE_WAIT`] together and are otherwise left to their expiry.
async fn finish(channel: &Channel, batch: &str) {
    let delete = |queue: String| async move {
        let Ok(name) = short(&queue) else { return };
        if let Err(e) = channel
            .queue_delete(name, QueueDeleteOptions::default())
            .await
        {
            info!("could not delete {queue} ({e}); it expires on its own");
        }
    };
    let both = futures_lite::future::zip(
        futures_lite::future::zip(delete(result_queue(batch)), delete(manifest_queue(batch))),
        delete(collector_lock(batch)),
    );
    if tokio::time::timeout(FINISH_DELETE_WAIT, both)
        .await
        .is_err()
    {
        info!(
            "the queues of batch {batch} were not deleted within {FINISH_DELETE_WAIT:?} (a node \
             down?); they expire on their own"
        );
    }
}

/// How long the end of a collection waits for its batch's queues to be deleted.
const FINISH_DELETE_WAIT: Duration = Duration::from_secs(1);
