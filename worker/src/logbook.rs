//! The worker's side of `warren logs`: one attempt record per attempt of a task, appended to
//! the logs stream with the attempt's outcome (before a retry is scheduled; alongside a result,
//! both confirmed before the task is acknowledged). One writer task publishes them: the records
//! that finish while it waits for a confirm go out together as one group (one message). While
//! more records may come (other tasks are in progress, or a slot is free for the next task), a
//! group is also held open until [`GROUP_INTERVAL`] after the last one went, so a busy worker
//! costs the broker one stream message per interval, not one per task, and a steady stream of
//! one task at a time about one per interval too. A record goes at once when none went in the
//! last interval, or when every slot is taken by a task waiting for its record (holding it would
//! only hold up the next task), or when it is a failure's and no other task is in progress.
//! Recording is best effort: a task never fails because of the logs stream.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, warn};
use warren_broker::BrokerError;
use warren_broker::protocol::{
    self, AttemptNext, AttemptRecord, MAX_GROUP_BYTES, MESSAGE_TYPE_ATTEMPT, MESSAGE_TYPE_ATTEMPTS,
    PROTOCOL_VERSION, TaskEnvelope, TaskError, TaskStatus, encode_attempt_group,
};
use warren_broker::publisher::{Publisher, message_properties};
use warren_broker::topology::logs_stream;

/// How long a record's publish may take before the worker goes on without it.
const RECORD_TIMEOUT: Duration = Duration::from_secs(5);
/// After a record could not be written, how long the next ones are not tried (so a logs stream
/// that is down costs tasks nothing, rather than a timeout each).
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// How long after a group went the next one is held open while more records may come. Every
/// stream message is a publish and a confirm of its own for the broker and the worker, so a busy
/// worker's records go in fewer, larger groups (about 25 records a message in the pipeline bench,
/// against 14 without the wait), and a worker taking one task at a time writes about one message
/// per interval rather than one per task (in the pipeline bench, a stream message per sequential
/// task cost 0.14 ms of each round trip). A task's acknowledgement waits at most this much
/// longer, and only while a slot is free or other tasks are in progress beside it.
const GROUP_INTERVAL: Duration = Duration::from_millis(5);

/// Where this worker's attempt records go: the writer task of one session's publisher.
#[derive(Debug)]
pub(crate) struct Logbook {
    host: String,
    health: Arc<Health>,
    /// Tasks admitted and not yet answered ([`Logbook::in_progress`]).
    in_progress: Arc<AtomicUsize>,
    queue: mpsc::UnboundedSender<Waiting>,
    _writer: AbortOnDropHandle<()>,
}

/// A task in progress, counted until dropped, so the writer knows whether more records may come.
pub(crate) struct InProgress(Arc<AtomicUsize>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether records can be written, and whether the worker already said they cannot.
#[derive(Debug, Default)]
struct Health {
    warned: AtomicBool,
    paused_until: Mutex<Option<Instant>>,
}

/// An entry waiting to be written, and who to tell once it is (or could not be).
type Waiting = (Entry, oneshot::Sender<()>);

/// One finished attempt, as [`Logbook::entry`] takes it.
pub(crate) struct Finished<'a> {
    pub task: &'a TaskEnvelope,
    /// The args the handler got; the record takes them.
    pub args: Value,
    pub attempt: u32,
    pub previous_errors: &'a [TaskError],
    pub status: TaskStatus,
    pub output: &'a Value,
    pub error: Option<&'a TaskError>,
    pub started_at: SystemTime,
    pub next: AttemptNext,
}

