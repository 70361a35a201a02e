//! Handling one delivery: decode, run, publish the result, and only then acknowledge. Bad
//! messages get a `rejected` result where the task is identifiable, and are dead-lettered with
//! the reason in a header; nothing here can stop the worker.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_lite::FutureExt;
use lapin::message::Delivery;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::info;
use warren_broker::properties::Arrival;
use warren_broker::protocol::{
    self, AttemptNext, ErrorKind, PROTOCOL_VERSION, ResultEnvelope, TaskEnvelope, TaskError,
    TaskStatus,
};
use warren_broker::publisher::Publisher;
use warren_broker::topology::DELIVERY_LIMIT;

use crate::answer::{RefusedPublishes, deliver_result, reject_malformed, reject_with_result};
use crate::cancel::Cancellations;
use crate::handler::{Handler, Registry, TIMEOUT_GRACE, Task, TaskFailure};
use crate::logbook::{Finished, Logbook};
use crate::metrics::WorkerMetrics;
use crate::retry::{retry_wanted, schedule_retry};
use crate::settle::Settler;

/// What every delivery of a session shares.
pub(crate) struct Context {
    pub worker: String,
    pub queue: String,
    pub registry: Registry,
    /// The session's confirm channel, shared by every task: results, scheduled retries, dead
    /// letters, the logbook's groups and the retry queues' declares (a refused publish's
    /// retries open channels of their own).
    pub publisher: Publisher,
    /// The session's connection, for a fresh channel when publishes are refused.
    pub connection: Arc<lapin::Connection>,
    pub default_timeout: Duration,
    pub max_message_bytes: usize,
    /// None when metrics are off: nothing is recorded.
    pub metrics: Option<WorkerMetrics>,
    /// What `warren cancel` recorded, and the tasks running now.
    pub cancellations: Cancellations,
    /// How long a refused publish is retried before its delivery is given back to the queue.
    pub publish_retry_for: Duration,
    /// How long a publish waits for its confirm before it counts as refused.
    pub confirm_timeout: Duration,
    /// Deliveries whose publishes the broker refuses right now; new tasks wait while any do.
    pub refused: Arc<RefusedPublishes>,
    /// Where each attempt's record goes (`warren logs`).
    pub logbook: Logbook,
    /// Acknowledges the session's deliveries, or gives them back: every verdict goes through it.
    pub settler: Settler,
}

