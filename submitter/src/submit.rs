//! Submitting a batch: every task is published persistent, `mandatory`, and counted as sent only
//! when RabbitMQ confirms it. A lost connection is retried briefly, republishing what was not yet
//! confirmed; then the batch manifest is published so any process can collect the results.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use lapin::{BasicProperties, Connection};
use tracing::{info, warn};
use warren_broker::connection::{RetryBudget, connect};
use warren_broker::protocol::{
    self, BatchManifest, MESSAGE_TYPE_MANIFEST, PROTOCOL_VERSION, TaskEnvelope,
};
use warren_broker::publisher::{Publisher, message_properties};
use warren_broker::topology::{self, manifest_queue, result_queue};
use warren_broker::{AmqpSettings, BrokerError};

use crate::journal::{Fingerprint, Journal};
use crate::seqset::SeqSet;
use crate::spec::{DuplicateIds, SpecSource, TaskSpec};

mod error;
pub use error::SubmitError;

/// Publishes in flight at once before waiting for confirms.
const CONFIRM_WINDOW: usize = 1024;

/// How a batch is submitted.
#[derive(Debug, Clone)]
pub struct SubmitOptions {
    /// Task queue.
    pub queue: String,
    /// Idle time after which RabbitMQ deletes an uncollected batch's queues.
    pub result_expiry: Duration,
    /// How long to keep retrying a lost connection before giving up.
    pub retry_for: Duration,
    /// Largest encoded task accepted (workers dead-letter larger ones).
    pub max_message_bytes: usize,
    /// Set to stop publishing (e.g. on Ctrl-C): what is in flight is confirmed, the rest is not
    /// sent, and the submission ends with [`SubmitError::Stopped`], which [`Submitter::resume`]
    /// finishes.
    pub stop: Option<Arc<AtomicBool>>,
    /// Create the task queue when it does not exist (true by default). `warren submit` sets it
    /// only with `--create-queue`, so a mistyped queue name is an error rather than a queue no
    /// worker will ever serve.
    pub create_queue: bool,
    /// The RabbitMQ users whose results the batch's collector takes (recorded in the manifest);
    /// empty: anyone with the batch's token.
    pub worker_users: Vec<String>,
}

impl SubmitOptions {
    /// Defaults for submitting to `queue`.
    pub fn new(queue: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            result_expiry: topology::DEFAULT_RESULT_EXPIRY,
            retry_for: warren_broker::connection::DEFAULT_RETRY_FOR,
            max_message_bytes: protocol::DEFAULT_MAX_MESSAGE_BYTES,
            stop: None,
            create_queue: true,
            worker_users: Vec::new(),
        }
    }
}

/// What a submitted batch is known by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchReceipt {
    /// Batch id, for `warren wait`.
    pub batch: String,
    /// Number of tasks.
    pub total: u32,
}

/// A connection to the broker for submitting and collecting.
pub struct Submitter {
    settings: AmqpSettings,
    name: String,
    connection: Option<(Connection, Publisher)>,
    /// Whether the logs stream was (tried to be) declared: once per submitter is enough.
    logs_declared: bool,
}

impl Submitter {
    /// A submitter that connects lazily with `settings`, naming its connection `name`.
    pub fn new(settings: AmqpSettings, name: impl Into<String>) -> Self {
        Self {
            settings,
            name: name.into(),
            connection: None,
            logs_declared: false,
        }
    }

    /// The open connection and its confirm-mode publisher, opening them if needed.
    pub async fn connection(&mut self) -> Result<&(Connection, Publisher), BrokerError> {
        let usable = self
            .connection
            .as_ref()
            .is_some_and(|(c, p)| c.status().connected() && p.channel().status().connected());
        if !usable {
            let connection = connect(&self.settings, &self.name).await?;
            let publisher = Publisher::open(&connection).await?;
            // Workers write their attempt records there; one without configure permission on
            // it relies on its submitters to have declared it.
            if !self.logs_declared {
                self.logs_declared = true;
                topology::try_declare_logs(&connection).await;
            }
            self.connection = Some((connection, publisher));
        }
        self.connection
            .as_ref()
            .ok_or_else(|| BrokerError::Bug("the connection vanished after it was made".into()))
    }

    /// The connection settings.
    pub fn settings(&self) -> &AmqpSettings {
        &self.settings
    }

    /// Closes the connection, if one is open, waiting for the broker's answer (at most
    /// [`warren_broker::connection::CLOSE_WAIT`]). Within that answer RabbitMQ has deleted what the
    /// connection held exclusively, such as a collector's lock, so the next `warren wait` of the
    /// batch finds it free; a process that merely exits leaves that to the broker's noticing.
    pub async fn close(&mut self) {
        if let Some((connection, _)) = self.connection.take() {
            warren_broker::connection::close_connection(&connection, "done").await;
        }
    }