impl Logbook {
    /// A logbook for records written on `host`, published through `publisher`, for a worker that
    /// runs at most `slots` tasks at a time (and is sent at most that many unacknowledged).
    pub(crate) fn new(host: String, publisher: Publisher, slots: usize) -> Self {
        let health = Arc::new(Health::default());
        let in_progress = Arc::new(AtomicUsize::new(0));
        let (queue, waiting) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write(
            publisher,
            Arc::clone(&health),
            Arc::clone(&in_progress),
            slots,
            waiting,
        ));
        Self {
            host,
            health,
            in_progress,
            queue,
            _writer: AbortOnDropHandle::new(writer),
        }
    }

    /// Counts a task as in progress (admitted to run, not yet answered) until the guard drops.
    pub(crate) fn in_progress(&self) -> InProgress {
        self.in_progress.fetch_add(1, Ordering::Relaxed);
        InProgress(Arc::clone(&self.in_progress))
    }

    /// Writes the record of `attempt` (run by `worker`) to the logs stream and waits until the
    /// broker confirmed it; see [`Logbook::append`]. Nothing is written while records are paused
    /// after a failure.
    pub(crate) async fn record(&self, worker: &str, attempt: Finished<'_>) {
        let entry = self.entry(worker, attempt);
        self.append(entry).await;
    }

    /// The record of `attempt`, encoded, or `None` while records are paused after a failure.
    fn entry(&self, worker: &str, attempt: Finished<'_>) -> Option<Entry> {
        if self.health.paused() {
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
            args: attempt.args,
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
            failed: record.status != TaskStatus::Succeeded,
            task_id: record.task_id,
        })
    }

    /// Appends an entry to the logs stream and waits until the broker confirmed it (at most
    /// [`RECORD_TIMEOUT`] after the writer sent it). A failure is logged by the writer and ignored.
    async fn append(&self, entry: Option<Entry>) {
        let Some(entry) = entry else {
            return;
        };
        let (done, written) = oneshot::channel();
        if self.queue.send((entry, done)).is_ok() {
            // An error means the writer is gone (the session is ending): nothing to wait for.
            let _ = written.await;
        }
    }
}

/// The writer: takes the first waiting entry and gathers more (see [`group_ready`]), publishes
/// them as one message, and tells their tasks once the broker confirmed it. While it waits, the
/// next group gathers.
async fn write(
    publisher: Publisher,
    health: Arc<Health>,
    in_progress: Arc<AtomicUsize>,
    slots: usize,
    mut queue: mpsc::UnboundedReceiver<Waiting>,
) {
    let mut carried: Option<Waiting> = None;
    let mut last_sent: Option<Instant> = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match queue.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let hold_until = last_sent.map(|at| at + GROUP_INTERVAL);
        let mut group = Group::new(first);
        loop {
            while carried.is_none()
                && let Ok(next) = queue.try_recv()
            {
                carried = group.add(next).err();
            }
            let more_coming = more_coming(
                in_progress.load(Ordering::Relaxed),
                group.waiting.len(),
                slots,
                group.failure,
            );
            if group_ready(carried.is_some(), more_coming, hold_until, Instant::now()) {
                break;
            }
            let Some(until) = hold_until else { break };
            tokio::select! {
                next = queue.recv() => match next {
                    Some(next) => carried = group.add(next).err(),
                    None => break,
                },
                () = tokio::time::sleep_until(until.into()) => break,
            }
        }
        last_sent = Some(Instant::now());
        let (entries, waiting): (Vec<Entry>, Vec<oneshot::Sender<()>>) =
            group.waiting.into_iter().unzip();
        // Records queued before a failure are not tried again one by one.
        if !health.paused() {
            health.publish(&publisher, entries).await;
        }
        for done in waiting {
            let _ = done.send(());
        }
    }
}

/// Entries gathered for one message, at most [`MAX_GROUP_BYTES`] of them.
struct Group {
    waiting: Vec<Waiting>,
    bytes: usize,
    /// Holds the record of an attempt that did not succeed.
    failure: bool,
}

impl Group {
    fn new(first: Waiting) -> Self {
        Self {
            bytes: first.0.body.len(),
            failure: first.0.failed,
            waiting: vec![first],
        }
    }

    /// Adds `next`, or gives it back when it would make the group too large.
    fn add(&mut self, next: Waiting) -> Result<(), Waiting> {
        if self.bytes + next.0.body.len() > MAX_GROUP_BYTES {
            return Err(next);
        }
        self.bytes += next.0.body.len();
        self.failure |= next.0.failed;
        self.waiting.push(next);
        Ok(())
    }
}

