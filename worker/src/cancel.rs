//! Cancellation: what `warren cancel` recorded in the cancellations stream, and the tasks running
//! now, so that a cancelled task is not started and a running one is stopped. Each worker reads
//! the whole stream (7 days of records) when it connects and follows it from then on.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_lite::StreamExt;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use warren_broker::BrokerError;
use warren_broker::protocol::{self, Cancellation, MESSAGE_TYPE_CANCEL, PROTOCOL_VERSION};
use warren_broker::publisher::message_properties;
use warren_broker::topology::{amqp_name, cancellations_stream, declare_cancellations};

/// Records of the cancellations stream acknowledged at once while reading its history.
const HISTORY_WINDOW: u16 = 250;

/// Cancelled batches and tasks, and the tasks running now; shared by a worker's sessions.
#[derive(Clone, Default)]
pub(crate) struct Cancellations(Arc<Mutex<Inner>>);

/// Cancelled batches and tasks are kept as keyed 64-bit hashes, not strings: a week of records
/// costs a worker a few bytes each whatever their ids, and the key is this process's own, so no
/// one can make a record that matches another task.
///
/// Who may cancel is what the broker verified (`user_id`): a task is stopped only by a record
/// from the user who submitted it, or from a `--cancel-admin`. Each record is kept under its
/// sender ([`ADMIN`] for an admin) and under [`ANYONE`], which only tasks published without a
/// verified user (older clients) consult.
#[derive(Default)]
struct Inner {
    hasher: std::hash::RandomState,
    keys: HashSet<u64>,
    admins: HashSet<String>,
    running: HashMap<u64, RunningTask>,
    next_id: u64,
}

/// A running task: its batch, id, submitter, and the token that stops it.
struct RunningTask {
    batch: String,
    task: String,
    user: Option<String>,
    token: CancellationToken,
}

/// The sender under which an admin's records are kept.
const ADMIN: &str = "\0admin";
/// The sender under which every record is also kept, for tasks without a verified submitter.
const ANYONE: &str = "\0anyone";

impl Inner {
    fn key(&self, batch: &str, task: Option<&str>, sender: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one((batch, task, sender))
    }

    fn cancelled(&self, batch: &str, task: &str, submitter: Option<&str>) -> bool {
        let senders: &[&str] = match submitter {
            Some(user) => &[user, ADMIN],
            None => &[ANYONE],
        };
        senders.iter().any(|sender| {
            self.keys.contains(&self.key(batch, None, sender))
                || self.keys.contains(&self.key(batch, Some(task), sender))
        })
    }
}

/// Largest cancellations record read; larger ones are skipped (a record is an id or two).
pub(crate) const MAX_CANCELLATION_BYTES: usize = 1024;

/// A running task's registration: its token is cancelled if the task is; dropping it unregisters.
pub(crate) struct Running {
    cancellations: Cancellations,
    id: u64,
    /// Cancelled when the task is.
    pub token: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancellations.lock().running.remove(&self.id);
    }
}

impl Cancellations {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The data stays consistent under a panic elsewhere: each step is one insert or remove.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Users whose cancellations apply to every batch (`--cancel-admin`).
    pub(crate) fn with_admins(self, admins: impl IntoIterator<Item = String>) -> Self {
        self.lock().admins.extend(admins);
        self
    }