    /// Forgets the current connection (after an error), so the next use reconnects.
    pub fn reset(&mut self) {
        self.connection = None;
    }

    /// Submits the tasks of `source` as one batch and returns its id once every task and the
    /// manifest are confirmed by the broker. Every task is checked before any is sent.
    pub async fn submit<S: SpecSource + ?Sized>(
        &mut self,
        source: &S,
        options: &SubmitOptions,
    ) -> Result<BatchReceipt, SubmitError> {
        let journal = prepare(source, options)?;
        self.publish_batch(source, options, journal).await
    }

    /// Checks that `queue` exists (declared by a worker or an autoscaler), before anything is
    /// said or sent: a mistyped name is refused at once.
    pub async fn require_queue(&mut self, queue: &str) -> Result<(), BrokerError> {
        let (connection, _) = self.connection().await?;
        topology::require_task_queue(connection, queue).await
    }

    /// Submits `source` as the new batch `journal` describes (from [`prepare`]), so the caller
    /// knows the batch id before anything is sent.
    pub async fn submit_as<S: SpecSource + ?Sized>(
        &mut self,
        source: &S,
        options: &SubmitOptions,
        journal: Journal,
    ) -> Result<BatchReceipt, SubmitError> {
        self.publish_batch(source, options, journal).await
    }

    /// Finishes an interrupted submission: publishes, with the same batch, token and `seq`s, only
    /// the tasks of `source` (the same task file) that `journal` does not list as confirmed, then
    /// the manifest.
    pub async fn resume<S: SpecSource + ?Sized>(
        &mut self,
        source: &S,
        options: &SubmitOptions,
        journal: Journal,
    ) -> Result<BatchReceipt, SubmitError> {
        let (total, fingerprint) = check_pass(source, &journal.batch, &journal.token, options)?;
        if total != journal.total {
            return Err(SubmitError::Task {
                index: total as usize,
                id: String::new(),
                message: format!(
                    "this task file has {total} task(s) but batch {} has {}: give the file the batch was submitted from",
                    journal.batch, journal.total
                ),
            });
        }
        if fingerprint != journal.fingerprint {
            return Err(SubmitError::Task {
                index: 0,
                id: String::new(),
                message: format!(
                    "these are not the tasks batch {} was submitted with (same count, other content): \
                     give the unchanged file; changed tasks go in a new batch",
                    journal.batch
                ),
            });
        }
        let options = SubmitOptions {
            queue: journal.queue.clone(),
            ..options.clone()
        };
        self.publish_batch(source, &options, journal).await
    }

    // Long: the retry loop around publish passes shares the confirmed set and the journal record
    // with every exit; split, each part would take them all.
    async fn publish_batch<S: SpecSource + ?Sized>(
        &mut self,
        source: &S,
        options: &SubmitOptions,
        journal: Journal,
    ) -> Result<BatchReceipt, SubmitError> {
        let (batch, token, total) = (journal.batch.clone(), journal.token.clone(), journal.total);
        let already = SeqSet::from_ranges(&journal.confirmed);
        let mut confirmed: Vec<bool> = (0..total).map(|seq| already.contains(seq)).collect();
        // The record of what was confirmed, for a resume.
        let record = |confirmed: &[bool]| {
            let mut seqs = SeqSet::default();
            for seq in (0..total).filter(|s| confirmed[*s as usize]) {
                seqs.insert(seq);
            }
            Box::new(Journal {
                confirmed: seqs.to_ranges(),
                ..journal.clone()
            })
        };
        let interrupted =
            |confirmed: &[bool], retry: &RetryBudget, e: BrokerError| SubmitError::Interrupted {
                journal: record(confirmed),
                retry_for: retry.budget(),
                source: Box::new(e),
            };
        let submitted_at = protocol::timestamp(SystemTime::now());
        let batch_ids = BatchIds {
            batch: &batch,
            token: &token,
            submitted_at: &submitted_at,
            fingerprint: &journal.fingerprint,
        };
        let mut retry = RetryBudget::new(options.retry_for);
        let mut said = None;
        let mut confirmed_before = confirmed.iter().filter(|c| **c).count();
        loop {
            match self
                .publish_pass(source, &batch_ids, &mut confirmed, options)
                .await
            {
                Ok(true) => break,
                Ok(false) => {
                    return Err(SubmitError::Stopped {
                        journal: record(&confirmed),
                    });
                }
                Err(e) => {
                    let done = confirmed.iter().filter(|c| **c).count();
                    if done > confirmed_before {
                        retry.progressed();
                        confirmed_before = done;
                    }
                    let delay = match retry.failed() {
                        Some(delay) if !e.is_fatal() => delay,
                        _ if done == 0 => return Err(e.into()),
                        _ => return Err(interrupted(&confirmed, &retry, e)),
                    };
                    // The whole story once per kind of failure, then a short line per retry.
                    let kind = std::mem::discriminant(&e);
                    if said.replace(kind) == Some(kind) {
                        info!(
                            "still interrupted; retrying in {delay:.1?}, {} task(s) not yet confirmed",
                            confirmed.len() - done
                        );
                    } else {
                        warn!(
                            "publishing interrupted ({e}); retrying in {delay:.1?}, {} task(s) not yet confirmed",
                            confirmed.len() - done
                        );
                    }
                    self.reset();
                    tokio::time::sleep(delay).await;
                }
            }
        }
        retry.progressed();
        let manifest = BatchManifest {
            v: PROTOCOL_VERSION,
            batch: batch.clone(),
            total,
            queue: options.queue.clone(),
            generation: 0,
            collected: Vec::new(),
            replays: Vec::new(),
            replays_collected: Vec::new(),
            token: Some(token),
            answerers: (!options.worker_users.is_empty()).then(|| options.worker_users.clone()),
        };
        loop {
            let result = async {
                let (_, publisher) = self.connection().await?;
                publisher
                    .publish(
                        &manifest_queue(&batch),
                        &protocol::encode(&manifest),
                        message_properties(MESSAGE_TYPE_MANIFEST),
                    )
                    .await
            }
            .await;
            match result {
                Ok(()) => return Ok(BatchReceipt { batch, total }),
                Err(e) => match retry.failed() {
                    Some(delay) if !e.is_fatal() => {
                        warn!(
                            "publishing the batch manifest failed ({e}); retrying in {delay:.1?}"
                        );
                        self.reset();
                        tokio::time::sleep(delay).await;
                    }
                    _ => return Err(interrupted(&confirmed, &retry, e)),
                },
            }
        }
    }