/// Processes one delivery to the end. `abandon` is cancelled when the delivery must be given back
/// unfinished (shutdown grace exceeded, or the connection it came on is gone).
// Long: the one ack decision of a delivery, read top to bottom: admit, run, record, then retry or
// answer (the steps are functions; what remains is their order).
pub(crate) async fn process(ctx: Arc<Context>, delivery: Delivery, abandon: CancellationToken) {
    if let Some(m) = &ctx.metrics {
        m.bytes_in.inc_by(delivery.data.len() as u64);
        if delivery.redelivered {
            m.redeliveries.inc();
        }
    }
    let arrival = Arrival::of(&delivery.properties);
    // One meaning everywhere (handler, result, log, metric): runs of the task so far, retries
    // and redeliveries alike. The delivery limit counts deliveries of this message only.
    let attempt = arrival.attempt();
    // The refusal, retry and answer steps are boxed (`Box::pin`): inlined, they made every
    // delivery's future 9 KB, copied on each spawn; boxed, it is 3 KB.
    let mut task = match protocol::decode_task(&delivery.data, ctx.max_message_bytes) {
        Ok(task) => task,
        Err(error) => return Box::pin(reject_malformed(&ctx, delivery, &error, arrival)).await,
    };
    let handler = ctx.registry.get(&task.kind);
    let expired = task.expired(SystemTime::now());
    let limit_reached = arrival.delivery >= u32::try_from(DELIVERY_LIMIT).unwrap_or(u32::MAX);
    // Registering the task as running is also how a cancellation is found.
    let running = (!limit_reached && handler.is_some() && !expired)
        .then(|| {
            let submitter = warren_broker::publisher::verified_user(&delivery.properties);
            ctx.cancellations.start(&task.batch, &task.id, submitter)
        })
        .flatten();
    let refusal = admit(limit_reached, handler.is_some(), expired, running.is_none());
    let (Ok(()), Some(handler), Some(running)) = (refusal, handler, running) else {
        let refusal = refusal.err().unwrap_or(Refusal::Cancelled);
        return Box::pin(refuse(&ctx, delivery, &task, &arrival, refusal, &abandon)).await;
    };
    // From here the task runs; the logbook holds records together while others are in progress.
    let _in_progress = ctx.logbook.in_progress();
    // From here `kind` has a registered handler, so as a metric label its values stay few.
    if let Some(m) = &ctx.metrics {
        m.started.with_label_values(&[task.kind.as_str()]).inc();
        if attempt > 1 {
            m.retries.with_label_values(&[task.kind.as_str()]).inc();
        }
    }

    let timeout = task
        .timeout_s
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .unwrap_or(ctx.default_timeout);
    let started_at = SystemTime::now();
    info!(task_id = %task.id, batch = %task.batch, kind = %task.kind, attempt, "task started");
    // The attempt's record shows the args the handler got (an exec task's argv and cwd).
    let args = task.args.clone();
    let handler_task = Task {
        id: task.id.clone(),
        batch: task.batch.clone(),
        kind: task.kind.clone(),
        args: std::mem::take(&mut task.args),
        attempt,
        labels: task.labels.clone(),
        timeout,
    };
    let Some(outcome) = run_handler(
        &ctx,
        &delivery,
        handler,
        handler_task,
        &task,
        &running.token,
        &abandon,
    )
    .await
    else {
        return;
    };
    let Attempt {
        status,
        output,
        mut error,
        permanent,
    } = attempt_of(outcome, &task.kind, &task.batch, timeout);
    let retry = retry_wanted(
        status,
        permanent,
        task.max_retries.unwrap_or(0),
        arrival.retries,
    );
    // The attempt's record, for the retry or the result (whose fields it then reads).
    let finished = |next, output, error| Finished {
        task: &task,
        args,
        attempt,
        previous_errors: &arrival.previous_errors,
        status,
        output,
        error,
        started_at,
        next,
    };
    if retry && let Some(error) = error.take() {
        let record = finished(AttemptNext::Retry, &output, Some(&error));
        ctx.logbook.record(&ctx.worker, record).await;
        tokio::select! {
            () = Box::pin(schedule_retry(&ctx, &delivery, &task, &arrival, &error)) => {}
            () = abandon.cancelled() => {}
        }
        return;
    }
    let result = result_of(&ctx, &task, &arrival, started_at, status, output, error);
    // Encoded only once polled, which `deliver_result` does after the result's publish is on
    // its way: the record is not on the result's path.
    let record = async {
        let record = finished(AttemptNext::Result, &result.output, result.error.as_ref());
        ctx.logbook.record(&ctx.worker, record).await;
    };
    info!(task_id = %task.id, batch = %task.batch, status = status.as_str(), "task finished");
    if let Some(m) = &ctx.metrics {
        m.finished
            .with_label_values(&[task.kind.as_str(), status.as_str()])
            .inc();
        let seconds = started_at.elapsed().map_or(0.0, |d| d.as_secs_f64());
        m.duration
            .with_label_values(&[task.kind.as_str()])
            .observe(seconds);
    }
    tokio::select! {
        () = Box::pin(deliver_result(&ctx, &delivery, &result, &task.reply_to, record)) => {}
        () = abandon.cancelled() => {}
    }
}

