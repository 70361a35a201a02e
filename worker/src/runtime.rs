//! The worker loop: connect, declare, consume with manual acks, and on a lost connection
//! reconnect with capped, jittered backoff and start over. On shutdown it stops taking tasks,
//! lets running ones finish within the grace period, and returns the rest to the queue.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions};
use lapin::types::{FieldTable, ShortString};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::{debug, error, info, warn};
use warren_broker::connection::close_connection;
use warren_broker::connection::{connect, consumer_channel, reconnect_delays};
use warren_broker::publisher::Publisher;
use warren_broker::topology::{self, amqp_name};
use warren_broker::{AmqpSettings, BrokerError};

use crate::cancel::{self, Cancellations};
use crate::delivery::{self, Context};
use crate::handler::{Handler, Registry};
use crate::handlers::{self, exec::ExecPolicy};
use crate::logbook::{Logbook, host_name};
use crate::metrics::WorkerMetrics;
use crate::settle::Settler;

/// Default task time limit when a task does not set `timeout_s`.
pub const DEFAULT_TASK_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest wait, at connect, for the cancellations recorded so far to be read.
const CANCELLATIONS_CATCH_UP: Duration = Duration::from_secs(5);
/// A consume not answered within this long is reported as a queue without quorum.
const CONSUME_SLOW: Duration = Duration::from_secs(10);
/// A session that lasted this long was healthy: the reconnect backoff starts over after it.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// Default for [`WorkerConfig::publish_retry_for`]: outlasts a quorum queue's leader election and
/// a node restart (20-30 s), so such refusals never cost a task a run.
pub const DEFAULT_PUBLISH_RETRY_FOR: Duration = Duration::from_secs(300);
/// Default for [`WorkerConfig::confirm_timeout`]: far beyond a loaded broker's slowest confirm.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Default largest task message accepted.
pub use warren_broker::protocol::DEFAULT_MAX_MESSAGE_BYTES;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Broker connection.
    pub amqp: AmqpSettings,
    /// Task queue to consume.
    pub queue: String,
    /// Tasks run at once.
    pub concurrency: u16,
    /// Deliveries the broker may send ahead (AMQP prefetch); None means `concurrency`, so the
    /// worker never holds a task it has not started. More helps pools of very short tasks, at the
    /// cost of tasks held unstarted: they count a delivery each time their worker dies, and wait
    /// behind this worker's running ones.
    pub prefetch: Option<u16>,
    /// Name in results, logs and the broker's connection list (the pod name on Kubernetes).
    pub name: String,
    /// How long running tasks may take to finish after a shutdown signal.
    pub grace: Duration,
    /// Time limit of tasks that set none.
    pub default_timeout: Duration,
    /// Largest task message accepted; larger ones are dead-lettered.
    pub max_message_bytes: usize,
    /// Longest wait between reconnection attempts.
    pub reconnect_cap: Duration,
    /// Where to serve `/healthz`, `/readyz` and `/metrics`; None serves nothing.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Users whose `warren cancel` applies to every batch; anyone else's only to the batches
    /// they submitted (as RabbitMQ verified: the `user_id` of the task and of the record).
    pub cancel_admins: Vec<String>,
    /// How long a publish the broker refuses (a result, a retry, a dead letter) is tried again,
    /// from the first refusal, before the task goes back to the queue to be run again.
    pub publish_retry_for: Duration,
    /// How long a publish (a result, a retry, a dead letter) waits for its confirm. One not
    /// confirmed by then counts as refused: it is sent again on a fresh channel, within
    /// `publish_retry_for`, rather than leaving its task unanswered for good.
    pub confirm_timeout: Duration,
}

impl WorkerConfig {
    /// Defaults for consuming `queue` on a local broker.
    pub fn new(queue: impl Into<String>) -> Self {
        Self {
            amqp: AmqpSettings::default(),
            queue: queue.into(),
            concurrency: 4,
            prefetch: None,
            name: default_name(),
            grace: Duration::from_secs(30),
            default_timeout: DEFAULT_TASK_TIMEOUT,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            reconnect_cap: Duration::from_secs(10),
            metrics_addr: None,
            publish_retry_for: DEFAULT_PUBLISH_RETRY_FOR,
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
            cancel_admins: Vec::new(),
        }
    }
}