    /// Makes sure the task queue exists (declaring it with `create_queue`) and declares the
    /// batch's queues; returns the publisher to send its tasks with.
    async fn declare_batch(
        &mut self,
        batch: &str,
        options: &SubmitOptions,
    ) -> Result<Publisher, BrokerError> {
        let (connection, publisher) = self.connection().await?;
        let publisher = publisher.clone();
        // Declaring a queue that dead-letters needs read permission on it: a submitter that only
        // checks the queue exists may be kept from reading the tasks (and so others' tokens).
        if options.create_queue {
            topology::declare_task_queue(publisher.channel(), &options.queue).await?;
        } else {
            topology::require_task_queue(connection, &options.queue).await?;
        }
        topology::declare_batch_queues(
            publisher.channel(),
            batch,
            &options.queue,
            options.result_expiry,
        )
        .await?;
        Ok(publisher)
    }

    /// Declares the topology and publishes every unconfirmed task, reading `source` again and
    /// keeping only a window of confirms in flight.
    async fn publish_pass<S: SpecSource + ?Sized>(
        &mut self,
        source: &S,
        ids: &BatchIds<'_>,
        confirmed: &mut [bool],
        options: &SubmitOptions,
    ) -> Result<bool, BrokerError> {
        // The source was checked before; reading it again must give the same tasks (a file
        // changed meanwhile ends the submission, which can be resumed with the original).
        let changed = |e: String| {
            BrokerError::InvalidInput(format!(
                "the task file changed while it was being submitted: {e}"
            ))
        };
        let publisher = self.declare_batch(ids.batch, options).await?;
        let mut in_flight = VecDeque::with_capacity(CONFIRM_WINDOW);
        let mut stopped = false;
        // What this pass reads must be exactly what was checked (a pipe read twice gives nothing
        // the second time): the same count and fingerprint, or the batch is not called submitted.
        let mut fingerprint = Fingerprint::default();
        let mut read: usize = 0;
        let tasks = source.read().map_err(|e| changed(e.to_string()))?;
        for (seq, item) in (0u32..).zip(tasks) {
            let index = seq as usize;
            let (_, spec) = item.map_err(|e| changed(e.to_string()))?;
            if index >= confirmed.len() {
                return Err(changed("it has more tasks than when it was checked".into()));
            }
            fingerprint.add(&spec);
            read = index + 1;
            if confirmed[index] {
                continue;
            }
            if options
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed))
            {
                stopped = true;
                break;
            }
            if in_flight.len() >= CONFIRM_WINDOW {
                let (done, pending): (usize, warren_broker::publisher::PendingConfirm) = in_flight
                    .pop_front()
                    .ok_or_else(|| BrokerError::Bug("an empty publish window".into()))?;
                pending.confirmed().await?;
                confirmed[done] = true;
            }
            let (body, properties) =
                encode_task(&spec, ids.batch, ids.token, seq, ids.submitted_at, options)
                    .map_err(|e| changed(e.to_string()))?;
            in_flight.push_back((
                index,
                publisher.send(&options.queue, &body, properties).await?,
            ));
        }
        for (done, pending) in in_flight {
            pending.confirmed().await?;
            confirmed[done] = true;
        }
        if stopped {
            return Ok(false);
        }
        if read != confirmed.len() {
            return Err(changed(format!(
                "{} task(s) were checked but only {read} could be read again to publish",
                confirmed.len()
            )));
        }
        if fingerprint.finish() != ids.fingerprint {
            return Err(changed(format!(
                "its {read} task(s) are not the ones that were checked (same count, other content)"
            )));
        }
        Ok(true)
    }
}

