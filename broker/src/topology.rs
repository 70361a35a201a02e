//! RabbitMQ topology: queue names and the arguments every Warren queue is declared with.
//!
//! All queues hang off the default exchange, so a message's routing key is its queue's name.
//! The arguments are fixed (not knobs) because RabbitMQ refuses a re-declaration whose arguments
//! differ: every worker, submitter and third-party client must declare the same ones.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, Queue};

use crate::connection::close_channel;
use crate::error::BrokerError;

/// Default task queue.
pub const DEFAULT_TASK_QUEUE: &str = "warren.tasks";
/// Suffix of a task queue's dead-letter queue.
pub const DEAD_LETTER_SUFFIX: &str = ".dead";
/// The namespace of Warren's own queues when none is set: `warren.results.<batch>`, ...
pub const DEFAULT_NAMESPACE: &str = "warren";

static NAMESPACE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the first part of the names of this process's batch, run and cancellation queues
/// (`--queue-namespace`, `WARREN_NAMESPACE`): `NS.results.<batch>`, `NS.batches.<batch>`,
/// `NS.runs.<run>`, `NS.cancellations`. One namespace per team lets RabbitMQ permissions
/// (`^NS\.`) confine each team to its own. Set it once, before any queue is named.
pub fn set_namespace(namespace: &str) -> Result<(), String> {
    let valid = !namespace.is_empty()
        && namespace.len() <= 64
        && namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return Err(format!(
            "namespace {namespace:?}: use 1 to 64 letters, digits, '-' or '_'"
        ));
    }
    match NAMESPACE.set(namespace.to_string()) {
        Ok(()) => Ok(()),
        Err(_) if self::namespace() == namespace => Ok(()),
        Err(_) => Err(format!(
            "namespace {namespace:?}: this process already uses {:?}",
            self::namespace()
        )),
    }
}

/// The namespace of this process's batch, run and cancellation queues.
pub fn namespace() -> &'static str {
    NAMESPACE.get().map_or(DEFAULT_NAMESPACE, String::as_str)
}

/// Prefix of a batch's result queue (`warren.results.` in the default namespace).
pub fn result_queue_prefix() -> String {
    format!("{}.results.", namespace())
}

/// Prefix of a batch's manifest queue (`warren.batches.` in the default namespace).
pub fn manifest_queue_prefix() -> String {
    format!("{}.batches.", namespace())
}
/// Deliveries of one task (first one included) before RabbitMQ dead-letters it. High enough that
/// worker restarts and scale-downs never exhaust it, low enough that a task which crashes its
/// worker every time stops circulating.
pub const DELIVERY_LIMIT: i64 = 10;
/// Default idle time after which an uncollected batch's queues are deleted by RabbitMQ.
pub const DEFAULT_RESULT_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

/// The dead-letter queue of `task_queue`.
pub fn dead_letter_queue(task_queue: &str) -> String {
    format!("{task_queue}{DEAD_LETTER_SUFFIX}")
}

/// The result queue of `batch`.
pub fn result_queue(batch: &str) -> String {
    format!("{}{batch}", result_queue_prefix())
}

/// The manifest queue of `batch`.
pub fn manifest_queue(batch: &str) -> String {
    format!("{}{batch}", manifest_queue_prefix())
}

/// Converts a queue or routing-key name, refusing ones AMQP cannot carry (over 255 bytes).
pub fn amqp_name(name: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(name).map_err(|_| {
        BrokerError::InvalidInput(format!(
            "name too long for AMQP (over 255 bytes): {name:.60}..."
        ))
    })
}

/// Each kind of queue Warren declares; [`QueueKind::arguments`] gives its declaration arguments
/// (docs/protocol.md's queue table is held to them by a test).
#[derive(Debug, Clone, Copy)]
pub enum QueueKind<'a> {
    /// A task queue, dead-lettering to its `.dead` queue.
    Task {
        /// The task queue's name.
        task_queue: &'a str,
    },
    /// A task queue's dead-letter queue.
    Dead,
    /// A batch's result queue, dead-lettering unreadable results to the task queue's `.dead`.
    Results {
        /// The batch's task queue.
        task_queue: &'a str,
        /// Idle time before RabbitMQ deletes it.
        expiry: Duration,
    },
    /// A batch's manifest queue or a run's state queue.
    Expiring {
        /// Idle time before RabbitMQ deletes it.
        expiry: Duration,
    },
    /// The cancellations stream.
    Cancellations,
    /// The logs stream: a record of every attempt of every task.
    Logs,
    /// A retry delay queue of `task_queue`.
    Retry {
        /// The task queue the retries go back to.
        task_queue: &'a str,
        /// The delay.
        delay: Duration,
    },
}

