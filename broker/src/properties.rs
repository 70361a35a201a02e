//! The AMQP properties and headers of every Warren message, built in one place and described in
//! `docs/protocol.md` ("Task message", "Result message", "Delivery guarantees").

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::protocol::{
    CONTENT_TYPE, HEADER_DEAD_DETAIL, HEADER_DEAD_QUEUE, HEADER_DEAD_REASON, HEADER_DEAD_WORKER,
    HEADER_DELIVERY_COUNT, HEADER_KIND, HEADER_PREVIOUS_ERRORS, HEADER_REPLAYED, HEADER_RETRIES,
    HEADER_SEQ, HEADER_TOKEN, HEADER_VERSION, MESSAGE_TYPE_RESULT, MESSAGE_TYPE_TASK,
    PROTOCOL_VERSION, ResultEnvelope, TaskEnvelope, TaskError,
};

/// Properties of a persistent Warren message of `message_type`, with the version header.
pub fn message_properties(message_type: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(HEADER_VERSION.into(), AMQPValue::LongUInt(PROTOCOL_VERSION));
    BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_delivery_mode(2)
        .with_type(ShortString::from(message_type))
        .with_headers(headers)
}

/// Adds a string header to `properties`.
pub fn with_header(properties: BasicProperties, name: &str, value: &str) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from(name),
        AMQPValue::LongString(LongString::from(value)),
    );
    properties.with_headers(headers)
}