/// Runs the handler, bounded by its timeout (plus a grace) and stopped when the
/// task is cancelled. `None` when the delivery was abandoned meanwhile: it is back in the queue.
async fn run_handler(
    ctx: &Context,
    delivery: &Delivery,
    handler: Arc<dyn Handler>,
    task: Task,
    envelope: &TaskEnvelope,
    cancelled: &CancellationToken,
    abandon: &CancellationToken,
) -> Option<HandlerOutcome> {
    let _in_flight = ctx.metrics.as_ref().map(InFlight::start);
    let limit = task.timeout + TIMEOUT_GRACE;
    // A panic in user code is caught here and becomes a failed result instead of a message that
    // is never acknowledged. The handler runs within this delivery's task (a task of its own
    // cost a spawn and a wake-up per delivery); dropping it stops it.
    let handler_run = std::panic::AssertUnwindSafe(handler.call(task)).catch_unwind();
    Some(tokio::select! {
        outcome = tokio::time::timeout(limit, handler_run) => match outcome {
            Ok(Ok(result)) => HandlerOutcome::Finished(result),
            Ok(Err(panic)) => HandlerOutcome::Panicked(panic_message(&*panic)),
            Err(_) => HandlerOutcome::TimedOut,
        },
        // Dropping the handler's future stops it; an exec command's process group is killed.
        () = cancelled.cancelled() => HandlerOutcome::Cancelled,
        () = abandon.cancelled() => {
            info!(task_id = %envelope.id, batch = %envelope.batch, "task abandoned unfinished; returning it to the queue");
            let _ = ctx.settler.requeue(delivery).await;
            if let Some(m) = &ctx.metrics {
                m.returned.inc();
            }
            return None;
        }
    })
}

/// What a panic said: its message when it was given one (`panic!` with a text or a format).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Why a decoded task is answered without running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Its last allowed delivery: it crashes or exhausts its workers.
    TooManyAttempts,
    /// No handler of its kind here.
    UnknownKind,
    /// Its `expires_at` has passed.
    Expired,
    /// Its batch or the task was cancelled.
    Cancelled,
}

/// Whether a decoded task may run, in order of precedence.
fn admit(
    limit_reached: bool,
    has_handler: bool,
    expired: bool,
    cancelled: bool,
) -> Result<(), Refusal> {
    match (limit_reached, has_handler, expired, cancelled) {
        (true, ..) => Err(Refusal::TooManyAttempts),
        (_, false, ..) => Err(Refusal::UnknownKind),
        (_, _, true, _) => Err(Refusal::Expired),
        (_, _, _, true) => Err(Refusal::Cancelled),
        _ => Ok(()),
    }
}

/// Answers a task that is not run. A task on its last delivery or of an unknown kind is also
/// dead-lettered; an expired or cancelled one only gets its result.
async fn refuse(
    ctx: &Context,
    delivery: Delivery,
    task: &TaskEnvelope,
    arrival: &Arrival,
    refusal: Refusal,
    abandon: &CancellationToken,
) {
    let (kind, message) = match refusal {
        // RabbitMQ dead-letters the task silently after this delivery; answering now means a
        // task that keeps killing its workers still gets a result and `wait` does not hang.
        Refusal::TooManyAttempts => (
            ErrorKind::TooManyAttempts,
            format!(
                "task was delivered {} times without finishing (does it crash or exhaust its worker?); \
                     not run again, dead-lettered",
                arrival.delivery
            ),
        ),
        Refusal::UnknownKind => (
            ErrorKind::UnknownKind,
            format!(
                "no handler for kind '{}' on this worker (it has: {}){}",
                task.kind,
                ctx.registry.kinds().join(", "),
                if task.kind == "exec" {
                    "; it runs no commands: start it with --allow-exec PROGRAM"
                } else {
                    ""
                }
            ),
        ),
        Refusal::Expired => (
            ErrorKind::Expired,
            format!(
                "the task expired at {}, before a worker could run it; not run",
                task.expires_at.as_deref().unwrap_or_default()
            ),
        ),
        Refusal::Cancelled => (
            ErrorKind::Cancelled,
            format!(
                "batch {} or this task was cancelled (warren cancel) before it ran; not run",
                task.batch
            ),
        ),
    };
    // The status comes with the kind (docs/protocol.md's table of kinds).
    let status = kind.status();
    let error = TaskError::new(kind, message);
    let result = result_of(
        ctx,
        task,
        arrival,
        SystemTime::now(),
        status,
        Value::Null,
        Some(error.clone()),
    );
    if matches!(refusal, Refusal::TooManyAttempts | Refusal::UnknownKind) {
        return reject_with_result(ctx, delivery, Some(result), &task.reply_to, &error).await;
    }
    info!(task_id = %task.id, batch = %task.batch, status = status.as_str(), "task not run: {}", error.message);
    tokio::select! {
        () = deliver_result(ctx, &delivery, &result, &task.reply_to, async {}) => {}
        () = abandon.cancelled() => {}
    }
}

