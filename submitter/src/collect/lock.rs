//! The collector lock (one collector per batch) and the clean-up once a batch is collected.

use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tracing::info;
use warren_broker::BrokerError;
use warren_broker::connection::close_channel;
use warren_broker::topology::{amqp_name, manifest_queue, result_queue};

/// The collector lock of `batch`: an exclusive queue, owned by the collecting connection and gone
/// with it.
pub(super) fn collector_lock(batch: &str) -> String {
    format!("{}.lock", manifest_queue(batch))
}

/// How long a lock held by another connection is tried again before it counts as held: a
/// collector killed a moment ago holds it until RabbitMQ has seen its connection close.
const LOCK_GRACE: Duration = Duration::from_secs(2);
/// The pause between tries within [`LOCK_GRACE`].
const LOCK_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Takes the collector lock of `batch` for `connection`; false when another connection has held
/// it for [`LOCK_GRACE`].
pub(super) async fn take_collector_lock(
    connection: &Connection,
    batch: &str,
) -> Result<bool, BrokerError> {
    let give_up = tokio::time::Instant::now() + LOCK_GRACE;
    loop {
        if try_collector_lock(connection, batch).await? {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= give_up {
            return Ok(false);
        }
        tokio::time::sleep(LOCK_RETRY_PAUSE).await;
    }
}

/// One try at the collector lock (a refused declare closes its channel, so each try has its own).
async fn try_collector_lock(connection: &Connection, batch: &str) -> Result<bool, BrokerError> {
    let channel = connection.create_channel().await?;
    let lock = collector_lock(batch);
    let declared = channel
        .queue_declare(
            amqp_name(&lock)?,
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(_) => {
            close_channel(&channel, "locked").await;
            Ok(true)
        }
        Err(e) if is_resource_locked(&e) => Ok(false),
        Err(e) => Err(BrokerError::from_queue_error(&lock, e)),
    }
}

/// Whether the broker answered RESOURCE_LOCKED (an exclusive queue of another connection).
fn is_resource_locked(error: &lapin::Error) -> bool {
    matches!(
        warren_broker::error::amqp_kind(error),
        Some(lapin::protocol::AMQPErrorKind::Soft(
            lapin::protocol::AMQPSoftError::RESOURCELOCKED
        ))
    )
}

/// Deletes the batch's queues once every result is written; failures only leave them to expire.
/// The deletes do not hold the exit: with a queue member's node down each takes about 5 s, so
/// they get [`FINISH_DELETE_WAIT`] together and are otherwise left to their expiry.
pub(super) async fn finish(channel: &Channel, batch: &str) {
    let delete = |queue: String| async move {
        let Ok(name) = amqp_name(&queue) else { return };
        if let Err(e) = channel
            .queue_delete(name, QueueDeleteOptions::default())
            .await
        {
            info!("could not delete {queue} ({e}); it expires on its own");
        }
    };
    let both = futures_lite::future::zip(
        futures_lite::future::zip(delete(result_queue(batch)), delete(manifest_queue(batch))),
        delete(collector_lock(batch)),
    );
    if tokio::time::timeout(FINISH_DELETE_WAIT, both)
        .await
        .is_err()
    {
        info!(
            "the queues of batch {batch} were not deleted within {FINISH_DELETE_WAIT:?} (a node \
             down?); they expire on their own"
        );
    }
}

/// How long the end of a collection waits for its batch's queues to be deleted.
pub(super) const FINISH_DELETE_WAIT: Duration = Duration::from_secs(1);
