//! Handling one delivery: decode, run, publish the result, and only then acknowledge. Bad
//! messages get a `rejected` result where the task is identifiable, and are dead-lettered with
//! the reason in a header; nothing here can stop the worker.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};
use warren_broker::BrokerError;
use warren_broker::properties::{
    Arrival, TaskIdentity, dead_letter_properties, result_properties, retry_properties,
};
use warren_broker::protocol::DEAD_REASON_RESULT_QUEUE_MISSING;
use warren_broker::protocol::{
    self, AttemptNext, DecodeError, ErrorKind, PROTOCOL_VERSION, ResultEnvelope, TaskEnvelope,
    TaskError, TaskStatus,
};
use warren_broker::publisher::Publisher;
use warren_broker::topology::{DELIVERY_LIMIT, dead_letter_queue, declare_retry_queue};

use crate::cancel::Cancellations;
use crate::handler::{Registry, TIMEOUT_GRACE, Task, TaskFailure};
use crate::logbook::{Finished, Logbook};
use crate::metrics::WorkerMetrics;

/// What every delivery of a session shares.
pub(crate) struct Context {
    pub worker: String,
    pub queue: String,
    pub registry: Registry,
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
    /// Deliveries whose publishes the broker refuses right now; new tasks wait while any do.
    pub refused: Arc<RefusedPublishes>,
    /// Where each attempt's record goes (`warren logs`).
    pub logbook: Logbook,
}

/// Processes one delivery to the end. `abandon` is cancelled when the delivery must be given back
/// unfinished (shutdown grace exceeded, or the connection it came on is gone).
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
    let mut task = match protocol::decode_task(&delivery.data, ctx.max_message_bytes) {
        Ok(task) => task,
        Err(error) => return reject_malformed(&ctx, delivery, &error, arrival).await,
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
        return refuse(&ctx, delivery, &task, &arrival, refusal, &abandon).await;
    };
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
    let _in_flight = ctx.metrics.as_ref().map(InFlight::start);
    // The handler runs as its own task so that a panic in user code becomes a failed result
    // instead of a message that is never acknowledged; dropping the handle aborts it.
    let handler_run = AbortOnDropHandle::new(tokio::spawn(handler.call(handler_task)));
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(timeout + TIMEOUT_GRACE, handler_run) => match outcome {
            Ok(Ok(result)) => HandlerOutcome::Finished(result),
            Ok(Err(join_error)) => HandlerOutcome::Panicked(join_error.to_string()),
            Err(_) => HandlerOutcome::TimedOut,
        },
        // Dropping the handler's future stops it; an exec command's process group is killed.
        () = running.token.cancelled() => HandlerOutcome::Cancelled,
        () = abandon.cancelled() => {
            info!(task_id = %task.id, batch = %task.batch, "task abandoned unfinished; returning it to the queue");
            let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
            if let Some(m) = &ctx.metrics {
                m.returned.inc();
            }
            return;
        }
    };
    let Attempt {
        status,
        output,
        error,
        permanent,
    } = attempt_of(outcome, &task.kind, &task.batch, timeout);
    let retry = error.as_ref().filter(|_| {
        retry_wanted(
            status,
            permanent,
            task.max_retries.unwrap_or(0),
            arrival.retries,
        )
    });
    let finished = Finished {
        task: &task,
        args: &args,
        attempt,
        previous_errors: &arrival.previous_errors,
        status,
        output: &output,
        error: error.as_ref(),
        started_at,
        next: if retry.is_some() {
            AttemptNext::Retry
        } else {
            AttemptNext::Result
        },
    };
    ctx.logbook
        .record(&ctx.publisher, &ctx.worker, finished)
        .await;
    if let Some(error) = retry {
        tokio::select! {
            () = schedule_retry(&ctx, &delivery, &task, &arrival, error) => {}
            () = abandon.cancelled() => {}
        }
        return;
    }
    let result = result_of(&ctx, &task, &arrival, started_at, status, output, error);
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
        () = deliver_result(&ctx, &delivery, &result, &task.reply_to) => {}
        () = abandon.cancelled() => {}
    }
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
        () = deliver_result(ctx, &delivery, &result, &task.reply_to) => {}
        () = abandon.cancelled() => {}
    }
}