/// How a handler's run ended.
#[derive(Debug)]
enum HandlerOutcome {
    /// It returned.
    Finished(crate::handler::HandlerResult),
    /// It panicked (the panic's message).
    Panicked(String),
    /// It ran past its limit (and the grace) and was dropped.
    TimedOut,
    /// `warren cancel` stopped it.
    Cancelled,
}

/// What an attempt comes to: the result's status, output and error, and whether retrying could
/// not help.
#[derive(Debug, PartialEq)]
struct Attempt {
    status: TaskStatus,
    output: Value,
    error: Option<TaskError>,
    permanent: bool,
}

/// The attempt a handler outcome makes, for a task of `kind` in `batch` with `limit`.
fn attempt_of(outcome: HandlerOutcome, kind: &str, batch: &str, limit: Duration) -> Attempt {
    let failed = |kind: ErrorKind, message: String, permanent| Attempt {
        status: kind.status(),
        output: Value::Null,
        error: Some(TaskError::new(kind, message)),
        permanent,
    };
    match outcome {
        HandlerOutcome::Finished(Ok(output)) => Attempt {
            status: TaskStatus::Succeeded,
            output,
            error: None,
            permanent: false,
        },
        HandlerOutcome::Finished(Err(TaskFailure {
            status,
            error,
            output,
            permanent,
        })) => Attempt {
            status,
            output,
            error: Some(error),
            permanent,
        },
        HandlerOutcome::Panicked(why) => failed(
            ErrorKind::HandlerPanicked,
            format!("the '{kind}' handler panicked: {why}"),
            false,
        ),
        HandlerOutcome::TimedOut => failed(
            ErrorKind::Timeout,
            format!("task ran longer than its limit of {limit:?} and was killed"),
            false,
        ),
        HandlerOutcome::Cancelled => failed(
            ErrorKind::Cancelled,
            format!(
                "batch {batch} or this task was cancelled (warren cancel) while it ran; stopped"
            ),
            true,
        ),
    }
}

fn result_of(
    ctx: &Context,
    task: &TaskEnvelope,
    arrival: &Arrival,
    started_at: SystemTime,
    status: TaskStatus,
    output: Value,
    error: Option<TaskError>,
) -> ResultEnvelope {
    ResultEnvelope {
        v: PROTOCOL_VERSION,
        task_id: task.id.clone(),
        batch: task.batch.clone(),
        seq: task.seq,
        kind: task.kind.clone(),
        status,
        output,
        error,
        worker: ctx.worker.clone(),
        attempt: arrival.attempt(),
        previous_errors: arrival.previous_errors.clone(),
        replayed: arrival.replayed,
        labels: task.labels.clone(),
        started_at: protocol::timestamp(started_at),
        finished_at: protocol::timestamp(SystemTime::now()),
        token: task.token.clone(),
    }
}

