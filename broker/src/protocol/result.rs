//! The result envelope: the outcome of one task attempt, its status and its error kinds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::decode::{DecodeError, decode_checked};

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

/// Decodes a result envelope.
pub fn decode_result(bytes: &[u8], limit: usize) -> Result<ResultEnvelope, DecodeError> {
    decode_checked(bytes, limit, &[])
}