/// Reads a header as text (string headers) or number (integer headers).
pub fn header_value(properties: &BasicProperties, name: &str) -> Option<String> {
    let value = properties.headers().as_ref()?.inner().get(name)?;
    Some(match value {
        AMQPValue::LongString(s) => s.to_string(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

/// What a task message's headers say about this run of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Arrival {
    /// 1 on the first delivery of this message, +1 on each redelivery.
    pub delivery: u32,
    /// Retries that came before this message (each retry is a new message).
    pub retries: u32,
    /// Their errors, oldest first.
    pub previous_errors: Vec<TaskError>,
    /// How often the task was replayed from the dead-letter queue, if ever.
    pub replayed: Option<u32>,
}

impl Arrival {
    /// Reads the delivery count (`x-delivery-count`, set by quorum queues), the retries and
    /// earlier errors a worker wrote, and the replay count. Anything unreadable counts as absent
    /// rather than failing the task.
    pub fn of(properties: &BasicProperties) -> Self {
        let number = |name| header_value(properties, name).and_then(|n| n.parse::<u32>().ok());
        Self {
            delivery: number(HEADER_DELIVERY_COUNT).map_or(1, |n| n.saturating_add(1)),
            retries: number(HEADER_RETRIES).unwrap_or(0),
            previous_errors: header_value(properties, HEADER_PREVIOUS_ERRORS)
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or_default(),
            replayed: number(HEADER_REPLAYED),
        }
    }

    /// The attempt number: 1 for the first run, +1 for each retry and each redelivery.
    pub fn attempt(&self) -> u32 {
        self.delivery.saturating_add(self.retries)
    }
}

/// Who a task is, read from its properties alone: enough to answer a task whose body cannot be
/// decoded (see [`task_properties`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskIdentity {
    /// `message_id`.
    pub task_id: String,
    /// `reply_to`: the batch's result queue.
    pub reply_to: String,
    /// `correlation_id` (empty when absent).
    pub batch: String,
    /// The `seq` header.
    pub seq: Option<u32>,
    /// The `kind` header (empty when absent).
    pub kind: String,
    /// The `token` header.
    pub token: Option<String>,
}

impl TaskIdentity {
    /// The identity, when the message names its id and where to reply.
    pub fn of(properties: &BasicProperties) -> Option<Self> {
        let task_id = properties.message_id().as_ref()?.to_string();
        let reply_to = properties.reply_to().as_ref()?.to_string();
        Some(Self {
            task_id,
            reply_to,
            batch: properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_default(),
            seq: header_value(properties, HEADER_SEQ).and_then(|s| s.parse().ok()),
            kind: header_value(properties, HEADER_KIND).unwrap_or_default(),
            token: header_value(properties, HEADER_TOKEN),
        })
    }
}

/// A failed task's properties for its retry message: the retry counted, the errors so far kept
/// (`history`, JSON), and the broker's delivery count dropped (a republished message starts
/// afresh; the count is not ours to carry).
pub fn retry_properties(
    properties: &BasicProperties,
    retry: u32,
    history: &str,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in properties.headers().clone().unwrap_or_default().inner() {
        if name.as_str() != HEADER_DELIVERY_COUNT {
            headers.insert(name.clone(), value.clone());
        }
    }
    headers.insert(HEADER_RETRIES.into(), AMQPValue::LongUInt(retry));
    headers.insert(
        HEADER_PREVIOUS_ERRORS.into(),
        AMQPValue::LongString(history.into()),
    );
    properties.clone().with_headers(headers)
}

/// How often a dead task was replayed before (0 when never).
pub fn replays_of(properties: &BasicProperties) -> u32 {
    header_value(properties, HEADER_REPLAYED)
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0)
}

/// A dead task's properties for going back to its task queue: Warren's and RabbitMQ's
/// dead-letter headers and the delivery count removed, the replay counted.
pub fn replay_properties(properties: &BasicProperties, replay: u32) -> BasicProperties {
    const DROPPED: [&str; 6] = [
        HEADER_DEAD_REASON,
        HEADER_DEAD_DETAIL,
        HEADER_DEAD_QUEUE,
        HEADER_DEAD_WORKER,
        HEADER_DELIVERY_COUNT,
        "x-death",
    ];
    let mut headers = FieldTable::default();
    for (name, value) in properties.headers().clone().unwrap_or_default().inner() {
        let name = name.as_str();
        if !DROPPED.contains(&name)
            && !name.starts_with("x-first-death")
            && !name.starts_with("x-last-death")
        {
            headers.insert(name.into(), value.clone());
        }
    }
    headers.insert(HEADER_REPLAYED.into(), AMQPValue::LongUInt(replay));
    properties.clone().with_headers(headers)
}

/// Properties of a task message: its identity (`message_id`, `correlation_id`, `reply_to`) and
/// the `seq`, `kind` and `token` headers, so a worker can answer even a task whose body it cannot
/// decode. Fails when an id does not fit an AMQP short string.
pub fn task_properties(task: &TaskEnvelope) -> Result<BasicProperties, String> {
    let short =
        |s: &str| ShortString::try_new(s).map_err(|_| format!("'{s:.40}…' is too long for AMQP"));
    let properties = message_properties(MESSAGE_TYPE_TASK)
        .with_message_id(short(&task.id)?)
        .with_correlation_id(short(&task.batch)?)
        .with_reply_to(short(&task.reply_to)?);
    let mut headers = properties.headers().clone().unwrap_or_default();
    if let Some(seq) = task.seq {
        headers.insert(HEADER_SEQ.into(), AMQPValue::LongUInt(seq));
    }
    headers.insert(
        HEADER_KIND.into(),
        AMQPValue::LongString(LongString::from(task.kind.as_str())),
    );
    if let Some(token) = &task.token {
        headers.insert(
            HEADER_TOKEN.into(),
            AMQPValue::LongString(LongString::from(token.as_str())),
        );
    }
    Ok(properties.with_headers(headers))
}

/// Properties of a result message: its task and batch as `message_id` and `correlation_id`.
pub fn result_properties(result: &ResultEnvelope) -> BasicProperties {
    let props = message_properties(MESSAGE_TYPE_RESULT);
    match (
        ShortString::try_new(result.task_id.as_str()),
        ShortString::try_new(result.batch.as_str()),
    ) {
        (Ok(id), Ok(batch)) => props.with_message_id(id).with_correlation_id(batch),
        _ => props,
    }
}

/// The properties of a message set aside in a dead-letter queue: its own, plus why (`reason`, a
/// short kind, and `detail`), where it was consumed from and by which worker.
pub fn dead_letter_properties(
    properties: BasicProperties,
    reason: &str,
    detail: &str,
    queue: &str,
    worker: &str,
) -> BasicProperties {
    let properties = with_header(properties, HEADER_DEAD_REASON, reason);
    let properties = with_header(properties, HEADER_DEAD_DETAIL, detail);
    let properties = with_header(properties, HEADER_DEAD_QUEUE, queue);
    with_header(properties, HEADER_DEAD_WORKER, worker).with_delivery_mode(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_counts_itself_keeps_the_errors_and_drops_the_delivery_count() {
        let mut headers = FieldTable::default();
        headers.insert(HEADER_DELIVERY_COUNT.into(), AMQPValue::LongUInt(2));
        headers.insert(HEADER_SEQ.into(), AMQPValue::LongUInt(7));
        let first = BasicProperties::default().with_headers(headers);
        let arrived = Arrival::of(&first);
        assert_eq!(
            (arrived.delivery, arrived.retries, arrived.attempt()),
            (3, 0, 3)
        );
        let errors = vec![TaskError::new("exit_status", "exit 1")];
        let retry = retry_properties(&first, 1, &serde_json::to_string(&errors).unwrap());
        let again = Arrival::of(&retry);
        assert_eq!(
            again,
            Arrival {
                delivery: 1,
                retries: 1,
                previous_errors: errors,
                replayed: None
            }
        );
        assert_eq!(again.attempt(), 2);
        assert_eq!(header_value(&retry, HEADER_SEQ).as_deref(), Some("7"));
    }

    #[test]
    fn a_replay_drops_why_it_died_and_counts_itself() {
        let dead = dead_letter_properties(
            message_properties(MESSAGE_TYPE_TASK),
            "too_many_attempts",
            "died",
            "q",
            "w",
        );
        assert_eq!(replays_of(&dead), 0);
        let home = replay_properties(&dead, 1);
        assert_eq!(header_value(&home, HEADER_DEAD_REASON), None);
        assert_eq!(header_value(&home, HEADER_DEAD_WORKER), None);
        assert_eq!(replays_of(&home), 1);
        assert_eq!(Arrival::of(&home).replayed, Some(1));
        assert_eq!(
            header_value(&home, HEADER_VERSION).as_deref(),
            Some(PROTOCOL_VERSION.to_string().as_str())
        );
    }

    #[test]
    fn a_task_is_known_by_its_properties_alone() {
        let props = BasicProperties::default()
            .with_message_id("t1".into())
            .with_reply_to("warren.results.b".into());
        let props = with_header(props, HEADER_KIND, "exec");
        let identity = TaskIdentity::of(&props).expect("id and reply_to are there");
        assert_eq!(
            (
                identity.task_id.as_str(),
                identity.kind.as_str(),
                identity.batch.as_str()
            ),
            ("t1", "exec", "")
        );
        assert!(TaskIdentity::of(&BasicProperties::default()).is_none());
    }
}
