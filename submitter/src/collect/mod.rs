//! Collecting a batch's results, safely across processes.
//!
//! Results are written to the sink as they arrive, but acknowledged only at checkpoints: the sink
//! is flushed, a new manifest generation recording every `seq` written so far is published and
//! confirmed, and only then are the older manifests and the written results acknowledged. Killed
//! at any point, the next collector finds the newest manifest, skips what it lists, and
//! collects the rest; at worst a result is written twice, never lost.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tracing::{info, warn};
use warren_broker::BrokerError;
use warren_broker::connection::RetryBudget;
use warren_broker::depth::{Management, ManagementTarget};
use warren_broker::protocol::{BatchManifest, ResultEnvelope, TaskStatus};
use warren_broker::topology::result_queue;

use crate::seqset::SeqSet;
use crate::submit::Submitter;

mod lock;
mod session;

use lock::collector_lock;
use session::collect_session;

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
    // Long: the retry loop around sessions: each outcome (done, busy, lost connection, budget
    // spent) has its own message and exit.
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
