//! The task envelope: what a task queue carries, the built-in kinds' arguments, and the checks
//! a worker makes before running one.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::MAX_ID_LEN;
use super::decode::{DecodeError, decode_checked, validate_id};
use super::strict::{self, nil_as_default};

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