impl QueueKind<'_> {
    /// The arguments a queue of this kind is declared with.
    pub fn arguments(&self) -> FieldTable {
        match *self {
            QueueKind::Task { task_queue } => {
                let mut args = replicated();
                dead_letter_to(&mut args, &dead_letter_queue(task_queue));
                args.insert(
                    "x-delivery-limit".into(),
                    AMQPValue::LongLongInt(DELIVERY_LIMIT),
                );
                args
            }
            QueueKind::Dead => replicated(),
            QueueKind::Results { task_queue, expiry } => {
                let mut args = replicated();
                args.insert("x-expires".into(), expires(expiry));
                // One collector at a time: quorum queues do not refuse a second exclusive
                // consumer, so a second one waits as a standby (collectors also take a lock).
                args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
                dead_letter_to(&mut args, &dead_letter_queue(task_queue));
                args
            }
            QueueKind::Expiring { expiry } => {
                let mut args = replicated();
                args.insert("x-expires".into(), expires(expiry));
                args
            }
            QueueKind::Cancellations => stream_keeping("7D"),
            QueueKind::Logs => {
                let mut args = stream_keeping(LOGS_MAX_AGE);
                args.insert(
                    "x-max-length-bytes".into(),
                    AMQPValue::LongLongInt(LOGS_MAX_BYTES),
                );
                // Retention drops whole segments: smaller ones keep the stream near its limit.
                args.insert(
                    "x-stream-max-segment-size-bytes".into(),
                    AMQPValue::LongLongInt(LOGS_SEGMENT_BYTES),
                );
                args
            }
            QueueKind::Retry { task_queue, delay } => {
                let ms = retry_ms(delay);
                let mut args = FieldTable::default();
                args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms));
                args.insert(
                    "x-expires".into(),
                    AMQPValue::LongLongInt(ms.saturating_add(60_000)),
                );
                dead_letter_to(&mut args, task_queue);
                args
            }
        }
    }
}

fn retry_ms(delay: Duration) -> i64 {
    i64::try_from(delay.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// Declares a task queue and its dead-letter queue (both durable quorum queues).
pub async fn declare_task_queue(channel: &Channel, task_queue: &str) -> Result<Queue, BrokerError> {
    let dead = dead_letter_queue(task_queue);
    declare(channel, &dead, QueueKind::Dead.arguments()).await?;
    declare(
        channel,
        task_queue,
        QueueKind::Task { task_queue }.arguments(),
    )
    .await
}

/// Declares the result and manifest queues of a batch; both expire after `expiry` unused.
/// Results that cannot be read are dead-lettered to the task queue's dead-letter queue.
pub async fn declare_batch_queues(
    channel: &Channel,
    batch: &str,
    task_queue: &str,
    expiry: Duration,
) -> Result<(), BrokerError> {
    declare_result_queue(channel, batch, task_queue, expiry).await?;
    declare_expiring(channel, &manifest_queue(batch), expiry).await
}

/// Declares the result queue of a batch (or a pipeline run), expiring after `expiry` unused;
/// results that cannot be read are dead-lettered to the task queue's dead-letter queue.
pub async fn declare_result_queue(
    channel: &Channel,
    batch: &str,
    task_queue: &str,
    expiry: Duration,
) -> Result<(), BrokerError> {
    let args = QueueKind::Results { task_queue, expiry }.arguments();
    declare(channel, &result_queue(batch), args).await?;
    Ok(())
}

/// The queue that keeps the state of pipeline run `run` (`warren.runs.<run>` in the default
/// namespace).
pub fn run_queue(run: &str) -> String {
    format!("{}.runs.{run}", namespace())
}

/// Declares the state queue of a pipeline run, expiring after `expiry` unused.
pub async fn declare_run_queue(
    channel: &Channel,
    run: &str,
    expiry: Duration,
) -> Result<(), BrokerError> {
    declare_expiring(channel, &run_queue(run), expiry).await
}

async fn declare_expiring(
    channel: &Channel,
    queue: &str,
    expiry: Duration,
) -> Result<(), BrokerError> {
    declare(channel, queue, QueueKind::Expiring { expiry }.arguments()).await?;
    Ok(())
}

/// Arguments of a quorum queue: replicated over a cluster's nodes, so a batch's results and
/// state stay available when one node stops (a classic queue lives on one node only).
fn replicated() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args
}

/// Arguments of a stream whose records are dropped once older than `max_age` (e.g. `7D`).
fn stream_keeping(max_age: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("stream")),
    );
    args.insert(
        "x-max-age".into(),
        AMQPValue::LongString(LongString::from(max_age)),
    );
    args
}

