//! The worker's side of `warren logs`: one attempt record per attempt of a task, appended to
//! the logs stream with the attempt's outcome (before a retry is scheduled; alongside a result,
//! both confirmed before the task is acknowledged). Recording is best effort: a task never
//! waits on, nor fails because of, the logs stream.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tracing::{debug, warn};
use warren_broker::BrokerError;
use warren_broker::protocol::{
    self, AttemptNext, AttemptRecord, MESSAGE_TYPE_ATTEMPT, PROTOCOL_VERSION, TaskEnvelope,
    TaskError, TaskStatus,
};
use warren_broker::publisher::{Publisher, message_properties};
use warren_broker::topology::logs_stream;

/// How long a record's publish may take before the worker goes on without it.
const RECORD_TIMEOUT: Duration = Duration::from_secs(5);
/// After a record could not be written, how long the next ones are not tried (so a logs stream
/// that is down costs tasks nothing, rather than a timeout each).
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// Where this worker's attempt records go, and whether it already said it cannot write them.
#[derive(Debug)]
pub(crate) struct Logbook {
    host: String,
    warned: AtomicBool,
    paused_until: Mutex<Option<Instant>>,
}

/// One finished attempt, as [`Logbook::entry`] takes it.
pub(crate) struct Finished<'a> {
    pub task: &'a TaskEnvelope,
    pub args: &'a Value,
    pub attempt: u32,
    pub previous_errors: &'a [TaskError],
    pub status: TaskStatus,
    pub output: &'a Value,
    pub error: Option<&'a TaskError>,
    pub started_at: SystemTime,
    pub next: AttemptNext,
}

impl Logbook {
    /// A logbook for records written on `host`.
    pub(crate) fn new(host: String) -> Self {
        Self {
            host,
            warned: AtomicBool::new(false),
            paused_until: Mutex::new(None),
        }
    }

    /// The record of `attempt`, encoded now (so the attempt's values can move on), or `None` while
    /// records are paused after a failure. [`Logbook::append`] writes it.
    pub(crate) fn entry(&self, worker: &str, attempt: Finished<'_>) -> Option<Entry> {
        if self.paused() {
            debug!(task_id = %attempt.task.id, "attempt record not kept: the logs stream failed a moment ago");
            return None;
        }
        let finished_at = SystemTime::now();
        let record = AttemptRecord {
            v: PROTOCOL_VERSION,
            batch: attempt.task.batch.clone(),
            task_id: attempt.task.id.clone(),
            seq: attempt.task.seq,
            kind: attempt.task.kind.clone(),
            labels: attempt.task.labels.clone(),
            attempt: attempt.attempt,
            status: attempt.status,
            error: attempt.error.cloned(),
            next: attempt.next,
            args: attempt.args.clone(),
            output: attempt.output.clone(),
            worker: worker.to_string(),
            host: self.host.clone(),
            started_at: protocol::timestamp(attempt.started_at),
            finished_at: protocol::timestamp(finished_at),
            duration_s: finished_at
                .duration_since(attempt.started_at)
                .map_or(0.0, |d| d.as_secs_f64()),
            previous_errors: attempt.previous_errors.to_vec(),
        }
        .capped();
        Some(Entry {
            body: protocol::encode(&record),
            task_id: record.task_id,
        })
    }

    /// Appends an entry to the logs stream and waits for the broker's confirm, at most
    /// [`RECORD_TIMEOUT`]. A failure is logged (as a warning the first time) and ignored.
    pub(crate) async fn append(&self, publisher: &Publisher, entry: Option<Entry>) {
        let Some(entry) = entry else {
            return;
        };
        let stream = logs_stream();
        let published = tokio::time::timeout(
            RECORD_TIMEOUT,
            publisher.publish(
                &stream,
                &entry.body,
                message_properties(MESSAGE_TYPE_ATTEMPT),
            ),
        )
        .await
        .unwrap_or_else(|_| Err(BrokerError::ConfirmTimeout(RECORD_TIMEOUT)));
        if let Err(e) = published {
            if let Ok(mut until) = self.paused_until.lock() {
                *until = Some(Instant::now() + PAUSE_AFTER_FAILURE);
            }
            let why = match e {
                BrokerError::Unroutable { .. } => format!(
                    "the logs stream '{stream}' does not exist (a worker with configure permission on it, or \
                     any submitter, declares it)"
                ),
                other => other.to_string(),
            };
            if self.warned.swap(true, Ordering::Relaxed) {
                debug!(task_id = %entry.task_id, "attempt record not kept: {why}");
            } else {
                warn!(task_id = %entry.task_id, "attempt records are not kept, so `warren logs` will not show them: {why}; \
                    trying again every {}s", PAUSE_AFTER_FAILURE.as_secs());
            }
        }
    }
}

/// An attempt's record, encoded for the logs stream.
pub(crate) struct Entry {
    body: Vec<u8>,
    task_id: String,
}

impl Logbook {
    fn paused(&self) -> bool {
        let Ok(mut until) = self.paused_until.lock() else {
            return false;
        };
        match *until {
            Some(at) if Instant::now() < at => true,
            Some(_) => {
                *until = None;
                false
            }
            None => false,
        }
    }
}

/// The host this worker runs on: `NODE_NAME` (a Kubernetes node, from the downward API), else
/// the machine's host name.
pub(crate) fn host_name() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_default()
}
