//! `warren batches`: the batches the broker holds, from their result and manifest queues: size,
//! what was collected, results waiting, whether a collector holds them, age and expiry.

use std::time::{Duration, SystemTime};

use lapin::options::BasicGetOptions;
use serde::Serialize;
use warren_broker::connection::connect;
use warren_broker::connection::{close_channel, close_connection};
use warren_broker::depth::{Management, ManagementTarget};
use warren_broker::protocol;
use warren_broker::topology::{amqp_name, manifest_queue, result_queue_prefix};
use warren_broker::{AmqpSettings, BrokerError};

use crate::seqset::SeqSet;

/// One batch the broker holds.
#[derive(Debug, Clone, Serialize)]
pub struct BatchInfo {
    /// Batch id.
    pub batch: String,
    /// Task queue it was submitted to (from its manifest).
    pub queue: Option<String>,
    /// Tasks in it, once its manifest is published.
    pub total: Option<u32>,
    /// Results already collected (written out by a `wait`).
    pub collected: u64,
    /// Results waiting in the broker to be collected.
    pub waiting: u64,
    /// A `warren wait` holds it now.
    pub collecting: bool,
    /// Seconds since it was submitted (from its time-ordered id).
    pub age_s: Option<u64>,
    /// Seconds until RabbitMQ deletes it if nobody uses it.
    pub expires_in_s: Option<u64>,
}

/// Lists the batches the broker holds, oldest first. Needs the management API (listing queues is
/// not part of AMQP); manifests are read with `basic.get` and given back.
pub async fn list_batches(
    settings: &AmqpSettings,
    management: &ManagementTarget,
) -> Result<Vec<BatchInfo>, BrokerError> {
    let api = Management::new(management, settings)?;
    let prefix = result_queue_prefix();
    let queues = api.queues(&prefix).await?;
    let connection = connect(settings, "warren-batches").await?;
    let now = SystemTime::now();
    let mut batches = Vec::with_capacity(queues.len());
    for queue in queues {
        let batch = queue.name[prefix.len()..].to_string();
        let manifest = newest_manifest(&connection, &batch).await;
        let idle = queue
            .idle_since
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339_weak(&t.replace(' ', "T")).ok())
            .and_then(|since| now.duration_since(since).ok());
        batches.push(BatchInfo {
            age_s: submitted_at(&batch)
                .and_then(|at| now.duration_since(at).ok())
                .map(|d| d.as_secs()),
            expires_in_s: queue.expires_ms.map(|ms| {
                Duration::from_millis(ms)
                    .saturating_sub(idle.unwrap_or_default())
                    .as_secs()
            }),
            queue: manifest.as_ref().map(|m| m.queue.clone()),
            total: manifest.as_ref().map(|m| m.total),
            collected: manifest
                .as_ref()
                .map_or(0, |m| SeqSet::from_ranges(&m.collected).len()),
            waiting: queue.messages,
            collecting: queue.consumers > 0,
            batch,
        });
    }
    close_connection(&connection, "done").await;
    batches.sort_by_key(|b| std::cmp::Reverse(b.age_s));
    Ok(batches)
}

/// The batch's newest manifest, read and given back (its channel closes without acking).
async fn newest_manifest(
    connection: &lapin::Connection,
    batch: &str,
) -> Option<protocol::BatchManifest> {
    let channel = connection.create_channel().await.ok()?;
    let queue = manifest_queue(batch);
    let mut newest: Option<protocol::BatchManifest> = None;
    while let Ok(Some(message)) = channel
        .basic_get(amqp_name(&queue).ok()?, BasicGetOptions::default())
        .await
    {
        if let Ok(m) =
            protocol::decode_manifest(&message.delivery.data, protocol::DEFAULT_MAX_MESSAGE_BYTES)
            && newest.as_ref().is_none_or(|n| m.generation >= n.generation)
        {
            newest = Some(m);
        }
    }
    close_channel(&channel, "done").await;
    newest
}

/// When a batch was submitted, from its UUIDv7 id (None for ids of other shapes).
fn submitted_at(batch: &str) -> Option<SystemTime> {
    let (secs, nanos) = uuid::Uuid::parse_str(batch)
        .ok()?
        .get_timestamp()?
        .to_unix();
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs, nanos))
}