/// `POD_NAME`, else `HOSTNAME`, else `worker`, followed by the process id.
pub fn default_name() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// A worker: a configuration and the handlers it runs.
///
/// ```no_run
/// # async fn demo() -> Result<(), warren_worker::WorkerError> {
/// use warren_worker::{Worker, WorkerConfig, Task, HandlerResult};
/// let worker = Worker::new(WorkerConfig::new("warren.tasks"))
///     .handler("double", |task: Task| async move {
///         let n: i64 = task.args_as()?;
///         HandlerResult::Ok(serde_json::json!(n * 2))
///     });
/// worker.run(warren_worker::shutdown_signal()).await
/// # }
/// ```
pub struct Worker {
    config: WorkerConfig,
    registry: Registry,
    cancellations: Cancellations,
}

/// Why a worker stopped other than by a shutdown request.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Configuration, credentials or topology are wrong; retrying cannot help.
    #[error("{0}")]
    Fatal(#[from] BrokerError),
    /// The worker was built wrongly.
    #[error("{0}")]
    Config(String),
}

impl Worker {
    /// A worker with the `echo` and `sleep` handlers and no `exec`.
    pub fn new(config: WorkerConfig) -> Self {
        let mut registry = Registry::default();
        registry.insert("echo", handlers::echo);
        registry.insert("sleep", handlers::sleep);
        let cancellations = Cancellations::default().with_admins(config.cancel_admins.clone());
        Self {
            config,
            registry,
            cancellations,
        }
    }

    /// Adds the `exec` handler with `policy`.
    pub fn with_exec(self, policy: ExecPolicy) -> Self {
        self.handler("exec", handlers::exec::handler(policy))
    }

    /// Registers `handler` for tasks of `kind`.
    pub fn handler(mut self, kind: &str, handler: impl Handler) -> Self {
        self.registry.insert(kind, handler);
        self
    }

