//! How a task is answered: its result published (or dead-lettered when its queue is gone), a bad
//! message dead-lettered with the reason, and the delivery acknowledged only once that is
//! confirmed. A publish the broker refuses is retried patiently, and meanwhile no task starts.

use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use lapin::message::Delivery;
use serde_json::Value;
use tracing::{debug, info, warn};
use warren_broker::BrokerError;
use warren_broker::connection::close_channel;
use warren_broker::properties::{Arrival, TaskIdentity, dead_letter_properties, result_properties};
use warren_broker::protocol::DEAD_REASON_RESULT_QUEUE_MISSING;
use warren_broker::protocol::{
    self, DecodeError, PROTOCOL_VERSION, ResultEnvelope, TaskError, TaskStatus,
};
use warren_broker::publisher::Publisher;
use warren_broker::topology::dead_letter_queue;

use crate::delivery::Context;

/// Publishes a result, then acknowledges the task. A result whose queue is gone (expired batch) is
/// dead-lettered instead, so it is not lost either. `alongside` (the attempt's record) runs while
/// the result's confirm is awaited, and is done before the ack: one round trip, not two. It is
/// first polled once the result's publish is queued, so it adds nothing to the result's way.
pub(crate) async fn deliver_result(
    ctx: &Context,
    delivery: &Delivery,
    result: &ResultEnvelope,
    reply_to: &str,
    alongside: impl Future<Output = ()>,
) {
    let body = protocol::encode(result);
    let (published, ()) = tokio::join!(
        biased;
        ctx.publish_patiently(reply_to, &body, result_properties(result)),
        alongside
    );
    match published {
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
    if let Err(e) = ctx.settler.ack(delivery).await {
        warn!(task_id = %result.task_id, "result published but the ack failed ({e}); the task may run again");
    }
}

/// A message that is not a valid task: answer it if it can be identified, then dead-letter it.
pub(crate) async fn reject_malformed(
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
pub(crate) async fn reject_with_result(
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
            if let Err(e) = ctx.settler.ack(&delivery).await {
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
pub(crate) async fn give_back(ctx: &Context, delivery: &Delivery, task_id: &str, why: &str) {
    warn!(
        task_id,
        "{why}; returning the task to the queue to be run again"
    );
    let _ = ctx.settler.requeue(delivery).await;
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

impl Context {
    /// Publishes with confirms; a publish the broker refuses (a nack, a queue that cannot take it
    /// now, or no confirm within `confirm_timeout`) is tried again with backoff for up to
    /// `publish_retry_for`, counted from the first refusal. A lost channel is not retried here: its
    /// deliveries go back to the queue anyway. A missing queue (`Unroutable`) is returned at once
    /// for the caller to decide.
    pub(crate) async fn publish_patiently(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let mut refused: Option<(Refused<'_>, tokio::time::Instant)> = None;
        let mut pause = REFUSED_BACKOFF_START;
        loop {
            let attempt = async {
                match &refused {
                    None => {
                        self.publisher
                            .publish(queue, body, properties.clone())
                            .await
                    }
                    // A quorum queue that refused a channel's publish (reject-publish) keeps
                    // refusing that channel until it hears the queue is below its limit, which
                    // never comes when the limit is removed: each retry goes through a fresh
                    // channel.
                    Some(_) => {
                        self.publish_on_new_channel(queue, body, properties.clone())
                            .await
                    }
                }
            };
            // A confirm that never comes (seen once on a channel whose other publishes were
            // being refused, before `Publisher` ordered its publishes) would hold the task
            // unanswered for good: past the wait it counts as a refusal, and the result goes
            // again on a fresh channel. A fresh channel cut off here is closed by lapin when
            // dropped (`tests/resilience.rs` counts the channels after such a retry).
            let published = tokio::time::timeout(self.confirm_timeout, attempt)
                .await
                .unwrap_or(Err(BrokerError::ConfirmTimeout(self.confirm_timeout)));
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
        close_channel(publisher.channel(), "retried").await;
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