/// How a handler's run ended.
#[derive(Debug)]
enum HandlerOutcome {
    /// It returned.
    Finished(crate::handler::HandlerResult),
    /// It panicked (the message of the join error).
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

/// Whether an attempt that ended with `status` is tried again: only failures and timeouts that
/// are not final, while the task's `max_retries` are not used up.
fn retry_wanted(
    status: TaskStatus,
    permanent: bool,
    max_retries: u32,
    retries_so_far: u32,
) -> bool {
    matches!(status, TaskStatus::Failed | TaskStatus::TimedOut)
        && !permanent
        && max_retries.saturating_sub(retries_so_far) > 0
}

/// Sets a failed attempt aside in a delay queue for its backoff (the broker holds it, not this
/// worker), with the attempt's error added to the task's history, then acknowledges it. The
/// delay queue dead-letters it back into the task queue when the delay is over.
async fn schedule_retry(
    ctx: &Context,
    delivery: &Delivery,
    task: &TaskEnvelope,
    arrival: &Arrival,
    error: &TaskError,
) {
    let retry = arrival.retries + 1;
    let delay = retry_delay(task.retry_backoff_s.unwrap_or(1.0), retry);
    // The history travels in a header, which must fit one AMQP frame: keep it small.
    let mut errors = arrival.previous_errors.clone();
    let mut latest = error.clone();
    if let Some((cut, _)) = latest.message.char_indices().nth(MAX_KEPT_ERROR_CHARS) {
        latest.message.truncate(cut);
        latest.message.push('…');
    }
    errors.push(latest);
    if errors.len() > MAX_KEPT_ERRORS {
        errors.drain(..errors.len() - MAX_KEPT_ERRORS);
    }
    let history = serde_json::to_string(&errors).unwrap_or_default();
    let properties = retry_properties(&delivery.properties, retry, &history);
    let published = async {
        let queue = declare_retry_queue(ctx.publisher.channel(), &ctx.queue, delay).await?;
        ctx.publish_patiently(&queue, &delivery.data, properties)
            .await
    };
    if let Err(e) = published.await {
        return give_back(
            ctx,
            delivery,
            &task.id,
            &format!("cannot set the task aside for a retry ({e})"),
        )
        .await;
    }
    info!(task_id = %task.id, batch = %task.batch, retry, of = task.max_retries.unwrap_or(0), "attempt failed ({}); retrying in {delay:.1?}", error.kind);
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        warn!(task_id = %task.id, "retry scheduled but the ack failed ({e}); the task may run again");
    }
}

/// Earlier attempts' errors kept for the final result (the most recent ones).
const MAX_KEPT_ERRORS: usize = 20;
/// Characters kept of each earlier error's message.
const MAX_KEPT_ERROR_CHARS: usize = 1000;

/// The pause before retry number `retry` (1-based): `backoff_s` doubled for each retry after the
/// first, at most an hour, with up to half of it taken off at random so that tasks that failed
/// together do not all come back together. Rounded to 100 ms, as each distinct delay has a queue.
fn retry_delay(backoff_s: f64, retry: u32) -> Duration {
    let full = (backoff_s * 2f64.powi(retry.saturating_sub(1).min(30) as i32))
        .min(protocol::MAX_RETRY_DELAY_S);
    let jittered = full * (0.5 + fastrand::f64() * 0.5);
    Duration::from_millis(((jittered * 10.0).round().max(1.0) as u64) * 100)
}

/// Publishes a result, then acknowledges the task. A result whose queue is gone (expired batch) is
/// dead-lettered instead, so it is not lost either.
async fn deliver_result(
    ctx: &Context,
    delivery: &Delivery,
    result: &ResultEnvelope,
    reply_to: &str,
) {
    let body = protocol::encode(result);
    match ctx
        .publish_patiently(reply_to, &body, result_properties(result))
        .await
    {
        Ok(()) => ctx.count_published(body.len()),
        Err(BrokerError::Unroutable { .. }) => {
            let detail =
                format!("result queue '{reply_to}' does not exist (batch expired or deleted)");
            warn!(task_id = %result.task_id, batch = %result.batch, "{detail}; dead-lettering the result");
            let props = dead_letter_properties(
                result_properties(result),
                DEAD_REASON_RESULT_QUEUE_MISSING,
                &detail,
                &ctx.queue,
                &ctx.worker,
            );
            if let Err(e) = ctx
                .publish_patiently(&dead_letter_queue(&ctx.queue), &body, props)
                .await
            {
                return give_back(
                    ctx,
                    delivery,
                    &result.task_id,
                    &format!("cannot dead-letter the result ({e})"),
                )
                .await;
            }
            ctx.count_dead_letter(DEAD_REASON_RESULT_QUEUE_MISSING, body.len());
        }
        Err(e) => {
            return give_back(
                ctx,
                delivery,
                &result.task_id,
                &format!("cannot publish the result ({e})"),
            )
            .await;
        }
    }
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        warn!(task_id = %result.task_id, "result published but the ack failed ({e}); the task may run again");
    }
}

