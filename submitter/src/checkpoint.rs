//! The one checkpoint mechanism of a batch's collector and a pipeline's runner: progress is a
//! numbered state kept in a queue of its own (`warren.manifests.<batch>`, `warren.runs.<run>`),
//! and the results a state records are acknowledged only once that state is confirmed. Killed
//! at any point, the next process finds the newest state and the results it does not record
//! still in their queue: at worst a result is taken twice, never lost.
//!
//! A checkpoint is: take every state message ([`take_states`], which also tells a state this
//! process's own user wrote from anyone else's), publish the next one (confirmed), then
//! acknowledge what was taken and the results up to a delivery tag ([`ack_checkpointed`]).

use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicRejectOptions};
use lapin::types::FieldTable;
use tracing::warn;
use warren_broker::BrokerError;
use warren_broker::properties::dead_letter_properties;
use warren_broker::publisher::{Publisher, verified_user};
use warren_broker::topology::amqp_name;

/// One message of a state queue, as [`take_states`] hands it over.
pub(crate) struct StateMessage<'a> {
    /// The body.
    pub data: &'a [u8],
    /// Who RabbitMQ verified as its publisher, when it was not this process's own user (such a
    /// state must not be adopted: a state pre-seeded by anyone else could make a run skip its
    /// work or mark results collected).
    pub stranger: Option<Option<&'a str>>,
}

/// Takes (without acknowledging) every message of the state queue `queue` on `channel`, hands
/// each to `read`, and returns their delivery tags for [`ack_checkpointed`]. `own_user` is the
/// user this process connected as.
pub(crate) async fn take_states(
    channel: &Channel,
    queue: &str,
    own_user: &str,
    mut read: impl FnMut(StateMessage<'_>),
) -> Result<Vec<u64>, BrokerError> {
    let mut taken = Vec::new();
    while let Some(message) = channel
        .basic_get(amqp_name(queue)?, BasicGetOptions::default())
        .await
        .map_err(|e| BrokerError::from_queue_error(queue, e))?
    {
        let delivery = message.delivery;
        taken.push(delivery.delivery_tag);
        let sender = verified_user(&delivery.properties);
        read(StateMessage {
            data: &delivery.data,
            stranger: (sender != Some(own_user)).then_some(sender),
        });
    }
    Ok(taken)
}

/// Consumes a results queue as its only reader (exclusive; the queue also keeps a single active
/// consumer). The caller checks the queue's consumer count first, to say who holds it.
/// Batch and run ids are at most 200 bytes, so their queue names fit an AMQP short string.
pub(crate) async fn consume_alone(
    channel: &Channel,
    queue: &str,
) -> Result<lapin::Consumer, lapin::Error> {
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// The last step of a checkpoint, once the new state is confirmed: acknowledges the state
/// messages `taken` from `channel` and, when given, the results up to a delivery tag.
pub(crate) async fn ack_checkpointed(
    channel: &Channel,
    taken: &[u64],
    results: Option<(&Channel, u64)>,
) -> Result<(), lapin::Error> {
    if let Some(last) = taken.iter().max() {
        channel
            .basic_ack(*last, BasicAckOptions { multiple: true })
            .await?;
    }
    if let Some((results, tag)) = results {
        results
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await?;
    }
    Ok(())
}

/// Moves a message of the results queue `from` that is not taken (not this batch's or run's, or
/// unreadable) to the dead-letter queue `dead`, with why. The copy is republished (confirmed,
/// with `reason` and `detail` headers) and the delivery is left to be acknowledged with the next
/// checkpoint: a rejection is dead-lettered by the broker asynchronously, and deleting the results
/// queue at the end could drop it on the way. With no `dead` queue known yet, or when the
/// republish fails, the delivery is rejected and the queue's own dead-letter route takes it.
/// Says which, as only a copied delivery is still to be acknowledged.
pub(crate) async fn set_aside(
    channel: &Channel,
    publisher: &Publisher,
    delivery: &Delivery,
    from: &str,
    dead: Option<&str>,
    role: &str,
    (reason, detail): (&str, &str),
) -> Result<SetAside, lapin::Error> {
    if let Some(dead) = dead {
        // The copy carries this process's user_id (RabbitMQ allows no other): the detail keeps
        // who the broker said had sent the original.
        let detail = match verified_user(&delivery.properties) {
            Some(sender) => format!("{detail} (sent by user '{sender}')"),
            None => format!("{detail} (sent without a verified user)"),
        };
        let properties = dead_letter_properties(
            delivery.properties.clone(),
            reason,
            &detail,
            from,
            &format!("{role} ({})", publisher.user()),
        );
        match publisher.publish(dead, &delivery.data, properties).await {
            Ok(()) => return Ok(SetAside::Copied),
            Err(e) => warn!("cannot republish to '{dead}' ({e}); rejecting the message instead"),
        }
    }
    channel
        .basic_reject(delivery.delivery_tag, BasicRejectOptions { requeue: false })
        .await?;
    Ok(SetAside::Rejected)
}

/// How [`set_aside`] moved a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SetAside {
    /// Copied to the dead-letter queue: the delivery is still to be acknowledged.
    Copied,
    /// Rejected: the broker dead-letters it, and the delivery is settled.
    Rejected,
}
