//! The wire format: MessagePack envelopes for tasks, results and batch manifests.
//!
//! `docs/protocol.md` is the normative description; this module is its implementation. Every
//! envelope is a MessagePack *map* with named fields, so clients in other languages can build and
//! read them with a stock MessagePack library. Unknown fields are ignored (additions are
//! compatible); a change that breaks old readers bumps [`PROTOCOL_VERSION`].

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;

mod attempt;
mod strict;
pub use attempt::{
    AttemptNext, AttemptRecord, MAX_RECORD_BYTES, MAX_RECORD_STREAM_BYTES, MESSAGE_TYPE_ATTEMPT,
    MESSAGE_TYPE_MARKER, decode_attempt,
};
pub use strict::nil_as_default;

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

/// One unit of work, as published to a task queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEnvelope {
    /// Envelope version; see [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Task id, unique within its batch (user-given or generated).
    #[serde(deserialize_with = "strict::string")]
    pub id: String,
    /// Id of the batch the task belongs to.
    #[serde(deserialize_with = "strict::string")]
    pub batch: String,
    /// Position of the task in its batch (0-based), used to track which results are in. Required
    /// on the wire ([`decode_task`] refuses a task without it); an `Option` so that a result can
    /// still be built for such a task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u32>,
    /// Handler name: `exec`, `echo`, `sleep` or one registered by a custom worker.
    #[serde(deserialize_with = "strict::string")]
    pub kind: String,
    /// Handler arguments, in the JSON data model; their shape is the handler's business.
    #[serde(default, deserialize_with = "strict::json")]
    pub args: Value,
    /// Wall-clock limit for one attempt, in seconds; the worker's default applies when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// Free-form labels, copied to the result.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "strict::labels"
    )]
    pub labels: BTreeMap<String, String>,
    /// Queue the result is published to (through the default exchange).
    #[serde(deserialize_with = "strict::string")]
    pub reply_to: String,
    /// When the task was submitted (RFC 3339).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub submitted_at: Option<String>,
    /// How often a failed or timed-out attempt is tried again (0, the default: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Seconds before the first retry (default 1); doubled for each further one, with jitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_backoff_s: Option<f64>,
    /// After this time (RFC 3339) the task is not run: it gets an `expired` result.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub expires_at: Option<String>,
    /// The batch's secret, echoed in the result so that a collector can tell a worker's result
    /// from one published by anyone else who can write to the result queue.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "strict::opt_string"
    )]
    pub token: Option<String>,
}

/// Arguments of an `exec` task (see `docs/protocol.md`, "Handler arguments").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecArgs {
    /// The program and its arguments; the program must be allowed by the worker.
    pub argv: Vec<String>,
    /// Variables added to the command's clean environment.
    #[serde(
        default,
        deserialize_with = "nil_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub env: BTreeMap<String, String>,
    /// Working folder of the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<std::path::PathBuf>,
    /// Text written to the command's stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Files (relative to `cwd`) the command must have created when it exits 0.
    #[serde(
        default,
        deserialize_with = "nil_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub outputs: Vec<std::path::PathBuf>,
    /// Exit codes worth retrying (with the task's `max_retries`); any other failure is final.
    /// Absent: every failure may be retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_exit_codes: Option<Vec<i32>>,
    /// Resource limits the command asks for; each at most the worker's own cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ExecLimits>,
}

/// Resource limits an `exec` task asks for (`setrlimit`); absent ones take the worker's caps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecLimits {
    /// Address space, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU time, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_s: Option<u64>,
    /// Largest file written, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_bytes: Option<u64>,
    /// Open files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_files: Option<u64>,
    /// Processes of the command's user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<u64>,
}

/// Arguments of a `sleep` task.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepArgs {
    /// How long to sleep, in milliseconds.
    pub ms: u64,
}

/// Checks the arguments of a task for one of the built-in kinds (`exec`, `sleep`) against the
/// shape its handler reads, naming the field that does not fit. Other kinds are not checked.
pub fn check_builtin_args(kind: &str, args: &Value) -> Result<(), String> {
    fn shape<T: serde::de::DeserializeOwned>(args: &Value) -> Result<T, String> {
        serde_path_to_error::deserialize(args.clone()).map_err(|e| format!("args: {e}"))
    }
    match kind {
        "exec" => {
            let exec: ExecArgs = shape(args)?;
            if exec.argv.is_empty() {
                return Err("args: argv is empty: give at least the program to run".into());
            }
            Ok(())
        }
        "sleep" => shape::<SleepArgs>(args).map(drop),
        _ => Ok(()),
    }
}

