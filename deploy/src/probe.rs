//! Queue depth for the policy, from a passive declare over AMQP (ready) and the management API
//! (in-flight and consumers), whichever answer.

use lapin::{Channel, Connection};
use tracing::{info, warn};
use warren_broker::connection::connect;
use warren_broker::depth::{
    DepthSource, Management, ManagementTarget, QueueDepth, WorkerLoad, combine, passive_depth,
};
use warren_broker::{AmqpSettings, BrokerError, topology};

/// Probes one queue's depth, remembering which source works.
pub struct DepthProbe {
    amqp: AmqpSettings,
    management: Option<Management>,
    connection: Option<Connection>,
    channel: Option<Channel>,
    last_source: Option<DepthSource>,
    declare_missing: bool,
}

impl DepthProbe {
    /// A probe using the management API of `target`.
    pub fn new(amqp: AmqpSettings, target: &ManagementTarget) -> Self {
        let management = match Management::new(target, &amqp) {
            Ok(m) => Some(m),
            Err(e) => {
                warn!(
                    "management API not usable ({e}); queue depth will come from passive declares (ready only)"
                );
                None
            }
        };
        Self {
            amqp,
            management,
            connection: None,
            channel: None,
            last_source: None,
            declare_missing: true,
        }
    }

    /// Whether a task queue that does not exist is declared (default) or only reported empty
    /// (for a dry run, which changes nothing).
    pub fn declaring_missing(mut self, declare: bool) -> Self {
        self.declare_missing = declare;
        self
    }

    /// The depth of `queue`: `ready` from a passive declare (exact and immediate), `unacked` and
    /// `consumers` from the management API (refreshed every few seconds). Either alone will do;
    /// a queue that does not exist yet is empty. Logs whenever the source changes.
    pub async fn depth(&mut self, queue: &str) -> Result<QueueDepth, BrokerError> {
        let passive = self.passive(queue).await;
        let api = match &self.management {
            Some(api) => api.queue(queue).await,
            None => Err(BrokerError::Unavailable(
                "no management API configured".into(),
            )),
        };
        if let (Ok(_), Err(e)) = (&passive, &api)
            && self.last_source != Some(DepthSource::PassiveDeclare)
        {
            warn!(
                queue,
                "management API unavailable ({e}): in-flight tasks are invisible, so scale-down relies on the idle timers"
            );
        }
        let depth = match combine(passive, api) {
            Ok(depth) => depth,
            // A queue nobody has declared yet has no work.
            Err(BrokerError::QueueNotFound { .. }) => QueueDepth {
                queue: queue.to_string(),
                ready: 0,
                unacked: Some(0),
                consumers: 0,
                publish_rate: None,
                ack_rate: None,
                source: DepthSource::PassiveDeclare,
            },
            Err(e) => return Err(e),
        };
        if self.last_source != Some(depth.source) {
            info!(queue, source = ?depth.source, "queue depth source");
            self.last_source = Some(depth.source);
        }
        Ok(depth)
    }

    /// Which workers hold how many tasks; empty when the API is unavailable.
    pub async fn worker_loads(&self, queue: &str) -> Vec<WorkerLoad> {
        match &self.management {
            Some(api) => api.worker_loads(queue).await.unwrap_or_else(|e| {
                warn!(queue, "cannot tell idle workers from busy ones ({e}); scale-down relies on graceful drain");
                Vec::new()
            }),
            None => Vec::new(),
        }
    }

    async fn passive(&mut self, queue: &str) -> Result<QueueDepth, BrokerError> {
        if !self
            .connection
            .as_ref()
            .is_some_and(|c| c.status().connected())
        {
            self.connection = Some(connect(&self.amqp, "warren-autoscaler").await?);
            self.channel = None;
        }
        let connection = self
            .connection
            .as_ref()
            .ok_or_else(|| BrokerError::Bug("no connection after connecting".into()))?;
        if !self
            .channel
            .as_ref()
            .is_some_and(|ch| ch.status().connected())
        {
            self.channel = Some(connection.create_channel().await?);
        }
        let channel = self
            .channel
            .as_ref()
            .ok_or_else(|| BrokerError::Bug("no channel after opening one".into()))?;
        // A failed declare (e.g. no such queue) closes only the channel; it is reopened next time.
        match passive_depth(channel, queue).await {
            Err(BrokerError::QueueNotFound { .. }) if self.declare_missing => {
                // This pool serves the queue, so it creates it: `warren submit` refuses a queue
                // nobody declared, and a pool at zero workers has nobody else to declare it.
                let channel = connection.create_channel().await?;
                topology::declare_task_queue(&channel, queue).await?;
                info!(queue, "declared the task queue this pool serves");
                let depth = passive_depth(&channel, queue).await;
                self.channel = Some(channel);
                depth
            }
            other => other,
        }
    }
}
