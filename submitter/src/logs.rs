//! Reading the logs stream (`warren logs`): the attempt records of one batch or run, filtered,
//! from where the batch began to the stream's end (or on, following new records).

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, SystemTime};

use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection};
use tracing::warn;
use warren_broker::BrokerError;
use warren_broker::connection::close_channel;
use warren_broker::protocol::{
    self, AttemptRecord, MESSAGE_TYPE_ATTEMPT, MESSAGE_TYPE_ATTEMPTS, MESSAGE_TYPE_MARKER,
    TaskStatus,
};
use warren_broker::publisher::{Publisher, message_properties, verified_user};
use warren_broker::topology::{self, amqp_name, logs_stream};

/// Keys of the records shown last that a repeat is looked for among: a record is appended twice
/// only when its worker published again after a lost confirm, moments later. Bounds the memory
/// of a read whatever the batch's size (or a flood of records naming it).
const REPEAT_WINDOW: usize = 10_000;
/// Records read (and acknowledged) per window.
const WINDOW: u16 = 500;
/// How far before a batch's id-given creation time reading starts: clocks of the machines that
/// made the id and the broker's may differ.
const CLOCK_SLACK: Duration = Duration::from_secs(600);

/// Which records to show.
#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    /// The batch or run id.
    pub batch: String,
    /// Only this pipeline stage (the task's `stage` label).
    pub stage: Option<String>,
    /// Only this item (the task's `item` label, the path as `warren run` shows it).
    pub item: Option<String>,
    /// Only this task id.
    pub task: Option<String>,
    /// Only attempts that did not succeed.
    pub failed: bool,
    /// Only this attempt number.
    pub attempt: Option<u32>,
}

impl LogFilter {
    /// Whether `record` is one to show.
    pub fn matches(&self, record: &AttemptRecord) -> bool {
        let label = |name: &str, wanted: &Option<String>| {
            wanted
                .as_ref()
                .is_none_or(|w| record.labels.get(name) == Some(w))
        };
        record.batch == self.batch
            && label("stage", &self.stage)
            && label("item", &self.item)
            && self.task.as_ref().is_none_or(|t| *t == record.task_id)
            && (!self.failed || record.status != TaskStatus::Succeeded)
            && self.attempt.is_none_or(|a| a == record.attempt)
    }
}

/// One record as read, with who RabbitMQ says published it.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// The record.
    pub record: AttemptRecord,
    /// The broker-verified user that appended it (a worker's user), if it set one.
    pub sent_by: Option<String>,
}

/// Where reading starts.
#[derive(Debug, Clone, Copy)]
pub enum Since {
    /// From when the batch was made, as its id says (a UUIDv7 carries its time); from the
    /// stream's first record for ids that do not.
    BatchStart,
    /// From this time on.
    Time(SystemTime),
}

/// Reads the logs stream from `since` and hands each record that `filter` matches to `show`, in
/// the order they were appended. Without `follow` it stops at the stream's end as it was when
/// called (it appends a marker of its own and reads up to it); with `follow` it goes on until
/// the caller drops the future. Returns how many records matched. A record appended twice (its
/// worker published again after a lost confirm) is shown once. Anyone who may publish can append
/// a record naming any batch: `sent_by` says whom RabbitMQ saw append it.
// Long: one stream read loop: decode, deduplicate, filter and follow share the loop's state.
pub async fn read_logs(
    connection: &Connection,
    filter: &LogFilter,
    since: Since,
    follow: bool,
    show: &mut (dyn FnMut(LogEntry) + Send),
) -> Result<u64, BrokerError> {
    let publisher = Publisher::open(connection).await?;
    ensure_stream(connection).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(WINDOW * 2, BasicQosOptions::default())
        .await?;
    let start = match since {
        Since::Time(at) => Some(at),
        Since::BatchStart => created_at(&filter.batch).map(|at| at - CLOCK_SLACK),
    };
    let offset = match start.and_then(|at| at.duration_since(SystemTime::UNIX_EPOCH).ok()) {
        Some(at) => AMQPValue::Timestamp(at.as_secs()),
        None => AMQPValue::LongString(LongString::from("first")),
    };
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), offset);
    let stream = logs_stream();
    let mut consumer = channel
        .basic_consume(
            amqp_name(&stream)?,
            "".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .map_err(|e| BrokerError::from_queue_error(&stream, e))?;
    let marker = protocol::new_token();
    if !follow {
        let properties: BasicProperties = message_properties(MESSAGE_TYPE_MARKER)
            .with_message_id(ShortString::from(marker.as_str()));
        publisher.publish(&stream, b"", properties).await?;
    }
    let mut seen = HashSet::new();
    let mut recent = VecDeque::new();
    let mut matched = 0u64;
    let mut unacked = 0u16;
    let mut unreadable = 0u64;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let kind = delivery.properties.kind().as_ref().map(|k| k.as_str());
        let at_marker = kind == Some(MESSAGE_TYPE_MARKER)
            && delivery
                .properties
                .message_id()
                .as_ref()
                .is_some_and(|id| id.as_str() == marker);
        // A busy worker writes the records that finished together as one group.
        let records = match kind {
            Some(MESSAGE_TYPE_ATTEMPT) => vec![protocol::decode_attempt(&delivery.data)],
            Some(MESSAGE_TYPE_ATTEMPTS) => {
                protocol::decode_attempt_group(&delivery.data).unwrap_or_else(|e| vec![Err(e)])
            }
            _ => Vec::new(),
        };
        for record in records {
            match record {
                Ok(record) if filter.matches(&record) => {
                    let key = (
                        record.task_id.clone(),
                        record.attempt,
                        record.started_at.clone(),
                    );
                    if seen.insert(key.clone()) {
                        recent.push_back(key);
                        if recent.len() > REPEAT_WINDOW
                            && let Some(old) = recent.pop_front()
                        {
                            seen.remove(&old);
                        }
                        matched += 1;
                        show(LogEntry {
                            sent_by: verified_user(&delivery.properties).map(String::from),
                            record,
                        });
                    }
                }
                Ok(_) => {}
                Err(_) => unreadable += 1,
            }
        }
        unacked += 1;
        if unacked >= WINDOW || at_marker || follow {
            delivery.ack(BasicAckOptions { multiple: true }).await?;
            unacked = 0;
        }
        if at_marker {
            break;
        }
    }
    if unreadable > 0 {
        warn!("{unreadable} unreadable record(s) in {stream} were skipped");
    }
    close_channel(&channel, "read").await;
    close_channel(publisher.channel(), "read").await;
    Ok(matched)
}

