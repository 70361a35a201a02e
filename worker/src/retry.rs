//! Where a task's retry is decided and scheduled: a failed attempt that may be retried goes to a
//! delay queue for its backoff (the broker holds it, not the worker) and comes back to the task
//! queue when the delay is over, with its error added to the task's history.

use std::time::Duration;

use lapin::message::Delivery;
use tracing::{info, warn};
use warren_broker::properties::{Arrival, retry_properties};
use warren_broker::protocol::{self, TaskEnvelope, TaskError, TaskStatus};
use warren_broker::topology::declare_retry_queue;

use crate::answer::give_back;
use crate::delivery::Context;

/// Whether an attempt that ended with `status` is tried again: only failures and timeouts that
/// are not final, while the task's `max_retries` are not used up.
pub(crate) fn retry_wanted(
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
pub(crate) async fn schedule_retry(
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
    if let Err(e) = ctx.settler.ack(delivery).await {
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

#[cfg(test)]
mod tests {
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