/// What every task of a batch carries.
struct BatchIds<'a> {
    batch: &'a str,
    token: &'a str,
    submitted_at: &'a str,
    /// What the checked tasks hash to; the publishing pass must read the same.
    fingerprint: &'a str,
}

/// Checks every task of `source` before anything is sent (fields, ids used twice, the encoded
/// size) and returns the number of tasks and their fingerprint. Memory stays flat: one task at a
/// time, plus a hash per task id given.
pub(crate) fn check_pass<S: SpecSource + ?Sized>(
    source: &S,
    batch: &str,
    token: &str,
    options: &SubmitOptions,
) -> Result<(u32, String), SubmitError> {
    let submitted_at = protocol::timestamp(SystemTime::now());
    let mut ids = DuplicateIds::default();
    let mut fingerprint = Fingerprint::default();
    let mut total: u32 = 0;
    let mut last_line = 0;
    for item in source.read()? {
        let (line, spec) = item?;
        last_line = line;
        if let Some(id) = &spec.id
            && !ids.insert(id)
        {
            return Err(SubmitError::Task {
                index: total as usize,
                id: id.clone(),
                message: format!("line {line}: task id '{id}' is used twice in this batch"),
            });
        }
        encode_task(&spec, batch, token, total, &submitted_at, options).map_err(|e| match e {
            SubmitError::Task { index, id, message } => SubmitError::Task {
                index,
                id,
                message: format!("line {line}: {message}"),
            },
            other => other,
        })?;
        fingerprint.add(&spec);
        total = total.checked_add(1).ok_or_else(|| SubmitError::Task {
            index: total as usize,
            id: String::new(),
            message: format!(
                "line {line}: too many tasks for one batch (at most {})",
                u32::MAX
            ),
        })?;
    }
    if total == 0 {
        return Err(SubmitError::Task {
            index: 0,
            id: String::new(),
            message: format!(
                "no tasks found (expected one JSON object per line; {last_line} line(s) read)"
            ),
        });
    }
    Ok((total, fingerprint.finish()))
}

/// Checks the tasks of `source` and describes the new batch they make, with a fresh id and
/// token: [`Submitter::submit_as`] then publishes it.
pub fn prepare<S: SpecSource + ?Sized>(
    source: &S,
    options: &SubmitOptions,
) -> Result<Journal, SubmitError> {
    let mut journal = Journal::new_batch(&options.queue, 0, String::new());
    let (total, fingerprint) = check_pass(source, &journal.batch, &journal.token, options)?;
    journal.total = total;
    journal.fingerprint = fingerprint;
    Ok(journal)
}

/// Encodes task `seq` of `batch` with its AMQP properties: the identifying properties and headers
/// let a worker answer even a task it cannot decode.
pub(crate) fn encode_task(
    spec: &TaskSpec,
    batch: &str,
    token: &str,
    seq: u32,
    submitted_at: &str,
    options: &SubmitOptions,
) -> Result<(Vec<u8>, BasicProperties), SubmitError> {
    let reply_to = result_queue(batch);
    let task = TaskEnvelope {
        v: PROTOCOL_VERSION,
        // Stable: a resumed submission gives the same task the same id.
        id: spec.id.clone().unwrap_or_else(|| format!("{batch}-{seq}")),
        batch: batch.to_string(),
        seq: Some(seq),
        kind: spec.kind.clone(),
        args: spec.args.clone(),
        timeout_s: spec.timeout_s,
        labels: spec.labels.clone(),
        reply_to: reply_to.clone(),
        submitted_at: Some(submitted_at.to_string()),
        max_retries: spec.max_retries,
        retry_backoff_s: spec.retry_backoff_s,
        expires_at: spec.expires_at.clone(),
        token: Some(token.to_string()),
    };
    let body = protocol::encode(&task);
    let fail = |message: String| SubmitError::Task {
        index: seq as usize,
        id: task.id.clone(),
        message,
    };
    if body.len() > options.max_message_bytes {
        return Err(fail(format!(
            "encoded task is {} bytes, over the {} byte limit; pass large data as files on a shared volume",
            body.len(),
            options.max_message_bytes
        )));
    }
    let properties = warren_broker::properties::task_properties(&task).map_err(fail)?;
    Ok((body, properties))
}
