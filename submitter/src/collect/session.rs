//! One session of collecting: consume the results queue, write each result to the sink, and
//! checkpoint (a manifest that records what is written, then the acks), until the batch is in.

use std::time::Instant;

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, QueueDeleteOptions};
use lapin::{Channel, Connection};
use tracing::{info, warn};
use warren_broker::BrokerError;
use warren_broker::connection::close_channel;
use warren_broker::connection::consumer_channel;
use warren_broker::error::is_access_refused;
use warren_broker::protocol::{
    self, BatchManifest, DEAD_REASON_FOREIGN_RESULT, DEAD_REASON_UNREADABLE_RESULT,
    MESSAGE_TYPE_MANIFEST, PROTOCOL_VERSION, ResultEnvelope, TaskStatus,
};
use warren_broker::publisher::{Publisher, message_properties, verified_user};
use warren_broker::topology::{self, amqp_name, dead_letter_queue, manifest_queue, result_queue};

use crate::checkpoint::{self, ack_checkpointed, consume_alone, take_states};
use crate::seqset::SeqSet;

use super::lock::{FINISH_DELETE_WAIT, collector_lock, finish, take_collector_lock};
use super::{
    CHECKPOINT_AFTER, CHECKPOINT_EVERY, CONSUMER_CHECK_EVERY, CollectError, FAILED_EXAMPLES,
    MAX_RESULT_BYTES, NO_MANIFEST_HINT_AFTER, Outcome, Progress, RESULT_PREFETCH, ResultSink,
    State,
};

// Long: one collector session in order: lock, queue checks, manifest, consume loop; each step's
// early return names what stopped it, and the loop's state lives only here.
pub(super) async fn collect_session(
    connection: &Connection,
    state: &mut State,
    sink: &mut dyn ResultSink,
    progress: &mut dyn Progress,
    deadline: Option<Instant>,
    interrupt: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Result<Outcome, CollectError> {
    let results_queue = result_queue(&state.batch);
    // Two collectors started together both see no consumer; the lock makes the second one say
    // who holds the batch instead of waiting, unseen, as the queue's standby consumer.
    if !take_collector_lock(connection, &state.batch).await? {
        return Err(CollectError::Busy {
            batch: state.batch.clone(),
            holder: String::new(),
            retry: state.consumed_before,
        });
    }
    let manifests = Publisher::open(connection).await?;
    let results = consumer_channel(connection, RESULT_PREFETCH).await?;
    match topology::inspect(&results, &results_queue).await {
        Err(BrokerError::QueueNotFound { .. }) => {
            return Err(CollectError::UnknownBatch(state.batch.clone()));
        }
        // Another collector holds the batch (the queue keeps a second one as a silent standby).
        Ok(queue) if queue.consumer_count() > 0 => {
            return Err(CollectError::Busy {
                batch: state.batch.clone(),
                holder: String::new(),
                retry: state.consumed_before,
            });
        }
        other => {
            other?;
        }
    }
    // Deliveries of a lost connection come back; what this process wrote is skipped by `written`.
    checkpoint(&manifests, state, None).await?;
    // One collector per batch: two would split the results between two outputs.
    let consumed = consume_alone(&results, &results_queue).await;
    let mut consumer = match consumed {
        Ok(consumer) => consumer,
        Err(e) if is_access_refused(&e) => {
            return Err(CollectError::Busy {
                batch: state.batch.clone(),
                holder: String::new(),
                // Our own connection of before a network failure can linger at the broker
                // until its heartbeat times out: then the holder may be this process.
                retry: state.consumed_before,
            });
        }
        Err(e) => return Err(BrokerError::from_queue_error(&results_queue, e).into()),
    };
    state.consumed_before = true;
    state.consuming = true;
    progress.update(&state.counts);
    let mut unacked: Option<u64> = None;
    let mut pending = 0u16;
    let mut ticker = tokio::time::interval(CHECKPOINT_EVERY);
    let sleep_until_deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep_until_deadline);
    loop {
        if let Some(m) = &state.manifest
            && state.written.covers(m.total)
            && state.replays.is_subset(&state.replays_collected)
        {
            sink.flush()?;
            if let Some(tag) = unacked {
                results
                    .basic_ack(tag, BasicAckOptions { multiple: true })
                    .await?;
            }
            finish(&results, &state.batch).await;
            return Ok(Outcome::Complete(state.counts.clone()));
        }
        tokio::select! {
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let tag = delivery.delivery_tag;
                    if take_result(&results, &manifests, delivery, state, sink).await? {
                        progress.update(&state.counts);
                    }
                    unacked = Some(tag);
                    pending += 1;
                    // A full prefetch window would stall deliveries until the next tick.
                    if pending >= CHECKPOINT_AFTER && state.manifest.is_some() {
                        sink.flush()?;
                        checkpoint(&manifests, state, unacked.take().map(|tag| (&results, tag))).await?;
                        pending = 0;
                    }
                }
                Some(Err(e)) => return Err(BrokerError::from(e).into()),
                None => return Err(BrokerError::ConsumerCancelled { queue: results_queue.clone() }.into()),
            },
            _ = ticker.tick() => {
                if watch_consumers(connection, state).await {
                    progress.update(&state.counts);
                }
                let known = state.manifest.is_some();
                if !known && !state.warned_no_manifest && state.started.elapsed() > NO_MANIFEST_HINT_AFTER {
                    state.warned_no_manifest = true;
                    warn!(batch = %state.batch, "no manifest for this batch yet, so its size is unknown: the submitter may \
                        still be publishing, or it died before finishing, or it does not publish one (docs/protocol.md, \
                        Batches); results are written as they come, and --timeout bounds the wait");
                }
                if unacked.is_some() || !known {
                    sink.flush()?;
                    // Until the manifest is known nothing can be recorded, so nothing is acked.
                    let ack = if known { pending = 0; unacked.take() } else { None };
                    checkpoint(&manifests, state, ack.map(|tag| (&results, tag))).await?;
                    if !known && state.manifest.is_some() {
                        progress.update(&state.counts);
                    }
                }
            }
            () = &mut sleep_until_deadline => break,
            () = interrupt.as_mut() => break,
        }
    }
    sink.flush()?;
    if state.manifest.is_some() {
        checkpoint(&manifests, state, unacked.take().map(|tag| (&results, tag))).await?;
    }
    // Another process may take over the batch now.
    if let Ok(name) = amqp_name(&collector_lock(&state.batch)) {
        let _ = tokio::time::timeout(
            FINISH_DELETE_WAIT,
            results.queue_delete(name, QueueDeleteOptions::default()),
        )
        .await;
    }
    Ok(Outcome::Incomplete(state.counts.clone()))
}