/// Counts a running task in the in-flight gauge until dropped, on every way out of `process`.
struct InFlight<'a>(&'a WorkerMetrics);

impl<'a> InFlight<'a> {
    fn start(health: &'a WorkerMetrics) -> Self {
        health.in_flight.inc();
        Self(health)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

#[cfg(test)]
mod decisions {
    use super::*;

    #[test]
    fn a_task_is_admitted_only_when_nothing_stands_in_the_way() {
        // (limit reached, handler, expired, cancelled) -> decision; earlier reasons win.
        let rows = [
            ((false, true, false, false), Ok(())),
            ((true, true, false, false), Err(Refusal::TooManyAttempts)),
            ((true, false, true, true), Err(Refusal::TooManyAttempts)),
            ((false, false, true, true), Err(Refusal::UnknownKind)),
            ((false, true, true, true), Err(Refusal::Expired)),
            ((false, true, false, true), Err(Refusal::Cancelled)),
        ];
        for ((limit, handler, expired, cancelled), want) in rows {
            assert_eq!(
                admit(limit, handler, expired, cancelled),
                want,
                "{limit} {handler} {expired} {cancelled}"
            );
        }
    }

    #[test]
    fn outcomes_become_statuses_and_only_fixable_failures_are_retried() {
        let limit = Duration::from_secs(5);
        let rows: Vec<(HandlerOutcome, TaskStatus, Option<&str>, bool)> = vec![
            (
                HandlerOutcome::Finished(Ok(Value::from(1))),
                TaskStatus::Succeeded,
                None,
                false,
            ),
            (
                HandlerOutcome::Finished(Err(TaskFailure::failed("exit_status", "x"))),
                TaskStatus::Failed,
                Some("exit_status"),
                false,
            ),
            (
                HandlerOutcome::Finished(Err(TaskFailure::permanent("exit_status", "x"))),
                TaskStatus::Failed,
                Some("exit_status"),
                true,
            ),
            (
                HandlerOutcome::Finished(Err(TaskFailure::rejected("not_allowed", "x"))),
                TaskStatus::Rejected,
                Some("not_allowed"),
                true,
            ),
            (
                HandlerOutcome::Finished(Err(TaskFailure::timed_out("x"))),
                TaskStatus::TimedOut,
                Some("timeout"),
                false,
            ),
            (
                HandlerOutcome::Panicked("boom".into()),
                TaskStatus::Failed,
                Some("handler_panicked"),
                false,
            ),
            (
                HandlerOutcome::TimedOut,
                TaskStatus::TimedOut,
                Some("timeout"),
                false,
            ),
            (
                HandlerOutcome::Cancelled,
                TaskStatus::Cancelled,
                Some("cancelled"),
                true,
            ),
        ];
        for (outcome, status, kind, permanent) in rows {
            let attempt = attempt_of(outcome, "exec", "b", limit);
            assert_eq!(attempt.status, status);
            assert_eq!(attempt.error.as_ref().map(|e| e.kind.as_str()), kind);
            assert_eq!(attempt.permanent, permanent, "{status:?} {kind:?}");
        }
        // (status, permanent, max_retries, retries so far) -> retried
        let retries = [
            ((TaskStatus::Failed, false, 2, 0), true),
            ((TaskStatus::Failed, false, 2, 1), true),
            ((TaskStatus::Failed, false, 2, 2), false),
            ((TaskStatus::TimedOut, false, 1, 0), true),
            ((TaskStatus::Failed, true, 5, 0), false),
            ((TaskStatus::Rejected, false, 5, 0), false),
            ((TaskStatus::Cancelled, false, 5, 0), false),
            ((TaskStatus::Failed, false, 0, 0), false),
        ];
        for ((status, permanent, max, so_far), want) in retries {
            assert_eq!(
                retry_wanted(status, permanent, max, so_far),
                want,
                "{status:?} {permanent} {max} {so_far}"
            );
        }
    }
}