/// A message that is not a valid task: answer it if it can be identified, then dead-letter it.
async fn reject_malformed(
    ctx: &Context,
    delivery: Delivery,
    error: &DecodeError,
    arrival: Arrival,
) {
    let task_error = TaskError::new(error.kind(), error.to_string());
    let (result, reply_to) = match TaskIdentity::of(&delivery.properties) {
        Some(identity) => {
            let now = protocol::timestamp(SystemTime::now());
            let result = ResultEnvelope {
                v: PROTOCOL_VERSION,
                task_id: identity.task_id,
                batch: identity.batch,
                seq: identity.seq,
                kind: identity.kind,
                status: TaskStatus::Rejected,
                output: Value::Null,
                error: Some(task_error.clone()),
                worker: ctx.worker.clone(),
                attempt: arrival.attempt(),
                previous_errors: arrival.previous_errors.clone(),
                replayed: arrival.replayed,
                labels: Default::default(),
                started_at: now.clone(),
                finished_at: now,
                token: identity.token,
            };
            (Some(result), identity.reply_to)
        }
        None => (None, String::new()),
    };
    reject_with_result(ctx, delivery, result, &reply_to, &task_error).await;
}

/// Publishes the rejection result (when there is one), dead-letters the original message with the
/// reason, and acknowledges it only once the dead letter is confirmed.
async fn reject_with_result(
    ctx: &Context,
    delivery: Delivery,
    result: Option<ResultEnvelope>,
    reply_to: &str,
    error: &TaskError,
) {
    let task_id = result.as_ref().map_or("", |r| r.task_id.as_str());
    let batch = result.as_ref().map_or("", |r| r.batch.as_str());
    warn!(reason = %error.kind, task_id, batch, "dead-lettering a message: {}", error.message);
    if let Some(result) = &result {
        match ctx
            .publish_patiently(
                reply_to,
                &protocol::encode(result),
                result_properties(result),
            )
            .await
        {
            // The dead letter below keeps the message; a missing result queue is not a reason to wait.
            Ok(()) | Err(BrokerError::Unroutable { .. }) => {}
            Err(e) => {
                return give_back(
                    ctx,
                    &delivery,
                    task_id,
                    &format!("cannot publish the rejection ({e})"),
                )
                .await;
            }
        }
    }
    let props = dead_letter_properties(
        delivery.properties.clone(),
        &error.kind,
        &error.message,
        &ctx.queue,
        &ctx.worker,
    );
    match ctx
        .publish_patiently(&dead_letter_queue(&ctx.queue), &delivery.data, props)
        .await
    {
        Ok(()) => {
            ctx.count_dead_letter(&error.kind, delivery.data.len());
            if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                debug!("ack after dead-lettering failed ({e}); it will be dead-lettered again");
            }
        }
        Err(e) => {
            give_back(
                ctx,
                &delivery,
                task_id,
                &format!("cannot dead-letter the message ({e})"),
            )
            .await
        }
    }
}

/// Ends a delivery whose outcome could not be stored: it goes back to the queue for another
/// worker (or this one, later), so its prefetch slot is never held. If the channel is gone the
/// nack fails, and the broker requeues the delivery by itself.
async fn give_back(ctx: &Context, delivery: &Delivery, task_id: &str, why: &str) {
    warn!(
        task_id,
        "{why}; returning the task to the queue to be run again"
    );
    let _ = delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await;
    if let Some(m) = &ctx.metrics {
        m.returned.inc();
    }
}

/// Deliveries whose publishes the broker is refusing (publisher-confirm nacks, as while a quorum
/// queue elects a leader or a queue is full with `reject-publish`). While any is, the worker
/// starts no new task: there would be nowhere to put its result.
#[derive(Debug, Default)]
pub(crate) struct RefusedPublishes {
    now: std::sync::atomic::AtomicUsize,
}

impl RefusedPublishes {
    /// Whether some publish is being refused right now.
    pub(crate) fn any(&self) -> bool {
        self.now.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    /// Waits until no publish is refused (a task about to start waits here).
    pub(crate) async fn wait_until_clear(&self) {
        while self.any() {
            tokio::time::sleep(REFUSED_POLL).await;
        }
    }
}

/// How often a task waiting to start checks whether results are taken again.
const REFUSED_POLL: Duration = Duration::from_millis(250);
/// First pause after a refused publish; doubled on each refusal up to [`REFUSED_BACKOFF_CAP`].
const REFUSED_BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest pause between two tries of a refused publish.
const REFUSED_BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Marks one delivery as refused until dropped, on every way out of a retry loop.
struct Refused<'a> {
    ctx: &'a Context,
}

