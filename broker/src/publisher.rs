//! Publishing with publisher confirms and `mandatory`: a message is only "sent" once RabbitMQ has
//! taken responsibility for it, and a message no queue would take is an error, not a silent loss.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel};
use lapin::{Confirmation, PublisherConfirm};

use crate::error::BrokerError;
use crate::topology::amqp_name;

// Properties are built in `properties`; these are re-exported for the callers that publish.
pub use crate::properties::{header_value, message_properties, with_header};

/// A channel in confirm mode, publishing through the default exchange. Every message carries the
/// connection's user as its AMQP `user_id`, which RabbitMQ verifies: consumers can trust who sent
/// it (see [`verified_user`]). Clones share the channel, and any number of tasks may publish
/// through them at once: each still learns the fate of its own message (see [`Publisher::send`]).
#[derive(Clone, Debug)]
pub struct Publisher {
    channel: Channel,
    user: ShortString,
    /// Held while a publish is numbered and its frames queued; see [`Publisher::send`].
    send_order: Arc<Mutex<()>>,
}

/// A publish sent but not yet confirmed; await [`PendingConfirm::confirmed`] to learn its fate.
#[derive(Debug)]
pub struct PendingConfirm {
    confirm: PublisherConfirm,
    routing_key: String,
}

impl Publisher {
    /// Wraps a channel of `connection` that is already in confirm mode (see
    /// `connection::confirm_channel`). Publish on it only through this publisher and its clones:
    /// another publisher of the same channel would not share its ordering (see [`Publisher::send`]).
    pub fn new(channel: Channel, connection: &lapin::Connection) -> Self {
        Self {
            channel,
            user: ShortString::try_new(connection.status().username())
                .unwrap_or_else(|_| ShortString::from("")),
            send_order: Arc::default(),
        }
    }

    /// Opens a confirm-mode channel on `connection` and publishes through it.
    pub async fn open(connection: &lapin::Connection) -> Result<Self, BrokerError> {
        Ok(Self::new(
            crate::connection::confirm_channel(connection).await?,
            connection,
        ))
    }

    /// The user every message is sent as.
    pub fn user(&self) -> &str {
        self.user.as_str()
    }

    /// The underlying channel, for declares and reads; a publish on it directly would escape the
    /// ordering of [`Publisher::send`].
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes `body` to `queue` and waits until the broker confirms it.
    pub async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        self.send(queue, body, properties).await?.confirmed().await
    }

    /// Sends `body` to `queue` without waiting for the confirm, so many publishes can be in flight.
    ///
    /// A confirm names its message by a number, the publish's place on the channel. lapin gives
    /// a publish its number and then queues its frames, without one lock over both, so two
    /// threads publishing at once could send their frames in the other order than they were
    /// numbered, and the broker's verdict on one message would resolve the other's confirm: a
    /// message a queue refused (reject-publish) would pass for confirmed, and a task be
    /// acknowledged with its result lost. lapin does both in the publish future's first poll,
    /// so every poll of it runs under `send_order`; `tests/concurrent_confirms.rs` holds lapin
    /// to that.
    pub async fn send(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PendingConfirm, BrokerError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let mut publish = std::pin::pin!(self.channel.basic_publish(
            ShortString::from(""),
            amqp_name(queue)?,
            options,
            body,
            // A connection authenticated otherwise (EXTERNAL, a client certificate) has no
            // user name here: the broker would refuse any user_id, so none is set.
            if self.user.as_str().is_empty() {
                properties
            } else {
                properties.with_user_id(self.user.clone())
            },
        ));
        let confirm = std::future::poll_fn(|cx| {
            // Nothing panics while this is held, but a poisoned lock still orders publishes.
            let _in_order = self
                .send_order
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            publish.as_mut().poll(cx)
        })
        .await?;
        Ok(PendingConfirm {
            confirm,
            routing_key: queue.to_string(),
        })
    }
}

/// The user RabbitMQ verified as a message's publisher: its `user_id` property, which the broker
/// checks against the publishing connection's user. None when the publisher did not set it
/// (nothing is verified then).
pub fn verified_user(properties: &BasicProperties) -> Option<&str> {
    properties
        .user_id()
        .as_ref()
        .map(|u| u.as_str())
        .filter(|u| !u.is_empty())
}

impl PendingConfirm {
    /// Waits for the broker's verdict: Ok only for an ack of a message that was routed.
    pub async fn confirmed(self) -> Result<(), BrokerError> {
        match self.confirm.await? {
            // RabbitMQ acks an unroutable mandatory message after returning it: the return wins.
            Confirmation::Ack(Some(returned)) => Err(BrokerError::Unroutable {
                routing_key: self.routing_key,
                reply: returned.reply_text.to_string(),
            }),
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Nack(_) => Err(BrokerError::Nacked {
                routing_key: self.routing_key,
            }),
            Confirmation::NotRequested => Err(BrokerError::Bug(
                "publisher confirms are not enabled on this channel".into(),
            )),
        }
    }
}