    /// Registers a task about to run, submitted by `submitter` (broker-verified); None when it
    /// is cancelled already.
    pub(crate) fn start(
        &self,
        batch: &str,
        task: &str,
        submitter: Option<&str>,
    ) -> Option<Running> {
        let mut inner = self.lock();
        if inner.cancelled(batch, task, submitter) {
            return None;
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let token = CancellationToken::new();
        inner.running.insert(
            id,
            RunningTask {
                batch: batch.to_string(),
                task: task.to_string(),
                user: submitter.map(str::to_string),
                token: token.clone(),
            },
        );
        Some(Running {
            cancellations: self.clone(),
            id,
            token,
        })
    }

    /// Records a cancellation sent by `sender` (broker-verified; None when the record carries no
    /// verified user) and stops the matching running tasks.
    pub(crate) fn record(&self, cancellation: Cancellation, sender: Option<&str>) {
        let mut inner = self.lock();
        let (batch, task) = (&cancellation.batch, cancellation.task_id.as_deref());
        let as_sender = match sender {
            Some(user) if inner.admins.contains(user) => Some(ADMIN),
            Some(user) => Some(user),
            None => None,
        };
        let keys: Vec<u64> = as_sender
            .into_iter()
            .chain([ANYONE])
            .map(|s| inner.key(batch, task, s))
            .collect();
        inner.keys.extend(keys);
        for running in inner.running.values() {
            if inner.cancelled(&running.batch, &running.task, running.user.as_deref()) {
                running.token.cancel();
            }
        }
    }
}

/// Follows the cancellations stream for as long as `connection` lives: a failure to read it (a
/// restarted node whose stream replica is not back yet, a deleted stream) is logged once and
/// retried with backoff, and recovery is logged. `caught_up` is sent once the history is read.
pub(crate) async fn follow_while_connected(
    connection: std::sync::Arc<lapin::Connection>,
    cancellations: Cancellations,
    caught_up: tokio::sync::oneshot::Sender<()>,
) {
    let mut caught_up = Some(caught_up);
    let mut pause = FOLLOW_RETRY_START;
    let mut failing = false;
    loop {
        let attempt = async {
            let channel = connection.create_channel().await?;
            follow(channel, &cancellations, &mut caught_up, failing).await
        };
        let error = match attempt.await {
            Ok(()) => continue,
            Err(e) => e,
        };
        // A connection that is lost or closing ends the session, which says so: not a fault here.
        if !connection.status().connected() {
            return;
        }
        if failing {
            debug!("still not following {}: {error}", cancellations_stream());
        } else {
            warn!(
                "not following {} ({error}); `warren cancel` does not reach \
                 this worker until it can; trying again every {FOLLOW_RETRY_CAP:?} at most",
                cancellations_stream()
            );
            failing = true;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(FOLLOW_RETRY_CAP);
    }
}

/// First pause before following the cancellations stream again after a failure.
const FOLLOW_RETRY_START: std::time::Duration = std::time::Duration::from_secs(1);
/// Longest pause between tries to follow the cancellations stream.
const FOLLOW_RETRY_CAP: std::time::Duration = std::time::Duration::from_secs(15);

/// Reads the cancellations stream from its start and records each cancellation, until the
/// consumer ends. `caught_up` is sent once every record written before the call has been read:
/// the worker appends a marker of its own and waits to read it back. Only returns on error.
// Long: one stream consumer loop whose batching of acks depends on whether the history has been
// read; the state is local to the loop.
async fn follow(
    channel: Channel,
    cancellations: &Cancellations,
    caught_up: &mut Option<tokio::sync::oneshot::Sender<()>>,
    recovering: bool,
) -> Result<(), BrokerError> {
    // Streams require a prefetch and manual acks. The history is read in large windows and
    // acknowledged in batches: one round of credit per record made a worker start in ~1 s with
    // a few thousand records.
    channel
        .basic_qos(HISTORY_WINDOW * 4, BasicQosOptions::default())
        .await?;
    declare_cancellations(&channel).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString(LongString::from("first")),
    );
    let mut consumer = channel
        .basic_consume(
            amqp_name(&cancellations_stream())?,
            "".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await?;
    if recovering {
        info!("following {} again", cancellations_stream());
    }
    // A record with no batch is a reader's marker, not a cancellation.
    let marker = protocol::new_token();
    let record = Cancellation {
        v: PROTOCOL_VERSION,
        batch: String::new(),
        task_id: Some(marker.clone()),
        at: protocol::timestamp(std::time::SystemTime::now()),
    };
    channel
        .basic_publish(
            "".into(),
            amqp_name(&cancellations_stream())?,
            BasicPublishOptions::default(),
            &protocol::encode(&record),
            message_properties(MESSAGE_TYPE_CANCEL),
        )
        .await?;
    let mut unacked = 0u16;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let mut at_marker = false;
        let record = if delivery.data.len() > MAX_CANCELLATION_BYTES {
            Err(protocol::DecodeError::Invalid(format!(
                "{} bytes, more than the {MAX_CANCELLATION_BYTES} a record may have",
                delivery.data.len()
            )))
        } else {
            protocol::decode_cancellation(&delivery.data).and_then(|c| {
                protocol::validate_id("batch", &c.batch)
                    .or_else(|e| if c.batch.is_empty() { Ok(()) } else { Err(e) })?;
                if let Some(task) = &c.task_id {
                    protocol::validate_id("task_id", task)?;
                }
                Ok(c)
            })
        };
        match record {
            Ok(c) if c.batch.is_empty() => {
                at_marker = c.task_id.as_deref() == Some(marker.as_str());
            }
            Ok(c) => {
                let sender = warren_broker::publisher::verified_user(&delivery.properties);
                debug!(batch = %c.batch, task_id = c.task_id.as_deref().unwrap_or("*"), sender, "cancellation recorded");
                cancellations.record(c, sender);
            }
            Err(e) => warn!(
                "ignoring an unreadable record in {}: {e}",
                cancellations_stream()
            ),
        }
        unacked += 1;
        // Batched while reading the history; one by one once caught up (records are rare then).
        if unacked >= HISTORY_WINDOW || at_marker || caught_up.is_none() {
            delivery.ack(BasicAckOptions { multiple: true }).await?;
            unacked = 0;
        }
        if at_marker && let Some(tx) = caught_up.take() {
            let _ = tx.send(());
        }
    }
    Err(BrokerError::ConsumerCancelled {
        queue: cancellations_stream(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cancel(batch: &str, task: Option<&str>) -> Cancellation {
        Cancellation {
            v: 1,
            batch: batch.into(),
            task_id: task.map(String::from),
            at: String::new(),
        }
    }

    #[test]
    fn cancelled_tasks_do_not_start_and_running_ones_are_stopped() {
        let c = Cancellations::default();
        let me = Some("ann");
        let a1 = c.start("a", "1", me).unwrap();
        let a2 = c.start("a", "2", me).unwrap();
        let b1 = c.start("b", "1", me).unwrap();
        c.record(cancel("a", Some("2")), me);
        assert!(!a1.token.is_cancelled() && a2.token.is_cancelled() && !b1.token.is_cancelled());
        assert!(c.start("a", "2", me).is_none());
        c.record(cancel("b", None), me);
        assert!(b1.token.is_cancelled());
        assert!(c.start("b", "anything", me).is_none());
        drop((a1, a2, b1));
        assert!(c.lock().running.is_empty());
    }

    #[test]
    fn only_the_submitter_or_an_admin_cancels_a_task() {
        let c = Cancellations::default().with_admins(["ops".to_string()]);
        let ann = c.start("a", "1", Some("ann")).unwrap();
        // Another user, or a record no broker vouched for, stops nothing of ann's.
        c.record(cancel("a", None), Some("mallory"));
        c.record(cancel("a", Some("1")), None);
        assert!(!ann.token.is_cancelled());
        assert!(c.start("a", "2", Some("ann")).is_some());
        // A task without a verified submitter (an older client) can be cancelled by anyone.
        assert!(c.start("a", "3", None).is_none());
        // An admin stops any batch.
        c.record(cancel("a", None), Some("ops"));
        assert!(ann.token.is_cancelled());
        let bob = c.start("b", "1", Some("bob")).unwrap();
        c.record(cancel("b", None), Some("bob"));
        assert!(bob.token.is_cancelled());
    }
}
