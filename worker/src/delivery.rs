//! Handling one delivery: decode, run, publish the result, and only then acknowledge. Bad
//! messages get a `rejected` result where the task is identifiable, and are dead-lettered with
//! the reason in a header; nothing here can stop the worker.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};
use warren_broker::BrokerError;
use warren_broker::properties::{dead_letter_properties, result_properties};
use warren_broker::protocol::DEAD_REASON_RESULT_QUEUE_MISSING;
use warren_broker::protocol::{
    self, DecodeError, ErrorKind, HEADER_DELIVERY_COUNT, HEADER_KIND, HEADER_PREVIOUS_ERRORS,
    HEADER_REPLAYED, HEADER_RETRIES, HEADER_SEQ, HEADER_TOKEN, PROTOCOL_VERSION, ResultEnvelope,
    TaskEnvelope, TaskError, TaskStatus,
};
use warren_broker::publisher::{Publisher, header_value};
use warren_broker::topology::{DELIVERY_LIMIT, dead_letter_queue, declare_retry_queue};

use crate::cancel::Cancellations;
use crate::handler::{Registry, TIMEOUT_GRACE, Task, TaskFailure};
use crate::metrics::WorkerMetrics;

/// What every delivery of a session shares.
pub(crate) struct Context {
    pub worker: String,
    pub queue: String,
    pub registry: Registry,
    pub publisher: Publisher,
    pub default_timeout: Duration,
    pub max_message_bytes: usize,
    /// None when metrics are off: nothing is recorded.
    pub metrics: Option<WorkerMetrics>,
    /// What `warren cancel` recorded, and the tasks running now.
    pub cancellations: Cancellations,
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
    let attempt = arrival.attempt;
    let mut task = match protocol::decode_task(&delivery.data, ctx.max_message_bytes) {
        Ok(task) => task,
        Err(error) => return reject_malformed(&ctx, delivery, &error, arrival).await,
    };
    if attempt >= u32::try_from(DELIVERY_LIMIT).unwrap_or(u32::MAX) {
        // RabbitMQ dead-letters the task silently after this delivery; answering now means a
        // task that keeps killing its workers still gets a result and `wait` does not hang.
        let error = TaskError::new(
            ErrorKind::TooManyAttempts,
            format!(
                "task was delivered {attempt} times without finishing (does it crash or exhaust its worker?); \
                 not run again, dead-lettered"
            ),
        );
        let result = result_of(
            &ctx,
            &task,
            &arrival,
            SystemTime::now(),
            TaskStatus::Failed,
            Value::Null,
            Some(error.clone()),
        );
        return reject_with_result(&ctx, delivery, Some(result), &task.reply_to, &error).await;
    }
    let Some(handler) = ctx.registry.get(&task.kind) else {
        let error = TaskError::new(
            ErrorKind::UnknownKind,
            format!(
                "no handler for kind '{}' on this worker (it has: {})",
                task.kind,
                ctx.registry.kinds().join(", ")
            ),
        );
        let result = result_of(
            &ctx,
            &task,
            &arrival,
            SystemTime::now(),
            TaskStatus::Rejected,
            Value::Null,
            Some(error.clone()),
        );
        return reject_with_result(&ctx, delivery, Some(result), &task.reply_to, &error).await;
    };
    let expired = task.expired(SystemTime::now());
    let running = if expired {
        None
    } else {
        ctx.cancellations.start(&task.batch, &task.id)
    };
    let Some(running) = running else {
        let (status, error) = if expired {
            let at = task.expires_at.as_deref().unwrap_or_default();
            (
                TaskStatus::Expired,
                TaskError::new(
                    ErrorKind::Expired,
                    format!("the task expired at {at}, before a worker could run it; not run"),
                ),
            )
        } else {
            (
                TaskStatus::Cancelled,
                TaskError::new(
                    ErrorKind::Cancelled,
                    format!(
                        "batch {} or this task was cancelled (warren cancel) before it ran; not run",
                        task.batch
                    ),
                ),
            )
        };
        info!(task_id = %task.id, batch = %task.batch, status = status.as_str(), "task not run: {}", error.message);
        let result = result_of(
            &ctx,
            &task,
            &arrival,
            SystemTime::now(),
            status,
            Value::Null,
            Some(error),
        );
        tokio::select! {
            () = deliver_result(&ctx, &delivery, &result, &task.reply_to) => {}
            () = abandon.cancelled() => {}
        }
        return;
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
    let handler_task = Task {
        id: task.id.clone(),
        batch: task.batch.clone(),
        kind: task.kind.clone(),
        // The envelope does not need its args again: move them rather than copy per task.
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
        outcome = tokio::time::timeout(timeout + TIMEOUT_GRACE, handler_run) => Some(outcome),
        // Dropping the handler's future stops it; an exec command's process group is killed.
        () = running.token.cancelled() => None,
        () = abandon.cancelled() => {
            info!(task_id = %task.id, batch = %task.batch, "task abandoned unfinished; returning it to the queue");
            let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
            if let Some(m) = &ctx.metrics {
                m.returned.inc();
            }
            return;
        }
    };
    let (status, output, error, permanent) = match outcome {
        None => (
            TaskStatus::Cancelled,
            Value::Null,
            Some(TaskError::new(
                ErrorKind::Cancelled,
                format!(
                    "batch {} or this task was cancelled (warren cancel) while it ran; stopped",
                    task.batch
                ),
            )),
            true,
        ),
        Some(Ok(Ok(Ok(output)))) => (TaskStatus::Succeeded, output, None, false),
        Some(Ok(Ok(Err(TaskFailure {
            status,
            error,
            output,
            permanent,
        })))) => (status, output, Some(error), permanent),
        Some(Ok(Err(join_error))) => (
            TaskStatus::Failed,
            Value::Null,
            Some(TaskError::new(
                ErrorKind::HandlerPanicked,
                format!("the '{}' handler panicked: {join_error}", task.kind),
            )),
            false,
        ),
        Some(Err(_)) => (
            TaskStatus::TimedOut,
            Value::Null,
            Some(TaskError::new(
                ErrorKind::Timeout,
                format!("task ran longer than its limit of {timeout:?} and was killed"),
            )),
            false,
        ),
    };
    let retries_left = task
        .max_retries
        .unwrap_or(0)
        .saturating_sub(arrival.retries);
    if let Some(error) = &error
        && matches!(status, TaskStatus::Failed | TaskStatus::TimedOut)
        && !permanent
        && retries_left > 0
    {
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
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    // A republished message starts its delivery count afresh; the broker's own count is not ours.
    let mut kept = lapin::types::FieldTable::default();
    for (name, value) in headers.inner() {
        if name.as_str() != HEADER_DELIVERY_COUNT {
            kept.insert(name.clone(), value.clone());
        }
    }
    headers = kept;
    headers.insert(HEADER_RETRIES.into(), AMQPValue::LongUInt(retry));
    headers.insert(
        HEADER_PREVIOUS_ERRORS.into(),
        AMQPValue::LongString(history.as_str().into()),
    );
    let properties = delivery.properties.clone().with_headers(headers);
    let published = async {
        let queue = declare_retry_queue(ctx.publisher.channel(), &ctx.queue, delay).await?;
        ctx.publisher
            .publish(&queue, &delivery.data, properties)
            .await
    };
    if let Err(e) = published.await {
        return warn!(task_id = %task.id, "cannot set the task aside for a retry ({e}); it will be redelivered");
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
        .publisher
        .publish(reply_to, &body, result_properties(result))
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
                .publisher
                .publish(&dead_letter_queue(&ctx.queue), &body, props)
                .await
            {
                return warn!(task_id = %result.task_id, "cannot dead-letter the result ({e}); the task will be redelivered");
            }
            ctx.count_dead_letter(DEAD_REASON_RESULT_QUEUE_MISSING, body.len());
        }
        Err(e) => {
            return warn!(task_id = %result.task_id, "cannot publish the result ({e}); the task will be redelivered");
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
    let props = &delivery.properties;
    let identity = props
        .message_id()
        .as_ref()
        .zip(props.reply_to().as_ref())
        .map(|(id, reply)| (id.to_string(), reply.to_string()));
    let task_error = TaskError::new(error.kind(), error.to_string());
    let (result, reply_to) = match identity {
        Some((task_id, reply_to)) => {
            let batch = props
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_default();
            let now = protocol::timestamp(SystemTime::now());
            let result = ResultEnvelope {
                v: PROTOCOL_VERSION,
                task_id,
                batch,
                seq: header_value(props, HEADER_SEQ).and_then(|s| s.parse().ok()),
                kind: header_value(props, HEADER_KIND).unwrap_or_default(),
                status: TaskStatus::Rejected,
                output: Value::Null,
                error: Some(task_error.clone()),
                worker: ctx.worker.clone(),
                attempt: arrival.attempt + arrival.retries,
                previous_errors: arrival.previous_errors.clone(),
                replayed: arrival.replayed,
                labels: Default::default(),
                started_at: now.clone(),
                finished_at: now,
                token: header_value(props, HEADER_TOKEN),
            };
            (Some(result), reply_to)
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
            .publisher
            .publish(
                reply_to,
                &protocol::encode(result),
                result_properties(result),
            )
            .await
        {
            // The dead letter below keeps the message; a missing result queue is not a reason to wait.
            Ok(()) | Err(BrokerError::Unroutable { .. }) => {}
            Err(e) => {
                return warn!(
                    "cannot publish the rejection ({e}); the message will be redelivered"
                );
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
        .publisher
        .publish(&dead_letter_queue(&ctx.queue), &delivery.data, props)
        .await
    {
        Ok(()) => {
            ctx.count_dead_letter(&error.kind, delivery.data.len());
            if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                debug!("ack after dead-lettering failed ({e}); it will be dead-lettered again");
            }
        }
        Err(e) => warn!("cannot dead-letter the message ({e}); it will be redelivered"),
    }
}

/// What the delivery's headers say about this run of the task.
struct Arrival {
    /// 1 on the first delivery of this message, +1 on each redelivery.
    attempt: u32,
    /// Retries that came before this message (each retry is a new message).
    retries: u32,
    /// Their errors, oldest first.
    previous_errors: Vec<TaskError>,
    /// How often the task was replayed from the dead-letter queue, if ever.
    replayed: Option<u32>,
}

impl Arrival {
    fn of(properties: &BasicProperties) -> Self {
        let number = |name| header_value(properties, name).and_then(|n| n.parse::<u32>().ok());
        Self {
            attempt: number(HEADER_DELIVERY_COUNT).map_or(1, |n| n.saturating_add(1)),
            retries: number(HEADER_RETRIES).unwrap_or(0),
            // Written by a worker; anything unreadable is left out rather than failing the task.
            previous_errors: header_value(properties, HEADER_PREVIOUS_ERRORS)
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or_default(),
            replayed: number(HEADER_REPLAYED),
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
        attempt: arrival.attempt + arrival.retries,
        previous_errors: arrival.previous_errors.clone(),
        replayed: arrival.replayed,
        labels: task.labels.clone(),
        started_at: protocol::timestamp(started_at),
        finished_at: protocol::timestamp(SystemTime::now()),
        token: task.token.clone(),
    }
}

impl Context {
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