/// Counts the consumers of the batch's task queue every few seconds, and warns once when it has
/// had none for [`CollectOptions::warn_no_worker_after`]. Returns whether the count was refreshed.
async fn watch_consumers(connection: &Connection, state: &mut State) -> bool {
    let Some(queue) = state.manifest.as_ref().map(|m| m.queue.clone()) else {
        return false;
    };
    if state
        .consumers_checked
        .is_some_and(|at| at.elapsed() < CONSUMER_CHECK_EVERY.min(state.warn_no_worker_after))
    {
        return false;
    }
    state.consumers_checked = Some(Instant::now());
    // A channel of its own: a failed passive declare (queue deleted) closes it.
    let consumers = match connection.create_channel().await {
        Ok(channel) => {
            let found = topology::inspect(&channel, &queue).await;
            if found.is_ok() {
                close_channel(&channel, "counted").await;
            }
            found
                .ok()
                .map(|q| (u64::from(q.consumer_count()), u64::from(q.message_count())))
        }
        Err(_) => None,
    };
    state.counts.queued = consumers.map(|(_, queued)| queued);
    let consumers = consumers.map(|(consumers, _)| consumers);
    state.counts.consumers = consumers;
    match consumers {
        Some(0) => {
            let since = *state.no_consumer_since.get_or_insert_with(Instant::now);
            if !state.warned_no_consumer && since.elapsed() >= state.warn_no_worker_after {
                state.warned_no_consumer = true;
                warn!(
                    batch = %state.batch,
                    "no worker is consuming '{queue}' (for {}s): its tasks wait until one does. Start one \
                     (warren worker --queue {queue}) or an autoscaler for it; or was the queue name mistyped?",
                    since.elapsed().as_secs()
                );
            }
        }
        Some(_) => {
            state.no_consumer_since = None;
            if std::mem::take(&mut state.warned_no_consumer) {
                info!(batch = %state.batch, "a worker is consuming '{queue}' now");
            }
        }
        None => {}
    }
    true
}