/// Outcome of one task attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// The handler finished successfully.
    Succeeded,
    /// The handler ran and reported a failure (non-zero exit, missing outputs, ...).
    Failed,
    /// The attempt ran past its time limit and was killed.
    TimedOut,
    /// The worker refused the task without running it (bad envelope, unknown kind, not allowed).
    Rejected,
    /// The task was cancelled (`warren cancel`): not run, or killed while running.
    Cancelled,
    /// The task's `expires_at` had passed when a worker got it: not run.
    Expired,
}

impl TaskStatus {
    /// Every status.
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::TimedOut,
        TaskStatus::Rejected,
        TaskStatus::Cancelled,
        TaskStatus::Expired,
    ];

    /// The status as written on the wire and in result lines.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::TimedOut => "timed_out",
            TaskStatus::Rejected => "rejected",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::Expired => "expired",
        }
    }
}

/// Why a task did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskError {
    /// Machine-readable kind, e.g. `exit_status`, `timeout`, `missing_outputs`, `not_allowed`.
    pub kind: String,
    /// Human-readable explanation.
    pub message: String,
}

impl TaskError {
    /// Builds an error of `kind` with `message`.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            message: message.into(),
        }
    }
}

/// The error kinds Warren itself reports, each with the status it comes with. A custom
/// handler may report kinds of its own; `docs/protocol.md` lists these (a test holds it to this).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The command exited non-zero or was killed by a signal.
    ExitStatus,
    /// The command succeeded but a declared output does not exist.
    MissingOutputs,
    /// The program could not be started.
    SpawnFailed,
    /// A custom handler panicked.
    HandlerPanicked,
    /// The worker could not wait for the command it started.
    WaitFailed,
    /// The task reached the delivery limit without finishing.
    TooManyAttempts,
    /// The attempt ran past its time limit.
    Timeout,
    /// `exec` of a program the worker does not allow.
    NotAllowed,
    /// `exec` setting an environment variable the worker does not allow.
    EnvNotAllowed,
    /// `exec` with a `cwd` that is not a folder on the worker.
    CwdMissing,
    /// `exec` with a `cwd` or `outputs` path outside the worker's sandbox data roots.
    PathNotAllowed,
    /// The arguments do not fit the handler.
    InvalidArgs,
    /// No handler of the task's kind on the worker.
    UnknownKind,
    /// The task's batch, or the task, was cancelled.
    Cancelled,
    /// The task's `expires_at` had passed.
    Expired,
    /// The body is not a MessagePack map.
    Undecodable,
    /// The envelope's version is not spoken.
    UnsupportedVersion,
    /// A required field is absent.
    MissingField,
    /// A field has a value of the wrong type or out of range.
    InvalidField,
    /// The message is larger than the worker accepts.
    Oversize,
}

impl ErrorKind {
    /// Every kind, in the order of the document's table.
    pub const ALL: [ErrorKind; 20] = [
        ErrorKind::ExitStatus,
        ErrorKind::MissingOutputs,
        ErrorKind::SpawnFailed,
        ErrorKind::HandlerPanicked,
        ErrorKind::WaitFailed,
        ErrorKind::TooManyAttempts,
        ErrorKind::Timeout,
        ErrorKind::NotAllowed,
        ErrorKind::EnvNotAllowed,
        ErrorKind::CwdMissing,
        ErrorKind::PathNotAllowed,
        ErrorKind::InvalidArgs,
        ErrorKind::UnknownKind,
        ErrorKind::Cancelled,
        ErrorKind::Expired,
        ErrorKind::Undecodable,
        ErrorKind::UnsupportedVersion,
        ErrorKind::MissingField,
        ErrorKind::InvalidField,
        ErrorKind::Oversize,
    ];

