//! The dead-letter queue of a task queue (`<tasks>.dead`): what was set aside and why, replaying
//! tasks after a fix, and dropping what is not wanted. Messages are read with `basic.get` and
//! held unacknowledged, so what an operation does not take goes back to the queue when its channel
//! closes; memory holds one message at a time plus the summary.

use std::collections::BTreeMap;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};
use lapin::types::AMQPValue;
use serde::Serialize;
use serde_json::Value;
use warren_broker::BrokerError;
use warren_broker::connection::{close_channel, close_connection};
use warren_broker::connection::{confirm_channel, connect};
use warren_broker::properties::{replay_properties, replays_of};
use warren_broker::protocol::{
    self, BatchManifest, HEADER_DEAD_DETAIL, HEADER_DEAD_REASON, HEADER_DEAD_WORKER,
    MESSAGE_TYPE_MANIFEST, MESSAGE_TYPE_TASK, PROTOCOL_VERSION,
};
use warren_broker::publisher::{Publisher, header_value, message_properties};
use warren_broker::topology::{self, amqp_name, dead_letter_queue, manifest_queue, result_queue};

use crate::seqset::SeqSet;
use crate::spec::TaskSpec;
use crate::submit::{SubmitOptions, encode_task};
use warren_broker::AmqpSettings;

/// Which dead letters an operation applies to.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only those of this batch.
    pub batch: Option<String>,
    /// Only those set aside for this reason (e.g. `too_many_attempts`, `oversize`).
    pub reason: Option<String>,
}

/// One dead letter, as `warren dlq show` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Why it was set aside: Warren's reason, else RabbitMQ's (`delivery_limit`, `rejected`...).
    pub reason: String,
    /// Warren's explanation, when it gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Message type (`warren.task`, `warren.result`), when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_type: Option<String>,
    /// Task id (the `message_id` property).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Batch id (the `correlation_id` property).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
    /// Worker that set it aside.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Body size in bytes.
    pub bytes: usize,
    /// The body as a task or result envelope, when it is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub envelope: Option<Value>,
}

impl DeadLetter {
    fn read(properties: &BasicProperties, body: &[u8]) -> Self {
        let text = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.to_string());
        let envelope = match protocol::decode_task(body, usize::MAX) {
            // The batch secret is not for display.
            Ok(task) => serde_json::to_value(protocol::TaskEnvelope {
                token: None,
                ..task
            })
            .ok(),
            Err(_) => protocol::decode_result(body, usize::MAX)
                .ok()
                .and_then(|result| serde_json::to_value(result).ok()),
        };
        Self {
            reason: header_value(properties, HEADER_DEAD_REASON)
                .or_else(|| broker_reason(properties))
                .unwrap_or_else(|| "unknown".into()),
            detail: header_value(properties, HEADER_DEAD_DETAIL),
            message_type: text(properties.kind()),
            task_id: text(properties.message_id()),
            batch: text(properties.correlation_id()),
            worker: header_value(properties, HEADER_DEAD_WORKER),
            bytes: body.len(),
            envelope,
        }
    }

    fn matches(&self, filter: &Filter) -> bool {
        filter
            .batch
            .as_ref()
            .is_none_or(|b| self.batch.as_ref() == Some(b))
            && filter.reason.as_ref().is_none_or(|r| *r == self.reason)
    }

    fn is_task(&self) -> bool {
        self.message_type.as_deref() == Some(MESSAGE_TYPE_TASK)
    }
}

/// RabbitMQ's own reason in the first `x-death` entry, for messages the broker dead-lettered.
fn broker_reason(properties: &BasicProperties) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    match first.inner().get("reason")? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// Counts of dead letters by reason and batch.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Matching messages.
    pub total: u64,
    /// By (reason, batch or `-`).
    pub by_reason_and_batch: BTreeMap<(String, String), u64>,
}

/// What a purge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Moved {
    /// Messages dropped.
    pub done: u64,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Tasks published again into their own batch.
    pub home: u32,
    /// The new batch for tasks whose batch was gone.
    pub batch: String,
    /// Tasks published again into the new batch.
    pub tasks: u32,
    /// Matching messages left alone: not tasks (e.g. results set aside), or unreadable.
    pub skipped: u64,
}

/// A connection to one task queue's dead letters.
pub struct DeadLetters {
    connection: lapin::Connection,
    publisher: Publisher,
    task_queue: String,
    dead_queue: String,
}

impl DeadLetters {
    /// Opens the dead-letter queue of `task_queue`; an error if it does not exist.
    pub async fn open(settings: &AmqpSettings, task_queue: &str) -> Result<Self, BrokerError> {
        let connection = connect(settings, "warren-dlq").await?;
        let publisher = Publisher::open(&connection).await?;
        let dead_queue = dead_letter_queue(task_queue);
        topology::inspect(publisher.channel(), &dead_queue).await?;
        Ok(Self {
            connection,
            publisher,
            task_queue: task_queue.to_string(),
            dead_queue,
        })
    }

