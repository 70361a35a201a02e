//! Opening connections and channels, with the settings every Warren process wants.

use std::time::{Duration, Instant};

use lapin::options::{BasicQosOptions, ConfirmSelectOptions};
use lapin::{Channel, Connection, ConnectionProperties};

use crate::error::BrokerError;
use crate::settings::AmqpSettings;

/// Opens a connection named `name` (shown in the management UI; the autoscaler matches worker
/// pods by it). Errors name the URL without its password.
pub async fn connect(settings: &AmqpSettings, name: &str) -> Result<Connection, BrokerError> {
    connect_to_any(settings, name).await.map(|(c, _)| c)
}

/// Opens a connection to one of the settings' addresses, trying them in a random order so that
/// clients spread over a cluster's nodes and a node that is down is passed over (each reconnect
/// draws again). Returns the connection and the (redacted) address it reached.
pub async fn connect_to_any(
    settings: &AmqpSettings,
    name: &str,
) -> Result<(Connection, String), BrokerError> {
    let mut uris = settings.uris()?;
    fastrand::shuffle(&mut uris);
    let mut failures = Vec::new();
    let count = uris.len();
    for (uri, address) in uris {
        match connect_uri(settings, uri, &address, name).await {
            Ok(connection) => return Ok((connection, address)),
            // Refused credentials or an untrusted certificate are the same on every node.
            Err(e) if e.is_fatal() || count == 1 => return Err(e),
            Err(e) => {
                tracing::debug!("cannot connect to {address}: {e}");
                failures.push(e);
            }
        }
    }
    Err(BrokerError::NoNodeReachable {
        failures: failures.iter().map(ToString::to_string).collect(),
    })
}

async fn connect_uri(
    settings: &AmqpSettings,
    uri: lapin::uri::AMQPUri,
    address: &str,
    name: &str,
) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(
        settings.connect_timeout,
        Connection::connect_uri(uri, properties),
    )
    .await
    {
        Ok(connected) => {
            let connection = connected.map_err(|e| BrokerError::from_connect_error(address, e))?;
            report_blocking(&connection, address.to_string(), name.to_string());
            Ok(connection)
        }
        Err(_) => Err(BrokerError::ConnectTimeout {
            url: address.to_string(),
            after: settings.connect_timeout,
        }),
    }
}

/// Logs the broker's `connection.blocked` and `connection.unblocked`: during a memory or disk
/// alarm RabbitMQ stops reading from every publishing connection, which otherwise looks like a
/// silent hang.
fn report_blocking(connection: &Connection, url: String, name: String) {
    use futures_lite::StreamExt;
    let mut events = connection.events_listener();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                lapin::Event::ConnectionBlocked(reason) => tracing::warn!(
                    connection = %name,
                    "RabbitMQ at {url} is blocking publishes: {reason}. The broker has a memory or \
                     disk alarm; publishing resumes by itself when it clears (see `warren status` \
                     and the broker's log)"
                ),
                lapin::Event::ConnectionUnblocked => tracing::info!(
                    connection = %name,
                    "RabbitMQ at {url} accepts publishes again (alarm cleared)"
                ),
                _ => {}
            }
        }
    });
}

/// How long submitters, collectors and runners keep retrying a lost broker by default, counted
/// from the first failure of an outage (`--retry-for`).
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(15);

/// How long collectors (`wait`, `submit --wait`, `warren run`) keep retrying by default: a
/// collector holds nothing the broker needs back, so it outlasts a node restart (20-30 s) and a
/// quorum queue's loss of its majority, where a submitter gives up sooner.
pub const DEFAULT_COLLECT_RETRY_FOR: Duration = Duration::from_secs(300);

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

/// How long closing a channel or connection waits for the broker's close-ok. Closing is the
/// last step of a command: a broker slow to answer (or a channel it already closed) must not
/// keep the command from exiting with what it has.
pub const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Closes `connection` cleanly if the broker answers within [`CLOSE_WAIT`]; otherwise drops it
/// (the broker then sees the socket close). Errors are ignored: there is nothing left to do.
pub async fn close_connection(connection: &Connection, why: &str) {
    let closed = tokio::time::timeout(CLOSE_WAIT, connection.close(200, why.into())).await;
    if closed.is_err() {
        tracing::debug!("the broker did not answer a connection close within {CLOSE_WAIT:?}");
    }
}

/// Closes `channel` if the broker answers within [`CLOSE_WAIT`]; errors are ignored, as for
/// [`close_connection`].
pub async fn close_channel(channel: &Channel, why: &str) {
    let closed = tokio::time::timeout(CLOSE_WAIT, channel.close(200, why.into())).await;
    if closed.is_err() {
        tracing::debug!("the broker did not answer a channel close within {CLOSE_WAIT:?}");
    }
}

/// Capped, jittered exponential delays for reconnecting: 0.2 s doubling up to `cap`, forever.
pub fn reconnect_delays(cap: Duration) -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(cap)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Longest pause between attempts of a [`RetryBudget`].
const RETRY_DELAY_CAP: Duration = Duration::from_secs(3);

/// A retry budget counted from the failure it guards: a run of failures may last `budget`, and
/// any progress in between (a session that opened, a task confirmed) starts the next run afresh.
/// Delays between attempts grow as [`reconnect_delays`] with a 3 s cap.
pub struct RetryBudget {
    budget: Duration,
    failing_since: Option<Instant>,
    delays: backon::ExponentialBackoff,
}

impl RetryBudget {
    /// A budget of `budget` per run of failures.
    pub fn new(budget: Duration) -> Self {
        Self {
            budget,
            failing_since: None,
            delays: reconnect_delays(RETRY_DELAY_CAP),
        }
    }

    /// Something worked: the next failure starts a new run with the whole budget.
    pub fn progressed(&mut self) {
        self.failing_since = None;
        self.delays = reconnect_delays(RETRY_DELAY_CAP);
    }

    /// A failure: the delay before the next attempt, or None once failures have lasted the budget.
    pub fn failed(&mut self) -> Option<Duration> {
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        (since.elapsed() < self.budget)
            .then(|| self.delays.next().unwrap_or(Duration::from_secs(1)))
    }

    /// The budget per run of failures.
    pub fn budget(&self) -> Duration {
        self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_counts_from_the_first_failure_of_a_run() {
        let mut budget = RetryBudget::new(Duration::from_millis(200));
        // Time before the first failure does not count.
        std::thread::sleep(Duration::from_millis(250));
        assert!(budget.failed().is_some());
        std::thread::sleep(Duration::from_millis(250));
        assert!(
            budget.failed().is_none(),
            "a run of failures outlasted the budget"
        );
        budget.progressed();
        assert!(budget.failed().is_some(), "progress restarts the budget");
    }
}
