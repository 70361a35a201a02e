//! An open batch: tasks added one at a time and results read as they come, for programs that
//! react to each result (interactive use, pipelines whose next step depends on the last).

use std::time::SystemTime;

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use warren_broker::BrokerError;
use warren_broker::connection::consumer_channel;
use warren_broker::protocol::{
    self, DEAD_REASON_FOREIGN_RESULT, DEAD_REASON_UNREADABLE_RESULT, ResultEnvelope,
};
use warren_broker::publisher::Publisher;
use warren_broker::topology::{self, amqp_name, dead_letter_queue, manifest_queue, result_queue};

use crate::checkpoint::{SetAside, set_aside};

use crate::spec::TaskSpec;
use crate::submit::{SubmitError, SubmitOptions, Submitter, encode_task};

/// Largest result message read.
const MAX_RESULT_BYTES: usize = 64 << 20;

/// A batch that stays open: [`OpenBatch::submit`] adds a task, [`OpenBatch::next_result`] reads a
/// result. A result is acknowledged when [`OpenBatch::acknowledge`] is called, the next one is
/// requested, or the batch is closed, so handle it before any of these; one not yet acknowledged
/// is redelivered if the process dies. Results come at least once: compare `seq` to drop a
/// repeat. A message of the result queue that is not this batch's result (unreadable, or without
/// the batch's token) is moved to the task queue's dead-letter queue with why, and reading goes on.
pub struct OpenBatch {
    batch: String,
    /// The batch's secret; results without it are not the workers'.
    token: String,
    options: SubmitOptions,
    publisher: Publisher,
    results: Channel,
    consumer: Consumer,
    next_seq: u32,
    unacked: Option<Delivery>,
}

impl Submitter {
    /// Opens a batch on this submitter's connection.
    pub async fn open_batch(&mut self, options: &SubmitOptions) -> Result<OpenBatch, SubmitError> {
        let batch = protocol::new_id();
        let (connection, publisher) = self.connection().await?;
        let publisher = publisher.clone();
        if !options.create_queue {
            topology::require_task_queue(connection, &options.queue).await?;
        }
        topology::declare_task_queue(publisher.channel(), &options.queue).await?;
        topology::declare_batch_queues(
            publisher.channel(),
            &batch,
            &options.queue,
            options.result_expiry,
        )
        .await?;
        let results = consumer_channel(connection, 256).await?;
        let consumer = results
            .basic_consume(
                amqp_name(&result_queue(&batch))?,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::from)?;
        Ok(OpenBatch {
            batch,
            token: protocol::new_token(),
            options: options.clone(),
            publisher,
            results,
            consumer,
            next_seq: 0,
            unacked: None,
        })
    }
}

impl OpenBatch {
    /// The batch id.
    pub fn id(&self) -> &str {
        &self.batch
    }

    /// Publishes one task and waits for the broker's confirm; returns its `seq`.
    pub async fn submit(&mut self, spec: &TaskSpec) -> Result<u32, SubmitError> {
        let seq = self.next_seq;
        let submitted_at = protocol::timestamp(SystemTime::now());
        let (body, properties) = encode_task(
            spec,
            &self.batch,
            &self.token,
            seq,
            &submitted_at,
            &self.options,
        )?;
        self.publisher
            .publish(&self.options.queue, &body, properties)
            .await?;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Waits for the next result, acknowledging the previous one.
    pub async fn next_result(&mut self) -> Result<ResultEnvelope, BrokerError> {
        self.ack_previous().await?;
        loop {
            let delivery = match self.consumer.next().await {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e.into()),
                None => {
                    return Err(BrokerError::InvalidInput(format!(
                        "the result queue of batch {} was deleted",
                        self.batch
                    )));
                }
            };
            let (reason, detail) = match protocol::decode_result(&delivery.data, MAX_RESULT_BYTES) {
                Ok(result) if result.token.as_deref() == Some(self.token.as_str()) => {
                    self.unacked = Some(delivery);
                    return Ok(result);
                }
                Ok(result) => (
                    DEAD_REASON_FOREIGN_RESULT,
                    format!(
                        "result of task '{}' does not carry the batch's token (published by someone \
                         other than a worker running one of its tasks)",
                        result.task_id
                    ),
                ),
                Err(e) => (DEAD_REASON_UNREADABLE_RESULT, e.to_string()),
            };
            self.set_aside(&delivery, reason, &detail).await?;
        }
    }

    /// Moves a message of the result queue that is not this batch's result to the task queue's
    /// dead-letter queue, with why, as the collector does: kept for `warren dlq`, never dropped.
    async fn set_aside(
        &self,
        delivery: &Delivery,
        reason: &str,
        detail: &str,
    ) -> Result<(), BrokerError> {
        tracing::warn!(batch = %self.batch, "dead-lettering a message of the result queue: {detail}");
        let moved = set_aside(
            &self.results,
            &self.publisher,
            delivery,
            &result_queue(&self.batch),
            Some(&dead_letter_queue(&self.options.queue)),
            "open batch",
            (reason, detail),
        )
        .await?;
        if moved == SetAside::Copied {
            delivery.ack(BasicAckOptions::default()).await?;
        }
        Ok(())
    }

    /// Acknowledges the result [`OpenBatch::next_result`] returned last, now rather than at the
    /// next `next_result` (nothing happens when it is already acknowledged). Call it once that
    /// result is safely handled:
    /// - a program that works on a result for long before asking for the next keeps it
    ///   unacknowledged meanwhile, and RabbitMQ closes a channel that holds one longer than its
    ///   `consumer_timeout` (30 minutes by default);
    /// - called before the next task is submitted, the broker settles the result before that task
    ///   runs, instead of writing the settle to disk while the task's own result waits behind it
    ///   (in the pipeline bench, 0.19 ms less from a result's publish to its delivery).
    pub async fn acknowledge(&mut self) -> Result<(), BrokerError> {
        self.ack_previous().await
    }

    /// Acknowledges the last result and deletes the batch's queues.
    pub async fn close(mut self) -> Result<(), BrokerError> {
        self.ack_previous().await?;
        for queue in [result_queue(&self.batch), manifest_queue(&self.batch)] {
            self.results
                .queue_delete(amqp_name(&queue)?, QueueDeleteOptions::default())
                .await?;
        }
        Ok(())
    }

    async fn ack_previous(&mut self) -> Result<(), BrokerError> {
        if let Some(previous) = self.unacked.take() {
            previous.ack(BasicAckOptions::default()).await?;
        }
        Ok(())
    }
}