    /// The kind as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ExitStatus => "exit_status",
            ErrorKind::MissingOutputs => "missing_outputs",
            ErrorKind::SpawnFailed => "spawn_failed",
            ErrorKind::HandlerPanicked => "handler_panicked",
            ErrorKind::WaitFailed => "wait_failed",
            ErrorKind::TooManyAttempts => "too_many_attempts",
            ErrorKind::Timeout => "timeout",
            ErrorKind::NotAllowed => "not_allowed",
            ErrorKind::EnvNotAllowed => "env_not_allowed",
            ErrorKind::CwdMissing => "cwd_missing",
            ErrorKind::PathNotAllowed => "path_not_allowed",
            ErrorKind::InvalidArgs => "invalid_args",
            ErrorKind::UnknownKind => "unknown_kind",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Expired => "expired",
            ErrorKind::Undecodable => "undecodable",
            ErrorKind::UnsupportedVersion => "unsupported_version",
            ErrorKind::MissingField => "missing_field",
            ErrorKind::InvalidField => "invalid_field",
            ErrorKind::Oversize => "oversize",
        }
    }

    /// The result status a task gets with this kind.
    pub fn status(self) -> TaskStatus {
        match self {
            ErrorKind::ExitStatus
            | ErrorKind::MissingOutputs
            | ErrorKind::SpawnFailed
            | ErrorKind::HandlerPanicked
            | ErrorKind::WaitFailed
            | ErrorKind::TooManyAttempts
            | ErrorKind::CwdMissing => TaskStatus::Failed,
            ErrorKind::Timeout => TaskStatus::TimedOut,
            ErrorKind::Cancelled => TaskStatus::Cancelled,
            ErrorKind::Expired => TaskStatus::Expired,
            ErrorKind::NotAllowed
            | ErrorKind::EnvNotAllowed
            | ErrorKind::PathNotAllowed
            | ErrorKind::InvalidArgs
            | ErrorKind::UnknownKind
            | ErrorKind::Undecodable
            | ErrorKind::UnsupportedVersion
            | ErrorKind::MissingField
            | ErrorKind::InvalidField
            | ErrorKind::Oversize => TaskStatus::Rejected,
        }
    }
}

impl From<ErrorKind> for String {
    fn from(kind: ErrorKind) -> Self {
        kind.as_str().to_string()
    }
}

impl PartialEq<ErrorKind> for String {
    fn eq(&self, kind: &ErrorKind) -> bool {
        self == kind.as_str()
    }
}

/// The result of one task attempt, as published to the batch's result queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultEnvelope {
    /// Envelope version; see [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Id of the task this is the result of.
    pub task_id: String,
    /// Batch id of the task.
    pub batch: String,
    /// Position of the task in its batch, when the task carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u32>,
    /// Handler name of the task (empty when the task could not be decoded).
    #[serde(default)]
    pub kind: String,
    /// Outcome.
    pub status: TaskStatus,
    /// What the handler returned (for `exec`: exit code, captured output, outputs' sizes).
    #[serde(default)]
    pub output: Value,
    /// Why the task did not succeed; absent on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// Name of the worker that ran the attempt.
    pub worker: String,
    /// Attempt number, 1 for the first delivery.
    pub attempt: u32,
    /// Labels copied from the task.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// When the attempt started (RFC 3339).
    pub started_at: String,
    /// When the attempt ended (RFC 3339).
    pub finished_at: String,
    /// The errors of the attempts before this one, oldest first, when the task was retried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_errors: Vec<TaskError>,
    /// How often the task was replayed from the dead-letter queue (`warren dlq replay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replayed: Option<u32>,
    /// The task's `token`, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Book-keeping for one batch, kept in the batch's manifest queue so that any process can collect
/// the batch's results later (see `docs/protocol.md`, "Batches").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchManifest {
    /// Envelope version; see [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Batch id.
    pub batch: String,
    /// Number of tasks in the batch; their `seq` run from 0 to `total - 1`.
    pub total: u32,
    /// Task queue the batch was submitted to.
    pub queue: String,
    /// Generation of this manifest; the highest one in the queue is current.
    pub generation: u64,
    /// `seq` ranges (inclusive `[first, last]`) whose results were already written out.
    #[serde(default)]
    pub collected: Vec<[u32; 2]>,
    /// Tasks replayed from the dead-letter queue into this batch, as `[seq, replay]` pairs: the
    /// batch is complete only once a result of each replay is collected too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replays: Vec<[u32; 2]>,
    /// The `[seq, replay]` pairs whose replayed result was collected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replays_collected: Vec<[u32; 2]>,
    /// The batch's secret, when its tasks carry one: results without it are not accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The RabbitMQ users whose results a collector takes (their broker-verified `user_id`);
    /// None takes results from anyone who has the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answerers: Option<Vec<String>>,
}