impl<'a> Refused<'a> {
    fn start(ctx: &'a Context, queue: &str, error: &BrokerError) -> Self {
        let before = ctx
            .refused
            .now
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if before == 0 {
            warn!(
                "RabbitMQ refuses publishes to '{queue}' ({error}); retrying for up to {:?} and \
                 starting no new task meanwhile (a quorum queue electing a leader, a full queue, \
                 or a node down)",
                ctx.publish_retry_for
            );
        }
        if let Some(m) = &ctx.metrics {
            m.publishes_refused_now.inc();
            m.set_problem(
                "publishes refused",
                Some(format!("RabbitMQ refuses publishes to '{queue}': {error}")),
            );
        }
        Self { ctx }
    }
}

impl Drop for Refused<'_> {
    fn drop(&mut self) {
        let before = self
            .ctx
            .refused
            .now
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(m) = &self.ctx.metrics {
            m.publishes_refused_now.dec();
        }
        if before == 1 {
            if let Some(m) = &self.ctx.metrics {
                m.set_problem("publishes refused", None);
            }
            info!("RabbitMQ takes publishes again; starting tasks again");
        }
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

impl Context {
    /// Publishes with confirms; a publish the broker refuses (a nack, or a queue that cannot take
    /// it now) is tried again with backoff for up to `publish_retry_for`, counted from the first
    /// refusal. A lost channel is not retried here: its deliveries go back to the queue anyway.
    /// A missing queue (`Unroutable`) is returned at once for the caller to decide.
    async fn publish_patiently(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let mut refused: Option<(Refused<'_>, tokio::time::Instant)> = None;
        let mut pause = REFUSED_BACKOFF_START;
        loop {
            let published = match &refused {
                None => {
                    self.publisher
                        .publish(queue, body, properties.clone())
                        .await
                }
                // A quorum queue that refused a channel's publish (reject-publish) keeps refusing
                // that channel until it hears the queue is below its limit, which never comes when
                // the limit is removed: each retry goes through a fresh channel.
                Some(_) => {
                    self.publish_on_new_channel(queue, body, properties.clone())
                        .await
                }
            };
            let error = match published {
                Ok(()) => return Ok(()),
                Err(e @ BrokerError::Unroutable { .. }) => return Err(e),
                Err(e) if !self.connection.status().connected() => return Err(e),
                Err(e) => e,
            };
            if let Some(m) = &self.metrics {
                m.publishes_refused.inc();
            }
            let since = match &refused {
                Some((_, since)) => *since,
                None => {
                    let now = tokio::time::Instant::now();
                    refused = Some((Refused::start(self, queue, &error), now));
                    now
                }
            };
            if since.elapsed() >= self.publish_retry_for {
                return Err(BrokerError::Refused {
                    routing_key: queue.to_string(),
                    after: self.publish_retry_for,
                    last: error.to_string(),
                });
            }
            debug!("publish to '{queue}' refused ({error}); trying again in {pause:?}");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(REFUSED_BACKOFF_CAP);
        }
    }

    async fn publish_on_new_channel(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let publisher = Publisher::open(&self.connection).await?;
        let published = publisher.publish(queue, body, properties).await;
        let _ = publisher.channel().close(200, "retried".into()).await;
        published
    }

    fn count_published(&self, bytes: usize) {
        if let Some(m) = &self.metrics {
            m.bytes_out.inc_by(bytes as u64);
        }
    }

    /// `reason` is one of the fixed dead-letter kinds (decode errors, unknown_kind,
    /// too_many_attempts, result_queue_missing), so the label stays low-cardinality.
    fn count_dead_letter(&self, reason: &str, bytes: usize) {
        if let Some(m) = &self.metrics {
            m.dead_lettered.with_label_values(&[reason]).inc();
            m.bytes_out.inc_by(bytes as u64);
        }
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
mod retry_tests {
    use super::*;

    #[test]
    fn retry_delays_double_with_jitter_and_stop_at_an_hour() {
        for _ in 0..200 {
            for (backoff, retry, low, high) in [
                (1.0, 1, 0.5, 1.0),
                (1.0, 3, 2.0, 4.0),
                (0.2, 2, 0.2, 0.4),
                (10.0, 40, 1800.0, 3600.0),
                (0.01, 1, 0.1, 0.1),
            ] {
                let delay = retry_delay(backoff, retry).as_secs_f64();
                assert!(
                    (low - 0.05..=high + 0.05).contains(&delay),
                    "backoff {backoff}, retry {retry}: {delay}"
                );
                // Rounded to 100 ms: each distinct delay has a queue of its own.
                assert_eq!((delay * 1000.0).round() as u64 % 100, 0);
            }
        }
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