    /// Walks the dead letters present now (later arrivals are left for next time), each held
    /// unacknowledged on a channel of its own: what is not taken goes back when the walk ends.
    async fn walk(&self) -> Result<Walk, BrokerError> {
        let channel = self.connection.create_channel().await?;
        let left = topology::inspect(&channel, &self.dead_queue)
            .await?
            .message_count();
        Ok(Walk {
            channel,
            queue: self.dead_queue.clone(),
            left,
        })
    }

    /// Counts the matching dead letters by reason and batch.
    pub async fn summary(&self, filter: &Filter) -> Result<Summary, BrokerError> {
        let mut summary = Summary::default();
        let mut walk = self.walk().await?;
        while let Some((letter, _)) = walk.next().await? {
            if letter.matches(filter) {
                summary.total += 1;
                let batch = letter.batch.unwrap_or_else(|| "-".into());
                *summary
                    .by_reason_and_batch
                    .entry((letter.reason, batch))
                    .or_default() += 1;
            }
        }
        walk.end().await;
        Ok(summary)
    }

    /// The first `limit` matching dead letters.
    pub async fn show(
        &self,
        filter: &Filter,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        let mut shown = Vec::new();
        let mut walk = self.walk().await?;
        while shown.len() < limit
            && let Some((letter, _)) = walk.next().await?
        {
            if letter.matches(filter) {
                shown.push(letter);
            }
        }
        walk.end().await;
        Ok(shown)
    }

    /// Runs each matching dead task again, published to the task queue with a fresh delivery
    /// count and confirmed before it leaves the dead-letter queue. A task whose batch is still in
    /// the broker goes back to that batch: its manifest first records the replay, so the batch's
    /// collector waits for and writes the new result although it wrote the one that set the task
    /// aside. Tasks whose batch is gone (collected or expired) go to one new batch, so
    /// `warren wait NEW` collects them. Messages that are not tasks, or cannot be read as one,
    /// are left where they are. `announce` gets the new batch's id before its first task is
    /// published, and the batch's manifest is kept current after each task, so a replay killed
    /// part-way leaves a batch that `warren wait` can collect.
    // Long: the order of publish, manifest count and dead-letter ack per letter is the
    // at-least-once argument written in its comments; it reads best in one place.
    pub async fn replay(
        &self,
        filter: &Filter,
        announce: &mut (dyn FnMut(&str) + Send),
    ) -> Result<Replayed, BrokerError> {
        let options = SubmitOptions::new(self.task_queue.as_str());
        let (batch, token) = (protocol::new_id(), protocol::new_token());
        let channel = self.publisher.channel();
        topology::declare_batch_queues(channel, &batch, &self.task_queue, options.result_expiry)
            .await?;
        let submitted_at = protocol::timestamp(std::time::SystemTime::now());
        let mut replayed = Replayed {
            batch: batch.clone(),
            ..Replayed::default()
        };
        let mut walk = self.walk().await?;
        while let Some((letter, delivery)) = walk.next().await? {
            if !letter.matches(filter) {
                continue;
            }
            let task = match protocol::decode_task(&delivery.data, options.max_message_bytes) {
                Ok(task) if letter.is_task() => task,
                _ => {
                    replayed.skipped += 1;
                    continue;
                }
            };
            let replay = replays_of(&delivery.properties) + 1;
            if let Some(seq) = task.seq
                && self.record_replay(&task.batch, seq, replay).await?
            {
                self.publisher
                    .publish(
                        &self.task_queue,
                        &delivery.data,
                        replay_properties(&delivery.properties, replay),
                    )
                    .await?;
                walk.take(&delivery).await?;
                replayed.home += 1;
                continue;
            }
            let spec = TaskSpec {
                kind: task.kind,
                args: task.args,
                timeout_s: task.timeout_s,
                id: Some(task.id),
                labels: task.labels,
                max_retries: task.max_retries,
                retry_backoff_s: task.retry_backoff_s,
                expires_at: task.expires_at,
            };
            let (body, properties) = encode_task(
                &spec,
                &batch,
                &token,
                replayed.tasks,
                &submitted_at,
                &options,
            )
            .map_err(|e| BrokerError::InvalidInput(e.to_string()))?;
            if replayed.tasks == 0 {
                announce(&batch);
            }
            self.publisher
                .publish(
                    &self.task_queue,
                    &body,
                    replay_properties(&properties, replay),
                )
                .await?;
            replayed.tasks += 1;
            // After the task, so the manifest never counts a task that was not published; the
            // newest generation holds the count. The dead letter is taken only after that: killed
            // in between, a task is at worst both counted and still dead (replayed twice), never
            // published, taken and uncounted.
            let manifest = BatchManifest {
                v: PROTOCOL_VERSION,
                batch: batch.clone(),
                total: replayed.tasks,
                queue: self.task_queue.clone(),
                generation: u64::from(replayed.tasks),
                collected: Vec::new(),
                replays: Vec::new(),
                replays_collected: Vec::new(),
                token: Some(token.clone()),
                answerers: None,
            };
            self.publisher
                .publish(
                    &manifest_queue(&batch),
                    &protocol::encode(&manifest),
                    message_properties(MESSAGE_TYPE_MANIFEST),
                )
                .await?;
            walk.take(&delivery).await?;
        }
        walk.end().await;
        if replayed.tasks == 0 {
            for queue in [result_queue(&batch), manifest_queue(&batch)] {
                let _ = channel
                    .queue_delete(amqp_name(&queue)?, Default::default())
                    .await;
            }
        }
        Ok(replayed)
    }