/// Why bytes could not be turned into an envelope. Each variant names a dead-letter reason.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The body is larger than the reader accepts.
    #[error("message of {size} bytes is larger than the limit of {limit} bytes")]
    Oversize {
        /// Body size in bytes.
        size: usize,
        /// Accepted maximum.
        limit: usize,
    },
    /// The envelope names a version this reader does not speak.
    #[error(
        "envelope version {found} is not supported (this worker speaks version {PROTOCOL_VERSION})"
    )]
    UnsupportedVersion {
        /// Version found in the header or envelope.
        found: String,
    },
    /// A required field is absent.
    #[error("envelope is missing a field: {0}")]
    MissingField(String),
    /// The bytes are not a MessagePack envelope of the expected shape.
    #[error("body is not a valid MessagePack envelope: {0}")]
    Undecodable(String),
    /// A field is present but its value is not acceptable.
    #[error("invalid field: {0}")]
    Invalid(String),
}

impl DecodeError {
    /// Short machine-readable kind, used as error kind and dead-letter reason.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DecodeError::Oversize { .. } => ErrorKind::Oversize,
            DecodeError::UnsupportedVersion { .. } => ErrorKind::UnsupportedVersion,
            DecodeError::MissingField(_) => ErrorKind::MissingField,
            DecodeError::Undecodable(_) => ErrorKind::Undecodable,
            DecodeError::Invalid(_) => ErrorKind::InvalidField,
        }
    }
}

/// Encodes an envelope as a MessagePack map.
pub fn encode<T: Serialize>(envelope: &T) -> Vec<u8> {
    // Serializing these plain structs to a Vec cannot fail: no maps with non-string keys, no I/O.
    rmp_serde::to_vec_named(envelope).unwrap_or_default()
}

/// Decodes a task envelope, checking size and version first so the error names the real cause.
pub fn decode_task(bytes: &[u8], limit: usize) -> Result<TaskEnvelope, DecodeError> {
    let task: TaskEnvelope = decode_checked(bytes, limit, &["seq"])?;
    if task.seq.is_none() {
        return Err(DecodeError::MissingField("seq".into()));
    }
    validate_id("id", &task.id)?;
    validate_id("batch", &task.batch)?;
    if task.kind.is_empty() {
        return Err(DecodeError::Invalid("kind is empty".into()));
    }
    if task.reply_to.is_empty() || task.reply_to.len() > MAX_ID_LEN + 32 {
        return Err(DecodeError::Invalid("reply_to must name a queue".into()));
    }
    if let Some(t) = task.timeout_s
        && !(t.is_finite() && t > 0.0)
    {
        return Err(DecodeError::Invalid(format!(
            "timeout_s must be a positive number of seconds, got {t}"
        )));
    }
    validate_retries(task.max_retries, task.retry_backoff_s).map_err(DecodeError::Invalid)?;
    if let Some(at) = &task.expires_at {
        parse_time("expires_at", at).map_err(DecodeError::Invalid)?;
    }
    Ok(task)
}

/// Parses an RFC 3339 time such as `2026-11-27T18:00:00Z`, naming the field when it is not one.
pub fn parse_time(field: &str, text: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(text).map_err(|e| {
        format!("{field} must be an RFC 3339 time such as 2026-11-27T18:00:00Z, got {text:?} ({e})")
    })
}

impl TaskEnvelope {
    /// Whether the task's `expires_at` has passed at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires_at
            .as_deref()
            .and_then(|at| parse_time("expires_at", at).ok())
            .is_some_and(|at| at <= now)
    }
}

/// Message type of a cancellation record.
pub const MESSAGE_TYPE_CANCEL: &str = "warren.cancel";

/// A cancellation, kept in the cancellations stream: a whole batch, or one task of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cancellation {
    /// Envelope version; see [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Batch id.
    pub batch: String,
    /// One task of the batch; None cancels the whole batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// When it was cancelled (RFC 3339).
    pub at: String,
}

