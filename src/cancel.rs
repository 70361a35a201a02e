//! `warren cancel`: records a cancellation in the stream every worker follows.

use warren_broker::AmqpSettings;
use warren_broker::BrokerError;
use warren_broker::connection::close_connection;
use warren_broker::connection::connect;
use warren_broker::protocol::{self, Cancellation, MESSAGE_TYPE_CANCEL, PROTOCOL_VERSION};
use warren_broker::publisher::{Publisher, message_properties};
use warren_broker::topology::{self, cancellations_stream, result_queue};

use crate::cli::*;

/// Runs `warren cancel BATCH [--task ID]`; returns the exit status.
pub async fn cancel(amqp: AmqpSettings, batch: &str, task: Option<&str>) -> u8 {
    let cancellation = Cancellation {
        v: PROTOCOL_VERSION,
        batch: batch.to_string(),
        task_id: task.map(String::from),
        at: protocol::timestamp(std::time::SystemTime::now()),
    };
    let recorded = async {
        let connection = connect(&amqp, &connection_name("cancel")).await?;
        let publisher = Publisher::open(&connection).await?;
        // A batch that is gone cannot be cancelled; say so rather than record nothing useful.
        topology::inspect(publisher.channel(), &result_queue(batch)).await?;
        topology::declare_cancellations(publisher.channel()).await?;
        publisher
            .publish(
                &cancellations_stream(),
                &protocol::encode(&cancellation),
                message_properties(MESSAGE_TYPE_CANCEL),
            )
            .await?;
        close_connection(&connection, "done").await;
        Ok::<(), BrokerError>(())
    };
    match recorded.await {
        Ok(()) => {
            let what = task.map_or_else(
                || format!("batch {batch}"),
                |t| format!("task {t} of batch {batch}"),
            );
            eprintln!(
                "cancelled {what}: workers answer its queued tasks `cancelled` without running them \
                 and stop the running ones; `warren wait {batch}` ends once every task is answered"
            );
            EXIT_OK
        }
        Err(BrokerError::QueueNotFound { .. }) => fail(&format!(
            "batch {batch} not found: it was never submitted, was already collected, or expired"
        )),
        Err(e) => fail(&format!("nothing was cancelled: {e}")),
    }
}
