//! The worker's Prometheus metrics, served through the shared [`Endpoints`].

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts};
pub use warren_broker::endpoints::{Endpoints, HEALTH_PATH, METRICS_PATH, READY_PATH};

/// Buckets for task durations: from milliseconds (echo) to hours (large rasters).
pub const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

/// The worker's metrics and readiness. Labels are low-cardinality: `kind` only for registered
/// handlers, `reason` from a fixed set; never a task id.
#[derive(Clone)]
pub struct WorkerMetrics {
    /// Served endpoints; ready while consuming.
    pub endpoints: Endpoints,
    /// Tasks started, by kind.
    pub started: IntCounterVec,
    /// Tasks finished, by kind and status.
    pub finished: IntCounterVec,
    /// Task run time, by kind.
    pub duration: HistogramVec,
    /// Tasks running now.
    pub in_flight: IntGauge,
    /// Tasks started again after an earlier attempt, by kind.
    pub retries: IntCounterVec,
    /// Deliveries the broker flagged as redelivered.
    pub redeliveries: IntCounter,
    /// Tasks given back to the queue unfinished (grace exceeded, connection lost).
    pub returned: IntCounter,
    /// Messages dead-lettered by this worker, by reason.
    pub dead_lettered: IntCounterVec,
    /// Reconnections to the broker after a lost connection.
    pub reconnects: IntCounter,
    /// Publishes (results, retries, dead letters) the broker refused; each is tried again.
    pub publishes_refused: IntCounter,
    /// Deliveries whose publish the broker is refusing right now.
    pub publishes_refused_now: IntGauge,
    /// 1 while the task queue cannot be consumed because it has no quorum (nodes down).
    pub queue_unavailable: IntGauge,
    /// Task message bytes received.
    pub bytes_in: IntCounter,
    /// Result and dead-letter bytes published.
    pub bytes_out: IntCounter,
}

impl WorkerMetrics {
    /// Registers the worker's metrics.
    pub fn new() -> Result<Self, prometheus::Error> {
        let e = Endpoints::default();
        let counter = |name: &str, help: &str| e.register(IntCounter::new(name, help)?);
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            e.register(IntCounterVec::new(Opts::new(name, help), labels)?)
        };
        Ok(Self {
            started: counter_vec(
                "warren_worker_tasks_started_total",
                "Tasks started, by kind.",
                &["kind"],
            )?,
            finished: counter_vec(
                "warren_worker_tasks_finished_total",
                "Tasks finished, by kind and status.",
                &["kind", "status"],
            )?,
            duration: e.register(HistogramVec::new(
                HistogramOpts::new(
                    "warren_worker_task_duration_seconds",
                    "Task run time, by kind.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["kind"],
            )?)?,
            in_flight: e.register(IntGauge::new(
                "warren_worker_tasks_in_flight",
                "Tasks running now.",
            )?)?,
            retries: counter_vec(
                "warren_worker_task_retries_total",
                "Tasks started again after an earlier attempt, by kind.",
                &["kind"],
            )?,
            redeliveries: counter(
                "warren_worker_redeliveries_total",
                "Deliveries the broker flagged as redelivered.",
            )?,
            returned: counter(
                "warren_worker_tasks_returned_total",
                "Tasks given back to the queue unfinished.",
            )?,
            dead_lettered: counter_vec(
                "warren_worker_dead_lettered_total",
                "Messages dead-lettered by this worker, by reason.",
                &["reason"],
            )?,
            reconnects: counter(
                "warren_worker_broker_reconnects_total",
                "Reconnections to the broker after a lost connection.",
            )?,
            publishes_refused: counter(
                "warren_worker_publishes_refused_total",
                "Publishes (results, retries, dead letters) RabbitMQ refused; each is tried again.",
            )?,
            publishes_refused_now: e.register(IntGauge::new(
                "warren_worker_publishes_refused",
                "Deliveries whose publish RabbitMQ is refusing right now.",
            )?)?,
            queue_unavailable: e.register(IntGauge::new(
                "warren_worker_queue_unavailable",
                "1 while the task queue cannot be consumed (no quorum: nodes down).",
            )?)?,
            bytes_in: counter(
                "warren_worker_received_bytes_total",
                "Task message bytes received.",
            )?,
            bytes_out: counter(
                "warren_worker_published_bytes_total",
                "Result and dead-letter bytes published.",
            )?,
            endpoints: e,
        })
    }

    /// Marks the worker ready (consuming) or not.
    pub fn set_ready(&self, ready: bool) {
        self.endpoints.set_ready(ready);
    }

    /// Sets or clears what keeps a connected worker from working, for one `cause`; `/readyz`
    /// says it.
    pub fn set_problem(&self, cause: &'static str, problem: Option<String>) {
        self.endpoints.set_problem(cause, problem);
    }
}