/// Decodes a cancellation record.
pub fn decode_cancellation(bytes: &[u8]) -> Result<Cancellation, DecodeError> {
    decode_checked(bytes, 64 * 1024, &[])
}

/// Most retries a task may ask for.
pub const MAX_RETRIES: u32 = 100;
/// Longest pause before a retry, whatever the backoff grows to.
pub const MAX_RETRY_DELAY_S: f64 = 3600.0;

/// Checks a task's retry settings.
pub fn validate_retries(max_retries: Option<u32>, backoff_s: Option<f64>) -> Result<(), String> {
    if let Some(n) = max_retries
        && n > MAX_RETRIES
    {
        return Err(format!(
            "max_retries is {n}; at most {MAX_RETRIES} are allowed"
        ));
    }
    if let Some(b) = backoff_s
        && !(b.is_finite() && b > 0.0 && b <= MAX_RETRY_DELAY_S)
    {
        return Err(format!(
            "retry_backoff_s must be a number of seconds above 0 and at most {MAX_RETRY_DELAY_S}, got {b}"
        ));
    }
    Ok(())
}

/// Decodes a result envelope.
pub fn decode_result(bytes: &[u8], limit: usize) -> Result<ResultEnvelope, DecodeError> {
    decode_checked(bytes, limit, &[])
}

/// Decodes a batch manifest.
pub fn decode_manifest(bytes: &[u8], limit: usize) -> Result<BatchManifest, DecodeError> {
    decode_checked(bytes, limit, &[])
}

