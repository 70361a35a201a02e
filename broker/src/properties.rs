//! The AMQP properties and headers of every Warren message, built in one place and described in
//! `docs/protocol.md` ("Task message", "Result message", "Delivery guarantees").

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::protocol::{
    CONTENT_TYPE, HEADER_DEAD_DETAIL, HEADER_DEAD_QUEUE, HEADER_DEAD_REASON, HEADER_DEAD_WORKER,
    HEADER_KIND, HEADER_SEQ, HEADER_TOKEN, HEADER_VERSION, MESSAGE_TYPE_RESULT, MESSAGE_TYPE_TASK,
    PROTOCOL_VERSION, ResultEnvelope, TaskEnvelope,
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