/// Writes a result unless it was written before; returns whether it was written. A message that
/// is not a result is rejected, which dead-letters it to the task queue's dead-letter queue.
// Long: the ownership checks of one result (token, worker user, replay, seq) in the order they must
// run, each with its own outcome.
async fn take_result(
    channel: &Channel,
    manifests: &Publisher,
    delivery: Delivery,
    state: &mut State,
    sink: &mut dyn ResultSink,
) -> Result<bool, CollectError> {
    let result = match protocol::decode_result(&delivery.data, MAX_RESULT_BYTES) {
        Ok(r) => r,
        Err(e) => {
            warn!(batch = %state.batch, "dead-lettering an unreadable message in the result queue: {e}");
            let detail = e.to_string();
            set_aside(
                channel,
                manifests,
                &delivery,
                state,
                DEAD_REASON_UNREADABLE_RESULT,
                &detail,
            )
            .await?;
            return Ok(false);
        }
    };
    if let Some(why) = foreign(&result, verified_user(&delivery.properties), state) {
        warn!(batch = %state.batch, task_id = %result.task_id, "dead-lettering a result that is not this batch's: {why}");
        set_aside(
            channel,
            manifests,
            &delivery,
            state,
            DEAD_REASON_FOREIGN_RESULT,
            &why,
        )
        .await?;
        return Ok(false);
    }
    // The batch secret stays out of the output.
    let mut result = result;
    result.token = None;
    let fresh = match (result.seq, result.replayed) {
        (Some(seq), Some(replay)) => {
            if !state.replays.contains(&(seq, replay)) && state.written.contains(seq) {
                // The replay may be newer than the manifest read last: read it again first (the
                // output is flushed, as a checkpoint records what was written).
                sink.flush()?;
                checkpoint(manifests, state, None).await?;
            }
            let wanted = state.replays.contains(&(seq, replay))
                && state.replays_collected.insert((seq, replay));
            state.written.insert(seq) || wanted
        }
        (Some(seq), None) => state.written.insert(seq),
        (None, _) => true,
    };
    if !fresh {
        state.counts.duplicates += 1;
        return Ok(false);
    }
    sink.write(&result)?;
    if result.seq.is_none() {
        // Only a task that was refused for lacking its seq is answered without one: it cannot
        // fill any of the batch's slots, so the batch cannot complete.
        warn!(
            batch = %state.batch, task_id = %result.task_id,
            "a result without a seq was written but cannot be counted: every task of a batch collected by \
             'warren wait' must carry its seq (docs/protocol.md); this batch will not complete, stop with Ctrl-C or --timeout"
        );
    }
    if result.attempt > 1 {
        state.counts.retried += 1;
    }
    if result.status != TaskStatus::Succeeded
        && state.counts.failed_examples.len() < FAILED_EXAMPLES
    {
        let kind = result
            .error
            .as_ref()
            .map_or(result.status.as_str().to_string(), |e| e.kind.clone());
        state
            .counts
            .failed_examples
            .push((result.task_id.clone(), kind, why_failed(&result)));
    }
    state.counts.done = state.written.len();
    *state
        .counts
        .by_status
        .entry(result.status.as_str())
        .or_default() += 1;
    Ok(true)
}

/// Moves a message the collector will not take to the task queue's dead-letter queue, with why
/// (see [`crate::checkpoint::set_aside`]; before the manifest names the task queue, it is
/// rejected to the results queue's own dead-letter route).
async fn set_aside(
    channel: &Channel,
    manifests: &Publisher,
    delivery: &Delivery,
    state: &State,
    reason: &str,
    detail: &str,
) -> Result<(), CollectError> {
    let dead = state.manifest.as_ref().map(|m| dead_letter_queue(&m.queue));
    checkpoint::set_aside(
        channel,
        manifests,
        delivery,
        &result_queue(&state.batch),
        dead.as_deref(),
        "collector",
        (reason, detail),
    )
    .await?;
    Ok(())
}