    /// Runs until `shutdown` completes, then drains and returns Ok. Returns an error only for
    /// problems that retrying cannot fix (refused credentials, a queue declared differently).
    // Long: the reconnect loop: each session outcome (stopped, fatal, retry) with its own backoff,
    // message and metric.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
        if self.config.concurrency == 0 {
            return Err(WorkerError::Config("concurrency must be at least 1".into()));
        }
        amqp_name(&self.config.queue)?;
        // Metrics are recorded only when served, so "off" costs nothing at all.
        let metrics = match self.config.metrics_addr {
            Some(addr) => {
                let health = WorkerMetrics::new()
                    .map_err(|e| WorkerError::Config(format!("cannot register metrics: {e}")))?;
                health.endpoints.clone().spawn(addr).await.map_err(|e| {
                    WorkerError::Config(format!("cannot serve metrics on {addr}: {e}"))
                })?;
                Some(health)
            }
            None => None,
        };
        let stop = CancellationToken::new();
        let stop_on_signal = stop.clone();
        let grace = self.config.grace;
        // The pool's loop runs as a task of the runtime's worker threads, not on the caller's
        // thread (a `block_on` in main): the deliveries it spawns then start on the thread that
        // received them, where from outside the pool each would wake another thread.
        let main = tokio::spawn(async move {
            let stop = &stop;
            let metrics = &metrics;
            let mut delays = reconnect_delays(self.config.reconnect_cap);
            let mut sessions = 0u64;
            let mut unavailable_since: Option<tokio::time::Instant> = None;
            loop {
                let started = tokio::time::Instant::now();
                let outcome = self
                    .session(
                        stop,
                        metrics.as_ref(),
                        &mut sessions,
                        &mut unavailable_since,
                    )
                    .await;
                // After a healthy stretch a new failure is a new incident: start from short delays.
                if started.elapsed() >= HEALTHY_SESSION {
                    delays = reconnect_delays(self.config.reconnect_cap);
                }
                match outcome {
                    Ok(()) => return Ok(()),
                    Err(e) if e.is_fatal() => {
                        error!("{e}");
                        return Err(WorkerError::Fatal(e));
                    }
                    Err(e @ BrokerError::QueueUnavailable { .. }) => {
                        let delay = delays.next().unwrap_or(self.config.reconnect_cap);
                        // Said once per outage, then quietly retried until the queue is back.
                        if unavailable_since.is_none() {
                            warn!(
                                "cannot consume: {e}; no task runs here until it is back, trying again every {:?} at most",
                                self.config.reconnect_cap
                            );
                            unavailable_since = Some(tokio::time::Instant::now());
                            if let Some(m) = &metrics {
                                m.queue_unavailable.set(1);
                                m.set_problem("queue unavailable", Some(e.to_string()));
                            }
                        } else {
                            debug!("task queue still unavailable: {e}; retrying in {delay:.1?}");
                        }
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            () = stop.cancelled() => return Ok(()),
                        }
                    }
                    Err(e) => {
                        let delay = delays.next().unwrap_or(self.config.reconnect_cap);
                        warn!("broker connection lost: {e}; reconnecting in {delay:.1?}");
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            () = stop.cancelled() => return Ok(()),
                        }
                    }
                }
                if stop.is_cancelled() {
                    return Ok(());
                }
            }
        });
        let mut main = AbortOnDropHandle::new(main);
        let ended = tokio::select! {
            ended = &mut main => ended,
            () = shutdown => {
                info!("shutdown requested: no new tasks; running ones have {grace:?} to finish");
                stop_on_signal.cancel();
                main.await
            }
        };
        match ended {
            Ok(ended) => ended,
            // A panic in the loop is a bug: it goes on as if the loop had run here.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: the runtime is shutting down, and this worker with it.
            Err(_) => Ok(()),
        }
    }

    /// Starts consuming the task queue, saying (once per outage) when RabbitMQ is slow to start
    /// the consumer, and that the queue is back once it does.
    async fn consume(
        &self,
        channel: &lapin::Channel,
        tag: ShortString,
        metrics: Option<&WorkerMetrics>,
        unavailable_since: &mut Option<tokio::time::Instant>,
    ) -> Result<lapin::Consumer, BrokerError> {
        let cfg = &self.config;
        let consume = channel.basic_consume(
            amqp_name(&cfg.queue)?,
            tag,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        );
        tokio::pin!(consume);
        // A quorum queue without a majority leaves a consume unanswered for about 65 s before
        // failing it: say so long before that, once per outage.
        let consumed = tokio::select! {
            consumed = &mut consume => consumed,
            () = tokio::time::sleep(CONSUME_SLOW) => {
                if unavailable_since.is_none() {
                    let problem = format!(
                        "RabbitMQ has not started the consumer of '{}' after {CONSUME_SLOW:?}: the \
                         queue has probably lost its quorum (a majority of its nodes down); \
                         waiting for it",
                        cfg.queue
                    );
                    warn!("{problem}");
                    *unavailable_since = Some(tokio::time::Instant::now());
                    if let Some(m) = metrics {
                        m.queue_unavailable.set(1);
                        m.set_problem("queue unavailable", Some(problem));
                    }
                }
                consume.await
            }
        };
        let consumer = consumed.map_err(|e| BrokerError::from_queue_error(&cfg.queue, e))?;
        if let Some(since) = unavailable_since.take() {
            info!(queue = %cfg.queue, "the task queue is available again after {:.0?}", since.elapsed());
            if let Some(m) = metrics {
                m.queue_unavailable.set(0);
                m.set_problem("queue unavailable", None);
            }
        }
        Ok(consumer)
    }

    /// One connection's life. Ok(()) after a requested shutdown; Err when the connection failed.
    // Long: one connection's life in order: open, catch up on cancellations, consume, run, then
    // drain or abandon; the tracker, slots and abandon token are shared by every stage.
    async fn session(
        &self,
        stop: &CancellationToken,
        metrics: Option<&WorkerMetrics>,
        sessions: &mut u64,
        unavailable_since: &mut Option<tokio::time::Instant>,
    ) -> Result<(), BrokerError> {
        let cfg = &self.config;
        let connection = Arc::new(connect(&cfg.amqp, &cfg.name).await?);
        let publisher = Publisher::open(&connection).await?;
        let prefetch = cfg.prefetch.unwrap_or(cfg.concurrency).max(1);
        let channel = consumer_channel(&connection, prefetch).await?;
        topology::declare_task_queue(&channel, &cfg.queue).await?;
        topology::try_declare_logs(&connection).await;
        // Cancellations are read before any task is taken, so a cancelled task is not started.
        let (caught_up, is_caught_up) = tokio::sync::oneshot::channel();
        let _follower = AbortOnDropHandle::new(tokio::spawn(cancel::follow_while_connected(
            Arc::clone(&connection),
            self.cancellations.clone(),
            caught_up,
        )));
        if tokio::time::timeout(CANCELLATIONS_CATCH_UP, is_caught_up)
            .await
            .is_err()
        {
            warn!(
                "the cancellations were not all read within {CANCELLATIONS_CATCH_UP:?}; going on"
            );
        }
        let tag = ShortString::try_new(cfg.name.as_str()).unwrap_or_else(|_| ShortString::from(""));
        let mut consumer = self
            .consume(&channel, tag.clone(), metrics, unavailable_since)
            .await?;
        info!(queue = %cfg.queue, concurrency = cfg.concurrency, prefetch, worker = %cfg.name, url = %cfg.amqp.redacted_url(), "consuming");
        // A task waiting for its record holds its slot and its unacknowledged delivery.
        let slots = usize::from(cfg.concurrency.min(prefetch));
        let logbook = Logbook::new(host_name(), publisher.clone(), slots);
        let ctx = Arc::new(Context {
            worker: cfg.name.clone(),
            queue: cfg.queue.clone(),
            registry: self.registry.clone(),
            publisher,
            connection: Arc::clone(&connection),
            default_timeout: cfg.default_timeout,
            max_message_bytes: cfg.max_message_bytes,
            metrics: metrics.cloned(),
            cancellations: self.cancellations.clone(),
            publish_retry_for: cfg.publish_retry_for,
            confirm_timeout: cfg.confirm_timeout,
            refused: Arc::default(),
            logbook,
            settler: Settler::spawn(channel.clone()),
        });
        *sessions += 1;
        if let Some(m) = metrics {
            m.set_ready(true);
            if *sessions > 1 {
                m.reconnects.inc();
            }
        }
        let abandon = CancellationToken::new();
        let tracker = TaskTracker::new();
        // At most `concurrency` tasks run; with a larger prefetch the rest wait for a slot.
        let slots = Arc::new(Semaphore::new(usize::from(cfg.concurrency)));
        let start = |d: Delivery| {
            ctx.settler.arrived(&d);
            when_free(
                Arc::clone(&slots),
                stop.clone(),
                Arc::clone(&ctx),
                d,
                abandon.clone(),
            )
        };
        let lost = loop {
            tokio::select! {
                () = stop.cancelled() => break None,
                next = consumer.next() => match next {
                    Some(Ok(d)) => { tracker.spawn(start(d)); }
                    Some(Err(e)) => break Some(BrokerError::from(e)),
                    None => break Some(BrokerError::ConsumerCancelled { queue: cfg.queue.clone() }),
                },
            }
        };
        if let Some(m) = metrics {
            m.set_ready(false);
        }
        if let Some(error) = lost {
            // The broker requeues everything unacknowledged on this connection; running copies
            // could never be acknowledged, so stop them.
            abandon.cancel();
            tracker.close();
            tracker.wait().await;
            return Err(error);
        }
        // Shutdown: stop deliveries, then start whatever was already on the wire.
        let _ = channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await;
        while let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
        {
            tracker.spawn(start(d));
        }
        tracker.close();
        if tokio::time::timeout(cfg.grace, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                "grace period over: returning {} unfinished task(s) to the queue",
                tracker.len()
            );
            abandon.cancel();
            tracker.wait().await;
        }
        close_connection(&connection, "worker shutting down").await;
        info!("worker stopped");
        Ok(())
    }
}

/// Runs a delivery once a slot is free. A delivery still waiting for one when the worker stops
/// (or its connection is lost) goes back to the queue unstarted.
async fn when_free(
    slots: Arc<Semaphore>,
    stop: CancellationToken,
    ctx: Arc<Context>,
    delivery: Delivery,
    abandon: CancellationToken,
) {
    // While the broker refuses this worker's publishes, a new task would only produce a result
    // with nowhere to go: wait for the refusals to end before starting one.
    let permit = tokio::select! {
        biased;
        permit = async {
            let permit = slots.acquire_owned().await.ok();
            ctx.refused.wait_until_clear().await;
            permit
        } => permit,
        () = stop.cancelled() => None,
        () = abandon.cancelled() => None,
    };
    match permit {
        Some(_running) => delivery::process(ctx, delivery, abandon).await,
        None => {
            let _ = ctx.settler.requeue(&delivery).await;
        }
    }
}
