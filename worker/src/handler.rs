//! The handler API: what a task handler receives, what it returns, and the registry of handlers.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use warren_broker::protocol::{ErrorKind, TaskError, TaskStatus};

/// A task as a handler sees it.
#[derive(Debug, Clone)]
pub struct Task {
    /// Task id.
    pub id: String,
    /// Batch id.
    pub batch: String,
    /// Handler name the task was sent to.
    pub kind: String,
    /// Arguments, as submitted.
    pub args: Value,
    /// Attempt number: 1 for the first run, +1 for each retry (`max_retries`) and each
    /// redelivery; the result's `attempt` is the same number.
    pub attempt: u32,
    /// Labels, as submitted.
    pub labels: BTreeMap<String, String>,
    /// Time limit of this attempt. A handler may stop at it by itself and return
    /// [`TaskFailure::timed_out`] with what it has; otherwise the runtime drops the handler's
    /// future [`TIMEOUT_GRACE`] later and reports a timeout without output.
    pub timeout: Duration,
}

impl Task {
    /// Deserializes the arguments into `T`; a mismatch is a `rejected` failure naming the problem.
    pub fn args_as<T: DeserializeOwned>(&self) -> Result<T, TaskFailure> {
        // The path names the offending field, e.g. `env.GDAL_CACHEMAX: invalid type: ...`.
        serde_path_to_error::deserialize(self.args.clone()).map_err(|e| {
            TaskFailure::rejected(
                ErrorKind::InvalidArgs,
                format!("arguments of a '{}' task: {e}", self.kind),
            )
        })
    }
}

/// How long after a task's limit the runtime drops a handler that did not stop by itself.
pub const TIMEOUT_GRACE: Duration = Duration::from_secs(5);

/// Why a handler did not succeed; becomes the result's status, error and output.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskFailure {
    /// `Failed` (the work ran and failed) or `Rejected` (the task could not be run at all).
    pub status: TaskStatus,
    /// Kind and message.
    pub error: TaskError,
    /// Whatever output is worth keeping (e.g. a failed command's stderr).
    pub output: Value,
    /// Trying again cannot help: the task's `max_retries` are not used.
    pub permanent: bool,
}

impl TaskFailure {
    /// The work ran and failed.
    pub fn failed(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: TaskStatus::Failed,
            error: TaskError::new(kind, message),
            output: Value::Null,
            permanent: false,
        }
    }

    /// The work ran and failed in a way another attempt would repeat: not retried.
    pub fn permanent(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            permanent: true,
            ..Self::failed(kind, message)
        }
    }

    /// The work ran past the task's limit and was stopped (see [`Task::timeout`]).
    pub fn timed_out(message: impl Into<String>) -> Self {
        Self {
            status: TaskStatus::TimedOut,
            ..Self::failed(ErrorKind::Timeout, message)
        }
    }

    /// The task could not be run (bad arguments, not allowed).
    pub fn rejected(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: TaskStatus::Rejected,
            error: TaskError::new(kind, message),
            output: Value::Null,
            permanent: true,
        }
    }

    /// A failure of one of Warren's own kinds, with the status that kind comes with
    /// ([`ErrorKind::status`]); a rejection is never retried.
    pub fn of(kind: ErrorKind, message: impl Into<String>) -> Self {
        let status = kind.status();
        Self {
            status,
            error: TaskError::new(kind, message),
            output: Value::Null,
            permanent: status == TaskStatus::Rejected,
        }
    }

    /// Attaches output to the failure.
    pub fn with_output(mut self, output: Value) -> Self {
        self.output = output;
        self
    }
}

/// What a handler returns: output on success, a failure otherwise.
pub type HandlerResult = Result<Value, TaskFailure>;
/// The boxed future a handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send + 'static>>;

/// Runs tasks of one kind. Any `Fn(Task) -> impl Future<Output = HandlerResult>` is a handler.
pub trait Handler: Send + Sync + 'static {
    /// Starts running `task`. Dropping the future must stop the work (timeouts rely on it).
    fn call(&self, task: Task) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(Task) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn call(&self, task: Task) -> HandlerFuture {
        Box::pin(self(task))
    }
}

/// Handlers by kind.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn Handler>>,
}

impl Registry {
    /// Registers `handler` for tasks of `kind`, replacing any earlier one.
    pub fn insert(&mut self, kind: impl Into<String>, handler: impl Handler) {
        self.handlers.insert(kind.into(), Arc::new(handler));
    }

    /// The handler of `kind`.
    pub fn get(&self, kind: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(kind).cloned()
    }

    /// Registered kinds, sorted (for messages and logs).
    pub fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = self.handlers.keys().cloned().collect();
        kinds.sort();
        kinds
    }
}