    /// Records in `batch`'s manifest that its task `seq` is replayed (`replay`-th time), so its
    /// collector waits for that result. False when the batch is gone or has no manifest.
    async fn record_replay(&self, batch: &str, seq: u32, replay: u32) -> Result<bool, BrokerError> {
        // A channel of its own: a missing queue closes the channel it is asked on.
        let probe = self.connection.create_channel().await?;
        let open = topology::inspect(&probe, &result_queue(batch))
            .await
            .is_ok();
        close_channel(&probe, "done").await;
        if !open {
            return Ok(false);
        }
        let channel = confirm_channel(&self.connection).await?;
        let queue = manifest_queue(batch);
        let (mut newest, mut collected, mut taken) =
            (None::<BatchManifest>, SeqSet::default(), None);
        let mut replays = std::collections::BTreeSet::from([[seq, replay]]);
        let mut replays_collected = std::collections::BTreeSet::new();
        while let Some(message) = channel
            .basic_get(amqp_name(&queue)?, BasicGetOptions::default())
            .await?
        {
            let delivery = message.delivery;
            taken = Some(delivery.delivery_tag);
            if let Ok(m) =
                protocol::decode_manifest(&delivery.data, protocol::DEFAULT_MAX_MESSAGE_BYTES)
                && m.batch == batch
            {
                collected.extend(&SeqSet::from_ranges(&m.collected));
                replays.extend(m.replays.iter().copied());
                replays_collected.extend(m.replays_collected.iter().copied());
                if newest.as_ref().is_none_or(|n| m.generation >= n.generation) {
                    newest = Some(m);
                }
            }
        }
        let (Some(current), Some(last)) = (newest, taken) else {
            // Closing the channel gives back whatever was taken.
            close_channel(&channel, "done").await;
            return Ok(false);
        };
        let next = BatchManifest {
            generation: current.generation + 1,
            collected: collected.to_ranges(),
            replays: replays.into_iter().collect(),
            replays_collected: replays_collected.into_iter().collect(),
            ..current
        };
        Publisher::new(channel.clone(), &self.connection)
            .publish(
                &queue,
                &protocol::encode(&next),
                message_properties(MESSAGE_TYPE_MANIFEST),
            )
            .await?;
        channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await?;
        close_channel(&channel, "done").await;
        Ok(true)
    }

    /// Drops the matching dead letters for good (all of them, without a filter).
    pub async fn purge(&self, filter: &Filter) -> Result<Moved, BrokerError> {
        if filter.batch.is_none() && filter.reason.is_none() {
            let purged = self
                .publisher
                .channel()
                .queue_purge(amqp_name(&self.dead_queue)?, QueuePurgeOptions::default())
                .await?;
            return Ok(Moved {
                done: u64::from(purged),
            });
        }
        let mut moved = Moved::default();
        let mut walk = self.walk().await?;
        while let Some((letter, delivery)) = walk.next().await? {
            if letter.matches(filter) {
                walk.take(&delivery).await?;
                moved.done += 1;
            }
        }
        walk.end().await;
        Ok(moved)
    }

    /// Closes the connection.
    pub async fn close(self) {
        close_connection(&self.connection, "done").await;
    }
}

/// The dead letters present when a walk started, one at a time.
struct Walk {
    channel: lapin::Channel,
    queue: String,
    left: u32,
}

impl Walk {
    async fn next(&mut self) -> Result<Option<(DeadLetter, Delivery)>, BrokerError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let got = self
            .channel
            .basic_get(amqp_name(&self.queue)?, BasicGetOptions::default())
            .await?;
        Ok(got.map(|message| {
            let delivery = message.delivery;
            (
                DeadLetter::read(&delivery.properties, &delivery.data),
                delivery,
            )
        }))
    }

    /// Takes a message out of the queue for good.
    async fn take(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        Ok(self
            .channel
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await?)
    }

    /// Gives back every message not taken.
    async fn end(self) {
        close_channel(&self.channel, "done").await;
    }
}
