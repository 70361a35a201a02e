//! Publishing with publisher confirms and `mandatory`: a message is only "sent" once RabbitMQ has
//! taken responsibility for it, and a message no queue would take is an error, not a silent loss.

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use lapin::{Confirmation, PublisherConfirm};

use crate::error::BrokerError;
use crate::protocol::{CONTENT_TYPE, HEADER_VERSION, PROTOCOL_VERSION};
use crate::topology::short;

/// A channel in confirm mode, publishing through the default exchange.
#[derive(Clone, Debug)]
pub struct Publisher {
    channel: Channel,
}

/// A publish sent but not yet confirmed; await [`PendingConfirm::confirmed`] to learn its fate.
#[derive(Debug)]
pub struct PendingConfirm {
    confirm: PublisherConfirm,
    routing_key: String,
}

impl Publisher {
    /// Wraps a channel that is already in confirm mode (see `connection::confirm_channel`).
    pub fn new(channel: Channel) -> Self {
        Self { channel }
    }

    /// The underlying channel.
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
        let confirm = self
            .channel
            .basic_publish(
                ShortString::from(""),
                short(queue)?,
                options,
                body,
                properties,
            )
            .await?;
        Ok(PendingConfirm {
            confirm,
            routing_key: queue.to_string(),
        })
    }
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
            Confirmation::NotRequested => Err(BrokerError::Invalid(
                "publisher confirms are not enabled on this channel (a Warren bug)".into(),
            )),
        }
    }
}

/// Properties of a persistent Warren message of `message_type`, with the version header.
pub fn message_properties(message_type: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(HEADER_VERSION.into(), AMQPValue::LongUInt(PROTOCOL_VERSION));
    BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_delivery_mode(2)
        .with_type(ShortString::from(message_type))
        .with_headers(headers)
}

/// Adds a string header to `properties`.
pub fn with_header(properties: BasicProperties, name: &str, value: &str) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from(name),
        AMQPValue::LongString(LongString::from(value)),
    );
    properties.with_headers(headers)
}

/// Reads a header as text (string headers) or number (integer headers).
pub fn header_value(properties: &BasicProperties, name: &str) -> Option<String> {
    let value = properties.headers().as_ref()?.inner().get(name)?;
    Some(match value {
        AMQPValue::LongString(s) => s.to_string(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}