fn expires(expiry: Duration) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(expiry.as_millis()).unwrap_or(i64::MAX).max(1))
}

/// The stream of cancellation records (`warren cancel`), read by every worker from the start:
/// a stream, so every reader sees every record; records older than 7 days are dropped.
/// `warren.cancellations` in the default namespace.
pub fn cancellations_stream() -> String {
    format!("{}.cancellations", namespace())
}

/// Declares [`cancellations_stream`].
pub async fn declare_cancellations(channel: &Channel) -> Result<(), BrokerError> {
    declare(
        channel,
        &cancellations_stream(),
        QueueKind::Cancellations.arguments(),
    )
    .await?;
    Ok(())
}

/// How long the logs stream keeps a record (RabbitMQ's `x-max-age`; a policy may change it).
pub const LOGS_MAX_AGE: &str = "7D";
/// The most the logs stream holds, in bytes, before its oldest records go.
pub const LOGS_MAX_BYTES: i64 = 2 << 30;
/// The logs stream's segment size: retention removes whole segments.
const LOGS_SEGMENT_BYTES: i64 = 64 << 20;

/// The stream of attempt records (`warren logs`): every worker appends one record per attempt
/// of a task, whatever became of it; kept by age and size ([`LOGS_MAX_AGE`], [`LOGS_MAX_BYTES`]).
/// `warren.logs` in the default namespace.
pub fn logs_stream() -> String {
    format!("{}.logs", namespace())
}

/// Declares [`logs_stream`].
pub async fn declare_logs(channel: &Channel) -> Result<(), BrokerError> {
    declare(channel, &logs_stream(), QueueKind::Logs.arguments()).await?;
    Ok(())
}

/// Declares [`logs_stream`] if this connection's user may, on a channel of its own (a refused
/// declare closes its channel); returns whether it did. Workers and submitters both try, so the
/// stream exists whichever of them may configure it.
pub async fn try_declare_logs(connection: &Connection) -> bool {
    // A node just restarted can take long to answer a stream's declare: nobody waits on it.
    let declared = tokio::time::timeout(LOGS_DECLARE_WAIT, async {
        let channel = connection.create_channel().await.ok()?;
        declare_logs(&channel).await.ok()?;
        close_channel(&channel, "declared").await;
        Some(())
    })
    .await;
    matches!(declared, Ok(Some(())))
}

/// How long [`try_declare_logs`] waits for the broker.
const LOGS_DECLARE_WAIT: Duration = Duration::from_secs(3);

/// The delay queue that holds retries of `task_queue`'s tasks for `delay`: classic (per-queue TTL
/// works on every RabbitMQ version), with the TTL dead-lettering them back into the task queue.
/// One queue per distinct delay, so a long delay never holds up a short one; each expires when
/// unused for a minute after its delay.
pub async fn declare_retry_queue(
    channel: &Channel,
    task_queue: &str,
    delay: Duration,
) -> Result<String, BrokerError> {
    let name = format!("{task_queue}.retry.{}ms", retry_ms(delay));
    let args = QueueKind::Retry { task_queue, delay }.arguments();
    declare(channel, &name, args).await?;
    Ok(name)
}

/// Checks that the task queue `queue` exists, on a channel of its own (a failed passive declare
/// closes its channel).
pub async fn require_task_queue(connection: &Connection, queue: &str) -> Result<(), BrokerError> {
    let channel = connection.create_channel().await?;
    let found = inspect(&channel, queue).await;
    if found.is_ok() {
        close_channel(&channel, "checked").await;
    }
    match found {
        Ok(_) => Ok(()),
        Err(BrokerError::QueueNotFound { .. }) => Err(BrokerError::TaskQueueMissing {
            queue: queue.to_string(),
        }),
        Err(e) => Err(e),
    }
}

/// Checks that a queue exists without changing it; returns its ready count and consumers.
pub async fn inspect(channel: &Channel, queue: &str) -> Result<Queue, BrokerError> {
    channel
        .queue_declare(
            amqp_name(queue)?,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| BrokerError::from_queue_error(queue, e))
}

fn dead_letter_to(args: &mut FieldTable, queue: &str) {
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(queue)),
    );
}

async fn declare(channel: &Channel, queue: &str, args: FieldTable) -> Result<Queue, BrokerError> {
    channel
        .queue_declare(amqp_name(queue)?, QueueDeclareOptions::durable(), args)
        .await
        .map_err(|e| BrokerError::from_queue_error(queue, e))
}