/// Declares the logs stream if this user may (so reading a fresh broker finds an empty stream
/// rather than none), else checks that it exists; each on a channel of its own, as a refused
/// declare closes its channel.
async fn ensure_stream(connection: &Connection) -> Result<(), BrokerError> {
    if topology::try_declare_logs(connection).await {
        return Ok(());
    }
    let channel = connection.create_channel().await?;
    topology::inspect(&channel, &logs_stream()).await?;
    close_channel(&channel, "checked").await;
    Ok(())
}

/// When the batch or run `id` was made, if it is a UUIDv7 (as Warren's ids are).
pub fn created_at(id: &str) -> Option<SystemTime> {
    let uuid = uuid::Uuid::parse_str(id).ok()?;
    let (secs, nanos) = uuid.get_timestamp()?.to_unix();
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use warren_broker::protocol::{AttemptNext, PROTOCOL_VERSION, TaskError};

    fn record(stage: &str, item: &str, attempt: u32, status: TaskStatus) -> AttemptRecord {
        AttemptRecord {
            v: PROTOCOL_VERSION,
            batch: "run".into(),
            task_id: format!("{stage}-x"),
            seq: Some(0),
            kind: "exec".into(),
            labels: BTreeMap::from([
                ("stage".to_string(), stage.to_string()),
                ("item".to_string(), item.to_string()),
            ]),
            attempt,
            status,
            error: (status != TaskStatus::Succeeded).then(|| TaskError::new("exit_status", "1")),
            next: AttemptNext::Result,
            args: serde_json::Value::Null,
            output: serde_json::Value::Null,
            worker: "w".into(),
            host: "h".into(),
            started_at: String::new(),
            finished_at: String::new(),
            duration_s: 0.0,
            previous_errors: vec![],
        }
    }

    #[test]
    fn filters_pick_stage_item_failures_and_attempts() {
        let ok = record("warp", "a.tif", 1, TaskStatus::Succeeded);
        let bad = record("warp", "b.tif", 2, TaskStatus::Failed);
        let other = record("gz", "a.tif", 1, TaskStatus::Failed);
        let all = LogFilter {
            batch: "run".into(),
            ..LogFilter::default()
        };
        assert!(all.matches(&ok) && all.matches(&bad) && all.matches(&other));
        let stage = LogFilter {
            stage: Some("warp".into()),
            ..all.clone()
        };
        assert!(stage.matches(&ok) && !stage.matches(&other));
        let item = LogFilter {
            item: Some("b.tif".into()),
            ..all.clone()
        };
        assert!(item.matches(&bad) && !item.matches(&ok));
        let failed = LogFilter {
            failed: true,
            ..all.clone()
        };
        assert!(!failed.matches(&ok) && failed.matches(&bad));
        let second = LogFilter {
            attempt: Some(2),
            ..all.clone()
        };
        assert!(second.matches(&bad) && !second.matches(&ok));
        let elsewhere = LogFilter {
            batch: "another".into(),
            ..all
        };
        assert!(!elsewhere.matches(&ok));
    }

    #[test]
    fn a_uuid_v7_id_says_when_it_was_made() {
        let before = SystemTime::now() - Duration::from_secs(1);
        let made = created_at(&protocol::new_id()).unwrap();
        assert!(made >= before && made <= SystemTime::now() + Duration::from_secs(1));
        assert!(created_at("my-own-batch-name").is_none());
        assert!(created_at(&uuid::Uuid::new_v4().to_string()).is_none());
    }
}
