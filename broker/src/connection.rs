//! Opening connections and channels, with the settings every Warren process wants.

use std::time::Duration;

use lapin::options::{BasicQosOptions, ConfirmSelectOptions};
use lapin::{Channel, Connection, ConnectionProperties};

use crate::error::BrokerError;
use crate::settings::AmqpSettings;

/// Opens a connection named `name` (shown in the management UI; the autoscaler matches worker
/// pods by it). Errors name the URL without its password.
pub async fn connect(settings: &AmqpSettings, name: &str) -> Result<Connection, BrokerError> {
    let uri = settings.uri()?;
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect_uri(uri, properties)
        .await
        .map_err(|e| BrokerError::from_connect_error(&settings.redacted_url(), e))
}

/// Opens a channel in publisher-confirm mode.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Opens a channel that is delivered at most `prefetch` unacknowledged messages.
pub async fn consumer_channel(
    connection: &Connection,
    prefetch: u16,
) -> Result<Channel, BrokerError> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    Ok(channel)
}

/// Capped, jittered exponential delays for reconnecting: 0.2 s doubling up to `cap`, forever.
pub fn reconnect_delays(cap: Duration) -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(cap)
        .with_jitter()
        .without_max_times()
        .build()
}
