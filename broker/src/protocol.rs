//! The wire format: MessagePack envelopes for tasks, results and batch manifests.
//!
//! `docs/protocol.md` is the normative description; this module is its implementation. Every
//! envelope is a MessagePack *map* with named fields, so clients in other languages can build and
//! read them with a stock MessagePack library. Unknown fields are ignored (additions are
//! compatible); a change that breaks old readers bumps [`PROTOCOL_VERSION`].

use std::time::SystemTime;

use serde::Serialize;

mod attempt;
mod decode;
mod manifest;
mod result;
mod strict;
mod task;
pub use attempt::{
    AttemptNext, AttemptRecord, MAX_GROUP_BYTES, MAX_RECORD_BYTES, MAX_RECORD_STREAM_BYTES,
    MESSAGE_TYPE_ATTEMPT, MESSAGE_TYPE_ATTEMPTS, MESSAGE_TYPE_MARKER, decode_attempt,
    decode_attempt_group, encode_attempt_group,
};
pub use decode::{DecodeError, validate_id};
pub use manifest::{
    BatchManifest, Cancellation, MESSAGE_TYPE_CANCEL, decode_cancellation, decode_manifest,
};
pub use result::{ErrorKind, ResultEnvelope, TaskError, TaskStatus, decode_result};
pub use strict::nil_as_default;
pub use task::{
    ExecArgs, ExecLimits, MAX_RETRIES, MAX_RETRY_DELAY_S, SleepArgs, TaskEnvelope,
    check_builtin_args, decode_task, parse_time, validate_retries,
};

/// Major version of the envelope format. Workers accept exactly this version.
pub const PROTOCOL_VERSION: u32 = 1;
/// AMQP `content_type` of every Warren message.
pub const CONTENT_TYPE: &str = "application/msgpack";
/// AMQP `type` property of a task message.
pub const MESSAGE_TYPE_TASK: &str = "warren.task";
/// AMQP `type` property of a result message.
pub const MESSAGE_TYPE_RESULT: &str = "warren.result";
/// AMQP `type` property of a batch manifest message.
pub const MESSAGE_TYPE_MANIFEST: &str = "warren.manifest";
/// Header carrying the envelope version, so a reader can reject a message before decoding it.
pub const HEADER_VERSION: &str = "x-warren-version";
/// Header on a dead-lettered message: why it was dead-lettered (a short machine-readable kind).
pub const HEADER_DEAD_REASON: &str = "x-warren-dead-reason";
/// Dead-letter reason of a result whose batch's result queue no longer exists.
pub const DEAD_REASON_RESULT_QUEUE_MISSING: &str = "result_queue_missing";
/// Dead-letter reason of a message in a result queue that a collector cannot read as a result.
pub const DEAD_REASON_UNREADABLE_RESULT: &str = "unreadable_result";
/// Dead-letter reason of a result a collector will not take: another batch's, a seq beyond the
/// batch, or not published by one of the batch's workers.
pub const DEAD_REASON_FOREIGN_RESULT: &str = "foreign_result";
/// Header on a dead-lettered message: the human-readable detail of the reason.
pub const HEADER_DEAD_DETAIL: &str = "x-warren-dead-detail";
/// Header on a dead-lettered message: the queue it was consumed from.
pub const HEADER_DEAD_QUEUE: &str = "x-warren-dead-queue";
/// Header on a dead-lettered message: the worker that dead-lettered it.
pub const HEADER_DEAD_WORKER: &str = "x-warren-dead-worker";
/// Header RabbitMQ quorum queues set on a redelivered message: how often it was delivered before.
pub const HEADER_DELIVERY_COUNT: &str = "x-delivery-count";
/// Header carrying a task's `seq`, so a task that cannot be decoded can still be accounted for.
pub const HEADER_SEQ: &str = "x-warren-seq";
/// Header carrying a task's `kind`, so a task that cannot be decoded is reported with its kind.
pub const HEADER_KIND: &str = "x-warren-kind";
/// Task header: how many retries of the task came before this attempt.
pub const HEADER_RETRIES: &str = "x-warren-retries";
/// Task header: the errors of the attempts before a retry, as a JSON list of `{kind, message}`.
pub const HEADER_PREVIOUS_ERRORS: &str = "x-warren-previous-errors";
/// Task header: how often the task was replayed from the dead-letter queue (`warren dlq replay`).
pub const HEADER_REPLAYED: &str = "x-warren-replayed";
/// Task header: the batch's token, so that even a task whose body cannot be read is answered
/// with a result its collector accepts.
pub const HEADER_TOKEN: &str = "x-warren-token";
/// Largest task message a worker accepts by default (its `--max-message-bytes`), and the largest
/// `warren submit` sends by default.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 << 20;
/// The `x-warren-*` headers a task message may carry (see `docs/protocol.md`, "Task message").
pub const TASK_HEADERS: [&str; 7] = [
    HEADER_VERSION,
    HEADER_SEQ,
    HEADER_KIND,
    HEADER_RETRIES,
    HEADER_PREVIOUS_ERRORS,
    HEADER_REPLAYED,
    HEADER_TOKEN,
];
/// Longest task or batch id accepted: ids travel in AMQP short-string properties (255 bytes).
pub const MAX_ID_LEN: usize = 200;

/// Encodes an envelope as a MessagePack map.
pub fn encode<T: Serialize>(envelope: &T) -> Vec<u8> {
    // Serializing these plain structs to a Vec cannot fail: no maps with non-string keys, no I/O.
    rmp_serde::to_vec_named(envelope).unwrap_or_default()
}

/// Formats a time as RFC 3339 with milliseconds, the format of every timestamp on the wire.
pub fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// A fresh batch secret: 122 random bits, not derivable from anything on the wire.
pub fn new_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A fresh, time-ordered id for a batch or a task.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
