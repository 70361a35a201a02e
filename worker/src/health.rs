//! HTTP endpoints of a long-running Warren process: `/healthz` (the process is alive), `/readyz`
//! (connected and working), and `/metrics` (Prometheus text format). Workers and the autoscaler
//! both serve them through [`Endpoints`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use tracing::{info, warn};

/// Liveness path.
pub const HEALTH_PATH: &str = "/healthz";
/// Readiness path.
pub const READY_PATH: &str = "/readyz";
/// Metrics path.
pub const METRICS_PATH: &str = "/metrics";

/// A metrics registry and a readiness flag, served over HTTP.
#[derive(Clone, Default)]
pub struct Endpoints {
    /// Where the process registers its metrics.
    pub registry: Registry,
    ready: Arc<AtomicBool>,
    names: Arc<Mutex<Vec<String>>>,
    /// When set, `/healthz` fails once no [`Endpoints::beat`] came for this long.
    stale_after: Option<std::time::Duration>,
    last_beat: Arc<Mutex<Option<std::time::Instant>>>,
}

impl Endpoints {
    /// Registers `collector` and remembers its metric names; returns it for use.
    pub fn register<C: Collector + Clone + 'static>(
        &self,
        collector: C,
    ) -> Result<C, prometheus::Error> {
        let names = collector
            .desc()
            .iter()
            .map(|d| d.fq_name.clone())
            .collect::<Vec<_>>();
        self.registry.register(Box::new(collector.clone()))?;
        if let Ok(mut known) = self.names.lock() {
            known.extend(names);
        }
        Ok(collector)
    }

    /// Every metric name registered through [`Endpoints::register`], including those that have
    /// no samples yet (Prometheus pages omit those).
    pub fn metric_names(&self) -> Vec<String> {
        self.names.lock().map(|n| n.clone()).unwrap_or_default()
    }

    /// Makes `/healthz` fail when [`Endpoints::beat`] has not been called for `after` (once it
    /// has been called at all): a control loop that hangs is then restarted by its supervisor.
    pub fn fail_health_when_stale(mut self, after: std::time::Duration) -> Self {
        self.stale_after = Some(after);
        self
    }

    /// Records that the process's loop completed a round.
    pub fn beat(&self) {
        if let Ok(mut last) = self.last_beat.lock() {
            *last = Some(std::time::Instant::now());
        }
    }

    /// Why `/healthz` fails, if it does.
    fn unhealthy(&self) -> Option<String> {
        let after = self.stale_after?;
        let last = (*self.last_beat.lock().ok()?)?;
        (last.elapsed() > after).then(|| {
            format!(
                "the control loop has not completed a poll for {:.0?} (limit {after:?})",
                last.elapsed()
            )
        })
    }

    /// Marks the process ready or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The registry's metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding gathered families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Binds `addr`, logs `metrics on http://ADDR/metrics`, and serves in the background.
    pub async fn spawn(self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        info!("metrics on http://{bound}{METRICS_PATH}");
        tokio::spawn(async move {
            if let Err(e) = self.serve(listener).await {
                warn!("metrics server stopped: {e}");
            }
        });
        Ok(bound)
    }

    /// Serves the endpoints on `listener` until the process ends.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let ready = Arc::clone(&self.ready);
        let health = self.clone();
        let app = Router::new()
            .route(
                HEALTH_PATH,
                get(move || {
                    let problem = health.unhealthy();
                    async move {
                        match problem {
                            None => (StatusCode::OK, "ok".to_string()).into_response(),
                            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
                        }
                    }
                }),
            )
            .route(
                READY_PATH,
                get(move || {
                    let ok = ready.load(Ordering::Relaxed);
                    async move {
                        if ok {
                            (StatusCode::OK, "ready").into_response()
                        } else {
                            (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
                        }
                    }
                }),
            )
            .route(
                METRICS_PATH,
                get(move || {
                    let body = self.render();
                    async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
                }),
            );
        axum::serve(listener, app).await
    }
}

/// Buckets for task durations: from milliseconds (echo) to hours (large rasters).
pub const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

/// The worker's metrics and readiness. Labels are low-cardinality: `kind` only for registered
/// handlers, `reason` from a fixed set; never a task id.
#[derive(Clone)]
pub struct Health {
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
    /// Task message bytes received.
    pub bytes_in: IntCounter,
    /// Result and dead-letter bytes published.
    pub bytes_out: IntCounter,
}

impl Health {
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
}

#[cfg(test)]
mod liveness_tests {
    use super::*;

    #[test]
    fn health_fails_once_the_loop_stops_beating() {
        let plain = Endpoints::default();
        assert!(
            plain.unhealthy().is_none(),
            "without a limit, always healthy"
        );
        let endpoints =
            Endpoints::default().fail_health_when_stale(std::time::Duration::from_millis(50));
        assert!(
            endpoints.unhealthy().is_none(),
            "healthy before the first beat"
        );
        endpoints.beat();
        assert!(endpoints.unhealthy().is_none());
        std::thread::sleep(std::time::Duration::from_millis(120));
        let why = endpoints.unhealthy().expect("stale");
        assert!(why.contains("has not completed a poll"), "{why}");
        endpoints.beat();
        assert!(endpoints.unhealthy().is_none());
    }
}
