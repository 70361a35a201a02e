//! Warren's broker layer: the wire protocol, the RabbitMQ topology, connections, confirmed
//! publishing and queue depth. Workers, submitters and the autoscaler all talk to RabbitMQ
//! through this crate, so the rules of at-least-once delivery live in one place. It also holds
//! what every long-running Warren process shares: its health and metrics endpoints and its
//! shutdown signal ([`endpoints`]).

#![warn(missing_docs)]

pub mod connection;
pub mod depth;
pub mod endpoints;
pub mod error;
pub mod properties;
pub mod protocol;
pub mod publisher;
pub mod settings;
pub mod topology;

pub use error::BrokerError;
pub use settings::AmqpSettings;