/// Why `result` cannot be a worker's answer to a task of this batch, if it cannot. Before the
/// manifest is known only the batch id can be checked (see docs/protocol.md, "What a collector
/// trusts").
fn foreign(result: &ResultEnvelope, sender: Option<&str>, state: &State) -> Option<String> {
    if result.batch != state.batch {
        return Some(format!("it names batch '{}'", result.batch));
    }
    let manifest = state.manifest.as_ref()?;
    if let Some(answerers) = &manifest.answerers
        && !sender.is_some_and(|s| answerers.iter().any(|a| a == s))
    {
        return Some(format!(
            "it was published by {}, who may not answer this batch (its workers' users: {})",
            sender.map_or("an unverified publisher".to_string(), |s| format!(
                "user '{s}'"
            )),
            answerers.join(", ")
        ));
    }
    if let Some(seq) = result.seq
        && seq >= manifest.total
    {
        return Some(format!(
            "its seq {seq} is beyond the batch's {} task(s)",
            manifest.total
        ));
    }
    match &manifest.token {
        Some(token) if result.token.as_ref() != Some(token) => {
            Some("it does not carry the batch's token (published by someone other than a worker running one of its tasks)".into())
        }
        _ => None,
    }
}

/// Why a task failed, in one line: the last line of its command's stderr when it wrote one (a
/// failed GDAL step says why there), else the error message; at most 200 characters.
fn why_failed(result: &ResultEnvelope) -> String {
    let stderr_line = result.output["stderr"]
        .as_str()
        .and_then(|e| e.lines().rev().find(|l| !l.trim().is_empty()))
        .map(str::trim);
    let message = result.error.as_ref().map(|e| e.message.as_str());
    let why = stderr_line.or(message).unwrap_or_default();
    match why.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &why[..cut]),
        None => why.to_string(),
    }
}

/// Records progress: takes every manifest in the batch's manifest queue, publishes the next
/// generation (merged with what this process wrote), then acknowledges the old manifests and,
/// when given, the results up to `ack` (which the caller flushed to the sink first).
// Long: reading the newest manifest, merging and confirming it before any ack: the order is the
// at-least-once argument and reads best in one place.
async fn checkpoint(
    manifests: &Publisher,
    state: &mut State,
    ack: Option<(&Channel, u64)>,
) -> Result<(), CollectError> {
    let queue = manifest_queue(&state.batch);
    let channel = manifests.channel();
    let first_sight = state.manifest.is_none();
    let mut recorded = SeqSet::default();
    let batch = state.batch.clone();
    let own = manifests.user().to_string();
    let taken = take_states(channel, &queue, &own, |message| {
        // Only this collector's own user may say what the batch is and what was collected (as
        // RabbitMQ verified): a forged manifest could mark results collected, or drop the token.
        if let Some(sender) = message.stranger {
            warn!(
                batch = %batch,
                "setting aside a manifest written by {}, not by this collector's user '{own}': collect a batch as the user that submitted it",
                sender.map_or("an unverified publisher".to_string(), |s| format!("user '{s}'")),
            );
            return;
        }
        match protocol::decode_manifest(message.data, MAX_RESULT_BYTES) {
            Ok(m) if m.batch == batch => {
                recorded.extend(&SeqSet::from_ranges(&m.collected));
                state
                    .replays
                    .extend(m.replays.iter().map(|[s, r]| (*s, *r)));
                state
                    .replays_collected
                    .extend(m.replays_collected.iter().map(|[s, r]| (*s, *r)));
                if state
                    .manifest
                    .as_ref()
                    .is_none_or(|cur| m.generation >= cur.generation)
                {
                    state.counts.total = Some(m.total);
                    state.manifest = Some(m);
                }
            }
            Ok(_) | Err(_) => {
                warn!(batch = %batch, "ignoring an unreadable message in the manifest queue")
            }
        }
    })
    .await?;
    state.written.extend(&recorded);
    if first_sight {
        state.counts.earlier = state.written.len();
    }
    state.counts.done = state.written.len();
    let Some(current) = &state.manifest else {
        // The submitter has not published the manifest yet.
        return Ok(());
    };
    if ack.is_none() && taken.is_empty() {
        return Ok(());
    }
    let next = BatchManifest {
        v: PROTOCOL_VERSION,
        generation: current.generation + 1,
        collected: state.written.to_ranges(),
        replays: state.replays.iter().map(|(s, r)| [*s, *r]).collect(),
        replays_collected: state
            .replays_collected
            .iter()
            .map(|(s, r)| [*s, *r])
            .collect(),
        ..current.clone()
    };
    manifests
        .publish(
            &queue,
            &protocol::encode(&next),
            message_properties(MESSAGE_TYPE_MANIFEST),
        )
        .await?;
    state.manifest = Some(next);
    ack_checkpointed(channel, &taken, ack).await?;
    Ok(())
}