/// Whether more records may join a group of `grouped` while `running` tasks of `slots` are in
/// progress: tasks in progress beyond those in the group (which wait for it) may add to it, and
/// so may a task yet to come while a slot is free. With every slot taken by a task waiting for
/// the group, holding it would only hold up the next task. A group with a failure's record is
/// not held for a task yet to come: that record is what someone reads next (`warren run`'s
/// summary of the failed items, right after the last result; `warren logs --failed`).
fn more_coming(running: usize, grouped: usize, slots: usize, failure: bool) -> bool {
    running > grouped || (running < slots && !failure)
}

/// Whether a group goes now: it is full, or no more records may come ([`more_coming`]), or the
/// interval since the last group (`hold_until`; none yet: no wait) is over.
fn group_ready(full: bool, more_coming: bool, hold_until: Option<Instant>, now: Instant) -> bool {
    full || !more_coming || hold_until.is_none_or(|until| now >= until)
}

impl Health {
    /// Publishes `entries` (one record, or a group) and waits for the confirm; on a failure,
    /// pauses records for [`PAUSE_AFTER_FAILURE`] and says why (a warning the first time).
    async fn publish(&self, publisher: &Publisher, mut entries: Vec<Entry>) {
        let (body, kind, first_task) = if entries.len() == 1 {
            let entry = entries.remove(0);
            (entry.body, MESSAGE_TYPE_ATTEMPT, entry.task_id)
        } else {
            let first = entries[0].task_id.clone();
            let bodies: Vec<Vec<u8>> = entries.into_iter().map(|e| e.body).collect();
            (encode_attempt_group(&bodies), MESSAGE_TYPE_ATTEMPTS, first)
        };
        let stream = logs_stream();
        let published = tokio::time::timeout(
            RECORD_TIMEOUT,
            publisher.publish(&stream, &body, message_properties(kind)),
        )
        .await
        .unwrap_or_else(|_| Err(BrokerError::ConfirmTimeout(RECORD_TIMEOUT)));
        let Err(e) = published else {
            return;
        };
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
            debug!(task_id = %first_task, "attempt record not kept: {why}");
        } else {
            warn!(task_id = %first_task, "attempt records are not kept, so `warren logs` will not show them: {why}; \
                trying again every {}s", PAUSE_AFTER_FAILURE.as_secs());
        }
    }
}

/// An attempt's record, encoded for the logs stream.
struct Entry {
    body: Vec<u8>,
    task_id: String,
    /// The attempt did not succeed: its record is read soon (a run's summary, `--failed`).
    failed: bool,
}

impl Health {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_may_come_while_other_tasks_run_or_a_slot_is_free() {
        // (running, in the group, slots, a failure in the group) -> more may come
        let rows = [
            ((1, 1, 1, false), false),
            ((1, 1, 64, false), true),
            ((1, 1, 64, true), false),
            ((2, 1, 2, false), true),
            ((2, 1, 64, true), true),
            ((2, 2, 2, false), false),
            ((64, 64, 64, false), false),
            ((64, 10, 64, false), true),
            ((0, 1, 4, false), true),
        ];
        for ((running, grouped, slots, failure), want) in rows {
            assert_eq!(
                more_coming(running, grouped, slots, failure),
                want,
                "{running} running, {grouped} grouped, {slots} slots, failure {failure}"
            );
        }
    }

    #[test]
    fn a_group_waits_only_for_records_that_are_coming_and_not_past_the_interval() {
        let now = Instant::now();
        let later = now + GROUP_INTERVAL;
        let earlier = now.checked_sub(GROUP_INTERVAL).unwrap_or(now);
        // (full, more coming, hold until) -> goes now
        let rows = [
            ((false, true, Some(later)), false),
            ((true, true, Some(later)), true),
            ((false, false, Some(later)), true),
            ((false, true, None), true),
            ((false, true, Some(now)), true),
            ((false, true, Some(earlier)), true),
        ];
        for ((full, more_coming, hold_until), want) in rows {
            assert_eq!(
                group_ready(full, more_coming, hold_until, now),
                want,
                "full {full}, more coming {more_coming}, hold until {hold_until:?}"
            );
        }
    }
}
