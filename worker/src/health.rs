//! The worker's HTTP endpoints: `/healthz` (the process is alive), `/readyz` (connected and
//! consuming), and `/metrics` (Prometheus text format).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Paths served, for manifests and tests.
pub const HEALTH_PATH: &str = "/healthz";
/// Readiness path.
pub const READY_PATH: &str = "/readyz";
/// Metrics path.
pub const METRICS_PATH: &str = "/metrics";

/// Readiness and metrics shared between the runtime and the HTTP server.
#[derive(Clone)]
pub struct Health {
    ready: Arc<AtomicBool>,
    registry: Registry,
    /// Tasks finished, by kind and status.
    pub finished: IntCounterVec,
    /// Tasks running now.
    pub in_flight: IntGauge,
}

impl Health {
    /// Registers the worker's metrics.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let finished = IntCounterVec::new(
            Opts::new(
                "warren_worker_tasks_finished_total",
                "Tasks finished, by kind and status.",
            ),
            &["kind", "status"],
        )?;
        let in_flight = IntGauge::new("warren_worker_tasks_in_flight", "Tasks running now.")?;
        registry.register(Box::new(finished.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        Ok(Self {
            ready: Arc::new(AtomicBool::new(false)),
            registry,
            finished,
            in_flight,
        })
    }

    /// Marks the worker ready (consuming) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Serves the endpoints on `listener` until the process ends.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let ready = Arc::clone(&self.ready);
        let app = Router::new()
            .route(HEALTH_PATH, get(|| async { "ok" }))
            .route(
                READY_PATH,
                get(move || {
                    let ok = ready.load(Ordering::Relaxed);
                    async move {
                        if ok {
                            (StatusCode::OK, "consuming").into_response()
                        } else {
                            (
                                StatusCode::SERVICE_UNAVAILABLE,
                                "not connected to the broker",
                            )
                                .into_response()
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