/// Checks that `value` can serve as a task or batch id.
pub fn validate_id(field: &str, value: &str) -> Result<(), DecodeError> {
    if value.is_empty() {
        return Err(DecodeError::Invalid(format!("{field} is empty")));
    }
    if value.len() > MAX_ID_LEN {
        return Err(DecodeError::Invalid(format!(
            "{field} is {} bytes long; at most {MAX_ID_LEN} are allowed",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(DecodeError::Invalid(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

/// What is read of an envelope before the envelope itself: that it is a map with string keys
/// (integer keys would be read positionally, as serde reads a struct from an array), its version
/// (so a newer envelope is reported as a version problem rather than a shape error), and which
/// fields are nil.
#[derive(Default)]
struct Probe {
    /// `None`: no `v`; `Some(None)`: `v` is nil.
    v: Option<Option<Value>>,
    nil: Vec<String>,
}

impl<'de> Deserialize<'de> for Probe {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ProbeVisitor)
    }
}

struct ProbeVisitor;

impl<'de> serde::de::Visitor<'de> for ProbeVisitor {
    type Value = Probe;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a map with string keys (an envelope)")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Probe, A::Error> {
        let mut probe = Probe::default();
        while let Some(key) = map.next_key::<StringKey>()? {
            if key.0 == "v" {
                probe.v = Some(map.next_value::<Option<Value>>()?);
            } else if map.next_value::<Option<serde::de::IgnoredAny>>()?.is_none() {
                probe.nil.push(key.0);
            }
        }
        Ok(probe)
    }
}

/// A map key that must be a string.
struct StringKey(String);

impl<'de> Deserialize<'de> for StringKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl serde::de::Visitor<'_> for KeyVisitor {
            type Value = StringKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string map key (the envelope's keys are field names)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StringKey, E> {
                Ok(StringKey(v.to_string()))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Decodes an envelope of at most `limit` bytes; nil in any of `required` (fields that serde reads
/// as optional but the protocol requires) is `invalid_field`, as for every other required field.
fn decode_checked<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    limit: usize,
    required: &[&str],
) -> Result<T, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::Oversize {
            size: bytes.len(),
            limit,
        });
    }
    let probe: Probe =
        rmp_serde::from_slice(bytes).map_err(|e| DecodeError::Undecodable(e.to_string()))?;
    match probe.v {
        None => return Err(DecodeError::MissingField("v".into())),
        Some(None) => {
            return Err(DecodeError::Invalid(
                "v: nil is not accepted in a required field".into(),
            ));
        }
        Some(Some(Value::Number(n))) if n.as_u64() == Some(u64::from(PROTOCOL_VERSION)) => {}
        Some(Some(other)) => {
            return Err(DecodeError::UnsupportedVersion {
                found: other.to_string(),
            });
        }
    }
    for field in required {
        if probe.nil.iter().any(|n| n == field) {
            return Err(DecodeError::Invalid(format!(
                "{field}: nil is not accepted in a required field"
            )));
        }
    }
    let mut reader = rmp_serde::Deserializer::from_read_ref(bytes);
    serde_path_to_error::deserialize(&mut reader).map_err(|e| {
        let text = e.inner().to_string();
        if let Some(field) = text.strip_prefix("missing field ") {
            return DecodeError::MissingField(field.trim_matches('`').to_string());
        }
        let at_root = e.path().iter().next().is_none();
        match e.inner() {
            // A value of the wrong type (or out of range) in a named field.
            rmp_serde::decode::Error::TypeMismatch(marker) if !at_root => {
                DecodeError::Invalid(format!(
                    "{}: a value of the wrong type (MessagePack {marker:?})",
                    e.path()
                ))
            }
            rmp_serde::decode::Error::Syntax(_) | rmp_serde::decode::Error::OutOfRange
                if !at_root =>
            {
                DecodeError::Invalid(format!("{}: {text}", e.path()))
            }
            // Not MessagePack, truncated, too deeply nested, or not a map at all.
            _ => DecodeError::Undecodable(text),
        }
    })
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
mod tests {
    use super::*;

    fn task() -> TaskEnvelope {
        TaskEnvelope {
            v: PROTOCOL_VERSION,
            id: "t1".into(),
            batch: "b1".into(),
            seq: Some(0),
            kind: "echo".into(),
            args: serde_json::json!({"x": [1, 2.5, "s", null, true]}),
            timeout_s: Some(3.0),
            labels: BTreeMap::from([("file".into(), "a.tif".into())]),
            reply_to: "warren.results.b1".into(),
            submitted_at: None,
            max_retries: None,
            retry_backoff_s: None,
            expires_at: None,
            token: Some("secret".into()),
        }
    }

    #[test]
    fn task_round_trips() {
        let t = task();
        assert_eq!(decode_task(&encode(&t), 1 << 20).unwrap(), t);
    }

    #[test]
    fn oversize_is_reported_before_decoding() {
        let err = decode_task(&encode(&task()), 10).unwrap_err();
        assert_eq!(err.kind().as_str(), "oversize");
    }

    #[test]
    fn garbage_is_undecodable() {
        let err = decode_task(b"\xc1\xc1 not msgpack", 1 << 20).unwrap_err();
        assert_eq!(err.kind().as_str(), "undecodable");
    }

    #[test]
    fn newer_version_is_named() {
        let mut t = task();
        t.v = 2;
        let err = decode_task(&encode(&t), 1 << 20).unwrap_err();
        assert_eq!(err.kind().as_str(), "unsupported_version");
        assert!(err.to_string().contains('2'), "{err}");
    }

    #[test]
    fn missing_field_is_named() {
        let bytes = rmp_serde::to_vec_named(
            &serde_json::json!({"v": 1, "id": "x", "batch": "b", "reply_to": "q"}),
        )
        .unwrap();
        let err = decode_task(&bytes, 1 << 20).unwrap_err();
        assert_eq!(err.kind().as_str(), "missing_field");
        assert!(err.to_string().contains("kind"), "{err}");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let bytes = rmp_serde::to_vec_named(&serde_json::json!({
            "v": 1, "id": "x", "batch": "b", "seq": 0, "kind": "echo", "reply_to": "q", "future_field": 7
        }))
        .unwrap();
        assert_eq!(decode_task(&bytes, 1 << 20).unwrap().kind, "echo");
    }

    #[test]
    fn bad_ids_and_timeouts_are_invalid() {
        let mut t = task();
        t.id = "x".repeat(MAX_ID_LEN + 1);
        assert_eq!(
            decode_task(&encode(&t), 1 << 20)
                .unwrap_err()
                .kind()
                .as_str(),
            "invalid_field"
        );
        let mut t = task();
        t.timeout_s = Some(-1.0);
        assert_eq!(
            decode_task(&encode(&t), 1 << 20)
                .unwrap_err()
                .kind()
                .as_str(),
            "invalid_field"
        );
    }

    /// A task map with one field replaced (or removed, with `None`), encoded with rmpv so that
    /// values serde would never produce (binary, integer keys, NaN) can be sent.
    fn raw_task(field: &str, value: Option<rmpv::Value>) -> Vec<u8> {
        use rmpv::Value as V;
        let mut fields: Vec<(V, V)> = vec![
            (V::from("v"), V::from(1)),
            (V::from("id"), V::from("t1")),
            (V::from("batch"), V::from("b1")),
            (V::from("seq"), V::from(0)),
            (V::from("kind"), V::from("echo")),
            (V::from("reply_to"), V::from("warren.results.b1")),
        ];
        fields.retain(|(k, _)| k.as_str() != Some(field));
        if let Some(value) = value {
            fields.push((V::from(field), value));
        }
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &V::Map(fields)).unwrap();
        bytes
    }

    fn refusal(bytes: &[u8]) -> (String, String) {
        let err = decode_task(bytes, 1 << 20).unwrap_err();
        (err.kind().as_str().to_string(), err.to_string())
    }

    #[test]
    fn binary_strings_are_refused_with_the_field_named() {
        for field in ["id", "batch", "kind", "reply_to", "token", "expires_at"] {
            let (kind, message) =
                refusal(&raw_task(field, Some(rmpv::Value::Binary(b"abc".to_vec()))));
            assert_eq!(kind, "invalid_field", "{field}: {message}");
            assert!(
                message.contains(field) && message.contains("binary"),
                "{field}: {message}"
            );
        }
        let labels = rmpv::Value::Map(vec![("k".into(), rmpv::Value::Binary(b"v".to_vec()))]);
        let (kind, message) = refusal(&raw_task("labels", Some(labels)));
        assert_eq!(kind, "invalid_field", "{message}");
        assert!(message.contains("labels"), "{message}");
    }

    #[test]
    fn args_outside_the_json_model_are_refused_with_the_path_named() {
        use rmpv::Value as V;
        let nan = V::Map(vec![(
            "x".into(),
            V::Array(vec![V::from(1), V::F64(f64::NAN)]),
        )]);
        let (kind, message) = refusal(&raw_task("args", Some(nan)));
        assert_eq!(kind, "invalid_field", "{message}");
        assert!(
            message.contains("args.x[1]") && message.contains("finite"),
            "{message}"
        );
        let int_key = V::Map(vec![(V::from(1), V::from("one"))]);
        let (kind, message) = refusal(&raw_task("args", Some(int_key)));
        assert_eq!(kind, "invalid_field", "{message}");
        assert!(
            message.contains("args") && message.contains("keys"),
            "{message}"
        );
        let binary = V::Map(vec![("data".into(), V::Binary(vec![0, 1]))]);
        let (kind, message) = refusal(&raw_task("args", Some(binary)));
        assert_eq!(kind, "invalid_field", "{message}");
        assert!(message.contains("args.data"), "{message}");
    }

    #[test]
    fn nil_in_an_optional_field_is_the_same_as_absent() {
        for field in [
            "args",
            "timeout_s",
            "labels",
            "submitted_at",
            "token",
            "max_retries",
            "expires_at",
            "retry_backoff_s",
        ] {
            let task = decode_task(&raw_task(field, Some(rmpv::Value::Nil)), 1 << 20);
            assert!(task.is_ok(), "nil {field}: {:?}", task.err());
        }
        // nil in a required field is invalid_field, whichever field it is (v and seq too).
        for field in ["v", "id", "batch", "kind", "reply_to", "seq"] {
            let (kind, message) = refusal(&raw_task(field, Some(rmpv::Value::Nil)));
            assert_eq!(kind, "invalid_field", "nil {field}: {message}");
            assert!(message.contains(field), "{message}");
        }
    }

    #[test]
    fn an_envelope_is_a_map_with_string_keys_never_read_by_position() {
        use rmpv::Value as V;
        // Integer keys 0..5 would be read as the struct's fields in order.
        let positional = V::Map(
            [
                V::from(1),
                V::from("t1"),
                V::from("b1"),
                V::from(0),
                V::from("echo"),
            ]
            .into_iter()
            .enumerate()
            .map(|(i, v)| (V::from(i as u64), v))
            .collect(),
        );
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &positional).unwrap();
        let (kind, message) = refusal(&bytes);
        assert_eq!(kind, "undecodable", "{message}");
        assert!(message.contains("string map key"), "{message}");
        // A valid envelope with an extra integer key is refused the same way, not as a
        // duplicate field.
        let mut extra = Vec::new();
        let mut fields = match rmpv::decode::read_value(&mut &raw_task("x", None)[..]).unwrap() {
            V::Map(fields) => fields,
            _ => unreachable!(),
        };
        fields.push((V::from(0), V::from("x")));
        rmpv::encode::write_value(&mut extra, &V::Map(fields)).unwrap();
        let (kind, message) = refusal(&extra);
        assert_eq!(kind, "undecodable", "{message}");
        assert!(!message.contains("duplicate"), "{message}");
    }

    #[test]
    fn wrong_types_name_the_field_and_garbage_is_undecodable() {
        let (kind, message) = refusal(&raw_task("timeout_s", Some("soon".into())));
        assert_eq!(kind, "invalid_field");
        assert!(message.contains("timeout_s"), "{message}");
        let (kind, message) = refusal(&raw_task("seq", Some(rmpv::Value::from(-1))));
        assert_eq!(kind, "invalid_field");
        assert!(message.contains("seq"), "{message}");
        let mut not_a_map = Vec::new();
        rmpv::encode::write_value(&mut not_a_map, &rmpv::Value::from("hello")).unwrap();
        assert_eq!(refusal(&not_a_map).0, "undecodable");
        let mut truncated = raw_task("args", Some(rmpv::Value::from("x".repeat(100))));
        truncated.truncate(truncated.len() - 10);
        assert_eq!(refusal(&truncated).0, "undecodable");
    }

    #[test]
    fn a_task_without_seq_is_refused() {
        let (kind, message) = refusal(&raw_task("seq", None));
        assert_eq!(kind, "missing_field");
        assert!(message.contains("seq"), "{message}");
    }

    #[test]
    fn status_names_match_serde() {
        for s in TaskStatus::ALL {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                Value::String(s.as_str().into())
            );
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9._-]{1,40}"
    }

    proptest! {
        /// Whatever bytes arrive, decoding returns an answer; it never panics.
        #[test]
        fn any_bytes_decode_to_a_task_or_a_named_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_task(&bytes, 1 << 20);
            let _ = decode_result(&bytes, 1 << 20);
            let _ = decode_manifest(&bytes, 1 << 20);
            let _ = decode_cancellation(&bytes);
        }

        /// Arbitrary maps (the shape of a real envelope, with wrong or missing fields) never panic.
        #[test]
        fn any_map_decodes_or_is_refused(map in proptest::collection::btree_map(
            prop_oneof![Just("v".to_string()), Just("id".to_string()), Just("batch".to_string()),
                        Just("kind".to_string()), Just("reply_to".to_string()), Just("args".to_string()),
                        Just("timeout_s".to_string()), Just("max_retries".to_string()), Just("expires_at".to_string()), text()],
            prop_oneof![any::<i64>().prop_map(Value::from), any::<f64>().prop_map(Value::from),
                        text().prop_map(Value::from), Just(Value::Null), any::<bool>().prop_map(Value::from)],
            0..10)) {
            let bytes = rmp_serde::to_vec_named(&map).unwrap();
            if let Ok(task) = decode_task(&bytes, 1 << 20) {
                prop_assert!(!task.id.is_empty() && !task.kind.is_empty());
            }
        }

        /// A valid task survives encoding and decoding unchanged.
        #[test]
        fn valid_tasks_round_trip(id in text(), batch in text(), kind in text(), seq in any::<u32>(),
                                  timeout in proptest::option::of(0.001f64..1e6), retries in proptest::option::of(0u32..=MAX_RETRIES),
                                  labels in proptest::collection::btree_map(text(), text(), 0..4)) {
            let task = TaskEnvelope {
                v: PROTOCOL_VERSION, id, batch, seq: Some(seq), kind, args: serde_json::json!({"n": seq}),
                timeout_s: timeout, labels, reply_to: "warren.results.b".into(), submitted_at: None,
                max_retries: retries, retry_backoff_s: None, expires_at: None, token: Some("t".into()),
            };
            prop_assert_eq!(decode_task(&encode(&task), 1 << 20).unwrap(), task);
        }
    }
}
