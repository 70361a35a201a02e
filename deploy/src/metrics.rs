//! The autoscaler's Prometheus metrics, served with `/healthz` and `/readyz`.

use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts};
use warren_broker::endpoints::Endpoints;

/// Every metric of the autoscaler, labelled by pool (its queue name).
#[derive(Clone)]
pub struct Metrics {
    /// Messages ready in the pool's queue.
    pub ready: GaugeVec,
    /// Messages delivered and not yet acknowledged.
    pub unacked: GaugeVec,
    /// Consumers of the queue.
    pub consumers: GaugeVec,
    /// Replicas the policy wants.
    pub desired: GaugeVec,
    /// Replicas the backend runs.
    pub current: GaugeVec,
    /// Workers that exist but are not becoming ready.
    pub stalled: GaugeVec,
    /// 1 while the pool is not grown because workers cannot start.
    pub unhealthy: GaugeVec,
    /// 1 for the depth source in use.
    pub probe_source: GaugeVec,
    /// Scale changes made, by direction.
    pub scale_events: IntCounterVec,
    /// Errors, by kind (probe, api, ...).
    pub errors: IntCounterVec,
    /// 1 while the backend answers.
    pub backend_up: GaugeVec,
    /// Time from a backlog appearing with no workers to the first worker being ready.
    pub backlog_to_ready: HistogramVec,
    /// Served endpoints (`/metrics`, `/healthz`, `/readyz`).
    pub endpoints: Endpoints,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Self, prometheus::Error> {
        let endpoints = Endpoints::default();
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            endpoints.register(GaugeVec::new(Opts::new(name, help), labels)?)
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            endpoints.register(IntCounterVec::new(Opts::new(name, help), labels)?)
        };
        let backlog_to_ready = endpoints.register(HistogramVec::new(
            HistogramOpts::new(
                "warren_autoscaler_backlog_to_ready_seconds",
                "Time from a backlog appearing with no workers to the first worker being ready.",
            )
            .buckets(vec![
                1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
            ]),
            &["pool"],
        )?)?;
        Ok(Self {
            ready: gauge(
                "warren_autoscaler_queue_ready",
                "Messages ready in the pool's queue.",
                &["pool"],
            )?,
            unacked: gauge(
                "warren_autoscaler_queue_unacked",
                "Messages being worked on (delivered, not acknowledged).",
                &["pool"],
            )?,
            consumers: gauge(
                "warren_autoscaler_queue_consumers",
                "Consumers of the pool's queue.",
                &["pool"],
            )?,
            desired: gauge(
                "warren_autoscaler_desired_replicas",
                "Workers the policy wants.",
                &["pool"],
            )?,
            current: gauge(
                "warren_autoscaler_current_replicas",
                "Workers the backend runs or is starting.",
                &["pool"],
            )?,
            stalled: gauge(
                "warren_autoscaler_stalled_workers",
                "Workers that exist but are not becoming ready.",
                &["pool"],
            )?,
            unhealthy: gauge(
                "warren_autoscaler_pool_unhealthy",
                "1 while the pool is held because workers cannot start.",
                &["pool"],
            )?,
            probe_source: gauge(
                "warren_autoscaler_probe_source",
                "1 for the queue-depth source in use.",
                &["pool", "source"],
            )?,
            scale_events: counter(
                "warren_autoscaler_scale_events_total",
                "Scale changes made.",
                &["pool", "direction"],
            )?,
            backend_up: gauge(
                "warren_autoscaler_backend_up",
                "1 while the backend (the Kubernetes API, or the local processes) answers.",
                &["pool"],
            )?,
            errors: counter(
                "warren_autoscaler_errors_total",
                "Errors by kind.",
                &["pool", "kind"],
            )?,
            backlog_to_ready,
            endpoints: endpoints.clone(),
        })
    }

    /// Marks the autoscaler ready (it has completed a poll).
    pub fn set_ready(&self, ready: bool) {
        self.endpoints.set_ready(ready);
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        self.endpoints.render()
    }
}
